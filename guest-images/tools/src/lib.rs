//! A safe Rust face of libtessera (guest-images/libtessera/tessera.h), shared by the guest
//! tools. Device constants come from `vgpu_abi`; the ioctl structures mirror
//! `tessera_vgpu_ioctl.h` (their sizes are checked here as they are there).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::io;
use std::marker::PhantomData;
use std::ptr::NonNull;

pub use vgpu_abi::{Packet, fault, kernel, packet};

pub mod reference;

// libtessera's session transports (`tessera__sess_*`), which the C library calls.
#[cfg(feature = "sessions")]
use tessera_capi as _;

/// `struct tvgpu_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Info {
    pub ioctl_version: u32,
    pub abi_version: u32,
    pub caps: u32,
    pub num_contexts: u32,
    pub contexts_in_use: u32,
    pub kernels: u32,
    pub vram_size: u64,
    pub vram_free: u64,
    pub ring_entries: u32,
    pub msix_vectors: u32,
    pub fault_count: u32,
    pub ctx_id: u32,
    pub pci_domain: u32,
    pub pci_bus: u32,
    pub pci_devfn: u32,
    pub subsystem_id: u32,
    pub va_start: u64,
    pub va_end: u64,
}

/// `struct tvgpu_ctx_state`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CtxState {
    pub ctx_id: u32,
    pub flags: u32,
    pub fault_code: u32,
    pub faults: u32,
    pub fault_addr: u64,
    pub submitted: u64,
    pub completed: u64,
}

/// `TVGPU_STATE_FAULTED`.
pub const STATE_FAULTED: u32 = 1;
/// The ioctl interface version these tools speak (`TVGPU_IOCTL_VERSION`).
pub const IOCTL_VERSION: u32 = 1;

const _: () = assert!(size_of::<Info>() == 88);
const _: () = assert!(size_of::<CtxState>() == 40);
const _: () = assert!(size_of::<Packet>() == packet::PACKET_SIZE as usize);

#[repr(C)]
struct RawDev {
    _private: [u8; 0],
}

#[repr(C)]
struct RawBo {
    _private: [u8; 0],
}

// SAFETY (for the whole block): these are the functions of tessera.h with their C signatures.
unsafe extern "C" {
    fn tessera_count() -> c_int;
    fn tessera_open(index: c_int) -> *mut RawDev;
    fn tessera_close(dev: *mut RawDev);
    fn tessera_info(dev: *mut RawDev, info: *mut Info) -> c_int;
    fn tessera_bo_create(dev: *mut RawDev, size: u64, flags: u32, bo: *mut *mut RawBo) -> c_int;
    fn tessera_bo_destroy(bo: *mut RawBo);
    fn tessera_bo_cpu(bo: *const RawBo) -> *mut c_void;
    fn tessera_bo_va(bo: *const RawBo) -> u64;
    fn tessera_bo_size(bo: *const RawBo) -> u64;
    fn tessera_submit(dev: *mut RawDev, p: *const Packet, count: u32, seqno: *mut u64) -> c_int;
    fn tessera_wait(dev: *mut RawDev, seqno: u64, timeout_ns: i64) -> c_int;
    fn tessera_ctx_state(dev: *mut RawDev, state: *mut CtxState) -> c_int;
    fn tessera_recover(dev: *mut RawDev) -> c_int;
    fn tessera_fault_name(code: u32) -> *const c_char;
    fn tessera_last_error() -> *const c_char;
}

fn check(r: c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(-r))
    } else {
        Ok(())
    }
}

/// The device `index` names: `TESSERA_DEVICE` when it is set (a device node, `unix:PATH` or
/// `tls://HOST:PORT/INSTANCE`), else `/dev/tessera/vgpu<index>`.
pub fn device_name(index: usize) -> String {
    match std::env::var("TESSERA_DEVICE") {
        Ok(d) if !d.is_empty() => d,
        _ => format!("/dev/tessera/vgpu{index}"),
    }
}

/// Number of vGPUs (`/dev/tessera/vgpu*`; 1 when `TESSERA_DEVICE` names one).
pub fn count() -> usize {
    // SAFETY: no arguments; it only stats device nodes.
    let n = unsafe { tessera_count() };
    usize::try_from(n).unwrap_or(0)
}

/// A readable name of a fault code.
pub fn fault_name(code: u32) -> String {
    // SAFETY: tessera_fault_name returns a pointer to a static NUL-terminated string.
    unsafe { CStr::from_ptr(tessera_fault_name(code)) }
        .to_string_lossy()
        .into_owned()
}

/// An open vGPU: one GPU context of its own.
#[derive(Debug)]
pub struct Device {
    raw: NonNull<RawDev>,
}

/// Where a buffer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Vram,
    Sysmem,
}

impl Device {
    /// Opens device `index` ([`device_name`]).
    pub fn open(index: usize) -> io::Result<Device> {
        let index =
            c_int::try_from(index).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: plain call; a NULL return sets errno.
        let raw = unsafe { tessera_open(index) };
        NonNull::new(raw).map(|raw| Device { raw }).ok_or_else(|| {
            let errno = io::Error::last_os_error();
            // SAFETY: tessera_last_error returns this thread's NUL-terminated message.
            let why = unsafe { CStr::from_ptr(tessera_last_error()) }.to_string_lossy();
            io::Error::new(errno.kind(), why.into_owned())
        })
    }

    pub fn info(&self) -> io::Result<Info> {
        let mut info = Info::default();
        // SAFETY: `raw` is an open device; `info` is a valid struct tvgpu_info.
        check(unsafe { tessera_info(self.raw.as_ptr(), &mut info) })?;
        Ok(info)
    }

    /// A buffer of `size` bytes, mapped for the CPU and the GPU.
    pub fn buffer(
        &self,
        size: u64,
        place: Placement,
        gpu_writable: bool,
    ) -> io::Result<Buffer<'_>> {
        let mut flags = match place {
            Placement::Vram => 0,
            Placement::Sysmem => 1,
        };
        if !gpu_writable {
            flags |= 0x100;
        }
        let mut bo = std::ptr::null_mut();
        // SAFETY: `raw` is an open device; `bo` receives the new object.
        check(unsafe { tessera_bo_create(self.raw.as_ptr(), size, flags, &mut bo) })?;
        let raw = NonNull::new(bo).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        Ok(Buffer {
            raw,
            _dev: PhantomData,
        })
    }

    /// Submits packets; returns the batch's sequence number.
    pub fn submit(&self, packets: &[Packet]) -> io::Result<u64> {
        let count = u32::try_from(packets.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut seqno = 0;
        // SAFETY: `packets` is `count` valid 64-byte packets (the C layout of Packet).
        check(unsafe { tessera_submit(self.raw.as_ptr(), packets.as_ptr(), count, &mut seqno) })?;
        Ok(seqno)
    }

    /// Waits for a batch (`timeout_ns < 0`: forever).
    pub fn wait(&self, seqno: u64, timeout_ns: i64) -> io::Result<()> {
        // SAFETY: plain call on an open device.
        check(unsafe { tessera_wait(self.raw.as_ptr(), seqno, timeout_ns) })
    }

    /// Submit and wait (10 s).
    pub fn run(&self, packets: &[Packet]) -> io::Result<()> {
        let s = self.submit(packets)?;
        self.wait(s, 10_000_000_000)
    }

    pub fn ctx_state(&self) -> io::Result<CtxState> {
        let mut st = CtxState::default();
        // SAFETY: `st` is a valid struct tvgpu_ctx_state.
        check(unsafe { tessera_ctx_state(self.raw.as_ptr(), &mut st) })?;
        Ok(st)
    }

    pub fn recover(&self) -> io::Result<()> {
        // SAFETY: plain call on an open device.
        check(unsafe { tessera_recover(self.raw.as_ptr()) })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: `raw` came from tessera_open and is closed once; buffers borrow the device,
        // so none outlives it.
        unsafe { tessera_close(self.raw.as_ptr()) }
    }
}

/// A buffer object mapped for the CPU and at a GPU VA.
#[derive(Debug)]
pub struct Buffer<'d> {
    raw: NonNull<RawBo>,
    _dev: PhantomData<&'d Device>,
}

impl Buffer<'_> {
    /// GPU virtual address.
    pub fn va(&self) -> u64 {
        // SAFETY: a live buffer object.
        unsafe { tessera_bo_va(self.raw.as_ptr()) }
    }

    pub fn size(&self) -> u64 {
        // SAFETY: a live buffer object.
        unsafe { tessera_bo_size(self.raw.as_ptr()) }
    }

    fn cpu(&self) -> *mut u8 {
        // SAFETY: a live buffer object.
        unsafe { tessera_bo_cpu(self.raw.as_ptr()) }.cast()
    }

    /// Copies `data` in at byte `off`.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        assert!(
            off + data.len() <= self.size() as usize,
            "buffer write out of range"
        );
        // SAFETY: the range lies inside the buffer's shared mapping, which stays mapped while
        // the buffer lives; the GPU is not using it (callers write before submitting).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.cpu().add(off), data.len()) }
    }

    /// Copies `out.len()` bytes out from byte `off`.
    pub fn read(&self, off: usize, out: &mut [u8]) {
        assert!(
            off + out.len() <= self.size() as usize,
            "buffer read out of range"
        );
        // SAFETY: as in `write`; callers read after the GPU's work completed.
        unsafe { std::ptr::copy_nonoverlapping(self.cpu().add(off), out.as_mut_ptr(), out.len()) }
    }

    pub fn write_u32s(&mut self, off: usize, v: &[u32]) {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.write(off, &bytes);
    }

    pub fn read_u32s(&self, off: usize, n: usize) -> Vec<u32> {
        let mut b = vec![0u8; n * 4];
        self.read(off, &mut b);
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        // SAFETY: `raw` came from tessera_bo_create and is destroyed once.
        unsafe { tessera_bo_destroy(self.raw.as_ptr()) }
    }
}

/// Packet builders (the layout of `vgpu_abi::packet`).
pub mod pkt {
    use super::{Packet, kernel, packet};

    fn p(opcode: u32, flags: u32, args: &[u64]) -> Packet {
        let mut p = Packet {
            opcode,
            flags,
            ..Default::default()
        };
        p.args[..args.len()].copy_from_slice(args);
        p
    }

    pub fn copy(src: u64, dst: u64, len: u64) -> Packet {
        p(packet::OP_COPY, 0, &[src, dst, len])
    }
    pub fn fill(dst: u64, len: u64, pattern: u32) -> Packet {
        p(packet::OP_FILL, 0, &[dst, len, u64::from(pattern)])
    }
    pub fn saxpy(n: u64, a: f32, x: u64, y: u64) -> Packet {
        p(
            packet::OP_DISPATCH,
            kernel::SAXPY,
            &[n, u64::from(a.to_bits()), x, y],
        )
    }
    pub fn sgemm(m: u64, n: u64, k: u64, a: u64, b: u64, c: u64) -> Packet {
        p(packet::OP_DISPATCH, kernel::SGEMM, &[m, n, k, a, b, c])
    }
    pub fn reduce_sum(n: u64, x: u64, out: u64) -> Packet {
        p(packet::OP_DISPATCH, kernel::REDUCE_SUM, &[n, x, out])
    }
    pub fn crc32(len: u64, src: u64, out: u64) -> Packet {
        p(packet::OP_DISPATCH, kernel::CRC32, &[len, src, out])
    }
}
