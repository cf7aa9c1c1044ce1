//! The server's message loop: one connected client, one [`Device`].
//!
//! Every message is read whole before it is parsed, every field is checked before the device
//! sees it, and a bad message gets an error reply (an errno) and changes nothing: the loop
//! never panics and never allocates more than [`MAX_MESSAGE`] for a message, whatever the
//! client claims. The migration state machine lives here, so a device only ever sees single
//! VFIO arcs in their order.

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS, vfio_region_info,
    vfio_region_sparse_mmap_area,
};

use crate::mig::{DeviceState, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY, feature};
use crate::wire::{
    self, Header, MAX_DATA_XFER, MAX_MSG_FDS, Message, Put, Reader, RecvError, Short, cmd, flags,
};

/// Size of `struct vfio_region_info` on the wire.
pub const REGION_INFO_SIZE: usize = 32;
/// Page size of DMA dirty logging: the only one offered.
pub const LOG_PAGE: u64 = 4096;
/// Most ranges one `DMA_LOGGING_START` may name.
pub const MAX_LOG_RANGES: usize = 1024;

/// A region the device offers.
#[derive(Debug, Clone)]
pub struct ServerRegion {
    /// Its description (`argsz`, `cap_offset` and the caps flag are filled in when sent).
    pub info: vfio_region_info,
    /// Areas a client may map (sent as the sparse-mmap capability, with `mmap_fd`).
    pub sparse_areas: Vec<vfio_region_sparse_mmap_area>,
    /// The file those areas map.
    pub mmap_fd: Option<RawFd>,
}

/// An interrupt index the device offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// Its index.
    pub index: u32,
    /// `VFIO_IRQ_INFO_*` flags.
    pub flags: u32,
    /// How many interrupts it has.
    pub count: u32,
}

/// What a device is, as `DEVICE_GET_INFO`, `GET_REGION_INFO` and `GET_IRQ_INFO` answer.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Whether `DEVICE_RESET` is offered.
    pub resettable: bool,
    /// Regions, by index.
    pub regions: Vec<ServerRegion>,
    /// Interrupt indexes, by index.
    pub irqs: Vec<IrqInfo>,
}

/// The device behind the loop. Errors become error replies carrying their errno (`EINVAL`
/// where they have none).
pub trait Device {
    /// `REGION_READ` of `data.len()` bytes (≤ 1 MiB) at `offset` of a region that exists.
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;
    /// `REGION_WRITE`.
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()>;
    /// `DMA_MAP` of `[address, address + size)` from `fd` at `offset`.
    fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()>;
    /// `DMA_UNMAP`.
    fn dma_unmap(&mut self, flags: u32, address: u64, size: u64) -> io::Result<()>;
    /// `DEVICE_RESET`.
    fn reset(&mut self) -> io::Result<()>;
    /// `SET_IRQS` on an index that exists (never `DATA_BOOL`).
    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()>;
    /// The device's migration, if it offers one.
    fn migration(&mut self) -> Option<&mut dyn Migration> {
        None
    }
}

/// A device's side of migration v2. The loop keeps the state and checks every request
/// against VFIO's arcs; the device is asked for single arcs only.
pub trait Migration {
    /// Moves from `from` to `to`, one of VFIO's arcs. On an error the device is left in
    /// `ERROR` until a reset.
    fn step(&mut self, from: DeviceState, to: DeviceState) -> io::Result<()>;
    /// The next at most `max` bytes of the state (PRE_COPY or STOP_COPY); none: nothing
    /// more now (PRE_COPY) or the end (STOP_COPY).
    fn read(&mut self, max: usize) -> io::Result<Vec<u8>>;
    /// The next bytes of a state being resumed (RESUMING).
    fn write(&mut self, data: &[u8]) -> io::Result<()>;
    /// The device was reset: it is RUNNING again, with no migration in progress.
    fn reset(&mut self);
    /// Starts recording which pages of these IOVA ranges the device writes.
    fn logging_start(&mut self, ranges: &[(u64, u64)]) -> io::Result<()>;
    /// Stops recording.
    fn logging_stop(&mut self) -> io::Result<()>;
    /// The parts of `[iova, iova + length)` written since they were last reported, as
    /// `[start, end)` byte ranges (whole [`LOG_PAGE`] pages); reporting clears them.
    fn logging_report(&mut self, iova: u64, length: u64) -> io::Result<Vec<(u64, u64)>>;
}

/// Why the loop ended.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket failed, or a message could not be followed.
    #[error(transparent)]
    Recv(#[from] RecvError),
    /// A reply could not be sent.
    #[error("cannot send a reply: {0}")]
    Send(#[source] io::Error),
}

fn errno(e: &io::Error) -> u32 {
    e.raw_os_error()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n != 0)
        .unwrap_or(libc::EINVAL as u32)
}

fn einval(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

impl From<Short> for io::Error {
    fn from(s: Short) -> Self {
        einval(s)
    }
}

/// A reply: its payload and descriptors.
struct Reply {
    payload: Vec<u8>,
    fds: Vec<RawFd>,
}

impl Reply {
    fn empty() -> Reply {
        Reply::with(Vec::new())
    }
    fn with(payload: Vec<u8>) -> Reply {
        Reply {
            payload,
            fds: Vec::new(),
        }
    }
}

/// Serves one client on `stream` until it disconnects.
pub fn serve(
    mut stream: UnixStream,
    info: &DeviceInfo,
    device: &mut dyn Device,
) -> Result<(), ServeError> {
    let mut state = DeviceState::Running;
    loop {
        let msg = match wire::recv(&mut stream) {
            Ok(m) => m,
            Err(RecvError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let header = msg.header;
        let result = if header.is_reply() {
            Err(einval("a reply where a command was expected"))
        } else {
            handle(info, device, &mut state, msg)
        };
        if header.no_reply() {
            if let Err(e) = result {
                tracing::debug!(command = header.command, "vfio-user command failed: {e}");
            }
            continue;
        }
        let mut out = Header {
            message_id: header.message_id,
            command: header.command,
            flags: flags::REPLY,
            ..Header::default()
        };
        let reply = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(command = header.command, "vfio-user command failed: {e}");
                out.flags |= flags::ERROR;
                out.error = errno(&e);
                Reply::empty()
            }
        };
        wire::send(&mut stream, out, &reply.payload, &reply.fds).map_err(ServeError::Send)?;
    }
}

fn handle(
    info: &DeviceInfo,
    device: &mut dyn Device,
    state: &mut DeviceState,
    msg: Message,
) -> io::Result<Reply> {
    let Message {
        header,
        payload,
        mut fds,
    } = msg;
    let mut r = Reader::new(&payload);
    // Only these take descriptors: any others are closed here.
    if !matches!(header.command, cmd::DMA_MAP | cmd::DEVICE_SET_IRQS) && !fds.is_empty() {
        return Err(einval("file descriptors with a command that takes none"));
    }
    match header.command {
        cmd::VERSION => version(&mut r),
        cmd::DMA_MAP => {
            let (_argsz, fl, offset, address, size) =
                (r.u32()?, r.u32()?, r.u64()?, r.u64()?, r.u64()?);
            if fds.len() > 1 {
                return Err(einval("more than one file for a DMA region"));
            }
            device.dma_map(fl, offset, address, size, fds.pop())?;
            Ok(Reply::empty())
        }
        cmd::DMA_UNMAP => {
            let (argsz, fl, address, size) = (r.u32()?, r.u32()?, r.u64()?, r.u64()?);
            device.dma_unmap(fl, address, size)?;
            let mut p = Vec::with_capacity(24);
            p.u32(argsz).u32(fl).u64(address).u64(size);
            Ok(Reply::with(p))
        }
        cmd::DEVICE_GET_INFO => {
            let mut p = Vec::with_capacity(16);
            let fl = VFIO_DEVICE_FLAGS_PCI
                | if info.resettable {
                    VFIO_DEVICE_FLAGS_RESET
                } else {
                    0
                };
            p.u32(16)
                .u32(fl)
                .u32(info.regions.len() as u32)
                .u32(info.irqs.len() as u32);
            Ok(Reply::with(p))
        }
        cmd::DEVICE_GET_REGION_INFO => {
            let argsz = r.u32()?;
            let (_fl, index) = (r.u32()?, r.u32()?);
            let region = info
                .regions
                .get(index as usize)
                .ok_or_else(|| einval(format_args!("no region {index}")))?;
            Ok(region_info(region, argsz))
        }
        cmd::DEVICE_GET_IRQ_INFO => {
            let (_argsz, _fl, index) = (r.u32()?, r.u32()?, r.u32()?);
            let irq = info
                .irqs
                .get(index as usize)
                .ok_or_else(|| einval(format_args!("no interrupt index {index}")))?;
            let mut p = Vec::with_capacity(16);
            p.u32(16).u32(irq.flags).u32(irq.index).u32(irq.count);
            Ok(Reply::with(p))
        }
        cmd::DEVICE_SET_IRQS => {
            let (_argsz, fl, index, start, count) =
                (r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?);
            if index as usize >= info.irqs.len() {
                return Err(einval(format_args!("no interrupt index {index}")));
            }
            if fl & VFIO_IRQ_SET_DATA_BOOL != 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            device.set_irqs(index, fl, start, count, fds)?;
            Ok(Reply::empty())
        }
        cmd::REGION_READ | cmd::REGION_WRITE => {
            let (offset, region, count) = (r.u64()?, r.u32()?, r.u32()?);
            if region as usize >= info.regions.len() {
                return Err(einval(format_args!("no region {region}")));
            }
            if count as usize > MAX_DATA_XFER {
                return Err(einval(format_args!("a {count}-byte region access")));
            }
            let mut p = Vec::with_capacity(16);
            p.u64(offset).u32(region).u32(count);
            if header.command == cmd::REGION_READ {
                let mut data = vec![0u8; count as usize];
                device.region_read(region, offset, &mut data)?;
                p.extend_from_slice(&data);
            } else {
                let data = r.bytes(count as usize)?;
                device.region_write(region, offset, data)?;
            }
            Ok(Reply::with(p))
        }
        cmd::DEVICE_RESET => {
            device.reset()?;
            if let Some(m) = device.migration() {
                m.reset();
                *state = DeviceState::Running;
            }
            Ok(Reply::empty())
        }
        cmd::DEVICE_FEATURE => device_feature(device, state, &mut r),
        cmd::MIG_DATA_READ | cmd::MIG_DATA_WRITE => {
            let (argsz, size) = (r.u32()?, r.u32()?);
            let m = device
                .migration()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTSUP))?;
            if size as usize > MAX_DATA_XFER {
                return Err(einval(format_args!(
                    "{size} bytes of migration data at once"
                )));
            }
            let mut p = Vec::new();
            if header.command == cmd::MIG_DATA_READ {
                if !matches!(*state, DeviceState::PreCopy | DeviceState::StopCopy) {
                    return Err(einval(format_args!("no data to read in state {state:?}")));
                }
                if u64::from(argsz) < 8 + u64::from(size) {
                    return Err(einval(format_args!(
                        "argsz {argsz} leaves no room for {size} bytes"
                    )));
                }
                let data = m.read(size as usize)?;
                p.u32(8 + data.len() as u32).u32(data.len() as u32);
                p.extend_from_slice(&data);
            } else {
                if *state != DeviceState::Resuming {
                    return Err(einval(format_args!("no data is taken in state {state:?}")));
                }
                m.write(r.bytes(size as usize)?)?;
            }
            Ok(Reply::with(p))
        }
        _ => Err(io::Error::from_raw_os_error(libc::ENOTSUP)),
    }
}

/// The server's capabilities (`VERSION` reply). Migration is always named: a device without
/// one answers `DEVICE_FEATURE` with `ENOTSUP`.
fn version(r: &mut Reader) -> io::Result<Reply> {
    let (major, _minor) = (r.u16()?, r.u16()?);
    if major != 0 {
        return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
    }
    let json = r.rest();
    let json = json.strip_suffix(&[0]).unwrap_or(json);
    serde_json::from_slice::<serde_json::Value>(json)
        .map_err(|e| einval(format_args!("the client's capabilities: {e}")))?;
    let caps = serde_json::json!({
        "capabilities": {
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": MAX_DATA_XFER,
            "migration": {
                "pgsize": LOG_PAGE,
            }
        }
    });
    let mut p = Vec::new();
    p.u16(0).u16(1);
    p.extend_from_slice(caps.to_string().as_bytes());
    p.push(0);
    Ok(Reply::with(p))
}

/// `GET_REGION_INFO`'s reply: the region, and its sparse-mmap capability (with the file) when
/// the client's `argsz` leaves room for it; otherwise the full `argsz`, so it asks again.
fn region_info(region: &ServerRegion, client_argsz: u32) -> Reply {
    let mut caps = Vec::new();
    if !region.sparse_areas.is_empty() {
        caps.u16(VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16)
            .u16(1)
            .u32(0)
            .u32(region.sparse_areas.len() as u32)
            .u32(0);
        for a in &region.sparse_areas {
            caps.u64(a.offset).u64(a.size);
        }
    }
    let mut ri = region.info;
    ri.argsz = (REGION_INFO_SIZE + caps.len()) as u32;
    let send_caps = !caps.is_empty() && client_argsz >= ri.argsz;
    if !caps.is_empty() {
        ri.flags |= VFIO_REGION_INFO_FLAG_CAPS;
        ri.cap_offset = REGION_INFO_SIZE as u32;
    }
    let mut p = Vec::with_capacity(REGION_INFO_SIZE + caps.len());
    p.u32(ri.argsz)
        .u32(ri.flags)
        .u32(ri.index)
        .u32(ri.cap_offset)
        .u64(ri.size)
        .u64(ri.offset);
    let mut fds = Vec::new();
    if send_caps {
        p.extend_from_slice(&caps);
        fds.extend(region.mmap_fd);
    }
    Reply { payload: p, fds }
}

/// `DEVICE_FEATURE`: `argsz`, `flags` (feature | GET/SET/PROBE), then the feature's data.
fn device_feature(
    device: &mut dyn Device,
    state: &mut DeviceState,
    r: &mut Reader,
) -> io::Result<Reply> {
    let (argsz, fl) = (r.u32()?, r.u32()?);
    let nosup = || io::Error::from_raw_os_error(libc::ENOTSUP);
    let m = device.migration().ok_or_else(nosup)?;
    let which = fl & feature::MASK;
    let (get, set, probe) = (
        fl & feature::GET != 0,
        fl & feature::SET != 0,
        fl & feature::PROBE != 0,
    );
    if fl & !(feature::MASK | feature::GET | feature::SET | feature::PROBE) != 0
        || get && set && !probe
    {
        return Err(einval(format_args!("DEVICE_FEATURE flags {fl:#x}")));
    }
    let (can_get, can_set) = match which {
        feature::MIGRATION => (true, false),
        feature::MIG_DEVICE_STATE => (true, true),
        feature::DMA_LOGGING_START | feature::DMA_LOGGING_STOP => (false, true),
        feature::DMA_LOGGING_REPORT => (true, false),
        _ => return Err(nosup()),
    };
    if (get && !can_get) || (set && !can_set) || !(get || set) {
        return Err(nosup());
    }
    let mut p = Vec::new();
    p.u32(argsz).u32(fl);
    if probe {
        return Ok(Reply::with(p));
    }
    match which {
        feature::MIGRATION => {
            p.u64(u64::from(
                VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
            ));
        }
        feature::MIG_DEVICE_STATE if get => {
            p.u32(*state as u32).u32(u32::MAX);
        }
        feature::MIG_DEVICE_STATE => {
            let raw = r.u32()?;
            let to = DeviceState::from_raw(raw)
                .ok_or_else(|| einval(format_args!("device state {raw}")))?;
            let path = state
                .path(to)
                .ok_or_else(|| einval(format_args!("no transition from {state:?} to {to:?}")))?;
            for s in path {
                if let Err(e) = m.step(*state, s) {
                    tracing::warn!("migration: {state:?} → {s:?} failed: {e}");
                    *state = DeviceState::Error;
                    return Err(e);
                }
                *state = s;
            }
            // The reply's data_fd is -1: vfio-user moves data with MIG_DATA_READ/WRITE.
            p.u32(*state as u32).u32(u32::MAX);
        }
        feature::DMA_LOGGING_START => {
            // The page size asked for is a hint: the device logs 4 KiB pages and says so.
            let (_page, n, _reserved) = (r.u64()?, r.u32()?, r.u32()?);
            if n as usize > MAX_LOG_RANGES {
                return Err(einval(format_args!("{n} dirty-log ranges")));
            }
            let mut ranges = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let (iova, len) = (r.u64()?, r.u64()?);
                if len == 0 || iova.checked_add(len).is_none() {
                    return Err(einval(format_args!("dirty-log range {iova:#x}+{len:#x}")));
                }
                ranges.push((iova, len));
            }
            // No ranges: log every write.
            if ranges.is_empty() {
                ranges.push((0, u64::MAX));
            }
            m.logging_start(&ranges)?;
            p.u64(LOG_PAGE).u32(n).u32(0);
            for (iova, len) in ranges.iter().take(n as usize) {
                p.u64(*iova).u64(*len);
            }
        }
        feature::DMA_LOGGING_STOP => m.logging_stop()?,
        _ => {
            let (iova, length, page) = (r.u64()?, r.u64()?, r.u64()?);
            let end = iova.checked_add(length).filter(|_| length > 0);
            let bits = length.div_ceil(page.max(1));
            // The bitmap is u64 words: bit n of the range is bit n % 64 of word n / 64.
            let bytes = bits.div_ceil(64) * 8;
            let (Some(end), true) = (end, page.is_power_of_two()) else {
                return Err(einval(format_args!(
                    "dirty-log report of {iova:#x}+{length:#x} in {page}-byte pages"
                )));
            };
            if bytes > MAX_DATA_XFER as u64 || u64::from(argsz) < 32 + bytes {
                return Err(einval(format_args!(
                    "a dirty-log bitmap of {bytes} bytes (argsz {argsz})"
                )));
            }
            let mut bitmap = vec![0u8; bytes as usize];
            for (start, stop) in m.logging_report(iova, length)? {
                let (from, to) = (start.max(iova), stop.min(end));
                if to <= from {
                    continue;
                }
                for bit in (from - iova) / page..=(to - 1 - iova) / page {
                    bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
                }
            }
            p.u64(iova).u64(length).u64(page);
            p.extend_from_slice(&bitmap);
        }
    }
    if get {
        // A GET's reply says how big it is.
        let n = p.len() as u32;
        p[..4].copy_from_slice(&n.to_le_bytes());
    }
    Ok(Reply::with(p))
}
