//! One vGPU instance of the server: what `list` reports about it, the state its thread shares
//! with the control side, and the thread itself, which waits for a client, builds a fresh
//! vGPU for it on a fresh VRAM file and serves it until the client leaves.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vgpu_session::link::Link;
use vmm_sys_util::eventfd::EventFd;

use crate::attach::{self, Attachment, DmaBudget, EventVectors};
use crate::control::InstanceInfo;
use crate::session::SessionServer;
use crate::tls::RemoteQueue;
use crate::{lock, peer};
use vgpu::device::{Interrupts, Vgpu, VgpuMonitor, VgpuSetup};
use vgpu::physical::{Lease, VgpuStats};
use vgpu::profile::Profile;
use vgpu::sched::Params;

/// Counters of attachments that ended.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    pub(crate) busy_ns: u64,
    pub(crate) switches: u64,
    pub(crate) faults: u64,
    pub(crate) resets: u64,
    pub(crate) poll_ns: u64,
}

/// State an instance thread shares with the control side.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub(crate) attached: AtomicBool,
    pub(crate) attachments: AtomicU64,
    pub(crate) monitor: Mutex<Option<VgpuMonitor>>,
    pub(crate) totals: Mutex<Totals>,
    /// The connected client's credentials (`None` between clients).
    pub(crate) peer: Arc<Mutex<Option<peer::Peer>>>,
}

pub(crate) struct Instance {
    pub(crate) info: InstanceInfo,
    pub(crate) live: Arc<Live>,
    pub(crate) stop: Arc<EventFd>,
    /// TLS sessions waiting for the thread.
    pub(crate) remote: Arc<RemoteQueue>,
    pub(crate) thread: Option<JoinHandle<()>>,
}

impl Instance {
    pub(crate) fn stats(&self) -> VgpuStats {
        // Under the monitor lock the attachment's vGPU cannot go away (its counters are
        // folded into the totals under the same lock first).
        let monitor = lock(&self.live.monitor);
        let t = *lock(&self.live.totals);
        let (s, dev, poll) = monitor.as_ref().map_or_else(Default::default, |m| {
            (m.sched_stats(), m.counters(), m.poll_time())
        });
        drop(monitor);
        let mut st = VgpuStats::new(&self.info.name, self.info.partition, s, dev);
        st.poll_ns = poll.as_nanos() as u64 + t.poll_ns;
        st.busy_ns += t.busy_ns;
        st.context_switches += t.switches;
        st.faults += t.faults;
        st.resets += t.resets;
        st
    }

    /// Stops the instance thread (it must be idle) and removes the socket.
    pub(crate) fn stop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            tracing::error!("cannot stop instance {}: {e}", self.info.name);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.info.socket);
        let _ = std::fs::remove_file(&self.info.session_socket);
    }
}

/// Waits until `fd` is readable (`true`) or `stop` is signalled (`false`).
pub(crate) fn wait_readable(fd: i32, stop: &EventFd) -> std::io::Result<bool> {
    Ok(wait_any(&[fd], stop)?.is_some())
}

/// Waits until one of `fds` is readable (its index) or `stop` is signalled (`None`).
pub(crate) fn wait_any(fds: &[i32], stop: &EventFd) -> std::io::Result<Option<usize>> {
    let mut polled: Vec<libc::pollfd> = std::iter::once(stop.as_raw_fd())
        .chain(fds.iter().copied())
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `polled` is a valid array of pollfd, of this length, for the call.
        let rc = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if polled[0].revents != 0 {
            return Ok(None);
        }
        if let Some(i) = polled[1..].iter().position(|p| p.revents != 0) {
            return Ok(Some(i));
        }
    }
}

/// The thread of one instance.
pub(crate) struct InstanceWorker {
    pub(crate) name: String,
    pub(crate) profile: &'static Profile,
    pub(crate) params: Params,
    pub(crate) lease: Lease,
    pub(crate) listener: UnixListener,
    /// Its session socket (`vgpu_session` clients).
    pub(crate) sessions: UnixListener,
    /// Sessions that came over TLS ([`crate::tls`]).
    pub(crate) remote: Arc<RemoteQueue>,
    pub(crate) live: Arc<Live>,
    pub(crate) stop: Arc<EventFd>,
    pub(crate) require_sealed: bool,
    pub(crate) watchdog: Duration,
    pub(crate) budget: Arc<DmaBudget>,
    pub(crate) owner: u32,
}

impl InstanceWorker {
    pub(crate) fn run(self) {
        let fds = [
            self.listener.as_fd().as_raw_fd(),
            self.sessions.as_fd().as_raw_fd(),
            self.remote.ready.as_raw_fd(),
        ];
        loop {
            let which = match wait_any(&fds, &self.stop) {
                Ok(Some(i)) => i,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!(name = self.name, "instance socket: {e}");
                    return;
                }
            };
            if which == 2 {
                let _ = self.remote.ready.read();
                while let Some((link, peer)) = self.remote.pop() {
                    self.session(link, None, &peer.to_string());
                }
                continue;
            }
            if which == 1 {
                self.unix_session();
                continue;
            }
            self.live.attached.store(true, Ordering::Release);
            if let Err(e) = self.attach_once() {
                tracing::error!(name = self.name, "cannot serve a client: {e}");
                // Refuse the waiting client rather than spin on it.
                if let Ok((s, _)) = self.listener.accept() {
                    drop(s);
                }
            }
            self.live.attachments.fetch_add(1, Ordering::AcqRel);
            self.live.attached.store(false, Ordering::Release);
        }
    }

    /// Serves one client from connect to disconnect.
    pub(crate) fn attach_once(&self) -> Result<(), String> {
        let vram = self.lease.fresh_vram().map_err(|e| e.to_string())?;
        let vectors = Arc::new(EventVectors::default());
        let vgpu = Vgpu::new(VgpuSetup {
            interrupts: Interrupts::Vectors(vectors.clone()),
            sched_params: self.params,
            watchdog: self.watchdog,
            ..VgpuSetup::with_vram(&self.lease, vram.clone())
        })
        .map_err(|e| devices::error_chain(&e))?;
        *lock(&self.live.monitor) = Some(vgpu.monitor());
        let info = vfu::DeviceInfo {
            resettable: true,
            irqs: attach::irqs(self.profile.contexts.min(vgpu_abi::limits::MAX_CONTEXTS)),
            regions: attach::regions(vram.size(), attach::mmap_fd(&*vram)),
        };
        let (stream, _) = self.listener.accept().map_err(|e| e.to_string())?;
        let mut att = Attachment::new(vgpu, vectors, self.require_sealed, self.budget.clone())
            .with_gate(attach::Gate {
                connection: stream.as_raw_fd(),
                allowed: vec![self.owner],
                peer: self.live.peer.clone(),
            });
        tracing::info!(name = self.name, "client attached");
        match vfu::serve(stream, &info, &mut att) {
            Ok(()) => tracing::info!(name = self.name, "client detached"),
            Err(e) => tracing::warn!(name = self.name, "client dropped: {e}"),
        }
        if att.ignored > 0 {
            tracing::info!(
                name = self.name,
                ignored = att.ignored,
                "malformed accesses were ignored"
            );
        }
        self.fold_counters();
        // Stops running work at the next workgroup and leaves the scheduler; then the VRAM
        // file is punched, so a mapping the client kept reads zeros.
        drop(att);
        *lock(&self.live.peer) = None;
        vram.scrub();
        Ok(())
    }

    /// Accepts a client of the session socket; serves it if it is the instance's owner or
    /// root.
    fn unix_session(&self) {
        let sock = match self.sessions.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::error!(name = self.name, "session socket: {e}");
                return;
            }
        };
        let Some(peer) = peer::of(sock.as_raw_fd()) else {
            tracing::warn!(
                name = self.name,
                "session refused: the client has no credentials"
            );
            return;
        };
        if peer.uid != self.owner && peer.uid != 0 {
            tracing::warn!(
                name = self.name,
                uid = peer.uid,
                pid = peer.pid,
                "session refused: the instance belongs to uid {}",
                self.owner
            );
            return;
        }
        let who = format!("pid {} uid {}", peer.pid, peer.uid);
        let link = Link::Unix(sock);
        // As over TLS: a client that stops in the middle of a frame, or stops reading its
        // replies, is dropped after this (between frames the session waits as long as the
        // client likes, and sees the instance stop).
        if let Err(e) = link.set_timeouts(Some(crate::tls::IO_TIMEOUT)) {
            tracing::warn!(name = self.name, "session refused: {e}");
            return;
        }
        self.session(link, Some(peer), &who);
    }

    /// Serves one session client (`vgpu_session`) from its `Hello` to disconnect, on a fresh
    /// vGPU and VRAM file as a VM would get.
    fn session(&self, mut link: Link, peer: Option<peer::Peer>, who: &str) {
        self.live.attached.store(true, Ordering::Release);
        *lock(&self.live.peer) = peer;
        if let Err(e) = self.serve_session(&mut link, who) {
            tracing::error!(name = self.name, "cannot serve a session: {e}");
        }
        *lock(&self.live.peer) = None;
        self.live.attachments.fetch_add(1, Ordering::AcqRel);
        self.live.attached.store(false, Ordering::Release);
    }

    fn serve_session(&self, link: &mut Link, who: &str) -> Result<(), String> {
        let vram = self.lease.fresh_vram().map_err(|e| e.to_string())?;
        let vgpu = Vgpu::new(VgpuSetup {
            sched_params: self.params,
            watchdog: self.watchdog,
            ..VgpuSetup::with_vram(&self.lease, vram.clone())
        })
        .map_err(|e| devices::error_chain(&e))?;
        *lock(&self.live.monitor) = Some(vgpu.monitor());
        tracing::info!(name = self.name, client = who, "session opened");
        let served = SessionServer::new(&vgpu, &self.name, self.profile.name, self.budget.clone())
            .map(|mut s| s.serve(link, &self.stop));
        tracing::info!(name = self.name, client = who, "session closed");
        self.fold_counters();
        drop(vgpu);
        vram.scrub();
        served
    }

    /// Folds the ending attachment's counters into the totals before its vGPU goes away
    /// (both locks held, monitor first as readers take them, so no reader sees neither).
    fn fold_counters(&self) {
        let mut monitor = lock(&self.live.monitor);
        if let Some(m) = monitor.take() {
            let (s, dev) = (m.sched_stats(), m.counters());
            let mut t = lock(&self.live.totals);
            t.busy_ns += s.busy_ns;
            t.switches += s.switches;
            t.faults += dev.1;
            t.resets += dev.2;
            t.poll_ns += m.poll_time().as_nanos() as u64;
        }
    }
}
