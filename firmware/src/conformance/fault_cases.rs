//! Faults: each one stops only its context, is recorded in `FAULT_*` and
//! `CTX_FAULT_*`, raises `INT_STATUS.FAULT`, and is cleared by
//! `CTX_CONTROL.RESET`, after which the context works again.

use vgpu_abi::{
    Packet, ctx_control, ctx_status, fault, int, kernel, limits, packet, pte, regs, status, wait,
};

use super::driver::{Env, FENCE_VA, GpuAddr, Loc, PAGE, copy, dispatch, fill, nop, timestamp};
use super::mmu_cases::check;
use super::{Outcome, Suite, bail, ensure, ensure_eq};

/// Scratch offset in the fence page used to prove a context works.
const PROOF_OFF: u64 = 256;

/// Submit `packets` (and a fence) on `env`'s context and expect it to stop
/// on fault `code` (at `addr`, when given) with every fault register set;
/// then recover the context and prove it works.
pub fn expect_fault(
    s: &mut Suite,
    env: &mut Env,
    packets: &[Packet],
    code: u32,
    addr: Option<u64>,
) -> Outcome {
    let g = &s.gpu;
    g.wr(regs::INT_STATUS, u32::MAX);
    let count = g.rd(regs::FAULT_COUNT);
    let value = env.ctx.submit(g, packets, 0)?;
    let r = env.ctx.wait(g, value);
    ensure_eq!(
        r,
        wait::FAULTED,
        "WAIT result ({})",
        g.ctx_state(env.ctx.id)
    );
    check_fault_record(s, env.ctx.id, code, addr, count)?;
    ensure!(
        env.ctx.fence.read_u64(0) != value,
        "the fence after the faulting packet was written"
    );
    recover(s, env)
}

/// The registers after context `id` faulted with `code` (at `addr`), the
/// fault counter having been `count` before.
pub fn check_fault_record(s: &Suite, id: u32, code: u32, addr: Option<u64>, count: u32) -> Outcome {
    let g = &s.gpu;
    let st = g.ctx_rd(id, regs::CTX_STATUS);
    ensure!(
        st & ctx_status::FAULTED != 0,
        "CTX_STATUS {st:#x} lacks FAULTED ({})",
        g.ctx_state(id)
    );
    ensure_eq!(
        g.ctx_rd(id, regs::CTX_FAULT_CODE),
        code,
        "CTX_FAULT_CODE ({})",
        g.ctx_state(id)
    );
    ensure_eq!(g.rd(regs::FAULT_CODE), code, "FAULT_CODE");
    ensure_eq!(g.rd(regs::FAULT_CTX), id, "FAULT_CTX");
    if let Some(a) = addr {
        ensure_eq!(g.ctx_rd64(id, regs::CTX_FAULT_ADDR_LO), a, "CTX_FAULT_ADDR");
        ensure_eq!(g.rd64(regs::FAULT_ADDR_LO), a, "FAULT_ADDR");
    }
    ensure_eq!(
        g.rd(regs::FAULT_COUNT),
        count.wrapping_add(1),
        "FAULT_COUNT"
    );
    ensure!(
        g.rd(regs::INT_STATUS) & int::FAULT != 0,
        "INT_STATUS.FAULT not set"
    );
    ensure!(
        g.rd(regs::STATUS) & status::FAULTED != 0,
        "STATUS.FAULTED not set"
    );
    Ok(())
}

/// Clear `INT_STATUS.FAULT`, reset and re-enable the context, and run a FILL
/// on it.
pub fn recover(s: &mut Suite, env: &mut Env) -> Outcome {
    let g = &s.gpu;
    let id = env.ctx.id;
    g.wr(regs::INT_STATUS, int::FAULT);
    ensure_eq!(
        g.rd(regs::INT_STATUS) & int::FAULT,
        0,
        "INT_STATUS.FAULT after writing 1"
    );
    g.ctx_reset(id);
    ensure_eq!(
        g.ctx_rd(id, regs::CTX_STATUS),
        0,
        "CTX_STATUS after CTX_CONTROL.RESET"
    );
    ensure_eq!(
        g.ctx_rd(id, regs::CTX_FAULT_CODE),
        0,
        "CTX_FAULT_CODE after reset"
    );
    ensure_eq!(
        g.rd(regs::STATUS) & status::FAULTED,
        0,
        "STATUS.FAULTED after reset"
    );
    env.ctx.restart(g, &env.space);
    let marker = 0x600d_0000 | env.ctx.last_fence as u32 & 0xffff;
    env.ctx.run(g, &[fill(FENCE_VA + PROOF_OFF, 16, marker)])?;
    ensure_eq!(
        env.ctx.fence.read_u32(PROOF_OFF + 12),
        marker,
        "FILL after recovery"
    );
    Ok(())
}

pub fn not_present(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let (dst_va, dst) = env.buf(s, Loc::Sys, PAGE, true, false)?;
    dst.fill(0);
    let va = env.unmapped_va(PAGE);
    expect_fault(
        s,
        &mut env,
        &[copy(va, dst_va, 64), fill(dst_va, 4, 0x0bad_0bad)],
        fault::NOT_PRESENT,
        Some(va),
    )?;
    ensure_eq!(dst.read_u32(0), 0, "FILL queued after the fault");
    // Not present half-way: a copy that runs off the end of a buffer into
    // its guard page faults at the first unmapped byte.
    let (src_va, _) = env.buf(s, Loc::Sys, PAGE, false, false)?;
    expect_fault(
        s,
        &mut env,
        &[copy(src_va + PAGE - 16, dst_va, 32)],
        fault::NOT_PRESENT,
        Some(src_va + PAGE),
    )
}

pub fn write_protect(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let (ro_va, ro) = env.buf(s, Loc::Sys, PAGE, false, false)?;
    let (dst_va, dst) = env.buf(s, Loc::Sys, PAGE, true, false)?;
    ro.fill(0x77);
    dst.fill(0);
    // Reading through a read-only mapping is fine.
    env.run(s, &[copy(ro_va, dst_va, 128)])?;
    check(&dst, 0, PAGE, "copy from a read-only page", |o| {
        if o < 128 { 0x77 } else { 0 }
    })?;
    expect_fault(
        s,
        &mut env,
        &[fill(ro_va, 64, 0)],
        fault::WRITE_PROTECT,
        Some(ro_va),
    )?;
    expect_fault(
        s,
        &mut env,
        &[copy(dst_va, ro_va + 512, 8)],
        fault::WRITE_PROTECT,
        Some(ro_va + 512),
    )?;
    check(&ro, 0, PAGE, "read-only page", |_| 0x77)
}

pub fn vram_range(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let (dst_va, _) = env.buf(s, Loc::Sys, PAGE, true, false)?;
    let size = s.gpu.vram_size;
    // A leaf just past the partition.
    let va = env.unmapped_va(PAGE);
    env.space.map(
        &s.gpu,
        &mut s.heap,
        va,
        GpuAddr::new(Loc::Vram, size),
        1,
        true,
    )?;
    expect_fault(
        s,
        &mut env,
        &[copy(va, dst_va, 8)],
        fault::VRAM_RANGE,
        Some(va),
    )?;
    // A leaf far past it.
    let va = env.unmapped_va(PAGE);
    env.space.map(
        &s.gpu,
        &mut s.heap,
        va,
        GpuAddr::new(Loc::Vram, pte::ADDR_MASK & !(PAGE - 1)),
        1,
        true,
    )?;
    expect_fault(s, &mut env, &[fill(va, 8, 0)], fault::VRAM_RANGE, Some(va))?;
    // A page-table pointer past it (level 2 entry → "level 1 table").
    let va = 0x70_0000_0000;
    env.space
        .set(&s.gpu, &mut s.heap, va, 2, size | pte::VRAM | pte::PRESENT)?;
    expect_fault(
        s,
        &mut env,
        &[copy(va, dst_va, 8)],
        fault::VRAM_RANGE,
        Some(va),
    )
}

pub fn dma_domain(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let (dst_va, _) = env.buf(s, Loc::Sys, PAGE, true, false)?;
    let ram_end = s.ram.end().next_multiple_of(PAGE);
    let hole = 0xc000_0000;
    ensure!(
        !s.ram.contains(hole, PAGE),
        "the memory map shows RAM at {hole:#x}"
    );
    for (what, target) in [
        ("MMIO hole", hole),
        ("local APIC", 0xfee0_0000),
        ("end of RAM", ram_end),
        ("far past RAM", 1 << 46),
    ] {
        let va = env.unmapped_va(PAGE);
        env.space.map(
            &s.gpu,
            &mut s.heap,
            va,
            GpuAddr::new(Loc::Sys, target),
            1,
            true,
        )?;
        let r = expect_fault(
            s,
            &mut env,
            &[copy(va, dst_va, 8)],
            fault::DMA_DOMAIN,
            Some(va),
        );
        if let Err(e) = r {
            bail!("leaf at {what} {target:#x}: {e}");
        }
    }
    // A page table in the MMIO hole.
    let va = 0x71_0000_0000;
    env.space
        .set(&s.gpu, &mut s.heap, va, 3, hole | pte::PRESENT)?;
    expect_fault(
        s,
        &mut env,
        &[copy(va, dst_va, 8)],
        fault::DMA_DOMAIN,
        Some(va),
    )
}

pub fn bad_pte(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let (dst_va, dst) = env.buf(s, Loc::Sys, PAGE, true, false)?;
    let target = dst.at.addr;
    let rw = pte::PRESENT | pte::WRITABLE;
    let cases: [(&str, u64, u32, u64); 5] = [
        (
            "reserved bit 8 in a leaf",
            0x72_0000_0000,
            1,
            target | rw | 1 << 8,
        ),
        (
            "reserved bit 62 in a leaf",
            0x72_4000_0000,
            1,
            target | rw | 1 << 62,
        ),
        (
            "HUGE at level 1",
            0x72_8000_0000,
            1,
            target | rw | pte::HUGE,
        ),
        ("HUGE at level 4", 5 << 39, 4, rw | pte::HUGE),
        (
            "2 MiB leaf not 2 MiB aligned",
            0x72_c000_0000,
            2,
            target | rw | pte::HUGE,
        ),
    ];
    for (what, va, level, entry) in cases {
        if level == 2 && target.is_multiple_of(1 << 21) {
            continue;
        }
        env.space.set(&s.gpu, &mut s.heap, va, level, entry)?;
        if let Err(e) = expect_fault(
            s,
            &mut env,
            &[copy(va, dst_va, 8)],
            fault::BAD_PTE,
            Some(va),
        ) {
            bail!("{what}: {e}");
        }
    }
    // Reserved bits in a table pointer (level 3 entry).
    let va = 0x73_0000_0000;
    let table = s.heap.alloc(Loc::Sys, PAGE, PAGE)?;
    super::driver::Buf::new(&s.gpu, table, PAGE).fill(0);
    env.space.set(
        &s.gpu,
        &mut s.heap,
        va,
        3,
        table.addr | pte::PRESENT | 1 << 52,
    )?;
    expect_fault(
        s,
        &mut env,
        &[copy(va, dst_va, 8)],
        fault::BAD_PTE,
        Some(va),
    )
}

pub fn bad_root(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let root = env.space.root_reg();
    for (what, value) in [
        ("reserved bit 1", root | 0x2),
        ("not 4 KiB aligned", root | 0x800),
        ("reserved bit 60", root | 1 << 60),
    ] {
        s.gpu.ctx_wr64(env.ctx.id, regs::CTX_PT_ROOT_LO, value);
        if let Err(e) = expect_fault(s, &mut env, &[nop()], fault::BAD_ROOT, None) {
            bail!("root {value:#x} ({what}): {e}");
        }
    }
    Ok(())
}

pub fn va_range(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let (dst_va, _) = env.buf(s, Loc::Sys, PAGE, true, false)?;
    let top = 1u64 << pte::VA_BITS;
    expect_fault(
        s,
        &mut env,
        &[copy(top, dst_va, 8)],
        fault::VA_RANGE,
        Some(top),
    )?;
    expect_fault(
        s,
        &mut env,
        &[copy(top - 8, dst_va, 16)],
        fault::VA_RANGE,
        Some(top - 8),
    )?;
    expect_fault(
        s,
        &mut env,
        &[fill(u64::MAX - 3, 8, 0)],
        fault::VA_RANGE,
        Some(u64::MAX - 3),
    )
}

/// VA of the next packet `env`'s context will fetch.
fn next_packet_va(env: &Env) -> u64 {
    env.ctx.ring_va + u64::from(env.ctx.tail % env.ctx.size) * packet::PACKET_SIZE
}

pub fn bad_opcode(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    for op in [0x06, 0x77, u32::MAX] {
        let at = next_packet_va(&env);
        if let Err(e) = expect_fault(
            s,
            &mut env,
            &[Packet::new(op, 0, &[])],
            fault::BAD_OPCODE,
            Some(at),
        ) {
            bail!("opcode {op:#x}: {e}");
        }
    }
    Ok(())
}

pub fn bad_packet(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let (va, _) = env.buf(s, Loc::Sys, PAGE, true, false)?;
    let cases: [(&str, Packet); 12] = [
        ("NOP with flags", Packet::new(packet::OP_NOP, 1, &[])),
        (
            "NOP with an argument",
            Packet::new(packet::OP_NOP, 0, &[0, 0, 0, 0, 0, 0, 1]),
        ),
        (
            "COPY with a fourth argument",
            Packet::new(packet::OP_COPY, 0, &[va, va + 64, 8, 1]),
        ),
        (
            "COPY over MAX_TRANSFER",
            copy(va, va, limits::MAX_TRANSFER + 1),
        ),
        ("FILL length not a multiple of 4", fill(va, 6, 0)),
        ("FILL destination not 4-byte aligned", fill(va + 2, 8, 0)),
        (
            "FILL pattern over 32 bits",
            Packet::new(packet::OP_FILL, 0, &[va, 8, 1 << 32]),
        ),
        (
            "FENCE address not 8-byte aligned",
            Packet::new(packet::OP_FENCE, 0, &[va + 4, 1]),
        ),
        (
            "FENCE unknown flag",
            Packet::new(packet::OP_FENCE, 2, &[va, 1]),
        ),
        ("TIMESTAMP address not 8-byte aligned", timestamp(va + 12)),
        ("DISPATCH unknown kernel", dispatch(99, &[])),
        (
            "SGEMM with a zero dimension",
            dispatch(kernel::SGEMM, &[0, 4, 4, va, va, va]),
        ),
    ];
    for (what, p) in cases {
        let at = next_packet_va(&env);
        if let Err(e) = expect_fault(s, &mut env, &[p], fault::BAD_PACKET, Some(at)) {
            bail!("{what}: {e}");
        }
    }
    Ok(())
}

pub fn ring_config(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let id = env.ctx.id;
    let max = s.gpu.rd(regs::MAX_RING_ENTRIES);
    for (what, base, size) in [
        ("size 3", env.ctx.ring_va, 3),
        ("size 0", env.ctx.ring_va, 0),
        ("size over MAX_RING_ENTRIES", env.ctx.ring_va, max * 2),
        ("base not 4 KiB aligned", env.ctx.ring_va + 64, 8),
    ] {
        let g = &s.gpu;
        g.wr(regs::INT_STATUS, u32::MAX);
        let count = g.rd(regs::FAULT_COUNT);
        g.ctx_reset(id);
        g.ctx_wr64(id, regs::CTX_RING_BASE_LO, base);
        g.ctx_wr(id, regs::CTX_RING_SIZE, size);
        g.ctx_wr(id, regs::CTX_CONTROL, ctx_control::ENABLE);
        let r = check_fault_record(s, id, fault::RING_CONFIG, None, count)
            .and_then(|()| {
                let w = s.gpu.wait_fence(id, env.ctx.last_fence + 1);
                ensure_eq!(w, wait::FAULTED, "WAIT on the faulted context");
                Ok(())
            })
            .and_then(|()| recover(s, &mut env));
        if let Err(e) = r {
            bail!("ring {what}: {e}");
        }
    }
    // A published tail behind head, or more than a ring ahead of it, names no packets: the
    // context faults instead of running stale slots.
    for (what, ahead) in [
        ("behind head", u32::MAX),
        ("a ring and one ahead", env.ctx.size + 1),
    ] {
        env.run(s, &[])?;
        let g = &s.gpu;
        g.wr(regs::INT_STATUS, u32::MAX);
        let count = g.rd(regs::FAULT_COUNT);
        let head = g.ctx_rd(id, regs::CTX_RING_HEAD);
        g.ctx_wr(id, regs::CTX_RING_TAIL, head.wrapping_add(ahead));
        let w = g.wait_fence(id, env.ctx.last_fence + 1);
        let ring_va = env.ctx.ring_va;
        let r = (|| {
            ensure_eq!(w, wait::FAULTED, "WAIT with the tail {what}");
            check_fault_record(s, id, fault::RING_CONFIG, Some(ring_va), count)?;
            ensure_eq!(
                s.gpu.ctx_rd(id, regs::CTX_RING_HEAD),
                head,
                "head after the fault"
            );
            Ok(())
        })()
        .and_then(|()| recover(s, &mut env));
        if let Err(e) = r {
            bail!("tail {what}: {e}");
        }
    }
    Ok(())
}

pub fn recovery(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let (va, buf) = env.buf(s, Loc::Sys, PAGE, true, false)?;
    buf.fill(0);
    env.run(s, &[fill(va, 4, 1)])?;
    let fence_before = env.ctx.last_fence;
    let g = &s.gpu;
    let id = env.ctx.id;
    let hole = env.unmapped_va(PAGE);
    let start = env.ctx.tail;
    let v = env.ctx.submit(
        g,
        &[fill(va + 4, 4, 2), copy(hole, va, 8), fill(va + 8, 4, 3)],
        0,
    )?;
    ensure_eq!(env.ctx.wait(g, v), wait::FAULTED, "WAIT result");
    ensure_eq!(buf.read_u32(4), 2, "packet before the fault");
    ensure_eq!(buf.read_u32(8), 0, "packet after the fault");
    let st = g.ctx_state(id);
    ensure_eq!(
        st.head,
        start.wrapping_add(1),
        "CTX_RING_HEAD stopped at the faulting packet"
    );
    ensure_eq!(
        st.status & (ctx_status::ENABLED | ctx_status::BUSY | ctx_status::FAULTED),
        ctx_status::ENABLED | ctx_status::FAULTED,
        "CTX_STATUS of the stopped context"
    );
    // More work is not run while the context is stopped.
    env.ctx.push(&fill(va + 12, 4, 4));
    env.ctx.kick(g);
    ensure_eq!(env.ctx.wait(g, v), wait::FAULTED, "WAIT after more work");
    ensure_eq!(buf.read_u32(12), 0, "packet submitted after the fault");
    ensure_eq!(
        g.ctx_rd(id, regs::CTX_RING_HEAD),
        start.wrapping_add(1),
        "CTX_RING_HEAD"
    );

    g.ctx_reset(id);
    let st = g.ctx_state(id);
    ensure_eq!(st.status, 0, "CTX_STATUS after reset");
    ensure_eq!(st.head, 0, "CTX_RING_HEAD after reset");
    ensure_eq!(st.tail, 0, "CTX_RING_TAIL after reset");
    ensure_eq!(st.fault, 0, "CTX_FAULT_CODE after reset");
    ensure_eq!(st.fault_addr, 0, "CTX_FAULT_ADDR after reset");
    ensure_eq!(st.fence, fence_before, "CTX_FENCE after reset (kept)");
    ensure_eq!(
        g.rd(regs::FAULT_CODE),
        fault::NOT_PRESENT,
        "FAULT_CODE after the context reset (kept)"
    );
    ensure_eq!(
        g.rd(regs::STATUS) & status::FAULTED,
        0,
        "STATUS.FAULTED after reset"
    );
    ensure_eq!(
        s.gpu.wait_fence(id, v),
        wait::INVALID,
        "WAIT on a disabled context"
    );
    env.ctx.restart(&s.gpu, &env.space);
    env.run(s, &[fill(va + 16, 4, 5)])?;
    ensure_eq!(buf.read_u32(16), 5, "work after recovery");
    ensure_eq!(buf.read_u32(12), 0, "the dropped packet");
    ensure_eq!(
        env.ctx.last_fence,
        fence_before + 1,
        "fence sequence after recovery"
    );
    Ok(())
}

pub fn contexts_isolated(s: &mut Suite) -> Outcome {
    let mut a = Env::new(s, 0, Loc::Sys)?;
    let mut b = Env::new(s, 1, Loc::Sys)?;
    let (va, buf_a) = a.buf(s, Loc::Sys, PAGE, true, false)?;
    let (out_va, out_a) = a.buf(s, Loc::Sys, PAGE, true, false)?;
    buf_a.fill(0xaa);
    out_a.fill(0);
    // The same VA means nothing in context 1: it faults there...
    expect_fault_only(
        s,
        &mut b,
        &[fill(va, 64, 0x1111_1111)],
        fault::NOT_PRESENT,
        Some(va),
    )?;
    // ...while context 0 keeps running.
    a.run(s, &[copy(va, out_va, 64)])?;
    ensure_eq!(
        s.gpu.ctx_rd(0, regs::CTX_STATUS) & ctx_status::FAULTED,
        0,
        "context 0 status while context 1 is faulted"
    );
    check(
        &out_a,
        0,
        64,
        "context 0 while context 1 is faulted",
        |_| 0xaa,
    )?;
    recover(s, &mut b)?;
    // Mapped to its own page in context 1, the VA reaches that page only.
    let (va_b, buf_b) = b.buf(s, Loc::Sys, PAGE, true, false)?;
    ensure_eq!(va_b, va, "context 1 buffer VA");
    buf_b.fill(0);
    b.run(s, &[fill(va, 64, 0x2222_2222)])?;
    check(&buf_b, 0, 128, "context 1's page", |o| {
        if o < 64 { 0x22 } else { 0 }
    })?;
    check(
        &buf_a,
        0,
        PAGE,
        "context 0's page after context 1 wrote the same VA",
        |_| 0xaa,
    )
}

/// Like [`expect_fault`] without the recovery.
fn expect_fault_only(
    s: &mut Suite,
    env: &mut Env,
    packets: &[Packet],
    code: u32,
    addr: Option<u64>,
) -> Outcome {
    let g = &s.gpu;
    g.wr(regs::INT_STATUS, u32::MAX);
    let count = g.rd(regs::FAULT_COUNT);
    let value = env.ctx.submit(g, packets, 0)?;
    ensure_eq!(env.ctx.wait(g, value), wait::FAULTED, "WAIT result");
    check_fault_record(s, env.ctx.id, code, addr, count)
}
