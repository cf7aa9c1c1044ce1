//! A connection that carries frames, for the client and the server alike: a UNIX stream
//! socket (a frame may carry a descriptor) or TLS over TCP (no descriptors: data goes inline).
//!
//! Over TLS, frames are written into the TLS session and leave together: when a link reads,
//! waits, or has [`FLUSH_AT`] bytes pending. A client that pipelines many small calls so sends
//! few records and few TCP segments, and a server that answers a burst of pipelined requests
//! sends its replies in one batch.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame::{self, FrameError};
use crate::proto::{BufRef, MAX_REQUEST, Request, WRITE_HEAD_MAX, write_head};

/// Pending TLS bytes that make a link send before it is asked to.
pub const FLUSH_AT: usize = 256 << 10;

/// Bytes one read of a TLS link's socket may bring (rustls asks for 4 KiB at a time: one
/// system call per 4 KiB, a quarter of a record, would cost more than the cipher).
const READ_AHEAD: usize = 256 << 10;

/// A request as the server receives it.
#[derive(Debug)]
pub enum Incoming {
    /// A whole request, and the descriptor that came with it.
    Request(Request, Option<File>),
    /// A `Write` of `len` bytes at `at`: `first` holds its first bytes, the rest are still in
    /// the link ([`Link::read_exact`] them, all of them, before the next frame).
    Write {
        /// Where.
        at: BufRef,
        /// How many bytes.
        len: u64,
        /// The first of them.
        first: Vec<u8>,
    },
}

/// A connection between a session client and its server.
#[derive(Debug)]
pub enum Link {
    /// A UNIX stream socket.
    Unix(UnixStream),
    /// TLS over TCP.
    Tls(Box<Tls>),
}

/// A TLS session on a TCP connection.
#[derive(Debug)]
pub struct Tls {
    conn: rustls::Connection,
    /// The socket; what it brought and rustls has not taken yet waits in the buffer.
    sock: BufReader<TcpStream>,
    unflushed: usize,
    /// When set, reads fail once it has passed, however slowly the peer sends.
    deadline: Option<Instant>,
}

fn tls_error(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

impl Tls {
    /// `conn` on `sock`, its handshake not yet done ([`Tls::handshake`]).
    pub fn new(conn: impl Into<rustls::Connection>, sock: TcpStream) -> Tls {
        let mut conn = conn.into();
        // Frames are bounded (`MAX_FRAME`); a whole one may be queued before it leaves.
        conn.set_buffer_limit(None);
        Tls {
            conn,
            sock: BufReader::with_capacity(READ_AHEAD, sock),
            unflushed: 0,
            deadline: None,
        }
    }

    /// Completes the handshake (a refused certificate is an error here, on the side that
    /// refused it; the other side learns it from an alert on its first read).
    pub fn handshake(&mut self) -> std::io::Result<()> {
        while self.conn.is_handshaking() {
            self.flush()?;
            if self.conn.is_handshaking() && self.conn.wants_read() {
                if self.fill()? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                if let Err(e) = self.conn.process_new_packets() {
                    // Tell the peer why (an alert), then fail.
                    let _ = self.flush();
                    return Err(tls_error(e));
                }
            }
        }
        self.flush()
    }

    /// From now on reads fail (`TimedOut`) once `deadline` has passed, however the peer
    /// trickles its bytes (`None`: only the socket's timeouts apply).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) -> std::io::Result<()> {
        self.deadline = deadline;
        if deadline.is_none() {
            self.sock.get_ref().set_read_timeout(None)?;
        }
        Ok(())
    }

    /// Gives rustls what the socket has (at most [`READ_AHEAD`] per system call).
    fn fill(&mut self) -> std::io::Result<usize> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            self.sock.get_ref().set_read_timeout(Some(left))?;
            // The socket's timeout ends a read with EAGAIN.
            return self
                .conn
                .read_tls(&mut self.sock)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::WouldBlock => std::io::ErrorKind::TimedOut.into(),
                    _ => e,
                });
        }
        self.conn.read_tls(&mut self.sock)
    }

    /// The peer's certificate chain, end entity first (after the handshake).
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    fn flush(&mut self) -> std::io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(self.sock.get_mut())?;
        }
        self.unflushed = 0;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.writer().write_all(bytes)?;
        self.unflushed += bytes.len();
        if self.unflushed >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Whether bytes wait in the link, decrypted or not (a poll of the socket would not show
    /// them).
    fn buffered(&mut self) -> bool {
        !self.sock.buffer().is_empty()
            || self
                .conn
                .process_new_packets()
                .is_ok_and(|s| s.plaintext_bytes_to_read() > 0)
    }
}

impl Read for Tls {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            // Nothing decrypted yet: whatever this side still has to say goes first (the
            // peer may be waiting for it), then more records.
            self.flush()?;
            let n = self.fill()?;
            if let Err(e) = self.conn.process_new_packets() {
                // Tell the peer why (an alert), then fail.
                let _ = self.flush();
                return Err(tls_error(e));
            }
            if n == 0 {
                return match self.conn.reader().read(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        Err(std::io::ErrorKind::UnexpectedEof.into())
                    }
                    r => r,
                };
            }
        }
    }
}

/// The bytes of the frame being received, whichever the link.
struct Body<'a>(&'a mut Link);

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut *self.0 {
            Link::Unix(s) => (&*s).read(buf),
            Link::Tls(t) => t.read(buf),
        }
    }
}

impl Link {
    /// Sends `msg`, with `fd` when given (UNIX only). Over TLS it may stay queued until the
    /// link reads, [`Link::flush`]es or has [`FLUSH_AT`] bytes queued.
    pub fn send<T: Serialize>(&mut self, msg: &T, fd: Option<&File>) -> Result<(), FrameError> {
        match self {
            Link::Unix(s) => frame::send(s, msg, fd),
            Link::Tls(_) if fd.is_some() => Err(FrameError::NoDescriptors),
            Link::Tls(t) => Ok(t.write(&frame::encode(msg)?)?),
        }
    }

    /// Sends `msg`, whose last field is an empty byte string, with `tail` as that field
    /// ([`frame::encode_head`]), without copying `tail` into a frame: large writes and reads
    /// stream from the caller's buffer into the socket (through the cipher, 64 KiB at a
    /// time, over TLS).
    pub fn send_with_tail<T: Serialize>(&mut self, msg: &T, tail: &[u8]) -> Result<(), FrameError> {
        let head = frame::encode_head(msg, tail)?;
        match self {
            Link::Unix(s) => {
                (&*s).write_all(&head)?;
                (&*s).write_all(tail)?;
            }
            Link::Tls(t) => {
                t.write(&head)?;
                for piece in tail.chunks(64 << 10) {
                    t.write(piece)?;
                }
            }
        }
        Ok(())
    }

    /// Sends what is queued.
    pub fn flush(&mut self) -> Result<(), FrameError> {
        match self {
            Link::Unix(_) => Ok(()),
            Link::Tls(t) => Ok(t.flush()?),
        }
    }

    /// Receives one frame (what was queued leaves first).
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<(T, Option<File>), FrameError> {
        let (len, fd) = self.head()?;
        Ok((frame::body(len, &mut Body(self))?, fd))
    }

    /// Receives one frame of at most `max` bytes (a longer one is refused unread).
    pub fn recv_at_most<T: DeserializeOwned>(&mut self, max: usize) -> Result<T, FrameError> {
        let (len, _) = self.head()?;
        if len > max {
            return Err(FrameError::TooLong(len));
        }
        frame::body(len, &mut Body(self))
    }

    /// A frame's length, and the descriptor that came with it (UNIX only).
    fn head(&mut self) -> Result<(usize, Option<File>), FrameError> {
        match self {
            Link::Unix(s) => frame::recv_head(s),
            Link::Tls(t) => Ok((frame::read_head(&mut **t)?, None)),
        }
    }

    /// Receives a request; a `Write` comes as its head, its data left in the link.
    pub fn recv_request(&mut self) -> Result<Incoming, FrameError> {
        let (len, fd) = self.head()?;
        let mut body = vec![0u8; len.min(WRITE_HEAD_MAX)];
        self.read_exact(&mut body)?;
        if fd.is_none()
            && let Some((at, n, used)) = write_head(&body)
            && (used as u64).checked_add(n) == Some(len as u64)
        {
            return Ok(Incoming::Write {
                at,
                len: n,
                first: body.split_off(used),
            });
        }
        if len > MAX_REQUEST {
            return Err(FrameError::RequestTooLong(len));
        }
        let start = body.len();
        body.resize(len, 0);
        self.read_exact(&mut body[start..])?;
        Ok(Incoming::Request(postcard::from_bytes(&body)?, fd))
    }

    /// Reads exactly `buf.len()` bytes of the frame being received.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), FrameError> {
        Ok(Body(self).read_exact(buf)?)
    }

    /// Whether a frame's bytes already arrived and wait, decrypted, in the link: then a poll
    /// of [`Link::fd`] need not say so.
    pub fn buffered(&mut self) -> bool {
        match self {
            Link::Unix(_) => false,
            Link::Tls(t) => t.buffered(),
        }
    }

    /// The socket, to poll.
    pub fn fd(&self) -> RawFd {
        match self {
            Link::Unix(s) => s.as_raw_fd(),
            Link::Tls(t) => t.sock.get_ref().as_raw_fd(),
        }
    }

    /// Limits how long one read or write of the socket may block (`None`: forever).
    pub fn set_timeouts(&self, d: Option<Duration>) -> std::io::Result<()> {
        match self {
            Link::Unix(s) => {
                s.set_read_timeout(d)?;
                s.set_write_timeout(d)
            }
            Link::Tls(t) => {
                t.sock.get_ref().set_read_timeout(d)?;
                t.sock.get_ref().set_write_timeout(d)
            }
        }
    }

    /// Whether it is a TLS link (no client memory: data goes inline).
    pub fn is_tls(&self) -> bool {
        matches!(self, Link::Tls(_))
    }
}
