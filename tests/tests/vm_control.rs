//! The VM control socket (`tessera vm --api-socket`, `tessera vmctl`; issue #22's first
//! slice): pause stops every vCPU until resume, info reports it, shutdown ends the VM, and bad
//! requests or flags get clear errors.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tessera_tests::{Vmm, firmware, run_tessera, scratch};

const T: Duration = Duration::from_secs(60);

/// `tessera vmctl --api-socket SOCK OP`: its status and its reply.
fn vmctl(sock: &Path, op: &str) -> (Option<i32>, serde_json::Value) {
    tessera_tests::vmctl(sock, &[op])
}

fn echo_vm(sock: &Path) -> Option<Vmm> {
    let fw = firmware()?;
    let mut vm = Vmm::spawn(&[
        "vm",
        "--kernel",
        fw.to_str().expect("utf-8"),
        "--cmdline",
        "run=echo exit=7",
        "--memory",
        "64M",
        "--cpus",
        "boot=2",
        "--api-socket",
        sock.to_str().expect("utf-8"),
    ]);
    vm.expect_line("tessera-fw: echo ready", T);
    Some(vm)
}

/// While paused, no vCPU runs: the guest reads no serial input and prints nothing; after
/// resume it echoes what it was sent, and ends as it would have.
#[test]
fn a_paused_vm_runs_nothing_until_resumed() {
    let dir = scratch("vmctl-pause");
    let sock = dir.join("vm.api");
    let Some(mut vm) = echo_vm(&sock) else { return };
    let (code, info) = vmctl(&sock, "info");
    assert_eq!(code, Some(0));
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    // Pause returns once every vCPU has stopped.
    let (code, paused) = vmctl(&sock, "pause");
    assert_eq!(code, Some(0), "{paused}");
    assert_eq!(
        (paused["state"].as_str(), paused["vcpus_paused"].as_u64()),
        (Some("paused"), Some(2))
    );
    // A second pause is no error.
    assert_eq!(vmctl(&sock, "pause").0, Some(0));
    vm.send(b"while paused\n");
    let printed = vm.lines_within(Duration::from_millis(700));
    assert!(printed.is_empty(), "a paused guest printed {printed:?}");
    // The guest reads its line as soon as it runs again and then ends, so by the time the
    // reply is made it may already be stopping; it is never still paused.
    let (code, resumed) = vmctl(&sock, "resume");
    assert_eq!((code, &resumed["ok"]), (Some(0), &serde_json::json!(true)));
    assert!(
        matches!(resumed["state"].as_str(), Some("running" | "stopping")),
        "{resumed}"
    );
    vm.expect_line("tessera-fw: echo while paused", T);
    assert_eq!(vm.wait(T).code(), Some(7));
    assert!(!sock.exists(), "the socket outlived its VM");
}

/// Bad requests get an error reply and change nothing; shutdown ends the VM as a power-off.
#[test]
fn bad_requests_are_answered_and_shutdown_ends_the_vm() {
    let dir = scratch("vmctl-bad");
    let sock = dir.join("vm.api");
    let Some(mut vm) = echo_vm(&sock) else { return };
    for junk in [
        &b"reboot\n"[..],
        b"{\"op\":\"explode\"}\n",
        b"{\"op\":\"pause\",\"x\":1}\n",
    ] {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.write_all(junk).expect("send");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("reply");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["ok"], false, "{line}");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("bad request")),
            "{line}"
        );
    }
    // A client that connects and says nothing is given up on; the VM answers the next.
    let silent = UnixStream::connect(&sock).expect("connect");
    let (code, info) = vmctl(&sock, "info");
    assert_eq!((code, info["state"].as_str()), (Some(0), Some("running")));
    drop(silent);
    let (code, v) = vmctl(&sock, "shutdown");
    assert_eq!((code, v["state"].as_str()), (Some(0), Some("stopping")));
    assert_eq!(vm.wait(T).code(), Some(0));
}

/// A socket whose directory is missing, or one in use by another VM, stops `tessera vm` before
/// it boots (status 2, one line); `vmctl` on a socket nobody serves is status 2 too.
#[test]
fn unusable_sockets_are_clear_errors() {
    let Some(fw) = firmware() else { return };
    let fw = fw.to_str().expect("utf-8");
    let dir = scratch("vmctl-errors");
    let missing = dir.join("no/such/dir/vm.api");
    let (status, _, err) = run_tessera(
        &[
            "vm",
            "--kernel",
            fw,
            "--api-socket",
            missing.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("cannot listen on control socket"), "{err}");
    let sock = dir.join("vm.api");
    let Some(mut vm) = echo_vm(&sock) else { return };
    let (status, _, err) = run_tessera(
        &[
            "vm",
            "--kernel",
            fw,
            "--api-socket",
            sock.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("in use by a running VM"), "{err}");
    assert_eq!(vmctl(&sock, "shutdown").0, Some(0));
    assert_eq!(vm.wait(T).code(), Some(0));
    let (status, _, err) = run_tessera(
        &[
            "vmctl",
            "--api-socket",
            sock.to_str().expect("utf-8"),
            "info",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("cannot connect"), "{err}");
}

/// Pausing a VM pauses its in-process vGPU too: its work stops at the next preemption point
/// and its GPU time stands still until resume; then the guest's load finishes with every
/// job's result right (the firmware checks them and counts faults).
#[test]
fn a_paused_vms_vgpu_does_no_work_until_resumed() {
    let Some(fw) = firmware() else { return };
    let dir = scratch("vmctl-vgpu");
    let sock = dir.join("vm.api");
    let mut vm =
        tessera_tests::firmware_vm(&fw, "run=load kind=busy seconds=3", "64M", "64M", &sock);
    let busy = |v: &serde_json::Value| v["vgpu_busy_ns"][0].as_u64().expect("busy ns");
    // (The load prints nothing else until it ends.) Wait until the guest's GPU load runs.
    tessera_tests::wait_until_vgpu_busy(&sock);
    let (code, paused) = vmctl(&sock, "pause");
    assert_eq!(code, Some(0), "{paused}");
    let before = busy(&paused);
    let printed = vm.lines_within(Duration::from_millis(500));
    assert!(printed.is_empty(), "a paused guest printed {printed:?}");
    let still = busy(&vmctl(&sock, "info").1);
    assert_eq!(still, before, "the paused vGPU kept working");
    assert_eq!(vmctl(&sock, "resume").0, Some(0));
    vm.expect_line("tessera-fw: load kind=busy", T);
    assert!(vm.saw("faults=0"), "{}", vm.transcript.join("\n"));
    assert_eq!(vm.wait(T).code(), Some(0));
}
