//! Resource abuse: ring floods, giant dispatches (the watchdog), fence and interrupt storms,
//! huge copies in bounded host memory, RESET under load.

mod isolation;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vgpu::DmaDomain;
use vgpu::physical::{GpuSpec, PhysicalGpu};
use vgpu_abi::{Packet, ctx_status, fault, int, kernel, limits, packet, pci, pte};
use vgpu_abi::{regs, wait};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use isolation::*;

// ---------------------------------------------------------------------------------------------
// Resource abuse.

#[test]
fn ring_flood_keeps_other_contexts_and_vgpus_served_and_reset_quick() {
    let mut p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
    let a = &mut p.a;
    // Context 0: the largest ring, full of short spins (4096 × 2 × 200 µs of GPU time: about
    // 0.8 s on two engines). A tail further ahead would be a RING_CONFIG fault, not a flood.
    let entries = limits::MAX_RING_ENTRIES;
    let ring_pa = 0x60_0000;
    let mut t = Tables::new(&a.sys, (0x68_0000, 0x70_0000));
    t.map(&a.sys, RING_VA, ring_pa, u64::from(entries) * 64 / 4096, RW);
    let spin = Packet::new(packet::OP_DISPATCH, kernel::SPIN_US, &[200, 2]).to_bytes();
    for slot in 0..u64::from(entries) {
        a.sys
            .write_slice(&spin, GuestAddress(ring_pa + slot * 64))
            .expect("ring");
    }
    a.enable(0, t.root, ring_pa, entries);
    a.cw(0, regs::CTX_RING_TAIL, entries);
    // Doorbell storm on top.
    for _ in 0..10_000 {
        a.w(regs::doorbell(0), 0);
    }
    // Context 1 and VM B are still served promptly.
    let t0 = Instant::now();
    assert_eq!(a.run(1, &[Packet::new(packet::OP_NOP, 0, &[])]), wait::DONE);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "context 1 waited {:?}",
        t0.elapsed()
    );
    let t0 = Instant::now();
    assert_eq!(
        p.b.run(0, &[Packet::new(packet::OP_NOP, 0, &[])]),
        wait::DONE
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "VM B waited {:?}",
        t0.elapsed()
    );
    let a = &mut p.a;
    assert_ne!(
        a.cr(0, regs::CTX_STATUS) & ctx_status::BUSY,
        0,
        "still flooding"
    );
    let took = a.reset();
    assert!(
        took < Duration::from_secs(1),
        "RESET under a ring flood took {took:?}"
    );
    assert_eq!(a.cr(0, regs::CTX_STATUS), 0);
    p.check_host_canaries();
}

#[test]
fn giant_dispatch_is_stopped_by_the_watchdog_while_the_neighbour_runs() {
    let watchdog = Duration::from_millis(300);
    let mut p = Pair::new(watchdog);
    // MAX_SPIN_US × MAX_SPIN_GROUPS: 18 hours of GPU time in one packet.
    let giant = Packet::new(
        packet::OP_DISPATCH,
        kernel::SPIN_US,
        &[limits::MAX_SPIN_US, limits::MAX_SPIN_GROUPS],
    );
    p.a.submit(0, RINGS[0], RING_ENTRIES, &[giant]);
    let started = Instant::now();
    // The neighbour VM keeps its share meanwhile: 4 × 20 ms of spinning finishes.
    let b_work = Packet::new(packet::OP_DISPATCH, kernel::SPIN_US, &[20_000, 4]);
    assert_eq!(p.b.run(0, &[b_work]), wait::DONE);
    let b_took = started.elapsed();
    assert!(
        b_took < Duration::from_secs(5),
        "VM B waited {b_took:?} behind the giant dispatch"
    );
    // A's packet overran the watchdog: the vGPU was reset (TDR) and the fault recorded.
    let a = &mut p.a;
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.r(regs::FAULT_CODE) != fault::TIMEOUT {
        assert!(
            Instant::now() < deadline,
            "no watchdog fault after {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, addr) = a.fault_of(0);
    assert_eq!((code, addr), (fault::TIMEOUT, RING_VA), "context 0 fault");
    assert_ne!(a.r(regs::INT_STATUS) & int::FAULT, 0);
    // After the TDR the vGPU is usable again once the driver sets it up.
    p.setup();
    assert_eq!(
        p.a.run(0, &[Packet::new(packet::OP_NOP, 0, &[])]),
        wait::DONE
    );
    p.check_canaries();
}

#[test]
fn reset_cuts_a_giant_dispatch_short() {
    let mut p = Pair::new(Duration::from_secs(3600));
    let giant = Packet::new(
        packet::OP_DISPATCH,
        kernel::SPIN_US,
        &[limits::MAX_SPIN_US, limits::MAX_SPIN_GROUPS],
    );
    p.a.submit(0, RINGS[0], RING_ENTRIES, &[giant]);
    std::thread::sleep(Duration::from_millis(50));
    let took = p.a.reset();
    assert!(took < Duration::from_secs(3), "RESET took {took:?}");
    assert_eq!(p.a.cr(0, regs::CTX_STATUS), 0);
    assert_filled(p.a.vram(), 0, VRAM, 0, "VRAM scrubbed");
}

#[test]
fn fence_and_interrupt_storms_are_bounded() {
    let mut p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
    let a = &mut p.a;
    a.enable_msix(4);
    a.cw(0, regs::CTX_IRQ_VECTOR, 1);
    let storm = |a: &mut Side, n: u64| {
        let base = a.fences[0];
        let pkts: Vec<Packet> = (1..=n)
            .map(|i| Packet::new(packet::OP_FENCE, packet::FENCE_IRQ, &[FENCE_VA, base + i]))
            .collect();
        for chunk in pkts.chunks(RING_ENTRIES as usize - 1) {
            a.submit(0, RINGS[0], RING_ENTRIES, chunk);
            let last = chunk.last().map(|p| p.args[1]).unwrap_or(0);
            assert_eq!(a.wait(0, last, Duration::from_secs(20)), wait::DONE);
        }
        a.fences[0] = base + n;
    };
    // One message per fence: no amplification.
    storm(a, 2000);
    assert_eq!(a.msis.0.load(Ordering::Relaxed), 2000);
    // Masked in INT_MASK: the status bit latches, no messages.
    a.w(regs::INT_MASK, int::fence(0));
    storm(a, 2000);
    assert_eq!(a.msis.0.load(Ordering::Relaxed), 2000);
    assert_ne!(a.r(regs::INT_STATUS) & int::fence(0), 0);
    a.w(regs::INT_MASK, 0);
    // Masked in the MSI-X entry: one pending bit, not a queue; one message on unmask.
    a.w(pci::MSIX_TABLE_OFFSET + 16 + 12, 1);
    storm(a, 2000);
    assert_eq!(a.msis.0.load(Ordering::Relaxed), 2000);
    assert_eq!(a.r(pci::MSIX_PBA_OFFSET), 1 << 1);
    a.w(pci::MSIX_TABLE_OFFSET + 16 + 12, 0);
    assert_eq!(a.msis.0.load(Ordering::Relaxed), 2001);
    assert_eq!(a.r(pci::MSIX_PBA_OFFSET), 0);
    // A fault storm: 500 faults, each one message on the fault vector.
    a.w(regs::FAULT_VECTOR, 2);
    for _ in 0..500 {
        assert_eq!(a.run(0, &[Packet::new(0x99, 0, &[])]), wait::FAULTED);
        a.recover(0);
    }
    assert_eq!(a.msis.0.load(Ordering::Relaxed), 2501);
    assert_eq!(a.r(regs::FAULT_COUNT), 500);
    p.check_canaries();
}

/// Anonymous memory of this process (guest RAM and VRAM below are memfds: shared, not
/// anonymous), in bytes.
fn rss_anon() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn memfd(size: u64) -> std::fs::File {
    vgpu::backend::memfd("isolation-ram", size, false).expect("memfd")
}

#[test]
fn huge_copies_and_fills_stream_through_bounded_host_memory() {
    const LEN: u64 = 256 << 20;
    let size = 2 * LEN + (16 << 20);
    let sys = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(memfd(size), 0)),
    )])
    .expect("memfd RAM");
    let gpu = PhysicalGpu::new(&GpuSpec::whole(VRAM, 2)).expect("GPU");
    let mut a = Side::new(
        &gpu,
        sys.clone(),
        DmaDomain::new([(0, size)]),
        Duration::from_secs(600),
    );
    let mut t = Tables::new(&sys, (0x10_0000, 0x20_0000));
    t.map(&sys, RING_VA, RINGS[0], 2, RW);
    for mb2 in (16 << 20..size).step_by(2 << 20) {
        t.set(&sys, mb2, 2, mb2 | RW | pte::HUGE);
    }
    a.enable(0, t.root, RINGS[0], RING_ENTRIES);
    let (src, dst) = (16u64 << 20, (16 << 20) + LEN);
    sys.write_obj(0x1234_5678_9abc_def0u64, GuestAddress(src + LEN - 8))
        .expect("write");
    let stop = Arc::new(AtomicBool::new(false));
    let base = rss_anon();
    let peak = Arc::new(AtomicU64::new(base));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_anon(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    assert_eq!(
        a.run(0, &[Packet::new(packet::OP_COPY, 0, &[src, dst, LEN])]),
        wait::DONE
    );
    assert_eq!(
        a.run(
            0,
            &[Packet::new(packet::OP_FILL, 0, &[src, LEN, 0x0101_0101])]
        ),
        wait::DONE
    );
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let v: u64 = sys.read_obj(GuestAddress(dst + LEN - 8)).expect("read");
    assert_eq!(v, 0x1234_5678_9abc_def0, "copied");
    let v: u64 = sys.read_obj(GuestAddress(src + LEN - 8)).expect("read");
    assert_eq!(v, 0x0101_0101_0101_0101, "filled");
    let grew = peak.load(Ordering::Relaxed).saturating_sub(base);
    // The device streams in 1 MiB chunks; other tests in this process allocate a little too.
    assert!(
        grew < 96 << 20,
        "anonymous memory grew by {} MiB for a {} MiB copy",
        grew >> 20,
        LEN >> 20
    );
}
