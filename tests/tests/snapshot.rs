//! Snapshot and restore (issue #22): `tessera vmctl snapshot DIR` writes a paused VM, and
//! `tessera vm --restore DIR` goes on from it in a fresh process.
//!
//! - A firmware VM whose vGPU is in the middle of a long dispatch is restored twice from one
//!   snapshot, side by side: both finish the load with every fence (the firmware counts them
//!   and checks the context never faulted), in the GPU time the load asked for.
//! - The conformance suite snapshotted between two cases passes in full after restore (its
//!   kernels' results are checked bit-exactly by the suite), and the source VM goes on too.
//! - The minimal Linux kernel, snapshotted while its driver's in-kernel self-test runs (the
//!   driver has probed: MSI-X vectors, BARs, contexts), finishes the self-test after restore.
//! - Snapshots that are not whole are refused before anything runs, with one line and exit
//!   status 2; a snapshot of a running VM is refused (pause first).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tessera_tests::{
    Server, Vmm, firmware, firmware_vm, firmware_vm_with, run_tessera, scratch, spawn_minimal_with,
    vmctl, wait_until_vgpu_busy,
};

const T: Duration = Duration::from_secs(120);

/// Pauses the VM behind `sock` and snapshots it to `dir`; returns the reply.
fn pause_and_snapshot(sock: &Path, dir: &Path) -> serde_json::Value {
    let (code, paused) = vmctl(sock, &["pause"]);
    assert_eq!(code, Some(0), "{paused}");
    let (code, snap) = vmctl(sock, &["snapshot", dir.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{snap}");
    assert_eq!(snap["state"], "paused", "{snap}");
    snap
}

fn restore(dir: &Path) -> Vmm {
    Vmm::spawn(&["vm", "--restore", dir.to_str().expect("utf-8")])
}

#[test]
fn a_vm_caught_in_a_long_dispatch_is_restored_twice_and_both_finish() {
    let Some(fw) = firmware() else { return };
    let work = scratch("snap-load");
    let sock = work.join("vm.api");
    let dir = work.join("snap");
    // kind=long: the first dispatch has 4000 groups of 250 µs (a second of GPU time).
    let mut vm = firmware_vm(&fw, "run=load kind=long seconds=3", "64M", "64M", &sock);
    wait_until_vgpu_busy(&sock);
    let snap = pause_and_snapshot(&sock, &dir);
    // RAM and VRAM (64 MiB each) and the state.
    let bytes = snap["snapshot"]["bytes"].as_u64().expect("bytes");
    assert!(bytes > 128 << 20, "{snap}");
    for f in ["state", "memory", "vram.0"] {
        let mode = std::fs::metadata(dir.join(f))
            .expect("snapshot file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
    }
    // The source ends here: the snapshot is all that is left of it.
    assert_eq!(vmctl(&sock, &["shutdown"]).0, Some(0));
    assert_eq!(vm.wait(T).code(), Some(0));
    assert!(!vm.saw("load kind="), "{}", vm.transcript.join("\n"));

    // Two VMs from one snapshot, side by side: independent copies.
    let mut a = restore(&dir);
    let mut b = restore(&dir);
    for v in [&mut a, &mut b] {
        v.expect_line("tessera-fw: load kind=long", T);
        let out = v.transcript.join("\n");
        assert!(v.saw("faults=0"), "{out}");
        let jobs: u64 = v
            .transcript
            .iter()
            .find_map(|l| l.split(" jobs=").nth(1)?.split(' ').next()?.parse().ok())
            .expect("jobs=");
        assert!(jobs > 1, "{out}");
        assert_eq!(v.wait(T).code(), Some(0), "{out}");
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// A VM whose vGPU is served over vfio-user (instance `a` of a `tessera serve`) writing RAM
/// with the GPU and VRAM with its CPU: the snapshot holds the server's migration data
/// (`device.0`: its VRAM and the vGPU's state, STOP_COPY) besides RAM, and two restores on
/// instances `b` and `c` both finish with every word right.
#[test]
fn a_vm_whose_vgpu_is_served_over_vfio_user_is_restored_twice_on_other_instances() {
    let Some(fw) = firmware() else { return };
    let server = Server::start("snap-vfu", &[]);
    let socks = server.instances("64M", &["a", "b", "c"]);
    let work = scratch("snap-vfu-vms");
    let sock = work.join("vm.api");
    let dir = work.join("snap");
    let user = format!("socket={}", socks[0]);
    let mut vm = firmware_vm_with(
        &fw,
        "run=load kind=dirty seconds=4",
        "64M",
        &["--user-device", &user],
        &sock,
    );
    server.wait_busy("a", 0);
    let snap = pause_and_snapshot(&sock, &dir);
    // RAM and VRAM (64 MiB each, VRAM inside the server's data) and the state.
    let bytes = snap["snapshot"]["bytes"].as_u64().expect("bytes");
    assert!(bytes > 128 << 20, "{snap}");
    assert!(std::fs::metadata(dir.join("device.0")).is_ok());
    assert_eq!(vmctl(&sock, &["shutdown"]).0, Some(0));
    assert_eq!(vm.wait(T).code(), Some(0));
    assert!(!vm.saw("load kind="), "{}", vm.transcript.join("\n"));
    // Without an instance to put it on, the restore is refused with one line.
    let (status, _, err) = run_tessera(&["vm", "--restore", dir.to_str().expect("utf-8")], &[]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--user-device"), "{err}");

    let restore_on = |s: &str| {
        Vmm::spawn(&[
            "vm",
            "--restore",
            dir.to_str().expect("utf-8"),
            "--user-device",
            &format!("socket={s}"),
        ])
    };
    let mut b = restore_on(&socks[1]);
    let mut c = restore_on(&socks[2]);
    for v in [&mut b, &mut c] {
        v.expect_line("tessera-fw: load kind=dirty", T);
        let out = v.transcript.join("\n");
        assert!(v.saw("jobs=256") && v.saw("mismatches=0"), "{out}");
        assert_eq!(v.wait(T).code(), Some(0), "{out}");
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn the_conformance_suite_snapshotted_between_cases_passes_after_restore() {
    let Some(fw) = firmware() else { return };
    let work = scratch("snap-conformance");
    let sock = work.join("vm.api");
    let dir = work.join("snap");
    let mut vm = firmware_vm(&fw, "run=conformance", "128M", "256M", &sock);
    vm.expect_line("case kernel-saxpy ok", T);
    pause_and_snapshot(&sock, &dir);
    assert_eq!(vmctl(&sock, &["resume"]).0, Some(0));
    vm.expect_line("tessera-fw: exit", T);
    let cases = vm.assert_conformance(40);
    assert_eq!(vm.wait(T).code(), Some(0));

    let mut r = restore(&dir);
    r.expect_line("tessera-fw: exit", T);
    let out = r.transcript.join("\n");
    // It went on from the snapshot: no boot, and the cases before it did not run again.
    assert!(!r.saw("tessera-fw: boot"), "{out}");
    assert!(!r.saw("case kernel-saxpy ok"), "{out}");
    assert!(
        r.saw(&format!("conformance {cases}/{cases} passed")),
        "{out}"
    );
    assert!(!r.saw("FAIL"), "{out}");
    assert_eq!(r.wait(T).code(), Some(0), "{out}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn the_minimal_kernel_snapshotted_during_its_driver_self_test_finishes_it_after_restore() {
    let work = scratch("snap-linux");
    let sock = work.join("vm.api");
    let dir = work.join("snap");
    let Some(mut vm) = spawn_minimal_with(
        "tessera_vgpu.selftest=1",
        &[
            "--vgpu",
            "profile=256M",
            "--api-socket",
            sock.to_str().expect("utf-8"),
        ],
    ) else {
        return;
    };
    // Probed (vectors allocated, BARs mapped); the self-test has started.
    let deadline = Duration::from_secs(300);
    vm.expect_line("selftest msix ok", deadline);
    pause_and_snapshot(&sock, &dir);
    assert_eq!(vmctl(&sock, &["shutdown"]).0, Some(0));
    vm.wait(T);
    let passed_before = vm
        .transcript
        .iter()
        .filter(|l| l.contains("tessera_vgpu") && l.contains(" ok ("))
        .count();

    let mut r = restore(&dir);
    r.expect_line("selftest: ", deadline);
    let out = r.transcript.join("\n");
    assert!(r.saw("selftest: 13/13 passed"), "{out}");
    // The cases after the snapshot ran in the restored VM.
    let after = r
        .transcript
        .iter()
        .filter(|l| l.contains("tessera_vgpu") && l.contains(" ok ("))
        .count();
    assert_eq!(passed_before + after, 13, "{out}");
    assert!(after > 0, "{out}");
    let _ = std::fs::remove_dir_all(&work);
}

/// The one `tessera:` line of a refused restore.
fn refused(dir: &Path) -> String {
    let (status, out, err) = run_tessera(&["vm", "--restore", dir.to_str().expect("utf-8")], &[]);
    assert_eq!(status.code(), Some(2), "{out}{err}");
    assert!(out.is_empty(), "a refused snapshot ran: {out}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("tessera:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_string()
}

fn flip(path: &Path, at: u64) {
    let mut b = std::fs::read(path).expect("read");
    let i = usize::try_from(at).expect("offset") % b.len();
    b[i] ^= 0x40;
    std::fs::write(path, b).expect("write");
}

#[test]
fn incomplete_or_changed_snapshots_are_refused_with_one_line() {
    let Some(fw) = firmware() else { return };
    let work = scratch("snap-refused");
    let sock = work.join("vm.api");
    let good = work.join("good");
    let mut vm = firmware_vm(&fw, "run=echo exit=7", "32M", "64M", &sock);
    vm.expect_line("tessera-fw: echo ready", T);
    // A running VM is not snapshotted.
    let (code, v) = vmctl(&sock, &["snapshot", good.to_str().expect("utf-8")]);
    assert_eq!(code, Some(1), "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("pause it first")),
        "{v}"
    );
    assert!(!good.join("state").exists());
    // Without a directory: a usage error of vmctl.
    let (status, _, err) = run_tessera(
        &[
            "vmctl",
            "--api-socket",
            sock.to_str().expect("utf-8"),
            "snapshot",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{err}");
    pause_and_snapshot(&sock, &good);
    assert_eq!(vmctl(&sock, &["shutdown"]).0, Some(0));
    vm.wait(T);

    let copy = |name: &str| {
        let d = work.join(name);
        std::fs::create_dir_all(&d).expect("dir");
        for f in ["state", "memory", "vram.0"] {
            std::fs::copy(good.join(f), d.join(f)).expect("copy");
        }
        d
    };
    let line = refused(&work.join("nowhere"));
    assert!(line.contains("nowhere/state"), "{line}");

    let d = copy("not-a-snapshot");
    std::fs::write(d.join("state"), b"hello").expect("write");
    let line = refused(&d);
    assert!(line.contains("not a Tessera snapshot"), "{line}");

    let d = copy("truncated");
    let len = std::fs::metadata(d.join("state")).expect("state").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("state"))
        .expect("open");
    f.set_len(len / 2).expect("truncate");
    let line = refused(&d);
    assert!(line.contains("truncated"), "{line}");

    let d = copy("flipped-state");
    flip(&d.join("state"), len / 3);
    let line = refused(&d);
    assert!(line.contains("corrupt"), "{line}");

    let d = copy("flipped-memory");
    flip(&d.join("memory"), 0x10_0000 + 17);
    let line = refused(&d);
    assert!(line.contains("memory: is corrupt: checksum"), "{line}");

    let d = copy("short-vram");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("vram.0"))
        .expect("open");
    f.set_len(4096).expect("truncate");
    let line = refused(&d);
    assert!(line.contains("vram.0: is 4096 bytes long"), "{line}");

    let d = copy("no-vram");
    std::fs::remove_file(d.join("vram.0")).expect("rm");
    let line = refused(&d);
    assert!(line.contains("vram.0: cannot open"), "{line}");

    // --restore takes the VM's shape from the snapshot: no kernel or devices beside it.
    let (status, _, err) = run_tessera(
        &[
            "vm",
            "--restore",
            good.to_str().expect("utf-8"),
            "--kernel",
            fw.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{err}");
    // The good one still restores: the echo firmware waits for input again.
    let mut r = restore(&good);
    r.send(b"after restore\n");
    r.expect_line("tessera-fw: echo after restore", T);
    let _ = std::fs::remove_dir_all(&work);
}
