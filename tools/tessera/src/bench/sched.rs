//! `tessera bench sched`: vGPUs sharing one physical GPU under each policy, measured side by
//! side in one run.
//!
//! Loads are host-process submitters (`vgpu::host::HostClient`) on the real device model and
//! scheduler: each vGPU has its own command processor and contexts, all share one software
//! GPU's engines. Kernels are SPIN_US dispatches: GPU time is what they consume, so shares are
//! exact to measure. Accounting is the scheduler's GPU-busy time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use vgpu::VgpuSetup;
use vgpu::host::HostClient;
use vgpu::physical::{GpuKind, GpuSpec, PhysicalGpu};
use vgpu::sched::{Params, Policy};
use vgpu_abi::{Packet, kernel, packet};

use super::median;

/// Options.
#[derive(Debug, Args)]
pub struct SchedArgs {
    /// vGPUs in the fairness run.
    #[arg(long, default_value_t = 8)]
    vgpus: usize,
    /// Policy for the fairness run (best-effort, equal-share, fixed-share, fixed-quantum).
    #[arg(long, default_value = "equal-share")]
    policy: Policy,
    /// Time slice of the fairness phase, e.g. 2ms (1ms to 30ms). With 2 ms slices, 8 vGPUs
    /// and 100 ms windows, whole slices alone bound Jain at 0.9952 (50 slices: six vGPUs get
    /// 6, two get 7).
    #[arg(long, value_name = "DURATION", default_value = "2ms", value_parser = crate::serve_cmd::parse_slice)]
    slice: Duration,
    /// Seconds per phase.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Write an SVG plot of each vGPU's share over time (weighted phase).
    #[arg(long, value_name = "PATH")]
    plot: Option<std::path::PathBuf>,
    /// The GPU the vGPUs share: soft, or a Vulkan device: vulkan[,device=N].
    #[arg(long, value_name = "soft|vulkan[,device=N]", default_value = "soft")]
    gpu: GpuKind,
}

#[derive(Debug, Serialize)]
struct SwitchUs {
    #[serde(rename = "1ms")]
    ms1: f64,
    #[serde(rename = "2ms")]
    ms2: f64,
    #[serde(rename = "10ms")]
    ms10: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    jain: f64,
    jain_min: f64,
    weighted_shares: Vec<f64>,
    weighted_max_err: f64,
    utilization: f64,
    overrun_p99_ms: f64,
    scale64_ratio: f64,
    mem_per_vgpu_kib: f64,
    switch_us: SwitchUs,
    /// Neighbours' GPU share while a fifth vGPU hung, over their fair share (4/5).
    tdr_neighbour_share_ratio: f64,
    /// Neighbours' jobs/s over the hung phase vs the same four alone.
    tdr_neighbour_rate_ratio: f64,
    /// How far past its watchdog limit the hung vGPU's packet ran before the reset (the
    /// watchdog checks at preemption points, so up to a slice plus in-flight workgroups).
    tdr_reset_ms: f64,
    /// Vulkan: the median cost of one submission waited on its fence (each kernel slice and
    /// each COPY/FILL group pays it), µs; absent on the software GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    submit_us: Option<f64>,
}

const ENGINES: usize = 2;
const PROFILE: vgpu::Profile = vgpu::Profile {
    name: "bench",
    vram: 2 << 20,
    contexts: 2,
    engines: ENGINES,
};
/// Submissions each busy load keeps in flight.
const DEPTH: usize = 4;
/// Private memory per host client (page tables, ring, fence).
const CLIENT_MEM: u64 = 4 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// Back-to-back dispatches of `groups` × `us`.
    Busy { us: u64, groups: u64 },
    /// Nothing.
    Idle,
    /// One long dispatch of `groups` × `us`, then busy.
    Long { us: u64, groups: u64 },
    /// A job far past the vGPU's watchdog (150 ms of GPU time); it must fault and reset.
    Hung,
}

/// Watchdog of the `Hung` load's vGPU.
const HUNG_WATCHDOG: Duration = Duration::from_millis(150);

fn spin(us: u64, groups: u64) -> Packet {
    Packet {
        opcode: packet::OP_DISPATCH,
        flags: kernel::SPIN_US,
        args: [us, groups, 0, 0, 0, 0, 0],
    }
}

struct Fleet {
    gpu: Arc<PhysicalGpu>,
    stop: Arc<AtomicBool>,
    done: Vec<Arc<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
    members: Vec<(usize, usize)>,
    /// How far past its watchdog limit the hung vGPU's packet ran (ns), once reset.
    overshoot: Arc<AtomicU64>,
}

impl Fleet {
    fn start(spec: &GpuSpec, loads: &[(Load, Params)]) -> Result<Fleet, String> {
        let gpu = PhysicalGpu::new(spec).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let barrier = Arc::new(Barrier::new(loads.len() + 1));
        let mut done = Vec::new();
        let mut threads = Vec::new();
        let mut members = Vec::new();
        let overshoot = Arc::new(AtomicU64::new(0));
        for (i, &(load, params)) in loads.iter().enumerate() {
            let lease = gpu.lease(&PROFILE, None).map_err(|e| e.to_string())?;
            let watchdog = match load {
                Load::Hung => HUNG_WATCHDOG,
                _ => vgpu::device::DEFAULT_WATCHDOG,
            };
            let setup = VgpuSetup {
                sched_params: params,
                watchdog,
                ..VgpuSetup::from_lease(&lease)
            };
            let client = HostClient::new(setup, CLIENT_MEM).map_err(|e| e.to_string())?;
            members.push((lease.partition(), i));
            let counter = Arc::new(AtomicU64::new(0));
            done.push(counter.clone());
            let (stop, barrier, overshoot) = (stop.clone(), barrier.clone(), overshoot.clone());
            threads.push(std::thread::spawn(move || {
                let _lease = lease;
                let mut client = client;
                barrier.wait();
                let mut first = true;
                // Several submissions in flight, like a driver with a queue: the vGPU always
                // has the next job ready while it holds the GPU.
                let mut inflight = std::collections::VecDeque::new();
                while !stop.load(Ordering::Relaxed) {
                    let pkt = match (load, first) {
                        (Load::Idle, _) | (Load::Hung, false) => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        (Load::Hung, true) => {
                            first = false;
                            // 60 s of work: only the watchdog ends it.
                            match client.run(&[spin(1000, 60_000)]) {
                                Err(vgpu::host::HostError::Fault { code, .. })
                                    if code == vgpu_abi::fault::TIMEOUT =>
                                {
                                    let past = client
                                        .device()
                                        .expect("an in-process vGPU")
                                        .monitor()
                                        .last_tdr_overshoot();
                                    overshoot.store(past.as_nanos() as u64, Ordering::Relaxed);
                                    counter.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                other => {
                                    return Err(format!("the hung vGPU ended with {other:?}"));
                                }
                            }
                        }
                        (Load::Long { us, groups }, true) => spin(us, groups),
                        (Load::Long { .. }, false) => spin(200, 4),
                        (Load::Busy { us, groups }, _) => spin(us, groups),
                    };
                    first = false;
                    inflight.push_back(client.submit(&[pkt]).map_err(|e| e.to_string())?);
                    if inflight.len() >= DEPTH
                        && let Some(f) = inflight.pop_front()
                    {
                        client.wait(f).map_err(|e| e.to_string())?;
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Some(&f) = inflight.back() {
                    client.wait(f).map_err(|e| e.to_string())?;
                }
                Ok(())
            }));
        }
        barrier.wait();
        Ok(Fleet {
            gpu,
            stop,
            done,
            threads,
            members,
            overshoot,
        })
    }

    /// Busy ns of every member (scheduler accounting).
    fn busy(&self) -> Vec<u64> {
        let s = self.gpu.scheduler(0).expect("partition 0");
        self.members
            .iter()
            .map(|&(_, i)| s.stats(i).busy_ns)
            .collect()
    }

    fn finish(self) -> Result<Vec<u64>, String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join()
                .map_err(|_| "a load thread panicked".to_string())??;
        }
        Ok(self
            .done
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect())
    }
}

fn jain(x: &[f64]) -> f64 {
    let s: f64 = x.iter().sum();
    let q: f64 = x.iter().map(|v| v * v).sum();
    if q == 0.0 {
        0.0
    } else {
        s * s / (x.len() as f64 * q)
    }
}

fn spec(kind: GpuKind, policy: Policy, slice: Duration) -> GpuSpec {
    GpuSpec {
        kind,
        policy,
        slice,
        ..GpuSpec::whole(128 << 20, ENGINES)
    }
}

/// Samples busy ns every 100 ms for `secs`; returns per-window deltas.
fn windows(f: &Fleet, secs: f64) -> Vec<Vec<u64>> {
    let mut out = Vec::new();
    let mut prev = f.busy();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        let now = f.busy();
        out.push(now.iter().zip(&prev).map(|(a, b)| a - b).collect());
        prev = now;
    }
    out
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

fn plot(path: &std::path::Path, series: &[Vec<f64>], labels: &[String]) -> Result<(), String> {
    let (w, h, pad) = (720.0, 360.0, 40.0);
    let n = series.first().map_or(0, Vec::len).max(2);
    let colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    ];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{pad}\" y=\"20\">GPU-time share per vGPU (100 ms windows)</text>\n<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - pad,
        w - pad,
        h - pad,
        h - pad
    );
    let ymax = series.iter().flatten().copied().fold(0.1f64, f64::max) * 1.1;
    for (k, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let x = pad + (w - 2.0 * pad) * i as f64 / (n - 1) as f64;
                let y = h - pad - (h - 2.0 * pad) * v / ymax;
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let c = colors[k % colors.len()];
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{c}\">{}</text>\n",
            pts.join(" "),
            w - pad + 2.0 - 30.0,
            pad + 14.0 * k as f64,
            labels[k]
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{pad}\" y=\"{}\">share (max {ymax:.2})</text>\n</svg>\n",
        pad - 4.0
    ));
    std::fs::write(path, svg).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub fn run(args: SchedArgs) -> Result<(), String> {
    let busy = Load::Busy { us: 250, groups: 8 };
    let secs = args.seconds;

    // 1. N busy vGPUs, the chosen policy (equal share by default): Jain over 100 ms windows.
    let f = Fleet::start(
        &spec(args.gpu, args.policy, args.slice),
        &vec![(busy, Params::default()); args.vgpus],
    )?;
    std::thread::sleep(Duration::from_millis(200));
    let w = windows(&f, secs);
    f.finish()?;
    let jains: Vec<f64> = w
        .iter()
        .map(|v| jain(&v.iter().map(|&b| b as f64).collect::<Vec<_>>()))
        .collect();
    let jain_mean = jains.iter().sum::<f64>() / jains.len().max(1) as f64;
    let jain_min = jains.iter().copied().fold(1.0, f64::min);

    // 2. Weights 1:2:4:8: share error over the whole phase.
    let weights = [1u32, 2, 4, 8];
    let loads: Vec<_> = weights
        .iter()
        .map(|&w| {
            (
                busy,
                Params {
                    weight: w,
                    cap_percent: 100,
                },
            )
        })
        .collect();
    let f = Fleet::start(
        &spec(args.gpu, Policy::FixedShare, Duration::from_millis(2)),
        &loads,
    )?;
    std::thread::sleep(Duration::from_millis(200));
    let before = f.busy();
    let w = windows(&f, secs);
    let after = f.busy();
    f.finish()?;
    let delta: Vec<f64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b) as f64)
        .collect();
    let total: f64 = delta.iter().sum();
    let shares: Vec<f64> = delta.iter().map(|d| d / total).collect();
    let wsum: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let weighted_max_err = shares
        .iter()
        .zip(weights)
        .map(|(s, w)| (s - f64::from(w) / wsum).abs())
        .fold(0.0, f64::max);
    if let Some(p) = &args.plot {
        let series: Vec<Vec<f64>> = (0..weights.len())
            .map(|k| {
                w.iter()
                    .map(|v| v[k] as f64 / v.iter().sum::<u64>().max(1) as f64)
                    .collect()
            })
            .collect();
        let labels: Vec<String> = weights.iter().map(|w| format!("w={w}")).collect();
        plot(p, &series, &labels)?;
    }

    // 3. Best effort, 4 busy + 4 idle: GPU busy time over wall time.
    let mut loads = vec![(busy, Params::default()); 4];
    loads.extend(vec![(Load::Idle, Params::default()); 4]);
    let f = Fleet::start(
        &spec(args.gpu, Policy::BestEffort, Duration::from_millis(2)),
        &loads,
    )?;
    std::thread::sleep(Duration::from_millis(200));
    let (b0, t0) = (f.busy().iter().sum::<u64>(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (b1, t1) = (f.busy().iter().sum::<u64>(), t0.elapsed());
    f.finish()?;
    let utilization = (b1 - b0) as f64 / t1.as_nanos() as f64;

    // 4. A neighbour running one 1-second kernel (8000 workgroups of 250 µs on 2 engines):
    //    how far slices overrun while the other vGPUs wait.
    let loads = vec![
        (
            Load::Long {
                us: 250,
                groups: 8000,
            },
            Params::default(),
        ),
        (busy, Params::default()),
        (busy, Params::default()),
    ];
    let f = Fleet::start(
        &spec(args.gpu, Policy::EqualShare, Duration::from_millis(2)),
        &loads,
    )?;
    let s = f.gpu.scheduler(0).ok_or("no scheduler")?;
    s.clear_samples();
    std::thread::sleep(Duration::from_secs_f64(secs.max(1.5)));
    let mut over = s.overruns();
    f.finish()?;
    over.sort_unstable();
    let overrun_p99_ms = over
        .get((over.len() * 99 / 100).min(over.len().saturating_sub(1)))
        .map_or(f64::NAN, |&v| v as f64 / 1e6);

    // 5. Scale: throughput of 64 busy vGPUs vs 1 alone; memory per idle vGPU.
    let one = Fleet::start(
        &spec(args.gpu, Policy::EqualShare, Duration::from_millis(2)),
        &[(busy, Params::default())],
    )?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let solo: u64 = one.finish()?.iter().sum();
    let many = Fleet::start(
        &spec(args.gpu, Policy::EqualShare, Duration::from_millis(2)),
        &[(busy, Params::default()); 64],
    )?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let all: u64 = many.finish()?.iter().sum();
    let scale64_ratio = all as f64 / solo.max(1) as f64;
    let rss0 = rss_kib();
    let idle = Fleet::start(
        &spec(args.gpu, Policy::EqualShare, Duration::from_millis(2)),
        &[(Load::Idle, Params::default()); 64],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let rss1 = rss_kib();
    idle.finish()?;
    let mem_per_vgpu_kib = rss1.saturating_sub(rss0) as f64 / 64.0;

    // 6. Context switch cost (scheduler handoff) at 1, 2 and 10 ms slices, 4 busy vGPUs.
    let mut sw = Vec::new();
    for ms in [1, 2, 10] {
        let f = Fleet::start(
            &spec(args.gpu, Policy::EqualShare, Duration::from_millis(ms)),
            &[(busy, Params::default()); 4],
        )?;
        let s = f.gpu.scheduler(0).ok_or("no scheduler")?;
        std::thread::sleep(Duration::from_millis(100));
        s.clear_samples();
        std::thread::sleep(Duration::from_secs_f64(secs / 2.0));
        let h: Vec<f64> = s.handoffs().iter().map(|&n| n as f64 / 1e3).collect();
        f.finish()?;
        sw.push(median(&h));
    }

    // 7. A hung vGPU among 4 busy ones: its watchdog (150 ms of GPU time) resets it alone.
    let four = [(busy, Params::default()); 4];
    let f = Fleet::start(
        &spec(args.gpu, Policy::EqualShare, Duration::from_millis(2)),
        &four,
    )?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let alone: u64 = f.finish()?.iter().sum();
    let mut loads = four.to_vec();
    loads.push((Load::Hung, Params::default()));
    let f = Fleet::start(
        &spec(args.gpu, Policy::EqualShare, Duration::from_millis(2)),
        &loads,
    )?;
    let t0 = Instant::now();
    while f.done[4].load(Ordering::Relaxed) == 0 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let hung_wall = t0.elapsed();
    let busy_all = f.busy();
    let reset_late = Duration::from_nanos(f.overshoot.load(Ordering::Relaxed));
    let neighbours_busy: u64 = busy_all[..4].iter().sum();
    let neighbour_share = neighbours_busy as f64 / (neighbours_busy + busy_all[4]).max(1) as f64;
    let phase = hung_wall.max(Duration::from_secs_f64(secs));
    std::thread::sleep(phase.saturating_sub(hung_wall));
    let with_hung: u64 = f.finish()?[..4].iter().sum();
    let tdr_rate = (with_hung as f64 / phase.as_secs_f64()) / (alone as f64 / secs);

    let submit_us = match args.gpu {
        GpuKind::Soft => None,
        GpuKind::Vulkan { device, .. } => Some(
            vgpu::backend::vulkan::VulkanGpu::new(device, 1 << 20)
                .and_then(|g| g.submit_cost(200))
                .map_err(|e| e.to_string())?
                .as_secs_f64()
                * 1e6,
        ),
    };
    let r = Report {
        submit_us,
        tdr_neighbour_share_ratio: neighbour_share / 0.8,
        tdr_neighbour_rate_ratio: tdr_rate,
        tdr_reset_ms: reset_late.as_secs_f64() * 1e3,
        jain: jain_mean,
        jain_min,
        weighted_shares: shares,
        weighted_max_err,
        utilization,
        overrun_p99_ms,
        scale64_ratio,
        mem_per_vgpu_kib,
        switch_us: SwitchUs {
            ms1: sw[0],
            ms2: sw[1],
            ms10: sw[2],
        },
    };
    if args.json {
        super::print_json(&r)?;
    } else {
        println!("scheduler benchmarks, {ENGINES} engines, {secs} s per phase");
        println!(
            "  {} busy vGPUs, {}: Jain (100 ms windows) mean {:.4}, min {:.4}",
            args.vgpus, args.policy, r.jain, r.jain_min
        );
        println!(
            "  weights 1:2:4:8: shares {:.3?}, max error {:.4}",
            r.weighted_shares, r.weighted_max_err
        );
        println!(
            "  best effort, 4 busy + 4 idle: GPU busy {:.2} %",
            r.utilization * 100.0
        );
        println!(
            "  neighbour with a 1 s kernel: slice overrun p99 {:.3} ms",
            r.overrun_p99_ms
        );
        println!(
            "  64 vGPUs vs 1: throughput ratio {:.3}; host memory per idle vGPU {:.0} KiB",
            r.scale64_ratio, r.mem_per_vgpu_kib
        );
        println!(
            "  switch (handoff) median µs: 1 ms {:.1}, 2 ms {:.1}, 10 ms {:.1}",
            sw[0], sw[1], sw[2]
        );
        println!(
            "  a hung vGPU among 4 busy: neighbours' share {:.3} of fair, their jobs/s {:.3} \
             of alone, reset {:.2} ms past the watchdog",
            r.tdr_neighbour_share_ratio, r.tdr_neighbour_rate_ratio, r.tdr_reset_ms
        );
        if let Some(us) = r.submit_us {
            println!("  Vulkan submission (submit + fence wait) median: {us:.1} µs");
        }
    }
    Ok(())
}
