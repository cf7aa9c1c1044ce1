//! Sessions over TCP with mutual TLS (`tessera serve --session-tls ADDR`): one listener for
//! every instance. See docs/architecture.md, "Sessions over TCP".
//!
//! The listener's thread accepts connections and gives each a short-lived thread for its
//! handshake (at most [`MAX_HANDSHAKES`] at once, each bounded by [`HANDSHAKE_TIMEOUT`]).
//! A client without a certificate from the client CA fails there, and the log says why. The
//! first frame must be `Open { instance }`, and the client's certificate must name that
//! instance (a DNS name of its subjectAltName); then the connection is queued on the
//! instance, whose own thread serves it as it serves a session from its UNIX socket.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use vgpu_session::link::Link;
use vgpu_session::proto::{ErrorKind, Reply, Request};
use vgpu_session::tls;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::{Daemon, lock};

/// Handshakes in progress at once; more connections are closed at once.
pub const MAX_HANDSHAKES: usize = 32;
/// Handshakes in progress at once from one address: a single host cannot hold every slot.
pub const MAX_HANDSHAKES_PER_PEER: usize = 4;
/// Longest a client may take over its handshake and its `Open`, all reads together.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `Open` frame (an instance name is at most 32 bytes).
const MAX_OPEN: usize = 256;
/// Longest one read or write of an open TLS session may block (a client that stops in the
/// middle of a frame, or stops reading its replies, is dropped after this).
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections that may wait for a busy instance.
pub const MAX_QUEUED: usize = 4;

/// TLS connections waiting for their instance's thread.
#[derive(Debug)]
pub(crate) struct RemoteQueue {
    links: Mutex<VecDeque<(Link, SocketAddr)>>,
    /// Signalled when one is queued.
    pub(crate) ready: EventFd,
}

impl RemoteQueue {
    pub(crate) fn new() -> std::io::Result<RemoteQueue> {
        Ok(RemoteQueue {
            links: Mutex::new(VecDeque::new()),
            ready: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queues `link`, or gives it back when [`MAX_QUEUED`] already wait.
    fn push(&self, link: Link, peer: SocketAddr) -> Result<(), Link> {
        let mut q = lock(&self.links);
        if q.len() >= MAX_QUEUED {
            return Err(link);
        }
        q.push_back((link, peer));
        drop(q);
        let _ = self.ready.write(1);
        Ok(())
    }

    /// The next waiting connection.
    pub(crate) fn pop(&self) -> Option<(Link, SocketAddr)> {
        lock(&self.links).pop_front()
    }
}

/// The TLS session listener.
#[derive(Debug)]
pub struct TlsListener {
    addr: SocketAddr,
}

impl TlsListener {
    /// Binds `addr` (port 0: a free one) and serves sessions of `daemon`'s instances there.
    pub fn start(
        addr: SocketAddr,
        config: Arc<ServerConfig>,
        daemon: &Arc<Daemon>,
    ) -> std::io::Result<TlsListener> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let daemon = Arc::downgrade(daemon);
        std::thread::Builder::new()
            .name("vgpu-tls".into())
            .spawn(move || accept_loop(&listener, &config, &daemon))?;
        Ok(TlsListener { addr })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn accept_loop(listener: &TcpListener, config: &Arc<ServerConfig>, daemon: &Weak<Daemon>) {
    let busy = Arc::new(Handshakes::default());
    let mut backoff = crate::AcceptBackoff::new();
    // Refusals are logged at most once a second, with how many there were.
    let mut refused = (Instant::now(), 0u64);
    loop {
        let (sock, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                backoff.failed("TLS session listener", &e);
                continue;
            }
        };
        backoff.succeeded();
        if let Err(why) = busy.start(peer.ip()) {
            refused.1 += 1;
            if refused.0.elapsed() >= Duration::from_secs(1) {
                tracing::warn!(%peer, refused = refused.1, "TLS session refused: {why}");
                refused = (Instant::now(), 0);
            }
            continue;
        }
        let (config, daemon, count) = (config.clone(), daemon.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("vgpu-tls-hs".into())
            .spawn(move || {
                if let Err(why) = open(sock, peer, config, &daemon) {
                    tracing::warn!(%peer, "TLS session refused: {why}");
                }
                count.end(peer.ip());
            });
        if let Err(e) = spawned {
            busy.end(peer.ip());
            tracing::warn!(%peer, "cannot serve a TLS connection: {e}");
        }
    }
}

/// Handshakes in progress, in all and per peer address.
#[derive(Debug, Default)]
struct Handshakes(Mutex<(usize, std::collections::HashMap<std::net::IpAddr, usize>)>);

impl Handshakes {
    /// Counts one more from `ip`, or says why not.
    fn start(&self, ip: std::net::IpAddr) -> Result<(), String> {
        let mut g = lock(&self.0);
        let (total, per) = &mut *g;
        if *total >= MAX_HANDSHAKES {
            return Err(format!("{MAX_HANDSHAKES} handshakes in progress"));
        }
        let mine = per.entry(ip).or_default();
        if *mine >= MAX_HANDSHAKES_PER_PEER {
            return Err(format!(
                "{MAX_HANDSHAKES_PER_PEER} handshakes in progress from {ip}"
            ));
        }
        *mine += 1;
        *total += 1;
        Ok(())
    }

    fn end(&self, ip: std::net::IpAddr) {
        let mut g = lock(&self.0);
        let (total, per) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&ip);
            }
        }
    }
}

/// Handshake, `Open`, the certificate's right to the instance; then the connection is queued
/// on the instance. A refusal after the handshake is logged and told to the client here;
/// `Err`: why the connection failed before that.
fn open(
    sock: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    daemon: &Weak<Daemon>,
) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io)?;
    sock.set_nodelay(true).map_err(io)?;
    // One deadline for the handshake and `Open` together: a client that sends a byte now
    // and then does not keep a handshake thread.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let tls = tls::accept(sock, config, deadline).map_err(|e| format!("handshake: {e}"))?;
    let cert = tls
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or("no client certificate")?;
    let mut link = Link::Tls(Box::new(tls));
    // Logged before the client is told, so the log says why by the time the client knows.
    let refuse = |link: &mut Link, kind, message: String| {
        tracing::warn!(%peer, "TLS session refused: {message}");
        let _ = link.send(&Reply::Error { kind, message }, None);
        let _ = link.flush();
        Ok(())
    };
    let instance = match link.recv_at_most::<Request>(MAX_OPEN) {
        Ok(Request::Open { instance }) => instance,
        Ok(other) => {
            let what = format!("the first request on TCP must be Open, not {other:?}");
            return refuse(&mut link, ErrorKind::Protocol, what);
        }
        Err(e) => return Err(format!("no Open: {e}")),
    };
    if !tls::names_instance(&cert, &instance) {
        let what = format!(
            "the client certificate does not name instance {instance:?} (a DNS name of its \
             subjectAltName)"
        );
        return refuse(&mut link, ErrorKind::Protocol, what);
    }
    let Some(queue) = daemon.upgrade().and_then(|d| d.remote_queue(&instance)) else {
        let what = format!("no instance {instance:?}");
        return refuse(&mut link, ErrorKind::NoSuchObject, what);
    };
    if let Link::Tls(t) = &mut link {
        t.set_deadline(None).map_err(io)?;
    }
    link.set_timeouts(Some(IO_TIMEOUT)).map_err(io)?;
    tracing::info!(%peer, instance, "TLS session accepted");
    match queue.push(link, peer) {
        Ok(()) => Ok(()),
        Err(mut link) => {
            let what = format!("instance {instance:?} is busy ({MAX_QUEUED} sessions wait for it)");
            refuse(&mut link, ErrorKind::Exhausted, what)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One address holds at most its share of the handshake slots, every address together at
    /// most all of them, and a finished handshake frees its slot.
    #[test]
    fn handshake_slots_are_shared_between_addresses() {
        let h = Handshakes::default();
        let a: std::net::IpAddr = [10, 0, 0, 1].into();
        for _ in 0..MAX_HANDSHAKES_PER_PEER {
            h.start(a).unwrap();
        }
        let e = h.start(a).unwrap_err();
        assert!(e.contains("from 10.0.0.1"), "{e}");
        h.end(a);
        h.start(a).expect("a finished handshake frees its slot");
        let others = (MAX_HANDSHAKES - MAX_HANDSHAKES_PER_PEER) as u32;
        for i in 0..others {
            h.start(std::net::IpAddr::from((0x0b00_0000 + i).to_be_bytes()))
                .unwrap();
        }
        let e = h.start([12, 0, 0, 1].into()).unwrap_err();
        assert!(e.contains(&format!("{MAX_HANDSHAKES} handshakes")), "{e}");
        for _ in 0..MAX_HANDSHAKES_PER_PEER {
            h.end(a);
        }
        h.start([12, 0, 0, 1].into()).unwrap();
        assert!(
            !lock(&h.0).1.contains_key(&a),
            "an address with none is forgotten"
        );
    }
}
