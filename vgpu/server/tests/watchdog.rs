//! The watchdog fires on its own: a packet past its GPU-time budget is stopped and its vGPU
//! reset even when no other vGPU wants the GPU, in-process and over vfio-user (the server's
//! `Daemon`), with one long dispatch and with a ring of many medium ones. Packets under the
//! budget are never stopped, however long the ring they are in.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vgpu::VgpuSetup;
use vgpu::host::{HostClient, HostError};
use vgpu::physical::{GpuSpec, PhysicalGpu};
use vgpu::sched::Params;
use vgpu_abi::{Packet, fault, kernel, limits, packet};
use vgpu_server::{Daemon, ServeOptions};

const WATCHDOG: Duration = Duration::from_millis(300);
/// What the guest may wait past the budget: one slice (2 ms) and one spin check, plus a wide
/// margin for a loaded CI machine. Before the fix a 1 s × 12 packet took 6 s, a giant one
/// hours.
const LATE: Duration = Duration::from_millis(900);

fn spin(us: u64, groups: u64) -> Packet {
    Packet::new(packet::OP_DISPATCH, kernel::SPIN_US, &[us, groups])
}

fn assert_timeout(r: Result<(), HostError>, what: &str) {
    match r {
        Err(HostError::Fault { code, .. }) if code == fault::TIMEOUT => {}
        other => panic!("{what}: expected a TIMEOUT fault, got {other:?}"),
    }
}

/// Runs the three cases, each on a fresh client from `client` (a TDR resets the vGPU, so a
/// client cannot go on after one).
fn cases(mut client: impl FnMut() -> HostClient) {
    // One giant dispatch: MAX_SPIN_US × MAX_SPIN_GROUPS is 18 hours of GPU time.
    let mut c = client();
    let t = Instant::now();
    let r = c.run(&[spin(limits::MAX_SPIN_US, limits::MAX_SPIN_GROUPS)]);
    let took = t.elapsed();
    assert_timeout(r, "giant dispatch");
    assert!(
        took < WATCHDOG + LATE,
        "giant dispatch faulted after {took:?}"
    );
    assert!(
        took >= WATCHDOG,
        "giant dispatch faulted before its budget ({took:?})"
    );
    drop(c);

    // A ring of medium packets, each past the budget (1 s workgroups, 12 of them).
    let mut c = client();
    let t = Instant::now();
    let fence = c.submit(&vec![spin(1_000_000, 12); 16]).expect("submit");
    let r = c.wait(fence);
    let took = t.elapsed();
    assert_timeout(r, "ring of medium packets");
    assert!(
        took < WATCHDOG + LATE,
        "medium packet faulted after {took:?}"
    );
    drop(c);

    // Packets under the budget are never stopped, though the ring runs longer than it.
    let mut c = client();
    let t = Instant::now();
    c.run(&vec![spin(25_000, 4); 24])
        .expect("packets under the budget complete");
    assert!(t.elapsed() > WATCHDOG, "the ring must outlast one budget");
}

#[test]
fn watchdog_fires_without_contention_in_process() {
    let gpu = PhysicalGpu::new(&GpuSpec::whole(64 << 20, 2)).expect("GPU");
    let profile = *vgpu::profile::find("64M").expect("profile");
    let mut leases = Vec::new();
    cases(|| {
        // The previous client is gone: its VRAM goes back before the next lease.
        leases.clear();
        let lease = gpu.lease(&profile, None).expect("lease");
        let setup = VgpuSetup {
            watchdog: WATCHDOG,
            ..VgpuSetup::from_lease(&lease)
        };
        let c = HostClient::new(setup, 16 << 20).expect("client");
        leases.push(lease);
        c
    });
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn watchdog_fires_without_contention_over_vfio_user() {
    let gpu = PhysicalGpu::new(&GpuSpec::whole(256 << 20, 2)).expect("GPU");
    let dir = temp_dir("watchdog");
    let daemon = Daemon::new(
        gpu,
        ServeOptions {
            dir: dir.clone(),
            watchdog: WATCHDOG,
            ..ServeOptions::default()
        },
    )
    .expect("server");
    let profile = vgpu::profile::find("64M").expect("profile");
    let info = daemon
        .create(profile, Some("w".into()), None, Params::default())
        .expect("instance");
    let socket = Arc::new(info.socket);
    cases(|| {
        // The previous client's detach may still be running: the instance takes the next
        // client once it is done (the connection waits in the backlog).
        vgpu_server::remote::connect(&socket, 16 << 20, true).expect("attach")
    });
    drop(daemon);
    let _ = std::fs::remove_dir_all(dir);
}
