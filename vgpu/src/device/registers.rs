//! The BAR 0 register file: guest reads and writes of the global and per-context registers,
//! the blocking `WAIT`, and `RESET`.

use super::*;

impl Vgpu {
    pub(super) fn read_reg(&self, offset: u64) -> u32 {
        let sh = &self.shared;
        let mut st = sh.lock();
        let vram = sh.vram.size();
        match offset {
            regs::MAGIC => regs::MAGIC_VALUE,
            regs::VERSION => {
                u32::from(vgpu_abi::VERSION_MAJOR) << 16 | u32::from(vgpu_abi::VERSION_MINOR)
            }
            regs::CAPS => sh.caps,
            regs::NUM_CONTEXTS => sh.contexts,
            regs::VRAM_SIZE_LO => vram as u32,
            regs::VRAM_SIZE_HI => (vram >> 32) as u32,
            regs::KERNELS => kernel::ALL,
            regs::MAX_RING_ENTRIES => limits::MAX_RING_ENTRIES,
            regs::STATUS => {
                let mut s = if st.reset_pending { 0 } else { status::READY };
                if st.ctx.iter().any(|c| c.fault.is_some()) {
                    s |= status::FAULTED;
                }
                s
            }
            regs::INT_STATUS => st.int_status,
            regs::INT_MASK => st.int_mask,
            regs::FAULT_ADDR_LO => st.last_fault.0 as u32,
            regs::FAULT_ADDR_HI => (st.last_fault.0 >> 32) as u32,
            regs::FAULT_CTX => st.last_fault.1,
            regs::FAULT_CODE => st.last_fault.2,
            regs::FAULT_COUNT => st.fault_count,
            regs::FAULT_VECTOR => st.fault_vector,
            regs::TIMESTAMP_LO => {
                let t = st.now_ns();
                st.ts_hi_latch = (t >> 32) as u32;
                t as u32
            }
            regs::TIMESTAMP_HI => st.ts_hi_latch,
            regs::WAIT_CTX => st.wait_ctx,
            regs::WAIT_VALUE => st.wait_value,
            regs::WAIT => self.wait(st),
            o if (regs::CTX_BASE..regs::ctx_reg(sh.contexts, 0)).contains(&o) => {
                let i = ((o - regs::CTX_BASE) / regs::CTX_STRIDE) as usize;
                let c = &st.ctx[i];
                match (o - regs::CTX_BASE) % regs::CTX_STRIDE {
                    regs::CTX_CONTROL => c.control,
                    regs::CTX_STATUS => c.status(),
                    regs::CTX_PT_ROOT_LO => c.pt_root as u32,
                    regs::CTX_PT_ROOT_HI => (c.pt_root >> 32) as u32,
                    regs::CTX_RING_BASE_LO => c.ring_base as u32,
                    regs::CTX_RING_BASE_HI => (c.ring_base >> 32) as u32,
                    regs::CTX_RING_SIZE => c.ring_size,
                    regs::CTX_RING_HEAD => c.head,
                    regs::CTX_RING_TAIL => c.tail,
                    regs::CTX_FENCE_LO => c.fence as u32,
                    regs::CTX_FENCE_HI => (c.fence >> 32) as u32,
                    regs::CTX_IRQ_VECTOR => c.irq_vector,
                    regs::CTX_FAULT_CODE => c.fault.map_or(0, |f| f.code),
                    regs::CTX_FAULT_ADDR_LO => c.fault.map_or(0, |f| f.addr as u32),
                    regs::CTX_FAULT_ADDR_HI => c.fault.map_or(0, |f| (f.addr >> 32) as u32),
                    regs::CTX_TAIL_ADDR_LO => c.tail_addr as u32,
                    regs::CTX_TAIL_ADDR_HI => (c.tail_addr >> 32) as u32,
                    _ => 0,
                }
            }
            _ => 0,
        }
    }

    /// The blocking `WAIT` read.
    fn wait(&self, mut st: MutexGuard<'_, State>) -> u32 {
        let i = st.wait_ctx as usize;
        let target = st.wait_value;
        let deadline = Instant::now() + Duration::from_millis(u64::from(limits::WAIT_TIMEOUT_MS));
        loop {
            let Some(c) = st.ctx.get(i).filter(|c| c.enabled()) else {
                return wait::INVALID;
            };
            // Sequence-number comparison of the low 32 bits, so the value may wrap.
            if (c.fence as u32).wrapping_sub(target) as i32 >= 0 {
                return wait::DONE;
            }
            if c.fault.is_some() {
                return wait::FAULTED;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return wait::TIMEOUT;
            }
            st = self.shared.progress.wait_timeout(st, left).0;
        }
    }

    pub(super) fn write_reg(&self, offset: u64, v: u32) {
        let sh = &self.shared;
        let mut st = sh.lock();
        match offset {
            regs::RESET if v == regs::RESET_VALUE => {
                st.reset_pending = true;
                sh.cancel.store(true, Ordering::Release);
                sh.sched.interrupt(sh.member);
                sh.wake();
                // A command processor parked by a pause waits on `progress`: a reset ends
                // that wait too.
                sh.progress.notify_all();
                let deadline = Instant::now() + RESET_TIMEOUT;
                while st.reset_pending && Instant::now() < deadline {
                    let left = deadline.saturating_duration_since(Instant::now());
                    st = sh.progress.wait_timeout(st, left).0;
                }
                if st.reset_pending {
                    tracing::error!("vGPU reset did not complete in {RESET_TIMEOUT:?}");
                }
            }
            regs::INT_STATUS => st.int_status &= !v,
            regs::INT_MASK => st.int_mask = v,
            regs::FAULT_VECTOR => st.fault_vector = v,
            regs::WAIT_CTX => st.wait_ctx = v,
            regs::WAIT_VALUE => st.wait_value = v,
            o if (regs::DOORBELL_BASE..regs::doorbell(sh.contexts)).contains(&o)
                && (o - regs::DOORBELL_BASE).is_multiple_of(regs::DOORBELL_STRIDE) =>
            {
                let i = ((o - regs::DOORBELL_BASE) / regs::DOORBELL_STRIDE) as usize;
                st.ctx[i].doorbell = true;
                sh.wake();
            }
            o if (regs::CTX_BASE..regs::ctx_reg(sh.contexts, 0)).contains(&o) => {
                let i = ((o - regs::CTX_BASE) / regs::CTX_STRIDE) as usize;
                self.write_ctx(&mut st, i, (o - regs::CTX_BASE) % regs::CTX_STRIDE, v);
            }
            _ => tracing::trace!(offset, v, "write to a read-only or unknown vGPU register"),
        }
    }

    fn write_ctx(&self, st: &mut State, i: usize, reg: u64, v: u32) {
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let hi = |old: u64| (old & 0xffff_ffff) | u64::from(v) << 32;
        let c = &mut st.ctx[i];
        match reg {
            regs::CTX_CONTROL => {
                if v & ctx_control::RESET != 0 {
                    let fence = c.fence;
                    let (generation, tlb_epoch) = (c.generation + 1, c.tlb_epoch + 1);
                    *c = Ctx {
                        pt_root: c.pt_root,
                        ring_base: c.ring_base,
                        ring_size: c.ring_size,
                        tail_addr: c.tail_addr,
                        irq_vector: c.irq_vector,
                        fence,
                        generation,
                        tlb_epoch,
                        ..Ctx::default()
                    };
                    self.shared.progress.notify_all();
                    return;
                }
                let was = c.enabled();
                c.control = v & (ctx_control::ENABLE | ctx_control::POLL | ctx_control::SUPPRESS);
                if c.enabled() && !was {
                    let size_ok =
                        c.ring_size.is_power_of_two() && c.ring_size <= limits::MAX_RING_ENTRIES;
                    let base_ok = c.ring_base.is_multiple_of(vgpu_abi::pte::PAGE_SIZE)
                        && c.ring_base < 1 << vgpu_abi::pte::VA_BITS;
                    // The hint shares the tail's page: an 8-byte shadow, 8-byte aligned.
                    let shadow_ok =
                        c.control & ctx_control::SUPPRESS == 0 || c.tail_addr.is_multiple_of(8);
                    if !(size_ok && base_ok && shadow_ok) {
                        let at = if shadow_ok { c.ring_base } else { c.tail_addr };
                        st.record_fault(i, Fault::new(fault::RING_CONFIG, at));
                        self.shared.progress.notify_all();
                        return;
                    }
                }
                self.shared.rehint.store(true, Ordering::Release);
                self.shared.wake();
            }
            regs::CTX_PT_ROOT_LO => {
                c.pt_root = lo(c.pt_root);
                c.tlb_epoch += 1;
            }
            regs::CTX_PT_ROOT_HI => {
                c.pt_root = hi(c.pt_root);
                c.tlb_epoch += 1;
            }
            regs::CTX_RING_BASE_LO => c.ring_base = lo(c.ring_base),
            regs::CTX_RING_BASE_HI => c.ring_base = hi(c.ring_base),
            regs::CTX_RING_SIZE => c.ring_size = v,
            regs::CTX_RING_TAIL => {
                c.tail = v;
                self.shared.wake();
            }
            regs::CTX_TLB_INVALIDATE => c.tlb_epoch += 1,
            regs::CTX_IRQ_VECTOR => c.irq_vector = v,
            regs::CTX_TAIL_ADDR_LO => c.tail_addr = lo(c.tail_addr),
            regs::CTX_TAIL_ADDR_HI => c.tail_addr = hi(c.tail_addr),
            _ => {}
        }
    }
}
