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

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::pci::PciDeviceSync;
use vgpu::DmaDomain;
use vgpu::device::Vgpu;
use vgpu_abi::{Packet, ctx_control, kernel, packet, pci, pte, regs, wait};
use vgpu_session::frame::{self, FrameError};
use vgpu_session::proto::{
    BufRef, Command, ErrorKind, MAX_BUFFERS, MAX_COMMANDS, MAX_INLINE, MAX_WAIT_MS, Reply, Request,
    VERSION, WaitResult,
};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

use crate::attach::{Charge, DmaBudget};

/// GPU VA of the instance's VRAM.
pub const VRAM_VA: u64 = 1 << 40;
/// Size of the control memory (page tables, rings, fences).
const CTRL_SIZE: u64 = 4 << 20;
/// Page-table pages live in `[PT_BASE, RINGS)` of the control memory.
const PML4: u64 = 0;
const PT_BASE: u64 = 0x1000;
const RINGS: u64 = 0x10_0000;
/// Packets per context ring.
const RING_ENTRIES: u32 = 1024;
const RING_BYTES: u64 = RING_ENTRIES as u64 * packet::PACKET_SIZE;
/// Fence words (8 bytes per context) in the last page of the control memory.
const FENCES: u64 = CTRL_SIZE - 0x1000;
/// Client memory starts here, each region 2 MiB-aligned.
const CLIENT_BASE: u64 = 4 << 30;
/// Client memory ends here (512 GiB of address space).
const CLIENT_END: u64 = 516 << 30;
const HUGE: u64 = 2 << 20;
/// VRAM granule.
const VRAM_ALIGN: u64 = 4096;

// Rings for every context fit below the fence page.
const _: () = assert!(RINGS + vgpu_abi::limits::MAX_CONTEXTS as u64 * RING_BYTES <= FENCES);

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

/// A mapped client memfd.
#[derive(Debug)]
struct ClientRegion {
    region: Arc<GuestRegionMmap>,
    _charge: Charge,
}

/// One context: its ring and fence sequence.
#[derive(Debug, Default, Clone, Copy)]
struct Context {
    tail: u32,
    fence: u64,
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
    ctrl: Arc<GuestRegionMmap>,
    regions: BTreeMap<u64, ClientRegion>,
    buffers: BTreeMap<u32, Buffer>,
    next_buffer: u32,
    vram: AddressAllocator,
    vram_size: u64,
    contexts: Vec<Context>,
    next_pt: u64,
    budget: Arc<DmaBudget>,
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
        let file = vgpu::backend::memfd("tessera-session-ctrl", CTRL_SIZE, true)
            .map_err(|e| format!("cannot make the session's control memory: {e}"))?;
        let ctrl = GuestRegionMmap::from_range(
            GuestAddress(0),
            CTRL_SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )
        .map_err(|e| format!("cannot map the session's control memory: {e}"))?;
        let vram_size = vgpu.vram().size();
        let vram = AddressAllocator::new(0, vram_size.max(1))
            .map_err(|e| format!("cannot manage the instance's VRAM: {e}"))?;
        let mut s = SessionServer {
            vgpu,
            instance,
            profile,
            ctrl: Arc::new(ctrl),
            regions: BTreeMap::new(),
            buffers: BTreeMap::new(),
            next_buffer: 1,
            vram,
            vram_size,
            contexts: Vec::new(),
            next_pt: PT_BASE,
            budget,
            greeted: false,
        };
        // Control memory and VRAM are mapped once; client memory comes and goes.
        s.map_range(0, 0, CTRL_SIZE, 0)
            .and_then(|()| s.map_range(VRAM_VA, 0, vram_size, pte::VRAM))
            .map_err(|Refusal(_, m)| m)?;
        s.apply_dma().map_err(|Refusal(_, m)| m)?;
        Ok(s)
    }

    /// Serves `sock` until the client leaves, sends something that is not a request of this
    /// protocol, or `stop` is signalled.
    pub fn serve(&mut self, sock: &UnixStream, stop: &EventFd) {
        loop {
            match crate::instance::wait_readable(sock.as_raw_fd(), stop) {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
            let (req, fd) = match frame::recv::<Request>(sock) {
                Ok(r) => r,
                Err(FrameError::Closed) => return,
                Err(FrameError::Io(e)) => {
                    tracing::info!(instance = self.instance, "session connection lost: {e}");
                    return;
                }
                Err(e) => {
                    tracing::warn!(instance = self.instance, "session client refused: {e}");
                    let _ = frame::send(sock, &error(ErrorKind::Protocol, e.to_string()), None);
                    return;
                }
            };
            let protocol_error = !self.greeted && !matches!(req, Request::Hello { .. });
            let reply = if protocol_error {
                error(ErrorKind::Protocol, "the first request must be Hello")
            } else {
                match self.handle(req, fd, sock) {
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
            if frame::send(sock, &reply, None).is_err() || fatal {
                return;
            }
        }
    }

    fn handle(
        &mut self,
        req: Request,
        fd: Option<File>,
        sock: &UnixStream,
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
            Request::Submit { ctx, commands } => self.submit(ctx, &commands),
            Request::Wait {
                ctx,
                fence,
                timeout_ms,
            } => self.wait(ctx, fence, timeout_ms, sock),
            Request::ResetContext { ctx } => {
                self.context(ctx)?;
                self.set_reg(regs::ctx_reg(ctx, regs::CTX_CONTROL), ctx_control::RESET);
                self.enable(ctx);
                Ok(Reply::Done)
            }
        }
    }

    fn reg(&self, off: u64) -> u32 {
        let mut d = [0xffu8; 4];
        self.vgpu.read_bar(pci::BAR_REGS, off, &mut d);
        u32::from_le_bytes(d)
    }

    fn set_reg(&self, off: u64, v: u32) {
        self.vgpu.write_bar(pci::BAR_REGS, off, &v.to_le_bytes());
    }

    fn ring(ctx: u32) -> u64 {
        RINGS + u64::from(ctx) * RING_BYTES
    }

    fn fence_addr(ctx: u32) -> u64 {
        FENCES + u64::from(ctx) * 8
    }

    /// Points context `ctx` at the session's page tables and its (empty) ring, and enables
    /// it.
    fn enable(&mut self, ctx: u32) {
        let ring = Self::ring(ctx);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_PT_ROOT_LO), PML4 as u32);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_PT_ROOT_HI), 0);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_RING_BASE_LO), ring as u32);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_RING_BASE_HI), 0);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_RING_SIZE), RING_ENTRIES);
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_CONTROL), ctx_control::ENABLE);
        if let Some(c) = self.contexts.get_mut(ctx as usize) {
            c.tail = 0;
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

    fn context(&self, ctx: u32) -> Result<Context, Refusal> {
        self.contexts
            .get(ctx as usize)
            .copied()
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
        match self.new_buffer(VRAM_VA + offset, bytes, Place::Vram { offset }) {
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
        let bad = |m: String| refuse(ErrorKind::BadMemory, m);
        let fd = fd.ok_or_else(|| bad("MapMemory needs a memfd sent with it".into()))?;
        if size == 0 || size > isize::MAX as u64 {
            return Err(refuse(
                ErrorKind::BadArgument,
                format!("client memory of {size} bytes"),
            ));
        }
        let len = fd
            .metadata()
            .map_err(|e| bad(format!("cannot stat the memfd: {e}")))?
            .len();
        if size > len {
            return Err(bad(format!("{size} bytes asked of a {len}-byte file")));
        }
        // SAFETY: F_GET_SEALS only reads the seals of a descriptor we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(bad(
                "client memory must be a memfd sealed against shrinking (F_SEAL_SHRINK)".into(),
            ));
        }
        let span = size.next_multiple_of(HUGE);
        let iova = self.free_iova(span).ok_or_else(|| {
            refuse(
                ErrorKind::Exhausted,
                "the session's client address space is full",
            )
        })?;
        let held = self.regions.values().map(|r| r.region.len()).sum();
        let charge = self
            .budget
            .charge(size, held)
            .map_err(|e| refuse(ErrorKind::Exhausted, e.to_string()))?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(iova),
            size as usize,
            Some(FileOffset::new(fd, 0)),
        )
        .map_err(|e| bad(format!("cannot map client memory: {e}")))?;
        self.map_range(iova, iova, span, 0)?;
        self.regions.insert(
            iova,
            ClientRegion {
                region: Arc::new(region),
                _charge: charge,
            },
        );
        if let Err(e) = self.apply_dma() {
            self.regions.remove(&iova);
            self.unmap_range(iova, span);
            return Err(e);
        }
        match self.new_buffer(iova, size, Place::Client) {
            Ok(id) => Ok(Reply::Buffer { buffer: id, size }),
            Err(e) => {
                self.drop_region(iova);
                Err(e)
            }
        }
    }

    /// The lowest 2 MiB-aligned address with `span` bytes free in the client range.
    fn free_iova(&self, span: u64) -> Option<u64> {
        let mut at = CLIENT_BASE;
        for (&start, r) in &self.regions {
            if at + span <= start {
                break;
            }
            at = (start + r.region.len()).next_multiple_of(HUGE);
        }
        (at.checked_add(span)? <= CLIENT_END).then_some(at)
    }

    fn drop_region(&mut self, iova: u64) {
        if let Some(r) = self.regions.remove(&iova) {
            let span = r.region.len().next_multiple_of(HUGE);
            self.unmap_range(iova, span);
            // Returns once no packet uses the old mapping; only then is the region unmapped
            // (dropped here).
            if let Err(Refusal(_, m)) = self.apply_dma() {
                tracing::warn!("session: the GPU could not import the remaining memory: {m}");
            }
            drop(r);
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
            Place::Client => self.drop_region(b.va),
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
            (Place::Client, Access::Write(d)) => self.regions[&b.va]
                .region
                .write_slice(d, MemoryRegionAddress(offset))
                .map_err(|e| dev(e.to_string())),
            (Place::Client, Access::Read(d)) => self.regions[&b.va]
                .region
                .read_slice(d, MemoryRegionAddress(offset))
                .map_err(|e| dev(e.to_string())),
        }
    }

    /// The GPU VA of `len` bytes at `at`, checked against the buffer.
    fn va(&self, at: BufRef, len: u64) -> Result<u64, Refusal> {
        Ok(self.extent(at, len)?.va + at.offset)
    }

    fn packet(&self, c: &Command) -> Result<Packet, Refusal> {
        for (at, len) in c.extents() {
            self.extent(at, len)?;
        }
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
        })
    }

    fn submit(&mut self, ctx: u32, commands: &[Command]) -> Result<Reply, Refusal> {
        let mut c = self.context(ctx)?;
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
        c.fence += 1;
        pkts.push(Packet {
            opcode: packet::OP_FENCE,
            flags: 0,
            args: [Self::fence_addr(ctx), c.fence, 0, 0, 0, 0, 0],
        });
        for p in &pkts {
            // Never overrun the ring: wait until the device has taken a slot.
            let started = Instant::now();
            while c
                .tail
                .wrapping_sub(self.reg(regs::ctx_reg(ctx, regs::CTX_RING_HEAD)))
                >= RING_ENTRIES
            {
                let st = self.reg(regs::ctx_reg(ctx, regs::CTX_STATUS));
                let stopped = st & vgpu_abi::ctx_status::FAULTED != 0
                    || st & vgpu_abi::ctx_status::ENABLED == 0;
                if stopped || started.elapsed() > WATCHDOG_GRACE {
                    // A stopped context (a fault, or a watchdog reset of the vGPU) never frees
                    // its ring.
                    self.contexts[ctx as usize] = c;
                    return Err(refuse(
                        ErrorKind::Device,
                        format!("context {ctx} stopped with its ring full; reset it"),
                    ));
                }
                self.set_reg(regs::WAIT_CTX, ctx);
                self.set_reg(regs::WAIT_VALUE, c.fence.saturating_sub(1) as u32);
                let _ = self.reg(regs::WAIT);
            }
            let slot = u64::from(c.tail % RING_ENTRIES);
            self.ctrl
                .write_slice(
                    &p.to_bytes(),
                    MemoryRegionAddress(Self::ring(ctx) + slot * packet::PACKET_SIZE),
                )
                .map_err(|e| refuse(ErrorKind::Device, e.to_string()))?;
            c.tail = c.tail.wrapping_add(1);
        }
        self.set_reg(regs::ctx_reg(ctx, regs::CTX_RING_TAIL), c.tail);
        self.contexts[ctx as usize] = c;
        Ok(Reply::Submitted { fence: c.fence })
    }

    fn wait(
        &mut self,
        ctx: u32,
        fence: u64,
        timeout_ms: u32,
        sock: &UnixStream,
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
            let mut w = [0u8; 8];
            let _ = self
                .ctrl
                .read_slice(&mut w, MemoryRegionAddress(Self::fence_addr(ctx)));
            if u64::from_le_bytes(w) >= fence {
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
            if hung_up(sock) {
                // Nobody is left to tell: end the session.
                return Err(refuse(ErrorKind::Protocol, "the client went away"));
            }
        }
    }

    /// Maps `[va, va + len)` to system address `pa` (+ `flags`) with 2 MiB leaves.
    fn map_range(&mut self, va: u64, pa: u64, len: u64, flags: u64) -> Result<(), Refusal> {
        let mut off = 0;
        while off < len {
            let pd = self.table_for(va + off)?;
            let leaf = (pa + off) | pte::PRESENT | pte::WRITABLE | pte::HUGE | flags;
            self.write_pte(pd + ((va + off) >> 21 & 511) * 8, leaf)?;
            off += HUGE;
        }
        Ok(())
    }

    fn unmap_range(&mut self, va: u64, len: u64) {
        let mut off = 0;
        while off < len {
            if let Ok(pd) = self.table_for(va + off) {
                let _ = self.write_pte(pd + ((va + off) >> 21 & 511) * 8, 0);
            }
            off += HUGE;
        }
    }

    /// The page directory covering `va`, made on first use.
    fn table_for(&mut self, va: u64) -> Result<u64, Refusal> {
        let pdpt = self.child(PML4 + (va >> 39 & 511) * 8)?;
        self.child(pdpt + (va >> 30 & 511) * 8)
    }

    /// The table entry `slot` points to, made if absent.
    fn child(&mut self, slot: u64) -> Result<u64, Refusal> {
        let e: u64 = self
            .ctrl
            .read_obj(MemoryRegionAddress(slot))
            .map_err(|e| refuse(ErrorKind::Device, e.to_string()))?;
        if e & pte::PRESENT != 0 {
            return Ok(e & pte::ADDR_MASK);
        }
        if self.next_pt >= RINGS {
            return Err(refuse(
                ErrorKind::Exhausted,
                "the session's page tables are full",
            ));
        }
        let t = self.next_pt;
        self.next_pt += 0x1000;
        self.write_pte(slot, t | pte::PRESENT)?;
        Ok(t)
    }

    fn write_pte(&self, at: u64, v: u64) -> Result<(), Refusal> {
        self.ctrl
            .write_obj(v, MemoryRegionAddress(at))
            .map_err(|e| refuse(ErrorKind::Device, e.to_string()))
    }

    fn apply_dma(&self) -> Result<(), Refusal> {
        let mut regions = vec![self.ctrl.clone()];
        regions.extend(self.regions.values().map(|r| r.region.clone()));
        let domain = DmaDomain::new(regions.iter().map(|r| (r.start_addr().0, r.len())));
        let sys = GuestMemoryMmap::from_arc_regions(regions)
            .map_err(|e| refuse(ErrorKind::Device, e.to_string()))?;
        self.vgpu
            .set_dma(sys, domain)
            .map_err(|e| refuse(ErrorKind::Device, e.to_string()))
    }
}

/// How long a full ring may stay full before a submission gives up.
const WATCHDOG_GRACE: Duration = Duration::from_secs(60);

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

/// Whether the peer of `sock` has hung up.
fn hung_up(sock: &UnixStream) -> bool {
    let mut fds = [libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    }];
    // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    rc > 0 && fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}
