//! Messages on the wire: the 16-byte header, command numbers, and little-endian field
//! reading and writing. Every payload is read whole (its size is in the header) before it
//! is parsed, so a malformed message never leaves the stream out of step.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of the header every message starts with.
pub const HEADER_SIZE: usize = 16;
/// Most file descriptors one message carries (the protocol's `max_msg_fds`).
pub const MAX_MSG_FDS: usize = 16;
/// Largest data transfer in one message (`max_data_xfer_size`): region accesses and
/// migration data.
pub const MAX_DATA_XFER: usize = 1 << 20;
/// Largest message either side accepts: the largest transfer plus room for its fixed fields
/// (and a DMA logging report's bitmap, bounded the same way).
pub const MAX_MESSAGE: usize = MAX_DATA_XFER + 4096;

/// Command numbers (vfio-user specification, "Commands").
#[allow(missing_docs)]
pub mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    pub const DEVICE_SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DMA_READ: u16 = 11;
    pub const DMA_WRITE: u16 = 12;
    pub const DEVICE_RESET: u16 = 13;
    pub const DEVICE_FEATURE: u16 = 16;
    pub const MIG_DATA_READ: u16 = 17;
    pub const MIG_DATA_WRITE: u16 = 18;
}

/// Header flag bits.
pub mod flags {
    /// Message type: a reply (0 is a command).
    pub const REPLY: u32 = 1;
    /// The mask of the type field.
    pub const TYPE_MASK: u32 = 0xf;
    /// The sender wants no reply.
    pub const NO_REPLY: u32 = 1 << 4;
    /// The reply is an error; `error` holds an errno.
    pub const ERROR: u32 = 1 << 5;
}

/// A message header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Matches a reply to its command.
    pub message_id: u16,
    /// The command.
    pub command: u16,
    /// Size of the whole message, header included.
    pub message_size: u32,
    /// Type and flag bits.
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}

impl Header {
    /// Decodes a header.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        let mut r = Reader::new(b);
        // Infallible: the array holds exactly the fields.
        Header {
            message_id: r.u16().unwrap_or(0),
            command: r.u16().unwrap_or(0),
            message_size: r.u32().unwrap_or(0),
            flags: r.u32().unwrap_or(0),
            error: r.u32().unwrap_or(0),
        }
    }

    /// Encodes the header onto `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.message_id.to_le_bytes());
        out.extend_from_slice(&self.command.to_le_bytes());
        out.extend_from_slice(&self.message_size.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.error.to_le_bytes());
    }

    /// Whether this is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & flags::TYPE_MASK == flags::REPLY
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & flags::NO_REPLY != 0
    }
}

/// A payload was shorter than its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message too short: {needed} bytes needed at offset {at}")]
pub struct Short {
    /// Where the read started.
    pub at: usize,
    /// How many bytes it needed.
    pub needed: usize,
}

/// Reads little-endian fields from a payload.
#[derive(Debug)]
pub struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `b`.
    pub fn new(b: &'a [u8]) -> Self {
        Reader { b, at: 0 }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Short> {
        let s = self
            .at
            .checked_add(n)
            .and_then(|end| self.b.get(self.at..end))
            .ok_or(Short {
                at: self.at,
                needed: n,
            })?;
        self.at += n;
        Ok(s)
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at.min(self.b.len())..];
        self.at = self.b.len();
        s
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// A `u16`.
    pub fn u16(&mut self) -> Result<u16, Short> {
        self.array().map(u16::from_le_bytes)
    }

    /// A `u32`.
    pub fn u32(&mut self) -> Result<u32, Short> {
        self.array().map(u32::from_le_bytes)
    }

    /// A `u64`.
    pub fn u64(&mut self) -> Result<u64, Short> {
        self.array().map(u64::from_le_bytes)
    }
}

/// Appends little-endian fields.
pub trait Put {
    /// Appends a `u16`.
    fn u16(&mut self, v: u16) -> &mut Self;
    /// Appends a `u32`.
    fn u32(&mut self, v: u32) -> &mut Self;
    /// Appends a `u64`.
    fn u64(&mut self, v: u64) -> &mut Self;
}

impl Put for Vec<u8> {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// One message as received: its header, payload and file descriptors.
#[derive(Debug)]
pub struct Message {
    /// The header.
    pub header: Header,
    /// Everything after the header.
    pub payload: Vec<u8>,
    /// Descriptors that came with it.
    pub fds: Vec<File>,
}

/// Why a message could not be received.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer closed the connection between messages.
    #[error("the peer closed the connection")]
    Closed,
    /// The socket failed, or closed inside a message.
    #[error("cannot read a message: {0}")]
    Io(#[from] std::io::Error),
    /// The header's size is impossible; the stream cannot be followed any further.
    #[error("message size {0} is outside 16..={MAX_MESSAGE}")]
    Size(u32),
}

/// Receives one whole message. Descriptors come with the header's bytes (the sender sends
/// them with its first bytes); the payload is read without taking any more.
pub fn recv(stream: &mut UnixStream) -> Result<Message, RecvError> {
    recv_with(stream, true)
}

/// Receives one whole message; with `fds` false, with plain reads (no descriptors expected:
/// a sandboxed thread may be allowed `read` but not `recvmsg`).
pub fn recv_with(stream: &mut UnixStream, fds: bool) -> Result<Message, RecvError> {
    let mut head = [0u8; HEADER_SIZE];
    let mut files = Vec::new();
    let n = if fds {
        let mut raw: [RawFd; MAX_MSG_FDS] = [-1; MAX_MSG_FDS];
        let mut iov = [libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: HEADER_SIZE,
        }];
        // SAFETY: the one iovec points at `head`, which outlives the call, with its length.
        let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| RecvError::Io(e.into()))?;
        // SAFETY: recv_with_fds returned `nfds` descriptors received with SCM_RIGHTS; each is
        // ours alone and owned once by a `File` here.
        files = raw[..nfds.min(MAX_MSG_FDS)]
            .iter()
            .map(|&fd| unsafe { File::from_raw_fd(fd) })
            .collect();
        n
    } else {
        loop {
            match stream.read(&mut head) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        }
    };
    if n == 0 {
        return Err(RecvError::Closed);
    }
    if n < HEADER_SIZE {
        stream.read_exact(&mut head[n..])?;
    }
    let header = Header::decode(&head);
    let size = header.message_size as usize;
    if !(HEADER_SIZE..=MAX_MESSAGE).contains(&size) {
        return Err(RecvError::Size(header.message_size));
    }
    let mut payload = vec![0u8; size - HEADER_SIZE];
    stream.read_exact(&mut payload)?;
    Ok(Message {
        header,
        payload,
        fds: files,
    })
}

/// Sends one message: `header` (its size set from `payload`), the payload, and `fds` with
/// the first bytes.
pub fn send(
    stream: &mut UnixStream,
    mut header: Header,
    payload: &[u8],
    fds: &[RawFd],
) -> std::io::Result<()> {
    let size = HEADER_SIZE + payload.len();
    header.message_size = u32::try_from(size)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "message too big"))?;
    let mut buf = Vec::with_capacity(size);
    header.encode(&mut buf);
    buf.extend_from_slice(payload);
    let mut sent = 0;
    if !fds.is_empty() {
        sent = stream
            .send_with_fds(&[&buf[..]], fds)
            .map_err(std::io::Error::from)?;
    }
    stream.write_all(&buf[sent..])
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            message_id: 7,
            command: cmd::MIG_DATA_READ,
            message_size: 24,
            flags: flags::REPLY | flags::ERROR,
            error: 22,
        };
        let mut b = Vec::new();
        h.encode(&mut b);
        let a: [u8; HEADER_SIZE] = b.try_into().unwrap();
        assert_eq!(Header::decode(&a), h);
        assert!(h.is_reply());
    }

    #[test]
    fn short_payloads_are_errors() {
        let mut r = Reader::new(&[1, 0, 0]);
        assert_eq!(r.u16(), Ok(1));
        assert_eq!(r.u32(), Err(Short { at: 2, needed: 4 }));
        assert!(r.bytes(usize::MAX).is_err());
    }

    #[test]
    fn a_message_survives_the_socket_and_a_bad_size_is_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let h = Header {
            message_id: 3,
            command: cmd::REGION_READ,
            ..Header::default()
        };
        let f = File::open("/dev/null").unwrap();
        send(&mut a, h, &[1, 2, 3], &[f.as_raw_fd()]).unwrap();
        let m = recv(&mut b).unwrap();
        assert_eq!(
            (m.header.command, m.payload.as_slice()),
            (h.command, &[1, 2, 3][..])
        );
        assert_eq!(m.fds.len(), 1);
        let mut bad = Vec::new();
        Header {
            message_size: 8,
            ..h
        }
        .encode(&mut bad);
        a.write_all(&bad).unwrap();
        assert!(matches!(recv(&mut b), Err(RecvError::Size(8))));
        drop(a);
        assert!(matches!(recv(&mut b), Err(RecvError::Closed)));
    }
}
