//! A vGPU on an in-memory guest, fenced in by canaries.
//!
//! Guest-physical layout:
//!
//! ```text
//! [0, DMA_END)              guest RAM in the DMA domain (wiped between inputs)
//! [DMA_END, RAM_SIZE)       same mapping, NOT in the domain: host canary next to guest RAM
//! [HIGH_BASE, +HIGH_LEN)    a second region above the PCI hole, NOT in the domain: canary
//! ```
//!
//! VRAM: two software-GPU VRAM slices of `VRAM_SIZE`; the vGPU gets the first, the second
//! (the "neighbour", as another vGPU would own it) is a canary.
//!
//! GPU time: the vGPU shares its scheduler with a [`Contender`], standing for the neighbour's
//! command processor; when a target makes it busy, it keeps asking for the GPU, so the vGPU is
//! preempted at its preemption points. The scheduler's clock runs [`CLOCK_SPEEDUP`] times
//! faster than real time, so its shortest slice ends inside the short work an input runs.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::pci::{MsiSink, PciDeviceSync};
use vgpu::backend::SoftGpu;
use vgpu::backend::Vram;
use vgpu::backend::soft::SoftVram;
use vgpu::device::DEFAULT_WATCHDOG;
use vgpu::mem::{Loc, Spaces};
use vgpu::profile::Profile;
use vgpu::sched::{Clock, Params, Policy, Scheduler};
use vgpu::{BarAddresses, DmaDomain, Vgpu, VgpuSetup};
use vgpu_abi::{limits, pci, regs, status};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

/// Guest RAM mapping (the part past [`DMA_END`] is a canary).
pub const RAM_SIZE: u64 = 4 << 20;
/// Bytes of host canary right after the DMA domain.
pub const CANARY_LEN: u64 = 64 << 10;
/// End of the DMA domain.
pub const DMA_END: u64 = RAM_SIZE - CANARY_LEN;
/// A second guest-memory region above the PCI hole, outside the domain.
pub const HIGH_BASE: u64 = 1 << 32;
/// Its length.
pub const HIGH_LEN: u64 = 64 << 10;
/// The vGPU's VRAM size (and the neighbour's).
pub const VRAM_SIZE: u64 = 1 << 20;
/// Contexts of the fuzzed vGPU.
pub const CONTEXTS: u32 = 4;
/// Where the BARs are said to be.
pub const BARS: BarAddresses = BarAddresses {
    regs: 0xc000_0000,
    vram: 0x80_0000_0000,
};
/// A RESET must complete within this (the device's own limit is 10 s).
pub const RESET_BOUND: Duration = Duration::from_secs(5);

const RAM_CANARY: u8 = 0xc5;
const HIGH_CANARY: u8 = 0x3c;
const VRAM_CANARY: u8 = 0x96;

/// Counts MSI messages, and lets the harness sleep until the next one (instead of polling
/// registers, which would take a CPU from the engines).
#[derive(Debug, Default)]
pub struct MsiLog {
    count: Mutex<u64>,
    sent: Condvar,
}

impl MsiLog {
    /// Messages sent so far.
    pub fn count(&self) -> u64 {
        *self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until more than `seen` messages were sent, at most `timeout`; returns the count.
    pub fn wait_past(&self, seen: u64, timeout: Duration) -> u64 {
        let count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let (count, _) = self
            .sent
            .wait_timeout_while(count, timeout, |c| *c <= seen)
            .unwrap_or_else(|e| e.into_inner());
        *count
    }
}

impl MsiSink for MsiLog {
    fn send(&self, _address: u64, _data: u32) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.sent.notify_all();
    }
}

/// The profile of fuzzed vGPUs.
pub fn profile() -> Profile {
    Profile {
        name: "fuzz",
        vram: VRAM_SIZE,
        contexts: CONTEXTS,
        engines: 2,
    }
}

/// Guest memory: RAM (with its canary tail) and the high canary region, both shared mappings
/// of one memfd (as the VMM maps guest RAM), returned with it. Wiping RAM punches a hole in
/// the file: pages the device touches next are fresh zero pages, with no copy-on-write
/// fault (and TLB shootdown) per page as after `MADV_DONTNEED` of a private mapping.
pub fn guest_memory() -> (GuestMemoryMmap, File) {
    let file = memfd(RAM_SIZE + HIGH_LEN);
    let at = |offset| Some(FileOffset::new(file.try_clone().expect("dup"), offset));
    let mem = GuestMemoryMmap::from_ranges_with_files([
        (GuestAddress(0), RAM_SIZE as usize, at(0)),
        (GuestAddress(HIGH_BASE), HIGH_LEN as usize, at(RAM_SIZE)),
    ])
    .expect("guest memory");
    (mem, file)
}

/// A memfd of `len` bytes.
pub fn memfd(len: u64) -> File {
    vgpu::backend::memfd("tessera-fuzz", len, false).expect("memfd")
}

/// The DMA domain: RAM minus its canary tail.
pub fn domain() -> DmaDomain {
    DmaDomain::new([(0, DMA_END)])
}

/// How much faster than real time the rig's scheduler clock runs: the 1 ms minimum slice
/// lasts about 16 µs.
pub const CLOCK_SPEEDUP: u64 = 64;

/// The rig's scheduler clock (see [`CLOCK_SPEEDUP`]).
#[derive(Debug)]
struct FastClock(Instant);

impl Clock for FastClock {
    fn now_ns(&self) -> u64 {
        (self.0.elapsed().as_nanos() as u64).saturating_mul(CLOCK_SPEEDUP)
    }
}

/// A scheduler shared by the rig's vGPU and its [`Contender`], with the shortest slice on a
/// [`FastClock`].
pub fn scheduler() -> Arc<Scheduler> {
    Scheduler::new(
        Policy::BestEffort,
        vgpu::sched::MIN_SLICE,
        Arc::new(FastClock(Instant::now())),
    )
}

/// How long the contender holds the GPU each time it gets it (real time).
const CONTENDER_HOLD: Duration = Duration::from_micros(20);

#[derive(Debug, Default)]
struct ContenderState {
    busy: bool,
    /// Grants the contender received so far.
    grants: u64,
    stop: bool,
}

/// A second member of the vGPU's scheduler (the neighbour's command processor). While busy,
/// its thread asks for the GPU, holds it for [`CONTENDER_HOLD`] and gives it back, again and
/// again; idle, it sleeps.
pub struct Contender {
    state: Arc<(Mutex<ContenderState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Contender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contender").finish_non_exhaustive()
    }
}

impl Contender {
    /// A contender on `sched` (idle).
    pub fn new(sched: Arc<Scheduler>) -> Contender {
        let state = Arc::new((Mutex::new(ContenderState::default()), Condvar::new()));
        let st = state.clone();
        let id = sched.register(Params::default());
        let thread = std::thread::Builder::new()
            .name("fuzz-contender".into())
            .spawn(move || {
                let never = AtomicBool::new(false);
                let (lock, cv) = &*st;
                loop {
                    {
                        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
                        while !g.busy && !g.stop {
                            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                        }
                        if g.stop {
                            return;
                        }
                    }
                    let grant = sched.acquire(id, &never).expect("never cancelled");
                    std::thread::sleep(CONTENDER_HOLD);
                    sched.release(&grant);
                    lock.lock().unwrap_or_else(|e| e.into_inner()).grants += 1;
                    cv.notify_all();
                }
            })
            .expect("contender thread");
        Contender {
            state,
            thread: Some(thread),
        }
    }

    /// Grants the contender received so far.
    pub fn grants(&self) -> u64 {
        self.state
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .grants
    }

    /// Starts contending for the GPU.
    pub fn start(&self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).busy = true;
        cv.notify_all();
    }

    /// Stops contending (if it was), after the contender got the GPU once more: whatever the
    /// vGPU runs, a neighbour asking for the GPU gets it. Panics if it waited [`HANG_BOUND`]
    /// in vain.
    pub fn stop(&self) {
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        if !g.busy {
            return;
        }
        let start = Instant::now();
        let before = g.grants;
        while g.grants == before {
            let left = HANG_BOUND.checked_sub(start.elapsed());
            assert!(
                left.is_some(),
                "the neighbour waited {HANG_BOUND:?} for the GPU"
            );
            g = cv
                .wait_timeout(g, left.unwrap_or_default())
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        g.busy = false;
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Builds a vGPU on `sys` with partition `vram` of `gpu`, sharing `sched`.
pub fn vgpu(
    gpu: &Arc<SoftGpu>,
    sys: &GuestMemoryMmap,
    vram: Arc<SoftVram>,
    msi: Arc<dyn MsiSink>,
    sched: Arc<Scheduler>,
) -> Vgpu {
    Vgpu::new(VgpuSetup {
        profile: profile(),
        bars: BARS,
        sys: sys.clone(),
        domain: domain(),
        vram,
        backend: gpu.clone(),
        interrupts: vgpu::Interrupts::Msi(msi),
        sched,
        sched_params: Params::default(),
        watchdog: DEFAULT_WATCHDOG,
    })
    .expect("vGPU")
}

/// Every BAR 0 dword whose value is defined right after a reset (not the timestamp, not the
/// blocking WAIT).
pub fn observable_registers() -> Vec<u64> {
    let mut v = vec![
        regs::MAGIC,
        regs::VERSION,
        regs::CAPS,
        regs::NUM_CONTEXTS,
        regs::VRAM_SIZE_LO,
        regs::VRAM_SIZE_HI,
        regs::KERNELS,
        regs::MAX_RING_ENTRIES,
        regs::STATUS,
        regs::INT_STATUS,
        regs::INT_MASK,
        regs::FAULT_ADDR_LO,
        regs::FAULT_ADDR_HI,
        regs::FAULT_CTX,
        regs::FAULT_CODE,
        regs::FAULT_COUNT,
        regs::FAULT_VECTOR,
        regs::WAIT_CTX,
        regs::WAIT_VALUE,
    ];
    for ctx in 0..=CONTEXTS {
        v.extend(
            (0..=regs::CTX_TAIL_ADDR_HI)
                .step_by(4)
                .map(|r| regs::ctx_reg(ctx, r)),
        );
        v.push(regs::doorbell(ctx));
    }
    let table = pci::MSIX_TABLE_OFFSET;
    v.extend(
        (0..u64::from(pci::MSIX_VECTORS) * 16)
            .step_by(4)
            .map(|o| table + o),
    );
    v.extend([pci::MSIX_PBA_OFFSET, pci::MSIX_PBA_OFFSET + 4]);
    v
}

/// A vGPU and its canaries. See the module documentation.
pub struct Rig {
    /// The device.
    pub dev: Vgpu,
    /// Guest memory.
    pub sys: GuestMemoryMmap,
    /// The device's VRAM (host view).
    pub vram: Arc<SoftVram>,
    /// The neighbouring vGPU's VRAM (canary).
    pub neighbour: Arc<SoftVram>,
    /// Interrupts sent.
    pub msis: Arc<MsiLog>,
    /// The software GPU.
    pub gpu: Arc<SoftGpu>,
    /// The scheduler the vGPU shares with the contender.
    pub sched: Arc<Scheduler>,
    /// The neighbour's demand for GPU time.
    pub contender: Contender,
    ram: File,
    power_on: Vec<(u64, u32)>,
}

impl std::fmt::Debug for Rig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rig").finish_non_exhaustive()
    }
}

/// Fills `[at, at + len)` of `mem` with `byte`.
pub fn fill(mem: &GuestMemoryMmap, at: u64, len: u64, byte: u8) {
    mem.write_slice(&vec![byte; len as usize], GuestAddress(at))
        .expect("fill");
}

/// Panics unless `[at, at + len)` of `mem` holds only `byte`.
pub fn check_filled(mem: &GuestMemoryMmap, at: u64, len: u64, byte: u8, what: &str) {
    const CHUNK: usize = 64 << 10;
    let want = vec![byte; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        mem.read_slice(&mut buf[..n], GuestAddress(at + done))
            .expect("read canary");
        // A plain slice comparison (memcmp) first: this runs for every fuzz input.
        if buf[..n] != want[..n] {
            let i = buf[..n].iter().position(|&b| b != byte).unwrap_or(0);
            panic!(
                "{what}: byte at {:#x} is {:#04x}, expected {byte:#04x}",
                at + done + i as u64,
                buf[i]
            );
        }
        done += n as u64;
    }
}

impl Rig {
    /// A fresh vGPU with canaries in place.
    pub fn new() -> Rig {
        let gpu = Arc::new(SoftGpu::new(2 * VRAM_SIZE, 2).expect("software GPU"));
        let vram = Arc::new(SoftVram::new(VRAM_SIZE).expect("partition"));
        let neighbour = Arc::new(SoftVram::new(VRAM_SIZE).expect("partition"));
        let (sys, ram) = guest_memory();
        let msis = Arc::new(MsiLog::default());
        let sched = scheduler();
        let contender = Contender::new(sched.clone());
        let mut dev = vgpu(&gpu, &sys, vram.clone(), msis.clone(), sched.clone());
        fill(&sys, DMA_END, CANARY_LEN, RAM_CANARY);
        fill(&sys, HIGH_BASE, HIGH_LEN, HIGH_CANARY);
        fill(neighbour.memory(), 0, VRAM_SIZE, VRAM_CANARY);
        let power_on = observable_registers()
            .into_iter()
            .map(|o| (o, read32(&mut dev, o)))
            .collect();
        Rig {
            dev,
            sys,
            vram,
            neighbour,
            msis,
            gpu,
            sched,
            contender,
            ram,
            power_on,
        }
    }

    /// The memories as the device sees them.
    pub fn spaces(&self) -> Spaces {
        Spaces {
            sys: self.sys.clone(),
            domain: domain(),
            vram: self.vram.clone(),
            import: None,
        }
    }

    /// Reads a BAR 0 register.
    pub fn r(&mut self, off: u64) -> u32 {
        read32(&mut self.dev, off)
    }

    /// Writes a BAR 0 register.
    pub fn w(&mut self, off: u64, v: u32) {
        self.dev.write_bar(pci::BAR_REGS, off, &v.to_le_bytes());
    }

    /// Reads a context register.
    pub fn cr(&mut self, ctx: u32, reg: u64) -> u32 {
        self.r(regs::ctx_reg(ctx, reg))
    }

    /// Writes a context register.
    pub fn cw(&mut self, ctx: u32, reg: u64, v: u32) {
        self.w(regs::ctx_reg(ctx, reg), v)
    }

    /// Writes a u64 into guest RAM or VRAM (host side: no domain check).
    pub fn put(&self, loc: Loc, addr: u64, v: u64) {
        let mem = match loc {
            Loc::Sys => &self.sys,
            Loc::Vram => self.vram.memory(),
        };
        mem.write_obj(v, GuestAddress(addr)).expect("put");
    }

    /// Writes bytes into guest RAM or VRAM (host side).
    pub fn put_bytes(&self, loc: Loc, addr: u64, b: &[u8]) {
        let mem = match loc {
            Loc::Sys => &self.sys,
            Loc::Vram => self.vram.memory(),
        };
        mem.write_slice(b, GuestAddress(addr)).expect("put");
    }

    /// Reads bytes from guest RAM or VRAM (host side).
    pub fn get_bytes(&self, loc: Loc, addr: u64, b: &mut [u8]) {
        let mem = match loc {
            Loc::Sys => &self.sys,
            Loc::Vram => self.vram.memory(),
        };
        mem.read_slice(b, GuestAddress(addr)).expect("get");
    }

    /// Function-level reset; panics if it is slow or leaves the device not ready.
    pub fn reset(&mut self) -> Duration {
        let t = Instant::now();
        self.w(regs::RESET, regs::RESET_VALUE);
        let took = t.elapsed();
        assert!(took < RESET_BOUND, "RESET took {took:?}");
        assert_eq!(self.r(regs::STATUS), status::READY, "not ready after RESET");
        took
    }

    /// The power-on value of an observable register.
    pub fn power_on_value(&self, off: u64) -> Option<u32> {
        self.power_on.iter().find(|p| p.0 == off).map(|p| p.1)
    }

    /// Panics unless every observable register reads its power-on value and VRAM is zero.
    pub fn check_power_on(&mut self) {
        for i in 0..self.power_on.len() {
            let (off, want) = self.power_on[i];
            let got = self.r(off);
            assert_eq!(
                got, want,
                "BAR0 {off:#x} reads {got:#x} after RESET, power-on value {want:#x}"
            );
        }
        check_vram_zero(&self.vram);
    }

    /// Zeroes the DMA-domain part of guest RAM (the device must be idle: after a reset).
    pub fn wipe_ram(&mut self) {
        // A shared mapping of a memfd reads zeros where the file has a hole.
        // SAFETY: fallocate on our own memfd, inside the file; the device is idle and
        // nothing holds a Rust reference into the mapping (vm-memory copies).
        let rc = unsafe {
            libc::fallocate(
                self.ram.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                DMA_END as libc::off_t,
            )
        };
        if rc != 0 {
            fill(&self.sys, 0, DMA_END, 0);
        }
    }

    /// Panics unless every canary is intact.
    pub fn check_canaries(&self) {
        check_filled(
            &self.sys,
            DMA_END,
            CANARY_LEN,
            RAM_CANARY,
            "host canary after RAM",
        );
        check_filled(
            &self.sys,
            HIGH_BASE,
            HIGH_LEN,
            HIGH_CANARY,
            "high canary region",
        );
        check_filled(
            self.neighbour.memory(),
            0,
            VRAM_SIZE,
            VRAM_CANARY,
            "the neighbouring vGPU's VRAM",
        );
    }

    /// The start of every input: zeroes RAM. Every input ends with a checked RESET, and
    /// [`Rig::new`] starts from one, so the device is idle and in power-on state here.
    pub fn fresh(&mut self) {
        self.wipe_ram();
    }
}

impl Default for Rig {
    fn default() -> Self {
        Self::new()
    }
}

/// Panics unless the VRAM is all zero. Read through the file (exactly the
/// partition's bytes, from 0; `offset` is only where it sits in the GPU), so that punched
/// holes stay holes, and only where the file holds data (`SEEK_DATA`): a hole reads zero, and
/// after a RESET's scrub the whole partition is one.
pub fn check_vram_zero(vram: &Arc<SoftVram>) {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 64 << 10;
    let zero = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let end = vram.size();
    let seek = |at: u64, whence| {
        // SAFETY: lseek on an fd the partition owns; it only moves the file offset, which
        // nothing else uses (every access here is positioned).
        let r = unsafe { libc::lseek(vram.file().as_raw_fd(), at as libc::off_t, whence) };
        u64::try_from(r).ok()
    };
    let mut at = 0;
    while at < end {
        // No data from here on (ENXIO), or no SEEK_DATA support: read everything left.
        let data = match seek(at, libc::SEEK_DATA) {
            Some(d) => d,
            None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => {
                return;
            }
            None => at,
        };
        if data >= end {
            return;
        }
        let data_end = seek(data, libc::SEEK_HOLE).unwrap_or(end).min(end);
        let mut done = data;
        while done < data_end {
            let n = (data_end - done).min(CHUNK as u64) as usize;
            vram.file()
                .read_exact_at(&mut buf[..n], done)
                .expect("read VRAM");
            if buf[..n] != zero[..n] {
                let i = buf[..n].iter().position(|&b| b != 0).unwrap_or(0);
                panic!(
                    "VRAM not scrubbed by RESET: byte {:#x} is {:#04x}",
                    done + i as u64,
                    buf[i]
                );
            }
            done += n as u64;
        }
        at = data_end;
    }
}

/// A 32-bit BAR 0 read.
pub fn read32(dev: &mut Vgpu, off: u64) -> u32 {
    let mut d = [0u8; 4];
    dev.read_bar(pci::BAR_REGS, off, &mut d);
    u32::from_le_bytes(d)
}

/// Valid fault codes (0 = none).
pub fn valid_fault_code(code: u32) -> bool {
    code <= vgpu_abi::fault::TIMEOUT
}

/// Whether reading `WAIT` now would block (the waited-for context is enabled, not faulted and
/// behind the value): fuzzers skip such reads, they only cost time.
pub fn wait_would_block(rig: &mut Rig) -> bool {
    let ctx = rig.r(regs::WAIT_CTX);
    if ctx >= CONTEXTS {
        return false;
    }
    let st = rig.cr(ctx, regs::CTX_STATUS);
    let enabled = st & vgpu_abi::ctx_status::ENABLED != 0;
    let faulted = st & vgpu_abi::ctx_status::FAULTED != 0;
    let fence = rig.cr(ctx, regs::CTX_FENCE_LO);
    let value = rig.r(regs::WAIT_VALUE);
    enabled && !faulted && (fence.wrapping_sub(value) as i32) < 0
}

/// Prints what the device says about itself before a hang is reported; with
/// `TESSERA_FUZZ_HANG_WAIT=S` also waits S seconds (to attach a debugger to the process).
pub fn hang_diagnostics(rig: &mut Rig) {
    let (queued, faults, tdr) = rig.dev.counters();
    eprintln!(
        "hang: pid {} STATUS {:#x}, queued {queued}, faults {faults}, watchdog resets {tdr}, {:?}",
        std::process::id(),
        rig.r(regs::STATUS),
        rig.dev.sched_stats()
    );
    for ctx in 0..CONTEXTS {
        eprintln!(
            "hang: ctx {ctx}: control {:#x} status {:#x} head {} tail {} fence {} fault {}",
            rig.cr(ctx, regs::CTX_CONTROL),
            rig.cr(ctx, regs::CTX_STATUS),
            rig.cr(ctx, regs::CTX_RING_HEAD),
            rig.cr(ctx, regs::CTX_RING_TAIL),
            rig.cr(ctx, regs::CTX_FENCE_LO),
            rig.cr(ctx, regs::CTX_FAULT_CODE),
        );
    }
    if let Some(s) = std::env::var("TESSERA_FUZZ_HANG_WAIT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_secs(s));
    }
}

/// The longest a bounded command stream may take before the device counts as hung.
pub const HANG_BOUND: Duration = Duration::from_secs(20);

/// The ring size fuzzers use.
pub const RING_ENTRIES: u32 = 64;
const _: () = assert!(RING_ENTRIES <= limits::MAX_RING_ENTRIES);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vram_checks_see_data_past_holes() {
        let vram = Arc::new(SoftVram::new(VRAM_SIZE).expect("partition"));
        // Each VRAM slice is a file of its own, addressed from 0.
        let second = Arc::new(SoftVram::new(VRAM_SIZE).expect("partition"));
        for p in [&vram, &second] {
            check_vram_zero(p);
            // A byte written anywhere, even behind a hole, is found.
            for at in [0, 4096 * 7 + 5, VRAM_SIZE - 1] {
                p.memory().write_obj(1u8, GuestAddress(at)).expect("write");
                let found = std::panic::catch_unwind(|| check_vram_zero(p));
                assert!(found.is_err(), "a non-zero byte at {at:#x} was missed");
                p.scrub();
                check_vram_zero(p);
            }
        }
        // Data that is zero passes.
        vram.memory()
            .write_obj(0u8, GuestAddress(8192))
            .expect("write");
        check_vram_zero(&vram);
    }

    #[test]
    fn msi_waits_end_at_the_next_message_or_the_timeout() {
        let log = Arc::new(MsiLog::default());
        let seen = log.count();
        assert_eq!(log.wait_past(seen, Duration::from_millis(1)), seen);
        let sender = log.clone();
        let t = std::thread::spawn(move || sender.send(0xfee0_0000, 0x41));
        assert_eq!(log.wait_past(seen, Duration::from_secs(60)), seen + 1);
        t.join().expect("sender");
    }
}

/// Memory a server-side target must never touch: a neighbouring vGPU's VRAM, filled with a
/// canary, and a host memfd never offered to the client, filled with a secret.
#[derive(Debug)]
pub struct Bystanders {
    /// The neighbour's VRAM.
    pub neighbour: Arc<SoftVram>,
    /// Host memory never offered.
    pub secret: File,
}

const NEIGHBOUR_CANARY: u8 = 0x5a;
const SECRET_LEN: usize = 1 << 16;
const SECRET_BYTE: u8 = 0xee;

impl Bystanders {
    /// Both, filled.
    pub fn new() -> Bystanders {
        let neighbour = Arc::new(SoftVram::new(VRAM_SIZE).expect("neighbour"));
        fill(neighbour.memory(), 0, VRAM_SIZE, NEIGHBOUR_CANARY);
        let secret = memfd(SECRET_LEN as u64);
        std::io::Write::write_all(&mut &secret, &[SECRET_BYTE; SECRET_LEN]).expect("fill secret");
        Bystanders { neighbour, secret }
    }

    /// Asserts that neither changed. (Slice comparisons, i.e. memcmp: a byte loop would be
    /// most of an input's cost under the fuzzer's comparison tracing.)
    pub fn check(&self) {
        check_filled(
            self.neighbour.memory(),
            0,
            VRAM_SIZE,
            NEIGHBOUR_CANARY,
            "neighbour VRAM",
        );
        let mut s = vec![0u8; SECRET_LEN];
        std::os::unix::fs::FileExt::read_exact_at(&self.secret, &mut s, 0).expect("secret");
        assert!(
            s == [SECRET_BYTE; SECRET_LEN],
            "host memory never offered changed"
        );
    }
}

impl Default for Bystanders {
    fn default() -> Self {
        Self::new()
    }
}
