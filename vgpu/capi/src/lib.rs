//! The session transports of libtessera (`guest-images/libtessera`): the C library's calls
//! (`tessera.h`) over a GPU session, so that a program linked once with libtessera runs in a
//! VM (the guest driver's device node), in a container or host process (`unix:PATH`) and on a
//! machine without a GPU (`tls://HOST:PORT/INSTANCE`), picking its transport from
//! `TESSERA_DEVICE`. See docs/architecture.md, "One library on every transport".
//!
//! libtessera.c keeps the API and the device-node path; for a session address it calls the
//! `tessera__sess_*` functions here (an internal ABI: plain scalars and pointers, no structs
//! shared with C). Each returns 0 or a negative errno; `tessera__sess_error` says why the
//! last call of this thread failed.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

use vgpu_abi::Packet;

pub mod device;

use device::{Device, Failure};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// A session device as C holds it.
#[derive(Debug)]
pub struct Handle(Mutex<Device>);

/// Runs `f` on the device behind `h`: its result, or the negative errno of its failure (a
/// panic is `-EIO`: it never crosses into C).
fn with<T>(h: *mut Handle, f: impl FnOnce(&mut Device) -> Result<T, Failure>) -> Result<T, i32> {
    if h.is_null() {
        set_error("no device");
        return Err(-libc::EINVAL);
    }
    // SAFETY: a non-null handle is one `tessera__sess_open` returned and
    // `tessera__sess_close` has not freed (the C API's contract).
    let handle = unsafe { &*h };
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut d = handle.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut d)
    }));
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            set_error(&e.message);
            Err(-e.errno)
        }
        Err(_) => {
            set_error("internal error in the session library");
            Err(-libc::EIO)
        }
    }
}

fn status(r: Result<(), i32>) -> i32 {
    r.err().unwrap_or(0)
}

/// Writes `v` through `p` when it is not null.
fn put<T>(p: *mut T, v: T) {
    if !p.is_null() {
        // SAFETY: the C caller passes a valid pointer to a `T`, or null.
        unsafe { p.write(v) };
    }
}

/// Opens the session at `addr`; null with `errno` set on failure.
///
/// # Safety
/// `addr` is a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera__sess_open(addr: *const c_char) -> *mut Handle {
    let fail = |errno: i32, message: &str| {
        set_error(message);
        // SAFETY: __errno_location has no preconditions; it returns this thread's errno.
        let location = unsafe { libc::__errno_location() };
        // SAFETY: `location` points to this thread's errno, valid for writes.
        unsafe { *location = errno };
        std::ptr::null_mut()
    };
    if addr.is_null() {
        return fail(libc::EINVAL, "no device address");
    }
    // SAFETY: `addr` is NUL-terminated (the caller's contract).
    let Ok(addr) = unsafe { CStr::from_ptr(addr) }.to_str() else {
        return fail(libc::EINVAL, "the device address is not UTF-8");
    };
    match catch_unwind(|| Device::open(addr)) {
        Ok(Ok(d)) => Box::into_raw(Box::new(Handle(Mutex::new(d)))),
        Ok(Err(e)) => fail(e.errno, &e.message),
        Err(_) => fail(libc::EIO, "internal error in the session library"),
    }
}

/// Closes the session: its buffers and context go away with it.
///
/// # Safety
/// `h` is null or a handle of `tessera__sess_open`, not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera__sess_close(h: *mut Handle) {
    if !h.is_null() {
        // SAFETY: `h` came from `Box::into_raw` in `tessera__sess_open` and is freed once.
        drop(unsafe { Box::from_raw(h) });
    }
}

/// Why the last failed call of this thread failed ("" if none did).
#[unsafe(no_mangle)]
pub extern "C" fn tessera__sess_error() -> *const c_char {
    // The string lives until this thread's next failure.
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The instance: VRAM, VRAM not held by buffers, contexts, packets per submission, kernels
/// (bitmap), device ABI version.
///
/// # Safety
/// Each pointer is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera__sess_info(
    h: *mut Handle,
    vram_size: *mut u64,
    vram_free: *mut u64,
    contexts: *mut u32,
    max_packets: *mut u32,
    kernels: *mut u32,
    version: *mut u32,
) -> i32 {
    status(with(h, |d| {
        let i = d.info();
        put(vram_size, i.vram_size);
        put(vram_free, i.vram_free);
        put(contexts, i.contexts);
        put(max_packets, i.max_packets);
        put(kernels, i.kernels);
        put(version, i.version);
        Ok(())
    }))
}

/// A buffer object of `size` bytes (`flags`: tessera.h's `TESSERA_BO_*`): its GPU address,
/// CPU pointer and rounded size.
///
/// # Safety
/// Each pointer is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera__sess_bo_create(
    h: *mut Handle,
    size: u64,
    flags: u32,
    va: *mut u64,
    cpu: *mut *mut c_void,
    size_out: *mut u64,
) -> i32 {
    status(with(h, |d| {
        let (v, p, s) = d.bo_create(size, flags)?;
        put(va, v);
        put(cpu, p.cast());
        put(size_out, s);
        Ok(())
    }))
}

/// Gives back the buffer object at GPU address `va` (its CPU pointer goes away).
///
/// # Safety
/// `h` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera__sess_bo_destroy(h: *mut Handle, va: u64) {
    let _ = with(h, |d| {
        d.bo_destroy(va);
        Ok(())
    });
}

/// Queues `count` packets (`struct tvgpu_packet`, 64 bytes each); `*seqno`: the fence.
///
/// # Safety
/// `packets` points to `count` packets; `seqno` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera__sess_submit(
    h: *mut Handle,
    packets: *const u8,
    count: u32,
    seqno: *mut u64,
) -> i32 {
    let size = vgpu_abi::packet::PACKET_SIZE as usize;
    let bytes: &[u8] = if packets.is_null() || count == 0 {
        &[]
    } else {
        // SAFETY: the caller passes `count` packets of `size` bytes at `packets`.
        unsafe { std::slice::from_raw_parts(packets, count as usize * size) }
    };
    let pkts: Vec<Packet> = bytes
        .chunks_exact(size)
        .filter_map(|c| c.try_into().ok())
        .map(Packet::from_bytes)
        .collect();
    status(with(h, |d| {
        put(seqno, d.submit(&pkts)?);
        Ok(())
    }))
}

/// Waits for fence `seqno` (`timeout_ns` < 0: forever): 0, -ETIME, -EIO (a fault).
///
/// # Safety
/// `h` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera__sess_wait(h: *mut Handle, seqno: u64, timeout_ns: i64) -> i32 {
    status(with(h, |d| d.wait(seqno, timeout_ns)))
}

/// The context: faulted (0/1), its fault's code and address, its faults so far, the last
/// fence handed out and the last completed.
///
/// # Safety
/// Each pointer is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera__sess_state(
    h: *mut Handle,
    faulted: *mut u32,
    code: *mut u32,
    faults: *mut u32,
    addr: *mut u64,
    submitted: *mut u64,
    completed: *mut u64,
) -> i32 {
    status(with(h, |d| {
        let s = d.state();
        put(faulted, u32::from(s.faulted));
        put(code, s.fault_code);
        put(faults, s.faults);
        put(addr, s.fault_addr);
        put(submitted, s.submitted);
        put(completed, s.completed);
        Ok(())
    }))
}

/// Restarts the context after a fault.
///
/// # Safety
/// `h` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera__sess_recover(h: *mut Handle) -> i32 {
    status(with(h, |d| d.recover()))
}
