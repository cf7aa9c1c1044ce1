//! The seccomp sandbox end to end (the firmware guest still runs with a vGPU under the
//! filters), and regression tests of bugs found by fuzzing.

mod isolation;

use devices::pci::PciDeviceSync;
use std::time::{Duration, Instant};
use vgpu_abi::{ctx_status, fault, pci};
use vgpu_abi::{regs, wait};

use isolation::*;

// ---------------------------------------------------------------------------------------------
// The seccomp sandbox, end to end.

#[test]
fn firmware_with_a_vgpu_runs_under_seccomp() {
    let Some(fw) = tessera_tests::firmware() else {
        return;
    };
    let fw = fw.to_str().expect("utf-8 path");
    for (cmdline, want) in [("run=info exit=7", 7), ("run=conformance", 0)] {
        let (status, out, err) = tessera_tests::run_tessera(
            &[
                "vm",
                "--kernel",
                fw,
                "--cmdline",
                cmdline,
                "--memory",
                "256M",
                "--vgpu",
                "64M",
                "--seccomp",
                "true",
            ],
            &[],
        );
        assert!(!err.contains("panicked"), "stderr: {err}");
        assert_eq!(
            status.code(),
            Some(want),
            "{cmdline}: status {status:?}\n{out}\n{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Regression tests of bugs found by fuzzing (`cargo xtask fuzz`), fixed in 3e15af9.

/// Found by `bar0_registers` (input `03 00 42 b4`: an 8-byte read at BAR0 + 0x4200): an MMIO
/// read wider than 4 bytes of the MSI-X table panicked in `MsixState::read_table`.
#[test]
fn wide_read_of_the_msix_table_does_not_panic() {
    let p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
    let mut d = [0xffu8; 8];
    p.a.dev
        .read_bar(pci::BAR_REGS, pci::MSIX_TABLE_OFFSET + 0x200, &mut d);
    assert_eq!(d, [0; 8]);
}

/// A tail published behind head (or more than a ring ahead of it) names no real packets:
/// the context must fault `RING_CONFIG` at once, not execute up to 2^32 stale ring slots.
/// Found by the `command_stream` fuzz target (a batch that never finished: head had run
/// 19 million packets past a tail of 8).
#[test]
fn a_tail_behind_head_faults_instead_of_running_stale_slots() {
    let mut p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
    let a = &mut p.a;
    assert_eq!(a.run(0, &[]), wait::DONE);
    assert_eq!(a.run(1, &[]), wait::DONE);
    for behind in [true, false] {
        let head = a.tails[0];
        let bad = if behind {
            head.wrapping_sub(1)
        } else {
            head.wrapping_add(RING_ENTRIES + 1)
        };
        a.cw(0, regs::CTX_RING_TAIL, bad);
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.cr(0, regs::CTX_STATUS) & ctx_status::FAULTED == 0 {
            assert!(
                Instant::now() < deadline,
                "tail {bad:#x} with head {head:#x}: no fault, head now {:#x}",
                a.cr(0, regs::CTX_RING_HEAD)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(a.fault_of(0).0, fault::RING_CONFIG);
        assert_eq!(a.cr(0, regs::CTX_RING_HEAD), head, "nothing ran");
        a.recover(0);
        assert_eq!(a.run(0, &[]), wait::DONE, "recovers after a context reset");
    }
    // The other context never noticed.
    assert_eq!(a.run(1, &[]), wait::DONE);
}

/// A ring base moved to the top of the address space after the context was enabled (only
/// enabling validates it): the next packet address must fault, not overflow. Found while
/// writing the `bar0_registers` seeds (`ring-at-top`): `Processor::step` added the slot offset
/// unchecked, and the command processor panicked in debug builds.
#[test]
fn ring_base_moved_to_the_top_faults_instead_of_overflowing() {
    let mut p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
    let a = &mut p.a;
    assert_eq!(a.run(0, &[]), wait::DONE);
    let next = a.tails[0];
    a.cw(0, regs::CTX_RING_BASE_HI, 0xffff_ffff);
    a.cw(0, regs::CTX_RING_BASE_LO, 0xffff_ffc0);
    a.cw(0, regs::CTX_RING_TAIL, next + 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.cr(0, regs::CTX_STATUS) & ctx_status::FAULTED == 0 {
        assert!(
            Instant::now() < deadline,
            "the context neither faulted nor ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(a.fault_of(0).0, fault::VA_RANGE);
    assert!(a.reset() < Duration::from_secs(2));
}
