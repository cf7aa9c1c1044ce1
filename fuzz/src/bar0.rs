//! `bar0_registers`: sequences of BAR 0 (and BAR 2) accesses against one vGPU.
//!
//! Input: records of 8 bytes `[kind, a, b, c, v0, v1, v2, v3]` (see [`Op`]). Guest RAM holds
//! identity page tables and a ring full of harmless packets, so enabling a context through the
//! registers runs real work.
//!
//! Invariants: no panic; identity registers never change; plain-storage registers (interrupt
//! mask, vectors, wait registers, page-table roots, ring bases and sizes, tail addresses, the
//! MSI-X table) read back exactly what the model says; status and fault codes are in range;
//! non-dword register reads return zeros; after every RESET all observable registers read
//! their power-on values and VRAM is zero; the canaries are intact at the end.

use std::sync::Mutex;

use devices::pci::PciDeviceSync;
use vgpu_abi::{Packet, ctx_control, kernel, packet, pci, pte, regs, status, wait};

use crate::input::Input;
use crate::rig::{self, CONTEXTS, Rig, VRAM_SIZE};

/// Page-table root prepared in guest RAM (identity map of RAM, VRAM at 1 GiB).
pub const PT_ROOT: u64 = 0x1000;
/// A ring of `limits::MAX_RING_ENTRIES` prepared packets.
pub const RING_PA: u64 = 0x10_0000;
/// Where the prepared fences write.
pub const FENCE_PA: u64 = 0x18_0000;
/// A tail shadow holding 16.
pub const TAIL_PA: u64 = 0x18_1000;

/// Global registers, in the order `Op::Known` indexes them.
pub const GLOBALS: [u64; 22] = [
    regs::MAGIC,
    regs::VERSION,
    regs::CAPS,
    regs::NUM_CONTEXTS,
    regs::VRAM_SIZE_LO,
    regs::VRAM_SIZE_HI,
    regs::KERNELS,
    regs::MAX_RING_ENTRIES,
    regs::STATUS,
    regs::INT_STATUS,
    regs::INT_MASK,
    regs::FAULT_ADDR_LO,
    regs::FAULT_ADDR_HI,
    regs::FAULT_CTX,
    regs::FAULT_CODE,
    regs::FAULT_COUNT,
    regs::FAULT_VECTOR,
    regs::TIMESTAMP_LO,
    regs::TIMESTAMP_HI,
    regs::WAIT_CTX,
    regs::WAIT_VALUE,
    regs::WAIT,
];

/// Values a register write picks from when `c & 0x80`.
pub const INTERESTING: [u32; 30] = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    64,
    0x1000,
    0x1001,
    0x4000,
    RING_PA as u32,
    PT_ROOT as u32,
    TAIL_PA as u32,
    FENCE_PA as u32,
    0x8000_0000,
    0xffff_ffff,
    0xffff_f000,
    regs::RESET_VALUE,
    ctx_control::ENABLE,
    ctx_control::ENABLE | ctx_control::POLL,
    ctx_control::RESET,
    4096,
    4097,
    0xfee0_0000,
    regs::MAGIC_VALUE,
    0x10_0000,
    0xffff_fffc,
    0x7fff_ffff,
];

/// Access sizes raw accesses pick from.
pub const SIZES: [usize; 8] = [1, 2, 4, 4, 8, 3, 4, 0];

/// One decoded access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A 32-bit write to a named register.
    WriteKnown(u64, u32),
    /// A 32-bit read of a named register.
    ReadKnown(u64),
    /// A write of any size at any BAR 0 offset.
    WriteRaw(u64, usize, u32),
    /// A read of any size at any BAR 0 offset.
    ReadRaw(u64, usize),
    /// A write to an MSI-X table dword.
    WriteMsix(u64, u32),
    /// A configuration-space write (`reg`, byte offset, size, value).
    Config(usize, u64, usize, u32),
    /// Function-level reset.
    Reset,
    /// A BAR 2 (trapped VRAM aperture) access: offset, size, write?
    Vram(u64, usize, bool, u32),
}

fn known(a: u8, b: u8) -> u64 {
    let ctx = u32::from(b) % (CONTEXTS + 1);
    match a % 48 {
        s @ 0..22 => GLOBALS[usize::from(s)],
        s @ 22..40 => regs::ctx_reg(ctx, u64::from(s - 22) * 4),
        40..44 => regs::doorbell(ctx),
        s => pci::MSIX_TABLE_OFFSET + u64::from(b % 17) * 16 + u64::from(s - 44) * 4,
    }
}

/// Decodes one record.
pub fn decode(inp: &mut Input<'_>) -> Op {
    let (kind, a, b, c) = (inp.u8(), inp.u8(), inp.u8(), inp.u8());
    let raw = inp.u32();
    let value = if c & 0x80 != 0 {
        INTERESTING[raw as usize % INTERESTING.len()]
    } else {
        raw
    };
    let off16 = u64::from(u16::from_le_bytes([a, b]));
    let size = SIZES[usize::from(c & 7)];
    match kind % 8 {
        0 => Op::WriteKnown(known(a, b), value),
        1 => Op::ReadKnown(known(a, b)),
        2 => Op::WriteRaw(off16, size, value),
        3 => Op::ReadRaw(off16, size),
        4 => Op::WriteMsix(
            pci::MSIX_TABLE_OFFSET + u64::from(a % 17) * 16 + u64::from(b % 4) * 4,
            value,
        ),
        5 => Op::Config(
            usize::from(a % 64),
            u64::from(b % 4),
            [1, 2, 4][usize::from(c % 3)],
            value,
        ),
        6 => Op::Reset,
        _ => {
            let offset = match raw >> 30 {
                0 => off16 << 4,
                1 => VRAM_SIZE - 8 + u64::from(a % 16),
                2 => u64::from(raw) << 20 | off16,
                _ => u64::MAX - u64::from(a),
            };
            Op::Vram(offset, size, b & 1 != 0, raw)
        }
    }
}

/// Encodes `op` (for seeds). Raw values only.
pub fn encode(op: &Op) -> [u8; 8] {
    let mut r = [0u8; 8];
    let put_known = |r: &mut [u8; 8], off: u64| {
        let (a, b) = if let Some(i) = GLOBALS.iter().position(|&g| g == off) {
            (i as u8, 0)
        } else if off >= pci::MSIX_TABLE_OFFSET {
            let o = off - pci::MSIX_TABLE_OFFSET;
            (44 + ((o % 16) / 4) as u8, (o / 16) as u8)
        } else if off >= regs::CTX_BASE {
            let o = off - regs::CTX_BASE;
            (
                22 + ((o % regs::CTX_STRIDE) / 4) as u8,
                (o / regs::CTX_STRIDE) as u8,
            )
        } else {
            (
                40,
                ((off - regs::DOORBELL_BASE) / regs::DOORBELL_STRIDE) as u8,
            )
        };
        r[1] = a;
        r[2] = b;
    };
    let size_code = |s: usize| SIZES.iter().position(|&x| x == s).unwrap_or(2) as u8;
    match *op {
        Op::WriteKnown(off, v) => {
            r[0] = 0;
            put_known(&mut r, off);
            r[4..].copy_from_slice(&v.to_le_bytes());
        }
        Op::ReadKnown(off) => {
            r[0] = 1;
            put_known(&mut r, off);
        }
        Op::WriteRaw(off, size, v) => {
            r[0] = 2;
            r[1..3].copy_from_slice(&(off as u16).to_le_bytes());
            r[3] = size_code(size);
            r[4..].copy_from_slice(&v.to_le_bytes());
        }
        Op::ReadRaw(off, size) => {
            r[0] = 3;
            r[1..3].copy_from_slice(&(off as u16).to_le_bytes());
            r[3] = size_code(size);
        }
        Op::WriteMsix(off, v) => {
            r[0] = 4;
            let o = off - pci::MSIX_TABLE_OFFSET;
            r[1] = (o / 16) as u8;
            r[2] = ((o % 16) / 4) as u8;
            r[4..].copy_from_slice(&v.to_le_bytes());
        }
        Op::Config(reg, off, size, v) => {
            r[0] = 5;
            r[1] = reg as u8;
            r[2] = off as u8;
            r[3] = [1, 2, 4].iter().position(|&x| x == size).unwrap_or(2) as u8;
            r[4..].copy_from_slice(&v.to_le_bytes());
        }
        Op::Reset => r[0] = 6,
        Op::Vram(off, size, write, _) => {
            r[0] = 7;
            r[1..3].copy_from_slice(&((off >> 4) as u16).to_le_bytes());
            r[2] |= u8::from(write);
            r[3] = size_code(size);
        }
    }
    r
}

#[derive(Debug, Clone, Copy, Default)]
struct CtxModel {
    control: u32,
    pt_root: u64,
    ring_base: u64,
    ring_size: u32,
    irq_vector: u32,
    tail_addr: u64,
}

/// What the plain-storage registers must read back.
#[derive(Debug, Clone)]
struct Model {
    int_mask: u32,
    fault_vector: u32,
    wait_ctx: u32,
    wait_value: u32,
    ctx: [CtxModel; CONTEXTS as usize],
    msix: [[u32; 4]; pci::MSIX_VECTORS as usize],
}

impl Model {
    fn power_on() -> Model {
        Model {
            int_mask: 0,
            fault_vector: 0,
            wait_ctx: 0,
            wait_value: 0,
            ctx: [CtxModel::default(); CONTEXTS as usize],
            msix: [[0, 0, 0, 1]; pci::MSIX_VECTORS as usize],
        }
    }

    fn ctx_of(off: u64) -> Option<(usize, u64)> {
        let end = regs::ctx_reg(CONTEXTS, 0);
        (regs::CTX_BASE..end).contains(&off).then(|| {
            let o = off - regs::CTX_BASE;
            ((o / regs::CTX_STRIDE) as usize, o % regs::CTX_STRIDE)
        })
    }

    fn msix_of(off: u64) -> Option<(usize, usize)> {
        let o = off.checked_sub(pci::MSIX_TABLE_OFFSET)?;
        let v = (o / 16) as usize;
        (v < pci::MSIX_VECTORS as usize).then_some((v, ((o % 16) / 4) as usize))
    }

    /// An aligned 32-bit write as the contract defines it.
    fn write(&mut self, off: u64, v: u32) {
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let hi = |old: u64| (old & 0xffff_ffff) | u64::from(v) << 32;
        if let Some((vec, dw)) = Self::msix_of(off) {
            let e = &mut self.msix[vec];
            match dw {
                0 => e[0] = v & !3,
                1 => e[1] = v,
                2 => e[2] = v,
                _ => e[3] = v & 1,
            }
            return;
        }
        if let Some((i, reg)) = Self::ctx_of(off) {
            let c = &mut self.ctx[i];
            match reg {
                regs::CTX_CONTROL if v & ctx_control::RESET != 0 => c.control = 0,
                regs::CTX_CONTROL => c.control = v & (ctx_control::ENABLE | ctx_control::POLL),
                regs::CTX_PT_ROOT_LO => c.pt_root = lo(c.pt_root),
                regs::CTX_PT_ROOT_HI => c.pt_root = hi(c.pt_root),
                regs::CTX_RING_BASE_LO => c.ring_base = lo(c.ring_base),
                regs::CTX_RING_BASE_HI => c.ring_base = hi(c.ring_base),
                regs::CTX_RING_SIZE => c.ring_size = v,
                regs::CTX_IRQ_VECTOR => c.irq_vector = v,
                regs::CTX_TAIL_ADDR_LO => c.tail_addr = lo(c.tail_addr),
                regs::CTX_TAIL_ADDR_HI => c.tail_addr = hi(c.tail_addr),
                _ => {}
            }
            return;
        }
        match off {
            regs::INT_MASK => self.int_mask = v,
            regs::FAULT_VECTOR => self.fault_vector = v,
            regs::WAIT_CTX => self.wait_ctx = v,
            regs::WAIT_VALUE => self.wait_value = v,
            regs::RESET if v == regs::RESET_VALUE => *self = Model::power_on(),
            _ => {}
        }
    }

    /// The value an aligned 32-bit read must return, where the model knows it.
    fn expected(&self, off: u64) -> Option<u32> {
        if let Some((vec, dw)) = Self::msix_of(off) {
            return Some(self.msix[vec][dw]);
        }
        if let Some((i, reg)) = Self::ctx_of(off) {
            let c = &self.ctx[i];
            return match reg {
                regs::CTX_CONTROL => Some(c.control),
                regs::CTX_PT_ROOT_LO => Some(c.pt_root as u32),
                regs::CTX_PT_ROOT_HI => Some((c.pt_root >> 32) as u32),
                regs::CTX_RING_BASE_LO => Some(c.ring_base as u32),
                regs::CTX_RING_BASE_HI => Some((c.ring_base >> 32) as u32),
                regs::CTX_RING_SIZE => Some(c.ring_size),
                regs::CTX_IRQ_VECTOR => Some(c.irq_vector),
                regs::CTX_TAIL_ADDR_LO => Some(c.tail_addr as u32),
                regs::CTX_TAIL_ADDR_HI => Some((c.tail_addr >> 32) as u32),
                _ => None,
            };
        }
        match off {
            regs::INT_MASK => Some(self.int_mask),
            regs::FAULT_VECTOR => Some(self.fault_vector),
            regs::WAIT_CTX => Some(self.wait_ctx),
            regs::WAIT_VALUE => Some(self.wait_value),
            // Contexts past NUM_CONTEXTS, doorbells: read as zero.
            o if (regs::ctx_reg(CONTEXTS, 0)..pci::MSIX_TABLE_OFFSET).contains(&o) => Some(0),
            o if (regs::DOORBELL_BASE..regs::CTX_BASE).contains(&o) => Some(0),
            // MSI-X table entries past the last vector.
            o if (pci::MSIX_TABLE_OFFSET..pci::MSIX_PBA_OFFSET).contains(&o) => Some(0),
            _ => None,
        }
    }
}

/// The prepared ring: NOPs, fences with interrupts, timestamps, small fills and copies.
fn ring_image() -> Vec<u8> {
    let n = vgpu_abi::limits::MAX_RING_ENTRIES as u64;
    let mut out = Vec::with_capacity((n * packet::PACKET_SIZE) as usize);
    for i in 0..n {
        let p = match i % 6 {
            0 | 1 => Packet::default(),
            2 => Packet {
                opcode: packet::OP_FENCE,
                flags: packet::FENCE_IRQ,
                args: [FENCE_PA, i, 0, 0, 0, 0, 0],
            },
            3 => Packet {
                opcode: packet::OP_TIMESTAMP,
                flags: 0,
                args: [FENCE_PA + 64, 0, 0, 0, 0, 0, 0],
            },
            4 => Packet {
                opcode: packet::OP_FILL,
                flags: 0,
                args: [(1 << 30) + (i % 64) * 16, 16, i, 0, 0, 0, 0],
            },
            _ => Packet {
                opcode: packet::OP_DISPATCH,
                flags: kernel::CRC32,
                args: [64, RING_PA, FENCE_PA + 128, 0, 0, 0, 0],
            },
        };
        out.extend_from_slice(&p.to_bytes());
    }
    out
}

fn prepare(rig: &Rig, ring: &[u8]) {
    use vgpu::mem::Loc::Sys;
    let rw = pte::PRESENT | pte::WRITABLE;
    rig.put(Sys, PT_ROOT, 0x2000 | pte::PRESENT);
    rig.put(Sys, 0x2000, 0x3000 | pte::PRESENT);
    rig.put(Sys, 0x2008, 0x4000 | pte::PRESENT);
    rig.put(Sys, 0x3000, rw | pte::HUGE);
    rig.put(Sys, 0x3008, (2 << 20) | rw | pte::HUGE);
    rig.put(Sys, 0x4000, 0x5000 | pte::PRESENT);
    for i in 0..VRAM_SIZE / 4096 {
        rig.put(Sys, 0x5000 + i * 8, (i * 4096) | rw | pte::VRAM);
    }
    rig.put_bytes(Sys, RING_PA, ring);
    rig.put(Sys, TAIL_PA, 16);
}

fn check_read(rig: &mut Rig, model: &Model, off: u64, got: u32) {
    if let Some(want) = model.expected(off) {
        assert_eq!(
            got, want,
            "BAR0 {off:#x}: read {got:#x}, the model says {want:#x}"
        );
    }
    if off <= regs::MAX_RING_ENTRIES {
        let want = rig.power_on_value(off);
        assert_eq!(Some(got), want, "identity register {off:#x} changed");
    }
    match off {
        regs::STATUS => {
            assert_ne!(got & status::READY, 0, "STATUS not READY between accesses");
            assert_eq!(
                got & !(status::READY | status::FAULTED),
                0,
                "STATUS {got:#x}"
            );
        }
        regs::FAULT_CODE => assert!(rig::valid_fault_code(got), "FAULT_CODE {got}"),
        regs::FAULT_CTX => assert!(got < CONTEXTS, "FAULT_CTX {got}"),
        _ => {}
    }
    if let Some((_, reg)) = Model::ctx_of(off) {
        match reg {
            regs::CTX_STATUS => assert_eq!(got & !7, 0, "CTX_STATUS {got:#x}"),
            regs::CTX_FAULT_CODE => assert!(rig::valid_fault_code(got), "CTX_FAULT_CODE {got}"),
            _ => {}
        }
    }
}

fn read(rig: &mut Rig, model: &Model, off: u64, size: usize) {
    if off == regs::WAIT && size == 4 {
        if rig::wait_would_block(rig) {
            return;
        }
        let got = rig.r(regs::WAIT);
        assert!(got <= wait::INVALID, "WAIT returned {got}");
        if model.wait_ctx >= CONTEXTS {
            assert_eq!(got, wait::INVALID, "WAIT on a context that does not exist");
        }
        return;
    }
    let mut d = vec![0xa5u8; size];
    rig.dev.read_bar(pci::BAR_REGS, off, &mut d);
    if size == 4 && off.is_multiple_of(4) {
        let got = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        check_read(rig, model, off, got);
    } else if off < pci::MSIX_PBA_OFFSET {
        assert!(
            d.iter().all(|&b| b == 0),
            "a {size}-byte read at BAR0 {off:#x} returned {d:x?}, not zeros"
        );
    }
}

fn apply(rig: &mut Rig, model: &mut Model, op: Op) {
    match op {
        Op::WriteKnown(off, v) | Op::WriteMsix(off, v) => {
            if off == regs::RESET && v == regs::RESET_VALUE {
                return apply(rig, model, Op::Reset);
            }
            rig.w(off, v);
            model.write(off, v);
        }
        Op::ReadKnown(off) => read(rig, model, off, 4),
        Op::WriteRaw(off, size, v) => {
            if off == regs::RESET && size == 4 && v == regs::RESET_VALUE {
                return apply(rig, model, Op::Reset);
            }
            let bytes: Vec<u8> = v.to_le_bytes().iter().copied().cycle().take(size).collect();
            rig.dev.write_bar(pci::BAR_REGS, off, &bytes);
            if size == 4 && off.is_multiple_of(4) {
                model.write(off, v);
            }
        }
        Op::ReadRaw(off, size) => read(rig, model, off, size),
        Op::Config(reg, off, size, v) => {
            rig.dev
                .write_config_register(reg, off, &v.to_le_bytes()[..size]);
        }
        Op::Reset => {
            rig.reset();
            rig.check_power_on();
            *model = Model::power_on();
        }
        Op::Vram(off, size, write, v) => {
            let mut d: Vec<u8> = v.to_le_bytes().iter().copied().cycle().take(size).collect();
            if write {
                rig.dev.write_bar(pci::BAR_VRAM, off, &d);
            } else {
                rig.dev.read_bar(pci::BAR_VRAM, off, &mut d);
            }
        }
    }
}

struct State {
    rig: Rig,
    ring: Vec<u8>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let st = guard.get_or_insert_with(|| State {
        rig: Rig::new(),
        ring: ring_image(),
    });
    let rig = &mut st.rig;
    rig.fresh();
    prepare(rig, &st.ring);
    let mut model = Model::power_on();
    let mut inp = Input::new(data);
    let mut ops = 0;
    while !inp.is_empty() && ops < 4096 {
        let op = decode(&mut inp);
        apply(rig, &mut model, op);
        ops += 1;
    }
    rig.reset();
    rig.check_power_on();
    rig.check_canaries();
}
