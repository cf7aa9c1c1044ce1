//! GPU page tables: 4 KiB pages in guest RAM and VRAM, huge pages, the TLB.

use vgpu_abi::fault;

use super::driver::{Buf, Env, Loc, PAGE, copy, fill, pattern_byte};
use super::fault_cases::expect_fault;
use super::{Outcome, Suite, bail, ensure_eq};

const PAGE_2M: u64 = 1 << 21;
const PAGE_1G: u64 = 1 << 30;

/// Check `buf[off..off + len]` against `expect`.
pub fn check(buf: &Buf, off: u64, len: u64, what: &str, expect: impl FnMut(u64) -> u8) -> Outcome {
    if let Some((at, want, got)) = buf.mismatch(off, len, expect) {
        bail!("{what}: byte {at:#x} is {got:#x}, expected {want:#x}");
    }
    Ok(())
}

/// COPY and FILL through 4 KiB mappings: scattered source and destination
/// in `data` memory, plus one page of the other memory, with the context's
/// own page tables, ring and fence in `tables`.
fn copy_fill(s: &mut Suite, tables: Loc, data: Loc) -> Outcome {
    let other = match data {
        Loc::Sys => Loc::Vram,
        Loc::Vram => Loc::Sys,
    };
    let mut env = Env::new(s, 0, tables)?;
    let (src_va, src) = env.buf(s, data, 3 * PAGE, false, true)?;
    let (dst_va, dst) = env.buf(s, data, 3 * PAGE, true, true)?;
    let (far_va, far) = env.buf(s, other, PAGE, true, false)?;
    src.fill_pattern(11);
    dst.fill(0);
    far.fill(0);
    let (from, to, len) = (100, 3000, 2 * PAGE + 500);
    env.run(
        s,
        &[
            copy(src_va + from, dst_va + to, len),
            fill(dst_va + 8, 64, 0xc0ff_ee11),
            copy(src_va + 5, far_va + 7, 1000),
        ],
    )?;
    let fill_byte = |o: u64| 0xc0ff_ee11u32.to_le_bytes()[(o % 4) as usize];
    check(&dst, 0, 3 * PAGE, "destination", |o| match o {
        8..72 => fill_byte(o),
        o if (to..to + len).contains(&o) => pattern_byte(11, o - to + from),
        _ => 0,
    })?;
    check(&far, 0, PAGE, "other-memory page", |o| match o {
        7..1007 => pattern_byte(11, o - 7 + 5),
        _ => 0,
    })
}

pub fn pt_sysmem(s: &mut Suite) -> Outcome {
    copy_fill(s, Loc::Sys, Loc::Sys)
}

pub fn pt_vram(s: &mut Suite) -> Outcome {
    copy_fill(s, Loc::Vram, Loc::Vram)
}

/// A 2 MiB leaf to `loc` memory: COPY out of its start and across its last
/// page, FILL inside it; check that nothing around changed.
fn huge_2m(s: &mut Suite, env: &mut Env, loc: Loc, va: u64) -> Outcome {
    let at = s.heap.alloc(loc, PAGE_2M, PAGE_2M)?;
    let big = Buf::new(&s.gpu, at, PAGE_2M);
    big.fill_pattern(21);
    env.space.map(&s.gpu, &mut s.heap, va, at, 2, true)?;
    let (dst_va, dst) = env.buf(s, Loc::Sys, 2 * PAGE, true, false)?;
    dst.fill(0);
    let tail = PAGE_2M - PAGE - 7;
    env.run(
        s,
        &[
            copy(va, dst_va, 64),
            copy(va + tail, dst_va + PAGE - 7, PAGE + 7),
            fill(va + 0x10_0000, PAGE, 0x2222_2222),
        ],
    )?;
    check(
        &dst,
        0,
        2 * PAGE,
        "copies out of the 2 MiB page",
        |o| match o {
            0..64 => pattern_byte(21, o),
            o if o >= PAGE - 7 => pattern_byte(21, tail + o - (PAGE - 7)),
            _ => 0,
        },
    )?;
    check(
        &big,
        0x0f_f000,
        3 * PAGE,
        "2 MiB page around the FILL",
        |o| {
            if (0x10_0000..0x10_1000).contains(&o) {
                0x22
            } else {
                pattern_byte(21, o)
            }
        },
    )
}

pub fn pt_huge_2m(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    huge_2m(s, &mut env, Loc::Sys, 0x4000_0000)?;
    huge_2m(s, &mut env, Loc::Vram, 0x4020_0000)
}

/// 1 GiB leaves. Sysmem: a leaf for guest-physical 0–1 GiB, used at buffers
/// inside RAM; with less than 1 GiB of RAM an access past the end of RAM
/// through the same leaf faults (checked per access). VRAM: a leaf for VRAM
/// offset 0; past the partition (profiles under 1 GiB) it faults.
pub fn pt_huge_1g(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let sys_va = 4 * PAGE_1G;
    let vram_va = 8 * PAGE_1G;
    env.space.map(
        &s.gpu,
        &mut s.heap,
        sys_va,
        super::driver::GpuAddr::new(Loc::Sys, 0),
        3,
        true,
    )?;
    env.space.map(
        &s.gpu,
        &mut s.heap,
        vram_va,
        super::driver::GpuAddr::new(Loc::Vram, 0),
        3,
        true,
    )?;
    // Sysmem buffers addressed through the 1 GiB leaf by their physical address.
    let src = Buf::new(&s.gpu, s.heap.alloc(Loc::Sys, PAGE, PAGE)?, PAGE);
    let out = Buf::new(&s.gpu, s.heap.alloc(Loc::Sys, PAGE, PAGE)?, PAGE);
    src.fill_pattern(31);
    out.fill(0);
    // A VRAM page near the end of the partition, through the VRAM leaf.
    let vram_off = s.gpu.vram_size.min(PAGE_1G) - PAGE;
    let vpage = Buf::new(
        &s.gpu,
        super::driver::GpuAddr::new(Loc::Vram, vram_off),
        PAGE,
    );
    vpage.fill(0);
    env.run(
        s,
        &[
            copy(sys_va + src.at.addr, sys_va + out.at.addr + 16, 1000),
            fill(vram_va + vram_off + 64, 128, 0x3333_3333),
            copy(sys_va + src.at.addr, vram_va + vram_off + 2048, 16),
        ],
    )?;
    check(
        &out,
        0,
        PAGE,
        "sysmem through the 1 GiB leaf",
        |o| match o {
            16..1016 => pattern_byte(31, o - 16),
            _ => 0,
        },
    )?;
    check(
        &vpage,
        0,
        PAGE,
        "VRAM through the 1 GiB leaf",
        |o| match o {
            64..192 => 0x33,
            2048..2064 => pattern_byte(31, o - 2048),
            _ => 0,
        },
    )?;
    let ram_end = s.ram.end().next_multiple_of(PAGE);
    if ram_end < PAGE_1G {
        let va = sys_va + ram_end;
        expect_fault(
            s,
            &mut env,
            &[copy(va, sys_va + out.at.addr, 8)],
            fault::DMA_DOMAIN,
            Some(va),
        )?;
    }
    if s.gpu.vram_size < PAGE_1G {
        let va = vram_va + s.gpu.vram_size;
        expect_fault(s, &mut env, &[fill(va, 8, 0)], fault::VRAM_RANGE, Some(va))?;
    }
    Ok(())
}

pub fn tlb_invalidate(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let (va, a) = env.buf(s, Loc::Sys, PAGE, false, false)?;
    let b = Buf::new(&s.gpu, s.heap.alloc(Loc::Sys, PAGE, PAGE)?, PAGE);
    let (dst_va, dst) = env.buf(s, Loc::Sys, 2 * PAGE, true, false)?;
    a.fill_pattern(41);
    b.fill_pattern(42);
    dst.fill(0);
    env.run(s, &[copy(va, dst_va, 256)])?;
    check(&dst, 0, 256, "copy through the first mapping", |o| {
        pattern_byte(41, o)
    })?;
    // Point the page elsewhere; after CTX_TLB_INVALIDATE the GPU must use it.
    env.space.map(&s.gpu, &mut s.heap, va, b.at, 1, false)?;
    env.invalidate_tlb(s);
    env.run(s, &[copy(va, dst_va + PAGE, 256)])?;
    check(
        &dst,
        PAGE,
        256,
        "copy after remapping and CTX_TLB_INVALIDATE",
        |o| pattern_byte(42, o - PAGE),
    )?;
    // Unmapped and invalidated: not present.
    env.space.set(&s.gpu, &mut s.heap, va, 1, 0)?;
    env.invalidate_tlb(s);
    expect_fault(
        s,
        &mut env,
        &[copy(va, dst_va, 8)],
        fault::NOT_PRESENT,
        Some(va),
    )?;
    ensure_eq!(
        dst.read_u64(0),
        u64::from_le_bytes(core::array::from_fn(|i| pattern_byte(41, i as u64))),
        "destination after the faulting copy"
    );
    Ok(())
}
