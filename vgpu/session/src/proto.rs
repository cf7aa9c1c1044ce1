//! The session protocol: what a client asks of its instance and what it gets back.
//!
//! Every message is one frame ([`crate::frame`]): a little-endian `u32` length, then a
//! postcard encoding of a [`Request`] (client → server) or a [`Reply`] (server → client). The
//! server answers every request with exactly one reply, in order, so a client may send many
//! requests before it reads their replies (pipelining).
//!
//! Buffers are named by the number the server gave them; a command's operands are
//! ([`BufRef`]) a buffer and a byte offset in it. The server checks each operand's extent
//! against its buffer before it writes a packet, and the device checks every access again
//! through its MMU, so a session reaches nothing but its own buffers.

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks. A server refuses a `Hello` with another one.
pub const VERSION: u32 = 1;

/// Longest data a `Write` carries or a `Read` returns.
pub const MAX_INLINE: u64 = 64 << 20;

/// Longest frame (a `Write` of [`MAX_INLINE`] bytes plus its header).
pub const MAX_FRAME: usize = MAX_INLINE as usize + 4096;

/// Most commands in one `Submit`.
pub const MAX_COMMANDS: usize = 1024;

/// Longest frame of a request other than a `Write`: a `Submit` of [`MAX_COMMANDS`] commands
/// (each at most 76 bytes in postcard) and its header. A longer one is refused before it is
/// decoded: 64 MiB of 3-byte commands would decode to 2 GiB.
pub const MAX_REQUEST: usize = MAX_COMMANDS * 128 + 4096;

/// Most buffers a session holds at once.
pub const MAX_BUFFERS: usize = 4096;

/// Longest `Wait` (ms); a longer one is refused.
pub const MAX_WAIT_MS: u32 = 600_000;

/// Longest head of a `Write` frame: its variant, its `at` and its data's length, as postcard
/// varints.
pub const WRITE_HEAD_MAX: usize = 5 + 5 + 10 + 10;

/// The position of [`Request::Write`] in [`Request`] (postcard's variant number).
const WRITE_VARIANT: u32 = 5;

/// If `bytes` start a `Write` request: where it writes, how many bytes, and how many bytes of
/// `bytes` the head took (its data follows them). A server reads the head, checks it, and
/// moves the data into place as it arrives, without holding the whole message.
pub fn write_head(bytes: &[u8]) -> Option<(BufRef, u64, usize)> {
    let ((variant, at, len), rest) = postcard::take_from_bytes::<(u32, BufRef, u64)>(bytes).ok()?;
    (variant == WRITE_VARIANT).then_some((at, len, bytes.len() - rest.len()))
}

/// A buffer and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufRef {
    /// The buffer's number.
    pub buffer: u32,
    /// Bytes from its start.
    pub offset: u64,
}

/// One GPU command of a `Submit`, in the device's own terms (docs/vgpu-spec.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// `len` bytes from `src` to `dst`.
    Copy {
        /// Source.
        src: BufRef,
        /// Destination.
        dst: BufRef,
        /// Bytes.
        len: u64,
    },
    /// `len` bytes (a multiple of 4, 4-aligned) of `dst` set to the little-endian `value`.
    Fill {
        /// Destination.
        dst: BufRef,
        /// Bytes.
        len: u64,
        /// The repeated word.
        value: u32,
    },
    /// `y[i] = a·x[i] + y[i]` for `n` f32.
    Saxpy {
        /// Elements.
        n: u64,
        /// The scale.
        a: f32,
        /// Input.
        x: BufRef,
        /// Input and output.
        y: BufRef,
    },
    /// Row-major f32 `C(m×n) = A(m×k)·B(k×n)`.
    Sgemm {
        /// Rows of A and C.
        m: u64,
        /// Columns of B and C.
        n: u64,
        /// Columns of A, rows of B.
        k: u64,
        /// A.
        a: BufRef,
        /// B.
        b: BufRef,
        /// C (written).
        c: BufRef,
    },
    /// The wrapping u64 sum of `n` u32 at `x`, written at `out`.
    ReduceSum {
        /// Elements.
        n: u64,
        /// Input.
        x: BufRef,
        /// The u64 result.
        out: BufRef,
    },
    /// CRC-32/IEEE of `len` bytes at `src`, written (u32) at `out`.
    Crc32 {
        /// Bytes.
        len: u64,
        /// Input.
        src: BufRef,
        /// The u32 result.
        out: BufRef,
    },
    /// `groups` workgroups of `us` µs each (a load of known GPU time).
    SpinUs {
        /// Microseconds per workgroup.
        us: u64,
        /// Workgroups.
        groups: u64,
    },
    /// The GPU clock (ns, u64) written at `dst` when the command runs.
    Timestamp {
        /// Where (8 bytes).
        dst: BufRef,
    },
}

/// A request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// The first request of a session ([`Reply::Welcome`]).
    Hello {
        /// [`VERSION`].
        version: u32,
    },
    /// A new context: its own ring and fence, the session's address space
    /// ([`Reply::Context`]).
    CreateContext,
    /// A buffer of `size` bytes in the instance's VRAM ([`Reply::Buffer`]).
    AllocVram {
        /// Bytes (rounded up to 4 KiB).
        size: u64,
    },
    /// `size` bytes of the memfd sent with this frame (SCM_RIGHTS), from its start, as a
    /// buffer the GPU reaches in place ([`Reply::Buffer`]). The memfd must be sealed against
    /// shrinking.
    MapMemory {
        /// Bytes (at most the file's length).
        size: u64,
    },
    /// Gives a buffer back ([`Reply::Done`]); work still queued on it may fault.
    Free {
        /// The buffer.
        buffer: u32,
    },
    /// Writes `data` into a buffer ([`Reply::Done`]).
    Write {
        /// Where.
        at: BufRef,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Reads `len` bytes of a buffer ([`Reply::Data`]).
    Read {
        /// Where.
        at: BufRef,
        /// Bytes.
        len: u64,
    },
    /// Queues `commands` on context `ctx`, then a fence ([`Reply::Submitted`]).
    Submit {
        /// The context.
        ctx: u32,
        /// The commands, in order.
        commands: Vec<Command>,
    },
    /// Waits until fence `fence` of `ctx` completed, at most `timeout_ms`
    /// ([`Reply::Waited`]).
    Wait {
        /// The context.
        ctx: u32,
        /// The fence value `Submit` returned.
        fence: u64,
        /// Longest wait.
        timeout_ms: u32,
    },
    /// Restarts a context that stopped on a fault: queued work is dropped, fences go on
    /// ([`Reply::Done`]).
    ResetContext {
        /// The context.
        ctx: u32,
    },
    /// The first request on TCP, where one listener serves every instance: the instance to
    /// open (the client's certificate must name it). No reply of its own: `Hello` follows,
    /// and is answered by the instance (or an error ends the connection).
    Open {
        /// The instance's name.
        instance: String,
    },
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitResult {
    /// The fence completed.
    Done,
    /// It did not complete in time.
    TimedOut,
    /// The context stopped on a fault first (`vgpu_abi::fault` code, GPU address).
    Fault {
        /// The fault code.
        code: u32,
        /// The address.
        addr: u64,
    },
}

/// What kind of request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The frame did not decode, was too long, or came out of order; the server closes the
    /// connection after this reply.
    Protocol,
    /// Another protocol version.
    Version,
    /// A number that names no buffer or context of this session.
    NoSuchObject,
    /// An extent past its buffer, a size of 0 or over a limit, a misaligned operand.
    BadArgument,
    /// The instance's VRAM, contexts or the session's buffer table are used up.
    Exhausted,
    /// A memfd that is missing, unsealed, too short or cannot be mapped.
    BadMemory,
    /// The device or the server failed.
    Device,
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The session is open.
    Welcome {
        /// [`VERSION`].
        version: u32,
        /// The instance's name.
        instance: String,
        /// Its type (profile).
        profile: String,
        /// Its VRAM in bytes (the session's quota).
        vram: u64,
        /// Contexts it may create.
        contexts: u32,
    },
    /// A context was created.
    Context {
        /// Its number.
        ctx: u32,
    },
    /// A buffer was made.
    Buffer {
        /// Its number.
        buffer: u32,
        /// Its size in bytes.
        size: u64,
    },
    /// Done.
    Done,
    /// Bytes read.
    Data {
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Commands queued; wait for this fence.
    Submitted {
        /// The fence value.
        fence: u64,
    },
    /// A wait ended.
    Waited(WaitResult),
    /// The request failed; nothing changed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// One line saying what and why.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_of_a_write_is_found_and_nothing_else_is_taken_for_one() {
        for (buffer, offset, len) in [
            (1u32, 0u64, 0usize),
            (u32::MAX, u64::MAX, 300),
            (7, 1 << 40, 5),
        ] {
            let at = BufRef { buffer, offset };
            let data = vec![0xabu8; len];
            let bytes = postcard::to_stdvec(&Request::Write { at, data }).unwrap();
            let (got, n, used) = write_head(&bytes).expect("a write head");
            assert_eq!((got, n, used + len), (at, len as u64, bytes.len()));
            assert!(used <= WRITE_HEAD_MAX);
        }
        for other in [
            Request::Hello { version: 1 },
            Request::Read {
                at: BufRef {
                    buffer: 1,
                    offset: 2,
                },
                len: 3,
            },
            Request::Free { buffer: 5 },
        ] {
            assert_eq!(
                write_head(&postcard::to_stdvec(&other).unwrap()),
                None,
                "{other:?}"
            );
        }
    }
}
