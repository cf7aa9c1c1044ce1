//! A paused vGPU's state as data (for snapshots and migration): configuration space, MSI-X,
//! the register file, every context, and where a packet stopped inside. VRAM is not in it
//! (the VMM copies it through [`Vram`] on its own; it is large). Restoring checks the state
//! as the register path checks guest writes: a state that no guest could have produced is
//! refused whole, naming what is wrong, and nothing changes.

use serde::{Deserialize, Serialize};

use super::*;

/// Where the command processor stopped inside a packet, and where it goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The context.
    pub ctx: u32,
    /// Its ring head: the packet.
    pub head: u32,
    /// The first group that did not run.
    pub next_group: u64,
    /// GPU time the packet had used (ns), counted against the watchdog.
    pub used_ns: u64,
}

/// One context's registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtxState {
    pub control: u32,
    pub pt_root: u64,
    pub ring_base: u64,
    pub ring_size: u32,
    pub head: u32,
    pub tail: u32,
    pub tail_addr: u64,
    pub irq_vector: u32,
    pub fence: u64,
    /// The fault that stopped it: (code, address).
    pub fault: Option<(u32, u64)>,
}

/// A paused vGPU (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VgpuState {
    /// Configuration space registers.
    pub config: Vec<u32>,
    /// MSI-X table (address low, address high, data, control per vector).
    pub msix_table: Vec<[u32; 4]>,
    /// MSI-X pending bits.
    pub msix_pending: Vec<u64>,
    pub int_status: u32,
    pub int_mask: u32,
    /// Last fault: address, context, code.
    pub last_fault: (u64, u32, u32),
    pub fault_count: u32,
    pub fault_vector: u32,
    pub wait_ctx: u32,
    pub wait_value: u32,
    pub ts_hi_latch: u32,
    /// The GPU clock (`TIMESTAMP`) when saved, in ns; it goes on from there.
    pub timestamp_ns: u64,
    /// A function reset the guest asked for and the device had not carried out yet.
    pub reset_pending: bool,
    pub contexts: Vec<CtxState>,
    /// The packet the command processor stopped inside, if any.
    pub in_flight: Option<InFlight>,
}

impl Vgpu {
    /// The device's state. Only while paused ([`Vgpu::pause`]): then nothing changes it but
    /// register accesses, which a paused VM does not make.
    pub fn save(&self) -> Result<VgpuState, String> {
        let st = self.shared.lock();
        if !st.cp_parked || !self.shared.paused.load(Ordering::Acquire) {
            return Err("the vGPU is not paused".into());
        }
        let (msix_table, msix_pending) = st.msix.save();
        Ok(VgpuState {
            config: st.config.registers(),
            msix_table,
            msix_pending,
            int_status: st.int_status,
            int_mask: st.int_mask,
            last_fault: st.last_fault,
            fault_count: st.fault_count,
            fault_vector: st.fault_vector,
            wait_ctx: st.wait_ctx,
            wait_value: st.wait_value,
            ts_hi_latch: st.ts_hi_latch,
            timestamp_ns: st.now_ns(),
            reset_pending: st.reset_pending,
            contexts: st
                .ctx
                .iter()
                .map(|c| CtxState {
                    control: c.control,
                    pt_root: c.pt_root,
                    ring_base: c.ring_base,
                    ring_size: c.ring_size,
                    head: c.head,
                    tail: c.tail,
                    tail_addr: c.tail_addr,
                    irq_vector: c.irq_vector,
                    fence: c.fence,
                    fault: c.fault.map(|f| (f.code, f.addr)),
                })
                .collect(),
            in_flight: st.in_flight,
        })
    }

    /// Puts a freshly built vGPU (same profile, no guest access yet) in `state`. Every
    /// context is treated as rung (doorbells latched before the snapshot are not in it; a
    /// spurious one only makes the GPU read the tail again). Refused whole if any part is
    /// not a state this device can be in.
    pub fn restore(&self, state: &VgpuState) -> Result<(), String> {
        let sh = &self.shared;
        if state.contexts.len() != sh.contexts as usize {
            return Err(format!(
                "{} contexts saved, this vGPU has {}",
                state.contexts.len(),
                sh.contexts
            ));
        }
        let mut ctx = Vec::with_capacity(state.contexts.len());
        for (i, c) in state.contexts.iter().enumerate() {
            ctx.push(checked_context(i, c)?);
        }
        if let Some(f) = state.in_flight {
            let c = ctx.get(f.ctx as usize).ok_or(format!(
                "the packet in flight is on context {}, past the last",
                f.ctx
            ))?;
            if f.head != c.head || !c.runnable() || c.head == c.tail {
                return Err(format!(
                    "the packet in flight (context {}, slot {}) is not the next one its \
                     context runs",
                    f.ctx, f.head
                ));
            }
        }
        let ts_base = Instant::now()
            .checked_sub(Duration::from_nanos(state.timestamp_ns))
            .ok_or("the saved GPU clock is later than this host's clock can go back")?;
        {
            let mut st = sh.lock();
            // Checked on copies first: nothing changes unless all of it is acceptable.
            let mut config = st.config.clone();
            config.restore_registers(&state.config)?;
            st.msix.restore(&state.msix_table, &state.msix_pending)?;
            st.config = config;
            st.int_status = state.int_status;
            st.int_mask = state.int_mask;
            st.last_fault = state.last_fault;
            st.fault_count = state.fault_count;
            st.fault_vector = state.fault_vector;
            st.wait_ctx = state.wait_ctx;
            st.wait_value = state.wait_value;
            st.ts_hi_latch = state.ts_hi_latch;
            st.ts_base = ts_base;
            st.reset_pending = state.reset_pending;
            for (c, mut new) in st.ctx.iter_mut().zip(ctx) {
                new.generation = c.generation + 1;
                new.tlb_epoch = c.tlb_epoch + 1;
                new.doorbell = true;
                *c = new;
            }
            st.resume = state.in_flight;
        }
        sh.rehint.store(true, Ordering::Release);
        sh.wake();
        Ok(())
    }
}

/// A saved context as the device keeps it. Ring size, base and shadow are not checked: a
/// guest may reprogram them on an enabled context (they are checked only when it is
/// enabled), so a real VM's snapshot can hold any values, and the command processor copes
/// with any of them (a bad ring or shadow becomes the context's fault when it next runs).
fn checked_context(i: usize, c: &CtxState) -> Result<Ctx, String> {
    let control = c.control & (ctx_control::ENABLE | ctx_control::POLL | ctx_control::SUPPRESS);
    if control != c.control {
        return Err(format!(
            "context {i}: control {:#x} has unknown bits",
            c.control
        ));
    }
    let fault = c.fault.map(|(code, addr)| Fault::new(code, addr));
    let ctx = Ctx {
        control,
        pt_root: c.pt_root,
        ring_base: c.ring_base,
        ring_size: c.ring_size,
        head: c.head,
        tail: c.tail,
        tail_addr: c.tail_addr,
        irq_vector: c.irq_vector,
        fence: c.fence,
        fault,
        ..Ctx::default()
    };
    Ok(ctx)
}
