//! Staging memory a vGPU's device keeps between kernels.
//!
//! Every kernel gathers its operands into staging buffers and runs on them (`ops.rs`).
//! Allocating a staging buffer costs little, but its first touch costs as much again as the
//! gather (`tessera bench scatter`: kept buffers make a packet a third faster). So a device
//! keeps the staging buffers its kernels give back and hands them to the next kernels of
//! about the same size:
//!
//! - at most [`KEEP_BYTES`] in at most [`KEEP_BUFFERS`] buffers per device, and at most
//!   [`KEEP_TOTAL`] for all the process's devices together (many busy tenants cannot make
//!   the host hold more than that between their packets); a buffer that does not fit is
//!   freed at once;
//! - all of it is freed once the device took none for [`IDLE`] (one thread, shared by every
//!   device, frees it), when the vGPU is reset, and with the device; so an idle vGPU keeps
//!   no staging memory;
//! - all staging memory of the process, in use or kept, is at most [`held_limit`] (a quarter
//!   of the host's memory, at least what one packet's largest operands take): a kernel whose
//!   staging would pass it faults as a failed allocation does, and its neighbours go on. The
//!   guest chooses its operands' sizes (up to `MAX_TRANSFER` each); without this bound a few
//!   vGPUs sending their largest kernels at once could make the host run out of memory;
//! - buffers are a device's own, so a vGPU never gets memory a neighbour used. A kept
//!   buffer's bytes beyond what a kernel gathers are never read back: outputs are scattered
//!   for the operand's length, partial results read for the kernel's groups, each of which
//!   writes its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use ash::vk;

use super::device::{Dev, DeviceBuffer};

/// Most staging bytes one device keeps.
pub(super) const KEEP_BYTES: u64 = 256 << 20;
/// Most staging bytes all devices of the process keep together.
pub(super) const KEEP_TOTAL: u64 = 1 << 30;
/// Staging bytes all devices keep now.
static KEPT_TOTAL: AtomicU64 = AtomicU64::new(0);
/// Most staging buffers one device keeps.
pub(super) const KEEP_BUFFERS: usize = 16;
/// A device that took no staging buffer for this long gives back all it keeps.
pub(super) const IDLE: Duration = Duration::from_millis(250);
/// Staging buffers are allocated in multiples of this, so kernels of about the same size
/// reuse each other's.
const GRAIN: u64 = 64 << 10;
/// Staging bytes all devices of the process hold now, in use or kept.
static HELD_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Most staging bytes all devices of the process hold at once: a quarter of the host's
/// memory, and at least one packet's largest staging (two operands of `MAX_TRANSFER`, SAXPY's
/// x and y, and their rounding).
pub(super) fn held_limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        // SAFETY: all-zero bytes are a valid `sysinfo` (integers and padding only).
        let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
        // SAFETY: sysinfo fills the struct it is given, and nothing else.
        let ram = match unsafe { libc::sysinfo(&mut si) } {
            0 => si.totalram.saturating_mul(u64::from(si.mem_unit)),
            _ => 0,
        };
        (ram / 4).max(2 * vgpu_abi::limits::MAX_TRANSFER + 2 * GRAIN)
    })
}

/// Takes `bytes` of `held` (process-wide staging) unless that would pass `limit`.
fn reserve(held: &AtomicU64, bytes: u64, limit: u64) -> bool {
    held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
        t.checked_add(bytes).filter(|&n| n <= limit)
    })
    .is_ok()
}

/// A staging buffer's handles, without the `Arc` of its device (a device keeps these).
pub(super) struct Raw {
    pub(super) buffer: vk::Buffer,
    pub(super) memory: vk::DeviceMemory,
    /// The host mapping (staging memory is host-visible; kept mapped).
    pub(super) ptr: Option<*mut u8>,
    /// Bytes allocated.
    pub(super) cap: u64,
}

// SAFETY: plain handles and the mapping's address; whoever holds a `Raw` is its only user.
unsafe impl Send for Raw {}

/// What one device keeps. Lives in [`Dev`].
pub(super) struct Kept {
    free: Vec<Raw>,
    bytes: u64,
    /// When a buffer was last taken or given back.
    last: Instant,
    /// On the reaper's list.
    watched: bool,
    /// [`IDLE`] (tests shorten and lengthen it).
    idle: Duration,
    /// [`held_limit`] (tests lower it).
    limit: u64,
}

impl Default for Kept {
    fn default() -> Self {
        Kept {
            free: Vec::new(),
            bytes: 0,
            last: Instant::now(),
            watched: false,
            idle: IDLE,
            limit: held_limit(),
        }
    }
}

impl Kept {
    /// Everything kept, leaving nothing.
    pub(super) fn take_all(&mut self) -> Vec<Raw> {
        KEPT_TOTAL.fetch_sub(std::mem::take(&mut self.bytes), Ordering::Relaxed);
        std::mem::take(&mut self.free)
    }
}

impl Dev {
    /// A host-visible buffer of at least `len` bytes (its `len` is `len` rounded up to 4) for
    /// a kernel's staging copy of an operand: one this device kept when there is one of about
    /// that size, else a new one. Dropped, it goes back to the device's keeping.
    pub(super) fn staging(self: &Arc<Self>, len: u64) -> Result<DeviceBuffer, vk::Result> {
        let len = len.max(4).next_multiple_of(4);
        let limit;
        let reused = {
            let mut k = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            limit = k.limit;
            k.last = Instant::now();
            let most = len.max(GRAIN).saturating_mul(2);
            let best = (k.free.iter().enumerate())
                .filter(|(_, r)| (len..=most).contains(&r.cap))
                .min_by_key(|(_, r)| r.cap)
                .map(|(i, _)| i);
            best.map(|i| {
                let r = k.free.swap_remove(i);
                k.bytes -= r.cap;
                KEPT_TOTAL.fetch_sub(r.cap, Ordering::Relaxed);
                r
            })
        };
        if let Some(raw) = reused {
            return Ok(DeviceBuffer::from_raw(self.clone(), raw, len));
        }
        let cap = len.next_multiple_of(GRAIN);
        if !reserve(&HELD_TOTAL, cap, limit) {
            return Err(vk::Result::ERROR_OUT_OF_HOST_MEMORY);
        }
        match self.fresh_staging(cap) {
            Ok(mut b) => {
                b.len = len;
                b.kept = true;
                Ok(b)
            }
            Err(e) => {
                HELD_TOTAL.fetch_sub(cap, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Frees a staging buffer [`Dev::staging`] made (and counted).
    pub(super) fn free_staging(&self, raw: Raw) {
        HELD_TOTAL.fetch_sub(raw.cap, Ordering::Relaxed);
        self.free_raw(raw);
    }

    /// A new host-visible buffer of `len` bytes that is freed when dropped (never kept).
    pub(super) fn fresh_staging(self: &Arc<Self>, len: u64) -> Result<DeviceBuffer, vk::Result> {
        let host = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        self.allocate(len, host, host)
    }

    /// Keeps a staging buffer a kernel gave back, or returns it when the device keeps enough.
    pub(super) fn keep(self: &Arc<Self>, raw: Raw) -> Result<(), Raw> {
        let mut k = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_lost()
            || k.free.len() >= KEEP_BUFFERS
            || k.bytes + raw.cap > KEEP_BYTES
            || !reaper_running()
        {
            return Err(raw);
        }
        let reserved = KEPT_TOTAL.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
            Some(t + raw.cap).filter(|&n| n <= KEEP_TOTAL)
        });
        if reserved.is_err() {
            return Err(raw);
        }
        k.bytes += raw.cap;
        k.free.push(raw);
        k.last = Instant::now();
        let watch = !std::mem::replace(&mut k.watched, true);
        drop(k);
        if watch {
            reaper_watch(Arc::downgrade(self));
        }
        Ok(())
    }

    /// Frees every staging buffer the device keeps (a reset: the next kernels allocate).
    pub(super) fn release_staging(&self) {
        let free = self
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_all();
        for raw in free {
            self.free_staging(raw);
        }
    }

    /// Staging bytes the device keeps now.
    #[cfg(test)]
    pub(super) fn kept_bytes(&self) -> u64 {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// Sets the bound of all staging this device may add to (tests).
    #[cfg(test)]
    pub(super) fn set_held_limit(&self, limit: u64) {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).limit = limit;
    }

    /// Sets how long the device keeps staging memory unused (tests).
    #[cfg(test)]
    pub(super) fn set_idle(&self, idle: Duration) {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).idle = idle;
        WAKE.notify_one();
    }
}

/// The devices that keep staging memory, for the thread that frees it once they are idle.
static WATCHED: Mutex<Vec<Weak<Dev>>> = Mutex::new(Vec::new());
/// Wakes that thread: a device joined the list.
static WAKE: Condvar = Condvar::new();

/// Starts the reaper on first use; whether it runs. Without it nothing is kept, so an idle
/// vGPU still holds no staging memory.
fn reaper_running() -> bool {
    static RUNNING: OnceLock<bool> = OnceLock::new();
    *RUNNING.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("vk-staging".into())
            .spawn(reap);
        if let Err(e) = &spawned {
            tracing::warn!("cannot start the staging reaper, so staging is not kept: {e}");
        }
        spawned.is_ok()
    })
}

fn reaper_watch(dev: Weak<Dev>) {
    WATCHED.lock().unwrap_or_else(|e| e.into_inner()).push(dev);
    WAKE.notify_one();
}

/// The reaper: frees what each device keeps once it has been idle for [`IDLE`], and drops it
/// from the list; sleeps until the next device's idle time ends, or until one is added.
fn reap() {
    let mut watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        watched.retain(|w| {
            let Some(dev) = w.upgrade() else {
                return false;
            };
            let mut k = dev.kept.lock().unwrap_or_else(|e| e.into_inner());
            let due = k.last + k.idle;
            if !k.free.is_empty() && due > now {
                next = Some(next.map_or(due, |n| n.min(due)));
                return true;
            }
            k.watched = false;
            let free = k.take_all();
            drop(k);
            for raw in free {
                dev.free_staging(raw);
            }
            false
        });
        watched = match next {
            None => WAKE.wait(watched).unwrap_or_else(|e| e.into_inner()),
            Some(t) => {
                let waited = WAKE.wait_timeout(watched, t.saturating_duration_since(now));
                waited.unwrap_or_else(|e| e.into_inner()).0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::vulkan::tests::gpu;

    /// A device keeps the staging buffers kernels give back, hands them to kernels of about
    /// the same size, frees what exceeds its bounds at once, and frees the rest once it took
    /// none for its idle time, on a reset, or when it is lost.
    #[test]
    fn staging_is_kept_reused_and_freed_when_idle() {
        let Some(g) = gpu(1 << 20) else { return };
        let dev = Dev::new(g.inst.clone()).unwrap();
        dev.set_idle(Duration::from_secs(3600));
        let a = dev.staging(100_000).unwrap();
        assert_eq!(a.len, 100_000);
        assert_eq!(a.bytes().len(), 100_000);
        let first = a.buffer();
        drop(a);
        assert_eq!(dev.kept_bytes(), 128 << 10, "kept, in 64 KiB steps");
        // About the same size: the same buffer, its length the new user's.
        let b = dev.staging(70_001).unwrap();
        assert_eq!((b.buffer(), b.len, dev.kept_bytes()), (first, 70_004, 0));
        drop(b);
        // Larger: a new buffer; the kept one stays.
        let large = dev.staging(200_000).unwrap();
        assert!(large.buffer() != first);
        assert_eq!(dev.kept_bytes(), 128 << 10);
        let second = large.buffer();
        drop(large);
        assert_eq!(dev.kept_bytes(), (128 + 256) << 10);
        // The smallest that fits; none more than twice the size asked (64 KiB at least).
        let small = dev.staging(60_000).unwrap();
        assert_eq!((small.buffer(), dev.kept_bytes()), (first, 256 << 10));
        let smaller = dev.staging(60_000).unwrap();
        assert!(smaller.buffer() != second);
        drop((small, smaller));
        assert_eq!(dev.kept_bytes(), (128 + 256 + 64) << 10);
        // Never more than KEEP_BUFFERS buffers or KEEP_BYTES.
        let many: Vec<_> = (0..KEEP_BUFFERS + 4)
            .map(|_| dev.staging(4).unwrap())
            .collect();
        drop(many);
        let k = dev.kept.lock().unwrap();
        assert_eq!(k.free.len(), KEEP_BUFFERS);
        drop(k);
        let huge = dev.staging(KEEP_BYTES).unwrap();
        let kept = dev.kept_bytes();
        drop(huge);
        assert_eq!(dev.kept_bytes(), kept, "a buffer past the bound is freed");
        // A reset frees everything.
        dev.release_staging();
        assert_eq!(dev.kept_bytes(), 0);
        // Idle: the reaper frees it after the idle time, not before.
        let given = Instant::now();
        drop(dev.staging(4).unwrap());
        assert_eq!(dev.kept_bytes(), 64 << 10);
        dev.set_idle(Duration::from_millis(100));
        while dev.kept_bytes() > 0 {
            assert!(given.elapsed() < Duration::from_secs(30), "never freed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(given.elapsed() >= Duration::from_millis(100));
        // A lost device keeps nothing.
        dev.set_idle(Duration::from_secs(3600));
        dev.lose();
        drop(dev.staging(4).unwrap());
        assert_eq!(dev.kept_bytes(), 0);
    }

    /// All staging of the process is bounded: a buffer past the bound is refused (the kernel
    /// faults), what is freed is counted back, and kept buffers still serve.
    #[test]
    fn staging_past_the_process_bound_is_refused() {
        let held = AtomicU64::new(0);
        assert!(reserve(&held, 3 << 20, 4 << 20));
        assert!(!reserve(&held, 2 << 20, 4 << 20));
        assert!(reserve(&held, 1 << 20, 4 << 20));
        assert!(!reserve(&held, u64::MAX, u64::MAX));
        assert_eq!(held.load(Ordering::Relaxed), 4 << 20);
        assert!(held_limit() >= 2 * vgpu_abi::limits::MAX_TRANSFER);

        let Some(g) = gpu(1 << 20) else { return };
        let dev = Dev::new(g.inst.clone()).unwrap();
        dev.set_idle(Duration::from_secs(3600));
        drop(dev.staging(100_000).unwrap());
        dev.set_held_limit(0);
        assert_eq!(
            dev.staging(1 << 20).err(),
            Some(vk::Result::ERROR_OUT_OF_HOST_MEMORY)
        );
        let kept = dev
            .staging(100_000)
            .expect("a kept buffer needs no more memory");
        drop(kept);
        dev.release_staging();
    }
}
