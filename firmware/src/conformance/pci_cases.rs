//! PCI identity, BARs, the VRAM aperture and the register file.

use vgpu_abi::{caps, kernel, limits, pci as abi_pci, regs, status};

use super::driver::{Buf, GpuAddr, Loc, PAGE, pattern_byte};
use super::{Outcome, Suite, bail, ensure, ensure_eq, size_bar};
use crate::pci::{self, Bdf};

/// The 32-bit PCI window of Tessera's platform.
const PCI_WINDOW_32: (u64, u64) = (0xc000_0000, 0xfec0_0000);

pub fn ids(s: &mut Suite) -> Outcome {
    let g = &s.gpu;
    let id = g.bdf.read_u32(pci::REG_ID);
    ensure_eq!(id & 0xffff, u32::from(abi_pci::VENDOR_ID), "vendor id");
    ensure_eq!(id >> 16, u32::from(abi_pci::DEVICE_ID), "device id");
    let class = g.bdf.read_u32(pci::REG_CLASS);
    let code = u32::from(abi_pci::CLASS) << 16
        | u32::from(abi_pci::SUBCLASS) << 8
        | u32::from(abi_pci::PROG_IF);
    ensure_eq!(class >> 8, code, "class code");
    ensure_eq!(class & 0xff, u32::from(abi_pci::REVISION), "revision id");
    let sub = g.bdf.read_u32(pci::REG_SUBSYSTEM);
    ensure_eq!(
        sub & 0xffff,
        u32::from(abi_pci::SUBSYSTEM_VENDOR_ID),
        "subsystem vendor id"
    );
    ensure_eq!(g.rd(regs::MAGIC), regs::MAGIC_VALUE, "MAGIC");
    let version = g.rd(regs::VERSION);
    ensure!(
        version >> 16 == u32::from(vgpu_abi::VERSION_MAJOR),
        "VERSION {version:#x}: major {} is not {}, a driver must refuse this device",
        version >> 16,
        vgpu_abi::VERSION_MAJOR
    );
    let need = caps::HUGE_PAGES | caps::SYSMEM | caps::TIMESTAMPS | caps::WAIT | caps::TAIL_SHADOW;
    ensure_eq!(g.rd(regs::CAPS) & need, need, "CAPS (required bits)");
    let n = g.rd(regs::NUM_CONTEXTS);
    ensure!(
        (2..=limits::MAX_CONTEXTS).contains(&n),
        "NUM_CONTEXTS {n} not in 2..={}",
        limits::MAX_CONTEXTS
    );
    let vram = g.rd64(regs::VRAM_SIZE_LO);
    ensure!(
        vram >= PAGE && vram.is_multiple_of(PAGE),
        "VRAM_SIZE {vram:#x} is not a positive multiple of 4 KiB"
    );
    ensure_eq!(
        g.bar2_size,
        vram.next_power_of_two(),
        "BAR2 size (sizing) vs VRAM_SIZE {vram:#x} rounded up to a power of two"
    );
    ensure_eq!(g.rd(regs::KERNELS) & kernel::ALL, kernel::ALL, "KERNELS");
    let ring = g.rd(regs::MAX_RING_ENTRIES);
    ensure!(
        ring.is_power_of_two() && (64..=limits::MAX_RING_ENTRIES).contains(&ring),
        "MAX_RING_ENTRIES {ring} is not a power of two in 64..={}",
        limits::MAX_RING_ENTRIES
    );
    let st = g.rd(regs::STATUS);
    ensure_eq!(
        st,
        status::READY,
        "STATUS at power-on (READY, nothing faulted)"
    );
    ensure_eq!(g.rd(regs::INT_STATUS), 0, "INT_STATUS at power-on");
    ensure_eq!(g.rd(regs::FAULT_CODE), 0, "FAULT_CODE at power-on");
    ensure_eq!(g.rd(regs::FAULT_COUNT), 0, "FAULT_COUNT at power-on");
    Ok(())
}

pub fn bar_sizing(s: &mut Suite) -> Outcome {
    let g = &s.gpu;
    let bdf = g.bdf;
    let marker = Buf::new(g, GpuAddr::new(Loc::Vram, 0x40), 8);
    marker.write_u64(0, 0x5a5a_0000_1234_5678);

    let (a0, size0, flags0) = size_bar(bdf, abi_pci::BAR_REGS as u8);
    ensure_eq!(a0, g.bar0, "BAR0 address after sizing");
    ensure_eq!(size0, abi_pci::BAR_REGS_SIZE, "BAR0 size");
    ensure_eq!(flags0, 0, "BAR0 low bits (32-bit non-prefetchable memory)");

    let (a2, size2, flags2) = size_bar(bdf, abi_pci::BAR_VRAM as u8);
    ensure_eq!(a2, g.bar2, "BAR2 address after sizing");
    ensure_eq!(size2, g.bar2_size, "BAR2 size");
    ensure_eq!(
        flags2 & (pci::BAR_IO | pci::BAR_TYPE_MASK),
        pci::BAR_TYPE_64,
        "BAR2 type bits (64-bit memory)"
    );
    ensure!(
        flags2 & pci::BAR_PREFETCHABLE != 0,
        "BAR2 is not prefetchable (low bits {flags2:#x})"
    );
    for bar in [1u8, 4, 5] {
        let (_, size, _) = size_bar(bdf, bar);
        ensure_eq!(size, 0, "BAR{bar} size (not implemented)");
    }

    // With memory decode off neither BAR answers: reads come back all ones.
    if !s.vmm_owned("BAR reads with memory decode off") {
        let g = &s.gpu;
        let cmd = bdf.command();
        bdf.set_command(cmd & !pci::COMMAND_MEMORY);
        let magic_off = g.rd(regs::MAGIC);
        let vram_off = marker.read_u64(0);
        bdf.set_command(cmd);
        ensure_eq!(magic_off, u32::MAX, "MAGIC with memory decode off");
        ensure_eq!(vram_off, u64::MAX, "VRAM with memory decode off");
    }
    let g = &s.gpu;

    ensure_eq!(g.rd(regs::MAGIC), regs::MAGIC_VALUE, "MAGIC after sizing");
    ensure_eq!(
        marker.read_u64(0),
        0x5a5a_0000_1234_5678,
        "VRAM marker after sizing"
    );
    Ok(())
}

pub fn vram_aperture(s: &mut Suite) -> Outcome {
    let g = &s.gpu;
    let size = g.vram_size;
    for (n, off) in [0, (size / 2) & !(PAGE - 1), size - PAGE]
        .into_iter()
        .enumerate()
    {
        let page = Buf::new(g, GpuAddr::new(Loc::Vram, off), PAGE);
        page.fill_pattern(n as u32 + 1);
        // Unaligned and sub-word stores work like RAM.
        page.write(0x101, &[0xa1, 0xa2, 0xa3]);
        page.write_u64(0xffb - 0xb, 0x0102_0304_0506_0708);
        let expect = |o: u64| match o {
            0x101..=0x103 => 0xa0 + (o - 0x100) as u8,
            0xff0..=0xff7 => (8 - (o - 0xff0)) as u8,
            _ => pattern_byte(n as u32 + 1, o),
        };
        if let Some((at, want, got)) = page.mismatch(0, PAGE, expect) {
            bail!(
                "VRAM offset {:#x}: expected {want:#x}, read {got:#x}",
                off + at
            );
        }
    }
    // A device that says its aperture traps (a GPU whose VRAM the host cannot
    // map) only has to read and write correctly, as above.
    if g.rd(regs::CAPS) & caps::VRAM_TRAPPED != 0 {
        return Ok(());
    }
    // The aperture is mapped memory, not a trapped BAR: 1 MiB of stores and
    // loads take well under the ~28 s that 262144 trapped accesses would.
    let len = (1u64 << 20).min(size);
    let block = Buf::new(g, GpuAddr::new(Loc::Vram, 0), len);
    let t0 = g.timestamp();
    block.fill_pattern(7);
    let bad = block.mismatch(0, len, |o| pattern_byte(7, o));
    let ms = (g.timestamp() - t0) / 1_000_000;
    if let Some((at, want, got)) = bad {
        bail!("VRAM offset {at:#x}: expected {want:#x}, read {got:#x}");
    }
    ensure!(
        ms < 1000,
        "writing and checking 1 MiB of VRAM took {ms} ms: the aperture traps"
    );
    Ok(())
}

/// Program BAR2 at `addr` with memory decode off around the update.
fn program_bar2(bdf: Bdf, addr: u64) {
    let reg = pci::REG_BAR0 + 4 * abi_pci::BAR_VRAM as u8;
    let cmd = bdf.command();
    bdf.set_command(cmd & !pci::COMMAND_MEMORY);
    bdf.write_u32(reg, addr as u32);
    bdf.write_u32(reg + 4, (addr >> 32) as u32);
    bdf.set_command(cmd);
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b + b_len && b < a + a_len
}

/// Where to move BAR2: a free naturally aligned slot in the 32-bit window if
/// it fits there, else the next slot above its current place.
fn bar2_target(s: &Suite) -> u64 {
    let (cur, size, bar0) = (s.gpu.bar2, s.gpu.bar2_size, s.gpu.bar0);
    // Above 4 GiB: stay there (some VMMs keep 64-bit BARs in their 64-bit window), one slot
    // down unless that leaves it.
    if cur >= 1 << 32 {
        return if cur - size >= 1 << 32 {
            cur - size
        } else {
            cur + size
        };
    }
    let mut a = PCI_WINDOW_32.0.next_multiple_of(size);
    while a + size <= PCI_WINDOW_32.1 {
        if !overlaps(a, size, bar0, abi_pci::BAR_REGS_SIZE) && !overlaps(a, size, cur, size) {
            return a;
        }
        a += size;
    }
    cur + size
}

pub fn bar_move(s: &mut Suite) -> Outcome {
    let old = s.gpu.bar2;
    let target = bar2_target(s);
    if target >= crate::io::MAPPED_LIMIT {
        let sys = &mut s.heap.sys;
        let mut alloc_page = || sys.alloc(PAGE, PAGE);
        if let Err(e) = crate::pages::map_identity(target, s.gpu.bar2_size, &mut alloc_page) {
            bail!("cannot map {target:#x} for BAR2: {e}");
        }
        // The page-table pages stay in use: never give them back.
        s.heap_base.0 = s.heap.sys.mark();
    }
    let result = bar_move_to(s, target);
    // Whatever happened, put BAR2 back where it was.
    program_bar2(s.gpu.bdf, old);
    s.gpu.bar2 = old;
    result?;
    let last = s.gpu.vram_size - 8;
    let m = Buf::new(&s.gpu, GpuAddr::new(Loc::Vram, 0), s.gpu.vram_size);
    ensure_eq!(
        m.read_u64(0),
        0x1111_2222_3333_4444,
        "VRAM offset 0 back at {old:#x}"
    );
    ensure_eq!(
        m.read_u64(8),
        0x5555_6666_7777_8888,
        "VRAM offset 8 (written at {target:#x}) back at {old:#x}"
    );
    ensure_eq!(
        m.read_u64(last),
        0x9999_aaaa_bbbb_cccc,
        "last VRAM qword back at {old:#x}"
    );
    Ok(())
}

fn bar_move_to(s: &mut Suite, target: u64) -> Outcome {
    let old = s.gpu.bar2;
    let last = s.gpu.vram_size - 8;
    let m = Buf::new(&s.gpu, GpuAddr::new(Loc::Vram, 0), s.gpu.vram_size);
    m.write_u64(0, 0x1111_2222_3333_4444);
    m.write_u64(last, 0x9999_aaaa_bbbb_cccc);

    program_bar2(s.gpu.bdf, target);
    let (addr, _, _) = size_bar(s.gpu.bdf, abi_pci::BAR_VRAM as u8);
    ensure_eq!(addr, target, "BAR2 address after moving it");
    s.gpu.bar2 = target;
    ensure_eq!(
        s.gpu.rd(regs::MAGIC),
        regs::MAGIC_VALUE,
        "MAGIC after moving BAR2"
    );
    let m = Buf::new(&s.gpu, GpuAddr::new(Loc::Vram, 0), s.gpu.vram_size);
    ensure_eq!(
        m.read_u64(0),
        0x1111_2222_3333_4444,
        "VRAM offset 0 at new address {target:#x}"
    );
    ensure_eq!(
        m.read_u64(last),
        0x9999_aaaa_bbbb_cccc,
        "last VRAM qword at new address {target:#x}"
    );
    m.write_u64(8, 0x5555_6666_7777_8888);
    // The old address no longer decodes.
    let stale = Buf::new(&s.gpu, GpuAddr::new(Loc::Sys, old), 8);
    ensure_eq!(
        stale.read_u64(0),
        u64::MAX,
        "old BAR2 address {old:#x} after the move"
    );
    Ok(())
}

pub fn registers(s: &mut Suite) -> Outcome {
    let g = &s.gpu;
    let read_only = [
        regs::MAGIC,
        regs::VERSION,
        regs::CAPS,
        regs::NUM_CONTEXTS,
        regs::VRAM_SIZE_LO,
        regs::VRAM_SIZE_HI,
        regs::KERNELS,
        regs::MAX_RING_ENTRIES,
        regs::STATUS,
        regs::FAULT_ADDR_LO,
        regs::FAULT_ADDR_HI,
        regs::FAULT_CTX,
        regs::FAULT_CODE,
        regs::FAULT_COUNT,
    ];
    for r in read_only {
        let before = g.rd(r);
        g.wr(r, !before);
        ensure_eq!(
            g.rd(r),
            before,
            "register {r:#x} after writing {:#x}",
            !before
        );
    }
    let ctx_read_only = [
        regs::CTX_STATUS,
        regs::CTX_RING_HEAD,
        regs::CTX_FENCE_LO,
        regs::CTX_FENCE_HI,
        regs::CTX_FAULT_CODE,
        regs::CTX_FAULT_ADDR_LO,
        regs::CTX_FAULT_ADDR_HI,
    ];
    for r in ctx_read_only {
        let before = g.ctx_rd(1, r);
        g.ctx_wr(1, r, !before);
        ensure_eq!(
            g.ctx_rd(1, r),
            before,
            "ctx 1 register {r:#x} after writing {:#x}",
            !before
        );
    }

    let defined = vgpu_abi::int::FAULT | ((1u32 << g.num_ctx) - 1) << 16;
    for v in [defined, defined & 0x5555_5555, defined & 0xaaaa_aaaa, 0] {
        g.wr(regs::INT_MASK, v);
        ensure_eq!(
            g.rd(regs::INT_MASK) & defined,
            v,
            "INT_MASK after writing {v:#x}"
        );
    }
    let read_write = [
        (regs::FAULT_VECTOR, 0xf),
        (regs::WAIT_CTX, 0xf),
        (regs::WAIT_VALUE, u32::MAX),
    ];
    for (r, mask) in read_write {
        let before = g.rd(r);
        for v in [0x5a5a_5a5a & mask, 0xa5a5_a5a5 & mask] {
            g.wr(r, v);
            ensure_eq!(g.rd(r), v, "register {r:#x} after writing {v:#x}");
        }
        g.wr(r, before);
    }
    let ctx_read_write = [
        (regs::CTX_PT_ROOT_LO, 0xffff_f004u32),
        (regs::CTX_PT_ROOT_HI, 0x000f_ffff),
        (regs::CTX_RING_BASE_LO, 0xffff_f000),
        (regs::CTX_RING_BASE_HI, 0x0000_ffff),
        (regs::CTX_RING_SIZE, 0x0000_1000),
        (regs::CTX_IRQ_VECTOR, 0xf),
        (regs::CTX_TAIL_ADDR_LO, 0xffff_fffc),
        (regs::CTX_TAIL_ADDR_HI, 0x0000_ffff),
    ];
    for (r, v) in ctx_read_write {
        g.ctx_wr(1, r, v);
        ensure_eq!(
            g.ctx_rd(1, r),
            v,
            "ctx 1 register {r:#x} after writing {v:#x}"
        );
        g.ctx_wr(1, r, 0);
    }

    // Offsets that name no register read 0 and ignore writes.
    let unknown = [
        0x05c,
        0x060,
        0x100,
        0xffc,
        regs::ctx_reg(0, 0x48),
        regs::ctx_reg(0, 0x7c),
        regs::ctx_reg(limits::MAX_CONTEXTS, 0),
        0x3ffc,
        abi_pci::MSIX_PBA_OFFSET + 0x800,
        0x8000,
        abi_pci::BAR_REGS_SIZE - 4,
    ];
    for r in unknown {
        ensure_eq!(g.rd(r), 0, "unknown offset {r:#x}");
        g.wr(r, 0xdead_beef);
        ensure_eq!(g.rd(r), 0, "unknown offset {r:#x} after a write");
    }
    if g.num_ctx < limits::MAX_CONTEXTS {
        let r = regs::ctx_reg(g.num_ctx, regs::CTX_RING_SIZE);
        g.wr(r, 8);
        ensure_eq!(g.rd(r), 0, "register of absent context {}", g.num_ctx);
    }
    // A RESET write of any other value does nothing.
    let marker = Buf::new(g, GpuAddr::new(Loc::Vram, PAGE), 8);
    marker.write_u64(0, 0x0bad_cafe);
    g.wr(regs::RESET, regs::RESET_VALUE ^ 1);
    ensure_eq!(
        marker.read_u64(0),
        0x0bad_cafe,
        "VRAM after writing a wrong RESET value"
    );
    ensure_eq!(g.rd(regs::RESET), 0, "RESET read");
    Ok(())
}
