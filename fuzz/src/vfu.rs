//! A vfio-user client that speaks garbage: the fuzz input is decoded into a sequence of
//! messages (every command, migration v2's included, with fuzzed fields, fds attached or not,
//! the last one possibly cut short), written to `vfu::serve` running Tessera's `Attachment`
//! over a fresh vGPU, exactly as `tessera serve` serves one connection.
//!
//! Some `DMA_MAP` messages offer a [`work image`](work_image): guest memory holding page
//! tables and a ring of packets (fills, copies, spinning dispatches) that use it. Right after
//! such a map the harness starts context 0 on it through BAR 0, as a driver would, so the
//! messages that follow (`DMA_UNMAP`, `RESET`, migration state changes and data reads, dirty
//! logging, more maps, disconnecting) race with commands that read and write the client's
//! memory.
//!
//! Oracles: nothing panics at all (`vfu`'s server never panics on a peer's bytes, so every
//! panic, in its parsing or in Tessera's device, is a finding); the connection always ends
//! (no hang); afterwards the vGPU still answers, and a neighbour's VRAM canary and a host
//! memfd that was never offered are intact; once a `DMA_UNMAP` of a work image has returned,
//! the device never writes to that memory again.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use vfu::Device;
use vfu::mig::feature;
use vfu::wire::cmd;
use vgpu::backend::SoftGpu;
use vgpu::backend::Vram;
use vgpu::backend::soft::SoftVram;
use vgpu::device::DEFAULT_WATCHDOG;
use vgpu::sched::{Params, Scheduler};
use vgpu::{BarAddresses, DmaDomain, Interrupts, Vgpu, VgpuSetup};
use vgpu_abi::{Packet, ctx_control, kernel, packet, regs};
use vgpu_server::attach::{self, Attachment, EventVectors};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::input::Input;
use crate::rig::{self, CONTEXTS, VRAM_SIZE, profile};

/// Largest region access or migration data transfer a generated message asks for (the
/// server takes up to 1 MiB; smaller keeps inputs cheap and within the fuzzer's malloc
/// limit).
const MAX_COUNT: u32 = 64 << 10;

/// Operations of the input format (`op % OPS`, see [`decode`]).
const OPS: u8 = 14;

/// `DMA_UNMAP` flags that unmap everything, as `Attachment` reads them (VFIO's
/// `VFIO_DMA_UNMAP_FLAG_ALL`, and the bit the `vfio_user` crate's client uses for it).
const UNMAP_ALL: u32 = 1 << 1 | 1 << 2;

/// Size of a work image.
const WORK_LEN: u64 = 64 << 10;
/// Ring entries of a work image; its packets sit at VA `WORK_RING`.
const WORK_RING_ENTRIES: u32 = 16;
const WORK_RING: u64 = 0x4000;

/// Guest memory to be mapped at `iova` (page-aligned) holding a ready command stream for
/// context 0: page tables at `iova` mapping VA `[0, WORK_LEN)` onto the image, a ring at VA
/// [`WORK_RING`] and the packets [`work_packets`] lists, which use VA `0x8000..0x10000`.
pub fn work_image(iova: u64) -> Vec<u8> {
    use vgpu_abi::pte;
    let mut image = vec![0u8; WORK_LEN as usize];
    let mut put = |at: u64, v: u64| {
        image[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
    };
    // PML4 → PDPT → PD → PT, each entry 0, then 16 pages of 4 KiB.
    for level in 0..3u64 {
        put(level * 0x1000, (iova + (level + 1) * 0x1000) | pte::PRESENT);
    }
    for i in 0..WORK_LEN / 0x1000 {
        put(
            0x3000 + i * 8,
            (iova + i * 0x1000) | pte::PRESENT | pte::WRITABLE,
        );
    }
    for (i, p) in work_packets().iter().enumerate() {
        let at = (WORK_RING + i as u64 * packet::PACKET_SIZE) as usize;
        image[at..at + packet::PACKET_SIZE as usize].copy_from_slice(&p.to_bytes());
    }
    image
}

/// The packets of a work image: writes to the client's memory before, between and after
/// dispatches that keep the engine busy for a few milliseconds.
fn work_packets() -> Vec<Packet> {
    let spin = Packet::new(packet::OP_DISPATCH, kernel::SPIN_US, &[250, 8]);
    vec![
        Packet::new(packet::OP_FILL, 0, &[0x8000, 0x4000, 0x5a5a_5a5a]),
        spin,
        Packet::new(packet::OP_COPY, 0, &[0x8000, 0xc000, 0x2000]),
        spin,
        Packet::new(packet::OP_FILL, 0, &[0xe000, 0x1000, 0xa5a5_a5a5]),
        Packet::new(packet::OP_FENCE, packet::FENCE_IRQ, &[0xf000, 1]),
    ]
}

/// A work image the client mapped.
struct Work {
    iova: u64,
    file: File,
    /// Its contents when a `DMA_UNMAP` of it returned.
    unmapped: Option<Vec<u8>>,
}

/// The first [`WORK_LEN`] bytes of `f` (zeros past its end).
fn read_all(f: &File) -> Vec<u8> {
    let mut b = vec![0u8; WORK_LEN as usize];
    let _ = std::os::unix::fs::FileExt::read_at(f, &mut b, 0);
    b
}

/// Tessera's `Attachment`, recording the work images the client maps and unmaps (for the
/// oracle), and starting context 0 on every work image right after its map.
struct Marked<'a> {
    att: &'a mut Attachment,
    work: Vec<Work>,
}

impl Marked<'_> {
    /// Starts context 0 on the work image mapped at `iova` (register writes through the
    /// device, as the client would send them).
    fn start_work(&mut self, iova: u64) {
        let mut w = |reg: u64, v: u32| {
            let at = regs::ctx_reg(0, reg);
            let _ = self.att.region_write(0, at, &v.to_le_bytes());
        };
        w(regs::CTX_CONTROL, ctx_control::RESET);
        w(regs::CTX_PT_ROOT_LO, iova as u32);
        w(regs::CTX_PT_ROOT_HI, (iova >> 32) as u32);
        w(regs::CTX_RING_BASE_LO, WORK_RING as u32);
        w(regs::CTX_RING_BASE_HI, 0);
        w(regs::CTX_RING_SIZE, WORK_RING_ENTRIES);
        w(regs::CTX_CONTROL, ctx_control::ENABLE);
        w(regs::CTX_RING_TAIL, work_packets().len() as u32);
    }
}

impl Device for Marked<'_> {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        self.att.region_read(region, offset, data)
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.att.region_write(region, offset, data)
    }
    fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        // A work image mapped whole, at the address its page tables were built for.
        let work = fd
            .as_ref()
            .filter(|f| offset == 0 && size == WORK_LEN && read_all(f) == work_image(address))
            .and_then(|f| f.try_clone().ok());
        self.att.dma_map(flags, offset, address, size, fd)?;
        if let Some(file) = work {
            self.work.push(Work {
                iova: address,
                file,
                unmapped: None,
            });
            self.start_work(address);
        }
        Ok(())
    }
    fn dma_unmap(&mut self, flags: u32, address: u64, size: u64) -> std::io::Result<()> {
        self.att.dma_unmap(flags, address, size)?;
        let all = flags & UNMAP_ALL != 0;
        for w in &mut self.work {
            if w.unmapped.is_none() && (all || (w.iova == address && size == WORK_LEN)) {
                w.unmapped = Some(read_all(&w.file));
            }
        }
        Ok(())
    }
    fn reset(&mut self) -> std::io::Result<()> {
        self.att.reset()
    }
    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        self.att.set_irqs(index, flags, start, count, fds)
    }
    fn migration(&mut self) -> Option<&mut dyn vfu::Migration> {
        self.att.migration()
    }
}

struct Fixture {
    gpu: Arc<SoftGpu>,
    /// A neighbour's VRAM and host memory never offered to the client.
    bystanders: rig::Bystanders,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        gpu: Arc::new(SoftGpu::new(2 * VRAM_SIZE, 1).expect("software GPU")),
        bystanders: rig::Bystanders::new(),
    })
}

/// A "small or interesting" address or size: often in range, sometimes anything.
fn addr(input: &mut Input<'_>) -> u64 {
    match input.u8() % 4 {
        0 => u64::from(input.u8()) << 12,
        1 => u64::from(input.u32() % (1 << 24)),
        2 => [0, 1 << 32, u64::MAX - 0xfff, 1 << 47][usize::from(input.u8() % 4)],
        _ => input.u64(),
    }
}

/// Up to `n` of the next bytes.
fn bytes(input: &mut Input<'_>, n: usize) -> Vec<u8> {
    (0..n.min(input.remaining())).map(|_| input.u8()).collect()
}

/// One message to send, with the fds that go with it.
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

fn header(id: u16, command: u16, body: usize, flags: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16 + body);
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&command.to_le_bytes());
    h.extend_from_slice(&((16 + body) as u32).to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

fn eventfd() -> OwnedFd {
    let e = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
    let raw = std::os::fd::IntoRawFd::into_raw_fd(e);
    // SAFETY: `raw` was just released by the EventFd.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// The next migration data size: mostly up to [`MAX_COUNT`], with the top bit set anything
/// (the server refuses what is over its limit; nothing here allocates it).
fn mig_size(input: &mut Input<'_>) -> u32 {
    match input.u32() {
        s if s & 1 << 31 != 0 => s,
        s => s % (MAX_COUNT + 1),
    }
}

/// A message's `argsz`: `natural` unless the selector byte says fuzzed (`% 4 == 3`).
fn argsz(input: &mut Input<'_>, sel: u8, natural: u64) -> u32 {
    if sel % 4 == 3 {
        input.u32()
    } else {
        u32::try_from(natural).unwrap_or(u32::MAX)
    }
}

/// A `DEVICE_FEATURE` message's body: selector bytes (feature, direction, `argsz`), then the
/// feature's fields.
fn device_feature(input: &mut Input<'_>) -> Vec<u8> {
    let which = match input.u8() % 6 {
        0 => feature::MIGRATION,
        1 => feature::MIG_DEVICE_STATE,
        2 => feature::DMA_LOGGING_START,
        3 => feature::DMA_LOGGING_STOP,
        4 => feature::DMA_LOGGING_REPORT,
        _ => u32::from(input.u16()),
    };
    // Bits 0..3: GET, SET, PROBE; bit 7: some unknown flag bits too.
    let dir = input.u8();
    let mut fl = which;
    for (bit, f) in [feature::GET, feature::SET, feature::PROBE]
        .into_iter()
        .enumerate()
    {
        if dir & 1 << bit != 0 {
            fl |= f;
        }
    }
    if dir & 0x80 != 0 {
        fl |= input.u32() & !(feature::MASK | feature::GET | feature::SET | feature::PROBE);
    }
    let sel = input.u8();
    let mut data = vec![];
    // Room the reply needs past the fields (a dirty-log report's bitmap).
    let mut room = 0u64;
    match which {
        feature::MIGRATION | feature::DMA_LOGGING_STOP => {}
        feature::MIG_DEVICE_STATE => {
            // device_state: mostly one that exists (STOP, RUNNING, STOP_COPY, RESUMING,
            // PRE_COPY), sometimes ERROR, a peer-to-peer one or anything; data_fd -1.
            let state = match input.u8() % 8 {
                i @ 0..7 => [1, 2, 3, 4, 6, 0, 5][usize::from(i)],
                _ => input.u32(),
            };
            data.extend_from_slice(&state.to_le_bytes());
            data.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        feature::DMA_LOGGING_START => {
            // page_size, num_ranges (sometimes not the number that follow), reserved, ranges.
            let page = addr(input);
            let n = input.u8();
            let count = n % 5;
            let claimed = if n >= 0xf0 {
                input.u32()
            } else {
                u32::from(count)
            };
            data.extend_from_slice(&page.to_le_bytes());
            data.extend_from_slice(&claimed.to_le_bytes());
            data.extend_from_slice(&0u32.to_le_bytes());
            for _ in 0..count {
                data.extend_from_slice(&addr(input).to_le_bytes());
                data.extend_from_slice(&addr(input).to_le_bytes());
            }
        }
        feature::DMA_LOGGING_REPORT => {
            let (iova, length, page) = (addr(input), addr(input), addr(input));
            for v in [iova, length, page] {
                data.extend_from_slice(&v.to_le_bytes());
            }
            room = length.div_ceil(page.max(1)).div_ceil(64) * 8;
        }
        _ => data = bytes(input, 24),
    }
    let argsz = argsz(input, sel, 8 + data.len() as u64 + room);
    let mut b = vec![];
    b.extend_from_slice(&argsz.to_le_bytes());
    b.extend_from_slice(&fl.to_le_bytes());
    b.extend_from_slice(&data);
    b
}

/// Decodes the input into messages. Each starts with an op byte (bit 7: no reply wanted),
/// `op % OPS` being: 0 `VERSION`, 1 `DMA_MAP` (maybe of a work image), 2 `DMA_UNMAP`,
/// 3 `DEVICE_GET_INFO`, 4 `DEVICE_GET_REGION_INFO`, 5 `DEVICE_GET_IRQ_INFO`,
/// 6 `DEVICE_SET_IRQS`, 7 `REGION_READ`, 8 `REGION_WRITE`, 9 `DEVICE_RESET`, 10 an unknown
/// command, 11 `DEVICE_FEATURE` ([`device_feature`]), 12 `MIG_DATA_READ`, 13
/// `MIG_DATA_WRITE`; the fields follow.
fn decode(input: &mut Input<'_>) -> Vec<Message> {
    let mut out = Vec::new();
    let mut id = 0u16;
    while !input.is_empty() && out.len() < 64 {
        id = id.wrapping_add(1);
        let op = input.u8();
        // Mostly replies wanted; sometimes the no-reply flag.
        let flags = if op & 0x80 != 0 { 1 << 4 } else { 0 };
        let mut fds = Vec::new();
        let body: Vec<u8> = match op % OPS {
            0 => {
                let mut b = Vec::new();
                b.extend_from_slice(&0u16.to_le_bytes());
                b.extend_from_slice(&1u16.to_le_bytes());
                match input.u8() % 3 {
                    0 => b.extend_from_slice(b"{\"capabilities\":{}}\0"),
                    1 => b.extend_from_slice(&bytes(input, 24)),
                    _ => {}
                }
                let mut m = header(id, 1, b.len(), flags);
                if input.u8().is_multiple_of(8) {
                    // A message size smaller than the version header.
                    m[4..8].copy_from_slice(&8u32.to_le_bytes());
                }
                m.extend_from_slice(&b);
                out.push(Message { bytes: m, fds });
                continue;
            }
            1 => {
                let len = u64::from(input.u8()) << 16;
                // (flags, offset, address, size): a work image's, or fuzzed.
                let mut work = None;
                match input.u8() % 5 {
                    0 => {}
                    1 => fds.push(OwnedFd::from(rig::memfd(len.max(4096)))),
                    2 => fds.push(eventfd()),
                    3 => {
                        fds.push(OwnedFd::from(rig::memfd(len.max(4096))));
                        fds.push(eventfd());
                    }
                    _ => {
                        // A work image at a page-aligned address below 4 GiB, mapped whole.
                        let iova = u64::from(input.u32()) & !0xfff;
                        let image = rig::memfd(WORK_LEN);
                        (&image)
                            .write_all(&work_image(iova))
                            .expect("write work image");
                        fds.push(OwnedFd::from(image));
                        work = Some((3, 0, iova, WORK_LEN));
                    }
                }
                let (map_flags, offset, address, size) =
                    work.unwrap_or_else(|| (input.u32(), addr(input), addr(input), addr(input)));
                let mut b = vec![];
                b.extend_from_slice(&32u32.to_le_bytes());
                b.extend_from_slice(&map_flags.to_le_bytes());
                for v in [offset, address, size] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                [header(id, 2, b.len(), flags), b].concat()
            }
            2 => {
                let mut b = vec![];
                b.extend_from_slice(&24u32.to_le_bytes());
                b.extend_from_slice(&input.u32().to_le_bytes());
                b.extend_from_slice(&addr(input).to_le_bytes());
                b.extend_from_slice(&addr(input).to_le_bytes());
                [header(id, 3, b.len(), flags), b].concat()
            }
            3 => [header(id, 4, 16, 0), vec![0; 16]].concat(),
            4 => {
                let mut b = vec![0u8; 32];
                b[0..4].copy_from_slice(&input.u32().to_le_bytes());
                b[8..12].copy_from_slice(&u32::from(input.u8() % 12).to_le_bytes());
                [header(id, 5, 32, 0), b].concat()
            }
            5 => {
                let mut b = vec![0u8; 16];
                b[8..12].copy_from_slice(&u32::from(input.u8() % 8).to_le_bytes());
                [header(id, 7, 16, 0), b].concat()
            }
            6 => {
                let index = u32::from(input.u8() % 7);
                let irq_flags = input.u32();
                let start = u32::from(input.u8() % 20);
                let count = u32::from(input.u8() % 20);
                let nfds = usize::from(input.u8() % 17);
                let bad = input.u8().is_multiple_of(4);
                for i in 0..nfds {
                    fds.push(if bad && i == 0 {
                        OwnedFd::from(rig::memfd(4096))
                    } else {
                        eventfd()
                    });
                }
                let mut b = vec![];
                for v in [20, irq_flags, index, start, count] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                [header(id, 8, b.len(), flags), b].concat()
            }
            7 | 8 => {
                let write = op % OPS == 8;
                let offset = addr(input);
                let region = u32::from(input.u8() % 10);
                let count = input.u32() % MAX_COUNT;
                let mut b = vec![];
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&region.to_le_bytes());
                b.extend_from_slice(&count.to_le_bytes());
                if write {
                    let mut data = bytes(input, count as usize);
                    data.resize(count as usize, 0xa5);
                    b.extend_from_slice(&data);
                }
                [header(id, if write { 10 } else { 9 }, b.len(), flags), b].concat()
            }
            9 => header(id, 13, 0, flags),
            10 => {
                // An unknown or unsupported command with a little body.
                let cmd = [0u16, 6, 11, 12, 14, 15, 0xffff, 19][usize::from(input.u8() % 8)];
                let b = bytes(input, 16);
                [header(id, cmd, b.len(), 0), b].concat()
            }
            11 => {
                let b = device_feature(input);
                [header(id, cmd::DEVICE_FEATURE, b.len(), flags), b].concat()
            }
            12 => {
                // MIG_DATA_READ: argsz (room for the data asked for), size.
                let sel = input.u8();
                let size = mig_size(input);
                let argsz = argsz(input, sel, 8 + u64::from(size));
                let mut b = vec![];
                b.extend_from_slice(&argsz.to_le_bytes());
                b.extend_from_slice(&size.to_le_bytes());
                [header(id, cmd::MIG_DATA_READ, b.len(), flags), b].concat()
            }
            _ => {
                // MIG_DATA_WRITE: argsz, size, data (sometimes less than `size` says).
                let sel = input.u8();
                let size = mig_size(input);
                let argsz = argsz(input, sel, 8 + u64::from(size));
                let n = size.min(MAX_COUNT) as usize;
                let mut data = bytes(input, n);
                data.resize(n, 0xa5);
                if sel % 8 == 6 {
                    data.truncate(n / 2);
                }
                let mut b = vec![];
                b.extend_from_slice(&argsz.to_le_bytes());
                b.extend_from_slice(&size.to_le_bytes());
                b.extend_from_slice(&data);
                [header(id, cmd::MIG_DATA_WRITE, b.len(), flags), b].concat()
            }
        };
        out.push(Message { bytes: body, fds });
    }
    // Sometimes the stream ends in the middle of the last message.
    if let Some(last) = out.last_mut()
        && last.bytes.len() > 3
        && last.bytes[2] % 5 == 0
    {
        let cut = last.bytes.len() / 2;
        last.bytes.truncate(cut);
    }
    out
}

fn new_vgpu(vectors: Arc<EventVectors>) -> (Vgpu, Arc<SoftVram>) {
    let f = fixture();
    let vram = Arc::new(SoftVram::new(VRAM_SIZE).expect("VRAM"));
    let vgpu = Vgpu::new(VgpuSetup {
        profile: profile(),
        bars: BarAddresses { regs: 0, vram: 0 },
        sys: vm_memory::GuestMemoryMmap::new(),
        domain: DmaDomain::default(),
        vram: vram.clone(),
        backend: f.gpu.clone(),
        interrupts: Interrupts::Vectors(vectors),
        sched: Scheduler::private(),
        sched_params: Params::default(),
        watchdog: DEFAULT_WATCHDOG,
    })
    .expect("vGPU");
    (vgpu, vram)
}

/// Header flag of an error reply.
const REPLY_ERROR: u32 = 1 << 5;

/// The replies in `b` (whole messages only): their commands and errnos.
fn parse_replies(mut b: &[u8]) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    while b.len() >= 16 {
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let (command, size, flags) = (u16::from_le_bytes([b[2], b[3]]), word(4), word(8));
        out.push((
            command,
            if flags & REPLY_ERROR != 0 {
                word(12)
            } else {
                0
            },
        ));
        b = &b[(size as usize).clamp(16, b.len())..];
    }
    out
}

/// Serves `messages` to `att` with `vfu::serve` on one end of a socket pair, the client
/// writing them on the other, exactly as `tessera serve` serves one connection; returns once
/// the client has sent them all and the connection ended, with the work images the client
/// mapped and, with `keep_replies`, every reply's command and errno (0: success) in order. A
/// panic anywhere propagates.
fn exchange(
    att: &mut Attachment,
    vram: &SoftVram,
    messages: Vec<Message>,
    keep_replies: bool,
) -> (Vec<Work>, Vec<(u16, u32)>) {
    let (server, stream) = UnixStream::pair().expect("socket pair");
    let info = vfu::DeviceInfo {
        resettable: true,
        irqs: attach::irqs(CONTEXTS),
        regions: attach::regions(vram.size(), Some(vram.file().as_raw_fd())),
    };
    let client = std::thread::spawn(move || {
        let mut reader = stream.try_clone().expect("clone");
        let drain = std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut sink = [0u8; 1 << 16];
            while let Ok(n @ 1..) = reader.read(&mut sink) {
                if keep_replies {
                    kept.extend_from_slice(&sink[..n]);
                }
            }
            parse_replies(&kept)
        });
        for m in messages {
            let raw: Vec<i32> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
            let sent = if raw.is_empty() {
                (&stream).write_all(&m.bytes).is_ok()
            } else {
                stream.send_with_fds(&[&m.bytes[..]], &raw).is_ok()
            };
            if !sent {
                break;
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        drain.join().expect("drain thread")
    });
    let mut marked = Marked {
        att,
        work: Vec::new(),
    };
    // An error only says how the connection ended (a malformed size, a cut message).
    let _ = vfu::serve(server, &info, &mut marked);
    let replies = client.join().expect("client thread");
    (marked.work, replies)
}

/// Runs one input end to end and checks the oracles.
pub fn run(data: &[u8]) {
    let f = fixture();
    let messages = decode(&mut Input::new(data));
    let vectors = Arc::new(EventVectors::default());
    let (vgpu, vram) = new_vgpu(vectors.clone());
    // Client memory here is not sealed, so the server's SIGBUS guard is in play; a fault
    // anywhere else must still reach libFuzzer's crash handler.
    vgpu::guard::install_chained().expect("SIGBUS guard");
    let mut att = Attachment::new(vgpu, vectors, false, Default::default());
    let (work, _) = exchange(&mut att, &vram, messages, false);
    // The device still answers.
    let mut magic = [0u8; 4];
    let _ = att.region_read(0, regs::MAGIC, &mut magic);
    assert_eq!(
        u32::from_le_bytes(magic),
        regs::MAGIC_VALUE,
        "vGPU dead after the input"
    );
    drop(att);
    // The vGPU is gone (its command processor joined): whatever it wrote is written.
    for w in &work {
        if let Some(then) = &w.unmapped {
            assert!(
                read_all(&w.file) == *then,
                "the device wrote the work image at {:#x} after its DMA_UNMAP returned",
                w.iova
            );
        }
    }
    // Nobody else's memory changed.
    f.bystanders.check();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The work image is a valid command stream: started, it fills, copies and fences the
    /// client's memory (otherwise the fuzzer would race `DMA_UNMAP` with faults only).
    #[test]
    fn a_work_image_runs_to_its_fence() {
        let vectors = Arc::new(EventVectors::default());
        let (vgpu, _vram) = new_vgpu(vectors.clone());
        let mut att = Attachment::new(vgpu, vectors, false, Default::default());
        let mut marked = Marked {
            att: &mut att,
            work: Vec::new(),
        };
        let iova = 0x30_0000;
        let image = rig::memfd(WORK_LEN);
        (&image).write_all(&work_image(iova)).expect("write");
        let fd = image.try_clone().expect("dup");
        // VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE.
        marked.dma_map(3, 0, iova, WORK_LEN, Some(fd)).expect("map");
        assert_eq!(
            marked.work.len(),
            1,
            "the harness recognised its work image"
        );
        let word = |at: u64| {
            let mut b = [0u8; 4];
            std::os::unix::fs::FileExt::read_exact_at(&image, &mut b, at).expect("read");
            u32::from_le_bytes(b)
        };
        let start = Instant::now();
        while word(0xf000) != 1 {
            assert!(start.elapsed() < rig::HANG_BOUND, "no fence");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(word(0x8000), 0x5a5a_5a5a, "fill");
        assert_eq!(word(0xc000 + 0x1ffc), 0x5a5a_5a5a, "copy");
        assert_eq!(word(0xe000), 0xa5a5_a5a5, "second fill");
        marked.dma_unmap(0, iova, WORK_LEN).expect("unmap");
        assert!(marked.work[0].unmapped.is_some(), "unmap recorded");
    }

    /// Every message of seed `name`, served to a fresh vGPU: the replies' commands and
    /// errnos.
    fn replies_to_seed(name: &str) -> (usize, Vec<(u16, u32)>) {
        let (_, bytes) = crate::seeds::vfio_user()
            .into_iter()
            .find(|(n, _)| *n == name)
            .expect("seed");
        let messages = decode(&mut Input::new(&bytes));
        let sent = messages.len();
        let vectors = Arc::new(EventVectors::default());
        let (vgpu, vram) = new_vgpu(vectors.clone());
        let mut att = Attachment::new(vgpu, vectors, false, Default::default());
        (sent, exchange(&mut att, &vram, messages, true).1)
    }

    /// The source's migration seed is a migration that works: every migration message
    /// succeeds.
    #[test]
    fn the_migration_source_seed_is_accepted() {
        let (sent, replies) = replies_to_seed("migration-source");
        assert_eq!(replies.len(), sent, "a reply to every message");
        let failed: Vec<_> = replies.iter().filter(|r| r.1 != 0).collect();
        // Only the greeting's question for the region past the last.
        let einval = libc::EINVAL as u32;
        assert_eq!(failed, [&(cmd::DEVICE_GET_REGION_INFO, einval)]);
        let count = |c| replies.iter().filter(|r| r.0 == c).count();
        assert_eq!(count(cmd::MIG_DATA_READ), 20);
        assert_eq!(count(cmd::DEVICE_FEATURE), 11);
    }

    /// The destination's seed: the garbage and leaving RESUMING with it are refused, and
    /// nothing else.
    #[test]
    fn the_migration_destination_seed_fails_where_it_should() {
        let (sent, replies) = replies_to_seed("migration-destination");
        assert_eq!(replies.len(), sent, "a reply to every message");
        let failed: Vec<_> = replies.iter().filter(|r| r.1 != 0).collect();
        let einval = libc::EINVAL as u32;
        assert_eq!(
            failed,
            [
                // The greeting's question for the region past the last.
                &(cmd::DEVICE_GET_REGION_INFO, einval),
                &(cmd::MIG_DATA_WRITE, einval),
                &(cmd::DEVICE_FEATURE, einval)
            ]
        );
    }
}
