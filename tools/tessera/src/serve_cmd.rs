//! `tessera serve`: the vGPU server process (its flags, signals, sandbox and readiness).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use clap::Args;
use uuid::Uuid;
use vgpu::physical::{GpuKind, GpuSpec, PartitionSpec, PhysicalGpu};
use vgpu::sched::Policy;
use vgpu_server::control::Request;
use vgpu_server::definitions::{DEFAULT_STATE_DIR, Store};
use vgpu_server::{Daemon, ServeOptions};
use vmm::error_chain;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::{EXIT_FAILURE, EXIT_USAGE};

/// Default socket directory.
pub(crate) const DEFAULT_DIR: &str = "/run/tessera";

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

/// `serve --create TYPE[:NAME][,weight=W][,cap=PCT][,partition=P][,owner=UID][,uuid=UUID]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateArg(Request);

impl std::str::FromStr for CreateArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let (ty, name) = match head.split_once(':') {
            Some((t, n)) => (t, Some(n.to_string())),
            None => (head, None),
        };
        if ty.is_empty() {
            return Err("expected TYPE[:NAME][,weight=W,cap=PCT,partition=P]".into());
        }
        let (mut weight, mut cap, mut partition, mut owner, mut uuid) =
            (None, None, None, None, None);
        for kv in parts {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {kv:?}"))?;
            let num = |what: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("{what}={v}: expected a number"))
            };
            match k {
                "weight" => weight = Some(num(k)?),
                "cap" => cap = Some(num(k)?),
                "partition" => partition = Some(num(k)? as usize),
                "owner" => owner = Some(num(k)?),
                "uuid" => uuid = Some(Uuid::parse_str(v).map_err(|e| format!("uuid={v}: {e}"))?),
                _ => {
                    return Err(format!(
                        "unknown --create option {k:?} (weight, cap, partition, owner, uuid)"
                    ));
                }
            }
        }
        // Ranges and the type are checked where every create is: at the server.
        Ok(CreateArg(Request::Create {
            profile: ty.to_string(),
            name,
            uuid,
            partition,
            weight,
            cap,
            owner,
        }))
    }
}

/// A duration like `4s`, `300ms`, `1.5s` or `1m` (humantime) inside `range`, which the error
/// names as `what`; `bare_ms`: a plain number is milliseconds.
pub(crate) fn parse_duration(
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

/// A watchdog limit: `4s`, `300ms` (10 ms to 10 minutes).
fn parse_watchdog(s: &str) -> Result<Duration, String> {
    parse_duration(
        s,
        Duration::from_millis(10)..=Duration::from_secs(600),
        "the watchdog must be 10ms..=600s",
        false,
    )
}

/// A polling window: `300us`, `1ms`, `0` (off); at most 10 ms.
fn parse_poll_window(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(
        s,
        Duration::ZERO..=vgpu::poll::MAX_WINDOW,
        "the polling window must be 0..=10ms",
        false,
    )
}

/// A share of one CPU core: `25%` or `25`, 0 to 6400 (64 cores).
fn parse_percent(s: &str) -> Result<u32, String> {
    s.strip_suffix('%')
        .unwrap_or(s)
        .parse::<u32>()
        .ok()
        .filter(|p| *p <= 6400)
        .ok_or_else(|| format!("{s:?}: expected a percentage of one core, like 25%"))
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
    /// Create this instance at start (until the server stops), repeatable:
    /// TYPE[:NAME][,weight=W][,cap=PCT][,partition=P][,owner=UID][,uuid=UUID].
    #[arg(long, value_name = "TYPE[:NAME][,weight=W,cap=PCT,partition=P]")]
    create: Vec<CreateArg>,
    /// Longest time a vGPU's command processor keeps polling its tail shadows after work
    /// (adaptive up to this; guests with doorbell suppression then ring no doorbell), e.g.
    /// 300us; 0 turns polling off.
    #[arg(long, value_name = "DURATION", default_value = "300us", value_parser = parse_poll_window)]
    poll_window: Duration,
    /// Host CPU one vGPU may spend polling, in percent of a core (per 100 ms), e.g. 25%.
    #[arg(long, value_name = "PERCENT", default_value = "25%", value_parser = parse_percent)]
    poll_cpu: u32,
    /// Host CPU all vGPUs together may spend polling, in percent of a core, e.g. 100%.
    #[arg(long, value_name = "PERCENT", default_value = "100%", value_parser = parse_percent)]
    poll_cpu_total: u32,
    /// Persistent definitions (`tessera vgpu define`): the `--auto` ones are created at start.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_STATE_DIR, env = "TESSERA_STATE_DIR")]
    state_dir: PathBuf,
    /// Serve Prometheus/OpenMetrics metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; port
    /// 0 picks a free one, and the log says which).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Serve GPU sessions over TCP with mutual TLS at ADDR (e.g. 0.0.0.0:7070; port 0 picks a
    /// free one, and the log says which). Needs --tls-cert, --tls-key and --tls-client-ca.
    #[arg(long, value_name = "ADDR", requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    session_tls: Option<std::net::SocketAddr>,
    /// The server's certificate chain (PEM), for --session-tls.
    #[arg(long, value_name = "PATH", requires = "session_tls")]
    tls_cert: Option<PathBuf>,
    /// The server's private key (PEM), for --session-tls.
    #[arg(long, value_name = "PATH", requires = "session_tls")]
    tls_key: Option<PathBuf>,
    /// The CA whose client certificates are accepted (PEM), for --session-tls. A client
    /// certificate opens the instances its subjectAltName names as DNS names.
    #[arg(long, value_name = "PATH", requires = "session_tls")]
    tls_client_ca: Option<PathBuf>,
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
    gpu.poll_budget().set_limits(vgpu::poll::PollLimits {
        window: args.poll_window,
        vgpu_percent: args.poll_cpu,
        total_percent: args.poll_cpu_total,
    });
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
    // Definitions first (a corrupt one stops the start, naming its file), then --create.
    let store = Store::new(&args.state_dir);
    let defs = match store.load() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("tessera: {}", error_chain(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let started = daemon.autostart(&defs);
    tracing::info!(
        state_dir = %args.state_dir.display(),
        defined = defs.len(),
        started,
        "vGPU definitions loaded"
    );
    for c in &args.create {
        if let Err(e) = daemon.handle(c.0.clone()) {
            eprintln!("tessera: --create: {}", devices::error_chain(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    }
    // Bound before the sandbox: the metrics and TLS listeners are the only TCP sockets the
    // server opens.
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
    if let (Some(addr), Some(cert), Some(key), Some(ca)) = (
        args.session_tls,
        args.tls_cert,
        args.tls_key,
        args.tls_client_ca,
    ) {
        let files = vgpu_session::tls::TlsFiles { ca, cert, key };
        let started = vgpu_session::tls::server_config(&files)
            .map_err(|e| error_chain(&e))
            .and_then(|config| {
                vgpu_server::tls::TlsListener::start(addr, config, &daemon)
                    .map_err(|e| format!("--session-tls {addr}: {e}"))
            });
        match started {
            Ok(l) => tracing::info!(tls = %l.addr(), "sessions served over TLS"),
            Err(e) => {
                eprintln!("tessera: {e}");
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
        let c: CreateArg = "64M:a,weight=3,cap=50,partition=1".parse().unwrap();
        assert_eq!(
            c.0,
            Request::Create {
                profile: "64M".into(),
                name: Some("a".into()),
                uuid: None,
                partition: Some(1),
                weight: Some(3),
                cap: Some(50),
                owner: None,
            }
        );
        for bad in [
            "",
            ":a",
            "64M,weight",
            "64M,weight=x",
            "64M,colour=red",
            "64M,uuid=nope",
        ] {
            assert!(bad.parse::<CreateArg>().is_err(), "{bad}");
        }
        assert_eq!(parse_poll_window("0"), Ok(Duration::ZERO));
        assert_eq!(parse_poll_window("300us"), Ok(Duration::from_micros(300)));
        assert!(parse_poll_window("11ms").is_err() && parse_poll_window("fast").is_err());
        assert_eq!(
            (parse_percent("25%"), parse_percent("100")),
            (Ok(25), Ok(100))
        );
        assert!(parse_percent("-1%").is_err() && parse_percent("6401").is_err());
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
