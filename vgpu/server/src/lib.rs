//! The vGPU server (`tessera serve`): one [`PhysicalGpu`] whose vGPU instances are served to
//! other processes over vfio-user, one UNIX socket per instance, plus a control socket; and
//! the host client's remote port ([`remote::connect`]). A VMM that embeds the `vgpu` device
//! crate does not need this crate (nor vfio-user, vfio-bindings or serde_json).
//!
//! Threads: the caller's thread runs [`Daemon::serve`] (accepts control connections); each
//! control connection gets a short-lived thread; each instance has one thread that waits for a
//! client, builds a fresh [`Vgpu`](vgpu::Vgpu) for it (`instance.rs`) and runs the vfio-user crate's server loop until the
//! client leaves. The instance owns its VRAM [`Lease`](vgpu::physical::Lease) for its whole life; each attachment gets
//! a new VRAM file, scrubbed when the client leaves, so a client that keeps a stale mapping
//! sees zeros, never the next tenant's data. See docs/architecture.md.

pub mod attach;
pub mod control;
pub mod definitions;
mod instance;
mod irq;
pub mod metrics;
mod migrate;
pub mod peer;
pub mod remote;
pub mod session;
pub mod tls;

pub use control::InstanceInfo;
use instance::{Instance, InstanceWorker, Live, wait_readable};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use attach::DmaBudget;
use control::{
    CONTROL_SOCKET, CreateReply, Envelope, ListReply, MAX_REQUEST, MetricsReply, PolicyReply,
    RemoveReply, Reply, Request, StatsReply, TypeInfo, TypesReply, VersionReply,
};
use definitions::Definition;
use uuid::Uuid;
use vgpu::physical::{PhysicalGpu, VgpuStats};
use vgpu::profile::{self, Profile};
use vgpu::sched::{Params, Policy};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The directory or a socket could not be set up.
    #[error("cannot {what} {path}")]
    Setup {
        /// What failed.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another server owns the directory.
    #[error("a vGPU server is already running at {0}")]
    Running(PathBuf),
    /// The directory, or one above it, could be changed by another user.
    #[error("refusing socket directory")]
    Untrusted(#[source] std::io::Error),
}

/// Why a control request (or the instance operation behind it) was refused. Its text, with
/// its causes, is the `error` of the reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No such vGPU type.
    #[error("unknown vGPU type {name:?} (known: {known})")]
    UnknownType {
        /// What was asked for.
        name: String,
        /// The types there are.
        known: String,
    },
    /// A number outside its range.
    #[error("{what} {value} is not in {allowed}")]
    OutOfRange {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The range.
        allowed: String,
    },
    /// An unknown scheduling policy.
    #[error("{0}")]
    Policy(String),
    /// Only root may create instances for other users.
    #[error("only a server running as root can create an instance for uid {0}")]
    NotRoot(u32),
    /// A name that is not a valid instance name.
    #[error("instance name {0:?} must be 1-32 letters, digits, '-' or '_'")]
    Name(String),
    /// The name is taken.
    #[error("instance {0:?} already exists")]
    Exists(String),
    /// No instance of that name.
    #[error("no instance {0:?}")]
    NoInstance(String),
    /// The instance has a client.
    #[error("instance {0:?} is attached to a VM (EBUSY); stop the VM first")]
    Busy(String),
    /// The GPU has no room (or no such partition).
    #[error(transparent)]
    Gpu(#[from] vgpu::physical::PhysicalError),
    /// The instance's socket could not be set up.
    #[error(transparent)]
    Socket(#[from] ServeError),
    /// Another system call failed.
    #[error("cannot {what}")]
    Os {
        /// What.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Directory of the sockets (created with mode 0700).
    pub dir: PathBuf,
    /// Refuse client DMA files that are not sealed against shrinking.
    pub require_sealed: bool,
    /// Watchdog limit per packet.
    pub watchdog: Duration,
    /// Bytes of client memory one client may make the server map.
    pub max_client_memory: u64,
    /// Bytes of client memory all clients together may make the server map.
    pub max_mapped: u64,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            dir: PathBuf::from("/run/tessera"),
            require_sealed: false,
            watchdog: vgpu::device::DEFAULT_WATCHDOG,
            max_client_memory: attach::DEFAULT_CLIENT_MEMORY,
            max_mapped: attach::DEFAULT_TOTAL_MEMORY,
        }
    }
}

/// Control connections served at once (each has a thread); more are told to retry.
pub const MAX_CONTROL_CONNECTIONS: usize = 32;

/// Paces a listener's loop while `accept` fails (out of descriptors or memory: the pending
/// connection stays pending, so retrying at once would spin and flood the log): waits 5 ms,
/// doubling up to 1 s while the failures go on, logging each.
#[derive(Debug)]
pub(crate) struct AcceptBackoff(Duration);

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const LONGEST: Duration = Duration::from_secs(1);

    pub(crate) fn new() -> Self {
        AcceptBackoff(Self::FIRST)
    }

    pub(crate) fn failed(&mut self, listener: &str, e: &std::io::Error) {
        tracing::warn!("{listener}: {e}; next try in {:?}", self.0);
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(Self::LONGEST);
    }

    pub(crate) fn succeeded(&mut self) {
        self.0 = Self::FIRST;
    }
}
/// Serves each connection of a listener on a thread of its own, at most `limit` at once.
#[derive(Debug)]
pub(crate) struct ConnectionThreads {
    name: &'static str,
    limit: usize,
    busy: Arc<AtomicUsize>,
}

impl ConnectionThreads {
    pub(crate) fn new(name: &'static str, limit: usize) -> Self {
        ConnectionThreads {
            name,
            limit,
            busy: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Runs `serve(conn)` on a new thread, or gives `conn` back when `limit` threads are
    /// serving (the caller refuses it). A thread that cannot be made is logged and its
    /// connection dropped.
    pub(crate) fn serve<C: Send + 'static>(
        &self,
        conn: C,
        serve: impl FnOnce(C) + Send + 'static,
    ) -> Result<(), C> {
        if self.busy.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.busy.fetch_sub(1, Ordering::AcqRel);
            return Err(conn);
        }
        let busy = self.busy.clone();
        if let Err(e) = std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || {
                serve(conn);
                busy.fetch_sub(1, Ordering::AcqRel);
            })
        {
            self.busy.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("{}: cannot serve a connection: {e}", self.name);
        }
        Ok(())
    }
}

/// A control connection that sends nothing for this long is closed.
pub const CONTROL_IDLE: Duration = Duration::from_secs(120);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// See the module documentation.
pub struct Daemon {
    gpu: Arc<PhysicalGpu>,
    opts: ServeOptions,
    instances: Mutex<BTreeMap<String, Instance>>,
    next_id: AtomicU64,
    control: UnixListener,
    /// Control connections being served.
    control_threads: ConnectionThreads,
    /// Client memory every attachment charges its DMA mappings to.
    budget: Arc<DmaBudget>,
    /// This server's user (read before the sandbox, which refuses `geteuid`).
    euid: u32,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("dir", &self.opts.dir)
            .finish_non_exhaustive()
    }
}

/// Binds a listener at `path` that only the owner may connect to.
fn bind_private(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |what, source| ServeError::Setup {
        what,
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(|e| err("create socket", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err("restrict permissions of", e))?;
    Ok(listener)
}

pub(crate) fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Daemon {
    /// Sets up `opts.dir` (mode 0700) and its control socket for `gpu`.
    pub fn new(gpu: Arc<PhysicalGpu>, opts: ServeOptions) -> Result<Arc<Self>, ServeError> {
        let dir = &opts.dir;
        let err = |what, source| ServeError::Setup {
            what,
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| err("create directory", e))?;
        attach::install_relay_signal().map_err(|e| err("serve interrupts for", e))?;
        // Only this server's user may own the directory (a directory someone else made
        // first would let them replace our sockets), and nobody else may be able to replace
        // a directory above it.
        let me = devices::files::euid();
        devices::files::check_trusted_path(dir, &[me]).map_err(ServeError::Untrusted)?;
        let owner = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(dir).map_err(|e| err("inspect", e))?,
        );
        if owner != me {
            return Err(ServeError::Untrusted(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} belongs to uid {owner}, not to this server's user ({me})",
                    dir.display()
                ),
            )));
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err("restrict permissions of", e))?;
        let control_path = dir.join(CONTROL_SOCKET);
        if UnixStream::connect(&control_path).is_ok() {
            return Err(ServeError::Running(dir.clone()));
        }
        // Sockets left by a server that died are stale: nobody answers on them.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name == CONTROL_SOCKET {
                    let _ = std::fs::remove_file(e.path());
                } else if let Some(instance) = name
                    .strip_prefix("vgpu-")
                    .and_then(|n| n.strip_suffix(".sock"))
                {
                    tracing::warn!(
                        name = instance,
                        "removing a socket left by a server that stopped: its instance is gone \
                         unless a definition (`tessera vgpu define --auto`) brings it back"
                    );
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let control = bind_private(&control_path)?;
        // Before any sandbox: a client that truncates its memory costs only its vGPU.
        vgpu::guard::install().map_err(|e| err("handle SIGBUS for", e))?;
        // Every mapped region holds a descriptor: leave half of the open-file limit for
        // sockets, eventfds and VRAM files.
        let mut nofile = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit with a valid resource and a valid struct to fill.
        let regions = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) } == 0 {
            attach::DEFAULT_TOTAL_REGIONS.min(nofile.rlim_cur / 2)
        } else {
            attach::DEFAULT_TOTAL_REGIONS
        };
        let budget = Arc::new(DmaBudget::new(
            opts.max_client_memory,
            opts.max_mapped,
            regions,
        ));
        Ok(Arc::new(Daemon {
            gpu,
            opts,
            instances: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            control,
            control_threads: ConnectionThreads::new("vgpu-control", MAX_CONTROL_CONNECTIONS),
            budget,
            euid: me,
        }))
    }

    /// The socket directory.
    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    /// Serves control connections until `stop` is signalled; then stops every idle instance
    /// and removes the sockets.
    pub fn serve(self: &Arc<Self>, stop: &EventFd) -> std::io::Result<()> {
        let mut backoff = AcceptBackoff::new();
        loop {
            if !wait_readable(self.control.as_fd().as_raw_fd(), stop)? {
                break;
            }
            let stream = match self.control.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    backoff.failed("control socket", &e);
                    continue;
                }
            };
            backoff.succeeded();
            let _ = stream.set_read_timeout(Some(CONTROL_IDLE));
            let me = self.clone();
            if let Err(mut s) = self
                .control_threads
                .serve(stream, move |s| me.control_connection(s))
            {
                let mut line =
                    Envelope::<Reply>::error("too many control connections; retry").line();
                line.push('\n');
                let _ = s.write_all(line.as_bytes());
            }
        }
        self.shutdown();
        Ok(())
    }

    fn shutdown(&self) {
        let mut inst = lock(&self.instances);
        for i in inst.values_mut() {
            if i.live.attached.load(Ordering::Acquire) {
                // Its client sees the connection close when the process exits.
                let _ = i.stop.write(1);
                let _ = std::fs::remove_file(&i.info.socket);
            } else {
                i.stop();
            }
        }
        inst.clear();
        let _ = std::fs::remove_file(self.opts.dir.join(CONTROL_SOCKET));
    }

    fn control_connection(&self, stream: UnixStream) {
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        let mut writer = writer;
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = Vec::new();
            match (&mut reader)
                .take(MAX_REQUEST as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let answer = if line.len() > MAX_REQUEST {
                Envelope::error("request too long")
            } else {
                match serde_json::from_slice::<Request>(&line) {
                    Ok(req) => match self.handle(req) {
                        Ok(reply) => Envelope::ok(reply),
                        Err(e) => Envelope::error(devices::error_chain(&e)),
                    },
                    Err(e) => Envelope::error(format!("bad request: {e}")),
                }
            };
            let mut out = answer.line();
            out.push('\n');
            if writer.write_all(out.as_bytes()).is_err() || line.len() > MAX_REQUEST {
                return;
            }
        }
    }

    /// Carries out one control request.
    pub fn handle(&self, req: Request) -> Result<Reply, RequestError> {
        Ok(match req {
            Request::Types => Reply::Types(TypesReply {
                types: self.types(),
                gpu: self.gpu.backend_name(0).unwrap_or_default(),
            }),
            Request::Create {
                profile,
                name,
                uuid,
                partition,
                weight,
                cap,
                owner,
            } => {
                let c = definitions::check(&profile, name.as_deref(), weight, cap)?;
                let instance =
                    self.create_owned(c.profile, name, uuid, partition, c.params, owner)?;
                Reply::Create(CreateReply { instance })
            }
            Request::List => Reply::List(ListReply {
                instances: self.list(),
            }),
            Request::Remove { name } => Reply::Remove(RemoveReply {
                removed: self.remove(&name)?,
            }),
            Request::Stats => Reply::Stats(StatsReply {
                partitions: self.gpu.partitions(),
                vgpus: self.stats(),
            }),
            Request::Metrics => Reply::Metrics(MetricsReply {
                text: self.snapshot().text(),
            }),
            Request::Version => Reply::Version(VersionReply {
                version: env!("CARGO_PKG_VERSION").into(),
            }),
            Request::Policy { policy, slice_ms } => {
                let policy: Policy = policy.parse().map_err(RequestError::Policy)?;
                let slice = match slice_ms {
                    Some(ms @ 1..=30) => Duration::from_millis(ms),
                    Some(ms) => {
                        return Err(RequestError::OutOfRange {
                            what: "slice (ms)",
                            value: ms,
                            allowed: "1..=30".into(),
                        });
                    }
                    None => self
                        .gpu
                        .scheduler(0)
                        .map_or(vgpu::sched::DEFAULT_SLICE, |s| s.policy().1),
                };
                self.gpu.set_policy(policy, slice);
                tracing::info!(%policy, slice_ms = slice.as_millis() as u64, "policy changed");
                Reply::Policy(PolicyReply {
                    partitions: self.gpu.partitions(),
                })
            }
        })
    }

    /// Creates the instances of `defs` that start with the server, logging each, and returns
    /// how many came up. One that cannot be created (its type no longer fits, say) is logged
    /// as an error and the others still start.
    pub fn autostart(&self, defs: &[Definition]) -> usize {
        let mut started = 0;
        for d in defs.iter().filter(|d| d.autostart) {
            match self.handle(d.request()) {
                Ok(_) => {
                    tracing::info!(name = d.name, uuid = %d.uuid, "vGPU instance started from its definition");
                    started += 1;
                }
                Err(e) => tracing::error!(
                    name = d.name,
                    uuid = %d.uuid,
                    "cannot start the defined vGPU instance: {}",
                    devices::error_chain(&e)
                ),
            }
        }
        started
    }

    /// The types and how many more of each fit.
    pub fn types(&self) -> Vec<TypeInfo> {
        profile::PROFILES
            .iter()
            .map(|p| TypeInfo {
                name: p.name.into(),
                description: format!(
                    "{} MiB of VRAM, {} GPU contexts, a time-sliced share of the GPU",
                    p.vram >> 20,
                    p.contexts
                ),
                device_api: "vfio-pci".into(),
                vram: p.vram,
                contexts: p.contexts,
                available_instances: self.gpu.available_instances(p),
            })
            .collect()
    }

    /// The instances.
    pub fn list(&self) -> Vec<InstanceInfo> {
        lock(&self.instances)
            .values()
            .map(|i| InstanceInfo {
                peer: *lock(&i.live.peer),
                attached: i.live.attached.load(Ordering::Acquire),
                attachments: i.live.attachments.load(Ordering::Acquire),
                ..i.info.clone()
            })
            .collect()
    }

    /// Live statistics of every instance.
    /// What a metrics scrape reports ([`metrics`]).
    pub fn snapshot(&self) -> metrics::Snapshot {
        let (vgpus, attached) = {
            let instances = lock(&self.instances);
            let attached = instances
                .values()
                .filter(|i| i.live.attached.load(Ordering::Acquire))
                .count();
            (instances.values().map(Instance::stats).collect(), attached)
        };
        metrics::Snapshot {
            vgpus,
            partitions: self.gpu.partitions(),
            attached,
            version: env!("CARGO_PKG_VERSION"),
        }
    }

    pub fn stats(&self) -> Vec<VgpuStats> {
        lock(&self.instances)
            .values()
            .map(Instance::stats)
            .collect()
    }

    /// Creates an instance of `profile` for this server's user and starts serving its
    /// socket.
    pub fn create(
        &self,
        profile: &'static Profile,
        name: Option<String>,
        partition: Option<usize>,
        params: Params,
    ) -> Result<InstanceInfo, RequestError> {
        self.create_owned(profile, name, None, partition, params, None)
    }

    /// Like [`Daemon::create`], for the VMM of user `owner` (default: this server's user):
    /// its socket belongs to that user (mode 0600), and a client of any other user but root
    /// is refused.
    pub fn create_owned(
        &self,
        profile: &'static Profile,
        name: Option<String>,
        uuid: Option<Uuid>,
        partition: Option<usize>,
        params: Params,
        owner: Option<u32>,
    ) -> Result<InstanceInfo, RequestError> {
        let me = self.euid;
        let owner = owner.unwrap_or(me);
        if owner != me && me != 0 {
            return Err(RequestError::NotRoot(owner));
        }
        let mut inst = lock(&self.instances);
        let name = match name {
            Some(n) if !valid_name(&n) => return Err(RequestError::Name(n)),
            Some(n) => n,
            None => loop {
                let n = format!("vgpu{}", self.next_id.fetch_add(1, Ordering::Relaxed));
                if !inst.contains_key(&n) {
                    break n;
                }
            },
        };
        if inst.contains_key(&name) {
            return Err(RequestError::Exists(name));
        }
        let uuid = uuid.unwrap_or_else(Uuid::new_v4);
        if inst.values().any(|i| i.info.uuid == uuid) {
            return Err(RequestError::Exists(uuid.to_string()));
        }
        let lease = self.gpu.lease(profile, partition)?;
        let socket = self.opts.dir.join(format!("vgpu-{name}.sock"));
        let session_socket = self.opts.dir.join(format!("vgpu-{name}.session"));
        let listener = self.instance_socket(&socket, owner)?;
        let sessions = match self.instance_socket(&session_socket, owner) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        };
        let eventfd = |source| RequestError::Os {
            what: "create an eventfd".into(),
            source,
        };
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(eventfd)?);
        let remote = Arc::new(tls::RemoteQueue::new().map_err(eventfd)?);
        let live = Arc::new(Live::default());
        let info = InstanceInfo {
            name: name.clone(),
            uuid,
            profile: profile.name.into(),
            vram: profile.vram,
            partition: lease.partition(),
            weight: params.weight,
            cap: params.cap_percent,
            socket: socket.clone(),
            session_socket: session_socket.clone(),
            owner,
            peer: None,
            attached: false,
            attachments: 0,
        };
        let worker = InstanceWorker {
            name: name.clone(),
            profile,
            params,
            lease,
            listener,
            sessions,
            remote: remote.clone(),
            live: live.clone(),
            stop: stop.clone(),
            require_sealed: self.opts.require_sealed,
            watchdog: self.opts.watchdog,
            budget: self.budget.clone(),
            owner,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vfu-{name}"))
            .spawn(move || worker.run())
            .map_err(|source| {
                let _ = std::fs::remove_file(&socket);
                let _ = std::fs::remove_file(&session_socket);
                RequestError::Os {
                    what: "start the instance thread".into(),
                    source,
                }
            })?;
        tracing::info!(name, %uuid, profile = profile.name, "vGPU instance created");
        inst.insert(
            name,
            Instance {
                info: info.clone(),
                live,
                stop,
                remote,
                thread: Some(thread),
            },
        );
        Ok(info)
    }

    /// Where TLS sessions of instance `name` wait for its thread.
    pub(crate) fn remote_queue(&self, name: &str) -> Option<Arc<tls::RemoteQueue>> {
        lock(&self.instances).get(name).map(|i| i.remote.clone())
    }

    /// A private listener at `path` (mode 0600) that belongs to `owner`.
    fn instance_socket(&self, path: &Path, owner: u32) -> Result<UnixListener, RequestError> {
        let _ = std::fs::remove_file(path);
        let listener = bind_private(path)?;
        if owner != self.euid {
            // Hand the socket to its user, and let that user (like everyone) pass through
            // the directory, but not list or change it.
            let handed = std::os::unix::fs::chown(path, Some(owner), None).and_then(|()| {
                std::fs::set_permissions(&self.opts.dir, std::fs::Permissions::from_mode(0o711))
            });
            if let Err(e) = handed {
                let _ = std::fs::remove_file(path);
                return Err(RequestError::Os {
                    what: format!("hand the socket to uid {owner}"),
                    source: e,
                });
            }
        }
        Ok(listener)
    }

    /// Removes the idle instance named `key` (its name or UUID) and returns its name: its
    /// socket goes away, its VRAM is scrubbed and returned.
    pub fn remove(&self, key: &str) -> Result<String, RequestError> {
        let mut inst = lock(&self.instances);
        let uuid = Uuid::parse_str(key).ok();
        let name = inst
            .values()
            .find(|i| i.info.name == key || Some(i.info.uuid) == uuid)
            .map(|i| i.info.name.clone())
            .ok_or_else(|| RequestError::NoInstance(key.into()))?;
        if inst[&name].live.attached.load(Ordering::Acquire) {
            return Err(RequestError::Busy(name));
        }
        let removed = inst.remove(&name);
        // The instance thread is joined without the instances lock, so a client that
        // connects at this very moment delays only this request, not list, create or stats.
        drop(inst);
        if let Some(mut i) = removed {
            i.stop();
        }
        tracing::info!(name, "vGPU instance removed");
        Ok(name)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}
