//! `run=load kind=busy|bursty|long|idle seconds=S [us=U] [groups=G]`: a GPU
//! load for the multi-VM scheduler harness, where many firmware VMs share one
//! GPU and the host measures the GPU time the scheduler gives each.
//!
//! The load is SPIN_US dispatches on context 0, each followed by a FENCE
//! whose value counts the dispatches (fence n completes dispatch n), so the
//! fence word in memory is the number of completed dispatches. Up to
//! [`IN_FLIGHT`] dispatches are queued; when the queue is full the vCPU spins
//! on the oldest fence for at most `spin_us` (50 µs) and then blocks in the
//! `WAIT` register; when it has nothing to do it blocks for a fence value
//! nothing will reach (each such read returns TIMEOUT after
//! `WAIT_TIMEOUT_MS`, having burnt no guest CPU). On a host with few cores
//! the GPU's engine threads need that CPU. `wait=block` never spins,
//! `wait=spin` never blocks.
//!
//! Time is the GPU clock (`TIMESTAMP`, ns). Output:
//! `load kind=K jobs=N gpu_ns=T faults=0|1`.

// Errors are the conformance suite's `Fail` (see `bench/mod.rs`).
#![allow(clippy::result_large_err)]

use vgpu_abi::{caps, ctx_control, ctx_status, kernel, regs, wait};

use super::{
    CTX, FENCE_PAGE, RING_PAGE, Ring, SHADOW_OFFSET, STATIC_RING_ENTRIES, Waiter, gpu_map_statics,
    open_gpu, page, peek64, publish_tail, start_ctx,
};
use crate::cmdline::{LoadKind, LoadOptions, Wait};
use crate::conformance::Fail;
use crate::conformance::driver::{Gpu, dispatch, fence};
use crate::io::barrier;
use crate::pci;
use crate::pvh::StartInfo;
use crate::serial::fw_println;
use vgpu_abi::pci as abi_pci;

/// Dispatches (each with its fence) queued at most.
const IN_FLIGHT: u64 = 4;
/// SPIN_US workgroups per dispatch of the busy load (default of `groups=`).
const BUSY_GROUPS: u64 = 8;
/// Workgroups of `kind=long`'s first dispatch (default of `groups=`).
const LONG_GROUPS: u64 = 4000;
/// `kind=bursty`: length of a busy phase.
const BURST_NS: u64 = 50_000_000;
/// `kind=bursty`: least length of an idle phase. It is made of whole `WAIT`
/// reads, each `WAIT_TIMEOUT_MS` long, so in practice one read: 100 ms.
const PAUSE_NS: u64 = 50_000_000;
const NS_PER_S: u64 = 1_000_000_000;
/// A fence not completed this long after the planned end of the run is taken
/// for a hung device.
const GRACE_NS: u64 = 60 * NS_PER_S;

/// `kind=dirty`: slots of memory written per job, and their size.
const DIRTY_SLOTS: u64 = 256;
const DIRTY_SLOT: u64 = 64 << 10;

/// The FILL pattern of `kind=dirty`'s job `job`.
fn dirty_pattern(job: u64) -> u32 {
    0xd100_0000 | (job as u32 & 0xff_ffff)
}

// Packets in flight must fit in the static ring.
const _: () = assert!(2 * IN_FLIGHT <= STATIC_RING_ENTRIES as u64);

/// `run=load`; returns the exit status (0: the load ran without a fault).
pub fn load(info: Option<&StartInfo>, o: &LoadOptions) -> u8 {
    let gpu = match open_gpu() {
        Ok(gpu) => gpu,
        Err(why) => return failed(why),
    };
    if let Err(why) = gpu_map_statics() {
        return failed(why);
    }
    let mut l = Load::start(&gpu, o);
    if o.kind == LoadKind::Dirty {
        return match l.dirty(info) {
            Ok(jobs) => {
                fw_println!(
                    "load kind=dirty jobs={jobs} gpu_ns={} faults=0 mismatches=0",
                    gpu.timestamp().saturating_sub(l.t0)
                );
                0
            }
            Err(why) => failed(why),
        };
    }
    let outcome = l.run(o);
    let gpu_ns = gpu.timestamp().saturating_sub(l.t0);
    let faulted = gpu.ctx_rd(CTX, regs::CTX_STATUS) & ctx_status::FAULTED != 0;
    fw_println!(
        "load kind={} jobs={} gpu_ns={gpu_ns} faults={}",
        o.kind.name(),
        l.completed(),
        u8::from(faulted)
    );
    match outcome {
        Ok(()) if faulted => failed(Fail::new(format_args!(
            "context faulted ({})",
            gpu.ctx_state(CTX)
        ))),
        Ok(()) => 0,
        Err(why) => failed(why),
    }
}

fn failed(why: Fail) -> u8 {
    fw_println!("load failed: {why}");
    1
}

/// Context [`CTX`] running the load, and the time frame.
struct Load<'g> {
    gpu: &'g Gpu,
    ring: Ring,
    fence_va: u64,
    shadow: u64,
    /// Dispatches submitted (= the last fence value submitted).
    submitted: u64,
    /// GPU time at the start.
    t0: u64,
    /// Planned end of the run (GPU time).
    end: u64,
    /// The context suppresses doorbells the GPU does not need.
    suppress: bool,
    /// How fences are waited for.
    waiter: Waiter,
}

impl<'g> Load<'g> {
    /// Enable context [`CTX`] with the static ring (empty) and a tail shadow,
    /// point `WAIT` at it, and start the clock.
    fn start(gpu: &'g Gpu, o: &LoadOptions) -> Self {
        let fence_va = page(FENCE_PAGE);
        let shadow = fence_va + SHADOW_OFFSET;
        let ring = Ring {
            base: page(RING_PAGE),
            size: STATIC_RING_ENTRIES,
            tail: 0,
        };
        // Doorbells only when the GPU asks for them, where it can say so.
        let suppress = gpu.rd(regs::CAPS) & caps::DOORBELL_SUPPRESS != 0;
        let control = if suppress {
            ctx_control::ENABLE | ctx_control::SUPPRESS
        } else {
            ctx_control::ENABLE
        };
        start_ctx(gpu, &ring, Some(shadow), control);
        // Only context 0 is ever waited for: WAIT_CTX is written once.
        gpu.wr(regs::WAIT_CTX, CTX);
        let waiter = Waiter::new(gpu, o.wait, Wait::Hybrid);
        let t0 = gpu.timestamp();
        Self {
            waiter,
            gpu,
            ring,
            fence_va,
            shadow,
            suppress,
            submitted: 0,
            t0,
            end: t0 + u64::from(o.seconds) * NS_PER_S,
        }
    }

    fn run(&mut self, o: &LoadOptions) -> Result<(), Fail> {
        let groups = o.groups.unwrap_or(BUSY_GROUPS);
        match o.kind {
            LoadKind::Busy => self.busy_until(self.end, o.us, groups)?,
            LoadKind::Long => {
                self.submit(o.us, o.groups.unwrap_or(LONG_GROUPS));
                self.busy_until(self.end, o.us, BUSY_GROUPS)?;
            }
            LoadKind::Bursty => {
                let mut phase = self.t0;
                while phase < self.end {
                    self.busy_until((phase + BURST_NS).min(self.end), o.us, groups)?;
                    self.pause_until((phase + BURST_NS + PAUSE_NS).min(self.end))?;
                    phase = self.gpu.timestamp();
                }
            }
            LoadKind::Idle | LoadKind::Dirty => self.pause_until(self.end)?,
        }
        // Let the queued work finish: `jobs` counts completed dispatches.
        if self.completed() != self.submitted {
            self.wait_for(self.submitted)?;
        }
        Ok(())
    }

    /// `kind=dirty`: [`DIRTY_SLOTS`] jobs spread evenly over the run; job `n` writes slot `n`
    /// once: the CPU writes it in VRAM through the aperture (KVM's dirty log sees that) and
    /// the GPU fills it in guest RAM (only the vGPU's own log sees that), each with a pattern
    /// of the job's number, and a RAM table records the job. Nothing is written twice, so a
    /// page a migration lost stays lost: at the end every slot is checked word by word.
    /// Returns the jobs done.
    fn dirty(&mut self, info: Option<&StartInfo>) -> Result<u64, Fail> {
        let bdf = self.gpu.bdf;
        let bar = |i: u8| u64::from(bdf.read_u32(pci::REG_BAR0 + 4 * i));
        let vram = (bar(abi_pci::BAR_VRAM as u8) & !0xf) | bar(abi_pci::BAR_VRAM as u8 + 1) << 32;
        let mut arena = super::throughput::ram_arena(info)
            .ok_or_else(|| Fail::new(format_args!("no RAM for kind=dirty")))?;
        let ram = arena
            .alloc((DIRTY_SLOTS + 1) * DIRTY_SLOT, DIRTY_SLOT)
            .ok_or_else(|| Fail::new(format_args!("not enough RAM for kind=dirty")))?;
        if vram == 0 {
            return Err(Fail::new(format_args!("BAR2 is not assigned")));
        }
        // A BAR placed above 4 GiB (a large VRAM) is outside the boot identity map.
        let mut alloc_page = || arena.alloc(4096, 4096);
        crate::pages::map_identity(vram, DIRTY_SLOTS * DIRTY_SLOT, &mut alloc_page)
            .map_err(|e| Fail::new(format_args!("cannot map BAR2: {e}")))?;
        super::gpu_map(ram, ram + (DIRTY_SLOTS + 1) * DIRTY_SLOT)?;
        // The table of the last job per slot (0: none), past the slots.
        let table = ram + DIRTY_SLOTS * DIRTY_SLOT;
        let mut jobs = 0u64;
        let period = (self.end - self.t0) / DIRTY_SLOTS;
        while jobs < DIRTY_SLOTS {
            // Job n starts n periods into the run.
            while self.gpu.timestamp() < self.t0 + jobs * period {
                core::hint::spin_loop();
            }
            let slot = jobs;
            jobs += 1;
            let words = DIRTY_SLOT / 8;
            for w in 0..words {
                super::poke64(vram + slot * DIRTY_SLOT + w * 8, jobs << 32 | w);
            }
            super::poke64(table + slot * 8, jobs);
            self.submitted += 1;
            self.ring.push(&crate::conformance::driver::fill(
                ram + slot * DIRTY_SLOT,
                DIRTY_SLOT,
                dirty_pattern(jobs),
            ));
            self.ring.push(&fence(self.fence_va, self.submitted, 0));
            barrier();
            publish_tail(self.gpu, self.shadow, self.ring.tail, self.suppress);
            self.wait_for(self.submitted)?;
        }
        for slot in 0..DIRTY_SLOTS {
            let job = super::peek64(table + slot * 8);
            if job == 0 {
                continue;
            }
            for w in 0..DIRTY_SLOT / 8 {
                let v = super::peek64(vram + slot * DIRTY_SLOT + w * 8);
                if v != job << 32 | w {
                    return Err(Fail::new(format_args!(
                        "VRAM slot {slot} word {w} is {v:#x}, job {job} wrote {:#x}",
                        job << 32 | w
                    )));
                }
            }
            for w in 0..DIRTY_SLOT / 4 {
                let v = super::peek32(ram + slot * DIRTY_SLOT + w * 4);
                if v != dirty_pattern(job) {
                    return Err(Fail::new(format_args!(
                        "RAM slot {slot} word {w} is {v:#x}, job {job} filled {:#x}",
                        dirty_pattern(job)
                    )));
                }
            }
        }
        Ok(jobs)
    }

    /// Dispatches completed: the fence word in memory.
    fn completed(&self) -> u64 {
        peek64(self.fence_va)
    }

    /// Queue SPIN_US `[us, groups]` and its fence; publish the tail through
    /// the tail shadow and, unless the GPU is watching it, the doorbell (an
    /// ioeventfd: no exit to the VMM's user space).
    fn submit(&mut self, us: u64, groups: u64) {
        self.submitted += 1;
        self.ring.push(&dispatch(kernel::SPIN_US, &[us, groups]));
        self.ring.push(&fence(self.fence_va, self.submitted, 0));
        // The packets are plain stores; the shadow store is volatile after them.
        barrier();
        publish_tail(self.gpu, self.shadow, self.ring.tail, self.suppress);
    }

    /// Keep [`IN_FLIGHT`] dispatches queued until GPU time `until`: submit
    /// while fewer are queued, else block in `WAIT` for the oldest. Returns
    /// with up to [`IN_FLIGHT`] dispatches still queued.
    fn busy_until(&mut self, until: u64, us: u64, groups: u64) -> Result<(), Fail> {
        loop {
            let done = self.completed();
            if self.submitted - done >= IN_FLIGHT {
                self.wait_for(done + 1)?;
            } else if self.gpu.timestamp() >= until {
                return Ok(());
            } else {
                self.submit(us, groups);
            }
        }
    }

    /// Submit nothing until GPU time `until`: block in `WAIT` reads for a
    /// fence value that nothing queued will reach (each read returns TIMEOUT
    /// after `WAIT_TIMEOUT_MS`). Work already queued goes on meanwhile.
    fn pause_until(&self, until: u64) -> Result<(), Fail> {
        let never = self.submitted + 1;
        self.gpu.wr(regs::WAIT_VALUE, never as u32);
        while self.gpu.timestamp() < until {
            match self.gpu.rd(regs::WAIT) {
                wait::TIMEOUT => {}
                r => return Err(self.wait_error(never, r)),
            }
        }
        Ok(())
    }

    /// Wait until fence `value` completed: spin on the fence word briefly
    /// (`wait=hybrid`, the default; not at all with `wait=block`), then block
    /// in `WAIT`, reading it again while it times out; a fault, a stopped
    /// context or no progress by [`GRACE_NS`] after the planned end is an
    /// error.
    fn wait_for(&self, value: u64) -> Result<(), Fail> {
        if self.waiter.how == Wait::Spin {
            let left = (self.end + GRACE_NS).saturating_sub(self.gpu.timestamp());
            return self.waiter.wait(self.gpu, self.fence_va, value, left);
        }
        if self.waiter.how == Wait::Hybrid && self.waiter.spin_briefly(self.fence_va, value) {
            return Ok(());
        }
        self.gpu.wr(regs::WAIT_VALUE, value as u32);
        loop {
            match self.gpu.rd(regs::WAIT) {
                wait::DONE => return Ok(()),
                wait::TIMEOUT if self.gpu.timestamp() <= self.end + GRACE_NS => {}
                wait::TIMEOUT => {
                    return Err(Fail::new(format_args!(
                        "fence {value} not done {} s after the planned end ({})",
                        GRACE_NS / NS_PER_S,
                        self.gpu.ctx_state(CTX)
                    )));
                }
                r => return Err(self.wait_error(value, r)),
            }
        }
    }

    fn wait_error(&self, value: u64, r: u32) -> Fail {
        let what = match r {
            wait::FAULTED => "the context faulted",
            wait::INVALID => "the context is not enabled",
            _ => "unexpected WAIT result",
        };
        Fail::new(format_args!(
            "waiting for fence {value}: {what} (WAIT {r}, {})",
            self.gpu.ctx_state(CTX)
        ))
    }
}
