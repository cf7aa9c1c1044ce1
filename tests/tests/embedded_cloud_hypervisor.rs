//! The vGPU built into Cloud Hypervisor's device manager (`--vgpu profile=…`; issue #24), in the
//! build `cargo xtask cloud-hypervisor` makes from `../shared/src` with
//! `contrib/cloud-hypervisor/`. The Linux driver's self-test in it is in `linux_driver.rs`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_tests::{Vmm, cloud_hypervisor_embedded, firmware, scratch};

/// Cloud Hypervisor booting the firmware with `cmdline`, 128 MiB of shared RAM and `extra`.
fn firmware_vm(ch: &Path, fw: &Path, cmdline: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(ch);
    cmd.arg("--kernel")
        .arg(fw)
        .args(["--cmdline", cmdline])
        .args(["--cpus", "boot=1", "--memory", "size=128M,shared=on"])
        .args(extra)
        .args(["--serial", "tty", "--console", "off"]);
    cmd
}

/// Both vGPUs pass the whole suite: the firmware tests the one at the lowest slot, and a
/// second VM the other way round, so each of two embedded vGPUs (own GPU, own BARs, own
/// MSI-X group) is exercised. An explicit `pci_device_id` is honoured.
#[test]
fn the_conformance_suite_passes_with_the_vgpu_built_into_cloud_hypervisor() {
    let (Some(ch), Some(fw)) = (cloud_hypervisor_embedded(), firmware()) else {
        return;
    };
    for (slot, vgpus) in [
        (
            3,
            [
                "profile=256M,id=gpu0,pci_device_id=3",
                "profile=64M,pci_device_id=6",
            ],
        ),
        (
            4,
            [
                "profile=1G,pci_device_id=7",
                "profile=64M,id=small,pci_device_id=4",
            ],
        ),
    ] {
        let mut vm = Vmm::spawn_with(&mut firmware_vm(
            &ch,
            &fw,
            "run=conformance pci=external",
            &["--vgpu", vgpus[0], "--vgpu", vgpus[1]],
        ));
        vm.expect_line(
            &format!("conformance: vGPU at 00:{slot:02x}.0"),
            Duration::from_secs(60),
        );
        vm.expect_line(" passed", Duration::from_secs(180));
        // The firmware powers off through the ACPI sleep register; Cloud Hypervisor ends.
        let status = vm.wait(Duration::from_secs(60));
        vm.assert_conformance(40);
        assert!(status.success(), "{status}");
        assert!(
            vm.saw("tessera-fw: pci 4 functions"),
            "two vGPUs enumerated"
        );
    }
}

/// Each wrong `--vgpu` is refused before the VM starts, with the reason in Cloud
/// Hypervisor's error chain.
#[test]
fn bad_vgpu_options_are_refused_with_the_reason() {
    let (Some(ch), Some(fw)) = (cloud_hypervisor_embedded(), firmware()) else {
        return;
    };
    let shared = "size=64M,shared=on";
    for (memory, vgpu, says) in [
        (
            shared,
            "profile=3G",
            r#"unknown profile "3G" (one of 64M, 256M, 1G)"#,
        ),
        (shared, "id=gpu", "profile missing (one of 64M, 256M, 1G)"),
        (shared, "profile=64M,iommu=on", "Unknown option: iommu"),
        (shared, "profile=64M,colour=red", "Unknown option: colour"),
        (
            shared,
            "profile=64M,id=__gpu",
            "Identifier __gpu is not valid",
        ),
        (
            shared,
            "profile=64M,pci_device_id=0",
            "PCI device ID (0) is reserved",
        ),
        (shared, "profile=64M,pci_device_id=32", "PCI device ID"),
        (
            "size=64M",
            "profile=64M",
            "Using --vgpu requires --memory shared=on",
        ),
    ] {
        let out = Command::new(&ch)
            .arg("--kernel")
            .arg(&fw)
            .args(["--cpus", "boot=1", "--memory", memory, "--vgpu", vgpu])
            .args(["--serial", "null", "--console", "off"])
            .output()
            .expect("run cloud-hypervisor");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "--vgpu {vgpu}: {err}");
        assert!(
            err.contains(says),
            "--vgpu {vgpu}: wanted {says:?} in:\n{err}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("tessera-fw: boot"),
            "--vgpu {vgpu}: the VM must not start"
        );
    }
    // Two vGPUs in one slot.
    let out = Command::new(&ch)
        .arg("--kernel")
        .arg(&fw)
        .args(["--cpus", "boot=1", "--memory", shared])
        .args(["--vgpu", "profile=64M,pci_device_id=5"])
        .args(["--vgpu", "profile=64M,pci_device_id=5"])
        .args(["--serial", "null", "--console", "off"])
        .output()
        .expect("run cloud-hypervisor");
    assert_eq!(out.status.code(), Some(1));
}

/// One HTTP request to Cloud Hypervisor's API socket: (status, body).
fn api(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).expect("status line");
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status:?}"));
    let mut len = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().expect("length");
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("body");
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// Waits (at most `within`) until the API socket answers.
fn api_ready(socket: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "no API socket at {socket:?}");
        std::thread::yield_now();
    }
}

/// Snapshot and live migration of a VM with an embedded vGPU are refused with a sentence that
/// says why and what to use instead, and nothing is lost: the VM pauses, resumes and finishes
/// its GPU work without a fault. `vm.info` shows the generated id.
#[test]
fn snapshot_and_migration_are_refused_and_the_vm_runs_on() {
    let (Some(ch), Some(fw)) = (cloud_hypervisor_embedded(), firmware()) else {
        return;
    };
    let dir = scratch("ch-embedded-refusals");
    let socket: PathBuf = dir.join("api.sock");
    let mut vm = Vmm::spawn_with(&mut firmware_vm(
        &ch,
        &fw,
        "run=load kind=busy seconds=4",
        &[
            "--vgpu",
            "profile=64M",
            "--api-socket",
            socket.to_str().expect("utf-8"),
        ],
    ));
    vm.expect_line("tessera-fw: boot", Duration::from_secs(30));
    api_ready(&socket, Duration::from_secs(10));
    let (code, info) = api(&socket, "GET", "vm.info", "");
    assert_eq!(code, 200, "{info}");
    assert!(
        info.contains(r#""vgpus":[{"id":"_vgpu0","pci_segment":0,"profile":"64M"}]"#),
        "{info}"
    );
    assert_eq!(api(&socket, "PUT", "vm.pause", "").0, 204);
    let target = format!(r#"{{"destination_url":"file://{}"}}"#, dir.display());
    let (code, why) = api(&socket, "PUT", "vm.snapshot", &target);
    assert_eq!(code, 500, "{why}");
    assert!(
        why.contains("a VM with a --vgpu device cannot be snapshotted or migrated"),
        "{why}"
    );
    assert!(!dir.join("state.json").exists(), "nothing written");
    assert_eq!(api(&socket, "PUT", "vm.resume", "").0, 204);
    let to = dir.join("migration.sock");
    let (code, why) = api(
        &socket,
        "PUT",
        "vm.send-migration",
        &format!(r#"{{"destination_url":"unix:{}"}}"#, to.display()),
    );
    assert_eq!(code, 500, "{why}");
    assert!(why.contains("use a vGPU served over vfio-user"), "{why}");
    vm.expect_line("tessera-fw: load kind=busy", Duration::from_secs(60));
    let report = vm.transcript.last().cloned().unwrap_or_default();
    assert!(report.contains(" faults=0"), "{report}");
    let status = vm.wait(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}
