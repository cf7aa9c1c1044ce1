//! Sessions and VMs sharing one GPU (issue #21): shares by weight and a cap, measured by a
//! real `tessera serve`. A test binary of their own: cargo runs test binaries one after
//! another, so no other test's VMs, builds or loads take the CPU these measurements need, and
//! within it they take turns ([`measuring_alone`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tessera_tests::{Server, Vmm, firmware, measuring_alone as measuring, session, user_vm};
use vgpu_session::{Command, Session, WaitResult};

const MINUTE: Duration = Duration::from_secs(60);

/// Keeps four 4 ms SPIN_US jobs queued on a session until `stop` (the spinning engines take
/// both cores of a small host: 16 ms of queued work rides out a client that waits for a CPU).
fn session_load(mut s: Session, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let ctx = s.create_context().expect("context");
        let job = [Command::SpinUs {
            us: 1000,
            groups: 8,
        }];
        let mut queued = std::collections::VecDeque::new();
        while !stop.load(Ordering::Relaxed) {
            queued.push_back(s.submit(ctx, &job).expect("submit"));
            if queued.len() >= 4 {
                let f = queued.pop_front().expect("queued");
                assert_eq!(s.wait(ctx, f, MINUTE).expect("wait"), WaitResult::Done);
            }
        }
    })
}

fn vm_load(server: &Server, name: &str) -> Vmm {
    let socket = server.dir.join(format!("vgpu-{name}.sock"));
    user_vm(
        &socket.display().to_string(),
        "run=load kind=busy seconds=60 us=1000",
    )
}

/// Sessions and VMs share one GPU under one policy: two sessions and two firmware VMs with
/// weights 1:2:4:8 get 1/15, 2/15, 4/15 and 8/15 of the GPU time within 1 % (absolute), as
/// the server measures it.
#[test]
fn sessions_and_vms_share_one_gpu_by_weight() {
    if firmware().is_none() {
        return;
    }
    let _turn = measuring();
    let server = Server::start(
        "session-shares",
        &[
            "--gpu",
            "soft,vram=1G,engines=2",
            "--policy",
            "fixed-share",
            "--create",
            "64M:w1,weight=1",
            "--create",
            "64M:w2,weight=2",
            "--create",
            "64M:w4,weight=4",
            "--create",
            "64M:w8,weight=8",
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sessions = [
        session_load(session(&server, "w1"), stop.clone()),
        session_load(session(&server, "w4"), stop.clone()),
    ];
    let vms = [vm_load(&server, "w2"), vm_load(&server, "w8")];
    let names = ["w1", "w2", "w4", "w8"];
    // Measure once all four are busy.
    let deadline = Instant::now() + MINUTE;
    while names.iter().any(|n| server.busy_ns(n) == 0) {
        assert!(
            Instant::now() < deadline,
            "not all four started: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before: Vec<u64> = names.iter().map(|n| server.busy_ns(n)).collect();
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<u64> = names.iter().map(|n| server.busy_ns(n)).collect();
    stop.store(true, Ordering::Relaxed);
    for t in sessions {
        t.join().expect("session load");
    }
    drop(vms);
    let used: Vec<f64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b) as f64)
        .collect();
    let total: f64 = used.iter().sum();
    for (i, w) in [1.0, 2.0, 4.0, 8.0].iter().enumerate() {
        let share = used[i] / total;
        assert!(
            (share - w / 15.0).abs() <= 0.01,
            "{} got {share:.4} of the GPU, expected {:.4}: {used:?}",
            names[i],
            w / 15.0
        );
    }
}

/// A session capped at 25 % gets 25 % (within 1 %) of an otherwise idle GPU.
#[test]
fn a_capped_session_gets_its_cap_of_an_idle_gpu() {
    let _turn = measuring();
    let server = Server::start("session-cap", &["--create", "64M:c25,cap=25"]);
    let stop = Arc::new(AtomicBool::new(false));
    let load = session_load(session(&server, "c25"), stop.clone());
    let deadline = Instant::now() + MINUTE;
    while server.busy_ns("c25") == 0 {
        assert!(Instant::now() < deadline, "never ran: {}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Past the first window, whose start is not capped yet.
    std::thread::sleep(Duration::from_millis(200));
    let (b0, t0) = (server.busy_ns("c25"), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (b1, t1) = (server.busy_ns("c25"), Instant::now());
    stop.store(true, Ordering::Relaxed);
    load.join().expect("session load");
    let share = (b1 - b0) as f64 / (t1 - t0).as_nanos() as f64;
    assert!(
        (share - 0.25).abs() <= 0.01,
        "capped at 25 %, got {share:.4}"
    );
}
