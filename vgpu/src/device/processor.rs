//! The command processor thread: it picks the next packet of each runnable context, holds
//! the GPU from the scheduler while it executes it (`exec`), and commits the result under the
//! device's lock unless the context was reset meanwhile.

use super::exec::{Effect, execute};
use super::*;
use crate::poll::{Period, Window};
use crate::sched::Holder;
use vgpu_abi::shadow;

/// A context as the processor sees it for one packet.
struct Snapshot {
    /// The memories as of this packet (see `DmaGuard`).
    spaces: Arc<Spaces>,
    root: Root,
    ring_base: u64,
    ring_size: u32,
    head: u32,
    tail: u32,
    tail_addr: u64,
    generation: u64,
    tlb_epoch: u64,
    refresh_tail: bool,
}

/// Marks the end of a packet's use of its DMA mapping (whichever way `step` returns), so a
/// waiting `set_dma` can go on.
struct DmaGuard(Arc<Shared>);

impl Drop for DmaGuard {
    fn drop(&mut self) {
        self.0.lock().dma_in_use = None;
        self.0.progress.notify_all();
    }
}

/// The command processor thread.
pub(super) struct Processor {
    sh: Arc<Shared>,
    tlbs: Vec<(Tlb, u64)>,
    next: usize,
    /// The GPU, while this vGPU holds it.
    holder: Holder,
    /// [`crate::guard`]'s hit counter as last seen.
    guard_seen: u64,
    /// Watching the tail shadows of `SUPPRESS` contexts (a polling window is open, or the
    /// last look before sleeping).
    watching: bool,
    /// The hint of the `SUPPRESS` contexts says `POLLING`.
    hinted: bool,
    /// The adaptive polling window.
    window: Window,
    /// CPU spent polling in the current period.
    period: Period,
}

impl Processor {
    pub(super) fn new(sh: Arc<Shared>) -> Self {
        let n = sh.contexts as usize;
        Processor {
            holder: Holder::new(sh.sched.clone(), sh.member, sh.cancel.clone()),
            sh,
            tlbs: (0..n).map(|_| (Tlb::default(), 0)).collect(),
            next: 0,
            guard_seen: 0,
            watching: false,
            hinted: false,
            window: Window::default(),
            period: Period::default(),
        }
    }

    /// Serves the contexts until shutdown. While it is awake, the hint of every `SUPPRESS`
    /// context says that no doorbell is needed, and it reads their tail shadows after every
    /// packet. Out of work, it polls (`crate::poll`): it keeps looking at doorbells and tail
    /// shadows for an adaptive window; then it clears the hints, fences, looks once more (a
    /// submission that saw the hint still set is caught here), and sleeps until a doorbell or
    /// a register write.
    pub(super) fn run(mut self) {
        // When the current polling stretch began, and whether the budget allowed it.
        let mut idle_since: Option<(Instant, bool)> = None;
        // The last sleep was a timed nap that no event ended.
        let mut napped = false;
        loop {
            if self.sh.paused.load(Ordering::Acquire) {
                // Paused between packets: the GPU goes to someone else meanwhile; doorbells
                // stay latched in their eventfds for after. A shutdown or a reset ends the
                // wait: both are carried out here, paused or not.
                {
                    let mut st = self.sh.lock();
                    if st.shutdown {
                        return;
                    }
                    if st.reset_pending {
                        self.reset(&mut st);
                    }
                }
                self.holder.give_back();
                self.sh.park_while_paused(None);
                continue;
            }
            let polling = {
                let mut st = self.sh.lock();
                if st.shutdown {
                    drop(st);
                    self.set_hints(false);
                    return;
                }
                if st.reset_pending {
                    self.reset(&mut st);
                }
                st.ctx
                    .iter()
                    .any(|c| c.runnable() && c.control & ctx_control::POLL != 0)
            };
            // Awake, the processor looks at the tail shadows after every packet: a guest
            // needs no doorbell while it works, nor during the window after.
            if !self.hinted || self.sh.rehint.swap(false, Ordering::AcqRel) {
                self.set_hints(true);
            }
            self.watching = self.hinted;
            if self.round() {
                if let Some((t, _)) = idle_since.take() {
                    self.charge_polling(t.elapsed());
                }
                napped = false;
                continue;
            }
            // Out of work: the GPU goes to someone else.
            self.holder.give_back();
            let budget = self.sh.sched.poll_budget().clone();
            let max = budget.limits().window;
            // The CPU budget is asked once per stretch (its lock is shared by the GPU's vGPUs).
            let (start, allowed) = *idle_since
                .get_or_insert_with(|| (Instant::now(), budget.allows(&mut self.period)));
            if POLLING
                && allowed
                && !napped
                && start.elapsed() < self.window.get(max)
                && !self.sh.sched.contended()
            {
                self.drain_events(0);
                std::hint::spin_loop();
                continue;
            }
            idle_since = None;
            self.charge_polling(start.elapsed());
            if self.hinted {
                // Doorbells are needed again; one last look catches a submission that read
                // the hint before it was cleared.
                self.set_hints(false);
                std::sync::atomic::fence(Ordering::SeqCst);
                self.watching = true;
                if self.round() {
                    continue;
                }
            }
            self.watching = false;
            let slept = Instant::now();
            if self.sleep(if polling { POLL_INTERVAL_US } else { -1 }) {
                self.window.after_sleep(slept.elapsed(), max);
                napped = false;
            } else {
                // A `POLL` context's timed nap found no doorbell: look at the shadows and
                // nap again, without a polling window (that would spin on an idle vGPU).
                napped = true;
            }
        }
    }

    fn charge_polling(&mut self, spent: Duration) {
        self.sh
            .poll_ns
            .fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
        self.sh.sched.poll_budget().charge(&mut self.period, spent);
    }

    /// Writes the doorbell hint of every runnable `SUPPRESS` context: `POLLING` (`on`) or 0.
    /// A hint the context's page tables do not let the GPU write faults that context.
    fn set_hints(&mut self, on: bool) {
        self.hinted = on;
        let (spaces, targets) = {
            let mut st = self.sh.lock();
            let targets: Vec<(usize, Root, u64, u64, u64)> = st
                .ctx
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    c.runnable() && c.control & ctx_control::SUPPRESS != 0 && c.tail_addr != 0
                })
                .map(|(i, c)| (i, Root(c.pt_root), c.tail_addr, c.generation, c.tlb_epoch))
                .collect();
            if targets.is_empty() || st.reset_pending {
                return;
            }
            st.dma_in_use = Some(st.dma_epoch);
            (st.spaces.clone(), targets)
        };
        let _in_use = DmaGuard(self.sh.clone());
        let value = if on { shadow::POLLING } else { 0 }.to_le_bytes();
        for (i, root, tail_addr, generation, tlb_epoch) in targets {
            let (tlb, epoch) = &mut self.tlbs[i];
            if *epoch != tlb_epoch {
                tlb.invalidate();
                *epoch = tlb_epoch;
            }
            let addr = tail_addr.wrapping_add(shadow::HINT);
            let written = mmu::resolve(&spaces, root, tlb, addr, 4, true).and_then(|sl| {
                let w = sl.write(&spaces, 0, &value);
                self.sh.mark_written(&sl);
                w
            });
            if let Err(f) = written {
                let mut st = self.sh.lock();
                if st.ctx.get(i).is_some_and(|c| c.generation == generation) {
                    st.record_fault(i, f);
                    self.sh.progress.notify_all();
                }
            }
        }
    }

    /// Function-level reset, carried out here between packets.
    fn reset(&self, st: &mut State) {
        self.sh.vram.scrub();
        st.msix.reset();
        st.int_status = 0;
        st.int_mask = 0;
        st.last_fault = (0, 0, 0);
        st.fault_count = 0;
        st.fault_vector = 0;
        st.wait_ctx = 0;
        st.wait_value = 0;
        st.ts_base = Instant::now();
        st.resume = None;
        let gens: Vec<(u64, u64)> = st.ctx.iter().map(|c| (c.generation, c.tlb_epoch)).collect();
        st.ctx = fresh_contexts(self.sh.contexts);
        for (c, (g, t)) in st.ctx.iter_mut().zip(gens) {
            c.generation = g + 1;
            c.tlb_epoch = t + 1;
        }
        for d in &self.sh.doorbells {
            let _ = d.read();
        }
        st.reset_pending = false;
        self.sh.cancel.store(false, Ordering::Release);
        self.sh.progress.notify_all();
    }

    /// Sleeps until the kick or a doorbell, or at most `timeout_us` (-1: no limit); returns
    /// whether an event ended it.
    fn sleep(&mut self, timeout_us: i32) -> bool {
        if (0..1000).contains(&timeout_us) {
            // epoll has millisecond resolution: nap briefly, then look at the events.
            std::thread::sleep(Duration::from_micros(timeout_us as u64));
            self.drain_events(0) > 0
        } else {
            self.drain_events(if timeout_us < 0 {
                -1
            } else {
                timeout_us / 1000
            }) > 0
        }
    }

    /// Waits up to `timeout_ms` (-1: forever) for the kick or doorbells and records them;
    /// returns how many it found.
    fn drain_events(&mut self, timeout_ms: i32) -> usize {
        let mut events = [EpollEvent::default(); 2 * limits::MAX_CONTEXTS as usize + 1];
        let Ok(n) = self.sh.epoll.wait(timeout_ms, &mut events) else {
            return 0;
        };
        for ev in &events[..n] {
            match ev.data() {
                0 => {
                    let _ = self.sh.kick.read();
                }
                d if d >= EXTERNAL_DOORBELL => {
                    // A client's eventfd, watched edge-triggered: each ring is one event, and
                    // its counter is left alone (`Vgpu::set_doorbell_fds`).
                    let i = (d - EXTERNAL_DOORBELL) as usize;
                    if let Some(c) = self.sh.lock().ctx.get_mut(i) {
                        c.doorbell = true;
                    }
                }
                d => {
                    let i = d as usize - 1;
                    if let Some(evt) = self.sh.doorbells.get(i) {
                        let _ = evt.read();
                        if let Some(c) = self.sh.lock().ctx.get_mut(i) {
                            c.doorbell = true;
                        }
                    }
                }
            }
        }
        n
    }

    /// Runs at most one packet of each runnable context; returns whether anything ran.
    fn round(&mut self) -> bool {
        let n = self.sh.contexts as usize;
        let mut did = false;
        for k in 0..n {
            let i = (self.next + k) % n;
            did |= self.step(i);
        }
        self.next = (self.next + 1) % n.max(1);
        did
    }

    fn snapshot(&self, i: usize) -> Option<Snapshot> {
        let mut st = self.sh.lock();
        if st.reset_pending {
            return None;
        }
        let spaces = st.spaces.clone();
        let c = st.ctx.get_mut(i)?;
        if !c.runnable() {
            return None;
        }
        let watched = self.watching && c.control & ctx_control::SUPPRESS != 0;
        let refresh_tail = c.tail_addr != 0
            && (std::mem::take(&mut c.doorbell) || c.control & ctx_control::POLL != 0 || watched);
        if !refresh_tail && c.head == c.tail {
            return None;
        }
        let snap = Snapshot {
            spaces,
            root: Root(c.pt_root),
            ring_base: c.ring_base,
            ring_size: c.ring_size,
            head: c.head,
            tail: c.tail,
            tail_addr: c.tail_addr,
            generation: c.generation,
            tlb_epoch: c.tlb_epoch,
            refresh_tail,
        };
        st.dma_in_use = Some(st.dma_epoch);
        Some(snap)
    }

    fn step(&mut self, i: usize) -> bool {
        let Some(mut s) = self.snapshot(i) else {
            return false;
        };
        let _in_use = DmaGuard(self.sh.clone());
        let spaces = s.spaces.clone();
        let (tlb, epoch) = &mut self.tlbs[i];
        if *epoch != s.tlb_epoch {
            tlb.invalidate();
            *epoch = s.tlb_epoch;
        }
        if s.refresh_tail {
            let mut b = [0u8; 4];
            let read = mmu::resolve(&spaces, s.root, tlb, s.tail_addr, 4, false)
                .and_then(|sl| sl.read(&spaces, 0, &mut b));
            let mut st = self.sh.lock();
            let Some(c) = st.ctx.get_mut(i).filter(|c| c.generation == s.generation) else {
                return true;
            };
            match read {
                Ok(()) => {
                    c.tail = u32::from_le_bytes(b);
                    s.tail = c.tail;
                }
                Err(f) => {
                    st.record_fault(i, f);
                    self.sh.progress.notify_all();
                    return true;
                }
            }
        }
        if s.head == s.tail {
            return false;
        }
        // A tail more than a ring ahead of head (published backwards, or past what the ring
        // holds, or a ring shrunk under it) names no real packets: executing up to 2^32 stale
        // slots would keep the context busy for hours. It is a ring error.
        if s.tail.wrapping_sub(s.head) > s.ring_size {
            let mut st = self.sh.lock();
            if st.ctx.get(i).is_some_and(|c| c.generation == s.generation) {
                st.record_fault(i, Fault::new(fault::RING_CONFIG, s.ring_base));
                self.sh.progress.notify_all();
            }
            return true;
        }
        let slot = u64::from(s.head % s.ring_size.max(1));
        // The ring may have been reprogrammed while enabled: a base that overflows becomes a
        // VA_RANGE fault like any other address past 2^48.
        let pkt_va = s.ring_base.saturating_add(slot * packet::PACKET_SIZE);
        if !self.holder.hold() {
            return true;
        }
        // A restored snapshot's packet goes on where it stopped.
        let mut progress = InFlight {
            ctx: i as u32,
            head: s.head,
            next_group: 0,
            used_ns: 0,
        };
        {
            let mut st = self.sh.lock();
            if let Some(r) = st.resume.take_if(|r| r.ctx as usize == i)
                && r.head == s.head
            {
                progress = r;
            }
        }
        let mut result = execute(
            &self.sh,
            &mut self.holder,
            &mut self.tlbs[i].0,
            &s.spaces,
            s.root,
            pkt_va,
            &mut progress,
        );
        // The client truncated memory this packet used (the guard turned the SIGBUS into
        // zero pages): the packet faults, and the vGPU loses its system memory until the
        // client maps memory again.
        let lost = crate::guard::take_hit(self.sh.dma_owner, &mut self.guard_seen);
        if lost {
            tracing::warn!(ctx = i, "client memory was truncated under the vGPU");
            result = Err(Fault::new(fault::DMA_DOMAIN, pkt_va));
        }
        let mut st = self.sh.lock();
        if lost {
            // Nothing to import of no memory: the previous import goes with the last packet
            // that used it.
            st.spaces = Arc::new(Spaces {
                sys: GuestMemoryMmap::new(),
                domain: DmaDomain::default(),
                vram: self.sh.vram.clone(),
                import: None,
            });
            for c in st.ctx.iter_mut() {
                c.tlb_epoch += 1;
            }
        }
        if st.reset_pending || st.ctx.get(i).is_none_or(|c| c.generation != s.generation) {
            return true;
        }
        match result {
            Ok(effect) => {
                st.ctx[i].head = s.head.wrapping_add(1);
                if let Effect::Fence { value, irq } = effect {
                    st.ctx[i].fence = value;
                    if irq {
                        let vector = st.ctx[i].irq_vector;
                        st.raise(int::fence(i as u32), vector);
                    }
                }
            }
            Err(f) if f.code == fault::TIMEOUT => {
                // TDR: the watchdog resets this vGPU alone; its guest sees the fault.
                tracing::warn!(
                    ctx = i,
                    "vGPU watchdog: packet overran {:?}, resetting",
                    self.sh.watchdog
                );
                self.reset(&mut st);
                self.sh.tdr_resets.fetch_add(1, Ordering::Relaxed);
                st.record_fault(i, f);
            }
            Err(f) => st.record_fault(i, f),
        }
        drop(st);
        self.sh.progress.notify_all();
        self.holder.yield_if_due();
        true
    }
}
