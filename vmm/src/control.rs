//! The VM's control socket (`tessera vm --api-socket PATH`; `tessera vmctl`): pause, resume,
//! info and shutdown while the VM runs. See docs/architecture.md, "The VM control socket".
//!
//! - [`PauseGate`]: vCPU threads pass it before every `KVM_RUN`; while the VM is paused they
//!   wait in it, counted, so a pause is complete when every vCPU is parked there.
//! - [`ApiServer`]: an event-loop subscriber on the main thread. One request per connection:
//!   a JSON line in (`{"op":"pause"}`), a JSON line out (`{"ok":true,"state":"paused",…}` or
//!   `{"ok":false,"error":"…"}`). The socket is mode 0600: the VM's user (and root) only.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::{ExitHandle, ExitReason};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};

/// Longest a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a request line.
const MAX_REQUEST: u64 = 4096;
/// Longest a pause waits for every vCPU to park (one may be finishing a device access, such
/// as a vGPU `WAIT` of at most 100 ms).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Work a parked vCPU thread does on its own vCPU (reading its state for a snapshot: KVM
/// vCPU ioctls belong to the thread that runs it).
pub type VcpuJob =
    Arc<dyn Fn(&kvm_ioctls::VcpuFd) -> Result<crate::kvm_state::VcpuState, String> + Send + Sync>;

#[derive(Default)]
struct GateState {
    paused: bool,
    /// vCPUs waiting in the gate.
    parked: usize,
    /// The job each parked vCPU does once, and what each did (by vCPU index).
    job: Option<VcpuJob>,
    results: Vec<Option<Result<crate::kvm_state::VcpuState, String>>>,
}

impl std::fmt::Debug for GateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateState")
            .field("paused", &self.paused)
            .field("parked", &self.parked)
            .finish_non_exhaustive()
    }
}

/// Where vCPU threads wait while the VM is paused.
#[derive(Debug, Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A vCPU thread's check before `KVM_RUN`: returns at once while the VM runs; while it is
    /// paused, waits (counted as parked) until it is resumed or `stop` is raised.
    /// While parked, vCPU `cpu` does the job posted by [`PauseGate::on_each_vcpu`] on `fd`.
    pub fn pass(&self, stop: &AtomicBool, cpu: usize, fd: Option<&kvm_ioctls::VcpuFd>) {
        let mut s = self.lock();
        if !s.paused {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        while s.paused && !stop.load(Ordering::Acquire) {
            if let Some(job) = s.job.clone()
                && s.results.get(cpu).is_some_and(|r| r.is_none())
            {
                let r = fd.map_or_else(|| Err("no vCPU to read".into()), |fd| job(fd));
                s.results[cpu] = Some(r);
                self.changed.notify_all();
                continue;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
        self.changed.notify_all();
    }

    /// Pauses: every vCPU parks at its next pass (`kick` interrupts their `KVM_RUN`; a kick
    /// that lands just before `KVM_RUN` is lost, so it is repeated). Returns once all `vcpus`
    /// are parked, or an error (and the VM runs on) after `within`.
    pub fn pause(&self, vcpus: usize, kick: impl Fn(), within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let mut s = self.lock();
        s.paused = true;
        while s.parked < vcpus {
            drop(s);
            kick();
            s = self.lock();
            if s.parked >= vcpus {
                break;
            }
            if Instant::now() >= deadline {
                s.paused = false;
                self.changed.notify_all();
                return Err(format!(
                    "{} of {vcpus} vCPUs stopped within {} ms; the VM runs on",
                    s.parked,
                    within.as_millis()
                ));
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Has each of the `vcpus` parked vCPUs run `job` on itself; returns their results in
    /// vCPU order. Only while the VM is paused with every vCPU parked.
    pub fn on_each_vcpu(
        &self,
        vcpus: usize,
        job: VcpuJob,
        within: Duration,
    ) -> Result<Vec<crate::kvm_state::VcpuState>, String> {
        let deadline = Instant::now() + within;
        let mut s = self.lock();
        if !s.paused || s.parked < vcpus {
            return Err("the VM is not paused (pause it first)".into());
        }
        s.results = (0..vcpus).map(|_| None).collect();
        s.job = Some(job);
        self.changed.notify_all();
        while s.results.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                s.job = None;
                return Err("the vCPUs did not report their state in time".into());
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.job = None;
        std::mem::take(&mut s.results)
            .into_iter()
            .enumerate()
            .map(|(cpu, r)| {
                r.unwrap_or_else(|| Err("no state".into()))
                    .map_err(|e| format!("vCPU {cpu}: {e}"))
            })
            .collect()
    }

    /// Resumes: the parked vCPUs go back to the guest.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Wakes every parked vCPU to see the stop flag (the VM is ending).
    pub fn release(&self) {
        let _s = self.lock();
        self.changed.notify_all();
    }

    /// Whether the VM is paused, and how many vCPUs are parked.
    pub fn status(&self) -> (bool, usize) {
        let s = self.lock();
        (s.paused, s.parked)
    }
}

/// A request line on the control socket: `{"op":"pause"}`, `{"op":"snapshot","dir":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLine {
    /// What to do.
    pub op: Request,
    /// Where a snapshot goes (`snapshot` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Where a migration goes (`send-migration` only): `unix:PATH` or `tcp:IP:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Request {
    /// Stop every vCPU (the guest's clock keeps running).
    Pause,
    /// Let them run again.
    Resume,
    /// The VM's state.
    Info,
    /// End the VM as if the guest had powered off.
    Shutdown,
    /// Write the paused VM's state to a directory (`dir`); it stays paused.
    Snapshot,
    /// Move the running VM to a `tessera vm --receive-migration` at `url`; it ends here.
    SendMigration,
}

/// A reply on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was done.
    pub ok: bool,
    /// `running`, `paused` or `stopping` (absent with an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// vCPUs of the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<usize>,
    /// vCPUs stopped in the pause gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus_paused: Option<usize>,
    /// GPU time each in-process vGPU has used so far (ns).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vgpu_busy_ns: Vec<u64>,
    /// What a snapshot wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<crate::vm_snapshot::Taken>,
    /// What a migration did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migration::Report>,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    fn error(e: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            state: None,
            vcpus: None,
            vcpus_paused: None,
            vgpu_busy_ns: Vec::new(),
            snapshot: None,
            migration: None,
            error: Some(e.into()),
        }
    }
}

/// What the control socket acts on.
#[derive(Debug, Clone)]
pub struct Controls {
    pub gate: Arc<PauseGate>,
    pub exit: ExitHandle,
    /// The vCPU threads (filled once they run), to kick out of `KVM_RUN`.
    pub threads: Arc<Mutex<Vec<libc::pthread_t>>>,
    /// The signal that kicks them.
    pub kick_signal: libc::c_int,
    /// The in-process vGPUs: paused with the vCPUs.
    pub vgpus: Vec<Arc<vgpu::Vgpu>>,
    /// What a snapshot is taken of.
    pub snapshot: Arc<crate::vm_snapshot::Sources>,
}

impl Controls {
    fn reply(&self) -> Reply {
        let (paused, parked) = self.gate.status();
        let vcpus = self.threads.lock().unwrap_or_else(|e| e.into_inner()).len();
        let state = if self.exit.reason().is_some() {
            "stopping"
        } else if paused {
            "paused"
        } else {
            "running"
        };
        Reply {
            ok: true,
            state: Some(state.into()),
            vcpus: Some(vcpus),
            vcpus_paused: Some(parked),
            vgpu_busy_ns: self
                .vgpus
                .iter()
                .map(|v| v.monitor().sched_stats().busy_ns)
                .collect(),
            snapshot: None,
            migration: None,
            error: None,
        }
    }

    /// Stops the vCPUs (no new GPU work), then the vGPUs; on an error the VM runs on.
    pub(crate) fn pause(&self) -> Result<(), String> {
        let threads = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let kick = || {
            for &t in &threads {
                // SAFETY: `t` is a vCPU thread of this VM, joined only after the event loop
                // (which runs this) has ended.
                unsafe { libc::pthread_kill(t, self.kick_signal) };
            }
        };
        if let Err(e) = self.gate.pause(threads.len(), kick, PAUSE_TIMEOUT) {
            if self.exit.reason().is_some() {
                return Err("the VM is ending (its vCPUs stopped for good)".into());
            }
            return Err(e);
        }
        for (i, v) in self.vgpus.iter().enumerate() {
            if let Err(e) = v.pause(PAUSE_TIMEOUT) {
                self.resume();
                return Err(format!("vGPU {i}: {e}; the VM runs on"));
            }
        }
        // vGPUs over vfio-user stop through migration v2 (one in PRE_COPY is left to the
        // migration that put it there: it stops with STOP_COPY).
        for u in &self.snapshot.user {
            if u.state() == vfu::DeviceState::Running
                && let Err(e) = u.set_state(vfu::DeviceState::Stop)
            {
                self.resume();
                return Err(format!("{e}; the VM runs on"));
            }
        }
        Ok(())
    }

    /// Lets the vGPUs, then the vCPUs, run again.
    pub(crate) fn resume(&self) {
        for u in &self.snapshot.user {
            if let Err(e) = u.set_state(vfu::DeviceState::Running) {
                tracing::error!("{e}");
            }
        }
        for v in &self.vgpus {
            v.resume();
        }
        self.gate.resume();
    }

    /// Does `req` (`dir`: a snapshot's directory; `url`: a migration's destination).
    pub fn handle(&self, req: &Request, dir: Option<&Path>, url: Option<&str>) -> Reply {
        match req {
            Request::SendMigration => {
                let peer = match url.map(str::parse::<crate::migration::Peer>) {
                    Some(Ok(p)) => p,
                    Some(Err(e)) => return Reply::error(e),
                    None => return Reply::error("send-migration needs a destination (\"url\")"),
                };
                tracing::info!(%peer, "sending the VM");
                return match crate::migration::send_vm(self, &peer) {
                    Ok(report) => {
                        tracing::info!(?report, "VM migrated; it ends here");
                        self.exit.request(ExitReason::PowerOff);
                        Reply {
                            migration: Some(report),
                            ..self.reply()
                        }
                    }
                    Err(e) => {
                        tracing::warn!("migration to {peer} failed, the VM runs on: {e}");
                        let e = e.trim_end_matches("; the VM runs on");
                        Reply::error(format!("migration: {e}; the VM runs on"))
                    }
                };
            }
            Request::Snapshot => {
                let Some(dir) = dir else {
                    return Reply::error("snapshot needs a directory (\"dir\")");
                };
                return match self.snapshot.take(dir, &self.gate) {
                    Ok(taken) => {
                        tracing::info!(dir = %dir.display(), bytes = taken.bytes, ms = taken.ms, "VM snapshot taken");
                        Reply {
                            snapshot: Some(taken),
                            ..self.reply()
                        }
                    }
                    Err(e) => Reply::error(format!("snapshot: {e}")),
                };
            }
            Request::Info => {}
            Request::Pause => {
                if let Err(e) = self.pause() {
                    return Reply::error(e);
                }
                tracing::info!("VM paused");
            }
            Request::Resume => {
                self.resume();
                tracing::info!("VM resumed");
            }
            Request::Shutdown => {
                tracing::info!("shutdown requested on the control socket");
                self.exit.request(ExitReason::PowerOff);
                self.resume();
            }
        }
        self.reply()
    }
}

/// The control socket on the main thread's event loop.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    controls: Controls,
}

impl ApiServer {
    /// Listens at `path` (mode 0600). A socket left there by a VMM that is gone is replaced;
    /// one that answers is in use, an error.
    pub fn bind(path: &Path, controls: Controls) -> std::io::Result<ApiServer> {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running VM", path.display()),
            ));
        }
        if std::fs::symlink_metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            controls,
        })
    }

    fn serve(&self, conn: UnixStream) {
        let reply = match read_request(&conn) {
            Ok(req) => self
                .controls
                .handle(&req.op, req.dir.as_deref(), req.url.as_deref()),
            Err(e) => Reply::error(e),
        };
        let mut line = serde_json::to_string(&reply).unwrap_or_else(|_| "{\"ok\":false}".into());
        line.push('\n');
        let _ = (&conn).write_all(line.as_bytes());
    }
}

fn read_request(conn: &UnixStream) -> Result<RequestLine, String> {
    // (An accepted socket blocks, whatever its listener does.)
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(conn, MAX_REQUEST))
        .read_line(&mut line)
        .map_err(|e| format!("no request: {e}"))?;
    serde_json::from_str::<RequestLine>(line.trim()).map_err(|e| {
        format!(
            "bad request {:?}: {e} (expected {{\"op\":\"pause|resume|info|shutdown\"}} or \
             {{\"op\":\"snapshot\",\"dir\":\"PATH\"}})",
            line.trim()
        )
    })
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("cannot watch the control socket: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok((conn, _)) = self.listener.accept() {
            self.serve(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_returns_once_every_vcpu_is_parked_and_resume_releases_them() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let vcpus: Vec<_> = (0..3)
            .map(|_| {
                let (g, s, r) = (gate.clone(), stop.clone(), runs.clone());
                std::thread::spawn(move || {
                    while !s.load(Ordering::Acquire) {
                        g.pass(&s, 0, None);
                        r.fetch_add(1, Ordering::Relaxed);
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        gate.pause(3, || {}, PAUSE_TIMEOUT).unwrap();
        assert_eq!(gate.status(), (true, 3));
        let at = runs.load(Ordering::Relaxed);
        // Parked threads do not run (they are all counted in the gate, under its lock).
        assert_eq!(gate.status(), (true, 3));
        assert_eq!(runs.load(Ordering::Relaxed), at);
        gate.resume();
        while runs.load(Ordering::Relaxed) == at {
            std::thread::yield_now();
        }
        gate.pause(3, || {}, PAUSE_TIMEOUT).unwrap();
        stop.store(true, Ordering::Release);
        gate.release();
        for v in vcpus {
            v.join().unwrap();
        }
    }

    #[test]
    fn a_pause_that_cannot_complete_gives_up_and_the_vm_runs_on() {
        let gate = PauseGate::default();
        let started = Instant::now();
        let e = gate.pause(1, || {}, Duration::from_millis(50)).unwrap_err();
        assert!(e.contains("0 of 1 vCPUs"), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(gate.status(), (false, 0));
    }

    #[test]
    fn requests_are_json_lines() {
        for (text, want) in [
            (r#"{"op":"pause"}"#, Request::Pause),
            (r#"{"op":"resume"}"#, Request::Resume),
            (r#"{"op":"info"}"#, Request::Info),
            (r#"{"op":"shutdown"}"#, Request::Shutdown),
        ] {
            assert_eq!(serde_json::from_str::<RequestLine>(text).unwrap().op, want);
            assert_eq!(
                serde_json::to_string(&RequestLine {
                    op: want,
                    dir: None,
                    url: None
                })
                .unwrap(),
                text
            );
        }
        for bad in [
            r#"{"op":"reboot"}"#,
            r#"{"op":"pause","x":1}"#,
            "pause",
            "",
            "{}",
        ] {
            assert!(serde_json::from_str::<RequestLine>(bad).is_err(), "{bad}");
        }
    }
}
