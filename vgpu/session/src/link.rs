//! A connection that carries frames, for the client and the server alike: a UNIX stream
//! socket (a frame may carry a descriptor) or TLS over TCP (no descriptors: data goes inline).
//!
//! Over TLS, frames are written into the TLS session and leave together: when a link reads,
//! waits, or has [`FLUSH_AT`] bytes pending. A client that pipelines many small calls so sends
//! few records and few TCP segments, and a server that answers a burst of pipelined requests
//! sends its replies in one batch.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame::{self, FrameError};

/// Pending TLS bytes that make a link send before it is asked to.
pub const FLUSH_AT: usize = 256 << 10;

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
    sock: TcpStream,
    unflushed: usize,
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
            sock,
            unflushed: 0,
        }
    }

    /// Completes the handshake (a refused certificate is an error here, on the side that
    /// refused it; the other side learns it from an alert on its first read).
    pub fn handshake(&mut self) -> std::io::Result<()> {
        while self.conn.is_handshaking() {
            self.conn.complete_io(&mut self.sock)?;
        }
        self.flush()
    }

    /// The peer's certificate chain, end entity first (after the handshake).
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    fn flush(&mut self) -> std::io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock)?;
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

    /// Whether decrypted bytes wait to be read (a poll of the socket would not show them).
    fn buffered(&mut self) -> bool {
        self.conn
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
            let n = self.conn.read_tls(&mut self.sock)?;
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

    /// Sends what is queued.
    pub fn flush(&mut self) -> Result<(), FrameError> {
        match self {
            Link::Unix(_) => Ok(()),
            Link::Tls(t) => Ok(t.flush()?),
        }
    }

    /// Receives one frame (what was queued leaves first).
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<(T, Option<File>), FrameError> {
        match self {
            Link::Unix(s) => frame::recv(s),
            Link::Tls(t) => Ok((frame::read(&mut **t)?, None)),
        }
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
            Link::Tls(t) => t.sock.as_raw_fd(),
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
                t.sock.set_read_timeout(d)?;
                t.sock.set_write_timeout(d)
            }
        }
    }

    /// Whether it is a TLS link (no client memory: data goes inline).
    pub fn is_tls(&self) -> bool {
        matches!(self, Link::Tls(_))
    }
}
