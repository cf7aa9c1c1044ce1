//! `tessera bench vgpu`: the vGPU's fast paths measured from the firmware guest, and guest
//! throughput against the same device model driven by this process directly.
//!
//! With `--transport vfio-user` every guest measurement is also made with the vGPU served by
//! a vfio-user server (a `Daemon` in this process; the VM is another process attached with
//! `--user-device`), interleaved run by run with the in-process measurement, and the ratios
//! are reported.
//!
//! With `--cloud-hypervisor PATH` (a build with the vGPU built in: `cargo xtask
//! cloud-hypervisor`) the same guest measurements run in that Cloud Hypervisor twice more,
//! interleaved: the vGPU embedded (`--vgpu`) and served over vfio-user (`--user-device`), so
//! the two transports are compared inside one VMM build.
//!
//! The firmware prints one result line per benchmark (see firmware/README.md):
//! `tessera-fw: bench latency mode=M wait=W iters=N gap_us=G p50_ns=X p99_ns=Y mean_ns=Z
//! doorbells=D`, `tessera-fw: bench throughput kernel=K size=S batch=B wait=W ns=T` and
//! `tessera-fw: first-fence`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use vgpu::host::HostClient;
use vgpu::physical::{GpuKind, GpuSpec, PhysicalGpu};
use vgpu_abi::{Packet, kernel, packet};

use super::{default_firmware, median};

/// Options.
#[derive(Debug, Args)]
pub struct VgpuArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Firmware PVH ELF (default: target/firmware/tessera-fw.elf).
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// Round trips per latency run.
    #[arg(long, default_value_t = 2000)]
    iters: u32,
    /// Runs of each measurement (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// vGPU profile.
    #[arg(long, default_value = "64M")]
    profile: String,
    /// in-process only, or also over vfio-user (side by side).
    #[arg(long, value_enum, default_value = "in-process")]
    transport: Transport,
    /// The GPU under the vGPUs (and under the native runs): soft, or vulkan[,device=N].
    #[arg(long, value_name = "soft|vulkan[,device=N]", default_value = "soft")]
    gpu: GpuKind,
    /// Also measure in this Cloud Hypervisor (built with `--vgpu`: `cargo xtask
    /// cloud-hypervisor`), the vGPU embedded and over vfio-user, side by side (soft GPU).
    #[arg(long, value_name = "PATH")]
    cloud_hypervisor: Option<PathBuf>,
}

/// The VMM a firmware guest runs in.
#[derive(Debug, Clone, Copy)]
enum Vmm<'a> {
    /// `tessera vm` (this binary).
    Tessera,
    /// A Cloud Hypervisor binary.
    CloudHypervisor(&'a Path),
}

/// Where the benchmarked vGPU lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    /// In the VMM process (`--vgpu`).
    InProcess,
    /// Also served over vfio-user by a separate server (`--user-device`), side by side.
    VfioUser,
}

/// The guest figures of one VMM and transport.
#[derive(Debug, Serialize)]
struct Side {
    fast_p50_us: f64,
    fast_p99_us: f64,
    poll_p50_us: f64,
    trapped_p50_us: f64,
    trapped_p99_us: f64,
    suppress_p50_us: f64,
    suppress_doorbells_per_submit: f64,
    hybrid_p50_us: f64,
    sgemm_guest_ms: f64,
    saxpy_guest_ms: f64,
    start_to_first_fence_ms: f64,
}

impl Side {
    fn of(s: &Series) -> Side {
        let fast = s.lat("fast");
        let trapped = s.lat("trapped");
        Side {
            fast_p50_us: fast.0,
            fast_p99_us: fast.1,
            poll_p50_us: s.lat("poll").0,
            trapped_p50_us: trapped.0,
            trapped_p99_us: trapped.1,
            suppress_p50_us: s.lat("suppress").0,
            suppress_doorbells_per_submit: s.doorbells("suppress"),
            hybrid_p50_us: s.lat("hybrid").0,
            sgemm_guest_ms: s.guest("sgemm"),
            saxpy_guest_ms: s.guest("saxpy"),
            start_to_first_fence_ms: s.first(),
        }
    }

    fn throughput_ms(&self) -> f64 {
        self.sgemm_guest_ms + self.saxpy_guest_ms
    }

    fn print(&self, indent: &str) {
        println!(
            "{indent}round trip p50 (µs): fast {:.1}, suppression {:.1} ({:.3} doorbells per \
             submission), polling {:.1}, trapped {:.1} (p99 {:.1}), spin then WAIT {:.1}",
            self.fast_p50_us,
            self.suppress_p50_us,
            self.suppress_doorbells_per_submit,
            self.poll_p50_us,
            self.trapped_p50_us,
            self.trapped_p99_us,
            self.hybrid_p50_us
        );
        println!(
            "{indent}sgemm {:.2} ms, saxpy {:.2} ms per batch; start → first fence {:.2} ms",
            self.sgemm_guest_ms, self.saxpy_guest_ms, self.start_to_first_fence_ms
        );
    }
}

/// The vfio-user side of the report.
#[derive(Debug, Serialize)]
struct VfioReport {
    #[serde(flatten)]
    side: Side,
    /// vfio-user fast-path round trip ÷ in-process (target ≤ 1.5).
    fast_over_in_process: f64,
    /// vfio-user guest throughput ÷ in-process (target ≥ 0.98).
    throughput_over_in_process: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    fast_p50_us: f64,
    fast_p99_us: f64,
    /// Doorbell suppression, back to back: round trip, and doorbells rung per submission.
    suppress_p50_us: f64,
    suppress_p99_us: f64,
    suppress_doorbells_per_submit: f64,
    /// After 2 ms idle (the window has closed): always ringing, and with suppression.
    fast_idle_p50_us: f64,
    suppress_idle_p50_us: f64,
    suppress_idle_doorbells_per_submit: f64,
    /// Host CPU an idle vGPU polls in the second after its last work (percent of a core),
    /// and in the second after that (ns).
    poll_cpu_idle_percent: f64,
    poll_ns_after_window: u64,
    /// The guest waits for the fence in the `WAIT` register (an exit, the vCPU thread
    /// sleeps), or spins up to 50 µs first (hybrid: the default of the firmware's
    /// throughput and load modes).
    block_p50_us: f64,
    hybrid_p50_us: f64,
    poll_p50_us: f64,
    poll_p99_us: f64,
    trapped_p50_us: f64,
    trapped_p99_us: f64,
    fast_over_trapped: f64,
    poll_over_trapped: f64,
    sgemm_guest_ms: f64,
    /// The same batch with the vCPU spinning on the fence all along.
    sgemm_guest_spin_ms: f64,
    /// The batch run by a host process on the same backend: the mean of the measurements
    /// right before and right after each run's VMs (median over runs).
    sgemm_native_ms: f64,
    saxpy_guest_ms: f64,
    saxpy_native_ms: f64,
    guest_over_native: f64,
    start_to_first_fence_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    vfio_user: Option<VfioReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cloud_hypervisor: Option<ChReport>,
}

/// Cloud Hypervisor with the vGPU built in against the same build with it over vfio-user.
#[derive(Debug, Serialize)]
struct ChReport {
    embedded: Side,
    vfio_user: Side,
    /// vfio-user ÷ embedded: the trapped register round trip, the fast path, and guest
    /// time for the throughput batches.
    trapped_vfio_user_over_embedded: f64,
    fast_vfio_user_over_embedded: f64,
    throughput_time_vfio_user_over_embedded: f64,
}

/// Guest measurements of one transport.
#[derive(Debug, Default)]
struct Series {
    lat: HashMap<&'static str, (Vec<f64>, Vec<f64>)>,
    /// Doorbells rung per submission, per latency mode.
    doorbells: HashMap<&'static str, Vec<f64>>,
    guest: HashMap<&'static str, Vec<f64>>,
    first: Vec<f64>,
}

impl Series {
    fn lat(&self, k: &str) -> (f64, f64) {
        self.lat
            .get(k)
            .map(|(a, b)| (median(a), median(b)))
            .unwrap_or((f64::NAN, f64::NAN))
    }
    fn doorbells(&self, k: &str) -> f64 {
        self.doorbells.get(k).map_or(f64::NAN, |v| median(v))
    }
    fn guest(&self, k: &str) -> f64 {
        self.guest.get(k).map_or(f64::NAN, |v| median(v))
    }
    fn first(&self) -> f64 {
        median(&self.first)
    }

    /// One run of every guest measurement with the vGPU given by `device` (VM flags).
    fn measure(
        &mut self,
        vmm: Vmm,
        fw: &Path,
        device: &[String],
        iters: u32,
    ) -> Result<(), String> {
        // Back to back, and (`_idle`) with 2 ms of idleness before each round trip: the
        // command processor's polling window has closed, so it sleeps until the doorbell.
        let idle_iters = (iters / 10).max(20);
        // The guest waits for each fence spinning on it, except in `block` (the `WAIT`
        // register only) and `hybrid` (a 50 µs spin, then `WAIT`).
        for (key, mode, wait, gap_us, n) in [
            ("fast", "fast", "spin", 0, iters),
            ("suppress", "suppress", "spin", 0, iters),
            ("fast_idle", "fast", "spin", IDLE_GAP_US, idle_iters),
            ("suppress_idle", "suppress", "spin", IDLE_GAP_US, idle_iters),
            ("poll", "poll", "spin", 0, iters),
            ("trapped", "trapped", "spin", 0, iters),
            ("block", "fast", "block", 0, iters),
            ("hybrid", "fast", "hybrid", 0, iters),
        ] {
            let (f, _) = firmware_line(
                vmm,
                fw,
                device,
                &format!("run=bench-latency mode={mode} wait={wait} iters={n} gap_us={gap_us}"),
                "bench latency",
            )?;
            let e = self.lat.entry(key).or_default();
            e.0.push(field(&f, "p50_ns")? / 1e3);
            e.1.push(field(&f, "p99_ns")? / 1e3);
            self.doorbells
                .entry(key)
                .or_default()
                .push(field(&f, "doorbells")? / f64::from(n));
        }
        // The throughput runs wait the default way (a short spin, then `WAIT`); `sgemm_spin`
        // spins for the whole batch, a vCPU competing with the engines for the host's CPUs.
        for (key, w, wait) in [
            ("sgemm", SGEMM, "hybrid"),
            ("saxpy", SAXPY, "hybrid"),
            ("sgemm_spin", SGEMM, "spin"),
        ] {
            let (f, _) = firmware_line(
                vmm,
                fw,
                device,
                &format!(
                    "run=bench-throughput kernel={} size={} batch={} wait={wait}",
                    w.0, w.1, w.2
                ),
                "bench throughput",
            )?;
            self.guest
                .entry(key)
                .or_default()
                .push(field(&f, "ns")? / 1e6);
        }
        let (_, t) = firmware_line(
            vmm,
            fw,
            device,
            "run=first-fence",
            "tessera-fw: first-fence",
        )?;
        self.first.push(t.as_secs_f64() * 1e3);
        Ok(())
    }
}

/// A vfio-user server in this process with one instance of `profile`; stops when dropped.
pub(super) struct BenchServer {
    pub(super) daemon: Arc<vgpu_server::Daemon>,
    stop: Arc<vmm_sys_util::eventfd::EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
    /// The instance's session socket.
    pub(super) session_socket: PathBuf,
}

impl BenchServer {
    /// `require_sealed`: refuse guest memory whose size is not sealed (Tessera's VMM seals
    /// it; Cloud Hypervisor does not).
    pub(super) fn start(
        profile: &'static vgpu::Profile,
        kind: GpuKind,
        require_sealed: bool,
    ) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("tessera-bench-{}", std::process::id()));
        let gpu = PhysicalGpu::new(&GpuSpec {
            kind,
            ..GpuSpec::whole(profile.vram, profile.engines)
        })
        .map_err(|e| vmm::error_chain(&e))?;
        let daemon = vgpu_server::Daemon::new(
            gpu,
            vgpu_server::ServeOptions {
                dir,
                require_sealed,
                ..Default::default()
            },
        )
        .map_err(|e| vmm::error_chain(&e))?;
        let info = daemon
            .create(
                profile,
                Some("bench".into()),
                None,
                vgpu::sched::Params::default(),
            )
            .map_err(|e| vmm::error_chain(&e))?;
        let stop = Arc::new(
            vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
                .map_err(|e| e.to_string())?,
        );
        let (d, s) = (daemon.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("bench-serve".into())
            .spawn(move || {
                if let Err(e) = d.serve(&s) {
                    tracing::error!("bench server: {e}");
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(BenchServer {
            daemon,
            stop,
            thread: Some(thread),
            socket: info.socket,
            session_socket: info.session_socket,
        })
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(self.daemon.dir());
    }
}

/// Idle time before each round trip of the `_idle` latency runs (longer than the longest
/// polling window).
const IDLE_GAP_US: u32 = 2000;

/// Host CPU an idle vGPU's command processor spends polling: in the second after its last
/// work (percent of a core), and in the second after that (ns; 0 once the window closed).
fn idle_polling(profile: &vgpu::Profile, kind: GpuKind) -> Result<(f64, u64), String> {
    let gpu = PhysicalGpu::new(&GpuSpec {
        kind,
        ..GpuSpec::whole(profile.vram, profile.engines)
    })
    .map_err(|e| e.to_string())?;
    let lease = gpu.lease(profile, None).map_err(|e| e.to_string())?;
    let mut c = HostClient::new(vgpu::VgpuSetup::from_lease(&lease), 16 << 20)
        .map_err(|e| e.to_string())?;
    c.run(&[]).map_err(|e| e.to_string())?;
    let m = c.device().ok_or("the host client has no vGPU")?.monitor();
    let p0 = m.poll_time();
    std::thread::sleep(Duration::from_secs(1));
    let p1 = m.poll_time();
    std::thread::sleep(Duration::from_secs(1));
    let p2 = m.poll_time();
    Ok(((p1 - p0).as_secs_f64() * 100.0, (p2 - p1).as_nanos() as u64))
}

/// Throughput workloads: (kernel, size, batch).
pub(super) const SGEMM: (&str, u64, u64) = ("sgemm", 256, 8);
pub(super) const SAXPY: (&str, u64, u64) = ("saxpy", 1 << 22, 8);

/// Boots the firmware with `cmdline`; returns the `key=value` fields of the first line
/// containing `needle`, and the time from spawn to that line.
fn firmware_line(
    vmm: Vmm,
    fw: &Path,
    device: &[String],
    cmdline: &str,
    needle: &str,
) -> Result<(HashMap<String, String>, Duration), String> {
    let mut cmd = match vmm {
        Vmm::Tessera => {
            let exe =
                std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
            let mut c = Command::new(exe);
            c.args(["--log-level", "warn", "vm", "--kernel"])
                .arg(fw)
                .args(["--memory", "256M", "--cmdline", cmdline]);
            c
        }
        Vmm::CloudHypervisor(ch) => {
            let mut c = Command::new(ch);
            c.arg("--kernel")
                .arg(fw)
                .args(["--cpus", "boot=1", "--memory", "size=256M,shared=on"])
                .args(["--cmdline", cmdline, "--serial", "tty", "--console", "off"]);
            c
        }
    };
    let start = Instant::now();
    let mut child = cmd
        .args(device)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", describe(vmm)))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut transcript = String::new();
    let mut found = None;
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if found.is_none() && line.contains(needle) {
            let fields = line
                .split_whitespace()
                .filter_map(|t| t.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            found = Some((fields, start.elapsed()));
        }
        transcript.push_str(&line);
        transcript.push('\n');
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    match found {
        Some(f) if status.success() => Ok(f),
        _ => Err(format!(
            "firmware `{cmdline}` did not report {needle:?} (status {status}); output:\n{transcript}"
        )),
    }
}

fn describe(vmm: Vmm) -> String {
    match vmm {
        Vmm::Tessera => "tessera vm".into(),
        Vmm::CloudHypervisor(p) => p.display().to_string(),
    }
}

fn field(f: &HashMap<String, String>, k: &str) -> Result<f64, String> {
    f.get(k)
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("missing field {k} in {f:?}"))
}

/// The same kernels as the firmware's throughput mode, submitted by this process.
pub(super) fn native_ms(
    profile: &vgpu::Profile,
    (name, size, batch): (&str, u64, u64),
    kind: GpuKind,
) -> Result<f64, String> {
    let spec = GpuSpec {
        kind,
        policy: vgpu::sched::Policy::BestEffort,
        ..GpuSpec::whole(profile.vram, profile.engines)
    };
    let gpu = PhysicalGpu::new(&spec).map_err(|e| e.to_string())?;
    let lease = gpu.lease(profile, None).map_err(|e| e.to_string())?;
    let mut c = HostClient::new(vgpu::VgpuSetup::from_lease(&lease), 256 << 20)
        .map_err(|e| e.to_string())?;
    let e = |e: vgpu::host::HostError| e.to_string();
    let pkts: Vec<Packet> = match name {
        "sgemm" => {
            let bytes = size * size * 4;
            let (a, b, cc) = (
                c.alloc(bytes).map_err(e)?,
                c.alloc(bytes).map_err(e)?,
                c.alloc(bytes).map_err(e)?,
            );
            let init: Vec<u8> = (0..size * size)
                .flat_map(|i| ((i % 7) as f32).to_le_bytes())
                .collect();
            c.write(a, &init).map_err(e)?;
            c.write(b, &init).map_err(e)?;
            (0..batch)
                .map(|_| Packet {
                    opcode: packet::OP_DISPATCH,
                    flags: kernel::SGEMM,
                    args: [size, size, size, a, b, cc, 0],
                })
                .collect()
        }
        _ => {
            let bytes = size * 4;
            let (x, y) = (c.alloc(bytes).map_err(e)?, c.alloc(bytes).map_err(e)?);
            let init: Vec<u8> = (0..size)
                .flat_map(|i| ((i % 7) as f32).to_le_bytes())
                .collect();
            c.write(x, &init).map_err(e)?;
            c.write(y, &init).map_err(e)?;
            (0..batch)
                .map(|_| Packet {
                    opcode: packet::OP_DISPATCH,
                    flags: kernel::SAXPY,
                    args: [size, 2.0f32.to_bits() as u64, x, y, 0, 0, 0],
                })
                .collect()
        }
    };
    c.run(&pkts[..1]).map_err(e)?; // warm up
    let t = Instant::now();
    c.run(&pkts).map_err(e)?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

pub fn run(args: VgpuArgs) -> Result<(), String> {
    let fw = args.firmware.unwrap_or_else(default_firmware);
    if !fw.exists() {
        return Err(format!(
            "firmware {} not found (cargo xtask firmware)",
            fw.display()
        ));
    }
    let profile = vgpu::profile::find(&args.profile)
        .ok_or_else(|| format!("unknown vGPU profile {:?}", args.profile))?;
    let gpu_flag = match args.gpu {
        GpuKind::Soft => "soft".to_string(),
        GpuKind::Vulkan {
            device,
            device_memory,
        } => format!(
            "vulkan,device={device},memory={}",
            if device_memory { "device" } else { "host" }
        ),
    };
    let in_process = vec![
        "--vgpu".to_string(),
        format!("profile={}", profile.name),
        "--gpu".to_string(),
        gpu_flag,
    ];
    if let Some(ch) = &args.cloud_hypervisor {
        if !ch.exists() {
            return Err(format!(
                "Cloud Hypervisor {} not found (cargo xtask cloud-hypervisor)",
                ch.display()
            ));
        }
        if args.gpu != GpuKind::Soft {
            return Err(
                "--cloud-hypervisor measures the soft GPU only (its --vgpu has no \
                        GPU choice)"
                    .into(),
            );
        }
    }
    let over_vfio_user = args.transport == Transport::VfioUser;
    let server = if over_vfio_user || args.cloud_hypervisor.is_some() {
        Some(BenchServer::start(
            profile,
            args.gpu,
            args.cloud_hypervisor.is_none(),
        )?)
    } else {
        None
    };
    let user_device = server.as_ref().map(|s| {
        vec![
            "--user-device".to_string(),
            format!("socket={}", s.socket.display()),
        ]
    });
    let embedded = vec!["--vgpu".to_string(), format!("profile={}", profile.name)];
    let mut local = Series::default();
    let mut remote = Series::default();
    let mut ch_embedded = Series::default();
    let mut ch_remote = Series::default();
    let mut native: HashMap<&str, Vec<f64>> = HashMap::new();
    let steps = 3 + usize::from(over_vfio_user) + 2 * usize::from(args.cloud_hypervisor.is_some());
    let mut progress = super::Progress::new("vgpu", args.runs as usize * steps + 1);
    // The native batches run right before and right after each run's VMs, and count as
    // their mean: the host's speed drifts by several per cent between minutes here, and
    // measuring on both sides takes a steady drift out of the ratio.
    let natively = |progress: &mut super::Progress, run: u32, when: &str| {
        progress.step(format!("run {run}: the same kernels natively, {when}"));
        [SGEMM, SAXPY].map(|w| native_ms(profile, w, args.gpu))
    };
    for run in 1..=args.runs {
        let before = natively(&mut progress, run, "before");
        progress.step(format!("run {run}: a firmware VM with an in-process vGPU"));
        local.measure(Vmm::Tessera, &fw, &in_process, args.iters)?;
        if let (true, Some(dev)) = (over_vfio_user, &user_device) {
            progress.step(format!("run {run}: a firmware VM with a vfio-user vGPU"));
            remote.measure(Vmm::Tessera, &fw, dev, args.iters)?;
        }
        if let (Some(ch), Some(dev)) = (&args.cloud_hypervisor, &user_device) {
            let ch = Vmm::CloudHypervisor(ch);
            progress.step(format!("run {run}: Cloud Hypervisor, the vGPU built in"));
            ch_embedded.measure(ch, &fw, &embedded, args.iters)?;
            progress.step(format!(
                "run {run}: Cloud Hypervisor, the vGPU over vfio-user"
            ));
            ch_remote.measure(ch, &fw, dev, args.iters)?;
        }
        let after = natively(&mut progress, run, "after");
        for ((w, b), a) in [SGEMM, SAXPY].iter().zip(before).zip(after) {
            native.entry(w.0).or_default().push((b? + a?) / 2.0);
        }
    }
    drop(server);
    let n = |k: &str| native.get(k).map_or(f64::NAN, |v| median(v));
    let (fast, poll, trapped) = (local.lat("fast"), local.lat("poll"), local.lat("trapped"));
    let suppress = local.lat("suppress");
    progress.step("an idle host vGPU's polling CPU");
    let (poll_cpu_idle_percent, poll_ns_after_window) = idle_polling(profile, args.gpu)?;
    let g = |k: &str| local.guest(k);
    let vfio_user = over_vfio_user.then(|| {
        let side = Side::of(&remote);
        VfioReport {
            fast_over_in_process: side.fast_p50_us / fast.0,
            throughput_over_in_process: (g("sgemm") + g("saxpy")) / side.throughput_ms(),
            side,
        }
    });
    let cloud_hypervisor = args.cloud_hypervisor.as_ref().map(|_| {
        let (embedded, vfio_user) = (Side::of(&ch_embedded), Side::of(&ch_remote));
        ChReport {
            trapped_vfio_user_over_embedded: vfio_user.trapped_p50_us / embedded.trapped_p50_us,
            fast_vfio_user_over_embedded: vfio_user.fast_p50_us / embedded.fast_p50_us,
            throughput_time_vfio_user_over_embedded: vfio_user.throughput_ms()
                / embedded.throughput_ms(),
            embedded,
            vfio_user,
        }
    });
    let r = Report {
        fast_p50_us: fast.0,
        fast_p99_us: fast.1,
        suppress_p50_us: suppress.0,
        suppress_p99_us: suppress.1,
        suppress_doorbells_per_submit: local.doorbells("suppress"),
        fast_idle_p50_us: local.lat("fast_idle").0,
        suppress_idle_p50_us: local.lat("suppress_idle").0,
        suppress_idle_doorbells_per_submit: local.doorbells("suppress_idle"),
        poll_cpu_idle_percent,
        poll_ns_after_window,
        block_p50_us: local.lat("block").0,
        hybrid_p50_us: local.lat("hybrid").0,
        poll_p50_us: poll.0,
        poll_p99_us: poll.1,
        trapped_p50_us: trapped.0,
        trapped_p99_us: trapped.1,
        fast_over_trapped: fast.0 / trapped.0,
        poll_over_trapped: poll.0 / trapped.0,
        sgemm_guest_ms: g("sgemm"),
        sgemm_guest_spin_ms: g("sgemm_spin"),
        sgemm_native_ms: n("sgemm"),
        saxpy_guest_ms: g("saxpy"),
        saxpy_native_ms: n("saxpy"),
        // Throughput ratio: native time over guest time, over both workloads.
        guest_over_native: (n("sgemm") + n("saxpy")) / (g("sgemm") + g("saxpy")),
        start_to_first_fence_ms: local.first(),
        vfio_user,
        cloud_hypervisor,
    };
    if args.json {
        super::print_json(&r)?;
    } else {
        println!(
            "vGPU benchmarks, profile {}, {} runs, medians",
            profile.name, args.runs
        );
        println!("submit → fence round trip (µs):   p50      p99");
        for (name, v) in [
            ("  fast (ioeventfd doorbell)", fast),
            ("  doorbell suppression", suppress),
            ("  fast, 2 ms idle before", local.lat("fast_idle")),
            (
                "  suppression, 2 ms idle before",
                local.lat("suppress_idle"),
            ),
            ("  host polling (no exit)", poll),
            ("  trapped (BAR0 tail write)", trapped),
            ("  fast, waiting in WAIT", local.lat("block")),
            ("  fast, 50 µs spin then WAIT", local.lat("hybrid")),
        ] {
            println!("{name:<32}{:>8.1}{:>9.1}", v.0, v.1);
        }
        println!(
            "  doorbells per submission with suppression: {:.3} back to back, {:.3} after idle",
            r.suppress_doorbells_per_submit, r.suppress_idle_doorbells_per_submit
        );
        println!(
            "  an idle vGPU polls {:.3} % of a core in the second after work, {} ns in the next",
            r.poll_cpu_idle_percent, r.poll_ns_after_window
        );
        println!(
            "  fast ÷ trapped {:.3}, polling ÷ trapped {:.3}",
            r.fast_over_trapped, r.poll_over_trapped
        );
        println!("throughput (ms per batch):        guest   native");
        println!(
            "  sgemm {}³ ×{}{:>22.2}{:>9.2}",
            SGEMM.1, SGEMM.2, r.sgemm_guest_ms, r.sgemm_native_ms
        );
        println!(
            "  saxpy {} ×{}{:>20.2}{:>9.2}",
            SAXPY.1, SAXPY.2, r.saxpy_guest_ms, r.saxpy_native_ms
        );
        println!(
            "  sgemm with the vCPU spinning on the fence{:>8.2}",
            r.sgemm_guest_spin_ms
        );
        println!("  guest ÷ native throughput {:.3}", r.guest_over_native);
        println!(
            "VM start → first fence: {:.2} ms",
            r.start_to_first_fence_ms
        );
        if let Some(v) = &r.vfio_user {
            println!("over vfio-user (separate server process), same runs:");
            v.side.print("  ");
            println!(
                "  vfio-user ÷ in-process: fast round trip {:.3}, throughput {:.3}",
                v.fast_over_in_process, v.throughput_over_in_process
            );
        }
        if let Some(c) = &r.cloud_hypervisor {
            println!("in Cloud Hypervisor, same runs: the vGPU built in (--vgpu)");
            c.embedded.print("  ");
            println!("  … and the same build with the vGPU over vfio-user (--user-device)");
            c.vfio_user.print("  ");
            println!(
                "  vfio-user ÷ built in: trapped round trip {:.2}, fast round trip {:.2}, \
                 throughput batch time {:.3}",
                c.trapped_vfio_user_over_embedded,
                c.fast_vfio_user_over_embedded,
                c.throughput_time_vfio_user_over_embedded
            );
        }
    }
    Ok(())
}
