//! The vGPU PCI function: configuration space with MSI-X, the BAR 0 register file, the VRAM
//! BAR, and the command processor thread that executes each context's ring.
//!
//! Threads and locks: guest register accesses run on the VMM's vCPU threads and take the
//! `State` mutex briefly (the blocking `WAIT` read waits on a condition variable, releasing
//! it). The command processor thread snapshots a context under the lock, executes one packet
//! without it (MMU walks, copies, kernels on the backend's engines), then commits the result
//! under the lock only if the context was not reset meanwhile. Only the command processor
//! writes VRAM on the device's behalf, which is what makes reset race-free: a reset is a
//! request the processor carries out between packets.

use crate::sync::Condvar;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use devices::pci::Interrupts;
use devices::pci::config::{BarKind, BarMapping, ConfigError, PciConfiguration, PciHeader};
use devices::pci::{HostMemory, MsixState, PciDeviceSync};
use vgpu_abi::{Packet, caps, ctx_control, ctx_status, fault, int, kernel, limits, packet};
use vgpu_abi::{pci as abi_pci, regs, status, wait};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::backend::{Aperture, BackendError, GpuBackend, Vram};
use crate::command::Command;
use crate::domain::DmaDomain;
use crate::mem::{Fault, Spaces};
use crate::mmu::{self, Root, Tlb};
use crate::physical::Lease;
use crate::profile::Profile;
use crate::sched::{Grant, MemberId, Params, Scheduler};

mod exec;
mod monitor;
mod pci;
mod processor;
mod registers;
mod state;

use exec::Deadline;
pub use monitor::VgpuMonitor;
pub use pci::function_config;
use processor::Processor;
pub use state::{CtxState, InFlight, VgpuState};

/// How often the command processor polls tail shadows of `POLL` contexts when idle.
const POLL_INTERVAL_US: i32 = 200;
/// Whether the command processor polls after work (`crate::poll`). Not under the fuzzers
/// (cargo-fuzz builds with `--cfg fuzzing`): there the spinning would take a CPU from the
/// engines and the harness, for latency nobody measures. The doorbell hints are kept there
/// too (set while awake, cleared before sleeping).
const POLLING: bool = !cfg!(fuzzing);
/// Longest a reset waits for the command processor.
const RESET_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors creating a vGPU.
#[derive(Debug, thiserror::Error)]
pub enum VgpuError {
    /// Building configuration space failed.
    #[error("cannot build the vGPU configuration space")]
    Config(#[from] ConfigError),
    /// eventfd/epoll/thread creation failed.
    #[error("cannot {0}")]
    Os(&'static str, #[source] std::io::Error),
    /// The GPU refused the guest memory.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Where the VMM placed the BARs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarAddresses {
    /// BAR 0 (registers, 32-bit window).
    pub regs: u64,
    /// BAR 2 (VRAM, 64-bit).
    pub vram: u64,
}

#[derive(Debug, Clone, Default)]
struct Ctx {
    control: u32,
    pt_root: u64,
    ring_base: u64,
    ring_size: u32,
    head: u32,
    tail: u32,
    tail_addr: u64,
    irq_vector: u32,
    fence: u64,
    fault: Option<Fault>,
    /// Bumped by reset: the processor drops results of packets started before.
    generation: u64,
    /// Bumped by reset, root changes and TLB invalidates.
    tlb_epoch: u64,
    doorbell: bool,
}

impl Ctx {
    fn enabled(&self) -> bool {
        self.control & ctx_control::ENABLE != 0
    }
    fn runnable(&self) -> bool {
        self.enabled() && self.fault.is_none()
    }
    fn status(&self) -> u32 {
        let mut s = 0;
        if self.enabled() {
            s |= ctx_status::ENABLED;
        }
        if self.runnable() && self.head != self.tail {
            s |= ctx_status::BUSY;
        }
        if self.fault.is_some() {
            s |= ctx_status::FAULTED;
        }
        s
    }
}

struct State {
    config: PciConfiguration,
    msix: MsixState,
    int_status: u32,
    int_mask: u32,
    last_fault: (u64, u32, u32),
    fault_count: u32,
    fault_vector: u32,
    wait_ctx: u32,
    wait_value: u32,
    ts_hi_latch: u32,
    ts_base: Instant,
    ctx: Vec<Ctx>,
    reset_pending: bool,
    shutdown: bool,
    /// The command processor is stopped for a pause ([`Vgpu::pause`]).
    cp_parked: bool,
    /// Where it stopped inside a packet, while parked there.
    in_flight: Option<InFlight>,
    /// Where a restored snapshot's packet goes on (taken when that packet starts).
    resume: Option<InFlight>,
    /// The memories the device reaches; replaced whole by `Vgpu::set_dma`.
    spaces: Arc<Spaces>,
    /// Bumped by every `set_dma`.
    dma_epoch: u64,
    /// The DMA epoch of the packet the command processor is executing, if any.
    dma_in_use: Option<u64>,
}

impl State {
    fn raise(&mut self, bit: u32, vector: u32) {
        self.int_status |= bit;
        // A vector number past the table is dropped, like one past MSIX_VECTORS.
        if self.int_mask & bit == 0
            && let Ok(v) = u16::try_from(vector)
        {
            self.msix.trigger(&self.config, v);
        }
    }

    fn record_fault(&mut self, ctx: usize, f: Fault) {
        tracing::debug!(ctx, code = f.code, addr = f.addr, "vGPU context fault");
        if let Some(c) = self.ctx.get_mut(ctx) {
            c.fault = Some(f);
        }
        self.last_fault = (f.addr, ctx as u32, f.code);
        self.fault_count = self.fault_count.wrapping_add(1);
        self.raise(int::FAULT, self.fault_vector);
    }

    fn now_ns(&self) -> u64 {
        self.ts_base.elapsed().as_nanos() as u64
    }
}

/// Epoll data of doorbell eventfds handed over by a vfio-user client: this plus the context.
const EXTERNAL_DOORBELL: u64 = 0x100;

struct Shared {
    /// The command processor waits here for the kick and the doorbells.
    epoll: Epoll,
    /// Doorbell eventfds of a vfio-user client, per context (see `Vgpu::set_doorbell_fds`).
    external_doorbells: Mutex<Vec<std::fs::File>>,
    state: Mutex<State>,
    progress: Condvar,
    kick: EventFd,
    doorbells: Vec<EventFd>,
    vram: Arc<dyn Vram>,
    backend: Arc<dyn GpuBackend>,
    cancel: Arc<AtomicBool>,
    /// The watchdog's deadline for the packet stretch now on the engines.
    deadline: Arc<Deadline>,
    /// Owner id of client memory mappings registered with [`crate::guard`] for this vGPU.
    dma_owner: u64,
    contexts: u32,
    /// The `CAPS` register (fixed for the vGPU's life).
    caps: u32,
    sched: Arc<Scheduler>,
    member: MemberId,
    watchdog: Duration,
    /// Watchdog resets so far.
    tdr_resets: std::sync::atomic::AtomicU64,
    /// GPU time the last packet the watchdog stopped had used past the limit (ns).
    tdr_overshoot_ns: std::sync::atomic::AtomicU64,
    /// Host CPU the command processor has spent polling tail shadows (ns).
    poll_ns: std::sync::atomic::AtomicU64,
    /// A context's control or tail shadow changed: the command processor writes the
    /// doorbell hints again (a context enabled with `SUPPRESS` while it is awake).
    rehint: AtomicBool,
    /// Paused ([`Vgpu::pause`]): work stops at the next preemption point and none starts.
    paused: Arc<AtomicBool>,
    /// The pages the device wrote since the dirty log was started or last taken (live
    /// migration: KVM's log does not see DMA), while it is on.
    dirty: Mutex<Option<DirtyPages>>,
    /// Whether `dirty` is on (read without its lock on every packet).
    logging: AtomicBool,
}

/// Pages (4 KiB) written by the device: guest-physical page numbers of guest RAM, and page
/// numbers of VRAM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// Guest RAM pages.
    pub sys: std::collections::BTreeSet<u64>,
    /// VRAM pages.
    pub vram: std::collections::BTreeSet<u64>,
    /// More than [`MAX_DIRTY_PAGES`] were written since the log was last taken: the log
    /// stopped counting (its memory stays bounded), and every page must be taken as written.
    pub all: bool,
}

/// Most pages the dirty log keeps between two takes (4 GiB written; about 40 MiB of log).
#[cfg(not(test))]
pub const MAX_DIRTY_PAGES: u64 = 1 << 20;
/// (Small in this crate's tests, so that they can overflow it.)
#[cfg(test)]
pub const MAX_DIRTY_PAGES: u64 = 64;

/// The page size of the dirty log.
pub const DIRTY_PAGE: u64 = 4096;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// The command processor's side of a pause: stopped (counted, so [`Vgpu::pause`] can
    /// return) until resumed, reset or shut down.
    /// `at`: the packet it stopped inside, if any (recorded for a snapshot).
    fn park_while_paused(&self, at: Option<InFlight>) {
        let mut st = self.lock();
        st.cp_parked = true;
        st.in_flight = at;
        self.progress.notify_all();
        while self.paused.load(Ordering::Acquire) && !st.shutdown && !st.reset_pending {
            st = self.progress.wait(st);
        }
        st.cp_parked = false;
        st.in_flight = None;
    }

    /// Records that the device wrote (or may have written) `sl` (call after the write).
    fn mark_written(&self, sl: &crate::mem::ScatterList) {
        if !self.logging.load(Ordering::Acquire) {
            return;
        }
        for e in sl.extents() {
            self.mark_range(e.loc, e.addr, e.len);
        }
    }

    /// Records a write of `len` bytes at `addr` of `loc` while the dirty log is on.
    fn mark_range(&self, loc: crate::mem::Loc, addr: u64, len: u64) {
        if len == 0 || !self.logging.load(Ordering::Acquire) {
            return;
        }
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        let Some(d) = d.as_mut() else { return };
        if d.all {
            return;
        }
        let (first, last) = (addr / DIRTY_PAGE, addr.saturating_add(len - 1) / DIRTY_PAGE);
        let held = (d.sys.len() + d.vram.len()) as u64;
        if held.saturating_add(last - first + 1) > MAX_DIRTY_PAGES {
            d.sys.clear();
            d.vram.clear();
            d.all = true;
            return;
        }
        let set = match loc {
            crate::mem::Loc::Sys => &mut d.sys,
            crate::mem::Loc::Vram => &mut d.vram,
        };
        set.extend(first..=last);
    }

    fn wake(&self) {
        if let Err(e) = self.kick.write(1) {
            tracing::error!("cannot wake the vGPU command processor: {e}");
        }
    }
}

/// A vGPU PCI function. See the module documentation.
pub struct Vgpu {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Vgpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vgpu")
            .field("vram", &self.shared.vram.size())
            .field("contexts", &self.shared.contexts)
            .finish_non_exhaustive()
    }
}

fn fresh_contexts(n: u32) -> Vec<Ctx> {
    vec![Ctx::default(); n as usize]
}

/// Everything a vGPU is built from. Start from [`VgpuSetup::from_lease`] and change what the
/// VMM or server decides (BARs, guest memory, weight, watchdog).
pub struct VgpuSetup {
    /// Contexts and VRAM size; its place in the profile list is the PCI subsystem id.
    pub profile: Profile,
    /// Where the VMM placed the BARs.
    pub bars: BarAddresses,
    /// The guest's RAM.
    pub sys: GuestMemoryMmap,
    /// The part of it the device may reach.
    pub domain: DmaDomain,
    /// This vGPU's VRAM.
    pub vram: Arc<dyn Vram>,
    /// Where its work runs.
    pub backend: Arc<dyn GpuBackend>,
    /// Where its interrupts go.
    pub interrupts: Interrupts,
    /// The scheduler of the GPU (or partition) it shares, and its parameters there.
    pub sched: Arc<Scheduler>,
    /// Weight and cap.
    pub sched_params: Params,
    /// Watchdog: a packet that uses more GPU time than this resets the vGPU (TDR).
    pub watchdog: Duration,
}

/// An MSI sink that drops every message (a vGPU whose interrupts nobody takes).
#[derive(Debug)]
pub struct NoMsi;

impl devices::pci::MsiSink for NoMsi {
    fn send(&self, _address: u64, _data: u32) {}
}

/// Default watchdog limit per packet.
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(4);

impl std::fmt::Debug for VgpuSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VgpuSetup")
            .field("profile", &self.profile)
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl VgpuSetup {
    /// A vGPU of `lease`'s profile on its VRAM, backend and scheduler; no guest memory yet,
    /// BARs at 0, interrupts going nowhere, default weight and watchdog.
    pub fn from_lease(lease: &Lease) -> Self {
        Self::with_vram(lease, lease.vram().clone())
    }

    /// Like [`VgpuSetup::from_lease`] on `vram` (a fresh slice of the lease's range; see
    /// [`Lease::fresh_vram`]).
    pub fn with_vram(lease: &Lease, vram: Arc<dyn Vram>) -> Self {
        VgpuSetup {
            profile: *lease.profile(),
            bars: BarAddresses { regs: 0, vram: 0 },
            sys: GuestMemoryMmap::new(),
            domain: DmaDomain::default(),
            vram,
            backend: lease.backend(),
            interrupts: Interrupts::Msi(Arc::new(NoMsi)),
            sched: lease.scheduler(),
            sched_params: Params::default(),
            watchdog: DEFAULT_WATCHDOG,
        }
    }
}

impl Vgpu {
    /// Builds the function and starts its command processor.
    pub fn new(setup: VgpuSetup) -> Result<Vgpu, VgpuError> {
        let VgpuSetup {
            profile,
            bars,
            sys,
            domain,
            vram,
            backend,
            interrupts,
            sched,
            sched_params,
            watchdog,
        } = setup;
        let member = sched.register(sched_params);
        let header = PciHeader {
            vendor_id: abi_pci::VENDOR_ID,
            device_id: abi_pci::DEVICE_ID,
            class: abi_pci::CLASS,
            subclass: abi_pci::SUBCLASS,
            prog_if: abi_pci::PROG_IF,
            revision: abi_pci::REVISION,
            subsystem_vendor_id: abi_pci::SUBSYSTEM_VENDOR_ID,
            subsystem_id: profile.subsystem_id(),
        };
        let import = vram.import_domain(&sys, &domain)?.map(Arc::new);
        let (config, msix) = function_config(header, bars, vram.size(), interrupts)?;
        let contexts = profile.contexts.min(limits::MAX_CONTEXTS);
        let trapped = match vram.aperture() {
            Aperture::Trapped => caps::VRAM_TRAPPED,
            Aperture::Mapped { .. } => 0,
        };
        let caps = caps::HUGE_PAGES
            | caps::SYSMEM
            | caps::TIMESTAMPS
            | caps::WAIT
            | caps::TAIL_SHADOW
            | caps::DOORBELL_SUPPRESS
            | trapped;
        let evt = |what| EventFd::new(EFD_NONBLOCK).map_err(|e| VgpuError::Os(what, e));
        let kick = evt("create the vGPU wake event")?;
        let doorbells = (0..contexts)
            .map(|_| evt("create a doorbell event"))
            .collect::<Result<Vec<_>, _>>()?;
        let epoll = Epoll::new().map_err(|e| VgpuError::Os("create the vGPU epoll", e))?;
        let shared = Arc::new(Shared {
            epoll,
            external_doorbells: Mutex::new(Vec::new()),
            state: Mutex::new(State {
                config,
                msix,
                int_status: 0,
                int_mask: 0,
                last_fault: (0, 0, 0),
                fault_count: 0,
                fault_vector: 0,
                wait_ctx: 0,
                wait_value: 0,
                ts_hi_latch: 0,
                ts_base: Instant::now(),
                ctx: fresh_contexts(contexts),
                reset_pending: false,
                shutdown: false,
                cp_parked: false,
                in_flight: None,
                resume: None,
                spaces: Arc::new(Spaces {
                    sys,
                    domain,
                    vram: vram.clone(),
                    import,
                }),
                dma_epoch: 0,
                dma_in_use: None,
            }),
            progress: Condvar::new(),
            kick,
            doorbells,
            vram,
            backend,
            cancel: Arc::new(AtomicBool::new(false)),
            deadline: Arc::new(Deadline::new()),
            dma_owner: crate::guard::new_owner(),
            contexts,
            caps,
            sched,
            member,
            watchdog,
            tdr_resets: std::sync::atomic::AtomicU64::new(0),
            tdr_overshoot_ns: std::sync::atomic::AtomicU64::new(0),
            poll_ns: std::sync::atomic::AtomicU64::new(0),
            rehint: AtomicBool::new(false),
            paused: Arc::new(AtomicBool::new(false)),
            dirty: Mutex::new(None),
            logging: AtomicBool::new(false),
        });
        let add = |fd: i32, data: u64| {
            shared
                .epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, data),
                )
                .map_err(|e| VgpuError::Os("watch a vGPU event", e))
        };
        add(shared.kick.as_raw_fd(), 0)?;
        for (i, d) in shared.doorbells.iter().enumerate() {
            add(d.as_raw_fd(), i as u64 + 1)?;
        }
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vgpu-cp".into())
            .spawn(move || Processor::new(s2).run())
            .map_err(|e| VgpuError::Os("start the vGPU command processor", e))?;
        Ok(Vgpu {
            shared,
            thread: Some(thread),
        })
    }

    /// The doorbell eventfd of context `ctx`: a VMM registers it as an ioeventfd on
    /// `BAR0 + vgpu_abi::regs::doorbell(ctx)` so doorbell writes never reach user space.
    pub fn doorbell_eventfd(&self, ctx: u32) -> Option<&EventFd> {
        self.shared.doorbells.get(ctx as usize)
    }

    /// Doorbells of another process (a vfio-user client whose KVM signals them on guest
    /// doorbell writes): `fds[i]` rings context `i`. Replaces any set before. Each must be an
    /// eventfd; the caller checks.
    pub fn set_doorbell_fds(&self, fds: Vec<std::fs::File>) -> std::io::Result<()> {
        let sh = &self.shared;
        let mut ext = sh
            .external_doorbells
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for f in ext.drain(..) {
            let _ = sh.epoll.ctl(
                ControlOperation::Delete,
                f.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for (i, f) in fds.into_iter().take(sh.contexts as usize).enumerate() {
            // Edge-triggered: every write to an eventfd is an event, so the command processor
            // never reads these. They are the client's files too: a read of ours could block
            // for good if the client drained the counter between `epoll_wait` and that read.
            sh.epoll.ctl(
                ControlOperation::Add,
                f.as_raw_fd(),
                EpollEvent::new(
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    EXTERNAL_DOORBELL + i as u64,
                ),
            )?;
            ext.push(f);
        }
        Ok(())
    }

    /// Device counters for statistics: (packets queued in all contexts, faults since reset,
    /// watchdog resets).
    pub fn counters(&self) -> (u64, u64, u64) {
        self.monitor().counters()
    }

    /// A handle that reads this vGPU's statistics from another thread without borrowing it.
    pub fn monitor(&self) -> VgpuMonitor {
        VgpuMonitor(self.shared.clone())
    }

    /// Pauses the device: work on the engines stops at its next preemption point (a
    /// workgroup boundary; the packet keeps its place and resumes there), and nothing starts
    /// until [`Vgpu::resume`]. Returns once the command processor has stopped; after
    /// `within` without that, the pause is undone and an error says so. Registers still
    /// answer (a paused VM's vCPUs make no accesses).
    pub fn pause(&self, within: Duration) -> Result<(), String> {
        let sh = &self.shared;
        sh.paused.store(true, Ordering::Release);
        sh.wake();
        let deadline = Instant::now() + within;
        let mut st = sh.lock();
        while !st.cp_parked && !st.shutdown {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(st);
                self.resume();
                return Err(format!(
                    "the vGPU's work did not reach a preemption point within {} ms",
                    within.as_millis()
                ));
            }
            st = sh.progress.wait_timeout(st, left).0;
        }
        Ok(())
    }

    /// Starts recording the pages the device writes in guest RAM and VRAM (live migration:
    /// KVM's dirty log sees only the CPU's writes). Every write that completes from now on is
    /// in the next [`Vgpu::take_dirty_log`].
    pub fn start_dirty_log(&self) {
        let sh = &self.shared;
        *sh.dirty.lock().unwrap_or_else(|e| e.into_inner()) = Some(DirtyPages::default());
        sh.logging.store(true, Ordering::Release);
    }

    /// The pages written since the log started or was last taken; the log goes on, empty.
    pub fn take_dirty_log(&self) -> DirtyPages {
        let mut d = self.shared.dirty.lock().unwrap_or_else(|e| e.into_inner());
        d.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Stops recording.
    pub fn stop_dirty_log(&self) {
        let sh = &self.shared;
        sh.logging.store(false, Ordering::Release);
        *sh.dirty.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Ends a pause: the stopped work goes on where it stopped.
    pub fn resume(&self) {
        let sh = &self.shared;
        sh.paused.store(false, Ordering::Release);
        let _st = sh.lock();
        sh.progress.notify_all();
        drop(_st);
        sh.wake();
    }

    /// Replaces the guest memory and DMA domain the device reaches (a vfio-user client mapping
    /// or unmapping guest RAM). Returns once no packet started under the old mapping is still
    /// executing, so the caller may then tear the old memory down. If the GPU cannot import
    /// the new memory, or the vGPU is paused inside a packet (which would never finish with
    /// the old mapping), nothing changes.
    pub fn set_dma(&self, sys: GuestMemoryMmap, domain: DmaDomain) -> Result<(), BackendError> {
        let sh = &self.shared;
        // Outside the lock: importing may take long on a real GPU, and register accesses
        // must not wait for it.
        let import = sh.vram.import_domain(&sys, &domain)?.map(Arc::new);
        let mut st = sh.lock();
        if sh.paused.load(Ordering::Acquire) && st.dma_in_use.is_some() {
            return Err(BackendError::Paused);
        }
        let old = st.dma_epoch;
        st.dma_epoch += 1;
        st.spaces = Arc::new(Spaces {
            sys,
            domain,
            vram: sh.vram.clone(),
            import,
        });
        // Cached translations may point into memory that is gone.
        for c in st.ctx.iter_mut() {
            c.tlb_epoch += 1;
        }
        while st.dma_in_use == Some(old) {
            st = sh.progress.wait_timeout(st, Duration::from_millis(10)).0;
        }
        Ok(())
    }

    /// The owner id under which a server registers this vGPU's truncatable client memory
    /// with [`crate::guard`]: a `SIGBUS` there becomes a fault of this vGPU.
    pub fn dma_owner(&self) -> u64 {
        self.shared.dma_owner
    }

    /// This vGPU's scheduler statistics.
    pub fn sched_stats(&self) -> crate::sched::MemberStats {
        self.monitor().sched_stats()
    }

    /// Number of contexts.
    pub fn contexts(&self) -> u32 {
        self.shared.contexts
    }

    /// Its VRAM (for mapping the BAR, or sharing it with another process).
    pub fn vram(&self) -> &Arc<dyn Vram> {
        &self.shared.vram
    }
}

impl Drop for Vgpu {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        // A command processor stopped by a pause sees it.
        self.shared.progress.notify_all();
        self.shared.cancel.store(true, Ordering::Release);
        self.shared.sched.interrupt(self.shared.member);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.sched.unregister(self.shared.member);
    }
}
