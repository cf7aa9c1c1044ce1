//! Snapshots: a state saved while a pause caught a packet mid-way, restored into a fresh vGPU
//! of the same profile on copies of the guest's RAM and of the VRAM, finishes that packet as
//! the original does; `save` needs a pause; `restore` refuses whole what no guest could make;
//! the GPU clock goes on from the saved one.

use std::time::{Duration, Instant};

use super::*;
use crate::device::{InFlight, VgpuState};

/// Longest a pause may take to reach a preemption point.
const PAUSE: Duration = Duration::from_secs(5);
/// Longest a test waits for a condition of its own.
const PATIENCE: Duration = Duration::from_secs(20);
/// 4 MiB of guest RAM from `BIG_PA` in 2 MiB pages at `BIG_VA`, then the whole VRAM.
const BIG_VA: u64 = 0x4000_0000;
const BIG_PA: u64 = 0xa0_0000;
const BIG: u64 = 4 << 20;
const BIG_VRAM_VA: u64 = BIG_VA + BIG;
const FENCE_VA: u64 = SYS_VA + 0xf000;
/// The MSI-X vector of context 0's fences, and its message.
const VECTOR: u16 = 3;
const MSI: (u64, u32) = (0xfee0_0000, 0x43);

/// Context 0 with a ring of 16, `BIG_VA` mapped, its fences interrupting through `VECTOR`.
fn big_ctx(g: &mut Gpu) {
    let mut b = g.setup_ctx(0, T0, B0, 16);
    for h in 0..BIG / (2 << 20) {
        let off = h * (2 << 20);
        b.map(&g.spaces, BIG_VA + off, (BIG_PA + off) | RW | pte::HUGE, 2);
        b.map(
            &g.spaces,
            BIG_VRAM_VA + off,
            off | RW | pte::VRAM | pte::HUGE,
            2,
        );
    }
    enable_msix(g, &[(VECTOR, MSI.1)]);
    g.cw(0, regs::CTX_IRQ_VECTOR, VECTOR.into());
}

/// A test vGPU that is resumed before it is dropped (and before it unwinds from a failed
/// assertion): dropping a paused vGPU never returns (see
/// `a_paused_vgpu_can_be_dropped`).
struct Resumed(Gpu);

impl Drop for Resumed {
    fn drop(&mut self) {
        self.0.dev.resume();
    }
}

impl std::ops::Deref for Resumed {
    type Target = Gpu;
    fn deref(&self) -> &Gpu {
        &self.0
    }
}

impl std::ops::DerefMut for Resumed {
    fn deref_mut(&mut self) -> &mut Gpu {
        &mut self.0
    }
}

fn fresh() -> Resumed {
    Resumed(Gpu::new())
}

fn reg(g: &Gpu, off: u64) -> u32 {
    let mut d = [0u8; 4];
    g.dev.read_bar(pci::BAR_REGS, off, &mut d);
    u32::from_le_bytes(d)
}

fn timestamp(g: &Gpu) -> u64 {
    let lo = reg(g, regs::TIMESTAMP_LO);
    u64::from(lo) | u64::from(reg(g, regs::TIMESTAMP_HI)) << 32
}

/// What a VMM copies besides the state: the guest's RAM and the vGPU's VRAM.
struct Memory {
    ram: Vec<u8>,
    vram: Vec<u8>,
}

fn copy_memory(g: &Gpu) -> Memory {
    let mut ram = vec![0u8; RAM as usize];
    g.spaces.sys.read_slice(&mut ram, GuestAddress(0)).unwrap();
    let mut vram = vec![0u8; VRAM as usize];
    g.dev.vram().read(0, &mut vram).unwrap();
    Memory { ram, vram }
}

/// A fresh vGPU (same profile) on a new guest memory with `m`'s contents, `state` restored.
fn restored(state: &VgpuState, m: &Memory) -> Resumed {
    restored_on(&fresh, state, m)
}

/// [`restored`], on a vGPU made by `new`.
fn restored_on(new: &dyn Fn() -> Resumed, state: &VgpuState, m: &Memory) -> Resumed {
    let g = new();
    g.spaces.sys.write_slice(&m.ram, GuestAddress(0)).unwrap();
    g.dev.vram().write(0, &m.vram).unwrap();
    g.dev.restore(state).unwrap();
    g
}

/// Finite floats of either sign in [2^-9, 2^11), from a fixed seed.
fn floats(n: usize, mut seed: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let r = seed as u32;
            f32::from_bits((r & 0x807f_ffff) | ((118 + (r >> 23) % 20) << 23))
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn f32s_of(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Pauses `g` until a pause catches context 0's packet at slot `head` (of `groups` groups)
/// between two of its groups, and returns the state saved then, `g` left paused. `None` if
/// the packet ended first. `started` says when the packet surely has begun; after that, each
/// pause that lands too early is undone and the next one comes a little later (the gap only
/// picks another moment to stop at: whatever moment a pause lands on, the state is checked).
fn catch_mid_way(
    g: &Gpu,
    head: u32,
    groups: u64,
    started: impl Fn(&Gpu) -> bool,
) -> Option<VgpuState> {
    let deadline = Instant::now() + PATIENCE;
    while !started(g) {
        assert!(Instant::now() < deadline, "the packet never started");
        std::hint::spin_loop();
    }
    let mut gap = Duration::ZERO;
    loop {
        g.dev.pause(PAUSE).unwrap();
        let s = g.dev.save().unwrap();
        if let Some(f) = s.in_flight {
            assert_eq!((f.ctx, f.head), (0, head), "{f:?}");
            assert!(f.next_group < groups, "{f:?} of {groups} groups");
            if f.next_group > 0 {
                assert!(f.used_ns > 0, "{f:?}: groups ran in no time");
                return Some(s);
            }
        }
        let ended = s.contexts[0].head != head;
        g.dev.resume();
        if ended {
            return None;
        }
        assert!(Instant::now() < deadline, "no pause caught the packet");
        std::thread::sleep(gap);
        gap += Duration::from_micros(250);
    }
}

/// One run of `pkts` (a multi-group packet at slot 0 of `groups` groups, then a fence of 1
/// with an interrupt) on a new vGPU prepared by `prepare`, paused mid-way through the first:
/// the vGPU (paused), its state and its memories then. `None` if no pause caught it.
fn caught(
    new: &dyn Fn() -> Resumed,
    prepare: &dyn Fn(&mut Gpu),
    pkt: Packet,
    groups: u64,
    started: &dyn Fn(&Gpu) -> bool,
) -> Option<(Resumed, VgpuState, Memory)> {
    let mut a = new();
    big_ctx(&mut a);
    prepare(&mut a);
    assert_eq!(a.submit(0, T0, &[pkt, fence_pkt(FENCE_VA, 1, true)]), 2);
    let Some(state) = catch_mid_way(&a, 0, groups, started) else {
        assert_eq!(a.wait(0, 1), wait::DONE);
        return None;
    };
    let c = &state.contexts[0];
    assert_eq!((c.head, c.tail, c.fence), (0, 2, 0), "{c:?}");
    assert!(c.fault.is_none());
    assert!(a.msis.0.lock().unwrap().is_empty(), "no fence yet");
    let mem = copy_memory(&a);
    Some((a, state, mem))
}

fn caught_somewhere(
    new: &dyn Fn() -> Resumed,
    prepare: &dyn Fn(&mut Gpu),
    pkt: Packet,
    groups: u64,
    started: &dyn Fn(&Gpu) -> bool,
) -> (Resumed, VgpuState, Memory) {
    for _ in 0..5 {
        if let Some(c) = caught(new, prepare, pkt, groups, started) {
            return c;
        }
    }
    panic!("the packet always ended before a pause caught it");
}

/// Waits for the fence of 1 and checks that the vGPU has nothing left to do and interrupted
/// once.
fn finishes(g: &mut Gpu, who: &str) {
    assert_eq!(g.wait(0, 1), wait::DONE, "{who}");
    assert_eq!(g.cr(0, regs::CTX_RING_HEAD), 2, "{who}");
    assert_eq!(g.cr(0, regs::CTX_RING_TAIL), 2, "{who}");
    assert_eq!(g.cr(0, regs::CTX_STATUS), ctx_status::ENABLED, "{who}");
    assert_eq!(g.cr(0, regs::CTX_FENCE_LO), 1, "{who}");
    let fence: u64 = g.spaces.sys.read_obj(GuestAddress(B0 + 0xf000)).unwrap();
    assert_eq!(fence, 1, "{who}");
    assert_ne!(g.r(regs::INT_STATUS) & int::fence(0), 0, "{who}");
    assert_eq!(g.r(regs::FAULT_COUNT), 0, "{who}");
    // The interrupt is sent as the fence is written, before WAIT returns.
    assert_eq!(g.msis.0.lock().unwrap().as_slice(), &[MSI], "{who}");
}

/// Both vGPUs, each finished and paused, are in the same state and hold the same memories.
fn same_end(a: &Gpu, b: &Gpu) {
    for g in [a, b] {
        g.dev.pause(PAUSE).unwrap();
    }
    let (sa, sb) = (a.dev.save().unwrap(), b.dev.save().unwrap());
    assert_eq!(sa.in_flight, None);
    assert_eq!(sa.contexts, sb.contexts);
    assert_eq!(sa.config, sb.config);
    assert_eq!(
        (&sa.msix_table, &sa.msix_pending),
        (&sb.msix_table, &sb.msix_pending)
    );
    assert_eq!(
        (sa.int_status, sa.int_mask, sa.fault_count),
        (sb.int_status, sb.int_mask, sb.fault_count)
    );
    let (ma, mb) = (copy_memory(a), copy_memory(b));
    assert!(ma.ram == mb.ram, "the guests' RAM differs");
    assert!(ma.vram == mb.vram, "the VRAMs differ");
}

/// y = a·x + y over 4 MiB of floats: x in VRAM, y in guest RAM, 64 groups.
struct Saxpy {
    n: usize,
    groups: u64,
    a: f32,
    x: Vec<f32>,
    y: Vec<f32>,
    packet: Packet,
}

impl Saxpy {
    fn new() -> Saxpy {
        let n = (BIG / 4) as usize;
        let a = 1.7f32;
        Saxpy {
            n,
            groups: n as u64 / kernel::SAXPY_GROUP,
            a,
            x: floats(n, 0x9e37_79b9_7f4a_7c15),
            y: floats(n, 0x0123_4567_89ab_cdef),
            packet: Packet::new(
                packet::OP_DISPATCH,
                kernel::SAXPY,
                &[n as u64, a.to_bits().into(), BIG_VRAM_VA, BIG_VA],
            ),
        }
    }

    /// Puts the operands in place on a vGPU.
    fn prepare(g: &mut Gpu, x: &[f32], y: &[f32]) {
        g.spaces.vram.write(0, &f32_bytes(x)).unwrap();
        write_f32s(g, BIG_PA, y);
    }
}

#[test]
fn a_restored_vgpu_finishes_a_dispatch_caught_mid_way_bit_exactly() {
    let Saxpy {
        n,
        groups,
        a,
        x,
        y,
        packet: saxpy,
    } = Saxpy::new();
    let want: Vec<f32> = x.iter().zip(&y).map(|(&x, &y)| a.mul_add(x, y)).collect();
    assert_ne!(want[0].to_bits(), y[0].to_bits());
    let prepare = |g: &mut Gpu| Saxpy::prepare(g, &x, &y);
    // Group 0 has written its part of y: the packet is on the engines.
    let y0 = y[0].to_bits();
    let started = |g: &Gpu| g.spaces.sys.read_obj::<u32>(GuestAddress(BIG_PA)).unwrap() != y0;
    let (mut a_gpu, state, mem) = caught_somewhere(&fresh, &prepare, saxpy, groups, &started);
    let f: InFlight = state.in_flight.unwrap();

    // What the saved memory holds is what the state says: the groups before `next_group`
    // ran, none after.
    let saved_y = f32s_of(&mem.ram[BIG_PA as usize..(BIG_PA + BIG) as usize]);
    let done = (f.next_group * kernel::SAXPY_GROUP) as usize;
    for i in 0..n {
        let expect = if i < done { want[i] } else { y[i] };
        assert_eq!(
            saved_y[i].to_bits(),
            expect.to_bits(),
            "saved y[{i}], {f:?}"
        );
    }

    // The original goes on from where it stopped.
    a_gpu.dev.resume();
    finishes(&mut a_gpu, "the original");
    let got_a = read_f32s(&a_gpu, BIG_PA, n);

    // So does a fresh vGPU given the state and copies of the memories.
    let mut b = restored(&state, &mem);
    finishes(&mut b, "the restored vGPU");
    let got_b = read_f32s(&b, BIG_PA, n);
    for i in 0..n {
        assert_eq!(got_b[i].to_bits(), want[i].to_bits(), "restored y[{i}]");
        assert_eq!(got_a[i].to_bits(), want[i].to_bits(), "original y[{i}]");
    }
    same_end(&a_gpu, &b);
}

/// A GPU that runs kernels on staging copies of their operands (Vulkan) writes a packet's
/// outputs only when the packet ends. A state saved mid-way finds memory untouched, so the
/// restored vGPU runs the packet again from group 0, and ends with the original's result.
#[test]
fn a_restored_vgpu_on_vulkan_reruns_a_dispatch_caught_mid_way() {
    let _alone = crate::tests::measuring_alone();
    let vulkan =
        || crate::backend::vulkan::tests::gpu(VRAM).map(|vk| Resumed(Gpu::on(Arc::new(vk))));
    if vulkan().is_none() {
        return;
    }
    let new = || vulkan().expect("a Vulkan device, as a moment ago");
    let Saxpy {
        n,
        groups,
        a,
        x,
        y,
        packet: saxpy,
    } = Saxpy::new();
    let prepare = |g: &mut Gpu| Saxpy::prepare(g, &x, &y);
    let (mut a_gpu, state, mem) = caught_somewhere(&new, &prepare, saxpy, groups, &|_| true);
    let saved_y = f32s_of(&mem.ram[BIG_PA as usize..(BIG_PA + BIG) as usize]);
    assert!(
        saved_y
            .iter()
            .zip(&y)
            .all(|(s, y)| s.to_bits() == y.to_bits()),
        "memory holds results before the packet ended ({:?})",
        state.in_flight
    );
    a_gpu.dev.resume();
    finishes(&mut a_gpu, "the original");
    let got_a = read_f32s(&a_gpu, BIG_PA, n);
    let mut b = restored_on(&new, &state, &mem);
    finishes(&mut b, "the restored vGPU");
    let got_b = read_f32s(&b, BIG_PA, n);
    for i in 0..n {
        // Vulkan may round the product and the sum apart (`seam::vulkan_and_soft_agree`).
        let exact = a.mul_add(x[i], y[i]);
        let bound = 2.0 * f32::EPSILON * ((a * x[i]).abs() + exact.abs());
        assert!((got_a[i] - exact).abs() <= bound, "original y[{i}]");
        assert_eq!(got_b[i].to_bits(), got_a[i].to_bits(), "restored y[{i}]");
    }
    same_end(&a_gpu, &b);
}

#[test]
fn a_reduction_caught_mid_way_restarts_and_is_right() {
    // 8 MiB of input (RAM then VRAM, contiguous in the GPU's view): REDUCE_SUM over 32
    // groups, CRC-32 over 8.
    let input: Vec<u8> = {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        (0..2 * BIG)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let prepare = |g: &mut Gpu| {
        g.spaces
            .sys
            .write_slice(&input[..BIG as usize], GuestAddress(BIG_PA))
            .unwrap();
        g.spaces.vram.write(0, &input[BIG as usize..]).unwrap();
        g.spaces.sys.write_obj(!0u64, GuestAddress(B0)).unwrap();
    };
    let sum: u64 = input
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .fold(0, u64::wrapping_add);
    let crc = crc32fast::hash(&input);
    let n = 2 * BIG / 4;
    let cases = [
        (
            "REDUCE_SUM",
            Packet::new(
                packet::OP_DISPATCH,
                kernel::REDUCE_SUM,
                &[n, BIG_VA, SYS_VA],
            ),
            n / kernel::REDUCE_GROUP,
            sum,
        ),
        (
            "CRC32",
            Packet::new(
                packet::OP_DISPATCH,
                kernel::CRC32,
                &[2 * BIG, BIG_VA, SYS_VA],
            ),
            2 * BIG / crate::backend::CRC_GROUP,
            u64::from(crc) | 0xffff_ffff << 32,
        ),
    ];
    for (name, pkt, groups, want) in cases {
        let (mut a, state, mem) = caught_somewhere(&fresh, &prepare, pkt, groups, &|_| true);
        let out: u64 = a.spaces.sys.read_obj(GuestAddress(B0)).unwrap();
        assert_eq!(out, !0, "{name}: no result before the last group");
        a.dev.resume();
        finishes(&mut a, name);
        let out: u64 = a.spaces.sys.read_obj(GuestAddress(B0)).unwrap();
        assert_eq!(out, want, "{name}: the original");
        let mut b = restored(&state, &mem);
        finishes(&mut b, name);
        let out: u64 = b.spaces.sys.read_obj(GuestAddress(B0)).unwrap();
        assert_eq!(
            out, want,
            "{name}: the restored vGPU, caught at {:?}",
            state.in_flight
        );
        same_end(&a, &b);
    }
}

#[test]
fn save_needs_a_pause() {
    let mut g = fresh();
    assert!(g.dev.save().is_err(), "an idle, running vGPU");
    g.setup_ctx(0, T0, B0, 8);
    g.submit(
        0,
        T0,
        &[
            Packet::new(packet::OP_DISPATCH, kernel::SPIN_US, &[20_000, 4]),
            fence_pkt(FENCE_VA, 1, false),
        ],
    );
    assert!(g.dev.save().is_err(), "a vGPU at work");
    g.dev.pause(PAUSE).unwrap();
    let s = g.dev.save().unwrap();
    assert_eq!(s.contexts.len(), 4);
    let again = g.dev.save().unwrap();
    assert!(
        again.timestamp_ns >= s.timestamp_ns,
        "the clock goes on while paused"
    );
    assert_eq!(
        VgpuState {
            timestamp_ns: s.timestamp_ns,
            ..again
        },
        s,
        "nothing else changes while paused"
    );
    g.dev.resume();
    assert!(g.dev.save().is_err(), "resumed");
    assert_eq!(g.wait(0, 1), wait::DONE);
    assert!(g.dev.save().is_err(), "resumed, idle");
}

/// Every register a guest can read that a state sets (TIMESTAMP aside).
fn fingerprint(g: &Gpu) -> Vec<u32> {
    let mut v = Vec::new();
    for off in [
        regs::STATUS,
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
        regs::TIMESTAMP_HI,
        pci::MSIX_PBA_OFFSET,
    ] {
        v.push(reg(g, off));
    }
    for c in 0..4 {
        for r in [
            regs::CTX_CONTROL,
            regs::CTX_STATUS,
            regs::CTX_PT_ROOT_LO,
            regs::CTX_PT_ROOT_HI,
            regs::CTX_RING_BASE_LO,
            regs::CTX_RING_BASE_HI,
            regs::CTX_RING_SIZE,
            regs::CTX_RING_HEAD,
            regs::CTX_RING_TAIL,
            regs::CTX_FENCE_LO,
            regs::CTX_FENCE_HI,
            regs::CTX_IRQ_VECTOR,
            regs::CTX_FAULT_CODE,
            regs::CTX_FAULT_ADDR_LO,
            regs::CTX_FAULT_ADDR_HI,
            regs::CTX_TAIL_ADDR_LO,
            regs::CTX_TAIL_ADDR_HI,
        ] {
            v.push(reg(g, regs::ctx_reg(c, r)));
        }
    }
    for e in 0..u64::from(pci::MSIX_VECTORS) * 4 {
        v.push(reg(g, pci::MSIX_TABLE_OFFSET + e * 4));
    }
    for r in 0..64 {
        v.push(g.dev.read_config_register(r));
    }
    v
}

#[test]
fn restore_refuses_states_no_guest_could_make_and_changes_nothing() {
    // A guest's vGPU with something in every part of the state: MSI-X on, a mask, a fault
    // vector; context 0 enabled and fenced; context 1 configured but disabled, with a tail;
    // context 2 faulted at enable (a ring of 6), with a tail.
    let mut s = fresh();
    enable_msix(&mut s, &[(VECTOR, MSI.1), (5, 0x45)]);
    s.w(regs::INT_MASK, 1 << 20);
    s.w(regs::FAULT_VECTOR, 5);
    s.w(regs::WAIT_CTX, 0);
    s.w(regs::WAIT_VALUE, 1);
    s.setup_ctx(0, T0, B0, 8);
    s.cw(0, regs::CTX_IRQ_VECTOR, VECTOR.into());
    s.submit(0, T0, &[fence_pkt(FENCE_VA, 1, true)]);
    assert_eq!(s.wait(0, 1), wait::DONE);
    s.cw(1, regs::CTX_RING_BASE_LO, RING_VA as u32);
    s.cw(1, regs::CTX_RING_SIZE, 8);
    s.cw(1, regs::CTX_RING_TAIL, 1);
    s.cw(2, regs::CTX_RING_BASE_LO, RING_VA as u32);
    s.cw(2, regs::CTX_RING_SIZE, 6);
    s.cw(2, regs::CTX_CONTROL, ctx_control::ENABLE);
    s.cw(2, regs::CTX_RING_TAIL, 1);
    assert_eq!(s.cr(2, regs::CTX_FAULT_CODE), fault::RING_CONFIG);
    s.dev.pause(PAUSE).unwrap();
    let idle = s.dev.save().unwrap();
    let s_regs = fingerprint(&s);
    // Packets queued while paused: context 0's next one may be in flight in a state.
    s.submit(
        0,
        T0,
        &[
            Packet::new(packet::OP_FILL, 0, &[SYS_VA, 0x100, 0x5a5a_5a5a]),
            fence_pkt(FENCE_VA, 2, false),
        ],
    );
    let mut queued = s.dev.save().unwrap();
    assert_eq!((queued.contexts[0].head, queued.contexts[0].tail), (1, 3));
    queued.in_flight = Some(InFlight {
        ctx: 0,
        head: 1,
        next_group: 0,
        used_ns: 0,
    });

    type Mutation = Box<dyn Fn(&mut VgpuState)>;
    let in_flight = |ctx: u32, head: u32| -> Mutation {
        Box::new(move |st: &mut VgpuState| {
            st.in_flight = Some(InFlight {
                ctx,
                head,
                next_group: 0,
                used_ns: 0,
            })
        })
    };
    let cases: Vec<(&str, &VgpuState, Mutation)> = vec![
        (
            "a context too few",
            &idle,
            Box::new(|st| {
                st.contexts.pop();
            }),
        ),
        (
            "a context too many",
            &idle,
            Box::new(|st| st.contexts.push(st.contexts[1].clone())),
        ),
        (
            "control with the RESET command bit",
            &idle,
            Box::new(|st| st.contexts[0].control |= ctx_control::RESET),
        ),
        (
            "control with an unknown bit",
            &idle,
            Box::new(|st| st.contexts[1].control |= 1 << 31),
        ),
        (
            "a packet in flight past the last context",
            &queued,
            in_flight(4, 1),
        ),
        (
            "a packet in flight on a disabled context",
            &queued,
            in_flight(1, 0),
        ),
        (
            "a packet in flight on a faulted context",
            &queued,
            in_flight(2, 0),
        ),
        (
            "a packet in flight that is not the head",
            &queued,
            in_flight(0, 2),
        ),
        ("a packet in flight already done", &queued, in_flight(0, 0)),
        (
            "a packet in flight on an idle context",
            &idle,
            in_flight(0, 1),
        ),
        (
            "a packet in flight on a context that faulted",
            &queued,
            Box::new(|st| st.contexts[0].fault = Some((fault::NOT_PRESENT, SYS_VA))),
        ),
        (
            "another vendor id",
            &idle,
            Box::new(|st| st.config[0] ^= 0x0000_0001),
        ),
        (
            "another device id",
            &idle,
            Box::new(|st| st.config[0] ^= 0x0001_0000),
        ),
        (
            "configuration space cut short",
            &idle,
            Box::new(|st| {
                st.config.pop();
            }),
        ),
        (
            "an MSI-X vector too many",
            &idle,
            Box::new(|st| st.msix_table.push([0; 4])),
        ),
        (
            "an MSI-X vector too few",
            &idle,
            Box::new(|st| {
                st.msix_table.pop();
            }),
        ),
    ];

    let b = fresh();
    let fresh = fingerprint(&b);
    assert_ne!(fresh, s_regs);
    for (what, base, mutate) in &cases {
        let mut st = (*base).clone();
        mutate(&mut st);
        assert_ne!(&st, *base, "{what}: the mutation changed nothing");
        let err = b.dev.restore(&st);
        assert!(err.is_err(), "{what}: restored");
        assert_eq!(fingerprint(&b), fresh, "{what}: {err:?} changed the vGPU");
    }

    // The states mutated are acceptable as they are: the refusals were the mutations'.
    b.dev.restore(&idle).unwrap();
    assert_eq!(
        fingerprint(&b),
        s_regs,
        "the restored vGPU reads as the original"
    );
    let mut c = restored(&queued, &copy_memory(&s));
    assert_eq!(c.wait(0, 2), wait::DONE);
    assert_eq!(c.cr(0, regs::CTX_RING_HEAD), 3);
    let filled: u32 = c.spaces.sys.read_obj(GuestAddress(B0 + 0xfc)).unwrap();
    assert_eq!(filled, 0x5a5a_5a5a);

    // What a guest can make by reprogramming an enabled context (only an enable checks the
    // ring) restores: the ring is checked when the context next runs.
    let mut odd = idle.clone();
    odd.contexts[0].ring_size = 3;
    odd.contexts[0].ring_base = RING_VA + 0x40;
    odd.contexts[0].control |= ctx_control::SUPPRESS;
    odd.contexts[0].tail_addr = SYS_VA + 0xc004;
    let mut d = Gpu::new();
    d.dev.restore(&odd).unwrap();
    assert_eq!(d.cr(0, regs::CTX_RING_SIZE), 3);
}

#[test]
fn timestamps_go_on_from_the_saved_clock() {
    let mut s = fresh();
    s.setup_ctx(0, T0, B0, 8);
    // 20 ms of work: the saved clock is well past a fresh vGPU's.
    assert_eq!(
        s.run(
            0,
            T0,
            &[Packet::new(
                packet::OP_DISPATCH,
                kernel::SPIN_US,
                &[20_000, 1]
            )],
            1
        ),
        wait::DONE
    );
    s.dev.pause(PAUSE).unwrap();
    let state = s.dev.save().unwrap();
    assert!(state.timestamp_ns >= 20_000_000, "{}", state.timestamp_ns);
    let mem = copy_memory(&s);
    // As saved, and as a VM that had run 30 s would have it.
    let mut later = state.clone();
    later.timestamp_ns += 30_000_000_000;
    for st in [&state, &later] {
        let mut b = restored(st, &mem);
        let t0 = timestamp(&b);
        assert!(
            t0 >= st.timestamp_ns,
            "TIMESTAMP {t0} after a restore at {}",
            st.timestamp_ns
        );
        assert!(
            t0 < st.timestamp_ns + PATIENCE.as_nanos() as u64,
            "TIMESTAMP {t0} jumped from {}",
            st.timestamp_ns
        );
        let t1 = timestamp(&b);
        assert!(t1 >= t0, "TIMESTAMP went back from {t0} to {t1}");
        // What a TIMESTAMP packet writes goes on too.
        assert_eq!(
            b.run(
                0,
                T0,
                &[Packet::new(packet::OP_TIMESTAMP, 0, &[SYS_VA + 0xe000])],
                2
            ),
            wait::DONE
        );
        let t2: u64 = b.spaces.sys.read_obj(GuestAddress(B0 + 0xe000)).unwrap();
        assert!(t2 >= t1, "a TIMESTAMP packet wrote {t2} after {t1}");
    }
}

/// A VMM drops a vGPU it paused (a VM that ends after a snapshot, a migration's source): the
/// command processor must stop, whether it was parked between packets or inside one.
/// Context 0 running a dispatch of 1000 groups of 5 ms, started.
fn busy_with_a_long_dispatch(g: &mut Gpu) {
    g.setup_ctx(0, T0, B0, 8);
    g.submit(
        0,
        T0,
        &[Packet::new(
            packet::OP_DISPATCH,
            kernel::SPIN_US,
            &[5_000, 1000],
        )],
    );
    let deadline = Instant::now() + PATIENCE;
    while g.cr(0, regs::CTX_STATUS) & ctx_status::BUSY == 0 {
        assert!(Instant::now() < deadline, "the dispatch never started");
        std::hint::spin_loop();
    }
}

#[test]
fn a_paused_vgpu_can_be_dropped() {
    let drops = |mid_packet: bool| {
        let mut g = Gpu::new();
        if mid_packet {
            busy_with_a_long_dispatch(&mut g);
        }
        g.dev.pause(PAUSE).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(g);
            let _ = tx.send(());
        });
        // A thread left spinning if it fails; the test process ends it.
        rx.recv_timeout(Duration::from_secs(10)).is_ok()
    };
    let (between, inside) = (drops(false), drops(true));
    assert!(
        between && inside,
        "a vGPU paused between packets dropped: {between}; inside a packet: {inside}"
    );
}

/// Live migration's half that KVM cannot see: while the dirty log is on, every page the
/// engines write (a FILL of guest RAM, a COPY into VRAM, the fence) is in the next
/// `take_dirty_log`, and nothing the device only read; taking empties it; off, nothing is
/// recorded.
#[test]
fn the_dirty_log_holds_every_page_the_engines_wrote_and_only_those() {
    let mut g = Gpu::new();
    let mut b = g.setup_ctx(0, T0, B0, 16);
    let over = crate::device::MAX_DIRTY_PAGES + 1;
    for p in 0..over {
        b.map(
            &g.spaces,
            BIG_VA + p * 0x1000,
            (p * 0x1000) | RW | pte::VRAM,
            1,
        );
    }
    let fill = |va: u64, len: u64| Packet::new(packet::OP_FILL, 0, &[va, len, 0x5a5a_5a5a]);
    let copy = |src: u64, dst: u64, len: u64| Packet::new(packet::OP_COPY, 0, &[src, dst, len]);
    // Off: nothing recorded.
    assert_eq!(g.run(0, T0, &[fill(SYS_VA, 0x100)], 1), wait::DONE);
    g.dev.start_dirty_log();
    assert_eq!(g.dev.take_dirty_log(), Default::default());
    // Two pages of guest RAM filled (crossing a page boundary), one VRAM page copied into
    // from guest RAM (read only), the fence page.
    assert_eq!(
        g.run(
            0,
            T0,
            &[
                fill(SYS_VA + 0x1ff0, 0x20),
                copy(SYS_VA + 0x5000, VRAM_VA + 0x3000, 0x800),
            ],
            2
        ),
        wait::DONE
    );
    let d = g.dev.take_dirty_log();
    let page = |pa: u64| pa / crate::device::DIRTY_PAGE;
    let sys: Vec<u64> = d.sys.iter().copied().collect();
    assert_eq!(
        sys,
        vec![page(B0 + 0x1000), page(B0 + 0x2000), page(B0 + 0xf000)],
        "guest RAM pages written: the fill's two and the fence's"
    );
    let vram: Vec<u64> = d.vram.iter().copied().collect();
    assert_eq!(
        vram,
        vec![page(B0 + 0x3000)],
        "VRAM page written by the copy"
    );
    // Taken: empty until the next write.
    assert_eq!(g.dev.take_dirty_log(), Default::default());
    // Guest CPU writes that reach the device (a trapped aperture; a mapped one is KVM's).
    g.dev.write_bar(pci::BAR_VRAM, 0x4_0000, &[1, 2, 3, 4]);
    let d = g.dev.take_dirty_log();
    assert_eq!(d.vram.into_iter().collect::<Vec<_>>(), vec![page(0x4_0000)]);
    assert!(d.sys.is_empty());
    // More pages than the log keeps: it says "everything" and keeps nothing (its memory
    // stays bounded); taking it starts over.
    assert_eq!(
        g.run(0, T0, &[fill(BIG_VA, over * crate::device::DIRTY_PAGE)], 3),
        wait::DONE
    );
    let d = g.dev.take_dirty_log();
    assert!(d.all && d.sys.is_empty() && d.vram.is_empty(), "{d:?}");
    assert_eq!(g.dev.take_dirty_log(), Default::default());
    g.dev.stop_dirty_log();
    assert_eq!(g.run(0, T0, &[fill(SYS_VA, 0x100)], 4), wait::DONE);
    assert_eq!(g.dev.take_dirty_log(), Default::default());
}

/// A vfio-user client may send anything while its vGPU is stopped for a migration: a function
/// reset ends the pause's wait at once (not after the reset's 10 s timeout), and a change of
/// the DMA memory while a packet that uses it is parked is refused (it would wait for that
/// packet forever) and goes through once the vGPU runs again.
#[test]
fn a_paused_vgpu_takes_a_reset_at_once_and_refuses_a_dma_change_inside_a_packet() {
    let mut g = Gpu::new();
    busy_with_a_long_dispatch(&mut g);
    g.dev.pause(PAUSE).unwrap();
    let inside = g.dev.save().unwrap().in_flight.is_some();
    let change = g
        .dev
        .set_dma(g.spaces.sys.clone(), DmaDomain::new([(0, RAM)]));
    if inside {
        assert!(
            matches!(change, Err(crate::backend::BackendError::Paused)),
            "{change:?}"
        );
    }
    let t = Instant::now();
    g.w(regs::RESET, regs::RESET_VALUE);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "reset took {:?}",
        t.elapsed()
    );
    g.dev.resume();
    g.dev
        .set_dma(g.spaces.sys.clone(), DmaDomain::new([(0, RAM)]))
        .expect("a running vGPU's memory changes");
    // Working again after the reset.
    g.setup_ctx(0, T0, B0, 8);
    assert_eq!(
        g.run(0, T0, &[fence_pkt(FENCE_VA, 7, false)], 7),
        wait::DONE
    );
}
