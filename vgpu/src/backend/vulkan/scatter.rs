//! Two ways a kernel can reach operands whose pages lie scattered in memory, measured side
//! by side on one device (issue #19, item 3; `tessera bench scatter` prints the result):
//!
//! - **gather/scatter**, what `ops.rs` does for every kernel: staging buffers, each operand
//!   copied in with one copy region per extent, the kernel run on the staging buffers, the
//!   outputs copied back the same way. Timed twice: with new staging buffers per packet, and
//!   with a pair kept from an earlier packet (what `ops.rs` gets from its device's keeping,
//!   `staging.rs`, since this study);
//! - **a page table of device addresses**: one 64-bit buffer device address per 4 KiB page,
//!   written by the host, and a shader (`shaders/saxpy_pages.comp`) that looks each element's
//!   page up and reads and writes guest memory in place.
//!
//! The kernel is SAXPY (`y = a·x + y`, fused), the operands two buffers of the same size in
//! one imported host mapping, every page of them at a shuffled place. Both paths are checked
//! bit-exactly against `f32::mul_add` before anything is timed (the values make the result
//! exact, fused or not).

use std::time::{Duration, Instant};

use ash::vk;
use vgpu_abi::kernel::SAXPY_GROUP;
use vm_memory::MmapRegion;

use super::device::{Dev, DeviceBuffer, HostBuffer};
use super::pipelines::{self, Shader};
use super::{VulkanGpu, vk_err};
use crate::backend::BackendError;

/// The page the device-address shader assumes (its `Page` is 1024 floats).
const PAGE: u64 = 4096;
/// The scalar both paths use.
const A: f32 = 0.5;

/// Medians over the runs of one SAXPY packet on each path, operands of `bytes` each.
#[derive(Debug, Clone, PartialEq)]
pub struct ScatterCosts {
    /// Bytes per operand (x and y each).
    pub bytes: u64,
    /// Copy regions per operand on the gather/scatter path (one per page).
    pub extents: u64,
    /// Timed runs of each path (they alternate).
    pub runs: usize,
    /// Gather/scatter: staging allocated and both operands copied in.
    pub gather: Duration,
    /// Of `gather`: allocating the two staging buffers (a new pair per packet, as `ops.rs` did
    /// before devices kept them).
    pub staging_alloc: Duration,
    /// Gather/scatter: the kernel on the staging buffers.
    pub staged_kernel: Duration,
    /// Gather/scatter: y copied back.
    pub scatter: Duration,
    /// Gather/scatter: the whole packet (median of the sums, not the sum of the medians).
    pub staged: Duration,
    /// Device addresses: the page table allocated and written by the host.
    pub table: Duration,
    /// Device addresses: the kernel following the table.
    pub table_kernel: Duration,
    /// Device addresses: the whole packet.
    pub device_address: Duration,
    /// Gather/scatter with staging buffers kept from an earlier packet: the gather.
    pub warm_gather: Duration,
    /// Gather/scatter with staging buffers kept from an earlier packet: the whole packet.
    pub warm_staged: Duration,
}

impl ScatterCosts {
    /// The device-address packet's time over the gather/scatter packet's (below 1: faster).
    pub fn ratio(&self) -> f64 {
        self.device_address.as_secs_f64() / self.staged.as_secs_f64().max(1e-12)
    }
}

fn failed(what: &'static str) -> BackendError {
    BackendError::Vulkan(format!("{what} failed on the device"))
}

/// The operands and where each of their pages lies.
struct Study {
    /// Declared before `host`: the import goes first.
    import: HostBuffer,
    /// An anonymous mapping, x's and y's pages in it.
    host: MmapRegion<()>,
    dev: std::sync::Arc<Dev>,
    /// Host page of operand page `i` (x: `0..pages`, y: `pages..2 * pages`).
    place: Vec<u64>,
    pages: u64,
    n: u32,
}

/// A permutation of `0..n` (xorshift; the same every run).
fn shuffled(n: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..v.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
    v
}

// The first values: multiples of 0.25 below 250 and small integers, so `A·x + y` is exact
// and a device that rounds the product separately (Vulkan does not promise a fused `fma`)
// gives the same bits as one that fuses.
fn x0(k: usize) -> f32 {
    (k % 1000) as f32 * 0.25
}

fn y0(k: usize) -> f32 {
    1.0 + (k % 7) as f32
}

impl Study {
    fn new(gpu: &VulkanGpu, bytes: u64) -> Result<Self, BackendError> {
        let dev = Dev::with_device_addresses(gpu.inst.clone())?;
        let pages = bytes / PAGE;
        let len = 2 * bytes;
        let host = MmapRegion::<()>::new(len as usize).map_err(|e| {
            BackendError::Vulkan(format!("cannot map {len} bytes of host memory: {e}"))
        })?;
        // SAFETY: `host` is one mapping of `len` bytes, page-aligned (the device imports at
        // page granularity, checked when the instance was made), and it outlives the import
        // (field order).
        let import = unsafe { dev.import(host.as_ptr(), len) }?;
        let place = shuffled(2 * pages);
        let mut s = Study {
            import,
            host,
            dev,
            place,
            pages,
            n: u32::try_from(bytes / 4)
                .map_err(|_| BackendError::Vulkan("operands too large".into()))?,
        };
        s.reset();
        Ok(s)
    }

    /// The host mapping as floats.
    fn floats(&mut self) -> &mut [f32] {
        // SAFETY: the region maps `size()` bytes read-write, page-aligned (so f32-aligned),
        // for as long as `self` lives; `&mut self` keeps every other view out, and no
        // submission is in flight between packets, when the host touches it.
        unsafe { std::slice::from_raw_parts_mut(self.host.as_ptr().cast(), self.host.size() / 4) }
    }

    /// Float `k` of operand `which` (0: x, 1: y) as an index into the host mapping.
    fn at(&self, which: u64, k: usize) -> usize {
        let per_page = (PAGE / 4) as usize;
        let page = self.place[(which * self.pages) as usize + k / per_page] as usize;
        page * per_page + k % per_page
    }

    /// Writes the operands' first values.
    fn reset(&mut self) {
        let n = self.n as usize;
        let idx: Vec<(usize, usize)> = (0..n).map(|k| (self.at(0, k), self.at(1, k))).collect();
        let f = self.floats();
        for (k, (xi, yi)) in idx.into_iter().enumerate() {
            f[xi] = x0(k);
            f[yi] = y0(k);
        }
    }

    /// Whether y is one SAXPY pass past its first values, bit for bit.
    fn check(&mut self, path: &str) -> Result<(), BackendError> {
        let n = self.n as usize;
        let idx: Vec<usize> = (0..n).map(|k| self.at(1, k)).collect();
        let f = self.floats();
        for (k, yi) in idx.into_iter().enumerate() {
            let want = A.mul_add(x0(k), y0(k));
            if f[yi].to_bits() != want.to_bits() {
                return Err(BackendError::Vulkan(format!(
                    "{path}: y[{k}] is {} where f32::mul_add gives {want}",
                    f[yi]
                )));
            }
        }
        Ok(())
    }

    /// Runs `shader` over every SAXPY group with `buffers` bound and `push`.
    fn kernel(
        &self,
        shader: Shader,
        buffers: &[vk::Buffer],
        push: &[u8],
    ) -> Result<(), BackendError> {
        let pipe = pipelines::get(&self.dev, shader).map_err(vk_err("cannot make a pipeline"))?;
        let set = self
            .dev
            .descriptor_set(pipe.set_layout, buffers)
            .map_err(vk_err("cannot allocate a descriptor set"))?;
        let groups = u64::from(self.n).div_ceil(SAXPY_GROUP) as u32;
        let r = self.dev.run(|d, cmd| {
            // SAFETY: this device's command buffer, pipeline and a set of its layout binding
            // live buffers; the push constants fill the range; every group exists.
            unsafe { pipe.record(d, cmd, set, push, 0, groups, 1) };
        });
        self.dev.free_set(set);
        r.map_err(|_| failed("the kernel"))
    }

    /// Copies page by page between the imported memory and `staging` (operand `which`).
    fn copy_pages(
        &self,
        which: u64,
        staging: &DeviceBuffer,
        into_staging: bool,
    ) -> Result<(), BackendError> {
        let host = self.import.buffer;
        let regions: Vec<vk::BufferCopy> = (0..self.pages)
            .map(|i| {
                let there = self.place[(which * self.pages + i) as usize] * PAGE;
                let (src_offset, dst_offset) = if into_staging {
                    (there, i * PAGE)
                } else {
                    (i * PAGE, there)
                };
                vk::BufferCopy {
                    src_offset,
                    dst_offset,
                    size: PAGE,
                }
            })
            .collect();
        let (src, dst) = if into_staging {
            (host, staging.buffer())
        } else {
            (staging.buffer(), host)
        };
        self.dev
            .run(|d, cmd| {
                for r in &regions {
                    // SAFETY: recording into this device's command buffer; both buffers belong
                    // to it and every region lies inside both.
                    unsafe { d.cmd_copy_buffer(cmd, src, dst, &[*r]) };
                }
            })
            .map_err(|_| failed("a copy"))
    }

    fn push(&self, extra: Option<u32>) -> Vec<u8> {
        let mut p = Vec::new();
        for v in [self.n, A.to_bits(), SAXPY_GROUP as u32] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        if let Some(v) = extra {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p
    }

    /// One packet through staging buffers: (gather, kernel, scatter, allocation within the
    /// gather) times. With `warm`, the staging buffers are that pair (allocated and touched
    /// by an earlier packet) instead of a new one.
    fn staged(&self, warm: Option<&[DeviceBuffer; 2]>) -> Result<[Duration; 4], BackendError> {
        let t0 = Instant::now();
        let fresh;
        let [sx, sy] = match warm {
            Some(pair) => pair,
            None => {
                fresh = self.staging_pair()?;
                &fresh
            }
        };
        let allocated = t0.elapsed();
        self.copy_pages(0, sx, true)?;
        self.copy_pages(1, sy, true)?;
        let t1 = Instant::now();
        self.kernel(Shader::Saxpy, &[sx.buffer(), sy.buffer()], &self.push(None))?;
        let t2 = Instant::now();
        self.copy_pages(1, sy, false)?;
        let t3 = Instant::now();
        Ok([t1 - t0, t2 - t1, t3 - t2, allocated])
    }

    /// Two staging buffers the size of an operand.
    fn staging_pair(&self) -> Result<[DeviceBuffer; 2], BackendError> {
        let bytes = u64::from(self.n) * 4;
        let one = || {
            self.dev
                .fresh_staging(bytes)
                .map_err(vk_err("cannot allocate staging"))
        };
        Ok([one()?, one()?])
    }

    /// One packet through a page table of device addresses: (table, kernel) times.
    fn device_address(&self) -> Result<[Duration; 2], BackendError> {
        let t0 = Instant::now();
        let base = self
            .dev
            .address(self.import.buffer)
            .ok_or_else(|| failed("bufferDeviceAddress"))?;
        let table = self
            .dev
            .fresh_staging(2 * self.pages * 8)
            .map_err(vk_err("cannot allocate the page table"))?;
        let entries: Vec<u8> = self
            .place
            .iter()
            .flat_map(|&p| (base + p * PAGE).to_le_bytes())
            .collect();
        if !table.write_at(0, &entries) {
            return Err(failed("writing the page table"));
        }
        let t1 = Instant::now();
        let y_pages = u32::try_from(self.pages).unwrap_or(u32::MAX);
        self.kernel(
            Shader::SaxpyPages,
            &[table.buffer()],
            &self.push(Some(y_pages)),
        )?;
        Ok([t1 - t0, t1.elapsed()])
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

impl VulkanGpu {
    /// Runs SAXPY over two operands of `mib` MiB each, all their 4 KiB pages scattered, on
    /// both paths (module documentation): checks each bit-exactly, then times `runs` packets
    /// of each, alternating. A device of its own, made with `bufferDeviceAddress` (an error
    /// names it when the device lacks it).
    pub fn scatter_costs(&self, mib: u64, runs: usize) -> Result<ScatterCosts, BackendError> {
        if !(1..=1024).contains(&mib) {
            return Err(BackendError::Vulkan(format!(
                "operands of {mib} MiB: 1 to 1024 are measured"
            )));
        }
        let bytes = mib << 20;
        let mut s = Study::new(self, bytes)?;
        s.staged(None)?;
        s.check("gather/scatter")?;
        s.reset();
        s.device_address()?;
        s.check("device addresses")?;
        let warm = s.staging_pair()?;
        s.staged(Some(&warm))?;
        // One row per run: gather, allocation, kernel, scatter, staged; table, kernel,
        // device address; warm gather, warm staged.
        let mut rows = Vec::new();
        for _ in 0..runs.max(1) {
            let [g, k, sc, alloc] = s.staged(None)?;
            let [t, u] = s.device_address()?;
            let [wg, wk, wsc, _] = s.staged(Some(&warm))?;
            rows.push([g, alloc, k, sc, g + k + sc, t, u, t + u, wg, wg + wk + wsc]);
        }
        let m = |i: usize| median(rows.iter().map(|r| r[i]).collect());
        Ok(ScatterCosts {
            bytes,
            extents: s.pages,
            runs: runs.max(1),
            gather: m(0),
            staging_alloc: m(1),
            staged_kernel: m(2),
            scatter: m(3),
            staged: m(4),
            table: m(5),
            table_kernel: m(6),
            device_address: m(7),
            warm_gather: m(8),
            warm_staged: m(9),
        })
    }
}
