//! `command_stream`: arbitrary packets in two contexts' rings over fixed page tables that map
//! guest RAM (4 KiB pages and a 2 MiB page straddling the end of the DMA domain), VRAM (past
//! the partition too), the MMIO hole, the high canary region, a read-only alias, a reserved
//! entry, a table pointer outside VRAM and 1 GiB pages.
//!
//! Input: records of 38 bytes `[ctl, opcode, flags, 7 × (selector, u32)]` (see [`Record`]).
//! `ctl` bit 0 ends a batch (it is submitted with a closing fence), bit 1 picks context 1,
//! bit 2 waits for every context, bit 3 invalidates the TLB, bits 4–5 pick how the tail is
//! published (register, doorbell register, doorbell eventfd, polling), bit 6 makes the harness
//! wait for that batch by sleeping in the `WAIT` register (otherwise on the next interrupt),
//! bit 7 keeps the unused arguments (otherwise zero). A record whose opcode byte is
//! [`CONTEND`] is not a packet: the neighbour starts (`ctl` bit 0) or stops contending for the
//! GPU (see [`crate::rig::Contender`]), so the vGPU's work is preempted and resumed.
//!
//! Bounds: SPIN_US runs at most 50 µs × 16 workgroups, SGEMM at most 2^20 multiply-adds, so
//! an input never takes long; a batch that does not finish within [`HANG_BOUND`] is a hang.
//!
//! Invariants: no panic, no hang; a batch ends with its closing fence value or with a fault
//! whose code is documented, with `STATUS.FAULTED` and `INT_STATUS.FAULT` raised; every canary
//! is intact; RESET stays quick and returns to power-on state; a contending neighbour gets the
//! GPU (within [`HANG_BOUND`]) whatever the stream runs.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use devices::pci::PciDeviceSync;
use vgpu::mem::Loc::Sys;
use vgpu_abi::{Packet, ctx_control, ctx_status, fault, int, kernel, limits, packet, pci, pte};
use vgpu_abi::{regs, status, wait};
use vm_memory::{Bytes, GuestAddress};

use crate::input::Input;
use crate::rig::{self, DMA_END, HANG_BOUND, HIGH_BASE, RAM_SIZE, RING_ENTRIES, Rig, VRAM_SIZE};

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD0: u64 = 0x3000;
const PT0: u64 = 0x4000;
const PD1: u64 = 0x5000;
const PTV: u64 = 0x6000;
/// Rings of contexts 0 and 1 (identity-mapped).
pub const RINGS: [u64; 2] = [0x8000, 0x9000];
/// Tail shadows.
pub const SHADOWS: [u64; 2] = [0xa000, 0xa008];
/// Closing fences write here.
pub const FENCES: [u64; 2] = [0xb000, 0xb008];
/// VA of the VRAM window (4 KiB pages; the second MiB is the neighbour's range).
pub const VRAM_VA: u64 = 1 << 30;
/// VA of the windows onto forbidden places (2 MiB each, see `prepare`).
pub const BAD_VA: u64 = 4 << 20;
/// VA of a 1 GiB page onto guest-physical 0.
pub const GIG_VA: u64 = 2 << 30;

const RW: u64 = pte::PRESENT | pte::WRITABLE;
/// How long `settle` sleeps waiting for an interrupt before it looks at the registers again.
const RECHECK: std::time::Duration = std::time::Duration::from_millis(1);
/// A doorbell is taken well within this; a device tail that still differs from what the
/// harness published came from memory the stream overwrote.
const TAIL_LOST: std::time::Duration = std::time::Duration::from_secs(1);

/// Opcode byte of a record that makes the neighbour contend for the GPU (see the module
/// documentation); the other bytes from `0xf0` are invalid opcodes.
pub const CONTEND: u8 = 0xf0;

/// Values selector 7 picks from.
pub const BOUNDARIES: [u64; 20] = [
    0,
    1,
    4,
    8,
    64,
    4096,
    DMA_END - 8,
    DMA_END,
    RAM_SIZE,
    VRAM_SIZE,
    1 << 30,
    limits::MAX_TRANSFER,
    limits::MAX_TRANSFER + 1,
    1 << 47,
    (1 << 48) - 8,
    1 << 48,
    u64::MAX,
    u64::MAX - 7,
    0x8000_0000_0000,
    0xc000_0000,
];

/// Builds an argument from a selector and 32 bits.
pub fn arg(sel: u8, v: u32) -> u64 {
    let v64 = u64::from(v);
    match sel % 12 {
        0 => v64 % RAM_SIZE,
        1 => (v64 % RAM_SIZE) & !63,
        2 => VRAM_VA + v64 % (4 << 20),
        3 => BAD_VA + v64 % (14 << 20),
        4 => GIG_VA + v64 % (1 << 30),
        5 => v64 % 4097,
        6 => v64 % (1 << 22),
        7 => BOUNDARIES[v as usize % BOUNDARIES.len()],
        8 => v64,
        9 => v64 << 32 | v64.rotate_left(13),
        10 => u64::from(f32::from(v as u16).to_bits()),
        _ => 0,
    }
}

/// One decoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Control bits (see the module documentation).
    pub ctl: u8,
    /// The packet as the guest wrote it.
    pub packet: Packet,
}

fn used_args(p: &Packet) -> usize {
    packet::args_used(p.opcode, p.flags).unwrap_or(0)
}

/// Decodes one record.
pub fn decode(inp: &mut Input<'_>) -> Record {
    let ctl = inp.u8();
    let op = inp.u8();
    let fl = inp.u8();
    let opcode = if op < 0xf0 {
        u32::from(op % 6)
    } else {
        u32::from(op)
    };
    let flags = match opcode {
        packet::OP_DISPATCH => u32::from(fl % 7),
        packet::OP_FENCE if fl & 0x80 == 0 => u32::from(fl & 1),
        _ if fl & 0x80 != 0 => u32::from(fl),
        _ => 0,
    };
    let mut p = Packet {
        opcode,
        flags,
        args: [0; packet::NUM_ARGS],
    };
    for a in p.args.iter_mut() {
        let sel = inp.u8();
        *a = arg(sel, inp.u32());
    }
    if ctl & 0x80 == 0 {
        let used = used_args(&p);
        p.args[used..].fill(0);
    }
    Record { ctl, packet: p }
}

/// Encodes a record whose arguments are given as `(selector, value)` pairs.
pub fn encode(ctl: u8, op: u8, flags: u8, args: &[(u8, u32)]) -> Vec<u8> {
    let mut out = vec![ctl, op, flags];
    for i in 0..packet::NUM_ARGS {
        let (s, v) = args.get(i).copied().unwrap_or((11, 0));
        out.push(s);
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Keeps a packet cheap without changing whether it is valid.
pub fn bound(p: &mut Packet) {
    if p.opcode != packet::OP_DISPATCH {
        return;
    }
    let a = &mut p.args;
    match p.flags {
        kernel::SPIN_US => {
            if a[0] <= limits::MAX_SPIN_US {
                a[0] = a[0].min(50);
            }
            if (1..=limits::MAX_SPIN_GROUPS).contains(&a[1]) {
                a[1] = a[1].min(16);
            }
        }
        kernel::SGEMM => {
            let ok = |d: u64| (1..=limits::MAX_SGEMM_DIM).contains(&d);
            if ok(a[0]) && ok(a[1]) && ok(a[2]) && a[0] * a[1] * a[2] > 1 << 20 {
                for d in &mut a[..3] {
                    *d = (*d).min(64);
                }
            }
        }
        _ => {}
    }
}

fn prepare(rig: &mut Rig) {
    write_tables(rig);
    let cap = (rig.dev.read_config_register(13) & 0xff) as usize;
    rig.dev
        .write_config_register(cap / 4, 2, &0x8000u16.to_le_bytes());
    for v in 0..4u64 {
        let e = pci::MSIX_TABLE_OFFSET + v * 16;
        rig.w(e, 0xfee0_0000);
        rig.w(e + 8, 0x40 + v as u32);
        rig.w(e + 12, 0);
    }
    rig.w(regs::FAULT_VECTOR, 3);
    for ctx in 0..2 {
        enable(rig, ctx);
    }
}

/// (Re)writes the page tables (a stream may have overwritten them): one copy of the pages
/// [`PML4`]..[`PTV`] as [`tables`] built them.
fn write_tables(rig: &mut Rig) {
    static TABLES: OnceLock<Vec<u8>> = OnceLock::new();
    rig.put_bytes(Sys, PML4, TABLES.get_or_init(tables));
}

/// The page-table pages from [`PML4`] to the end of [`PTV`]'s page.
fn tables() -> Vec<u8> {
    let mut image = vec![0u8; (PTV + 0x1000 - PML4) as usize];
    let mut put = |at: u64, v: u64| {
        let i = (at - PML4) as usize;
        image[i..i + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(PML4, PDPT | pte::PRESENT);
    put(PDPT, PD0 | pte::PRESENT);
    put(PDPT + 8, PD1 | pte::PRESENT);
    put(PDPT + 16, RW | pte::HUGE);
    put(PDPT + 24, RW | pte::HUGE | pte::VRAM);
    // [0, 2 MiB): 4 KiB identity pages; [2, 4 MiB): one 2 MiB page across the domain's end.
    put(PD0, PT0 | pte::PRESENT);
    for i in 0..512 {
        put(PT0 + i * 8, (i << 12) | RW);
    }
    put(PD0 + 8, (2 << 20) | RW | pte::HUGE);
    // Windows onto forbidden places, 2 MiB each from BAD_VA.
    let bad = [
        (4 << 20) | RW | pte::HUGE,           // past RAM
        0xc000_0000 | RW | pte::HUGE,         // MMIO hole
        HIGH_BASE | RW | pte::HUGE,           // the high canary region
        pte::PRESENT | pte::HUGE,             // read-only alias of RAM
        RW | pte::HUGE | 1 << 8,              // reserved bit
        (2 << 20) | pte::PRESENT | pte::VRAM, // table pointer past the partition
        RW | pte::HUGE | pte::VRAM,           // 2 MiB VRAM page over a 1 MiB partition
    ];
    for (i, e) in bad.iter().enumerate() {
        put(PD0 + (2 + i as u64) * 8, *e);
    }
    // VRAM window: 512 pages, the second half past the partition (the neighbour's range).
    put(PD1, PTV | pte::PRESENT);
    for i in 0..512 {
        put(PTV + i * 8, (i << 12) | RW | pte::VRAM);
    }
    image
}

fn enable(rig: &mut Rig, ctx: u32) {
    let i = ctx as usize;
    rig.cw(ctx, regs::CTX_PT_ROOT_LO, PML4 as u32);
    rig.cw(ctx, regs::CTX_RING_BASE_LO, RINGS[i] as u32);
    rig.cw(ctx, regs::CTX_RING_SIZE, RING_ENTRIES);
    rig.cw(ctx, regs::CTX_TAIL_ADDR_LO, SHADOWS[i] as u32);
    rig.cw(ctx, regs::CTX_IRQ_VECTOR, ctx + 1);
    rig.cw(ctx, regs::CTX_CONTROL, ctx_control::ENABLE);
}

#[derive(Debug, Default)]
struct Ctx {
    pending: Vec<Packet>,
    tail: u32,
    fences: u32,
    outstanding: Option<u32>,
    /// Wait for the outstanding batch in the `WAIT` register.
    in_trap: bool,
    /// (Context 0's slot only.) FAULT_COUNT when INT_STATUS.FAULT was last acknowledged.
    faults_acked: u32,
}

fn submit(rig: &mut Rig, ctxs: &mut [Ctx; 2], ctx: u32, how: u8) {
    let i = ctx as usize;
    let c = &mut ctxs[i];
    if c.pending.is_empty() {
        return;
    }
    c.fences = c.fences.wrapping_add(1);
    let value = c.fences;
    let mut pkts = std::mem::take(&mut c.pending);
    pkts.push(Packet {
        opcode: packet::OP_FENCE,
        flags: packet::FENCE_IRQ,
        args: [FENCES[i], u64::from(value), 0, 0, 0, 0, 0],
    });
    for p in &pkts {
        let slot = u64::from(c.tail % RING_ENTRIES);
        rig.put_bytes(Sys, RINGS[i] + slot * packet::PACKET_SIZE, &p.to_bytes());
        c.tail = c.tail.wrapping_add(1);
    }
    rig.put(Sys, SHADOWS[i], u64::from(c.tail));
    match how & 3 {
        0 => rig.cw(ctx, regs::CTX_RING_TAIL, c.tail),
        1 => rig.w(regs::doorbell(ctx), 0),
        2 => {
            let _ = rig.dev.doorbell_eventfd(ctx).map(|e| e.write(1));
        }
        _ => rig.cw(
            ctx,
            regs::CTX_CONTROL,
            ctx_control::ENABLE | ctx_control::POLL,
        ),
    }
    c.outstanding = Some(value);
    c.in_trap = how & 4 != 0;
}

/// Waits for `ctx`'s outstanding batch; recovers the context after a fault.
fn settle(rig: &mut Rig, ctxs: &mut [Ctx; 2], ctx: u32) {
    let i = ctx as usize;
    let Some(value) = ctxs[i].outstanding.take() else {
        return;
    };
    let start = Instant::now();
    loop {
        // Read before looking at the registers: an interrupt raised after the look ends the
        // sleep below at once.
        let seen = rig.msis.count();
        if start.elapsed() >= HANG_BOUND {
            rig::hang_diagnostics(rig);
        }
        assert!(
            start.elapsed() < HANG_BOUND,
            "context {ctx} did not finish a bounded batch in {HANG_BOUND:?}: head {} tail {}",
            rig.cr(ctx, regs::CTX_RING_HEAD),
            ctxs[i].tail
        );
        let st = rig.cr(ctx, regs::CTX_STATUS);
        if st & ctx_status::FAULTED != 0 {
            break;
        }
        if st & ctx_status::ENABLED == 0 {
            // Only the watchdog disables a context behind the guest's back (TDR: the whole
            // vGPU was reset and the fault recorded).
            assert_eq!(
                rig.r(regs::FAULT_CODE),
                fault::TIMEOUT,
                "context {ctx} disabled"
            );
            *ctxs = Default::default();
            for s in SHADOWS {
                rig.put(Sys, s, 0);
            }
            prepare(rig);
            return;
        }
        let shadow: u32 = rig.sys.read_obj(GuestAddress(SHADOWS[i])).expect("shadow");
        let device_tail = rig.cr(ctx, regs::CTX_RING_TAIL);
        if device_tail != ctxs[i].tail && (shadow != ctxs[i].tail || start.elapsed() > TAIL_LOST) {
            // The stream overwrote its own tail shadow (or the page tables that map it) and
            // the device took that tail: the ring now holds whatever the guest made of it (a
            // flood of stale packets, or nothing). Not a device hang: recover like a driver
            // would, with a context reset.
            break;
        }
        if rig.cr(ctx, regs::CTX_RING_HEAD) == ctxs[i].tail {
            // Everything ran. The closing fence normally set the value, unless the stream
            // overwrote its own ring (then the fence slot ran as whatever it held).
            rig.cw(ctx, regs::CTX_CONTROL, ctx_control::ENABLE);
            return;
        }
        if ctxs[i].in_trap {
            // Sleep inside the trap until the fence or a fault (at most WAIT_TIMEOUT_MS: a
            // stream that overwrote its closing fence makes it time out).
            rig.w(regs::WAIT_CTX, ctx);
            rig.w(regs::WAIT_VALUE, value);
            match rig.r(regs::WAIT) {
                wait::DONE | wait::FAULTED | wait::TIMEOUT | wait::INVALID => {}
                other => panic!("WAIT returned {other}"),
            }
        } else {
            // Sleep until the next interrupt (the closing fence's, a fault's) or a moment: a
            // stream that overwrote its own fence or tail raises none. Polling the registers
            // instead would take a CPU from the engines.
            rig.msis.wait_past(seen, RECHECK);
        }
    }
    if rig.cr(ctx, regs::CTX_STATUS) & ctx_status::FAULTED != 0 {
        let code = rig.cr(ctx, regs::CTX_FAULT_CODE);
        assert!(
            code != fault::NONE && rig::valid_fault_code(code),
            "fault code {code}"
        );
        assert_ne!(rig.r(regs::STATUS) & status::FAULTED, 0);
        // Every fault since the harness last acknowledged one raised INT_STATUS.FAULT.
        let count = rig.r(regs::FAULT_COUNT);
        if count != ctxs[0].faults_acked {
            assert_ne!(
                rig.r(regs::INT_STATUS) & int::FAULT,
                0,
                "fault without FAULT interrupt"
            );
        }
        rig.w(regs::INT_STATUS, int::FAULT);
        let acked = rig.r(regs::FAULT_COUNT);
        ctxs[0].faults_acked = acked;
    }
    rig.cw(ctx, regs::CTX_CONTROL, ctx_control::RESET);
    assert_eq!(rig.cr(ctx, regs::CTX_STATUS), 0, "context reset");
    ctxs[i].tail = 0;
    // A doorbell still in flight must not republish the old tail.
    rig.put(Sys, SHADOWS[i], 0);
    write_tables(rig);
    rig.cw(ctx, regs::CTX_CONTROL, ctx_control::ENABLE);
}

static RIG: Mutex<Option<Rig>> = Mutex::new(None);

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut guard = RIG.lock().unwrap_or_else(|e| e.into_inner());
    let rig = guard.get_or_insert_with(Rig::new);
    rig.fresh();
    prepare(rig);
    let mut ctxs: [Ctx; 2] = Default::default();
    let mut inp = Input::new(data);
    let mut n = 0;
    while !inp.is_empty() && n < 512 {
        n += 1;
        let Record { ctl, mut packet } = decode(&mut inp);
        if packet.opcode == u32::from(CONTEND) {
            if ctl & 1 != 0 {
                rig.contender.start();
            } else {
                rig.contender.stop();
            }
            continue;
        }
        bound(&mut packet);
        let ctx = u32::from(ctl >> 1 & 1);
        settle(rig, &mut ctxs, ctx);
        ctxs[ctx as usize].pending.push(packet);
        if ctl & 1 != 0 || ctxs[ctx as usize].pending.len() + 1 >= RING_ENTRIES as usize {
            submit(rig, &mut ctxs, ctx, ctl >> 4);
        }
        if ctl & 4 != 0 {
            settle(rig, &mut ctxs, 0);
            settle(rig, &mut ctxs, 1);
        }
        if ctl & 8 != 0 {
            rig.cw(ctx, regs::CTX_TLB_INVALIDATE, 1);
        }
    }
    for ctx in 0..2 {
        submit(rig, &mut ctxs, ctx, 0);
        settle(rig, &mut ctxs, ctx);
    }
    rig.reset();
    rig.check_power_on();
    rig.contender.stop();
    rig.check_canaries();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contending_neighbour_preempts_the_vgpu_and_gets_the_gpu() {
        let seed = crate::seeds::command_stream()
            .into_iter()
            .find(|(name, _)| *name == "contended")
            .expect("the contended seed")
            .1;
        let (yields, grants) = {
            let mut guard = RIG.lock().unwrap_or_else(|e| e.into_inner());
            let rig = guard.get_or_insert_with(Rig::new);
            (rig.sched.overruns().len(), rig.contender.grants())
        };
        run(&seed);
        let guard = RIG.lock().unwrap_or_else(|e| e.into_inner());
        let rig = guard.as_ref().expect("rig");
        // Each overrun sample is a preemption point that decided to yield to the neighbour.
        assert!(
            rig.sched.overruns().len() > yields,
            "the vGPU never yielded to the contender"
        );
        assert!(rig.contender.grants() > grants, "the contender never ran");
    }
}
