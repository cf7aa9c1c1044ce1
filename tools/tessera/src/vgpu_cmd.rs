//! `tessera vgpu …` and `tessera top`: thin clients of a running `tessera serve`'s control
//! socket, and mdevctl-style definitions in the state directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use uuid::Uuid;
use vgpu_server::control::{
    ControlClient, ControlError, CreateReply, Envelope, ListReply, MetricsReply, PolicyReply,
    RemoveReply, Request, StatsReply, TypesReply, VersionReply,
};
use vgpu_server::definitions::{DEFAULT_STATE_DIR, Definition, DefinitionError, Store};
use vmm::error_chain;

use crate::serve_cmd::{DEFAULT_DIR, parse_duration, parse_slice};
use crate::{EXIT_FAILURE, EXIT_USAGE};

/// `top`'s refresh interval: `1s`, `250ms` (50 ms to an hour).
fn parse_interval(s: &str) -> Result<Duration, String> {
    parse_duration(
        s,
        Duration::from_millis(50)..=Duration::from_secs(3600),
        "the interval must be 50ms..=1h",
        false,
    )
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
    /// Print a CDI (Container Device Interface) spec for an instance's session socket: a
    /// container engine given the device `tessera.dev/vgpu=NAME` bind-mounts the socket and
    /// sets TESSERA_DEVICE.
    Cdi {
        /// Instance name or UUID.
        #[arg(value_name = "NAME|UUID")]
        name: String,
        /// Where the socket appears inside the container.
        #[arg(long, value_name = "PATH", default_value = CDI_CONTAINER_PATH)]
        container_path: std::path::PathBuf,
    },
}

/// Where `vgpu cdi` puts the session socket inside a container by default.
const CDI_CONTAINER_PATH: &str = "/run/tessera/vgpu.session";

/// A CDI spec (github.com/cncf-tags/container-device-interface, spec 0.6.0) with one device.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CdiSpec {
    cdi_version: &'static str,
    kind: &'static str,
    devices: Vec<CdiDevice>,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CdiDevice {
    name: String,
    container_edits: CdiEdits,
}

#[derive(Debug, serde::Serialize)]
struct CdiEdits {
    env: Vec<String>,
    mounts: Vec<CdiMount>,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CdiMount {
    host_path: std::path::PathBuf,
    container_path: std::path::PathBuf,
    options: Vec<&'static str>,
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
        VgpuCommand::Cdi {
            name,
            container_path,
        } => {
            let r: ListReply = call!(&Request::List);
            let Some(i) = r
                .instances
                .into_iter()
                .find(|i| i.name == name || i.uuid.to_string() == name)
            else {
                return fail(&format!("no instance {name:?}"), true, json);
            };
            let spec = CdiSpec {
                cdi_version: "0.6.0",
                kind: "tessera.dev/vgpu",
                devices: vec![CdiDevice {
                    name: i.name,
                    container_edits: CdiEdits {
                        env: vec![format!(
                            "{}=unix:{}",
                            vgpu_session::DEVICE_ENV,
                            container_path.display()
                        )],
                        mounts: vec![CdiMount {
                            host_path: i.session_socket,
                            container_path,
                            options: vec!["bind"],
                        }],
                    },
                }],
            };
            match serde_json::to_string_pretty(&spec) {
                Ok(text) => println!("{text}"),
                Err(e) => return fail(&e.to_string(), false, json),
            }
        }
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
