//! `page_tables`: arbitrary page-table trees in guest RAM and VRAM, then COPY and FILL through
//! them, checked against a reference walker ([`crate::refmmu`]).
//!
//! Tables come from two pools of 16 (guest RAM at [`POOL_SYS`], VRAM at [`POOL_VRAM`]); the
//! input writes entries into them and picks the root. The harness owns root entry 511: it maps
//! the ring page and an auxiliary page at [`RING_VA`] through its own tables.
//!
//! Input: `[root selector, entry count]`, then `count` entries of 9 bytes `[table, index u16,
//! flags, address selector, address u32]`, then commands of 23 bytes `[op, src mode, src u64,
//! dst mode, dst u64, len u32]` (see [`decode_entry`], [`decode_command`]).
//!
//! Invariants, per command: `vgpu::mmu::resolve` gives exactly the reference's scatter list or
//! fault (fresh TLB and a TLB kept across lookups); the device, given the command in its ring,
//! faults exactly as the reference says (code and address) or completes; a completed FILL
//! wrote the pattern, a completed COPY between non-overlapping buffers copied the bytes, a
//! faulting command wrote nothing; at the end every canary is intact.

use std::sync::Mutex;
use std::time::Instant;

use vgpu::mem::Loc::{Sys, Vram};
use vgpu::mem::{Extent, Loc};
use vgpu::mmu::{self, Root, Tlb};
use vgpu_abi::{Packet, ctx_control, ctx_status, fault, limits, packet, pte, regs};

use crate::input::Input;
use crate::refmmu::{self, Piece, RefFault, RefMem};
use crate::rig::{DMA_END, HANG_BOUND, RAM_SIZE, Rig, VRAM_SIZE};

/// Pool of tables in guest RAM.
pub const POOL_SYS: u64 = 0x10_0000;
/// Pool of tables in VRAM.
pub const POOL_VRAM: u64 = 0x8_0000;
/// Tables per pool.
pub const POOL: u64 = 16;
const H_PDPT: u64 = 0x30_0000;
const H_PD: u64 = 0x30_1000;
const H_PT: u64 = 0x30_2000;
const H_RING: u64 = 0x30_3000;
const H_AUX: u64 = 0x30_4000;
/// Where the harness maps the ring (root entry 511).
pub const RING_VA: u64 = 511 << 39;
const RING_ENTRIES: u32 = 4;
const RW: u64 = pte::PRESENT | pte::WRITABLE;

/// Decodes the root selector.
pub fn decode_root(r: u8, raw: u32) -> u64 {
    let k = u64::from(r >> 3) % POOL;
    match r % 8 {
        0..=3 => POOL_SYS,
        4 => POOL_VRAM | pte::VRAM,
        5 => POOL_SYS + k * 4096,
        6 => (POOL_VRAM + k * 4096) | pte::VRAM,
        _ => u64::from(raw) << 3,
    }
}

/// One page-table entry write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryWrite {
    /// Pool table (VRAM or RAM) and its index.
    pub vram: bool,
    /// Table number in its pool.
    pub table: u64,
    /// Entry index.
    pub index: u64,
    /// Entry value.
    pub value: u64,
}

/// Decodes one entry record.
pub fn decode_entry(inp: &mut Input<'_>) -> EntryWrite {
    let t = inp.u8();
    let idx = inp.u16();
    let flags = inp.u8();
    let sel = inp.u8();
    let a = u64::from(inp.u32());
    let (mut vram, addr) = match sel % 8 {
        0 => (false, POOL_SYS + (a % POOL) * 4096),
        1 => (true, POOL_VRAM + (a % POOL) * 4096),
        2 => (false, (a % (RAM_SIZE / 4096)) * 4096),
        3 => (true, (a % 512) * 4096),
        4 => (false, (a % 4) << 21),
        5 => (a & 1 != 0, (a % 4) << 30),
        6 => (a & 1 != 0, (a << 12) & pte::ADDR_MASK),
        _ => (false, H_PDPT + (a % 5) * 4096),
    };
    vram ^= flags & 0x04 != 0;
    let mut value = addr;
    if flags & 0x01 == 0 {
        value |= pte::PRESENT;
    }
    if flags & 0x02 == 0 {
        value |= pte::WRITABLE;
    }
    if vram {
        value |= pte::VRAM;
    }
    if flags & 0x80 != 0 {
        value |= pte::HUGE;
    }
    if flags & 0x08 != 0 {
        value |= [1 << 3, 1 << 8, 1 << 11, 1 << 52, 1 << 63][usize::from(flags >> 4 & 7) % 5];
    }
    EntryWrite {
        vram: t & 0x80 != 0,
        table: u64::from(t) % POOL,
        index: if idx & 0x8000 != 0 {
            u64::from(idx) % 512
        } else {
            u64::from(idx) % 8
        },
        value,
    }
}

/// Encodes an entry record that decodes to `(table, index)` with address selector `sel`.
pub fn encode_entry(
    vram_table: bool,
    table: u8,
    index: u16,
    flags: u8,
    sel: u8,
    a: u32,
) -> Vec<u8> {
    let mut out = vec![table | if vram_table { 0x80 } else { 0 }];
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&[flags, sel]);
    out.extend_from_slice(&a.to_le_bytes());
    out
}

/// Builds a VA from a mode and 64 bits.
pub fn decode_va(mode: u8, raw: u64) -> u64 {
    let idx = |i4: u64, i3: u64, i2: u64, i1: u64, off: u64| {
        i4 << 39 | i3 << 30 | i2 << 21 | i1 << 12 | off
    };
    match mode % 5 {
        0 => idx(
            raw & 3,
            raw >> 2 & 3,
            raw >> 4 & 3,
            raw >> 6 & 15,
            raw >> 10 & 0xfff,
        ),
        1 => raw & ((1 << 48) - 1),
        2 => raw,
        3 => RING_VA + (raw & 0x1fff),
        _ => idx(raw & 3, raw >> 2 & 3, 0, 0, raw >> 4 & ((1 << 30) - 1)),
    }
}

/// One command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmd {
    /// FILL (else COPY).
    pub fill: bool,
    /// Source VA (COPY) or the pattern in its low 32 bits (FILL).
    pub src: u64,
    /// Destination VA.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// Decodes one command record.
pub fn decode_command(inp: &mut Input<'_>) -> Cmd {
    let op = inp.u8();
    let sm = inp.u8();
    let s = inp.u64();
    let dm = inp.u8();
    let d = inp.u64();
    let l = inp.u32();
    let len = if l & 0x8000_0000 != 0 {
        u64::from(l) & 0x3f_ffff
    } else {
        u64::from(l) & 0x3fff
    };
    Cmd {
        fill: op & 1 != 0,
        src: if op & 1 != 0 {
            s & 0xffff_ffff
        } else {
            decode_va(sm, s)
        },
        dst: decode_va(dm, d),
        len,
    }
}

/// Encodes a command record.
pub fn encode_command(fill: bool, sm: u8, s: u64, dm: u8, d: u64, len: u32) -> Vec<u8> {
    let mut out = vec![u8::from(fill), sm];
    out.extend_from_slice(&s.to_le_bytes());
    out.push(dm);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out
}

fn loc(vram: bool) -> Loc {
    if vram { Vram } else { Sys }
}

fn pieces(extents: &[Extent]) -> Vec<Piece> {
    extents
        .iter()
        .map(|e| Piece {
            vram: e.loc == Vram,
            addr: e.addr,
            len: e.len,
        })
        .collect()
}

/// Compares the device's MMU with the reference for one lookup.
fn check_mmu(rig: &Rig, tlb: &mut Tlb, root: u64, va: u64, len: u64, write: bool) {
    let spaces = rig.spaces();
    let domain = [(0, DMA_END)];
    let reference = RefMem {
        sys: &rig.sys,
        domain: &domain,
        vram: rig.vram.memory(),
        vram_size: VRAM_SIZE,
    };
    let want = reference.resolve(root, va, len, write);
    for (which, t) in [("fresh", &mut Tlb::default()), ("kept", tlb)] {
        let got = mmu::resolve(&spaces, Root(root), t, va, len, write)
            .map(|sl| pieces(sl.extents()))
            .map_err(|f| (f.code, f.addr));
        assert_eq!(
            got, want,
            "MMU ({which} TLB) vs reference: root {root:#x} va {va:#x} len {len:#x} write {write}"
        );
    }
}

/// What the device must do with one command packet.
#[derive(Debug)]
enum Expect {
    Fault(RefFault),
    Done {
        src: Option<Vec<Piece>>,
        dst: Vec<Piece>,
    },
}

fn expect(r: &RefMem<'_>, root: u64, pkt_va: u64, c: &Cmd) -> Expect {
    if let Err(f) = r.resolve(root, pkt_va, packet::PACKET_SIZE, false) {
        return Expect::Fault(f);
    }
    if c.fill && !(c.dst.is_multiple_of(4) && c.len.is_multiple_of(4))
        || c.len > limits::MAX_TRANSFER
    {
        return Expect::Fault((fault::BAD_PACKET, pkt_va));
    }
    let src = if c.fill {
        None
    } else {
        match r.resolve(root, c.src, c.len, false) {
            Ok(p) => Some(p),
            Err(f) => return Expect::Fault(f),
        }
    };
    match r.resolve(root, c.dst, c.len, true) {
        Ok(dst) => Expect::Done { src, dst },
        Err(f) => Expect::Fault(f),
    }
}

fn packet_for(c: &Cmd) -> Packet {
    if c.fill {
        Packet {
            opcode: packet::OP_FILL,
            flags: 0,
            args: [c.dst, c.len, c.src, 0, 0, 0, 0],
        }
    } else {
        Packet {
            opcode: packet::OP_COPY,
            flags: 0,
            args: [c.src, c.dst, c.len, 0, 0, 0, 0],
        }
    }
}

/// Runs one command through the device; returns false when the harness's ring mapping is
/// gone (the input overwrote it), which ends the input.
fn run_command(rig: &mut Rig, root: u64, tail: &mut u32, c: &Cmd) -> bool {
    let domain = [(0, DMA_END)];
    let slot = u64::from(*tail % RING_ENTRIES);
    let pkt_va = RING_VA + slot * packet::PACKET_SIZE;
    let r = RefMem {
        sys: &rig.sys,
        domain: &domain,
        vram: rig.vram.memory(),
        vram_size: VRAM_SIZE,
    };
    // The packet must be fetched from where the harness writes it. Written first: the ring
    // page may double as a page table or a buffer of the command.
    let ring_piece = Piece {
        vram: false,
        addr: H_RING + slot * packet::PACKET_SIZE,
        len: packet::PACKET_SIZE,
    };
    rig.put_bytes(Sys, ring_piece.addr, &packet_for(c).to_bytes());
    match r.resolve(root, pkt_va, packet::PACKET_SIZE, false) {
        Ok(p) if p == [ring_piece] => {}
        _ => return false,
    }
    let want = expect(&r, root, pkt_va, c);
    let before_src = match &want {
        Expect::Done { src: Some(s), dst } if !refmmu::any_overlap(s.iter().chain(dst)) => {
            Some(r.read(s))
        }
        _ => None,
    };
    let untouched = match &want {
        Expect::Fault(_) => {
            let (prefix, _) = r.resolve_prefix(root, c.dst, c.len, true);
            let bytes = r.read(&prefix);
            Some((prefix, bytes))
        }
        _ => None,
    };
    rig.cw(0, regs::CTX_TLB_INVALIDATE, 1);
    *tail = tail.wrapping_add(1);
    rig.cw(0, regs::CTX_RING_TAIL, *tail);
    let start = Instant::now();
    let faulted = loop {
        let st = rig.cr(0, regs::CTX_STATUS);
        if st & ctx_status::FAULTED != 0 {
            break true;
        }
        if st & ctx_status::BUSY == 0 {
            break false;
        }
        assert!(start.elapsed() < HANG_BOUND, "command {c:?} hung");
        std::thread::yield_now();
    };
    let got = rig.cr(0, regs::CTX_FAULT_CODE);
    let got_addr = u64::from(rig.cr(0, regs::CTX_FAULT_ADDR_LO))
        | u64::from(rig.cr(0, regs::CTX_FAULT_ADDR_HI)) << 32;
    let r = RefMem {
        sys: &rig.sys,
        domain: &domain,
        vram: rig.vram.memory(),
        vram_size: VRAM_SIZE,
    };
    if faulted && got == fault::TIMEOUT {
        // The watchdog reset the vGPU (a slow host): nothing to compare, end the input.
        return false;
    }
    match (&want, faulted) {
        (Expect::Fault((code, addr)), true) => {
            assert_eq!(
                (got, got_addr),
                (*code, *addr),
                "fault of {c:?} (root {root:#x}): device vs reference"
            );
            if let Some((prefix, bytes)) = untouched {
                assert!(
                    r.read(&prefix) == bytes,
                    "faulting {c:?} wrote to its destination"
                );
            }
        }
        (Expect::Fault(f), false) => panic!("{c:?} completed; the reference faults with {f:?}"),
        (Expect::Done { .. }, true) => {
            panic!("{c:?} faulted with code {got} at {got_addr:#x}; the reference completes")
        }
        (Expect::Done { dst, .. }, false) => {
            let got = r.read(dst);
            if c.fill {
                let pat = (c.src as u32).to_le_bytes();
                if let Some(i) = (0..got.len()).find(|&i| got[i] != pat[i % 4]) {
                    panic!("FILL {c:?}: byte {i} is {:#x}", got[i]);
                }
            } else if let Some(src) = before_src {
                assert!(
                    got == src,
                    "COPY {c:?}: destination differs from the source"
                );
            }
        }
    }
    if faulted {
        rig.cw(0, regs::CTX_CONTROL, ctx_control::RESET);
        rig.cw(0, regs::CTX_CONTROL, ctx_control::ENABLE);
        *tail = 0;
    }
    true
}

static RIG: Mutex<Option<Rig>> = Mutex::new(None);

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut guard = RIG.lock().unwrap_or_else(|e| e.into_inner());
    let rig = guard.get_or_insert_with(Rig::new);
    rig.fresh();
    let mut inp = Input::new(data);
    let root_sel = inp.u8();
    let n = inp.u8() % 64;
    let root = decode_root(root_sel, u32::from(n).wrapping_mul(0x1357_9bdf));
    for _ in 0..n {
        let e = decode_entry(&mut inp);
        let base = if e.vram { POOL_VRAM } else { POOL_SYS };
        rig.put(loc(e.vram), base + e.table * 4096 + e.index * 8, e.value);
    }
    // The harness's ring mapping, in whichever pool table is the root.
    let root_table = root & pte::ADDR_MASK;
    let root_vram = root & pte::VRAM != 0;
    let in_pool = |base: u64| (base..base + POOL * 4096).contains(&root_table);
    if root & !(pte::ADDR_MASK | pte::VRAM) == 0
        && (root_vram && in_pool(POOL_VRAM) || !root_vram && in_pool(POOL_SYS))
    {
        rig.put(loc(root_vram), root_table + 511 * 8, H_PDPT | pte::PRESENT);
    }
    rig.put(Sys, H_PDPT, H_PD | pte::PRESENT);
    rig.put(Sys, H_PD, H_PT | pte::PRESENT);
    rig.put(Sys, H_PT, H_RING | RW);
    rig.put(Sys, H_PT + 8, H_AUX | RW);
    rig.cw(0, regs::CTX_PT_ROOT_LO, root as u32);
    rig.cw(0, regs::CTX_PT_ROOT_HI, (root >> 32) as u32);
    rig.cw(0, regs::CTX_RING_BASE_LO, RING_VA as u32);
    rig.cw(0, regs::CTX_RING_BASE_HI, (RING_VA >> 32) as u32);
    rig.cw(0, regs::CTX_RING_SIZE, RING_ENTRIES);
    rig.cw(0, regs::CTX_CONTROL, ctx_control::ENABLE);
    let mut tlb = Tlb::default();
    let mut tail = 0u32;
    let mut cmds = 0;
    while !inp.is_empty() && cmds < 16 {
        cmds += 1;
        let c = decode_command(&mut inp);
        tlb.invalidate();
        if !c.fill {
            check_mmu(rig, &mut tlb, root, c.src, c.len, false);
        }
        check_mmu(rig, &mut tlb, root, c.dst, c.len, true);
        check_mmu(rig, &mut tlb, root, c.dst, c.len, false);
        if !run_command(rig, root, &mut tail, &c) {
            break;
        }
    }
    rig.reset();
    rig.check_canaries();
}
