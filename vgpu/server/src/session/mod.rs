//! The server side of a GPU session (`vgpu_session`): one client connection on an instance's
//! session socket, served on the instance's thread. See docs/architecture.md, "GPU sessions
//! without a VM".
//!
//! The session's vGPU is built exactly as for a VM (fresh VRAM file, the instance's weight,
//! cap and watchdog). Its system memory is a private control memfd at address 0 (page tables,
//! rings, fence words: nothing a client command can name) and the client's memfds, each a DMA
//! region from 4 GiB up. GPU VA = that address; the instance's VRAM is mapped whole at
//! [`VRAM_VA`]. A client names buffers and offsets; every operand's extent is checked against
//! its buffer here before a packet is written, and the device's MMU checks every access again.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::pci::PciDeviceSync;
use vgpu::device::Vgpu;
use vgpu_abi::{Packet, ctx_control, kernel, packet, pci, regs, wait};
use vgpu_session::frame::FrameError;
use vgpu_session::link::{Incoming, Link};
use vgpu_session::proto::{
    BufRef, Command, ErrorKind, MAX_BUFFERS, MAX_COMMANDS, MAX_INLINE, MAX_WAIT_MS, Reply, Request,
    VERSION, WaitResult,
};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vm_memory::{Bytes, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::attach::DmaBudget;

mod space;

use space::Space;
pub use space::VRAM_VA;

/// VRAM granule.
const VRAM_ALIGN: u64 = 4096;

/// A buffer of the session.
#[derive(Debug)]
struct Buffer {
    /// GPU VA of byte 0.
    va: u64,
    size: u64,
    place: Place,
}

#[derive(Debug)]
enum Place {
    /// At this offset of the VRAM (its allocator range starts there).
    Vram { offset: u64 },
    /// A client memfd mapped at `va` (its region is in `regions`).
    Client,
}

/// One context: its ring and fence sequence.
#[derive(Debug, Default)]
struct Context {
    tail: u32,
    fence: u64,
    /// Submissions the device may not have finished, oldest first: each one's fence and the
    /// ring tail just past it (its fence packet).
    queued: VecDeque<(u64, u32)>,
}

/// Why a request failed.
struct Refusal(ErrorKind, String);

fn refuse(kind: ErrorKind, message: impl Into<String>) -> Refusal {
    Refusal(kind, message.into())
}

/// One session, from `Hello` to disconnect.
pub struct SessionServer<'a> {
    vgpu: &'a Vgpu,
    instance: &'a str,
    profile: &'a str,
    space: Space<'a>,
    buffers: BTreeMap<u32, Buffer>,
    next_buffer: u32,
    vram: AddressAllocator,
    vram_size: u64,
    contexts: Vec<Context>,
    greeted: bool,
}

impl std::fmt::Debug for SessionServer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionServer")
            .field("instance", &self.instance)
            .field("buffers", &self.buffers.len())
            .field("contexts", &self.contexts.len())
            .finish_non_exhaustive()
    }
}

impl<'a> SessionServer<'a> {
    /// A session on `vgpu` (fresh, no memory yet) of instance `instance`.
    pub fn new(
        vgpu: &'a Vgpu,
        instance: &'a str,
        profile: &'a str,
        budget: Arc<DmaBudget>,
    ) -> Result<Self, String> {
        let vram_size = vgpu.vram().size();
        let vram = AddressAllocator::new(0, vram_size.max(1))
            .map_err(|e| format!("cannot manage the instance's VRAM: {e}"))?;
        Ok(SessionServer {
            vgpu,
            instance,
            profile,
            space: Space::new(vgpu, budget)?,
            buffers: BTreeMap::new(),
            next_buffer: 1,
            vram,
            vram_size,
            contexts: Vec::new(),
            greeted: false,
        })
    }

    /// Serves `link` until the client leaves, sends something that is not a request of this
    /// protocol, or `stop` is signalled. Replies to pipelined requests that arrived together
    /// leave together (over TLS; a UNIX link sends each at once).
    pub fn serve(&mut self, link: &mut Link, stop: &EventFd) {
        loop {
            if !link.buffered() {
                if link.flush().is_err() {
                    return;
                }
                match crate::instance::wait_readable(link.fd(), stop) {
                    Ok(true) => {}
                    Ok(false) | Err(_) => return,
                }
            }
            let incoming = match link.recv_request() {
                Ok(r) => r,
                Err(FrameError::Closed) => return,
                Err(FrameError::Io(e)) => {
                    tracing::info!(instance = self.instance, "session connection lost: {e}");
                    return;
                }
                Err(e) => {
                    tracing::warn!(instance = self.instance, "session client refused: {e}");
                    let _ = link.send(&error(ErrorKind::Protocol, e.to_string()), None);
                    let _ = link.flush();
                    return;
                }
            };
            let protocol_error =
                !self.greeted && !matches!(incoming, Incoming::Request(Request::Hello { .. }, _));
            let reply = if protocol_error {
                error(ErrorKind::Protocol, "the first request must be Hello")
            } else {
                let handled = match incoming {
                    Incoming::Request(req, fd) => self.handle(
                        req,
                        fd,
                        Watch {
                            sock: link.fd(),
                            stop,
                        },
                    ),
                    Incoming::Write { at, len, first } => {
                        match self.write_from(link, at, len, &first) {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::info!(
                                    instance = self.instance,
                                    "session connection lost in a write: {e}"
                                );
                                return;
                            }
                        }
                    }
                };
                match handled {
                    Ok(r) => r,
                    Err(Refusal(kind, message)) => error(kind, message),
                }
            };
            let fatal = protocol_error
                || matches!(
                    reply,
                    Reply::Error {
                        kind: ErrorKind::Version,
                        ..
                    }
                );
            let sent = match reply {
                // The bytes read go out from where they were read to.
                Reply::Data { data } => {
                    link.send_with_tail(&Reply::Data { data: Vec::new() }, &data)
                }
                r => link.send(&r, None),
            };
            if sent.is_err() || fatal {
                let _ = link.flush();
                return;
            }
        }
    }

    fn handle(
        &mut self,
        req: Request,
        fd: Option<File>,
        watch: Watch<'_>,
    ) -> Result<Reply, Refusal> {
        match req {
            Request::Hello { version } => {
                if version != VERSION {
                    return Err(refuse(
                        ErrorKind::Version,
                        format!("protocol version {version} (this server speaks {VERSION})"),
                    ));
                }
                self.greeted = true;
                Ok(Reply::Welcome {
                    version: VERSION,
                    instance: self.instance.into(),
                    profile: self.profile.into(),
                    vram: self.vram_size,
                    contexts: self.vgpu.contexts(),
                })
            }
            Request::CreateContext => self.create_context(),
            Request::AllocVram { size } => self.alloc_vram(size),
            Request::MapMemory { size } => self.map_memory(size, fd),
            Request::Free { buffer } => self.free(buffer),
            Request::Write { at, data } => {
                let b = self.extent(at, data.len() as u64)?;
                self.access(b, at.offset, Access::Write(&data))?;
                Ok(Reply::Done)
            }
            Request::Read { at, len } => {
                if len > MAX_INLINE {
                    return Err(refuse(
                        ErrorKind::BadArgument,
                        format!("read of {len} bytes; at most {MAX_INLINE} at a time"),
                    ));
                }
                let b = self.extent(at, len)?;
                let mut data = vec![0u8; len as usize];
                self.access(b, at.offset, Access::Read(&mut data))?;
                Ok(Reply::Data { data })
            }
            Request::Submit { ctx, commands } => self.submit(ctx, &commands, watch),
            Request::Wait {
                ctx,
                fence,
                timeout_ms,
            } => self.wait(ctx, fence, timeout_ms, watch),
            Request::ResetContext { ctx } => {
                self.context(ctx)?;
                self.set_reg(regs::ctx_reg(ctx, regs::CTX_CONTROL), ctx_control::RESET);
                self.enable(ctx);
                Ok(Reply::Done)
            }
            Request::Open { .. } => Err(refuse(
                ErrorKind::Protocol,
                "Open names an instance on TCP, before Hello; this session has one",
            )),
        }
    }

    /// A `Write` whose data is still in `link`: its extent is checked first, then its bytes
    /// go into place [`STREAM_CHUNK`] at a time as they arrive, never held whole. A refused
    /// write still takes its bytes off the link (the next frame follows them). `Err`: the
    /// link failed.
    fn write_from(
        &mut self,
        link: &mut Link,
        at: BufRef,
        len: u64,
        first: &[u8],
    ) -> Result<Result<Reply, Refusal>, FrameError> {
        let mut outcome = self.extent(at, len).map(|_| Reply::Done);
        let mut put = |this: &Self, done: u64, bytes: &[u8]| {
            if outcome.is_ok()
                && let Err(r) = this
                    .extent(at, len)
                    .and_then(|b| this.access(b, at.offset + done, Access::Write(bytes)))
            {
                outcome = Err(r);
            }
        };
        put(self, 0, first);
        let mut done = first.len() as u64;
        let mut scratch = vec![0u8; STREAM_CHUNK.min(len - done) as usize];
        while done < len {
            let n = STREAM_CHUNK.min(len - done) as usize;
            link.read_exact(&mut scratch[..n])?;
            put(self, done, &scratch[..n]);
            done += n as u64;
        }
        Ok(outcome)
    }

    fn reg(&self, off: u64) -> u32 {
        let mut d = [0xffu8; 4];
        self.vgpu.read_bar(pci::BAR_REGS, off, &mut d);
        u32::from_le_bytes(d)
    }

    fn set_reg(&self, off: u64, v: u32) {
        self.vgpu.write_bar(pci::BAR_REGS, off, &v.to_le_bytes());
    }

    /// Points context `ctx` at the session's page tables and its (empty) ring, and enables
    /// it.
    fn enable(&mut self, ctx: u32) {
        let ring = space::ring(ctx);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_PT_ROOT_LO), space::ROOT as u32);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_PT_ROOT_HI), 0);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_RING_BASE_LO), ring as u32);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_RING_BASE_HI), 0);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_RING_SIZE), space::RING_ENTRIES);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_CONTROL), ctx_control::ENABLE);
        if let Some(c) = self.contexts.get_mut(ctx as usize) {
            c.tail = 0;
            c.queued.clear();
        }
    }

    fn create_context(&mut self) -> Result<Reply, Refusal> {
        let ctx = self.contexts.len() as u32;
        if ctx >= self.vgpu.contexts() {
            return Err(refuse(
                ErrorKind::Exhausted,
                format!(
                    "instance type {} has {} contexts, all in use",
                    self.profile,
                    self.vgpu.contexts()
                ),
            ));
        }
        self.contexts.push(Context::default());
        self.enable(ctx);
        Ok(Reply::Context { ctx })
    }

    fn context(&self, ctx: u32) -> Result<&Context, Refusal> {
        self.contexts
            .get(ctx as usize)
            .ok_or_else(|| refuse(ErrorKind::NoSuchObject, format!("no context {ctx}")))
    }

    fn new_buffer(&mut self, va: u64, size: u64, place: Place) -> Result<u32, Refusal> {
        if self.buffers.len() >= MAX_BUFFERS {
            return Err(refuse(
                ErrorKind::Exhausted,
                format!("a session holds at most {MAX_BUFFERS} buffers"),
            ));
        }
        while self.buffers.contains_key(&self.next_buffer) || self.next_buffer == 0 {
            self.next_buffer = self.next_buffer.wrapping_add(1);
        }
        let id = self.next_buffer;
        self.next_buffer = self.next_buffer.wrapping_add(1);
        self.buffers.insert(id, Buffer { va, size, place });
        Ok(id)
    }

    fn alloc_vram(&mut self, size: u64) -> Result<Reply, Refusal> {
        let bytes = size
            .checked_next_multiple_of(VRAM_ALIGN)
            .filter(|&b| b > 0 && b <= self.vram_size)
            .ok_or_else(|| {
                refuse(
                    ErrorKind::BadArgument,
                    format!(
                        "VRAM buffer of {size} bytes (the instance has {} bytes)",
                        self.vram_size
                    ),
                )
            })?;
        let range = self
            .vram
            .allocate(bytes, VRAM_ALIGN, AllocPolicy::FirstMatch)
            .map_err(|_| {
                refuse(
                    ErrorKind::Exhausted,
                    format!(
                        "no {bytes} contiguous bytes left in the instance's {} bytes of VRAM \
                         (type {})",
                        self.vram_size, self.profile
                    ),
                )
            })?;
        let offset = range.start();
        match self.new_buffer(space::VRAM_VA + offset, bytes, Place::Vram { offset }) {
            Ok(id) => Ok(Reply::Buffer {
                buffer: id,
                size: bytes,
            }),
            Err(e) => {
                let _ = self.vram.free(&range);
                Err(e)
            }
        }
    }

    fn map_memory(&mut self, size: u64, fd: Option<File>) -> Result<Reply, Refusal> {
        let iova = self.space.map_client(size, fd)?;
        match self.new_buffer(iova, size, Place::Client) {
            Ok(id) => Ok(Reply::Buffer { buffer: id, size }),
            Err(e) => {
                self.space.drop_client(iova);
                Err(e)
            }
        }
    }

    fn free(&mut self, id: u32) -> Result<Reply, Refusal> {
        let b = self
            .buffers
            .remove(&id)
            .ok_or_else(|| refuse(ErrorKind::NoSuchObject, format!("no buffer {id}")))?;
        match b.place {
            Place::Vram { offset } => {
                if let Ok(r) = RangeInclusive::new(offset, offset + b.size - 1) {
                    let _ = self.vram.free(&r);
                }
            }
            Place::Client => self.space.drop_client(b.va),
        }
        Ok(Reply::Done)
    }

    /// The buffer `at` names, if `[at.offset, at.offset + len)` lies inside it.
    fn extent(&self, at: BufRef, len: u64) -> Result<&Buffer, Refusal> {
        let b = self
            .buffers
            .get(&at.buffer)
            .ok_or_else(|| refuse(ErrorKind::NoSuchObject, format!("no buffer {}", at.buffer)))?;
        if at.offset.checked_add(len).is_none_or(|e| e > b.size) {
            return Err(refuse(
                ErrorKind::BadArgument,
                format!(
                    "{len} bytes at offset {} run past buffer {} ({} bytes)",
                    at.offset, at.buffer, b.size
                ),
            ));
        }
        Ok(b)
    }

    fn access(&self, b: &Buffer, offset: u64, what: Access<'_>) -> Result<(), Refusal> {
        let dev = |e: String| refuse(ErrorKind::Device, e);
        match (&b.place, what) {
            (Place::Vram { offset: base }, Access::Write(d)) => self
                .vgpu
                .vram()
                .write(base + offset, d)
                .map_err(|f| dev(format!("VRAM write faulted: {f:?}"))),
            (Place::Vram { offset: base }, Access::Read(d)) => self
                .vgpu
                .vram()
                .read(base + offset, d)
                .map_err(|f| dev(format!("VRAM read faulted: {f:?}"))),
            (Place::Client, what) => {
                let r = self
                    .space
                    .client(b.va)
                    .ok_or_else(|| dev(format!("client memory at {:#x} is gone", b.va)))?;
                match what {
                    Access::Write(d) => r.write_slice(d, MemoryRegionAddress(offset)),
                    Access::Read(d) => r.read_slice(d, MemoryRegionAddress(offset)),
                }
                .map_err(|e| dev(e.to_string()))
            }
        }
    }

    /// The GPU VA of `len` bytes at `at`, checked against the buffer.
    fn va(&self, at: BufRef, len: u64) -> Result<u64, Refusal> {
        Ok(self.extent(at, len)?.va + at.offset)
    }

    /// The packet of `c`, every operand's extent checked against its buffer (by [`Self::va`]).
    fn packet(&self, c: &Command) -> Result<Packet, Refusal> {
        let p = |opcode, flags, args: &[u64]| {
            let mut a = [0u64; 7];
            a[..args.len()].copy_from_slice(args);
            Packet {
                opcode,
                flags,
                args: a,
            }
        };
        let f32s = |n: u64| n.saturating_mul(4);
        Ok(match *c {
            Command::Copy { src, dst, len } => p(
                packet::OP_COPY,
                0,
                &[self.va(src, len)?, self.va(dst, len)?, len],
            ),
            Command::Fill { dst, len, value } => p(
                packet::OP_FILL,
                0,
                &[self.va(dst, len)?, len, u64::from(value)],
            ),
            Command::Saxpy { n, a, x, y } => p(
                packet::OP_DISPATCH,
                kernel::SAXPY,
                &[
                    n,
                    u64::from(a.to_bits()),
                    self.va(x, f32s(n))?,
                    self.va(y, f32s(n))?,
                ],
            ),
            Command::Sgemm { m, n, k, a, b, c } => p(
                packet::OP_DISPATCH,
                kernel::SGEMM,
                &[
                    m,
                    n,
                    k,
                    self.va(a, f32s(m.saturating_mul(k)))?,
                    self.va(b, f32s(k.saturating_mul(n)))?,
                    self.va(c, f32s(m.saturating_mul(n)))?,
                ],
            ),
            Command::ReduceSum { n, x, out } => p(
                packet::OP_DISPATCH,
                kernel::REDUCE_SUM,
                &[n, self.va(x, f32s(n))?, self.va(out, 8)?],
            ),
            Command::Crc32 { len, src, out } => p(
                packet::OP_DISPATCH,
                kernel::CRC32,
                &[len, self.va(src, len)?, self.va(out, 4)?],
            ),
            Command::SpinUs { us, groups } => {
                p(packet::OP_DISPATCH, kernel::SPIN_US, &[us, groups])
            }
            Command::Timestamp { dst } => p(packet::OP_TIMESTAMP, 0, &[self.va(dst, 8)?]),
        })
    }

    fn submit(
        &mut self,
        ctx: u32,
        commands: &[Command],
        watch: Watch<'_>,
    ) -> Result<Reply, Refusal> {
        self.context(ctx)?;
        if commands.len() > MAX_COMMANDS {
            return Err(refuse(
                ErrorKind::BadArgument,
                format!(
                    "{} commands in one submission; at most {MAX_COMMANDS}",
                    commands.len()
                ),
            ));
        }
        // Every command is checked before any is queued: a refused submission queues nothing.
        let mut pkts = commands
            .iter()
            .map(|cmd| self.packet(cmd))
            .collect::<Result<Vec<_>, _>>()?;
        // The whole submission goes in at once, its fence last, or none of it does.
        self.make_room(ctx, pkts.len() as u32 + 1, watch)?;
        let c = &mut self.contexts[ctx as usize];
        c.fence += 1;
        pkts.push(Packet {
            opcode: packet::OP_FENCE,
            flags: 0,
            args: [space::fence_addr(ctx), c.fence, 0, 0, 0, 0, 0],
        });
        let mut tail = c.tail;
        for p in &pkts {
            let slot = u64::from(tail % space::RING_ENTRIES);
            self.space
                .write_ctrl(space::ring(ctx) + slot * packet::PACKET_SIZE, &p.to_bytes())?;
            tail = tail.wrapping_add(1);
        }
        let c = &mut self.contexts[ctx as usize];
        c.tail = tail;
        c.queued.push_back((c.fence, tail));
        let fence = c.fence;
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_RING_TAIL), tail);
        Ok(Reply::Submitted { fence })
    }

    /// Waits until context `ctx`'s ring has `need` free slots: on the fence of the oldest
    /// submission whose end frees enough, in `WAIT`s of at most 100 ms, giving up when the
    /// context stops, the ring stays full for [`RING_FULL_GRACE`], the client hangs up or the
    /// instance stops.
    fn make_room(&mut self, ctx: u32, need: u32, watch: Watch<'_>) -> Result<(), Refusal> {
        let free =
            |tail: u32, head: u32| space::RING_ENTRIES.saturating_sub(tail.wrapping_sub(head));
        let started = Instant::now();
        loop {
            let done = self.space.fence(ctx);
            let head = self.reg(regs::ctx_reg(ctx, regs::CTX_RING_HEAD));
            let c = &mut self.contexts[ctx as usize];
            while c.queued.front().is_some_and(|&(f, _)| f <= done) {
                c.queued.pop_front();
            }
            if free(c.tail, head) >= need {
                return Ok(());
            }
            let target = c
                .queued
                .iter()
                .find(|&&(_, end)| free(c.tail, end) >= need)
                .map_or(c.fence, |&(f, _)| f);
            let st = self.reg(regs::ctx_reg(ctx, regs::CTX_STATUS));
            if st & vgpu_abi::ctx_status::FAULTED != 0
                || st & vgpu_abi::ctx_status::ENABLED == 0
                || started.elapsed() > RING_FULL_GRACE
            {
                // A stopped context (a fault, or a watchdog reset of the vGPU) never frees
                // its ring.
                return Err(refuse(
                    ErrorKind::Device,
                    format!("context {ctx} stopped or hung with its ring full; reset it"),
                ));
            }
            watch.check()?;
            self.set_reg(regs::WAIT_CTX, ctx);
            self.set_reg(regs::WAIT_VALUE, target as u32);
            let _ = self.reg(regs::WAIT);
        }
    }

    fn wait(
        &mut self,
        ctx: u32,
        fence: u64,
        timeout_ms: u32,
        watch: Watch<'_>,
    ) -> Result<Reply, Refusal> {
        let c = self.context(ctx)?;
        if fence > c.fence {
            return Err(refuse(
                ErrorKind::BadArgument,
                format!(
                    "fence {fence} of context {ctx} was never submitted (last {})",
                    c.fence
                ),
            ));
        }
        if timeout_ms > MAX_WAIT_MS {
            return Err(refuse(
                ErrorKind::BadArgument,
                format!("wait of {timeout_ms} ms; at most {MAX_WAIT_MS}"),
            ));
        }
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        loop {
            if self.space.fence(ctx) >= fence {
                return Ok(Reply::Waited(WaitResult::Done));
            }
            self.set_reg(regs::WAIT_CTX, ctx);
            self.set_reg(regs::WAIT_VALUE, fence as u32);
            match self.reg(regs::WAIT) {
                wait::DONE => return Ok(Reply::Waited(WaitResult::Done)),
                wait::FAULTED => {
                    let code = self.reg(regs::ctx_reg(ctx, regs::CTX_FAULT_CODE));
                    let addr = u64::from(self.reg(regs::ctx_reg(ctx, regs::CTX_FAULT_ADDR_LO)))
                        | u64::from(self.reg(regs::ctx_reg(ctx, regs::CTX_FAULT_ADDR_HI))) << 32;
                    return Ok(Reply::Waited(WaitResult::Fault { code, addr }));
                }
                wait::TIMEOUT => {}
                r => {
                    return Err(refuse(
                        ErrorKind::Device,
                        format!("context {ctx} is not running (WAIT {r}); reset it"),
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Ok(Reply::Waited(WaitResult::TimedOut));
            }
            watch.check()?;
        }
    }
}

/// Bytes of a streamed `Write` moved at a time (they stay in the CPU's caches).
const STREAM_CHUNK: u64 = 64 << 10;

/// How long a full ring may stay full before a submission gives up.
const RING_FULL_GRACE: Duration = Duration::from_secs(60);

// The largest submission, with its fence, fits in an empty ring.
const _: () = assert!(MAX_COMMANDS < space::RING_ENTRIES as usize);

enum Access<'d> {
    Write(&'d [u8]),
    Read(&'d mut [u8]),
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
    Reply::Error {
        kind,
        message: message.into(),
    }
}

/// What a request that waits on the device (a `Wait`, a `Submit` into a full ring) looks at
/// between its waits of at most 100 ms: the client's connection and the instance's stop.
#[derive(Clone, Copy)]
struct Watch<'s> {
    sock: RawFd,
    stop: &'s EventFd,
}

impl Watch<'_> {
    /// `Err` (the session ends) when the client has hung up or the instance is stopping.
    fn check(&self) -> Result<(), Refusal> {
        let mut fds = [
            libc::pollfd {
                fd: self.sock,
                events: libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) };
        if rc <= 0 {
            return Ok(());
        }
        if fds[1].revents != 0 {
            return Err(refuse(ErrorKind::Device, "the instance is stopping"));
        }
        if fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            // Nobody is left to tell: end the session.
            return Err(refuse(ErrorKind::Protocol, "the client went away"));
        }
        Ok(())
    }
}
