//! Linux guests.
//!
//! - The minimal kernel (guest-images/minimal-kernel.sh) boots in Tessera until the kernel has
//!   enumerated PCI (host bridge and vGPU with its BARs); the test then stops the VM. On PVM hosts the
//!   kernel's ring-0 code is emulated: measured there, the host bridge line appears after
//!   ~8 s of guest time (~10 s wall) on an idle machine; the deadline is 240 s to absorb a
//!   loaded CI machine.
//! - Where KVM is hardware (not PVM), the stock Debian kernel with the busybox initramfs boots
//!   to `tessera-guest: ready`, runs a command and leaves through the debug-exit port.

use std::time::Duration;

use tessera_tests::{Vmm, guest_file, spawn_debian};

/// The command line for the minimal kernel on PVM hosts: features the emulator cannot run are
/// cleared in the guest too, because CPUID executed by the guest kernel can bypass KVM there.
const MINIMAL_CMDLINE: &str =
    "console=ttyS0 noxsave clearcpuid=smap,smep,popcnt,xsave,cx16,fsgsbase,pcid nopti";

#[test]
fn minimal_kernel_enumerates_pci() {
    let Some(kernel) = guest_file("vmlinux-minimal") else {
        return;
    };
    let mut vm = Vmm::spawn(&[
        "vm",
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--cmdline",
        MINIMAL_CMDLINE,
        "--cpus",
        "1",
        "--memory",
        "128M",
    ]);
    let deadline = Duration::from_secs(240);
    vm.expect_line("Linux version", deadline);
    vm.expect_line("found SMP MP-table", deadline);
    vm.expect_line("PCI host bridge to bus 0000:00", deadline);
    let t = vm.expect_line(
        "pci 0000:00:00.0: [1b36:0008] type 00 class 0x060000",
        deadline,
    );
    eprintln!("minimal kernel enumerated the host bridge after {t:?} (wall clock)");
    assert!(!vm.saw("Kernel panic"), "{}", vm.transcript.join("\n"));
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
