//! Containing `SIGBUS` from client memory the client can truncate.
//!
//! A vfio-user client hands the server its guest RAM as a file; the server maps it. When the
//! file is not sealed against shrinking (Cloud Hypervisor's RAM is not), the client can
//! truncate it, and the server's next access to a page past the new end raises `SIGBUS`.
//! Unhandled, that kills the whole server and every tenant with it.
//!
//! Each such mapping is registered here with the vGPU that uses it. A process-wide `SIGBUS`
//! handler looks the faulting address up: inside a registered mapping, it replaces the whole
//! mapping with anonymous zero pages (`mmap(MAP_FIXED)`, async-signal-safe), marks the
//! registration hit and returns, so the access retries and completes on the zero pages. The
//! vGPU checks for hits after every packet ([`take_hit`]): the packet becomes a `DMA_DOMAIN`
//! fault on its context and the vGPU's DMA domain is emptied, so that vGPU alone loses its
//! system memory and the guest reads why. Outside any registered mapping the fault is a bug,
//! not a client: the handler reports the address and exits ([`install`], the server), or
//! passes the signal to the handler installed before it ([`install_chained`], a fuzzer).
//!
//! The table is a fixed array of atomics, so the handler neither allocates nor locks.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};

/// Registrations the whole process can hold at once (a client holds at most 512).
pub const SLOTS: usize = 4096;

const FREE: u8 = 0;
const BUSY: u8 = 1;
const LIVE: u8 = 2;

struct Entry {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    owner: AtomicU64,
    hit: AtomicBool,
}

impl Entry {
    const fn new() -> Entry {
        Entry {
            state: AtomicU8::new(FREE),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            owner: AtomicU64::new(0),
            hit: AtomicBool::new(false),
        }
    }
}

static TABLE: [Entry; SLOTS] = [const { Entry::new() }; SLOTS];
/// Bumped by the handler on every hit, so [`take_hit`] is one atomic load when nothing
/// happened.
static HITS: AtomicU64 = AtomicU64::new(0);
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// A fresh owner id (one per vGPU).
pub fn new_owner() -> u64 {
    NEXT_OWNER.fetch_add(1, Ordering::Relaxed)
}

/// Every registration slot is taken.
#[derive(Debug, thiserror::Error)]
#[error("the server already guards {SLOTS} client memory mappings")]
pub struct Full;

/// A registered mapping; dropping it unregisters. Drop it before the mapping goes away.
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let e = &TABLE[self.slot];
        e.state.store(BUSY, Ordering::Release);
        e.hit.store(false, Ordering::Relaxed);
        e.state.store(FREE, Ordering::Release);
    }
}

/// Registers the mapping `[start, start + len)` of `owner`'s client memory.
pub fn register(start: *const u8, len: usize, owner: u64) -> Result<Guard, Full> {
    for (slot, e) in TABLE.iter().enumerate() {
        if e.state
            .compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            e.start.store(start as usize, Ordering::Relaxed);
            e.len.store(len, Ordering::Relaxed);
            e.owner.store(owner, Ordering::Relaxed);
            e.hit.store(false, Ordering::Relaxed);
            e.state.store(LIVE, Ordering::Release);
            return Ok(Guard { slot });
        }
    }
    Err(Full)
}

/// Whether a mapping of `owner` faulted since the last call (and forgets it). `seen` is the
/// caller's copy of the hit counter.
pub fn take_hit(owner: u64, seen: &mut u64) -> bool {
    let now = HITS.load(Ordering::Acquire);
    if now == *seen {
        return false;
    }
    *seen = now;
    let mut hit = false;
    for e in &TABLE {
        if e.state.load(Ordering::Acquire) == LIVE
            && e.owner.load(Ordering::Relaxed) == owner
            && e.hit.swap(false, Ordering::AcqRel)
        {
            hit = true;
        }
    }
    hit
}

fn write_stderr(parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: write(2) is async-signal-safe; each part is a valid buffer.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
}

fn hex(mut n: usize, buf: &mut [u8; 18]) -> &[u8] {
    buf[0] = b'0';
    buf[1] = b'x';
    for i in (2..18).rev() {
        buf[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
    }
    &buf[..]
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let addr = if info.is_null() {
        0
    } else {
        // SAFETY: the kernel passes a valid siginfo_t.
        let info = unsafe { &*info };
        // SAFETY: for SIGBUS, si_addr is the faulting address.
        unsafe { info.si_addr() as usize }
    };
    for e in &TABLE {
        if e.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let (start, len) = (
            e.start.load(Ordering::Relaxed),
            e.len.load(Ordering::Relaxed),
        );
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: [start, start + len) is a live mapping of client memory that this process
        // made and registered; replacing it with private anonymous memory of the same size
        // keeps every pointer into it valid (reads see zeros). mmap is async-signal-safe.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            write_stderr(&[b"tessera: cannot replace truncated client memory; exiting\n"]);
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(1) };
        }
        e.hit.store(true, Ordering::Release);
        HITS.fetch_add(1, Ordering::AcqRel);
        return;
    }
    let prev = PREVIOUS.load(Ordering::Acquire);
    if prev != 0 {
        // SAFETY: `prev` is the SA_SIGINFO handler that was installed before ours
        // (`install_chained`); it gets the signal as it would have without us.
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute::<usize, _>(prev) };
        handler(sig, info, ctx);
        return;
    }
    let mut buf = [0u8; 18];
    write_stderr(&[
        b"tessera: SIGBUS at ",
        hex(addr, &mut buf),
        b", outside every client memory mapping (a bug); exiting\n",
    ]);
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(1) };
}

/// The SA_SIGINFO handler that [`install_chained`] found, for faults outside client memory
/// (0: none; report and exit).
static PREVIOUS: AtomicUsize = AtomicUsize::new(0);

/// Installs the process-wide `SIGBUS` handler (once; later calls, of this function or of
/// [`install_chained`], return the first result). A fault outside client memory is reported
/// on stderr and ends the process with status 1: a clear line instead of a crash (or, under
/// the seccomp sandbox, a report of the system call Rust's own handler would make).
pub fn install() -> io::Result<()> {
    install_with(false)
}

/// Like [`install`], but a fault outside client memory goes to the `SIGBUS` handler that was
/// installed before, when it is an SA_SIGINFO handler (a fuzzer's crash reporter, say).
pub fn install_chained() -> io::Result<()> {
    install_with(true)
}

fn install_with(chain: bool) -> io::Result<()> {
    static RESULT: OnceLock<i32> = OnceLock::new();
    let errno = *RESULT.get_or_init(|| {
        // SAFETY: sigaction is plain data; all zeroes is a valid (empty) value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        // SAFETY: a valid sigset_t to clear.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a valid sigaction whose handler only calls async-signal-safe functions (and
        // the previous handler, which was installed for the same signal).
        let rc = unsafe { libc::sigaction(libc::SIGBUS, &sa, &mut old) };
        if rc != 0 {
            return io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL);
        }
        let real = old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN;
        if chain && real && old.sa_flags & libc::SA_SIGINFO != 0 {
            PREVIOUS.store(old.sa_sigaction, Ordering::Release);
        }
        0
    });
    match errno {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_reported_to_its_owner() {
        install().unwrap();
        let len = 4 * 4096;
        let f = crate::backend::memfd("guard-test", len as u64, false).unwrap();
        // SAFETY: a fresh shared mapping of our own memfd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p.cast::<u8>();
        // SAFETY: inside the mapping.
        let last = unsafe { base.add(3 * 4096) };
        // SAFETY: a byte of our live mapping.
        unsafe { last.write_volatile(7) };
        let (owner, other) = (new_owner(), new_owner());
        let g = register(base, len, owner).unwrap();
        let mut seen = HITS.load(Ordering::Acquire);
        let mut seen_other = seen;
        f.set_len(4096).unwrap();
        // SAFETY: a byte of our mapping, past the file's end now, so this raises SIGBUS,
        // which the handler turns into a read of zero.
        let v = unsafe { last.read_volatile() };
        assert_eq!(v, 0);
        assert!(!take_hit(other, &mut seen_other), "another owner was told");
        assert!(take_hit(owner, &mut seen));
        assert!(!take_hit(owner, &mut seen), "told twice");
        drop(g);
        // SAFETY: our mapping (now anonymous), unmapped once.
        unsafe { libc::munmap(p, len) };
    }
}
