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
    /// A request other than a `Write` longer than [`crate::proto::MAX_REQUEST`].
    #[error("request of {0} bytes is longer than the {max} allowed", max = crate::proto::MAX_REQUEST)]
    RequestTooLong(usize),
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

/// The frame of `msg` whose last field is an empty byte string, with `tail` as that field,
/// as a head (length, and the message up to the field's bytes) to send before `tail`: the
/// same bytes as [`encode`] of the message holding `tail`, without copying `tail`.
///
/// postcard writes a byte string as its length (a varint) and its bytes, and a message's
/// last field last, so the head is the encoding with the empty field's length (one zero
/// byte) replaced by `tail`'s.
pub fn encode_head<T: Serialize>(msg: &T, tail: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut head = postcard::to_extend(msg, vec![0u8; 4])?;
    if head.pop() != Some(0) {
        return Err(FrameError::Malformed(postcard::Error::SerializeBufferFull));
    }
    let mut n = tail.len() as u64;
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            head.push(low);
            break;
        }
        head.push(low | 0x80);
    }
    let len = head.len() - 4 + tail.len();
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    head[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(head)
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
    let (len, fd) = recv_head(sock)?;
    Ok((body(len, &mut &*sock)?, fd))
}

/// Reads a frame's length from `sock`, and a descriptor if one came with it.
pub fn recv_head(sock: &UnixStream) -> Result<(usize, Option<File>), FrameError> {
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
    Ok((frame_len(head)?, fd))
}

/// Reads one frame from a byte stream that carries no descriptors (TLS).
pub fn read<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    let len = read_head(r)?;
    body(len, r)
}

/// Reads a frame's length from a byte stream that carries no descriptors.
pub fn read_head(r: &mut impl Read) -> Result<usize, FrameError> {
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
    frame_len(head)
}

fn frame_len(head: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(head) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    Ok(len)
}

/// The message of a frame of `len` bytes, read from `r`.
pub(crate) fn body<T: DeserializeOwned>(len: usize, r: &mut impl Read) -> Result<T, FrameError> {
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
    fn a_head_and_its_tail_are_the_frame_of_the_whole_message() {
        use crate::proto::Reply;
        for len in [0usize, 1, 127, 128, 300, 16_384, 1 << 21] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let at = BufRef {
                buffer: 9,
                offset: 1 << 40,
            };
            let empty = Request::Write {
                at,
                data: Vec::new(),
            };
            let mut whole = encode_head(&empty, &data).unwrap();
            whole.extend_from_slice(&data);
            assert_eq!(
                whole,
                encode(&Request::Write {
                    at,
                    data: data.clone()
                })
                .unwrap()
            );
            let mut whole = encode_head(&Reply::Data { data: Vec::new() }, &data).unwrap();
            whole.extend_from_slice(&data);
            assert_eq!(whole, encode(&Reply::Data { data }).unwrap());
        }
        // A message whose last field is not an empty byte string has no head.
        assert!(encode_head(&Request::CreateContext, b"x").is_err());
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
