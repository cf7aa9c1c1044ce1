//! The seed corpus, written by `cargo +nightly run --manifest-path fuzz/Cargo.toml --example
//! seeds` into `fuzz/corpus/<target>/seed-<name>`. Each seed is a small, meaningful input in
//! its target's format: the fuzzer starts from real device usage instead of noise.

use vgpu_abi::{ctx_control, kernel, pci, regs};

use crate::bar0::{self, Op as B};
use crate::pcicfg::{self, Op as P};
use crate::ptables;
use crate::stream;

/// Named seeds of one target.
pub type Seeds = Vec<(&'static str, Vec<u8>)>;

fn ops<T>(list: &[T], enc: impl Fn(&T) -> [u8; 8]) -> Vec<u8> {
    list.iter().flat_map(enc).collect()
}

fn cw(ctx: u32, reg: u64, v: u32) -> B {
    B::WriteKnown(regs::ctx_reg(ctx, reg), v)
}

/// `bar0_registers` seeds.
pub fn bar0() -> Seeds {
    let enable_ring = |ctx: u32, size: u32, tail: u32| {
        vec![
            cw(ctx, regs::CTX_PT_ROOT_LO, bar0::PT_ROOT as u32),
            cw(ctx, regs::CTX_RING_BASE_LO, bar0::RING_PA as u32),
            cw(ctx, regs::CTX_RING_SIZE, size),
            cw(ctx, regs::CTX_CONTROL, ctx_control::ENABLE),
            cw(ctx, regs::CTX_RING_TAIL, tail),
        ]
    };
    let mut identity: Vec<B> = bar0::GLOBALS
        .iter()
        .filter(|&&g| g != regs::WAIT)
        .map(|&g| B::ReadKnown(g))
        .collect();
    identity.extend(
        (0..=regs::CTX_TAIL_ADDR_HI)
            .step_by(4)
            .map(|r| B::ReadKnown(regs::ctx_reg(0, r))),
    );

    let mut ring = enable_ring(0, 16, 12);
    ring.extend([
        B::ReadKnown(regs::STATUS),
        B::WriteKnown(regs::WAIT_CTX, 0),
        B::WriteKnown(regs::WAIT_VALUE, 2),
        B::ReadKnown(regs::WAIT),
        B::ReadKnown(regs::ctx_reg(0, regs::CTX_RING_HEAD)),
        B::ReadKnown(regs::ctx_reg(0, regs::CTX_FENCE_LO)),
        B::ReadKnown(regs::FAULT_CODE),
    ]);

    let mut msix = vec![B::Config(16, 2, 2, 0x8000)];
    for v in 0..4u64 {
        let e = pci::MSIX_TABLE_OFFSET + v * 16;
        msix.extend([
            B::WriteMsix(e, 0xfee0_0000),
            B::WriteMsix(e + 8, 0x40 + v as u32),
            B::WriteMsix(e + 12, 0),
        ]);
    }
    msix.extend([
        cw(0, regs::CTX_IRQ_VECTOR, 1),
        B::WriteKnown(regs::FAULT_VECTOR, 2),
    ]);
    msix.extend(enable_ring(0, 64, 40));
    msix.extend([
        B::ReadRaw(pci::MSIX_PBA_OFFSET, 4),
        B::WriteKnown(regs::INT_MASK, 0xffff_ffff),
        B::ReadKnown(regs::INT_STATUS),
        B::WriteKnown(regs::INT_STATUS, 0xffff_ffff),
        B::WriteMsix(pci::MSIX_TABLE_OFFSET + 12, 1),
        B::Config(16, 2, 2, 0xc000),
        B::ReadRaw(pci::MSIX_PBA_OFFSET, 8),
    ]);

    let mut poll = vec![cw(1, regs::CTX_TAIL_ADDR_LO, bar0::TAIL_PA as u32)];
    poll.extend(enable_ring(1, 32, 0));
    poll.extend([
        B::WriteKnown(regs::doorbell(1), 0),
        cw(
            1,
            regs::CTX_CONTROL,
            ctx_control::ENABLE | ctx_control::POLL,
        ),
        B::ReadKnown(regs::ctx_reg(1, regs::CTX_RING_TAIL)),
        cw(1, regs::CTX_TLB_INVALIDATE, 1),
        cw(1, regs::CTX_CONTROL, ctx_control::RESET),
        B::ReadKnown(regs::ctx_reg(1, regs::CTX_STATUS)),
    ]);

    let mut reset = enable_ring(2, 8, 7);
    reset.extend([
        B::WriteKnown(regs::INT_MASK, 0x1234),
        B::WriteKnown(regs::FAULT_VECTOR, 9),
        B::Reset,
        B::ReadKnown(regs::INT_MASK),
        B::WriteRaw(regs::RESET, 4, 1),
        B::ReadKnown(regs::ctx_reg(2, regs::CTX_RING_SIZE)),
    ]);

    let odd = vec![
        B::ReadRaw(regs::MAGIC, 1),
        B::ReadRaw(regs::MAGIC + 1, 2),
        B::ReadRaw(regs::VERSION, 8),
        B::ReadRaw(regs::CAPS + 2, 4),
        B::WriteRaw(regs::INT_MASK, 2, 0xffff),
        B::WriteRaw(regs::INT_MASK + 1, 4, 0xffff_ffff),
        B::ReadKnown(regs::INT_MASK),
        B::WriteRaw(pci::MSIX_TABLE_OFFSET, 8, 0xfee0_0000),
        B::ReadRaw(pci::MSIX_TABLE_OFFSET + 4, 2),
        B::ReadRaw(pci::MSIX_PBA_OFFSET + 3, 3),
        B::ReadRaw(0xfffc, 4),
        B::WriteRaw(0xffff, 1, 7),
    ];

    let vram = vec![
        B::Vram(0, 4, true, 0xdead_beef),
        B::Vram(crate::rig::VRAM_SIZE - 8, 8, true, 1),
        B::Vram(crate::rig::VRAM_SIZE - 4, 8, true, 2),
        B::Vram(0xfff0, 8, false, 0),
    ];

    // A ring base moved to the top of the address space while enabled.
    let mut top = enable_ring(3, 4, 2);
    top.extend([
        cw(3, regs::CTX_RING_BASE_HI, 0xffff_ffff),
        cw(3, regs::CTX_RING_BASE_LO, 0xffff_ffff),
        cw(3, regs::CTX_RING_SIZE, 0xffff_ffff),
        cw(3, regs::CTX_RING_TAIL, 9),
        B::ReadKnown(regs::ctx_reg(3, regs::CTX_STATUS)),
    ]);

    vec![
        ("identity", ops(&identity, bar0::encode)),
        ("ring", ops(&ring, bar0::encode)),
        ("msix", ops(&msix, bar0::encode)),
        ("poll", ops(&poll, bar0::encode)),
        ("reset", ops(&reset, bar0::encode)),
        ("odd-sizes", ops(&odd, bar0::encode)),
        ("vram-bar", ops(&vram, bar0::encode)),
        ("ring-at-top", ops(&top, bar0::encode)),
    ]
}

/// `command_stream` seeds.
pub fn command_stream() -> Seeds {
    use stream::encode as e;
    // Argument selectors: 0 = RAM VA, 2 = VRAM window, 3 = forbidden windows, 4 = 1 GiB page,
    // 5 = small length, 7 = boundary table, 8 = raw, 11 = zero.
    let (op_nop, op_copy, op_fill, op_disp, op_fence, op_ts) = (0u8, 1, 2, 3, 4, 5);
    let work = [
        e(0, op_nop, 0, &[]),
        e(0, op_copy, 0, &[(0, 0x10_0000), (2, 0x100), (5, 4000)]),
        e(0, op_fill, 0, &[(0, 0x12_0000), (5, 256), (8, 0xa5a5_a5a5)]),
        e(0, op_ts, 0, &[(0, 0x13_0000)]),
        // 0x40: the harness waits for this batch in the WAIT register.
        e(0x41, op_fence, 1, &[(0, 0x13_0100), (8, 77)]),
    ]
    .concat();
    let kernels = [
        e(
            0,
            op_disp,
            kernel::SAXPY as u8,
            &[(5, 1000), (10, 3), (0, 0x10_0000), (0, 0x11_0000)],
        ),
        e(
            0,
            op_disp,
            kernel::SGEMM as u8,
            &[
                (5, 16),
                (5, 16),
                (5, 16),
                (0, 0x10_0000),
                (0, 0x10_1000),
                (2, 0x2000),
            ],
        ),
        e(
            0,
            op_disp,
            kernel::REDUCE_SUM as u8,
            &[(5, 4000), (2, 0), (0, 0x13_0000)],
        ),
        e(
            0,
            op_disp,
            kernel::CRC32 as u8,
            &[(6, 300_000), (4, 0), (0, 0x13_0040)],
        ),
        e(1, op_disp, kernel::SPIN_US as u8, &[(5, 40), (5, 3)]),
    ]
    .concat();
    let hostile = [
        e(1, op_copy, 0, &[(3, 0), (0, 0x10_0000), (5, 64)]),
        e(1, op_copy, 0, &[(3, 2 << 20), (0, 0x10_0000), (5, 64)]),
        e(1, op_fill, 0, &[(3, 4 << 20), (5, 64), (8, 1)]),
        e(1, op_fill, 0, &[(3, 6 << 20), (5, 64), (8, 1)]),
        e(1, op_fill, 0, &[(3, 8 << 20), (5, 64), (8, 1)]),
        e(1, op_fill, 0, &[(3, 10 << 20), (5, 64), (8, 1)]),
        e(1, op_fill, 0, &[(3, 12 << 20), (5, 64), (8, 1)]),
        e(1, op_fill, 0, &[(2, 0xf_fff0), (5, 64), (8, 1)]),
        e(1, op_copy, 0, &[(4, 0), (0, 0), (7, 11)]),
        e(1, op_copy, 0, &[(7, 17), (0, 0), (5, 16)]),
        e(1, op_fill, 0, &[(7, 14), (5, 16), (8, 0)]),
        e(1, 0xf7, 0, &[]),
        e(1, op_fence, 0x80, &[(0, 0x13_0004), (8, 1)]),
    ]
    .concat();
    let two_contexts = [
        e(0x11, op_fill, 0, &[(0, 0x10_0000), (5, 4096), (8, 1)]),
        e(0x23, op_fill, 0, &[(0, 0x11_0000), (5, 4096), (8, 2)]),
        e(0x31, op_copy, 0, &[(0, 0x10_0000), (2, 0), (5, 4096)]),
        e(0x07, op_copy, 0, &[(0, 0x11_0000), (2, 0x1000), (5, 4096)]),
        e(0x0b, op_nop, 0, &[]),
    ]
    .concat();
    let own_ring = [
        e(1, op_fill, 0, &[(4, 0x8000), (5, 4096), (8, 0)]),
        e(3, op_fill, 0, &[(0, 0x9000), (5, 64), (8, 0xffff_ffff)]),
        e(0x33, op_fill, 0, &[(0, 0xa000), (5, 16), (8, 0x100)]),
    ]
    .concat();
    // The neighbour contends for the GPU around long work (preempted and resumed), stops,
    // and contends again through the final RESET.
    let contend = stream::CONTEND;
    let contended = [
        e(1, contend, 0, &[]),
        e(0, op_disp, kernel::SPIN_US as u8, &[(5, 50), (5, 16)]),
        e(
            1,
            op_fill,
            0,
            &[(0, 0x10_0000), (6, 0x30_0000), (8, 0x5a5a_5a5a)],
        ),
        e(0x03, op_copy, 0, &[(0, 0x10_0000), (2, 0), (6, 0x8_0000)]),
        e(0, contend, 0, &[]),
        e(
            1,
            op_disp,
            kernel::CRC32 as u8,
            &[(6, 300_000), (4, 0), (0, 0x13_0040)],
        ),
        e(1, contend, 0, &[]),
        e(
            1,
            op_disp,
            kernel::SGEMM as u8,
            &[
                (5, 64),
                (5, 64),
                (5, 64),
                (0, 0x10_0000),
                (0, 0x11_0000),
                (0, 0x12_0000),
            ],
        ),
    ]
    .concat();
    vec![
        ("work", work),
        ("kernels", kernels),
        ("hostile", hostile),
        ("two-contexts", two_contexts),
        ("own-ring", own_ring),
        ("contended", contended),
    ]
}

/// `page_tables` seeds.
pub fn page_tables() -> Seeds {
    use ptables::{encode_command as cmd, encode_entry as ent};
    // Compact VA (mode 0): raw = i1 << 6 | offset << 10 with i4 = i3 = i2 = 0.
    let va = |i1: u64, off: u64| i1 << 6 | off << 10;
    // A 4-level chain in RAM pool tables 0 → 1 → 2 → 3, leaves on RAM and VRAM pages.
    let chain = |vram_tables: bool| {
        let mut v = Vec::new();
        for t in 0..3u8 {
            v.extend(ent(
                vram_tables,
                t,
                0,
                0,
                if vram_tables { 1 } else { 0 },
                u32::from(t) + 1,
            ));
        }
        v.extend(ent(vram_tables, 3, 0, 0, 2, 600));
        v.extend(ent(vram_tables, 3, 1, 0, 2, 601));
        v.extend(ent(vram_tables, 3, 2, 0, 3, 5));
        v.extend(ent(vram_tables, 3, 3, 0x02, 2, 602));
        v.extend(ent(vram_tables, 3, 4, 0, 3, 300));
        v
    };
    let commands = [
        cmd(false, 0, va(0, 0x10), 0, va(1, 0x20), 0x80),
        cmd(false, 0, va(0, 0xff0), 0, va(2, 0xff8), 0x20),
        cmd(true, 0, 0x1234_5678, 0, va(1, 0), 0x1000),
        cmd(true, 0, 7, 0, va(3, 0), 16),
        cmd(false, 0, va(0, 0), 0, va(4, 0), 0x10),
    ]
    .concat();
    let mut sys = vec![0u8, 8];
    sys.extend(chain(false));
    sys.extend(&commands);
    let mut vram = vec![4u8, 8];
    vram.extend(chain(true));
    vram.extend(&commands);
    // Huge leaves: 2 MiB in level 2, 1 GiB in level 3, a misaligned one, one in level 4.
    let mut huge = vec![0u8, 6];
    huge.extend(ent(false, 0, 0, 0, 0, 1));
    huge.extend(ent(false, 1, 0, 0x80, 5, 0));
    huge.extend(ent(false, 1, 1, 0, 0, 2));
    huge.extend(ent(false, 2, 0, 0x80, 4, 1));
    huge.extend(ent(false, 2, 1, 0x80, 2, 3));
    huge.extend(ent(false, 0, 1, 0x80, 4, 0));
    huge.extend(cmd(false, 4, 0x10, 0, 1 << 4, 0x8000_0100));
    huge.extend(cmd(true, 0, 9, 4, 1 << 2 | 0x40 << 4, 0x100));
    huge.extend(cmd(false, 1, 1 << 39, 0, 2 << 4, 0x10));
    // Bad entries: reserved bits, not present, tables outside RAM/VRAM, the harness ring.
    let mut bad = vec![0u8, 7];
    bad.extend(ent(false, 0, 0, 0, 0, 1));
    bad.extend(ent(false, 1, 0, 0, 0, 2));
    bad.extend(ent(false, 2, 0, 0, 0, 3));
    bad.extend(ent(false, 3, 0, 0x08 | 0x10, 2, 700));
    bad.extend(ent(false, 3, 1, 0x01, 2, 701));
    bad.extend(ent(false, 3, 2, 0, 6, 0x00ff_ffff));
    bad.extend(ent(false, 3, 3, 0, 7, 3));
    for i in 0..4 {
        bad.extend(cmd(i % 2 == 1, 0, va(i, 0), 0, va(i, 8), 8));
    }
    bad.extend(cmd(false, 3, 0, 0, va(3, 0), 64));
    bad.extend(cmd(false, 2, u64::MAX - 8, 0, 0, 16));
    vec![
        ("sys-tables", sys),
        ("vram-tables", vram),
        ("huge", huge),
        ("bad-entries", bad),
    ]
}

/// `pci_config` seeds.
pub fn pci_config() -> Seeds {
    let conf = |slot: u32, reg: u32| P::Address(0x8000_0000 | slot << 11 | reg << 2);
    let mut enumerate = Vec::new();
    for slot in 0..4 {
        for reg in [0, 2, 3, 11, 13, 16] {
            enumerate.extend([conf(slot, reg), P::DataRead(0, 4)]);
        }
    }
    enumerate.extend([conf(1, 0), P::DataRead(2, 2), P::DataRead(3, 1)]);
    let mut bars = Vec::new();
    for reg in 4..10 {
        bars.extend([
            conf(1, reg),
            P::DataWrite(0, 4, u32::MAX),
            P::DataRead(0, 4),
        ]);
    }
    bars.extend([
        conf(1, 4),
        P::DataWrite(0, 4, 0xc010_0000),
        conf(1, 6),
        P::DataWrite(0, 4, 0),
        conf(1, 7),
        P::DataWrite(0, 4, 0x81),
        conf(1, 1),
        P::DataWrite(0, 2, 0x6),
        P::Mmio(0, regs::MAGIC, false, 0),
        P::Mmio(0, regs::INT_MASK, true, 5),
        P::Mmio(1, 0, true, 5),
        conf(1, 7),
        P::DataWrite(0, 4, 0x1_0000),
        conf(1, 4),
        P::DataWrite(0, 4, 0x1000_0000),
        conf(1, 1),
        P::DataWrite(0, 1, 0),
    ]);
    let msix = vec![
        conf(1, 16),
        P::DataRead(0, 4),
        P::DataWrite(2, 2, 0xc000),
        P::DataWrite(3, 1, 0x80),
        P::DirectWrite(16, 2, 2, 0xffff),
        P::DirectRead(16),
        P::DirectRead(17),
        P::DirectWrite(17, 0, 4, 0),
        P::DirectRead(200),
    ];
    let odd = vec![
        P::PortRaw(0, 2, true, 0x8000_0800),
        P::PortRaw(1, 1, false, 0),
        P::PortRaw(4, 3, false, 0),
        P::PortRaw(5, 2, false, 0),
        P::PortRaw(8, 4, true, 1),
        P::PortRaw(0, 8, true, 0),
        P::Address(0x8001_0800),
        P::DataRead(0, 4),
        P::Address(0x8000_0900),
        P::DataWrite(0, 4, 0),
        P::Address(0x0000_0800),
        P::DataRead(0, 4),
    ];
    vec![
        ("enumerate", ops(&enumerate, pcicfg::encode)),
        ("bars", ops(&bars, pcicfg::encode)),
        ("msix", ops(&msix, pcicfg::encode)),
        ("odd-ports", ops(&odd, pcicfg::encode)),
    ]
}

/// `vfio_user_messages` seeds: what a real client sends (see `vfu::decode` for the format).
pub fn vfio_user() -> Seeds {
    // Field encoders of `vfu::decode`: an exact small value (`addr` selector 1), a region
    // access, and the ops.
    fn small(o: &mut Vec<u8>, v: u32) {
        o.push(1);
        o.extend_from_slice(&v.to_le_bytes());
    }
    fn access(o: &mut Vec<u8>, write: bool, region: u8, offset: u32, data: &[u8]) {
        o.push(if write { 8 } else { 7 });
        small(o, offset);
        o.push(region);
        o.extend_from_slice(&(data.len() as u32).to_le_bytes());
        if write {
            o.extend_from_slice(data);
        }
    }
    // Migration v2: `DEVICE_FEATURE` (op 11) with a feature selector (0 MIGRATION,
    // 1 MIG_DEVICE_STATE, 2 DMA_LOGGING_START, 3 DMA_LOGGING_STOP, 4 DMA_LOGGING_REPORT),
    // direction bits and the natural `argsz`, then the feature's fields; `MIG_DATA_READ`
    // (op 12) likewise.
    const GET: u8 = 1;
    const SET: u8 = 2;
    const PROBE: u8 = 4;
    // Device states by their selector in `vfu::device_feature`.
    const STOP: u8 = 0;
    const RUNNING: u8 = 1;
    const STOP_COPY: u8 = 2;
    const RESUMING: u8 = 3;
    const PRE_COPY: u8 = 4;
    fn feature(o: &mut Vec<u8>, which: u8, dir: u8) {
        o.extend_from_slice(&[11, which, dir, 0]);
    }
    fn set_state(o: &mut Vec<u8>, state: u8) {
        feature(o, 1, SET);
        o.push(state);
    }
    fn get_state(o: &mut Vec<u8>) {
        feature(o, 1, GET);
        o.push(0);
    }
    fn report(o: &mut Vec<u8>, iova: u32, length: u32) {
        feature(o, 4, GET);
        small(o, iova);
        small(o, length);
        small(o, 4096);
    }
    fn mig_read(o: &mut Vec<u8>, size: u32) {
        o.extend_from_slice(&[12, 0]);
        o.extend_from_slice(&size.to_le_bytes());
    }
    let mut hello = Vec::new();
    hello.extend_from_slice(&[0, 0, 1]); // version, valid capabilities
    hello.push(3); // device info
    for i in 0..10 {
        hello.extend_from_slice(&[4, 0x20, 0, 0, 0, i]); // region info, argsz 32
    }
    for i in 0..6 {
        hello.extend_from_slice(&[5, i]); // IRQ info
    }
    let mut session = hello.clone();
    // DMA map 1 MiB of a memfd at 0.
    session.extend_from_slice(&[1, 16, 1, 3, 0, 0, 0]);
    small(&mut session, 0);
    small(&mut session, 0);
    small(&mut session, 1 << 20);
    // MSI-X routes and doorbells.
    session.extend_from_slice(&[6, 2, 0x24, 0, 0, 0, 0, 16, 16, 1]);
    session.extend_from_slice(&[6, 5, 0x24, 0, 0, 0, 0, 4, 4, 1]);
    access(&mut session, false, 7, 0, &[0; 64]);
    access(&mut session, true, 7, 4, &6u16.to_le_bytes());
    access(&mut session, false, 0, regs::MAGIC as u32, &[0; 4]);
    // Context 0: page-table root, ring, enable; doorbell; WAIT.
    for (reg, v) in [
        (regs::CTX_PT_ROOT_LO, 0x1000u32),
        (regs::CTX_RING_BASE_LO, 0x8000),
        (regs::CTX_RING_SIZE, 16),
        (regs::CTX_CONTROL, ctx_control::ENABLE),
    ] {
        access(
            &mut session,
            true,
            0,
            regs::ctx_reg(0, reg) as u32,
            &v.to_le_bytes(),
        );
    }
    access(
        &mut session,
        true,
        0,
        regs::doorbell(0) as u32,
        &1u32.to_le_bytes(),
    );
    access(&mut session, false, 2, 0x100, &[0; 256]);
    access(&mut session, true, 2, 0x100, &[0x77; 256]);
    session.push(9); // reset
    session.extend_from_slice(&[2, 0, 0, 0, 0]); // unmap
    small(&mut session, 0);
    small(&mut session, 1 << 20);
    let mut hostile = hello.clone();
    hostile.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0]); // DMA map with an eventfd
    small(&mut hostile, 0);
    small(&mut hostile, 0);
    small(&mut hostile, 1 << 20);
    hostile.extend_from_slice(&[6, 2, 0x24, 0, 0, 0, 15, 16, 16, 0]); // routes past the end
    hostile.extend_from_slice(&[0, 1, 0, 0, 0, 0]); // version without its NUL
    // Work images (guest memory with a ready command stream, started by the harness): one
    // unmapped while its commands run, one reset, one left mapped at the disconnect.
    let mut work = hello.clone();
    for iova in [0x20_0000u32, 0x40_0000, 0x60_0000] {
        work.extend_from_slice(&[1, 0, 4]);
        work.extend_from_slice(&iova.to_le_bytes());
    }
    access(&mut work, false, 0, regs::MAGIC as u32, &[0; 4]);
    work.extend_from_slice(&[2, 0, 0, 0, 0]); // unmap the first
    small(&mut work, 0x20_0000);
    small(&mut work, 0x1_0000);
    work.push(9); // reset
    work.extend_from_slice(&[2, 0, 0, 0, 0]); // unmap the second
    small(&mut work, 0x40_0000);
    small(&mut work, 0x1_0000);
    // Migration v2, the source's side: a work image running, its pages logged, pre-copy
    // reads while it runs, a report, the stop and the rest of the stream (to its end), then
    // the source resumes.
    let mut source = hello.clone();
    feature(&mut source, 0, GET | PROBE); // does it migrate?
    feature(&mut source, 0, GET);
    source.extend_from_slice(&[1, 0, 4]); // a work image at 2 MiB, started by the harness
    source.extend_from_slice(&0x20_0000u32.to_le_bytes());
    feature(&mut source, 2, SET); // DMA_LOGGING_START, 4 KiB pages, over the work image
    small(&mut source, 4096);
    source.push(1);
    small(&mut source, 0x20_0000);
    small(&mut source, 0x1_0000);
    set_state(&mut source, PRE_COPY);
    for _ in 0..4 {
        mig_read(&mut source, 64 << 10);
    }
    get_state(&mut source);
    report(&mut source, 0x20_0000, 0x1_0000);
    set_state(&mut source, STOP_COPY);
    // 1 MiB of VRAM and the vGPU's state: the last reads come back short, then empty.
    for _ in 0..16 {
        mig_read(&mut source, 64 << 10);
    }
    report(&mut source, 0x20_0000, 0x1_0000);
    set_state(&mut source, STOP);
    feature(&mut source, 3, SET); // DMA_LOGGING_STOP
    set_state(&mut source, RUNNING);
    access(&mut source, false, 0, regs::MAGIC as u32, &[0; 4]);
    // The destination's side, given garbage: RESUMING takes it, or refuses it, and leaving
    // RESUMING fails (ERROR) until a reset.
    let mut destination = hello.clone();
    set_state(&mut destination, RESUMING);
    get_state(&mut destination);
    let garbage: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
    destination.extend_from_slice(&[13, 0]); // MIG_DATA_WRITE
    destination.extend_from_slice(&(garbage.len() as u32).to_le_bytes());
    destination.extend_from_slice(&garbage);
    set_state(&mut destination, STOP);
    get_state(&mut destination);
    destination.push(9); // reset
    get_state(&mut destination);
    access(&mut destination, false, 0, regs::MAGIC as u32, &[0; 4]);
    vec![
        ("hello", hello),
        ("session", session),
        ("hostile", hostile),
        ("work", work),
        ("unknown-commands", vec![10, 0, 10, 1, 10, 3, 10, 6]),
        ("migration-source", source),
        ("migration-destination", destination),
    ]
}

/// Every target's seeds.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("bar0_registers", bar0()),
        ("command_stream", command_stream()),
        ("page_tables", page_tables()),
        ("pci_config", pci_config()),
        ("vfio_user_messages", vfio_user()),
        ("session_messages", session()),
    ]
}

/// `session_messages` seeds (the format of `sess::decode`).
pub fn session() -> Seeds {
    // `small`: selector 1, a u16 times 4.
    fn small(o: &mut Vec<u8>, v: u16) {
        o.push(1);
        o.extend_from_slice(&v.to_le_bytes());
    }
    // A buffer (1..=7) and an offset.
    fn at(o: &mut Vec<u8>, buffer: u8, offset: u16) {
        o.push(buffer);
        small(o, offset);
    }
    let mut work = vec![1]; // Hello
    work.push(1); // CreateContext: context 0
    work.push(2); // AllocVram 16 KiB: buffer 1
    small(&mut work, 4096);
    work.push(3); // MapMemory of a sealed 64 KiB memfd: buffer 2
    small(&mut work, 16384);
    work.extend_from_slice(&[1, 2]);
    work.push(5); // Write 64 bytes at buffer 1 + 0
    at(&mut work, 1, 0);
    work.extend_from_slice(&64u16.to_le_bytes());
    work.extend_from_slice(&[7; 64]);
    work.extend_from_slice(&[7, 3]); // Submit three commands
    work.push(0); // Copy 64 bytes from buffer 1 to buffer 2
    at(&mut work, 1, 0);
    at(&mut work, 2, 0);
    small(&mut work, 16);
    work.push(1); // Fill 1 KiB of buffer 2 at 4 KiB
    at(&mut work, 2, 1024);
    small(&mut work, 256);
    work.extend_from_slice(&0x0102_0304u32.to_le_bytes());
    work.push(2); // Saxpy of 256 elements in buffer 2
    small(&mut work, 64);
    work.extend_from_slice(&2.0f32.to_bits().to_le_bytes());
    at(&mut work, 2, 0);
    at(&mut work, 2, 2048);
    work.push(0); // on context 0
    work.extend_from_slice(&[10, 0, 1]); // Wait for fence 1 of context 0, 20 ms
    work.extend_from_slice(&20u32.to_le_bytes());
    work.extend_from_slice(&[6]); // Read 64 bytes of buffer 2
    at(&mut work, 2, 0);
    small(&mut work, 16);
    let mut bad = vec![1, 1];
    bad.extend_from_slice(&[7, 1, 1]); // Submit a Fill misaligned for the device
    at(&mut bad, 7, 1);
    small(&mut bad, 1);
    bad.extend_from_slice(&[0, 0, 0, 0, 0]);
    bad.extend_from_slice(&[12, 5, 0xff, 0xee, 0xdd, 0xcc, 0xbb]); // no request
    let mut cut = vec![1, 14, 3];
    at(&mut cut, 1, 0);
    cut.push(9);
    vec![("work", work), ("refusals", bad), ("cut", cut)]
}
