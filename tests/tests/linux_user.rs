//! Linux user space over a vGPU, on every transport: the minimal kernel (the `tessera_vgpu`
//! driver built in) boots the initramfs of guest-images/minimal-initramfs.sh, whose /init
//! runs `tessera-user-check`: `tessera-smi`, `tessera-run` (every job in VRAM and in guest
//! RAM) and libtessera's C check, statically and dynamically linked (jobs through the VRAM
//! mmap and in guest RAM, two isolated processes, a fault beside a working neighbour, a
//! process killed mid-job); over vfio-user and in Cloud Hypervisor a quicker subset (see
//! [`Check::Quick`]). /init then reports `tessera-guest: exit N` and leaves the VM
//! through the debug-exit port (Tessera: status N) or Cloud Hypervisor's ACPI power-off.
//!
//! On PVM hosts the kernel needs `pvm_quirks` (guest-images/patches/) to run user space;
//! there the three VMs take 3–4 minutes each (emulated ring 0: every system call, page fault
//! and process start is slow), so they run side by side.

use std::process::Command;
use std::time::Duration;

use tessera_tests::{Server, Vmm, cloud_hypervisor, guest_file, host_is_pvm};

/// How much of the check a VM runs.
#[derive(Clone, Copy, PartialEq)]
enum Check {
    /// Everything (the in-process vGPU).
    Full,
    /// `tessera-smi`, `tessera-run all` in VRAM and the dynamically linked C check (which
    /// uses guest RAM too): what the transports add is the device path, and on a PVM host
    /// each guest step takes seconds.
    Quick,
}

/// [`tessera_tests::MINIMAL_USER_CMDLINE`], `pvm_quirks` on PVM hosts, and the check.
fn cmdline(check: Check) -> String {
    let quirks = if host_is_pvm() { " pvm_quirks" } else { "" };
    let arg = if check == Check::Quick { ",quick" } else { "" };
    format!(
        "{}{quirks} tessera.run=tessera-user-check{arg}",
        tessera_tests::MINIMAL_USER_CMDLINE
    )
}

/// How long a VM may take to end after the check reported (the guest's last steps are
/// process starts, seconds each on a loaded PVM host).
const EXIT: Duration = Duration::from_secs(300);

/// Guest time is emulated on PVM and three VMs share two cores in CI.
const DEADLINE: Duration = Duration::from_secs(900);

/// The kernel and the initramfs, or `None` (skipped) when they were not built.
fn images() -> Option<(String, String)> {
    let kernel = guest_file("vmlinux-minimal")?;
    let initramfs = guest_file("minimal-initramfs.cpio")?;
    Some((
        kernel.to_str()?.to_string(),
        initramfs.to_str()?.to_string(),
    ))
}

/// `tessera vm` with the minimal kernel and initramfs and `device` giving the vGPU.
fn tessera_vm(check: Check, device: &[&str]) -> Option<Vmm> {
    let (kernel, initramfs) = images()?;
    let cmdline = cmdline(check);
    let mut args = vec![
        "vm",
        "--kernel",
        &kernel,
        "--initramfs",
        &initramfs,
        "--cmdline",
        &cmdline,
        "--cpus",
        "1",
        "--memory",
        "256M",
    ];
    args.extend_from_slice(device);
    Some(Vmm::spawn(&args))
}

/// Waits for the check's verdict and asserts that every step ran and passed.
fn assert_user_space_passed(vm: &mut Vmm, check: Check) {
    let t = vm.expect_line("tessera-guest: ready", DEADLINE);
    eprintln!("user space started after {t:?}");
    let t = vm.expect_line("tessera-guest: exit", DEADLINE);
    eprintln!("the check ended after {t:?}");
    let out = vm.transcript.join("\n");
    let failed: Vec<&String> = vm
        .transcript
        .iter()
        .filter(|l| l.contains("FAIL"))
        .collect();
    assert!(failed.is_empty(), "{failed:?}\n{out}");
    assert!(vm.saw("tessera-user-check: passed"), "{out}");
    assert!(vm.saw("tessera-guest: exit 0"), "{out}");
    // tessera-smi listed the device (its PCI address depends on the VMM).
    let abi = format!(
        "Tessera vGPU ABI {}.{}",
        vgpu_abi::VERSION_MAJOR,
        vgpu_abi::VERSION_MINOR
    );
    assert!(
        vm.transcript
            .iter()
            .any(|l| l.starts_with("vgpu0  0000:00:") && l.contains(&abi)),
        "{out}"
    );
    let count = |prefix: &str| {
        vm.transcript
            .iter()
            .filter(|l| l.starts_with(prefix) && l.contains(" ok ("))
            .count()
    };
    // tessera-run: 7 jobs, in VRAM (and in guest RAM); tessera-check: 5 tests, linked
    // dynamically (and statically).
    let runs = if check == Check::Full { 2 } else { 1 };
    assert_eq!(count("tessera-run: "), 7 * runs, "{out}");
    assert_eq!(count("tessera-check: "), 5 * runs, "{out}");
    for test in ["jobs", "sysmem", "isolate", "fault", "kill"] {
        assert_eq!(
            count(&format!("tessera-check: {test} ")),
            runs,
            "{test}:\n{out}"
        );
    }
}

#[test]
fn linux_user_space_runs_over_an_in_process_vgpu() {
    let Some(mut vm) = tessera_vm(Check::Full, &["--vgpu", "profile=256M"]) else {
        return;
    };
    assert_user_space_passed(&mut vm, Check::Full);
    // /init wrote the check's status (0) to the debug-exit port.
    let status = vm.wait(EXIT);
    assert_eq!(status.code(), Some(0), "{}", vm.transcript.join("\n"));
}

#[test]
fn linux_user_space_runs_over_vfio_user() {
    if images().is_none() {
        return;
    }
    let server = Server::start("linux-user", &["--gpu", "soft,vram=1G,engines=2"]);
    let sock = server.ok(&["vgpu", "create", "--type", "256M", "--name", "linux"]);
    let Some(mut vm) = tessera_vm(
        Check::Quick,
        &["--user-device", &format!("socket={}", sock.trim())],
    ) else {
        return;
    };
    assert_user_space_passed(&mut vm, Check::Quick);
    let status = vm.wait(EXIT);
    assert_eq!(status.code(), Some(0), "{}", vm.transcript.join("\n"));
    assert!(
        server.busy_ns("linux") > 0,
        "the guest's work ran on the server"
    );
}

#[test]
fn linux_user_space_runs_in_cloud_hypervisor() {
    let (Some(ch), Some((kernel, initramfs))) = (cloud_hypervisor(), images()) else {
        return;
    };
    let server = Server::start("linux-ch", &["--gpu", "soft,vram=1G,engines=2"]);
    let sock = server.ok(&["vgpu", "create", "--type", "256M", "--name", "ch"]);
    let mut cmd = Command::new(&ch);
    cmd.args(["--kernel", &kernel, "--initramfs", &initramfs])
        .args(["--cmdline", &cmdline(Check::Quick)])
        .args(["--cpus", "boot=1", "--memory", "size=256M,shared=on"])
        .args(["--user-device", &format!("socket={}", sock.trim())])
        .args(["--serial", "tty", "--console", "off"]);
    let mut vm = Vmm::spawn_with(&mut cmd);
    assert_user_space_passed(&mut vm, Check::Quick);
    // No debug-exit port: /init powers off through the ACPI sleep register and Cloud
    // Hypervisor ends by itself.
    let status = vm.wait(EXIT);
    assert!(status.success(), "{status}: {}", vm.transcript.join("\n"));
    assert!(
        server.busy_ns("ch") > 0,
        "the guest's work ran on the server"
    );
}
