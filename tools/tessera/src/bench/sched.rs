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
    /// Watchdog of the hung vGPU in the last phase (GPU time), e.g. 150ms: what a hang costs
    /// its neighbours.
    #[arg(long, value_name = "DURATION", default_value = "150ms", value_parser = parse_hung_watchdog)]
    hung_watchdog: Duration,
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
    /// 256 busy vGPUs' jobs over one alone's in the same time.
    scale256_ratio: f64,
    /// Host memory (RSS) per idle vGPU, measured over 256 of them, VRAM excluded.
    mem_per_vgpu_kib: f64,
    switch_us: SwitchUs,
    /// Neighbours' GPU share while a fifth vGPU hung, over their fair share (4/5).
    tdr_neighbour_share_ratio: f64,
    /// Neighbours' jobs/s over the hung phase vs the same four alone.
    tdr_neighbour_rate_ratio: f64,
    /// The hung vGPU's watchdog (GPU time) and the phase's length: a hang should cost the
    /// neighbours about the watchdog's worth of GPU time, 1 - watchdog/phase of their rate.
    tdr_watchdog_ms: f64,
    tdr_phase_s: f64,
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
    /// A job far past the vGPU's `watchdog` (GPU time); it must fault and reset.
    Hung { watchdog: Duration },
}

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
                Load::Hung { watchdog } => watchdog,
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
                        (Load::Idle, _) | (Load::Hung { .. }, false) => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        (Load::Hung { .. }, true) => {
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

/// Equal share, 2 ms slices, and VRAM for `n` vGPUs of the bench profile.
fn scale_spec(kind: GpuKind, n: usize) -> GpuSpec {
    GpuSpec {
        kind,
        policy: Policy::EqualShare,
        slice: Duration::from_millis(2),
        ..GpuSpec::whole((n as u64 * PROFILE.vram).max(128 << 20), ENGINES)
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

/// The hung vGPU's watchdog: 10 ms to 2 s.
fn parse_hung_watchdog(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .ok()
        .filter(|d| (Duration::from_millis(10)..=Duration::from_secs(2)).contains(d))
        .ok_or_else(|| format!("{s:?}: expected a duration from 10ms to 2s"))
}

/// One line of a share plot: its label, its share per 100 ms window, and the share it
/// should get.
struct Series {
    label: String,
    shares: Vec<f64>,
    target: f64,
}

/// Writes an SVG plot of each vGPU's share per 100 ms window against time, with its target
/// share as a dashed line of the same colour; axes with ticks and units, the legend above the
/// lines (the y axis runs to 100 % and no share here goes above 60 %).
fn plot(path: &std::path::Path, title: &str, series: &[Series]) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| format!("cannot plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let windows = series
        .iter()
        .map(|s| s.shares.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let seconds = windows as f64 * 0.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..seconds, 0.0..1.0)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("share of GPU time")
        .y_label_formatter(&|v| format!("{:.0}%", v * 100.0))
        .x_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (k, s) in series.iter().enumerate() {
        let colour = Palette99::pick(k).to_rgba();
        // A window's share is plotted at its end.
        let points = s
            .shares
            .iter()
            .enumerate()
            .map(|(i, &v)| ((i + 1) as f64 * 0.1, v));
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("{} (target {:.1}%)", s.label, s.target * 100.0))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, s.target), (seconds, s.target)],
                6,
                4,
                colour.stroke_width(1),
            ))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

pub fn run(args: SchedArgs) -> Result<(), String> {
    let busy = Load::Busy { us: 250, groups: 8 };
    let secs = args.seconds;
    let mut progress = super::Progress::new("sched", 7);

    progress.step(format!(
        "{} busy vGPUs under {}: fairness",
        args.vgpus, args.policy
    ));
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

    progress.step("weights 1:2:4:8 under fixed-share");
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
        let series: Vec<Series> = weights
            .iter()
            .enumerate()
            .map(|(k, &weight)| Series {
                label: format!("weight {weight}"),
                shares: w
                    .iter()
                    .map(|v| v[k] as f64 / v.iter().sum::<u64>().max(1) as f64)
                    .collect(),
                target: f64::from(weight) / wsum,
            })
            .collect();
        plot(
            p,
            "fixed-share, weights 1:2:4:8: GPU-time share per vGPU (100 ms windows)",
            &series,
        )?;
    }

    progress.step("best effort, 4 busy + 4 idle: utilisation");
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

    progress.step("a neighbour running a 1 s kernel: slice overrun");
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

    progress.step("64 and 256 vGPUs vs 1 (three rounds): throughput and memory");
    // 5. Scale: throughput of 64 and of 256 busy vGPUs vs 1 alone; memory per idle vGPU.
    let jobs = |n: usize| -> Result<u64, String> {
        let f = Fleet::start(
            &scale_spec(args.gpu, n),
            &vec![(busy, Params::default()); n],
        )?;
        std::thread::sleep(Duration::from_secs_f64(secs));
        Ok(f.finish()?.iter().sum())
    };
    // The host's speed drifts by several percent over seconds: three rounds of solo, 64 and
    // 256 back to back, each ratio against its round's solo, medians.
    let (mut r64, mut r256) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let solo = jobs(1)?.max(1) as f64;
        r64.push(jobs(64)? as f64 / solo);
        r256.push(jobs(256)? as f64 / solo);
    }
    let (scale64_ratio, scale256_ratio) = (median(&r64), median(&r256));
    let rss0 = rss_kib();
    let idle = Fleet::start(
        &scale_spec(args.gpu, 256),
        &[(Load::Idle, Params::default()); 256],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let rss1 = rss_kib();
    idle.finish()?;
    let mem_per_vgpu_kib = rss1.saturating_sub(rss0) as f64 / 256.0;

    progress.step("context switch cost at 1, 2 and 10 ms slices");
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

    progress.step("a hung vGPU among 4 busy ones: watchdog");
    // 7. A hung vGPU among 4 busy ones: its watchdog (--hung-watchdog of GPU time) resets
    // it alone.
    let four = [(busy, Params::default()); 4];
    let f = Fleet::start(
        &spec(args.gpu, Policy::EqualShare, Duration::from_millis(2)),
        &four,
    )?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let alone: u64 = f.finish()?.iter().sum();
    let mut loads = four.to_vec();
    loads.push((
        Load::Hung {
            watchdog: args.hung_watchdog,
        },
        Params::default(),
    ));
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
        tdr_watchdog_ms: args.hung_watchdog.as_secs_f64() * 1e3,
        tdr_phase_s: phase.as_secs_f64(),
        tdr_reset_ms: reset_late.as_secs_f64() * 1e3,
        jain: jain_mean,
        jain_min,
        weighted_shares: shares,
        weighted_max_err,
        utilization,
        overrun_p99_ms,
        scale64_ratio,
        scale256_ratio,
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
            "  64 and 256 vGPUs vs 1: throughput ratio {:.3} and {:.3}; host memory per idle \
             vGPU {:.0} KiB",
            r.scale64_ratio, r.scale256_ratio, r.mem_per_vgpu_kib
        );
        println!(
            "  switch (handoff) median µs: 1 ms {:.1}, 2 ms {:.1}, 10 ms {:.1}",
            sw[0], sw[1], sw[2]
        );
        println!(
            "  a hung vGPU among 4 busy ({:.0} ms watchdog, {:.1} s phase): neighbours' share \
             {:.3} of fair, their jobs/s {:.3} of alone, reset {:.2} ms past the watchdog",
            r.tdr_watchdog_ms,
            r.tdr_phase_s,
            r.tdr_neighbour_share_ratio,
            r.tdr_neighbour_rate_ratio,
            r.tdr_reset_ms
        );
        if let Some(us) = r.submit_us {
            println!("  Vulkan submission (submit + fence wait) median: {us:.1} µs");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plot has a title, axis names with units, ticks in percent and seconds, one line per
    /// vGPU, a dashed target line for each, and a legend naming each with its target.
    #[test]
    fn plots_have_axes_ticks_targets_and_a_legend() {
        let path = std::env::temp_dir().join(format!("tessera-plot-{}.svg", std::process::id()));
        let series: Vec<Series> = [1.0, 3.0]
            .iter()
            .map(|&w| Series {
                label: format!("weight {w}"),
                shares: (0..20).map(|i| w / 4.0 + 0.01 * (i % 3) as f64).collect(),
                target: w / 4.0,
            })
            .collect();
        plot(&path, "shares", &series).expect("plot");
        let svg = std::fs::read_to_string(&path).expect("svg");
        for text in [
            "shares",
            "time (s)",
            "share of GPU time",
            "50%",
            "100%",
            "1.0",
            "2.0",
            "weight 1 (target 25.0%)",
            "weight 3 (target 75.0%)",
        ] {
            assert!(svg.contains(text), "no {text:?} in the plot");
        }
        // Two measured polylines plus the dashes of two target lines.
        assert!(svg.matches("<polyline").count() >= 2, "{svg}");
        assert!(svg.matches("<line").count() > 20, "ticks and dashes");
        let _ = std::fs::remove_file(&path);
    }
}
