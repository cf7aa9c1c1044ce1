//! `tessera serve`, `tessera vgpu …` and `tessera top`: the vGPU server and its thin clients.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;
use vgpu::physical::{GpuKind, GpuSpec, PartitionSpec, PhysicalGpu};
use vgpu::sched::Policy;
use vgpu_server::control::{ControlClient, ControlError, Request};
use vgpu_server::{Daemon, ServeOptions};
use vmm::error_chain;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::{EXIT_FAILURE, EXIT_USAGE};

/// Default socket directory.
const DEFAULT_DIR: &str = "/run/tessera";

/// The physical GPU `tessera serve` owns: `soft[,vram=SIZE][,engines=N][,partitions=N]` or
/// `vulkan[,device=N][,vram=SIZE][,partitions=N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuArg {
    kind: GpuKind,
    vram: u64,
    engines: usize,
    partitions: usize,
}

impl std::str::FromStr for GpuArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let kind = match parts.next() {
            Some("soft") => GpuKind::Soft,
            Some("vulkan") => GpuKind::vulkan(),
            Some("cuda") => {
                return Err("the CUDA backend is not built into this binary (issue 9)".into());
            }
            other => return Err(format!("unknown GPU {other:?} (expected soft or vulkan)")),
        };
        let mut g = GpuArg {
            kind,
            vram: 8 << 30,
            engines: std::thread::available_parallelism().map_or(2, |n| n.get()),
            partitions: 1,
        };
        for kv in parts {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {kv:?}"))?;
            match k {
                "vram" => {
                    g.vram = vmm::config::parse_size(v)
                        .filter(|&n| n >= 64 << 20)
                        .ok_or_else(|| format!("vram={v}: expected a size of at least 64M"))?;
                }
                "device" | "memory" if matches!(g.kind, GpuKind::Vulkan { .. }) => {
                    g.kind.set_vulkan_option(kv)?;
                }
                "engines" if g.kind == GpuKind::Soft => {
                    g.engines = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=256).contains(n))
                        .ok_or_else(|| format!("engines={v}: expected 1..=256"))?;
                }
                "partitions" => {
                    g.partitions = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=8).contains(n))
                        .ok_or_else(|| format!("partitions={v}: expected 1..=8"))?;
                }
                _ if g.kind == GpuKind::Soft => {
                    return Err(format!(
                        "unknown soft GPU option {k:?} (vram, engines, partitions)"
                    ));
                }
                _ => {
                    return Err(format!(
                        "unknown vulkan GPU option {k:?} (device, memory, vram, partitions)"
                    ));
                }
            }
        }
        if g.kind != GpuKind::Soft {
            // A Vulkan partition's engine is its queue.
            g.engines = g.partitions;
        }
        if g.engines < g.partitions {
            return Err(format!(
                "{} partitions need at least as many engines (have {})",
                g.partitions, g.engines
            ));
        }
        Ok(g)
    }
}

/// A duration like `4s`, `300ms`, `1.5s` or `1m` (humantime) inside `range`, which the error
/// names as `what`; `bare_ms`: a plain number is milliseconds.
fn parse_duration(
    s: &str,
    range: std::ops::RangeInclusive<Duration>,
    what: &str,
    bare_ms: bool,
) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(ms) if bare_ms => Duration::from_millis(ms),
        _ => humantime::parse_duration(s)
            .map_err(|_| format!("{s:?}: expected a duration like 4s or 300ms"))?,
    };
    if !range.contains(&d) {
        return Err(format!("{s}: {what}"));
    }
    Ok(d)
}

/// A slice: `2ms` or just `2` (1 to 30 ms).
pub(crate) fn parse_slice(s: &str) -> Result<Duration, String> {
    parse_duration(
        s,
        Duration::from_millis(1)..=Duration::from_millis(30),
        "the slice must be 1ms..=30ms",
        true,
    )
}

/// `top`'s refresh interval: `1s`, `250ms` (50 ms to an hour).
fn parse_interval(s: &str) -> Result<Duration, String> {
    parse_duration(
        s,
        Duration::from_millis(50)..=Duration::from_secs(3600),
        "the interval must be 50ms..=1h",
        false,
    )
}

/// A watchdog limit: `4s`, `300ms` (10 ms to 10 minutes).
fn parse_watchdog(s: &str) -> Result<Duration, String> {
    parse_duration(
        s,
        Duration::from_millis(10)..=Duration::from_secs(600),
        "the watchdog must be 10ms..=600s",
        false,
    )
}

/// A limit on mapped client memory: a size from 1M to 64T.
fn parse_memory_limit(s: &str) -> Result<u64, String> {
    vmm::config::parse_size(s)
        .filter(|n| (1 << 20..=64 << 40).contains(n))
        .ok_or_else(|| format!("{s:?}: expected a size from 1M to 64T"))
}

/// Raises the soft limit on open files to the hard one: every client holds descriptors
/// (its memory regions, interrupt and doorbell eventfds, its socket), and one client must
/// not use up a small default for all of them.
fn raise_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid resource and a valid struct to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit with a valid resource and a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        tracing::warn!(
            "cannot raise the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `tessera serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The physical GPU: soft[,vram=SIZE][,engines=N][,partitions=N], or a Vulkan device:
    /// vulkan[,device=N][,memory=host|device][,vram=SIZE][,partitions=N].
    #[arg(
        long,
        value_name = "soft[,vram=8G,engines=N] | vulkan[,device=N,vram=8G]",
        default_value = "soft"
    )]
    gpu: GpuArg,
    /// Scheduling policy: best-effort, equal-share, fixed-share or fixed-quantum.
    #[arg(long, value_name = "POLICY", default_value = "equal-share")]
    policy: Policy,
    /// Time slice, 1ms..=30ms.
    #[arg(long, value_name = "MS", default_value = "2ms", value_parser = parse_slice)]
    slice: Duration,
    /// Directory for the control socket and one vfio-user socket per vGPU (mode 0700).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_DIR, env = "TESSERA_DIR")]
    dir: PathBuf,
    /// Refuse clients whose guest RAM is not sealed against shrinking (Tessera's own VMM
    /// seals it; Cloud Hypervisor does not).
    #[arg(long)]
    require_sealed: bool,
    /// GPU time one packet may use before its vGPU is reset alone (TDR), e.g. 4s or 300ms.
    #[arg(long, value_name = "DURATION", default_value = "4s", value_parser = parse_watchdog)]
    watchdog: Duration,
    /// Client memory one client (VMM) may make the server map, e.g. 1T (its guest RAM).
    #[arg(long, value_name = "SIZE", default_value = "1T", value_parser = parse_memory_limit)]
    max_client_memory: u64,
    /// Client memory all clients together may make the server map, e.g. 32T.
    #[arg(long, value_name = "SIZE", default_value = "32T", value_parser = parse_memory_limit)]
    max_mapped: u64,
    /// Create these instances at start: TYPE[:NAME], repeatable.
    #[arg(long, value_name = "TYPE[:NAME]")]
    create: Vec<String>,
    /// Serve Prometheus/OpenMetrics metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; port
    /// 0 picks a free one, and the log says which).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Sandbox every server thread with a seccomp filter (false: for debugging only).
    #[arg(long, value_name = "true|false", default_value_t = true, action = clap::ArgAction::Set)]
    seccomp: bool,
}

static STOP_FD: AtomicI32 = AtomicI32::new(-1);
/// The signal that stopped the server (0: none yet).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(sig, Ordering::Relaxed);
    let fd = STOP_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; `one` is 8 valid bytes; a stale fd only makes
        // the write fail.
        let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

pub fn serve(args: ServeArgs) -> ExitCode {
    let spec = GpuSpec {
        kind: args.gpu.kind,
        partitions: (0..args.gpu.partitions)
            .map(|i| PartitionSpec {
                engines: args.gpu.engines / args.gpu.partitions
                    + usize::from(i < args.gpu.engines % args.gpu.partitions),
                vram: args.gpu.vram / args.gpu.partitions as u64,
            })
            .collect(),
        policy: args.policy,
        slice: args.slice,
    };
    let gpu = match PhysicalGpu::new(&spec) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("tessera: {}", error_chain(&e));
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let opts = ServeOptions {
        dir: args.dir,
        require_sealed: args.require_sealed,
        watchdog: args.watchdog,
        max_client_memory: args.max_client_memory,
        max_mapped: args.max_mapped,
    };
    if args.max_client_memory > args.max_mapped {
        eprintln!("tessera: --max-client-memory must not exceed --max-mapped");
        return ExitCode::from(EXIT_USAGE);
    }
    raise_file_limit();
    let daemon = match Daemon::new(gpu, opts) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("tessera: {}", error_chain(&e));
            let usage = matches!(e, vgpu_server::ServeError::Untrusted(_));
            return ExitCode::from(if usage { EXIT_USAGE } else { EXIT_FAILURE });
        }
    };
    for c in &args.create {
        let (ty, name) = match c.split_once(':') {
            Some((t, n)) => (t, Some(n.to_string())),
            None => (c.as_str(), None),
        };
        let req = Request::Create {
            profile: ty.to_string(),
            name,
            partition: None,
            weight: None,
            cap: None,
            owner: None,
        };
        if let Err(e) = daemon.handle(req) {
            eprintln!("tessera: --create {c}: {}", devices::error_chain(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    }
    // Bound before the sandbox: the listener is the only TCP socket the server opens.
    if let Some(addr) = args.metrics_addr {
        match vgpu_server::metrics::MetricsServer::start(addr, daemon.clone()) {
            Ok(m) => {
                tracing::info!(url = %format!("http://{}/metrics", m.addr()), "metrics served")
            }
            Err(e) => {
                eprintln!("tessera: --metrics-addr {addr}: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let stop = match EventFd::new(EFD_NONBLOCK) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("tessera: cannot create an eventfd: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    STOP_FD.store(stop.as_raw_fd(), Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal) {
            eprintln!("tessera: cannot handle signal {sig}: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    }
    // Ready: the control and instance sockets listen. systemd (Type=notify) is told now,
    // before the sandbox, which refuses the connect(2) this takes; elsewhere it does nothing.
    if let Err(e) = sd_notify::notify(true, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot notify the service manager of readiness: {e}");
    }
    if args.seccomp {
        let sandbox = vmm::seccomp::install_sigsys_reporter()
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let role = match args.gpu.kind {
                    GpuKind::Soft => vmm::seccomp::Thread::Server,
                    // The GPU driver runs on the server's threads.
                    GpuKind::Vulkan { .. } => vmm::seccomp::Thread::GpuServer,
                };
                vmm::seccomp::apply_all_threads(role).map_err(|e| error_chain(&e))
            });
        if let Err(e) = sandbox {
            eprintln!("tessera: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    }
    tracing::info!(
        dir = %daemon.dir().display(),
        policy = %spec.policy,
        slice_ms = spec.slice.as_millis() as u64,
        "vGPU server ready"
    );
    let r = daemon.serve(&stop);
    STOP_FD.store(-1, Ordering::Relaxed);
    let signal = match STOP_SIGNAL.load(Ordering::Relaxed) {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "none",
    };
    tracing::info!(
        signal,
        instances = daemon.list().len(),
        "vGPU server stopping"
    );
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: control socket: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Where the server is, for the clients.
#[derive(Debug, Args)]
pub struct ServerDir {
    /// The server's socket directory.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_DIR, env = "TESSERA_DIR", global = true)]
    dir: PathBuf,
    /// Print the server's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// `tessera vgpu …`: manage vGPU instances of a running `tessera serve` (mdev-like).
#[derive(Debug, Args)]
pub struct VgpuArgs {
    #[command(flatten)]
    server: ServerDir,
    #[command(subcommand)]
    command: VgpuCommand,
}

#[derive(Debug, Subcommand)]
enum VgpuCommand {
    /// The vGPU types and how many more of each fit.
    Types,
    /// The server's version and the control protocol's (schema).
    Version,
    /// Create an instance; prints its socket for `--user-device socket=…`.
    Create {
        /// The type (see `tessera vgpu types`).
        #[arg(long = "type", value_name = "TYPE")]
        profile: String,
        /// Instance name (default vgpuN).
        #[arg(long)]
        name: Option<String>,
        /// Spatial partition (default: wherever it fits).
        #[arg(long)]
        partition: Option<usize>,
        /// Weight under fixed-share scheduling, 1..=1000.
        #[arg(long)]
        weight: Option<u32>,
        /// Cap on GPU time in percent, 1..=100.
        #[arg(long)]
        cap: Option<u32>,
        /// The user (numeric uid) whose VMM may attach, besides root (default: the server's
        /// user). Needs a server running as root.
        #[arg(long, value_name = "UID")]
        owner: Option<u32>,
    },
    /// The instances and whether a VM is attached.
    List,
    /// Remove an idle instance (its VRAM is scrubbed and returned).
    Remove {
        /// Instance name.
        name: String,
    },
    /// Switch the scheduling policy (and slice) at run time.
    Policy {
        /// best-effort, equal-share, fixed-share or fixed-quantum.
        policy: String,
        /// Slice, 1ms..=30ms.
        #[arg(long, value_parser = parse_slice)]
        slice: Option<Duration>,
    },
}

/// Reports a failed request: the line on stderr and, for `--json`, a JSON error object on
/// stdout, so a script reading stdout learns why too.
fn client_error(e: &ControlError, json: bool) -> ExitCode {
    let msg = error_chain(e);
    eprintln!("tessera: {msg}");
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ok": false,
                "schema": vgpu_server::control::SCHEMA,
                "error": msg,
            })
        );
    }
    ExitCode::from(match e {
        ControlError::Refused(_) => EXIT_USAGE,
        _ => EXIT_FAILURE,
    })
}

fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else {
        format!("{}M", bytes >> 20)
    }
}

pub fn vgpu(args: VgpuArgs) -> ExitCode {
    let req = match args.command {
        VgpuCommand::Types => Request::Types,
        VgpuCommand::Version => Request::Version,
        VgpuCommand::Create {
            profile,
            name,
            partition,
            weight,
            cap,
            owner,
        } => Request::Create {
            profile,
            name,
            partition,
            weight,
            cap,
            owner,
        },
        VgpuCommand::List => Request::List,
        VgpuCommand::Remove { name } => Request::Remove { name },
        VgpuCommand::Policy { policy, slice } => Request::Policy {
            policy,
            slice_ms: slice.map(|s| s.as_millis() as u64),
        },
    };
    let result = ControlClient::connect(&args.server.dir).and_then(|mut c| c.request(&req));
    let v = match result {
        Ok(v) => v,
        Err(e) => return client_error(&e, args.server.json),
    };
    if args.server.json {
        println!("{v:#}");
        return ExitCode::SUCCESS;
    }
    let s = |v: &Value, k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    match req {
        Request::Types => {
            println!("GPU: {}", s(&v, "gpu"));
            println!(
                "{:<8} {:>6} {:>9} {:>10}",
                "TYPE", "VRAM", "CONTEXTS", "AVAILABLE"
            );
            for t in v["types"].as_array().into_iter().flatten() {
                println!(
                    "{:<8} {:>6} {:>9} {:>10}",
                    s(t, "name"),
                    gib(u(t, "vram")),
                    u(t, "contexts"),
                    u(t, "available_instances")
                );
            }
        }
        Request::Create { .. } => println!("{}", s(&v["instance"], "socket")),
        Request::Version => println!("tessera {} (schema {})", s(&v, "version"), s(&v, "schema")),
        Request::List => {
            println!(
                "{:<16} {:<6} {:>4} {:>6} {:>4} {:<9} SOCKET",
                "NAME", "TYPE", "PART", "WEIGHT", "CAP", "ATTACHED"
            );
            for i in v["instances"].as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:<6} {:>4} {:>6} {:>4} {:<9} {}",
                    s(i, "name"),
                    s(i, "type"),
                    u(i, "partition"),
                    u(i, "weight"),
                    u(i, "cap"),
                    if i["attached"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "no"
                    },
                    s(i, "socket")
                );
            }
        }
        Request::Policy { .. } => {
            for p in v["partitions"].as_array().into_iter().flatten() {
                println!(
                    "partition {}: {} {} µs",
                    u(p, "index"),
                    s(p, "policy"),
                    u(p, "slice_us")
                );
            }
        }
        _ => {}
    }
    ExitCode::SUCCESS
}

/// `tessera top` options.
#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    server: ServerDir,
    /// Print Prometheus text instead of a table.
    #[arg(long)]
    prometheus: bool,
    /// Refresh interval, e.g. 1s or 250ms (50ms to 1h).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    interval: Duration,
    /// Print this many snapshots, then exit (0: until interrupted).
    #[arg(long, short = 'n', value_name = "N", default_value_t = 0)]
    iterations: u64,
}

pub fn top(args: TopArgs) -> ExitCode {
    let mut client = match ControlClient::connect(&args.server.dir) {
        Ok(c) => c,
        Err(e) => return client_error(&e, args.server.json),
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut n = 0;
    loop {
        let req = if args.prometheus {
            Request::Metrics
        } else {
            Request::Stats
        };
        let v = match client.request(&req) {
            Ok(v) => v,
            Err(e) => return client_error(&e, args.server.json),
        };
        if tty && !args.server.json && !args.prometheus {
            // Clear the screen between snapshots.
            print!("\x1b[H\x1b[2J");
        }
        if args.prometheus {
            print!("{}", v["text"].as_str().unwrap_or_default());
        } else if args.server.json {
            println!("{v}");
        } else {
            print_top(&v);
        }
        n += 1;
        if args.iterations != 0 && n >= args.iterations {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(args.interval);
    }
}

fn print_top(v: &Value) {
    for p in v["partitions"].as_array().into_iter().flatten() {
        println!(
            "partition {}: {}, {} engines, {} VRAM free, {} {} µs slices",
            p["index"],
            p["gpu"].as_str().unwrap_or("?"),
            p["spec"]["engines"],
            gib(p["vram_free"].as_u64().unwrap_or(0)),
            p["policy"].as_str().unwrap_or("?"),
            p["slice_us"]
        );
    }
    println!(
        "{:<16} {:>4} {:>7} {:>12} {:>6} {:>9} {:>7} {:>7}",
        "VGPU", "PART", "SHARE", "BUSY_MS", "QUEUE", "SWITCHES", "FAULTS", "RESETS"
    );
    for g in v["vgpus"].as_array().into_iter().flatten() {
        let u = |k: &str| g[k].as_u64().unwrap_or(0);
        println!(
            "{:<16} {:>4} {:>6.1}% {:>12.1} {:>6} {:>9} {:>7} {:>7}",
            g["name"].as_str().unwrap_or("?"),
            u("partition"),
            g["share"].as_f64().unwrap_or(0.0) * 100.0,
            u("busy_ns") as f64 / 1e6,
            u("queue_depth"),
            u("context_switches"),
            u("faults"),
            u("resets")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_and_slice_flags() {
        let g: GpuArg = "soft,vram=2G,engines=4,partitions=2".parse().unwrap();
        assert_eq!((g.vram, g.engines, g.partitions), (2 << 30, 4, 2));
        let g: GpuArg = "vulkan,device=1,vram=2G,partitions=2".parse().unwrap();
        assert_eq!(
            (g.kind, g.vram, g.engines, g.partitions),
            (
                GpuKind::Vulkan {
                    device: 1,
                    device_memory: false
                },
                2 << 30,
                2,
                2
            )
        );
        assert_eq!(
            "vulkan".parse::<GpuArg>().map(|g| g.kind),
            Ok(GpuKind::vulkan())
        );
        for bad in [
            "vulkan,engines=2",
            "vulkan,device=x",
            "soft,device=1",
            "hard",
            "soft,vram=1K",
            "soft,engines=0",
            "soft,colour=red",
            "soft,vram",
            "soft,engines=1,partitions=2",
            "cuda",
        ] {
            assert!(bad.parse::<GpuArg>().is_err(), "{bad}");
        }
        assert_eq!(parse_slice("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_slice("30"), Ok(Duration::from_millis(30)));
        assert!(parse_slice("0ms").is_err() && parse_slice("31ms").is_err());
        assert!(parse_slice("fast").is_err());
        assert_eq!(parse_watchdog("4s"), Ok(Duration::from_secs(4)));
        assert_eq!(parse_watchdog("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_watchdog("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["4", "5ms", "601s", "-1s", "soon"] {
            assert!(parse_watchdog(bad).is_err(), "{bad}");
        }
    }
}
