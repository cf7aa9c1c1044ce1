//! `tessera serve`, `tessera vgpu …` and `tessera top`: the vGPU server and its thin clients.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use clap::{Args, Subcommand};
use uuid::Uuid;
use vgpu::physical::{GpuKind, GpuSpec, PartitionSpec, PhysicalGpu};
use vgpu::sched::Policy;
use vgpu_server::control::{
    ControlClient, ControlError, CreateReply, Envelope, ListReply, MetricsReply, PolicyReply,
    RemoveReply, Request, StatsReply, TypesReply, VersionReply,
};
use vgpu_server::definitions::{DEFAULT_STATE_DIR, Definition, DefinitionError, Store};
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
    /// Where persistent definitions live (`define`, `undefine`, `start`, `list --defined`).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_STATE_DIR, env = "TESSERA_STATE_DIR", global = true)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: VgpuCommand,
}

/// What an instance is: the flags `create` and `define` share.
#[derive(Debug, Args)]
struct InstanceSpec {
    /// The type (see `tessera vgpu types`).
    #[arg(long = "type", value_name = "TYPE")]
    profile: String,
    /// Instance name (default: vgpuN for `create`, vgpu-UUIDPREFIX for `define`).
    #[arg(long)]
    name: Option<String>,
    /// The instance's UUID (default: a random one).
    #[arg(long)]
    uuid: Option<Uuid>,
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
}

impl InstanceSpec {
    fn request(self) -> Request {
        Request::Create {
            profile: self.profile,
            name: self.name,
            uuid: self.uuid,
            partition: self.partition,
            weight: self.weight,
            cap: self.cap,
            owner: self.owner,
        }
    }
}

#[derive(Debug, Subcommand)]
enum VgpuCommand {
    /// The vGPU types and how many more of each fit.
    Types,
    /// The server's version and the control protocol's (schema).
    Version,
    /// Create an instance (until the server stops); prints its socket for
    /// `--user-device socket=…`.
    Create(InstanceSpec),
    /// The instances and whether a VM is attached.
    List {
        /// The persistent definitions instead, and whether each is running.
        #[arg(long)]
        defined: bool,
    },
    /// Remove an idle instance (its VRAM is scrubbed and returned).
    Remove {
        /// Instance name or UUID.
        #[arg(value_name = "NAME|UUID")]
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
    /// Define an instance that persists (in --state-dir): `start` creates it, and with
    /// `--auto` the server creates it whenever it starts. Prints its UUID.
    Define {
        #[command(flatten)]
        spec: InstanceSpec,
        /// Create it whenever the server starts.
        #[arg(long)]
        auto: bool,
    },
    /// Delete a definition (a running instance of it keeps running).
    Undefine {
        /// Definition name or UUID.
        #[arg(value_name = "NAME|UUID")]
        name: String,
    },
    /// Create the instance a definition describes; prints its socket.
    Start {
        /// Definition name or UUID.
        #[arg(value_name = "NAME|UUID")]
        name: String,
    },
}

/// Reports a failed command: the line on stderr and, for `--json`, a JSON error object on
/// stdout, so a script reading stdout learns why too. `usage`: the request was refused
/// (status 2) rather than impossible to carry out (status 1).
fn fail(msg: &str, usage: bool, json: bool) -> ExitCode {
    eprintln!("tessera: {msg}");
    if json {
        println!("{}", Envelope::<()>::error(msg).pretty());
    }
    ExitCode::from(if usage { EXIT_USAGE } else { EXIT_FAILURE })
}

fn client_error(e: &ControlError, json: bool) -> ExitCode {
    fail(&error_chain(e), matches!(e, ControlError::Refused(_)), json)
}

fn definition_error(e: &DefinitionError, json: bool) -> ExitCode {
    let usage = !matches!(e, DefinitionError::Io { .. });
    fail(&error_chain(e), usage, json)
}

fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else {
        format!("{}M", bytes >> 20)
    }
}

/// A table for people: a header, columns padded to their widest cell, numbers (the columns
/// in `right`) aligned right.
fn table(header: &[&str], right: &[usize], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_header(header.to_vec())
        .add_rows(rows);
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, 2));
        if right.contains(&i) {
            c.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    t.lines().map(|l| l.trim_end().to_string() + "\n").collect()
}

/// Prints `body` as a JSON document (`ok`, `schema` and its fields).
fn print_json<T: serde::Serialize>(body: T) -> ExitCode {
    println!("{}", Envelope::ok(body).pretty());
    ExitCode::SUCCESS
}

pub fn vgpu(args: VgpuArgs) -> ExitCode {
    let json = args.server.json;
    let store = Store::new(&args.state_dir);
    let connect = || ControlClient::connect(&args.server.dir);
    macro_rules! call {
        ($req:expr) => {
            match connect().and_then(|mut c| c.call($req)) {
                Ok(v) => v,
                Err(e) => return client_error(&e, json),
            }
        };
    }
    match args.command {
        VgpuCommand::Types => {
            let r: TypesReply = call!(&Request::Types);
            if json {
                return print_json(r);
            }
            println!("GPU: {}", r.gpu);
            let rows = r.types.iter().map(|t| {
                vec![
                    t.name.clone(),
                    gib(t.vram),
                    t.contexts.to_string(),
                    t.available_instances.to_string(),
                    t.device_api.clone(),
                    t.description.clone(),
                ]
            });
            print!(
                "{}",
                table(
                    &[
                        "TYPE",
                        "VRAM",
                        "CONTEXTS",
                        "AVAILABLE",
                        "API",
                        "DESCRIPTION"
                    ],
                    &[1, 2, 3],
                    rows.collect()
                )
            );
        }
        VgpuCommand::Version => {
            let r: VersionReply = call!(&Request::Version);
            if json {
                return print_json(r);
            }
            println!(
                "tessera {} (schema {})",
                r.version,
                vgpu_server::control::SCHEMA
            );
        }
        VgpuCommand::Create(spec) => {
            let r: CreateReply = call!(&spec.request());
            if json {
                return print_json(r);
            }
            println!("{}", r.instance.socket.display());
        }
        VgpuCommand::Start { name } => {
            let def = match store.find(&name) {
                Ok(d) => d,
                Err(e) => return definition_error(&e, json),
            };
            let r: CreateReply = call!(&def.request());
            if json {
                return print_json(r);
            }
            println!("{}", r.instance.socket.display());
        }
        VgpuCommand::List { defined: false } => {
            let r: ListReply = call!(&Request::List);
            if json {
                return print_json(r);
            }
            let rows = r.instances.iter().map(|i| {
                vec![
                    i.name.clone(),
                    i.profile.clone(),
                    i.partition.to_string(),
                    i.weight.to_string(),
                    i.cap.to_string(),
                    match (i.attached, i.peer) {
                        (true, Some(p)) => format!("pid {} uid {}", p.pid, p.uid),
                        (true, None) => "yes".into(),
                        (false, _) => "no".into(),
                    },
                    i.uuid.to_string(),
                    i.socket.display().to_string(),
                ]
            });
            print!(
                "{}",
                table(
                    &[
                        "NAME", "TYPE", "PART", "WEIGHT", "CAP", "ATTACHED", "UUID", "SOCKET"
                    ],
                    &[2, 3, 4],
                    rows.collect()
                )
            );
        }
        VgpuCommand::List { defined: true } => return list_defined(&store, &args.server.dir, json),
        VgpuCommand::Remove { name } => {
            let r: RemoveReply = call!(&Request::Remove { name });
            if json {
                return print_json(r);
            }
        }
        VgpuCommand::Policy { policy, slice } => {
            let r: PolicyReply = call!(&Request::Policy {
                policy,
                slice_ms: slice.map(|s| s.as_millis() as u64),
            });
            if json {
                return print_json(r);
            }
            for p in &r.partitions {
                println!("partition {}: {} {} µs", p.index, p.policy, p.slice_us);
            }
        }
        VgpuCommand::Define { spec, auto } => {
            let uuid = spec.uuid.unwrap_or_else(Uuid::new_v4);
            let def = Definition {
                schema: vgpu_server::control::SCHEMA,
                uuid,
                name: spec
                    .name
                    .unwrap_or_else(|| format!("vgpu-{}", &uuid.simple().to_string()[..8])),
                profile: spec.profile,
                partition: spec.partition,
                weight: spec.weight.unwrap_or(1),
                cap: spec.cap.unwrap_or(100),
                owner: spec.owner,
                autostart: auto,
            };
            if let Err(e) = store.define(&def) {
                return definition_error(&e, json);
            }
            if json {
                return print_json(def);
            }
            println!("{uuid}");
        }
        VgpuCommand::Undefine { name } => match store.undefine(&name) {
            Ok(def) if json => return print_json(def),
            Ok(_) => {}
            Err(e) => return definition_error(&e, json),
        },
    }
    ExitCode::SUCCESS
}

/// A definition and whether an instance of it runs now (`None`: no server answered).
#[derive(Debug, serde::Serialize)]
struct DefinedRow {
    #[serde(flatten)]
    definition: Definition,
    running: Option<bool>,
}

/// `vgpu list --defined`: every definition, and whether the server runs it.
fn list_defined(store: &Store, dir: &std::path::Path, json: bool) -> ExitCode {
    let defs = match store.load() {
        Ok(d) => d,
        Err(e) => return definition_error(&e, json),
    };
    // Definitions are listed without a server too; whether they run is then unknown.
    let running: Option<ListReply> = ControlClient::connect(dir)
        .and_then(|mut c| c.call(&Request::List))
        .ok();
    let rows: Vec<DefinedRow> = defs
        .into_iter()
        .map(|d| DefinedRow {
            running: running
                .as_ref()
                .map(|r| r.instances.iter().any(|i| i.uuid == d.uuid)),
            definition: d,
        })
        .collect();
    if json {
        return print_json(serde_json::json!({ "definitions": rows }));
    }
    let rows = rows.iter().map(|r| {
        let d = &r.definition;
        vec![
            d.name.clone(),
            d.profile.clone(),
            d.partition.map_or("-".into(), |p| p.to_string()),
            d.weight.to_string(),
            d.cap.to_string(),
            if d.autostart { "auto" } else { "manual" }.into(),
            match r.running {
                Some(true) => "yes",
                Some(false) => "no",
                None => "unknown",
            }
            .into(),
            d.uuid.to_string(),
        ]
    });
    print!(
        "{}",
        table(
            &[
                "NAME", "TYPE", "PART", "WEIGHT", "CAP", "START", "RUNNING", "UUID"
            ],
            &[2, 3, 4],
            rows.collect()
        )
    );
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
        let shown = if args.prometheus {
            client
                .call::<MetricsReply>(&Request::Metrics)
                .map(|r| r.text)
        } else {
            client.call::<StatsReply>(&Request::Stats).map(|r| {
                if args.server.json {
                    // One document per line, so a stream of snapshots is JSON lines.
                    Envelope::ok(r).line() + "\n"
                } else {
                    top_table(&r)
                }
            })
        };
        let text = match shown {
            Ok(t) => t,
            Err(e) => return client_error(&e, args.server.json),
        };
        if tty && !args.server.json && !args.prometheus {
            // Clear the screen between snapshots.
            print!("\x1b[H\x1b[2J");
        }
        print!("{text}");
        n += 1;
        if args.iterations != 0 && n >= args.iterations {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(args.interval);
    }
}

fn top_table(r: &StatsReply) -> String {
    let mut out = String::new();
    for p in &r.partitions {
        out += &format!(
            "partition {}: {}, {} engines, {} VRAM free, {} {} µs slices; polling up to {} µs, \
             {}% of a core per vGPU, {}% in all\n",
            p.index,
            p.gpu,
            p.spec.engines,
            gib(p.vram_free),
            p.policy,
            p.slice_us,
            p.poll_window_us,
            p.poll_vgpu_percent,
            p.poll_total_percent
        );
    }
    let rows = r.vgpus.iter().map(|g| {
        vec![
            g.name.clone(),
            g.partition.to_string(),
            format!("{:.1}%", g.share * 100.0),
            format!("{:.1}", g.busy_ns as f64 / 1e6),
            g.queue_depth.to_string(),
            g.context_switches.to_string(),
            g.faults.to_string(),
            g.resets.to_string(),
            format!("{:.1}", g.poll_ns as f64 / 1e6),
        ]
    });
    out += &table(
        &[
            "VGPU", "PART", "SHARE", "BUSY_MS", "QUEUE", "SWITCHES", "FAULTS", "RESETS", "POLL_MS",
        ],
        &[1, 2, 3, 4, 5, 6, 7, 8],
        rows.collect(),
    );
    out
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
