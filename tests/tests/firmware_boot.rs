//! The firmware guest in a real KVM VM: CPUs, memory, PCI, exit status, serial in and out.

use std::time::Duration;

use tessera_tests::{Vmm, firmware, run_tessera};

const T: Duration = Duration::from_secs(60);

fn boot(cpus: &str, extra: &str) -> Option<(i32, String)> {
    let fw = firmware()?;
    let fw = fw.to_str().expect("utf-8 path");
    let cmdline = format!("run=info {extra}").trim().to_string();
    let (status, out, err) = run_tessera(
        &[
            "vm",
            "--kernel",
            fw,
            "--cmdline",
            &cmdline,
            "--cpus",
            cpus,
            "--memory",
            "64M",
        ],
        &[],
    );
    assert!(!err.contains("panicked"), "stderr: {err}");
    Some((status.code().expect("exit code"), out))
}

#[test]
fn one_vcpu_64m_reports_cpus_memory_and_host_bridge() {
    let Some((code, out)) = boot("1", "") else {
        return;
    };
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("tessera-fw: boot"), "{out}");
    assert!(out.contains("tessera-fw: cpus 1\r\n"), "{out}");
    // 64 MiB minus the EBDA/BIOS holes below 1 MiB, rounded down.
    assert!(
        out.contains("tessera-fw: memory 63 MiB in 2 ranges"),
        "{out}"
    );
    assert!(
        out.contains("tessera-fw: pci 00:00.0 vendor=1b36 device=0008 class=060000"),
        "{out}"
    );
    assert!(out.contains("tessera-fw: pci 1 functions"), "{out}");
    assert!(out.contains("tessera-fw: cmdline \"run=info\""), "{out}");
}

/// A Cloud Hypervisor command line runs unchanged where the flags mean the same: shared
/// memory, `max` equal to `boot`, `--serial tty`, `--console off`, a device `id`, and
/// `--serial null` (COM1 present, output dropped).
#[test]
fn cloud_hypervisor_flags_that_mean_the_same_are_accepted() {
    let Some(fw) = firmware() else { return };
    let fw = fw.to_str().expect("utf-8");
    for serial in ["tty", "null"] {
        let (status, out, err) = run_tessera(
            &[
                "vm",
                "--kernel",
                fw,
                "--cmdline",
                "run=info exit=3",
                "--cpus",
                "boot=1,max=1",
                "--memory",
                "size=64M,shared=on",
                "--serial",
                serial,
                "--console",
                "off",
            ],
            &[],
        );
        assert_eq!(status.code(), Some(3), "{serial}: {err}");
        assert_eq!(
            out.contains("tessera-fw: exit 3"),
            serial == "tty",
            "{serial}: {out}"
        );
    }
}

/// A typo in the firmware's mode is a usage error (status 2), not a pass.
#[test]
fn an_unknown_run_mode_is_status_2() {
    let Some((code, out)) = boot("1", "run=conformanse") else {
        return;
    };
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("invalid option run=conformanse"), "{out}");
    assert!(out.contains("unknown run mode"), "{out}");
}

#[test]
fn two_vcpus_are_reported() {
    let Some((code, out)) = boot("boot=2", "") else {
        return;
    };
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("tessera-fw: cpus 2\r\n"), "{out}");
}

#[test]
fn debug_exit_status_becomes_the_vmm_status() {
    for status in [3, 42, 255] {
        let Some((code, out)) = boot("1", &format!("exit={status}")) else {
            return;
        };
        assert_eq!(code, status, "{out}");
        assert!(out.contains(&format!("tessera-fw: exit {status}")), "{out}");
    }
}

#[test]
fn guest_exception_is_reported_through_debug_exit() {
    // run=fault executes ud2 at CPL3; the ring-0 handler exits with 128 + 6.
    let Some((code, out)) = boot("1", "run=fault") else {
        return;
    };
    assert_eq!(code, 134, "{out}");
}

#[test]
fn serial_input_reaches_the_guest() {
    let Some(fw) = firmware() else { return };
    let mut vm = Vmm::spawn(&[
        "vm",
        "--kernel",
        fw.to_str().expect("utf-8"),
        "--cmdline",
        "run=echo exit=7",
        "--memory",
        "64M",
    ]);
    vm.expect_line("tessera-fw: echo ready", T);
    vm.send(b"hello from the host\n");
    vm.expect_line("tessera-fw: echo hello from the host", T);
    assert_eq!(vm.wait(T).code(), Some(7));
}

#[test]
fn serial_to_file_and_off() {
    let Some(fw) = firmware() else { return };
    let fw = fw.to_str().expect("utf-8");
    let dir = std::env::temp_dir().join(format!("tessera-serial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let log = dir.join("console.log");
    let log_arg = format!("file={}", log.display());
    let (status, out, _) = run_tessera(
        &[
            "vm",
            "--kernel",
            fw,
            "--cmdline",
            "exit=5",
            "--memory",
            "64M",
            "--serial",
            &log_arg,
        ],
        &[],
    );
    assert_eq!(status.code(), Some(5));
    assert!(out.is_empty(), "stdout must stay empty: {out}");
    let text = std::fs::read_to_string(&log).expect("console log");
    assert!(text.contains("tessera-fw: exit 5"), "{text}");

    let (status, out, _) = run_tessera(
        &[
            "vm",
            "--kernel",
            fw,
            "--cmdline",
            "exit=6",
            "--memory",
            "64M",
            "--serial",
            "off",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(6), "the exit port works without a UART");
    assert!(out.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
