//! Operations on a vGPU's Vulkan device: checked extents become (buffer, offset) pairs in its
//! imported VRAM and guest RAM; each group is one submission, so the `RunControl` is asked
//! between them.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use ash::vk;
use vgpu_abi::{fault, kernel};

use super::device::{Dev, DeviceBuffer};
use super::pipelines::{self, Shader};
use super::vram::{Bound, VulkanImport, VulkanVram};
use crate::backend::{COPY_GROUP, CRC_GROUP, Dispatch, Launch, Op, RunControl};
use crate::mem::{Extent, Fault, Loc, ScatterList, Spaces};

/// Where an extent lives on the bound device.
fn locate(spaces: &Spaces, bound: &Bound, e: &Extent) -> Result<(vk::Buffer, u64), Fault> {
    match e.loc {
        Loc::Vram => Ok((bound.vram.buffer(), e.addr)),
        Loc::Sys => bound
            .fresh
            .as_deref()
            .or_else(|| {
                spaces
                    .import
                    .as_deref()
                    .and_then(|i| i.downcast_ref::<VulkanImport>())
            })
            .and_then(|i| {
                i.regions
                    .iter()
                    .find(|r| e.addr >= r.start && e.addr + e.len <= r.start + r.len)
            })
            .map(|r| (r.buffer.buffer, e.addr - r.start))
            // Checked against the domain above the seam: only memory that went away gets here.
            .ok_or(Fault::new(fault::DMA_DOMAIN, e.addr)),
    }
}

/// A copy between two buffers.
struct Copy {
    src: vk::Buffer,
    dst: vk::Buffer,
    region: vk::BufferCopy,
}

/// The copies that move bytes `range` of `src` to the same bytes of `dst`.
fn copies(
    spaces: &Spaces,
    vram: &Bound,
    src: &ScatterList,
    dst: &ScatterList,
    range: Range<u64>,
) -> Result<Vec<Copy>, Fault> {
    let mut out = Vec::new();
    src.pieces(range.start, range.end - range.start, |se, s_within, r| {
        let (sb, so) = locate(spaces, vram, se)?;
        let s_at = so + s_within;
        let from = range.start + r.start as u64;
        dst.pieces(from, r.len() as u64, |de, d_within, r2| {
            let (db, doff) = locate(spaces, vram, de)?;
            out.push(Copy {
                src: sb,
                dst: db,
                region: vk::BufferCopy {
                    src_offset: s_at + r2.start as u64,
                    dst_offset: doff + d_within,
                    size: r2.len() as u64,
                },
            });
            Ok(())
        })
    })?;
    Ok(out)
}

/// The fills of bytes `range` of `dst` (4-byte aligned: FILL's rule).
fn fills(
    spaces: &Spaces,
    vram: &Bound,
    dst: &ScatterList,
    range: Range<u64>,
) -> Result<Vec<(vk::Buffer, u64, u64)>, Fault> {
    let mut out = Vec::new();
    dst.pieces(range.start, range.end - range.start, |e, within, r| {
        let (b, off) = locate(spaces, vram, e)?;
        out.push((b, off + within, r.len() as u64));
        Ok(())
    })?;
    Ok(out)
}

struct VkLaunch {
    op: Op,
    spaces: Arc<Spaces>,
    bound: Bound,
}

/// The vGPU's Vulkan VRAM in `spaces`, bound to its current device.
fn bind(spaces: &Spaces) -> Result<Bound, Fault> {
    spaces
        .vram
        .as_any()
        .downcast_ref::<VulkanVram>()
        .ok_or(Fault::new(fault::BAD_PACKET, 0))?
        .bind(spaces)
}

impl VkLaunch {
    /// Runs group `g` as one submission.
    fn group(&self, g: u64) -> Result<(), Fault> {
        let vram = &self.bound;
        let sp = &*self.spaces;
        match &self.op {
            Op::Copy { src, dst } => {
                let start = g * COPY_GROUP;
                let end = (start + COPY_GROUP).min(src.len());
                let list = copies(sp, vram, src, dst, start..end)?;
                vram.vram.dev.run(|d, cmd| {
                    for c in &list {
                        // SAFETY: recording into this device's command buffer; both buffers
                        // belong to it and the region lies inside them (checked extents).
                        unsafe { d.cmd_copy_buffer(cmd, c.src, c.dst, &[c.region]) };
                    }
                })
            }
            Op::Fill { dst, pattern } => {
                let start = g * COPY_GROUP;
                let end = (start + COPY_GROUP).min(dst.len());
                let list = fills(sp, vram, dst, start..end)?;
                vram.vram.dev.run(|d, cmd| {
                    for &(b, off, len) in &list {
                        // SAFETY: as above; offset and size are multiples of 4 (FILL's rule,
                        // and extents split only at page boundaries).
                        unsafe { d.cmd_fill_buffer(cmd, b, off, len, *pattern) };
                    }
                })
            }
            Op::Dispatch(_) => Err(Fault::new(fault::BAD_OPCODE, 0)),
        }
    }
}

/// A kernel's operand: the staging buffer it runs on and the guest buffer it mirrors.
struct Operand {
    list: ScatterList,
    staging: DeviceBuffer,
    /// Written by the kernel: copied back to `list` at the end.
    output: bool,
}

/// A kernel on a vGPU's device. Its operands are gathered into staging buffers at
/// `prepare`, group ranges run as `vkCmdDispatchBase` slices, outputs are scattered back at
/// `finish` (the software GPU's rule: a packet's result counts once every group ran).
struct KernelLaunch {
    spaces: Arc<Spaces>,
    bound: Bound,
    dev: Arc<Dev>,
    shader: Shader,
    push: Vec<u8>,
    operands: Vec<Operand>,
    /// Per-group results the host combines (reduce: u64 sums; CRC-32: u32 CRCs).
    partials: Option<DeviceBuffer>,
    set: vk::DescriptorSet,
    /// What `finish` does after scattering the outputs.
    end: End,
    /// Groups per submission, sized from the measured time per group.
    slice: u64,
    /// SPIN_US: microseconds per group (each group is dispatched in chunks).
    spin_us: Option<u64>,
    /// Workgroups across (SGEMM: blocks of SGEMM_COLUMNS columns).
    columns: u32,
}

enum End {
    None,
    Reduce { out: ScatterList },
    Crc { out: ScatterList, len: u64 },
}

/// Wall time one submission of a kernel should take: a quarter of the default time slice, so
/// a preemption point comes at least that often.
const SLICE_NS: u64 = 500_000;
/// Longest single SPIN_US dispatch (a longer group is several, so a reset or the watchdog
/// stops it between them).
const SPIN_CHUNK_US: u64 = 1000;
/// Partial CRCs per CRC-32 group (the shader's invocations per workgroup).
const CRC_PARTS: u64 = 256;
/// Columns of C per SGEMM workgroup across (the shader's `local_size_x`).
const SGEMM_COLUMNS: u64 = 64;

fn vk_fault(_: vk::Result) -> Fault {
    Fault::new(fault::TIMEOUT, 0)
}

impl KernelLaunch {
    fn new(d: Dispatch, spaces: Arc<Spaces>) -> Result<KernelLaunch, Fault> {
        let d_spin = match d {
            Dispatch::SpinUs { us, .. } => Some(us),
            _ => None,
        };
        let bound = bind(&spaces)?;
        let dev = bound.vram.dev.clone();
        let mut push = Vec::new();
        let mut columns = 1u32;
        let mut put = |v: u32| push.extend_from_slice(&v.to_le_bytes());
        let (shader, operands, groups, end): (Shader, Vec<(ScatterList, bool)>, u64, End) = match d
        {
            Dispatch::Saxpy { n, a, x, y } => {
                put(n as u32);
                put(a.to_bits());
                put(kernel::SAXPY_GROUP as u32);
                (Shader::Saxpy, vec![(x, false), (y, true)], 0, End::None)
            }
            Dispatch::Sgemm { m, n, k, a, b, c } => {
                for v in [m, n, k, kernel::SGEMM_GROUP_ROWS] {
                    put(v as u32);
                }
                columns = n.div_ceil(SGEMM_COLUMNS) as u32;
                (
                    Shader::Sgemm,
                    vec![(a, false), (b, false), (c, true)],
                    0,
                    End::None,
                )
            }
            Dispatch::ReduceSum { n, x, out } => {
                put(n as u32);
                put(kernel::REDUCE_GROUP as u32);
                put(0);
                let groups = n.div_ceil(kernel::REDUCE_GROUP);
                (
                    Shader::Reduce,
                    vec![(x, false)],
                    groups * 8,
                    End::Reduce { out },
                )
            }
            Dispatch::Crc32 { len, src, out } => {
                put(len as u32);
                put(CRC_GROUP as u32);
                put(0);
                let groups = len.div_ceil(CRC_GROUP);
                let parts = groups * CRC_PARTS * 4;
                (
                    Shader::Crc32,
                    vec![(src, false)],
                    parts,
                    End::Crc { out, len },
                )
            }
            Dispatch::SpinUs { us, .. } => {
                // Ticks of the device clock per dispatch (at most SPIN_CHUNK_US each).
                let ticks = (us.min(SPIN_CHUNK_US) as f64 * 1000.0
                    / f64::from(dev.inst.timestamp_period.max(f32::MIN_POSITIVE)))
                    as u64;
                push.extend_from_slice(&ticks.to_le_bytes());
                (Shader::Spin, Vec::new(), 0, End::None)
            }
        };
        let mut ops = Vec::new();
        for (list, output) in operands {
            let staging = dev.staging(list.len()).map_err(vk_fault)?;
            ops.push(Operand {
                list,
                staging,
                output,
            });
        }
        let partials = match shader {
            Shader::Reduce | Shader::Crc32 => Some(dev.staging(groups).map_err(vk_fault)?),
            // The spin shader's side-effect sink.
            Shader::Spin => Some(dev.staging(4).map_err(vk_fault)?),
            _ => None,
        };
        // Gather every operand into its staging buffer (outputs too: SAXPY reads y).
        let mut copies_in = Vec::new();
        for o in &ops {
            o.list.pieces(0, o.list.len(), |e, within, r| {
                let (b, off) = locate(&spaces, &bound, e)?;
                copies_in.push((
                    b,
                    o.staging.buffer(),
                    vk::BufferCopy {
                        src_offset: off + within,
                        dst_offset: r.start as u64,
                        size: r.len() as u64,
                    },
                ));
                Ok(())
            })?;
        }
        if !copies_in.is_empty() {
            dev.run(|d, cmd| {
                for (src, dst, region) in &copies_in {
                    // SAFETY: recording into this device's command buffer; both buffers
                    // belong to it and the region lies inside both.
                    unsafe { d.cmd_copy_buffer(cmd, *src, *dst, &[*region]) };
                }
            })?;
        }
        let pipe = pipelines::get(&dev, shader).map_err(vk_fault)?;
        let mut buffers: Vec<vk::Buffer> = ops.iter().map(|o| o.staging.buffer()).collect();
        if let Some(p) = &partials {
            buffers.push(p.buffer());
        }
        let set = dev
            .descriptor_set(pipe.set_layout, &buffers)
            .map_err(vk_fault)?;
        Ok(KernelLaunch {
            spaces,
            bound,
            dev,
            shader,
            push,
            operands: ops,
            partials,
            set,
            end,
            slice: 1,
            spin_us: d_spin,
            columns,
        })
    }

    /// Dispatches groups `first..first + count` as one submission.
    fn dispatch(&self, first: u64, count: u64) -> Result<(), Fault> {
        let pipe = pipelines::get(&self.dev, self.shader).map_err(vk_fault)?;
        let (x, n) = match self.shader {
            // One invocation per spin chunk; the base is irrelevant.
            Shader::Spin => (0, 1),
            _ => (first as u32, count as u32),
        };
        let y = self.columns;
        self.dev.run(|d, cmd| {
            // SAFETY: recording into this device's command buffer with its own pipeline and
            // set (made with its layout, binding this launch's live buffers); the push
            // constants match the layout's range; the group range lies inside the kernel's.
            unsafe { pipe.record(d, cmd, self.set, &self.push, x, n, y) };
        })
    }

    /// One SPIN_US group: dispatches of at most SPIN_CHUNK_US until `us` have passed on the
    /// host's clock, or the result is abandoned.
    fn spin_group(&self, us: u64, ctl: &dyn RunControl) -> Result<(), Fault> {
        let until = Instant::now() + std::time::Duration::from_micros(us);
        while Instant::now() < until && !ctl.abandoned() {
            self.dispatch(0, 1)?;
        }
        Ok(())
    }
}

impl Drop for KernelLaunch {
    fn drop(&mut self) {
        self.dev.free_set(self.set);
    }
}

impl Launch for KernelLaunch {
    fn run(&mut self, groups: Range<u64>, ctl: Arc<dyn RunControl>) -> Result<u64, Fault> {
        let mut next = groups.start;
        while next < groups.end {
            if ctl.stop() {
                return Ok(next);
            }
            if let Some(us) = self.spin_us {
                let r = self.spin_group(us, &*ctl);
                ctl.group_done();
                r?;
                next += 1;
                continue;
            }
            let count = self.slice.min(groups.end - next);
            let t = Instant::now();
            let r = self.dispatch(next, count);
            ctl.group_done();
            r?;
            next += count;
            // Size the next slice from this one's time per group.
            let per_group = (t.elapsed().as_nanos() as u64 / count).max(1);
            self.slice = (SLICE_NS / per_group).clamp(1, 1 << 16);
        }
        Ok(next)
    }

    fn outputs_at_finish(&self) -> bool {
        self.operands.iter().any(|o| o.output)
    }

    fn finish(self: Box<Self>) -> Result<(), Fault> {
        let mut copies_out = Vec::new();
        for o in self.operands.iter().filter(|o| o.output) {
            o.list.pieces(0, o.list.len(), |e, within, r| {
                let (b, off) = locate(&self.spaces, &self.bound, e)?;
                copies_out.push((
                    o.staging.buffer(),
                    b,
                    vk::BufferCopy {
                        src_offset: r.start as u64,
                        dst_offset: off + within,
                        size: r.len() as u64,
                    },
                ));
                Ok(())
            })?;
        }
        if !copies_out.is_empty() {
            self.dev.run(|d, cmd| {
                for (src, dst, region) in &copies_out {
                    // SAFETY: as in the gather.
                    unsafe { d.cmd_copy_buffer(cmd, *src, *dst, &[*region]) };
                }
            })?;
        }
        let partials = self.partials.as_ref().map(|p| p.bytes()).unwrap_or(&[]);
        match &self.end {
            End::None => Ok(()),
            End::Reduce { out } => {
                let sum = partials
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .fold(0u64, u64::wrapping_add);
                out.write(&self.spaces, 0, &sum.to_le_bytes())
            }
            End::Crc { out, len } => {
                let mut total = crc32fast::Hasher::new();
                let part = CRC_GROUP / CRC_PARTS;
                for (i, c) in partials.chunks_exact(4).enumerate() {
                    let crc = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    let start = i as u64 * part;
                    let n = part.min(len.saturating_sub(start));
                    total.combine(&crc32fast::Hasher::new_with_initial_len(crc, n));
                }
                out.write(&self.spaces, 0, &total.finalize().to_le_bytes())
            }
        }
    }
}

impl Launch for VkLaunch {
    fn run(&mut self, groups: Range<u64>, ctl: Arc<dyn RunControl>) -> Result<u64, Fault> {
        for g in groups.clone() {
            if ctl.stop() {
                return Ok(g);
            }
            let r = self.group(g);
            ctl.group_done();
            r?;
        }
        Ok(groups.end.max(groups.start))
    }

    fn finish(self: Box<Self>) -> Result<(), Fault> {
        Ok(())
    }
}

/// Prepares `op`: COPY and FILL as transfer commands, kernels as compute dispatches.
pub(super) fn prepare(op: Op, spaces: Arc<Spaces>) -> Result<Box<dyn Launch>, Fault> {
    match op {
        Op::Dispatch(d) => Ok(Box::new(KernelLaunch::new(d, spaces)?)),
        op => Ok(Box::new(VkLaunch {
            bound: bind(&spaces)?,
            op,
            spaces,
        })),
    }
}
