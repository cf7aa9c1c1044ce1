//! Executing one packet: decode it, resolve every address through the context's MMU into an
//! [`Op`] of checked scatter lists, and run that on the backend group range by group range,
//! holding the GPU from the scheduler and under the watchdog's deadline. One loop serves every
//! operation (COPY, FILL and kernels alike): a range stops at a preemption point, the GPU goes
//! to whoever waits, and the next range resumes at the first group that did not run (the
//! saved context).

use super::*;
use crate::backend::{Dispatch, Op, RunControl};
use crate::command::Kernel;
use crate::mem::ScatterList;
use crate::sched::Holder;

/// When the watchdog stops the stretch of a packet that is on the engines: the packet's
/// remaining GPU-time budget counted from the start of the stretch. Engines ask it before
/// every group and long kernels inside one, so a packet past its budget stops within one
/// preemption point whether or not another vGPU wants the GPU.
pub(super) struct Deadline {
    epoch: Instant,
    /// Nanoseconds since `epoch`; `u64::MAX`: none.
    at_ns: AtomicU64,
}

impl Deadline {
    pub(super) fn new() -> Self {
        Deadline {
            epoch: Instant::now(),
            at_ns: AtomicU64::new(u64::MAX),
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Arms the deadline `budget` after `start`.
    fn arm(&self, start: Instant, budget: Duration) {
        let at = self
            .ns(start)
            .saturating_add(u64::try_from(budget.as_nanos()).unwrap_or(u64::MAX));
        self.at_ns.store(at, Ordering::Release);
    }

    fn disarm(&self) {
        self.at_ns.store(u64::MAX, Ordering::Release);
    }

    fn passed(&self) -> bool {
        let at = self.at_ns.load(Ordering::Acquire);
        at != u64::MAX && self.ns(Instant::now()) >= at
    }
}

/// What executing a packet changes in the context's registers.
pub(super) enum Effect {
    None,
    Fence { value: u64, irq: bool },
}

/// What a range on the backend asks: the grant held for it, a reset, the watchdog.
struct Control {
    grant: Option<Arc<Grant>>,
    cancel: Arc<AtomicBool>,
    deadline: Arc<Deadline>,
    /// A pause stops the range at the next group, like a preemption.
    paused: Arc<AtomicBool>,
}

impl RunControl for Control {
    fn stop(&self) -> bool {
        self.abandoned()
            || self.paused.load(Ordering::Relaxed)
            || self.grant.as_ref().is_some_and(|g| {
                let stop = g.should_yield();
                if stop {
                    // The engines that come free take the next member's work while the
                    // groups already started here finish.
                    g.hand_over();
                }
                stop
            })
    }

    fn abandoned(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.deadline.passed()
    }

    fn group_done(&self) {
        // The last group to finish marks where a preempted range really stopped (for the
        // scheduler's overrun).
        if let Some(g) = &self.grant {
            g.stopped_at(g.now_ns());
        }
    }
}

/// Executes the packet at `pkt_va` of a context whose page tables start at `root`.
pub(super) fn execute(
    sh: &Shared,
    holder: &mut Holder,
    tlb: &mut Tlb,
    spaces: &Arc<Spaces>,
    root: Root,
    pkt_va: u64,
    progress: &mut InFlight,
) -> Result<Effect, Fault> {
    // Every buffer the packet may write, recorded in the dirty log once written (also when
    // it faults part-way: a partial write is a write).
    let mut written = Vec::new();
    let result = execute_packet(
        sh,
        holder,
        tlb,
        spaces,
        root,
        pkt_va,
        progress,
        &mut written,
    );
    for sl in &written {
        sh.mark_written(sl);
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn execute_packet(
    sh: &Shared,
    holder: &mut Holder,
    tlb: &mut Tlb,
    spaces: &Arc<Spaces>,
    root: Root,
    pkt_va: u64,
    progress: &mut InFlight,
    written: &mut Vec<ScatterList>,
) -> Result<Effect, Fault> {
    let sp = &**spaces;
    let mut raw = [0u8; packet::PACKET_SIZE as usize];
    mmu::resolve(sp, root, tlb, pkt_va, packet::PACKET_SIZE, false)?.read(sp, 0, &mut raw)?;
    let cmd =
        Command::decode(&Packet::from_bytes(&raw)).map_err(|code| Fault::new(code, pkt_va))?;
    let mut resolve = |va: u64, len: u64, write: bool| -> Result<ScatterList, Fault> {
        let sl = mmu::resolve(sp, root, tlb, va, len, write)?;
        if write {
            written.push(sl.clone());
        }
        Ok(sl)
    };
    let op = match cmd {
        Command::Nop => return Ok(Effect::None),
        Command::Fence { va, value, irq } => {
            resolve(va, 8, true)?.write(sp, 0, &value.to_le_bytes())?;
            return Ok(Effect::Fence { value, irq });
        }
        Command::Timestamp { va } => {
            let t = sh.lock().now_ns();
            resolve(va, 8, true)?.write(sp, 0, &t.to_le_bytes())?;
            return Ok(Effect::None);
        }
        Command::Copy { src, dst, len } => Op::Copy {
            src: resolve(src, len, false)?,
            dst: resolve(dst, len, true)?,
        },
        Command::Fill { dst, len, pattern } => Op::Fill {
            dst: resolve(dst, len, true)?,
            pattern,
        },
        Command::Dispatch(k) => Op::Dispatch(match k {
            Kernel::Saxpy { n, a, x, y } => Dispatch::Saxpy {
                n,
                a,
                x: resolve(x, n * 4, false)?,
                y: resolve(y, n * 4, true)?,
            },
            Kernel::Sgemm { m, n, k, a, b, c } => Dispatch::Sgemm {
                m,
                n,
                k,
                a: resolve(a, m * k * 4, false)?,
                b: resolve(b, k * n * 4, false)?,
                c: resolve(c, m * n * 4, true)?,
            },
            Kernel::ReduceSum { n, x, out } => Dispatch::ReduceSum {
                n,
                x: resolve(x, n * 4, false)?,
                out: resolve(out, 8, true)?,
            },
            Kernel::Crc32 { len, src, out } => Dispatch::Crc32 {
                len,
                src: resolve(src, len, false)?,
                out: resolve(out, 4, true)?,
            },
            Kernel::SpinUs { us, groups } => Dispatch::SpinUs { us, groups },
        }),
    };
    run_op(sh, holder, spaces, op, pkt_va, progress, written)?;
    Ok(Effect::None)
}

/// Runs `op` to completion in group ranges, each under the grant and the watchdog, from
/// `progress` (where a restored snapshot's packet stopped; group 0 for a new packet). A reset
/// meanwhile ends it early with `Ok` (its result is dropped); the watchdog with `TIMEOUT`.
fn run_op(
    sh: &Shared,
    holder: &mut Holder,
    spaces: &Arc<Spaces>,
    op: Op,
    pkt_va: u64,
    progress: &mut InFlight,
    written: &[ScatterList],
) -> Result<(), Fault> {
    let groups = op.groups();
    let resumes = op.resumes_from_memory();
    // Preparing is GPU work of this packet (on Vulkan, its operands gathered into staging):
    // it runs under the grant the command processor holds, and counts against the watchdog's
    // budget like the ranges do.
    let t = Instant::now();
    let mut launch = sh.backend.prepare(op, spaces.clone())?;
    let prepared = t.elapsed();
    // GPU time this packet used, excluding time spent waiting for the GPU.
    let (mut next, mut used) = if resumes && !launch.outputs_at_finish() {
        (
            progress.next_group.min(groups),
            Duration::from_nanos(progress.used_ns),
        )
    } else {
        (0, Duration::ZERO)
    };
    used += prepared;
    while next < groups {
        if !holder.hold() {
            return Ok(());
        }
        let ctl = Arc::new(Control {
            grant: holder.grant(),
            cancel: sh.cancel.clone(),
            deadline: sh.deadline.clone(),
            paused: sh.paused.clone(),
        });
        let t = Instant::now();
        sh.deadline.arm(t, sh.watchdog.saturating_sub(used));
        let ran = launch.run(next..groups, ctl);
        used += t.elapsed();
        // Past the budget: by the GPU time counted here, or by the deadline the engines saw
        // (the same instant, counted on their side).
        let over = used >= sh.watchdog || sh.deadline.passed();
        sh.deadline.disarm();
        if over {
            let past = used.saturating_sub(sh.watchdog).as_nanos() as u64;
            sh.tdr_overshoot_ns.store(past, Ordering::Relaxed);
            return Err(Fault::new(fault::TIMEOUT, pkt_va));
        }
        next = ran?;
        if sh.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        if next < groups {
            holder.give_back();
            if sh.paused.load(Ordering::Acquire) {
                // Paused in the middle of the packet: it goes on from `next` after (and a
                // snapshot taken meanwhile records that).
                progress.next_group = next;
                progress.used_ns = u64::try_from(used.as_nanos()).unwrap_or(u64::MAX);
                // What ran so far is written: a migration's last round must see it.
                for sl in written {
                    sh.mark_written(sl);
                }
                sh.park_while_paused(Some(*progress));
            }
        }
    }
    launch.finish()
}
