//! MSI-X and the interrupt model, then the function-level reset.
//!
//! MSI-X entry `i` is programmed with CPU vector [`VECTOR_BASE`] + `i`; the
//! ring-0 stubs in `boot.rs` count each vector (`lapic::count`). Entry 0 is
//! the fault vector; context `c` uses entry `1 + c`.

use vgpu_abi::{int, packet, pci as abi_pci, regs, status, wait};

use super::driver::{Buf, Env, Gpu, GpuAddr, Loc, PAGE, copy, fill};
use super::fault_cases::{check_fault_record, recover};
use super::{Msix, Outcome, Suite, bail, ensure, ensure_eq};
use crate::lapic;
use crate::pci;

/// CPU vector of MSI-X entry 0.
pub const VECTOR_BASE: u8 = 0x40;
/// Message Control bits (high half of the capability's first dword).
const CTRL_ENABLE: u32 = 1 << 15;
const CTRL_FUNCTION_MASK: u32 = 1 << 14;
const CTRL_TABLE_SIZE: u32 = 0x7ff;
/// Vector Control: masked.
const ENTRY_MASKED: u32 = 1;
/// How long an interrupt may take to arrive, and how long to watch for one
/// that must not.
const DELIVERY_MS: u64 = 200;
const QUIET_MS: u64 = 20;

fn msix(s: &Suite) -> Result<Msix, super::Fail> {
    match s.msix {
        Some(m) => Ok(m),
        None => Err(super::Fail::new(format_args!(
            "MSI-X is not set up (msix-capability failed)"
        ))),
    }
}

fn entry_reg(m: &Msix, entry: u32, dword: u64) -> u64 {
    m.table + u64::from(entry) * 16 + dword * 4
}

fn set_entry_mask(m: &Msix, entry: u32, masked: bool) {
    crate::io::mmio_write32(
        entry_reg(m, entry, 3),
        if masked { ENTRY_MASKED } else { 0 },
    );
}

fn pending(m: &Msix, entry: u32) -> bool {
    crate::io::mmio_read32(m.pba + u64::from(entry / 32) * 4) & (1 << (entry % 32)) != 0
}

/// Whether `done` holds within `ms` of GPU time. The fence a driver sees in memory is
/// written before its interrupt is raised (as a device's posted write goes before its MSI),
/// so right after the fence its pending bit or `INT_STATUS` bit may not be set yet.
fn within(g: &Gpu, ms: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = g.timestamp();
    while !done() {
        if g.timestamp().wrapping_sub(start) > ms * 1_000_000 {
            return done();
        }
    }
    true
}

fn pending_within(g: &Gpu, m: &Msix, entry: u32, ms: u64) -> bool {
    within(g, ms, || pending(m, entry))
}

fn set_control(s: &Suite, m: &Msix, bits: u32) {
    s.gpu.bdf.write_u32(m.cap, bits << 16);
}

/// Wait until `vector` has been counted more than `count` times, for at
/// most `ms` (and a bounded number of clock reads, should it not advance).
fn arrives(g: &Gpu, vector: u8, count: u32, ms: u64) -> bool {
    let start = g.timestamp();
    for _ in 0..ms * 1000 {
        if lapic::count(vector) != count {
            return true;
        }
        if g.timestamp().wrapping_sub(start) > ms * 1_000_000 {
            break;
        }
        core::hint::spin_loop();
    }
    lapic::count(vector) != count
}

/// The harness itself: a self-IPI taken at CPL3 reaches the ring-0 stub,
/// which counts it and sends EOI (so a second one is delivered too).
pub fn cpu_irq_path(s: &mut Suite) -> Outcome {
    for vector in [0xe0u8, 0xe0, 0xe1] {
        let before = lapic::count(vector);
        lapic::self_ipi(vector);
        ensure!(
            arrives(&s.gpu, vector, before, DELIVERY_MS),
            "self-IPI on vector {vector:#x} not counted (IRR pending: {})",
            lapic::irr_pending(vector)
        );
        ensure_eq!(
            lapic::count(vector),
            before + 1,
            "count of vector {vector:#x}"
        );
    }
    Ok(())
}

pub fn msix_capability(s: &mut Suite) -> Outcome {
    let bdf = s.gpu.bdf;
    let Some(cap) = bdf.find_capability(pci::CAP_MSIX) else {
        bail!("no MSI-X capability in the capability list");
    };
    let ctrl = bdf.read_u32(cap) >> 16;
    ensure_eq!(
        (ctrl & CTRL_TABLE_SIZE) + 1,
        u32::from(abi_pci::MSIX_VECTORS),
        "MSI-X table size"
    );
    ensure_eq!(ctrl & CTRL_ENABLE, 0, "MSI-X enable at power-on");
    let table = bdf.read_u32(cap + 4);
    let pba = bdf.read_u32(cap + 8);
    ensure_eq!(table & 7, abi_pci::BAR_REGS as u32, "MSI-X table BIR");
    ensure_eq!(
        u64::from(table & !7),
        abi_pci::MSIX_TABLE_OFFSET,
        "MSI-X table offset"
    );
    ensure_eq!(pba & 7, abi_pci::BAR_REGS as u32, "MSI-X PBA BIR");
    ensure_eq!(
        u64::from(pba & !7),
        abi_pci::MSIX_PBA_OFFSET,
        "MSI-X PBA offset"
    );
    let m = Msix {
        cap,
        table: s.gpu.bar0 + abi_pci::MSIX_TABLE_OFFSET,
        pba: s.gpu.bar0 + abi_pci::MSIX_PBA_OFFSET,
    };
    // The standard sequence: enable with the function masked, program the
    // entries, then unmask.
    set_control(s, &m, CTRL_ENABLE | CTRL_FUNCTION_MASK);
    let address = 0xfee0_0000 | u32::from(s.apic_id) << 12;
    for e in 0..u32::from(abi_pci::MSIX_VECTORS) {
        let ctl = crate::io::mmio_read32(entry_reg(&m, e, 3));
        ensure_eq!(
            ctl & ENTRY_MASKED,
            ENTRY_MASKED,
            "entry {e} mask bit at power-on"
        );
        crate::io::mmio_write32(entry_reg(&m, e, 0), address);
        crate::io::mmio_write32(entry_reg(&m, e, 1), 0);
        crate::io::mmio_write32(entry_reg(&m, e, 2), u32::from(VECTOR_BASE) + e);
        set_entry_mask(&m, e, false);
        ensure_eq!(
            crate::io::mmio_read32(entry_reg(&m, e, 0)),
            address,
            "entry {e} address"
        );
        ensure_eq!(
            crate::io::mmio_read32(entry_reg(&m, e, 2)),
            u32::from(VECTOR_BASE) + e,
            "entry {e} data"
        );
        ensure_eq!(
            crate::io::mmio_read32(entry_reg(&m, e, 3)),
            0,
            "entry {e} vector control"
        );
    }
    set_control(s, &m, CTRL_ENABLE);
    let ctrl = bdf.read_u32(cap) >> 16;
    ensure_eq!(
        ctrl & (CTRL_ENABLE | CTRL_FUNCTION_MASK),
        CTRL_ENABLE,
        "Message Control"
    );
    ensure_eq!(crate::io::mmio_read32(m.pba), 0, "PBA");
    s.gpu.wr(regs::FAULT_VECTOR, 0);
    for c in 0..s.gpu.num_ctx.min(u32::from(abi_pci::MSIX_VECTORS) - 1) {
        s.gpu.ctx_wr(c, regs::CTX_IRQ_VECTOR, 1 + c);
    }
    s.msix = Some(m);
    Ok(())
}

/// Complete a FENCE with FENCE_IRQ on `env`'s context.
fn irq_fence(s: &Suite, env: &mut Env) -> Outcome {
    let v = env.ctx.submit(&s.gpu, &[], packet::FENCE_IRQ)?;
    env.ctx.finish(&s.gpu, v)
}

pub fn msix_fence_irq(s: &mut Suite) -> Outcome {
    msix(s)?;
    for (ctx, entry) in [(0u32, 1u32), (3, 9)] {
        let mut env = Env::new(s, ctx, Loc::Sys)?;
        let g = &s.gpu;
        g.ctx_wr(ctx, regs::CTX_IRQ_VECTOR, entry);
        let vector = VECTOR_BASE + entry as u8;
        let before = lapic::count(vector);
        let fault_before = lapic::count(VECTOR_BASE);
        irq_fence(s, &mut env)?;
        ensure!(
            arrives(g, vector, before, DELIVERY_MS),
            "context {ctx}: vector {vector:#x} (entry {entry}) not delivered; INT_STATUS {:#x}",
            g.rd(regs::INT_STATUS)
        );
        ensure_eq!(
            g.rd(regs::INT_STATUS),
            int::fence(ctx),
            "INT_STATUS after a FENCE_IRQ on context {ctx}"
        );
        g.wr(regs::INT_STATUS, int::fence(ctx));
        ensure_eq!(
            g.rd(regs::INT_STATUS),
            0,
            "INT_STATUS after writing the bit back"
        );
        ensure!(
            !arrives(g, vector, before + 1, QUIET_MS),
            "vector {vector:#x} delivered more than once"
        );
        ensure_eq!(
            lapic::count(VECTOR_BASE),
            fault_before,
            "fault vector count"
        );
        g.ctx_wr(ctx, regs::CTX_IRQ_VECTOR, 1 + ctx);
    }
    Ok(())
}

pub fn msix_mask_pba(s: &mut Suite) -> Outcome {
    let m = msix(s)?;
    if s.vmm_owned("MSI-X entry and function masking, pending bits") {
        return Ok(());
    }
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let entry = 1;
    let vector = VECTOR_BASE + entry as u8;
    // Entry masked: the message is held as a pending bit.
    let before = lapic::count(vector);
    set_entry_mask(&m, entry, true);
    irq_fence(s, &mut env)?;
    let g = &s.gpu;
    ensure!(
        !arrives(g, vector, before, QUIET_MS),
        "delivered through a masked entry"
    );
    ensure!(
        pending_within(g, &m, entry, DELIVERY_MS),
        "PBA bit {entry} not set while masked"
    );
    set_entry_mask(&m, entry, false);
    ensure!(
        arrives(g, vector, before, DELIVERY_MS),
        "not delivered on unmasking the entry"
    );
    ensure!(
        !pending(&m, entry),
        "PBA bit {entry} still set after delivery"
    );
    // Function mask: the same through Message Control.
    let before = lapic::count(vector);
    g.wr(regs::INT_STATUS, u32::MAX);
    set_control(s, &m, CTRL_ENABLE | CTRL_FUNCTION_MASK);
    irq_fence(s, &mut env)?;
    let g = &s.gpu;
    let held = !arrives(g, vector, before, QUIET_MS);
    let was_pending = pending_within(g, &m, entry, DELIVERY_MS);
    set_control(s, &m, CTRL_ENABLE);
    ensure!(held, "delivered while the function was masked");
    ensure!(
        was_pending,
        "PBA bit {entry} not set while the function was masked"
    );
    ensure!(
        arrives(g, vector, before, DELIVERY_MS),
        "not delivered on clearing the function mask"
    );
    ensure!(
        !pending(&m, entry),
        "PBA bit {entry} still set after delivery"
    );
    Ok(())
}

pub fn int_mask(s: &mut Suite) -> Outcome {
    let m = msix(s)?;
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let vector = VECTOR_BASE + 1;
    let before = lapic::count(vector);
    s.gpu.wr(regs::INT_MASK, int::fence(0));
    irq_fence(s, &mut env)?;
    let g = &s.gpu;
    ensure!(
        !arrives(g, vector, before, QUIET_MS),
        "delivered while masked in INT_MASK"
    );
    ensure!(
        within(g, DELIVERY_MS, || g.rd(regs::INT_STATUS) == int::fence(0)),
        "INT_STATUS while masked: {:#x}, not {:#x}",
        g.rd(regs::INT_STATUS),
        int::fence(0)
    );
    ensure!(
        !pending(&m, 1),
        "PBA bit set: INT_MASK must stop the message before MSI-X"
    );
    // Unmasking does not send a message for a bit that is already set.
    g.wr(regs::INT_MASK, 0);
    ensure!(
        !arrives(g, vector, before, QUIET_MS),
        "delivered on clearing INT_MASK"
    );
    g.wr(regs::INT_STATUS, int::fence(0));
    irq_fence(s, &mut env)?;
    ensure!(
        arrives(&s.gpu, vector, before, DELIVERY_MS),
        "not delivered after unmasking"
    );
    Ok(())
}

/// Fault `env`'s context with a copy from an unmapped VA and check the record.
fn make_fault(s: &mut Suite, env: &mut Env) -> Outcome {
    let va = env.unmapped_va(PAGE);
    let g = &s.gpu;
    g.wr(regs::INT_STATUS, u32::MAX);
    let count = g.rd(regs::FAULT_COUNT);
    let v = env.ctx.submit(g, &[copy(va, va, 8)], 0)?;
    ensure_eq!(env.ctx.wait(g, v), wait::FAULTED, "WAIT result");
    check_fault_record(s, env.ctx.id, vgpu_abi::fault::NOT_PRESENT, Some(va), count)
}

pub fn fault_irq(s: &mut Suite) -> Outcome {
    msix(s)?;
    let mut env = Env::new(s, 2, Loc::Sys)?;
    for entry in [0u32, 7] {
        s.gpu.wr(regs::FAULT_VECTOR, entry);
        let vector = VECTOR_BASE + entry as u8;
        let before = lapic::count(vector);
        make_fault(s, &mut env)?;
        ensure!(
            arrives(&s.gpu, vector, before, DELIVERY_MS),
            "FAULT_VECTOR {entry}: vector {vector:#x} not delivered"
        );
        recover(s, &mut env)?;
    }
    // Masked in INT_MASK: status only.
    s.gpu.wr(regs::FAULT_VECTOR, 0);
    s.gpu.wr(regs::INT_MASK, int::FAULT);
    let before = lapic::count(VECTOR_BASE);
    make_fault(s, &mut env)?;
    ensure!(
        !arrives(&s.gpu, VECTOR_BASE, before, QUIET_MS),
        "fault interrupt delivered while INT_MASK.FAULT is set"
    );
    s.gpu.wr(regs::INT_MASK, 0);
    recover(s, &mut env)
}

pub fn reset(s: &mut Suite) -> Outcome {
    // Leave state everywhere: fences, a fault, interrupt bits, VRAM data.
    let mut env = Env::new(s, 0, Loc::Vram)?;
    env.run(s, &[fill(super::driver::FENCE_VA + 256, 8, 7)])?;
    let mut bad = Env::new(s, 1, Loc::Sys)?;
    make_fault(s, &mut bad)?;
    let g = &s.gpu;
    g.ctx_wr64(1, regs::CTX_TAIL_ADDR_LO, 0x1234_5000);
    g.wr(regs::INT_MASK, 0x0003_0001);
    g.wr(regs::FAULT_VECTOR, 3);
    g.wr(regs::WAIT_CTX, 2);
    g.wr(regs::WAIT_VALUE, 5);
    let size = g.vram_size;
    let vram = Buf::new(g, GpuAddr::new(Loc::Vram, 0), size);
    for off in [0, size / 2, size - 8] {
        vram.write_u64(off, 0x0123_4567_89ab_cdef);
    }
    let before = g.timestamp();

    g.wr(regs::RESET, regs::RESET_VALUE);
    let ready = (0..1000).any(|_| g.rd(regs::STATUS) & status::READY != 0);
    ensure!(ready, "STATUS.READY not set after reset");
    ensure_eq!(g.rd(regs::STATUS), status::READY, "STATUS after reset");
    ensure!(g.timestamp() < before, "TIMESTAMP did not restart at reset");
    ensure_eq!(g.rd(regs::MAGIC), regs::MAGIC_VALUE, "MAGIC after reset");
    for r in [
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
    ] {
        ensure_eq!(g.rd(r), 0, "register {r:#x} after reset");
    }
    for c in 0..g.num_ctx {
        let mut r = 0;
        while r < regs::CTX_STRIDE {
            if r != regs::CTX_TLB_INVALIDATE {
                ensure_eq!(g.ctx_rd(c, r), 0, "context {c} register {r:#x} after reset");
            }
            r += 4;
        }
    }
    for off in [0, size / 2, size - 8] {
        ensure_eq!(vram.read_u64(off), 0, "VRAM offset {off:#x} after reset");
    }
    // Everything the suite used lies low in VRAM: check the first 4 MiB, then
    // one qword per 64 KiB.
    let low = size.min(4 << 20);
    if let Some((at, _, got)) = vram.mismatch(0, low, |_| 0) {
        bail!("VRAM byte {at:#x} is {got:#x} after reset");
    }
    let mut off = low;
    while off < size {
        ensure_eq!(vram.read_u64(off), 0, "VRAM offset {off:#x} after reset");
        off += 64 << 10;
    }
    if let Some(m) = s
        .msix
        .filter(|_| !s.vmm_owned("MSI-X table after a device reset"))
    {
        for e in 0..u32::from(abi_pci::MSIX_VECTORS) {
            let ctl = crate::io::mmio_read32(entry_reg(&m, e, 3));
            ensure_eq!(
                ctl & ENTRY_MASKED,
                ENTRY_MASKED,
                "MSI-X entry {e} after reset"
            );
        }
    }
    s.msix = None;
    // And it works again.
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let (va, buf) = env.buf(s, Loc::Sys, PAGE, true, false)?;
    buf.fill(0);
    env.run(s, &[fill(va, 16, 0x5e5e_5e5e)])?;
    ensure_eq!(buf.read_u32(12), 0x5e5e_5e5e, "FILL after reset");
    ensure_eq!(env.ctx.last_fence, 1, "first fence value after reset");
    Ok(())
}
