//! A libtessera device over a GPU session: buffer objects, packets with GPU addresses, and
//! the fences of one context, as the guest driver provides them, built from the session's
//! buffers and commands.
//!
//! - **Addresses.** Each buffer object gets a GPU virtual address from this library's own
//!   range; a packet's addresses are resolved to (buffer, offset) here, and an operand that
//!   no buffer object holds whole is refused (`EFAULT`) before anything is queued. The server
//!   checks every extent again, and the device's MMU every access.
//! - **CPU mappings.** System-memory objects on a UNIX socket are the client's own sealed
//!   memfds: the CPU and the GPU share them. Everything else (VRAM objects; every object over
//!   TLS, where nothing is shared) has a CPU copy kept coherent at the two points a program
//!   already synchronises at: a submission sends the copies of the objects it reads (unless
//!   queued work is still writing them: the GPU's bytes are newer), and a completed wait
//!   brings back the objects its work wrote.

use std::collections::BTreeMap;
use std::time::Duration;

use vgpu_abi::{Packet, kernel, packet};
use vgpu_session::proto::{ErrorKind, MAX_COMMANDS, MAX_INLINE, MAX_WAIT_MS};
use vgpu_session::{BufRef, Buffer, ClientMemory, Command, Session, SessionError, WaitResult};

/// Where this library's GPU addresses start, and their alignment.
const VA_BASE: u64 = 1 << 32;
const VA_ALIGN: u64 = 64 << 10;
/// Page size of buffer objects.
const PAGE: u64 = 4096;
/// `TESSERA_BO_SYSMEM`, `TESSERA_BO_GPU_READONLY` (tessera.h).
pub const BO_SYSMEM: u32 = 0x1;
pub const BO_GPU_READONLY: u32 = 0x100;

/// A failure: a negative errno for the C caller and a sentence for `tessera_last_error`.
#[derive(Debug)]
pub struct Failure {
    pub errno: i32,
    pub message: String,
    /// A GPU address no buffer object holds (a page fault of this library's MMU).
    unmapped: Option<u64>,
}

fn fail(errno: i32, message: impl Into<String>) -> Failure {
    Failure {
        errno,
        message: message.into(),
        unmapped: None,
    }
}

/// An operand's address that no buffer object holds.
struct Unmapped(u64);

impl From<Unmapped> for Failure {
    fn from(Unmapped(addr): Unmapped) -> Failure {
        Failure {
            unmapped: Some(addr),
            ..fail(
                libc::EFAULT,
                format!("GPU address {addr:#x} is in no buffer"),
            )
        }
    }
}

impl From<SessionError> for Failure {
    fn from(e: SessionError) -> Failure {
        let errno = match &e {
            SessionError::Address(_) => libc::EINVAL,
            SessionError::NoDevice => libc::ENODEV,
            SessionError::Tls(_) => libc::EACCES,
            SessionError::Connect { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            SessionError::Frame(_) | SessionError::Unexpected(_) => libc::EPIPE,
            SessionError::Memory(_) => libc::ENOMEM,
            SessionError::Refused { kind, .. } => match kind {
                ErrorKind::BadArgument => libc::EINVAL,
                ErrorKind::NoSuchObject => libc::ENOENT,
                ErrorKind::Exhausted => libc::ENOSPC,
                ErrorKind::BadMemory => libc::EFAULT,
                ErrorKind::Device => libc::EIO,
                ErrorKind::Protocol | ErrorKind::Version => libc::EPROTO,
            },
        };
        // The error and its causes, on one line.
        let mut message = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            message = format!("{message}: {c}");
            cause = c.source();
        }
        fail(errno, message)
    }
}

/// The CPU side of a buffer object.
#[derive(Debug)]
enum Cpu {
    /// Memory the server maps too.
    Shared(ClientMemory),
    /// This library's copy (page-aligned, zeroed).
    Copy(vm_memory::MmapRegion),
}

#[derive(Debug)]
struct Bo {
    buffer: Buffer,
    size: u64,
    cpu: Cpu,
    /// Queued submissions that write it (its GPU bytes are newer than the copy).
    writers: u32,
}

impl Bo {
    fn ptr(&self) -> *mut u8 {
        match &self.cpu {
            Cpu::Shared(m) => m.as_ptr(),
            Cpu::Copy(r) => r.as_ptr(),
        }
    }
}

/// What the context reported last.
#[derive(Debug, Default, Clone, Copy)]
pub struct State {
    pub faulted: bool,
    pub fault_code: u32,
    pub fault_addr: u64,
    pub faults: u32,
    pub submitted: u64,
    pub completed: u64,
}

/// A device: one session, one context (as one open of the guest driver's node).
#[derive(Debug)]
pub struct Device {
    session: Session,
    ctx: u32,
    /// By GPU address.
    bos: BTreeMap<u64, Bo>,
    next_va: u64,
    vram_used: u64,
    /// Submissions not yet waited for, and the objects each writes.
    pending: Vec<(u64, Vec<u64>)>,
    /// A submission that stops on a fault of this library's MMU: its fence, the fault's
    /// code and address.
    fault_at: Option<(u64, u32, u64)>,
    state: State,
}

/// What `tessera_info` reports.
#[derive(Debug, Clone, Copy)]
pub struct Info {
    pub vram_size: u64,
    pub vram_free: u64,
    pub contexts: u32,
    pub max_packets: u32,
    pub kernels: u32,
    pub version: u32,
}

impl Device {
    /// Opens a session at `addr` (`unix:PATH`, `tls://HOST:PORT/INSTANCE`) and its context.
    pub fn open(addr: &str) -> Result<Device, Failure> {
        let mut session = Session::connect(addr)?;
        let ctx = session.create_context()?;
        Ok(Device {
            session,
            ctx,
            bos: BTreeMap::new(),
            next_va: VA_BASE,
            vram_used: 0,
            pending: Vec::new(),
            fault_at: None,
            state: State::default(),
        })
    }

    pub fn info(&self) -> Info {
        let i = self.session.info();
        Info {
            vram_size: i.vram,
            vram_free: i.vram.saturating_sub(self.vram_used),
            contexts: i.contexts,
            max_packets: MAX_COMMANDS as u32,
            kernels: kernel::ALL,
            version: u32::from(vgpu_abi::VERSION_MAJOR) << 16 | u32::from(vgpu_abi::VERSION_MINOR),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// A buffer object: its GPU address, CPU pointer and size (`size` rounded up to pages).
    pub fn bo_create(&mut self, size: u64, flags: u32) -> Result<(u64, *mut u8, u64), Failure> {
        if flags & !(BO_SYSMEM | BO_GPU_READONLY) != 0 {
            return Err(fail(
                libc::EINVAL,
                format!("unknown buffer flags {flags:#x}"),
            ));
        }
        let size = size
            .checked_next_multiple_of(PAGE)
            .filter(|&s| s > 0)
            .ok_or_else(|| fail(libc::EINVAL, format!("buffer of {size} bytes")))?;
        let local = !self.session.is_remote();
        let (buffer, cpu) = if flags & BO_SYSMEM != 0 && local {
            let (b, m) = self.session.map_memory(size)?;
            (b, Cpu::Shared(m))
        } else {
            let copy = vm_memory::MmapRegion::new(size as usize)
                .map_err(|e| fail(libc::ENOMEM, format!("CPU copy of a buffer: {e}")))?;
            // A VRAM object, or system memory where nothing is shared (TCP): the server
            // holds it in the instance's VRAM.
            (self.session.alloc_vram(size)?, Cpu::Copy(copy))
        };
        if matches!(cpu, Cpu::Copy(_)) {
            self.vram_used += buffer.size;
        }
        let va = self.next_va;
        self.next_va = (va + size).next_multiple_of(VA_ALIGN);
        let bo = Bo {
            buffer,
            size,
            cpu,
            writers: 0,
        };
        let ptr = bo.ptr();
        self.bos.insert(va, bo);
        Ok((va, ptr, size))
    }

    pub fn bo_destroy(&mut self, va: u64) {
        if let Some(bo) = self.bos.remove(&va) {
            if matches!(bo.cpu, Cpu::Copy(_)) {
                self.vram_used -= bo.buffer.size;
            }
            let _ = self.session.free(bo.buffer);
        }
    }

    /// The object holding `[va, va + len)` whole: its address and the operand.
    fn operand(&self, va: u64, len: u64) -> Result<(u64, BufRef), Failure> {
        let (&base, bo) = self
            .bos
            .range(..=va)
            .next_back()
            .filter(|(b, bo)| va - **b < bo.size)
            .ok_or(Unmapped(va))?;
        let offset = va - base;
        if offset.checked_add(len).is_none_or(|e| e > bo.size) {
            // The device would fault at the first byte past the buffer.
            return Err(Unmapped(base + bo.size).into());
        }
        Ok((base, bo.buffer.at(offset)))
    }

    /// A packet as a session command, and the objects it reads and writes.
    fn command(
        &self,
        p: &Packet,
        reads: &mut Vec<u64>,
        writes: &mut Vec<u64>,
    ) -> Result<Option<Command>, Failure> {
        let a = p.args;
        let mut opnd = |va: u64, len: u64, written: bool| -> Result<BufRef, Failure> {
            let (bo, at) = self.operand(va, len)?;
            reads.push(bo);
            if written {
                writes.push(bo);
            }
            Ok(at)
        };
        let f32s = |n: u64| n.saturating_mul(4);
        Ok(Some(match (p.opcode, p.flags) {
            (packet::OP_NOP, _) => return Ok(None),
            (packet::OP_COPY, _) => Command::Copy {
                src: opnd(a[0], a[2], false)?,
                dst: opnd(a[1], a[2], true)?,
                len: a[2],
            },
            (packet::OP_FILL, _) => Command::Fill {
                dst: opnd(a[0], a[1], true)?,
                len: a[1],
                value: a[2] as u32,
            },
            (packet::OP_TIMESTAMP, _) => Command::Timestamp {
                dst: opnd(a[0], 8, true)?,
            },
            (packet::OP_DISPATCH, kernel::SAXPY) => Command::Saxpy {
                n: a[0],
                a: f32::from_bits(a[1] as u32),
                x: opnd(a[2], f32s(a[0]), false)?,
                y: opnd(a[3], f32s(a[0]), true)?,
            },
            (packet::OP_DISPATCH, kernel::SGEMM) => Command::Sgemm {
                m: a[0],
                n: a[1],
                k: a[2],
                a: opnd(a[3], f32s(a[0].saturating_mul(a[2])), false)?,
                b: opnd(a[4], f32s(a[2].saturating_mul(a[1])), false)?,
                c: opnd(a[5], f32s(a[0].saturating_mul(a[1])), true)?,
            },
            (packet::OP_DISPATCH, kernel::REDUCE_SUM) => Command::ReduceSum {
                n: a[0],
                x: opnd(a[1], f32s(a[0]), false)?,
                out: opnd(a[2], 8, true)?,
            },
            (packet::OP_DISPATCH, kernel::CRC32) => Command::Crc32 {
                len: a[0],
                src: opnd(a[1], a[0], false)?,
                out: opnd(a[2], 4, true)?,
            },
            (packet::OP_DISPATCH, kernel::SPIN_US) => Command::SpinUs {
                us: a[0],
                groups: a[1],
            },
            (packet::OP_FENCE, _) => {
                return Err(fail(libc::EINVAL, "FENCE packets are the library's own"));
            }
            (op, flags) => {
                return Err(fail(
                    libc::EINVAL,
                    format!("packet opcode {op:#x} flags {flags:#x} is not a command"),
                ));
            }
        }))
    }

    /// Queues `packets` (their objects' CPU copies go first); returns the fence.
    ///
    /// A packet that names an address no buffer object holds is this library's page fault:
    /// the packets before it are queued, and the wait for this fence reports the fault
    /// (`EIO`, `NOT_PRESENT` at the first address outside every object) as the device
    /// would; the context then runs nothing until [`Device::recover`].
    pub fn submit(&mut self, packets: &[Packet]) -> Result<u64, Failure> {
        if packets.is_empty() || packets.len() > MAX_COMMANDS {
            return Err(fail(
                libc::EINVAL,
                format!("{} packets (1 ..= {MAX_COMMANDS})", packets.len()),
            ));
        }
        if self.state.faulted || self.fault_at.is_some() {
            return Err(fail(
                libc::EIO,
                "the context stopped on a fault; tessera_recover() restarts it",
            ));
        }
        let (mut reads, mut writes) = (Vec::new(), Vec::new());
        let mut commands = Vec::with_capacity(packets.len());
        let mut unmapped = None;
        for p in packets {
            match self.command(p, &mut reads, &mut writes) {
                Ok(Some(c)) => commands.push(c),
                Ok(None) => {}
                Err(e) => match e.unmapped {
                    Some(addr) => {
                        unmapped = Some(addr);
                        break;
                    }
                    None => return Err(e),
                },
            }
        }
        reads.sort_unstable();
        reads.dedup();
        writes.sort_unstable();
        writes.dedup();
        for va in &reads {
            let bo = &self.bos[va];
            if let (Cpu::Copy(region), 0) = (&bo.cpu, bo.writers) {
                upload(&mut self.session, bo.buffer, region)?;
            }
        }
        let fence = self.session.submit(self.ctx, &commands)?;
        for va in &writes {
            if let Some(bo) = self.bos.get_mut(va)
                && matches!(bo.cpu, Cpu::Copy(_))
            {
                bo.writers += 1;
            }
        }
        self.pending.push((fence, writes));
        self.state.submitted = fence;
        if let Some(addr) = unmapped {
            self.fault_at = Some((fence, vgpu_abi::fault::NOT_PRESENT, addr));
        }
        Ok(fence)
    }

    /// Waits for fence `seqno` (`timeout_ns` < 0: without limit), then brings back what the
    /// completed work wrote.
    pub fn wait(&mut self, seqno: u64, timeout_ns: i64) -> Result<(), Failure> {
        if seqno > self.state.submitted {
            return Err(fail(
                libc::EINVAL,
                format!("fence {seqno} was never submitted"),
            ));
        }
        let deadline = u64::try_from(timeout_ns)
            .ok()
            .map(|ns| std::time::Instant::now() + Duration::from_nanos(ns));
        loop {
            let left = deadline.map_or(Duration::from_millis(u64::from(MAX_WAIT_MS)), |d| {
                d.saturating_duration_since(std::time::Instant::now())
            });
            match self.session.wait(self.ctx, seqno, left)? {
                WaitResult::Done => break,
                WaitResult::TimedOut if deadline.is_none() => {}
                WaitResult::TimedOut => {
                    return Err(fail(
                        libc::ETIME,
                        format!("fence {seqno} did not complete in time"),
                    ));
                }
                WaitResult::Fault { code, addr } => {
                    return Err(self.stopped(code, addr, format!("fault {code}")));
                }
            }
        }
        let faulted = self.fault_at.filter(|(f, ..)| *f <= seqno);
        let reached = faulted.map_or(seqno, |(f, ..)| f.saturating_sub(1));
        self.state.completed = self.state.completed.max(reached);
        let (done, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(f, _)| *f <= seqno);
        self.pending = still;
        for (_, writes) in done {
            for va in writes {
                if let Some(bo) = self.bos.get_mut(&va)
                    && let Cpu::Copy(region) = &bo.cpu
                {
                    download(&mut self.session, bo.buffer, region)?;
                    bo.writers = bo.writers.saturating_sub(1);
                }
            }
        }
        if let Some((_, code, addr)) = faulted {
            self.fault_at = None;
            return Err(self.stopped(code, addr, "no buffer".into()));
        }
        Ok(())
    }

    /// Records that the context stopped on fault `code` at `addr`; the failure to report.
    fn stopped(&mut self, code: u32, addr: u64, what: String) -> Failure {
        self.state.faulted = true;
        self.state.fault_code = code;
        self.state.fault_addr = addr;
        self.state.faults += 1;
        fail(
            libc::EIO,
            format!("the context stopped on a fault: {what} at {addr:#x}"),
        )
    }

    /// Restarts the context after a fault; work not yet done is dropped.
    pub fn recover(&mut self) -> Result<(), Failure> {
        self.session.reset_context(self.ctx)?;
        self.pending.clear();
        self.fault_at = None;
        for bo in self.bos.values_mut() {
            bo.writers = 0;
        }
        self.state.faulted = false;
        self.state.fault_code = 0;
        self.state.fault_addr = 0;
        self.state.completed = self.state.submitted;
        Ok(())
    }
}

/// Sends the CPU copy `region` into `buffer`.
fn upload(s: &mut Session, buffer: Buffer, region: &vm_memory::MmapRegion) -> Result<(), Failure> {
    use vm_memory::VolatileMemory;
    let v = region.as_volatile_slice();
    let mut chunk = vec![0u8; (MAX_INLINE as usize).min(v.len())];
    let (mut off, mut sent) = (0, 0);
    while off < v.len() {
        let n = chunk.len().min(v.len() - off);
        let got = v
            .offset(off)
            .map_err(|e| fail(libc::EFAULT, e.to_string()))?
            .copy_to(&mut chunk[..n]);
        s.send_write(buffer.at(off as u64), &chunk[..got])?;
        off += got;
        sent += 1;
    }
    for _ in 0..sent {
        match s.recv()? {
            vgpu_session::proto::Reply::Done => {}
            r => return Err(fail(libc::EPROTO, format!("unexpected reply {r:?}"))),
        }
    }
    Ok(())
}

/// Brings `buffer` back into the CPU copy `region`.
fn download(
    s: &mut Session,
    buffer: Buffer,
    region: &vm_memory::MmapRegion,
) -> Result<(), Failure> {
    use vm_memory::VolatileMemory;
    let v = region.as_volatile_slice();
    let mut off = 0u64;
    while off < v.len() as u64 {
        let n = MAX_INLINE.min(v.len() as u64 - off);
        let data = s.read(buffer.at(off), n)?;
        v.offset(off as usize)
            .map_err(|e| fail(libc::EFAULT, e.to_string()))?
            .copy_from(&data);
        off += n;
    }
    Ok(())
}
