//! `tessera bench vms`: N firmware VMs (each its own KVM VM, in this process) sharing one
//! physical GPU, each running a load; GPU-time shares from the scheduler.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use vgpu::physical::{GpuKind, GpuSpec, PhysicalGpu};
use vgpu::sched::Policy;
use vmm::config::{CpusConfig, MemoryConfig, SerialConfig, VgpuConfig, VmConfig};
use vmm::{ExitReason, Vm};

use super::default_firmware;

/// Options.
#[derive(Debug, Args)]
pub struct VmsArgs {
    /// Loads, one per VM: busy, bursty, long, idle (comma-separated).
    #[arg(long, default_value = "busy,busy,busy,busy", value_delimiter = ',')]
    loads: Vec<String>,
    /// Weights, one per VM (default 1 each).
    #[arg(long, value_delimiter = ',')]
    weights: Vec<u32>,
    /// Scheduling policy.
    #[arg(long, default_value = "equal-share")]
    policy: Policy,
    /// Time slice, e.g. 2ms (1ms to 30ms).
    #[arg(long, value_name = "DURATION", default_value = "2ms", value_parser = crate::serve_cmd::parse_slice)]
    slice: Duration,
    /// Seconds each VM runs its load.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Firmware PVH ELF (default: target/firmware/tessera-fw.elf).
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// The GPU the VMs share: soft, or a Vulkan device: vulkan[,device=N].
    #[arg(long, value_name = "soft|vulkan[,device=N]", default_value = "soft")]
    gpu: GpuKind,
}

#[derive(Debug, Serialize)]
struct VmReport {
    load: String,
    weight: u32,
    share: f64,
    busy_ms: f64,
    jobs: u64,
    exit: i32,
}

#[derive(Debug, Serialize)]
struct Report {
    policy: String,
    vms: Vec<VmReport>,
    /// Jain index over the busy VMs' GPU time divided by weight.
    jain_busy: f64,
    /// GPU-busy time over the measured wall time.
    utilization: f64,
}

const VM_PROFILE: &str = "64M";

pub fn run(args: VmsArgs) -> Result<(), String> {
    let fw = args.firmware.unwrap_or_else(default_firmware);
    if !fw.exists() {
        return Err(format!(
            "firmware {} not found (cargo xtask firmware)",
            fw.display()
        ));
    }
    let n = args.loads.len();
    if n == 0 || n > 64 {
        return Err("between 1 and 64 VMs".into());
    }
    let profile = vgpu::profile::find(VM_PROFILE).ok_or("no 64M profile")?;
    let spec = GpuSpec {
        kind: args.gpu,
        policy: args.policy,
        slice: args.slice,
        ..GpuSpec::whole(profile.vram * n as u64, profile.engines)
    };
    // Built on a filtered thread: the shared GPU's engine threads inherit the device filter,
    // like those of a VM's private GPU.
    let gpu = match spec.kind {
        GpuKind::Soft => {
            vmm::seccomp::on_device_thread(vmm::seccomp::Thread::Device, || PhysicalGpu::new(&spec))
                .map_err(|e| vmm::error_chain(&e))?
        }
        // The loader reads its manifests and libraries first; the vGPUs' devices and the
        // driver's threads are made under each VM's device filter.
        GpuKind::Vulkan { .. } => PhysicalGpu::new(&spec),
    }
    .map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("tessera-bench-vms-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut progress = super::Progress::new("vms", 3);
    progress.step(format!("starting {n} firmware VMs on one GPU"));
    let (probe_tx, probe_rx) = mpsc::channel();
    let mut threads = Vec::new();
    for (i, load) in args.loads.iter().enumerate() {
        let weight = args.weights.get(i).copied().unwrap_or(1);
        let config = VmConfig {
            kernel: fw.clone(),
            initramfs: None,
            cmdline: format!("run=load kind={load} seconds={}", args.seconds),
            cpus: CpusConfig::default(),
            memory: MemoryConfig { size: 64 << 20 },
            serial: SerialConfig::File(dir.join(format!("vm{i}.log"))),
            user_devices: Vec::new(),
            vgpus: vec![VgpuConfig {
                profile,
                weight,
                cap: 100,
                partition: None,
            }],
            gpu: spec.kind,
            kvm_path: PathBuf::from("/dev/kvm"),
            seccomp: true,
            api_socket: None,
            from: vmm::config::VmSource::Kernel,
        };
        let (gpu, tx) = (gpu.clone(), probe_tx.clone());
        threads.push(std::thread::spawn(move || -> Result<ExitReason, String> {
            let vm = Vm::with_gpu(&config, Some(gpu)).map_err(|e| format!("VM {i}: {e}"))?;
            let _ = tx.send((i, vm.vgpu_probe()));
            vm.run().map_err(|e| format!("VM {i}: {e}"))
        }));
    }
    drop(probe_tx);
    let mut probes: Vec<Option<vmm::VgpuProbe>> = vec![None; n];
    for (i, p) in probe_rx.iter().take(n) {
        probes[i] = Some(p);
    }
    let busy = |probes: &[Option<vmm::VgpuProbe>]| -> Vec<u64> {
        probes
            .iter()
            .map(|p| {
                p.as_ref()
                    .map_or(0, |p| p.stats().iter().map(|s| s.0.busy_ns).sum())
            })
            .collect()
    };
    // Measure the middle of the run, once every VM with GPU work has started it (a VM that
    // boots late on a loaded host would otherwise lose share it never competed for) and
    // before the first to start can have finished: boots and shutdowns are not sharing.
    let created = Instant::now();
    let margin = Duration::from_millis(400);
    let run_for = Duration::from_secs(args.seconds);
    progress.step(format!("measuring the GPU's shares for {} s", args.seconds));
    let working: Vec<bool> = args.loads.iter().map(|l| l != "idle").collect();
    while busy(&probes)
        .iter()
        .zip(&working)
        .any(|(&b, &w)| w && b == 0)
    {
        if created.elapsed() >= run_for / 2 {
            return Err(format!(
                "not every VM had started its GPU work {:?} after they were made",
                run_for / 2
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(margin);
    let (b0, t0) = (busy(&probes), Instant::now());
    std::thread::sleep(run_for.saturating_sub(created.elapsed() + margin));
    let (b1, wall) = (busy(&probes), t0.elapsed());
    progress.step("waiting for the VMs to finish");
    let mut exits = Vec::new();
    for t in threads {
        exits.push(match t.join() {
            Ok(Ok(r)) => r.status(),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a VM thread panicked".into()),
        });
    }
    let delta: Vec<f64> = b1.iter().zip(&b0).map(|(a, b)| (a - b) as f64).collect();
    let total: f64 = delta.iter().sum();
    let mut vms = Vec::new();
    let logs: Vec<String> = (0..n)
        .map(|i| std::fs::read_to_string(dir.join(format!("vm{i}.log"))).unwrap_or_default())
        .collect();
    for (i, log) in logs.iter().enumerate() {
        let jobs = log
            .split_whitespace()
            .find_map(|t| t.strip_prefix("jobs="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        vms.push(VmReport {
            load: args.loads[i].clone(),
            weight: args.weights.get(i).copied().unwrap_or(1),
            share: if total > 0.0 { delta[i] / total } else { 0.0 },
            busy_ms: delta[i] / 1e6,
            jobs,
            exit: exits[i],
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    let norm: Vec<f64> = vms
        .iter()
        .filter(|v| v.load == "busy")
        .map(|v| v.busy_ms / f64::from(v.weight.max(1)))
        .collect();
    let (s, q) = (
        norm.iter().sum::<f64>(),
        norm.iter().map(|x| x * x).sum::<f64>(),
    );
    let r = Report {
        policy: args.policy.to_string(),
        jain_busy: if q > 0.0 {
            s * s / (norm.len() as f64 * q)
        } else {
            0.0
        },
        utilization: total / wall.as_nanos() as f64,
        vms,
    };
    if args.json {
        super::print_json(&r)?;
    } else {
        println!(
            "{n} firmware VMs on one GPU, {}, {} ms slices",
            r.policy,
            args.slice.as_millis()
        );
        println!("  vm  load     weight  share   busy ms   jobs  exit");
        for (i, v) in r.vms.iter().enumerate() {
            println!(
                "  {i:<3} {:<8} {:>6} {:>6.3} {:>9.1} {:>6} {:>5}",
                v.load, v.weight, v.share, v.busy_ms, v.jobs, v.exit
            );
        }
        println!(
            "  Jain (busy VMs, per weight) {:.4}; GPU busy {:.1} %",
            r.jain_busy,
            r.utilization * 100.0
        );
    }
    if let Some((i, _)) = r.vms.iter().enumerate().find(|(_, v)| v.exit != 0) {
        return Err(format!(
            "VM {i} did not exit with status 0; its console:\n{}",
            logs[i]
        ));
    }
    Ok(())
}
