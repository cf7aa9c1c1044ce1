//! Many vGPUs on one physical GPU: a hung vGPU is reset alone by the watchdog (TDR) while its
//! neighbours keep their throughput, and its VRAM is reclaimed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vgpu::VgpuSetup;
use vgpu::host::{HostClient, HostError};
use vgpu::physical::{GpuSpec, PhysicalGpu};
use vgpu::sched::Policy;
use vgpu_abi::{Packet, fault, kernel, packet};

const PROFILE: vgpu::Profile = vgpu::Profile {
    name: "t",
    vram: 2 << 20,
    contexts: 2,
    engines: 2,
};

fn spin(us: u64, groups: u64) -> Packet {
    Packet {
        opcode: packet::OP_DISPATCH,
        flags: kernel::SPIN_US,
        args: [us, groups, 0, 0, 0, 0, 0],
    }
}

fn client(gpu: &Arc<PhysicalGpu>, watchdog: Duration) -> (HostClient, vgpu::physical::Lease) {
    let lease = gpu.lease(&PROFILE, None).expect("lease");
    let setup = VgpuSetup {
        watchdog,
        ..VgpuSetup::from_lease(&lease)
    };
    let c = HostClient::new(setup, 4 << 20).expect("client");
    (c, lease)
}

struct Outcome {
    /// Neighbour jobs per second over the whole run.
    rate: f64,
    /// With a hung vGPU: neighbour jobs per second while it was hung, and after its reset.
    hung_rate: f64,
    after_rate: f64,
    /// GPU time the hung vGPU held past its limit (the reset plus the workgroups in flight).
    overrun: Duration,
    /// The hung vGPU's share of GPU time while it was hung.
    hung_share: f64,
}

/// Runs 4 busy neighbours for `dur`, optionally next to a vGPU whose job runs far past its
/// watchdog.
fn run(gpu: &Arc<PhysicalGpu>, dur: Duration, hung: bool) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..4 {
        let (mut c, lease) = client(gpu, vgpu::device::DEFAULT_WATCHDOG);
        let (stop, done) = (stop.clone(), done.clone());
        threads.push(std::thread::spawn(move || {
            let _lease = lease;
            let mut inflight = std::collections::VecDeque::new();
            while !stop.load(Ordering::Relaxed) {
                inflight.push_back(c.submit(&[spin(250, 8)]).expect("submit"));
                if inflight.len() >= 4 {
                    c.wait(inflight.pop_front().expect("fence"))
                        .expect("neighbour job");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let start = Instant::now();
    let mut overrun = Duration::ZERO;
    let mut hung_share = 0.0;
    let mut at_fault = (0, Duration::ZERO);
    if hung {
        let watchdog = Duration::from_millis(150);
        let (mut c, lease) = client(gpu, watchdog);
        let err = c
            .run(&[spin(1000, 60_000)])
            .expect_err("the watchdog must fire");
        assert!(
            matches!(
                err,
                HostError::Fault {
                    code: fault::TIMEOUT,
                    ..
                }
            ),
            "{err}"
        );
        let held = Duration::from_nanos(c.device().expect("in-process vGPU").sched_stats().busy_ns);
        overrun = held.saturating_sub(watchdog);
        hung_share = held.as_secs_f64() / start.elapsed().as_secs_f64();
        at_fault = (done.load(Ordering::Relaxed), start.elapsed());
        assert_eq!(
            c.device().expect("in-process vGPU").counters().2,
            1,
            "one watchdog reset"
        );
        eprintln!(
            "hung vGPU faulted after {:?}, having held the GPU {held:?}; neighbours done {}",
            start.elapsed(),
            done.load(Ordering::Relaxed)
        );
        drop(c);
        drop(lease);
    }
    std::thread::sleep(dur.saturating_sub(start.elapsed()));
    stop.store(true, Ordering::Relaxed);
    let end = (done.load(Ordering::Relaxed), start.elapsed());
    for t in threads {
        t.join().expect("neighbour thread");
    }
    let rate = |jobs: u64, t: Duration| jobs as f64 / t.as_secs_f64().max(1e-9);
    Outcome {
        rate: rate(end.0, end.1),
        hung_rate: rate(at_fault.0, at_fault.1),
        after_rate: rate(end.0 - at_fault.0, end.1 - at_fault.1),
        overrun,
        hung_share,
    }
}

#[test]
fn hung_vgpu_is_reset_alone_and_its_vram_reclaimed() {
    let spec = GpuSpec {
        policy: Policy::EqualShare,
        slice: Duration::from_millis(2),
        ..GpuSpec::whole(16 << 20, 2)
    };
    let gpu = PhysicalGpu::new(&spec).expect("gpu");
    let before = gpu.available_instances(&PROFILE);
    let dur = Duration::from_millis(1500);
    let alone = run(&gpu, dur, false);
    let hung = run(&gpu, dur, true);
    eprintln!(
        "neighbour jobs/s: alone {:.0}; while one vGPU hung {:.0}; after its reset {:.0}; \
         the hung vGPU held the GPU {:?} past its limit",
        alone.rate, hung.hung_rate, hung.after_rate, hung.overrun
    );
    // While hung it gets no more than its fair fifth of GPU time, then the watchdog resets it.
    assert!(
        hung.hung_share <= 0.25,
        "the hung vGPU took {:.2} of the GPU",
        hung.hung_share
    );
    // They kept running through it and after it. (Their speed is compared side by side by
    // `tessera bench sched`; two runs on a shared 2-core machine are too noisy to compare.)
    assert!(
        hung.hung_rate > 0.0 && hung.after_rate > 0.0,
        "neighbours stalled"
    );
    assert!(
        hung.overrun < Duration::from_millis(10),
        "reset took {:?} past the limit",
        hung.overrun
    );
    assert_eq!(
        gpu.available_instances(&PROFILE),
        before,
        "all VRAM reclaimed"
    );
}
