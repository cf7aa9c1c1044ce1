//! Frames on a stream socket: a little-endian `u32` length, then that many bytes of postcard.
//! On a UNIX socket a frame may carry one file descriptor (SCM_RIGHTS, with its first bytes);
//! over TLS ([`crate::link`]) frames are the same bytes, without descriptors.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use serde::Serialize;
use serde::de::DeserializeOwned;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::proto::MAX_FRAME;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed or closed.
    #[error("session connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection between frames.
    #[error("the session connection was closed")]
    Closed,
    /// A length over [`MAX_FRAME`].
    #[error("frame of {0} bytes is longer than the {MAX_FRAME} allowed")]
    TooLong(usize),
    /// The bytes are not a message of this protocol.
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
    /// A descriptor cannot travel on this connection (TCP).
    #[error("file descriptors travel only on a UNIX socket")]
    NoDescriptors,
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; 4])?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Sends `msg`, with `fd` when given.
pub fn send<T: Serialize>(sock: &UnixStream, msg: &T, fd: Option<&File>) -> Result<(), FrameError> {
    let bytes = encode(msg)?;
    let mut sent = 0;
    if let Some(f) = fd {
        sent = sock
            .send_with_fd(&bytes[..], f.as_raw_fd())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    (&*sock).write_all(&bytes[sent..])?;
    Ok(())
}

/// Receives one frame: the message, and a descriptor if one came with it.
pub fn recv<T: DeserializeOwned>(sock: &UnixStream) -> Result<(T, Option<File>), FrameError> {
    let mut head = [0u8; 4];
    let mut got = 0;
    let mut fd = None;
    while got < 4 {
        let (n, f) = sock
            .recv_with_fd(&mut head[got..])
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())
            });
        }
        // Only the first descriptor counts; a later one is closed here.
        if fd.is_none() {
            fd = f;
        }
        got += n;
    }
    Ok((body(head, &mut &*sock)?, fd))
}

/// Reads one frame from a byte stream that carries no descriptors (TLS).
pub fn read<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            // A peer that went away without closing TLS, between frames, has closed too.
            Err(e) if got == 0 && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(FrameError::Closed);
            }
            Ok(0) => return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    body(head, r)
}

/// The message of a frame whose length is `head`, its bytes read from `r`.
fn body<T: DeserializeOwned>(head: [u8; 4], r: &mut impl Read) -> Result<T, FrameError> {
    let len = u32::from_le_bytes(head) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(postcard::from_bytes(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{BufRef, Command, Request};

    #[test]
    fn frames_round_trip_and_carry_a_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        let req = Request::Submit {
            ctx: 1,
            commands: vec![Command::Fill {
                dst: BufRef {
                    buffer: 3,
                    offset: 8,
                },
                len: 64,
                value: 7,
            }],
        };
        let file = tempfile_like();
        send(&a, &req, Some(&file)).unwrap();
        send(&a, &Request::CreateContext, None).unwrap();
        let (got, fd) = recv::<Request>(&b).unwrap();
        assert_eq!(got, req);
        assert!(fd.is_some());
        let (got, fd) = recv::<Request>(&b).unwrap();
        assert_eq!((got, fd.is_none()), (Request::CreateContext, true));
        drop(a);
        assert!(matches!(recv::<Request>(&b), Err(FrameError::Closed)));
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            recv::<Request>(&b),
            Err(FrameError::TooLong(n)) if n == u32::MAX as usize
        ));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
        assert!(matches!(recv::<Request>(&b), Err(FrameError::Malformed(_))));
    }

    fn tempfile_like() -> File {
        File::open("/proc/self/exe").unwrap()
    }
}
