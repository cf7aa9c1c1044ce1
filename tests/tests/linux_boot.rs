//! Linux guests.
//!
//! - The minimal kernel (guest-images/minimal-kernel.sh) boots in Tessera, enumerates PCI (host
//!   bridge and vGPU), panics for want of a root file system and, with `panic=-1`, reboots:
//!   the VM ends by itself (the README's example). On PVM hosts the
//!   kernel's ring-0 code is emulated: measured there, the host bridge line appears after
//!   ~8 s of guest time (~10 s wall) on an idle machine; the deadline is 240 s to absorb a
//!   loaded CI machine.
//! - Where KVM is hardware (not PVM), the stock Debian kernel with the busybox initramfs boots
//!   to `tessera-guest: ready`, runs a command and leaves through the debug-exit port.

use std::time::Duration;

use tessera_tests::{spawn_debian, spawn_minimal};

#[test]
fn minimal_kernel_enumerates_pci() {
    let Some(mut vm) = spawn_minimal("panic=-1") else {
        return;
    };
    let deadline = Duration::from_secs(240);
    vm.expect_line("Linux version", deadline);
    vm.expect_line("found SMP MP-table", deadline);
    vm.expect_line("PCI host bridge to bus 0000:00", deadline);
    let t = vm.expect_line(
        "pci 0000:00:00.0: [1b36:0008] type 00 class 0x060000",
        deadline,
    );
    eprintln!("minimal kernel enumerated the host bridge after {t:?} (wall clock)");
    vm.expect_line(
        "pci 0000:00:01.0: [7e55:0001] type 00 class 0x030200",
        deadline,
    );
    assert!(!vm.saw("Kernel panic"), "{}", vm.transcript.join("\n"));
    // No root file system: the kernel panics, reboots at once (panic=-1) and the VM ends
    // (a guest reset is status 0).
    let status = vm.wait(deadline);
    assert!(vm.saw("Kernel panic"), "{}", vm.transcript.join("\n"));
    assert_eq!(status.code(), Some(0), "{}", vm.transcript.join("\n"));
}

#[test]
fn stock_debian_kernel_reaches_user_space() {
    let Some(mut vm) = spawn_debian(
        "exit,7",
        &["--cpus", "2", "--memory", "512M"],
        &[],
        "the stock Debian image runs only on hardware KVM",
    ) else {
        return;
    };
    let deadline = Duration::from_secs(120);
    vm.expect_line("tessera-guest: ready", deadline);
    assert_eq!(
        vm.wait(deadline).code(),
        Some(7),
        "{}",
        vm.transcript.join("\n")
    );
}
