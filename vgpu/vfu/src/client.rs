//! The client side: one connection to a device server, one request at a time.

use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, vfio_region_sparse_mmap_area,
};
use vm_memory::FileOffset;

use crate::mig::{DeviceState, feature};
use crate::server::{IrqInfo, LOG_PAGE, REGION_INFO_SIZE};
use crate::wire::{self, Header, MAX_DATA_XFER, Message, Put, Reader, Short, cmd, flags};

/// Errors talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket failed or closed.
    #[error("vfio-user connection: {0}")]
    Io(#[from] std::io::Error),
    /// A message could not be received.
    #[error(transparent)]
    Recv(#[from] wire::RecvError),
    /// The server answered a command with an error.
    #[error("the server refused command {command}: {}", std::io::Error::from_raw_os_error(*errno as i32))]
    Refused {
        /// The command.
        command: u16,
        /// Its errno.
        errno: u32,
    },
    /// The server's reply makes no sense.
    #[error("bad reply to command {command}: {why}")]
    Protocol {
        /// The command.
        command: u16,
        /// What was wrong.
        why: String,
    },
}

impl Error {
    /// The errno of a refusal.
    pub fn errno(&self) -> Option<u32> {
        match self {
            Error::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// A region of the device.
#[derive(Debug)]
pub struct Region {
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Its index.
    pub index: u32,
    /// Its size.
    pub size: u64,
    /// The file the server offers for mapping it, and where in that file it starts.
    pub file_offset: Option<FileOffset>,
    /// The parts of it that may be mapped.
    pub sparse_areas: Vec<vfio_region_sparse_mmap_area>,
}

/// A connection to a vfio-user device server.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    next_id: u16,
    regions: Vec<Region>,
}

impl Client {
    /// Connects to the server at `path`, negotiates the version and reads the regions.
    pub fn new(path: &Path) -> Result<Client, Error> {
        Client::from_stream(UnixStream::connect(path)?)
    }

    /// A client on a connected stream.
    pub fn from_stream(stream: UnixStream) -> Result<Client, Error> {
        let mut c = Client {
            stream,
            next_id: 0,
            regions: Vec::new(),
        };
        let caps = serde_json::json!({
            "capabilities": {
                "max_msg_fds": wire::MAX_MSG_FDS,
                "max_data_xfer_size": MAX_DATA_XFER,
            }
        });
        let mut p = Vec::new();
        p.u16(0).u16(1);
        p.extend_from_slice(caps.to_string().as_bytes());
        p.push(0);
        let reply = c.call(cmd::VERSION, &p, &[])?;
        let mut r = Reader::new(&reply.payload);
        let major = r.u16().map_err(short(cmd::VERSION))?;
        if major != 0 {
            return Err(protocol(cmd::VERSION, format!("version {major}")));
        }
        let mut p = Vec::with_capacity(16);
        p.u32(16).u32(0).u32(0).u32(0);
        let info = c.call(cmd::DEVICE_GET_INFO, &p, &[])?;
        let mut r = Reader::new(&info.payload);
        let s = short(cmd::DEVICE_GET_INFO);
        let (_argsz, _flags, nregions) = (
            r.u32().map_err(s)?,
            r.u32().map_err(s)?,
            r.u32().map_err(s)?,
        );
        if nregions > 64 {
            return Err(protocol(
                cmd::DEVICE_GET_INFO,
                format!("{nregions} regions"),
            ));
        }
        for index in 0..nregions {
            let region = c.region_info(index)?;
            c.regions.push(region);
        }
        Ok(c)
    }

    fn region_info(&mut self, index: u32) -> Result<Region, Error> {
        const C: u16 = cmd::DEVICE_GET_REGION_INFO;
        let mut argsz = REGION_INFO_SIZE as u32;
        // Asked again with room for the capabilities if the first answer says it has some.
        for _ in 0..2 {
            let mut p = Vec::new();
            p.u32(argsz).u32(0).u32(index).u32(0).u64(0).u64(0);
            let mut reply = self.call(C, &p, &[])?;
            let mut r = Reader::new(&reply.payload);
            let s = short(C);
            let (full, fl, idx, cap_offset, size, offset) = (
                r.u32().map_err(s)?,
                r.u32().map_err(s)?,
                r.u32().map_err(s)?,
                r.u32().map_err(s)?,
                r.u64().map_err(s)?,
                r.u64().map_err(s)?,
            );
            if full > argsz && argsz == REGION_INFO_SIZE as u32 {
                argsz = full;
                continue;
            }
            let caps = r.rest();
            let sparse_areas = sparse_areas(caps, cap_offset).map_err(|why| protocol(C, why))?;
            let file_offset = reply
                .fds
                .pop()
                .map(|f: File| FileOffset::from_arc(Arc::new(f), offset));
            return Ok(Region {
                flags: fl,
                index: idx,
                size,
                file_offset,
                sparse_areas,
            });
        }
        Err(protocol(C, format!("region {index}'s size keeps changing")))
    }

    /// Region `index`, as the server described it.
    pub fn region(&self, index: u32) -> Option<&Region> {
        self.regions.get(index as usize)
    }

    /// Sends a command and waits for its reply.
    fn call(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> Result<Message, Error> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let h = Header {
            message_id: id,
            command,
            ..Header::default()
        };
        wire::send(&mut self.stream, h, payload, fds)?;
        // Only a region's description comes with a descriptor.
        let reply = wire::recv_with(&mut self.stream, command == cmd::DEVICE_GET_REGION_INFO)?;
        let rh = reply.header;
        if !rh.is_reply() || rh.message_id != id || rh.command != command {
            return Err(protocol(
                command,
                format!(
                    "reply {} to command {} (id {})",
                    rh.message_id, rh.command, id
                ),
            ));
        }
        if rh.flags & flags::ERROR != 0 {
            return Err(Error::Refused {
                command,
                errno: rh.error,
            });
        }
        Ok(reply)
    }

    /// Reads `data.len()` bytes of region `region` at `offset`.
    pub fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        let mut p = Vec::with_capacity(16);
        p.u64(offset).u32(region).u32(data.len() as u32);
        let reply = self.call(cmd::REGION_READ, &p, &[])?;
        let got = reply.payload.get(16..).filter(|d| d.len() == data.len());
        data.copy_from_slice(got.ok_or_else(|| {
            protocol(
                cmd::REGION_READ,
                format!("{} bytes for {}", reply.payload.len(), data.len()),
            )
        })?);
        Ok(())
    }

    /// Writes `data` to region `region` at `offset`.
    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        let mut p = Vec::with_capacity(16 + data.len());
        p.u64(offset).u32(region).u32(data.len() as u32);
        p.extend_from_slice(data);
        self.call(cmd::REGION_WRITE, &p, &[]).map(drop)
    }

    /// Offers `[address, address + size)` for DMA: `fd` from `offset`.
    pub fn dma_map(
        &mut self,
        offset: u64,
        address: u64,
        size: u64,
        fd: RawFd,
    ) -> Result<(), Error> {
        let mut p = Vec::with_capacity(32);
        p.u32(32).u32(3).u64(offset).u64(address).u64(size);
        self.call(cmd::DMA_MAP, &p, &[fd]).map(drop)
    }

    /// Withdraws a DMA region.
    pub fn dma_unmap(&mut self, address: u64, size: u64) -> Result<(), Error> {
        let mut p = Vec::with_capacity(24);
        p.u32(24).u32(0).u64(address).u64(size);
        self.call(cmd::DMA_UNMAP, &p, &[]).map(drop)
    }

    /// Resets the device.
    pub fn reset(&mut self) -> Result<(), Error> {
        self.call(cmd::DEVICE_RESET, &[], &[]).map(drop)
    }

    /// Interrupt index `index`.
    pub fn get_irq_info(&mut self, index: u32) -> Result<IrqInfo, Error> {
        let mut p = Vec::with_capacity(16);
        p.u32(16).u32(0).u32(index).u32(0);
        let reply = self.call(cmd::DEVICE_GET_IRQ_INFO, &p, &[])?;
        let mut r = Reader::new(&reply.payload);
        let s = short(cmd::DEVICE_GET_IRQ_INFO);
        let (_argsz, fl, index, count) = (
            r.u32().map_err(s)?,
            r.u32().map_err(s)?,
            r.u32().map_err(s)?,
            r.u32().map_err(s)?,
        );
        Ok(IrqInfo {
            index,
            flags: fl,
            count,
        })
    }

    /// Sets interrupts `start..start + count` of `index` (eventfds in `fds`).
    pub fn set_irqs(
        &mut self,
        index: u32,
        fl: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> Result<(), Error> {
        let mut p = Vec::with_capacity(20);
        p.u32(20).u32(fl).u32(index).u32(start).u32(count);
        self.call(cmd::DEVICE_SET_IRQS, &p, fds).map(drop)
    }

    fn feature(&mut self, fl: u32, data: &[u8], reply_data: usize) -> Result<Vec<u8>, Error> {
        let mut p = Vec::with_capacity(8 + data.len());
        p.u32((8 + reply_data.max(data.len())) as u32).u32(fl);
        p.extend_from_slice(data);
        let reply = self.call(cmd::DEVICE_FEATURE, &p, &[])?;
        Ok(reply.payload.get(8..).unwrap_or_default().to_vec())
    }

    /// The device's migration flags (`VFIO_MIGRATION_*`); refused where it has none.
    pub fn migration_flags(&mut self) -> Result<u64, Error> {
        let d = self.feature(feature::GET | feature::MIGRATION, &[], 8)?;
        Reader::new(&d).u64().map_err(short(cmd::DEVICE_FEATURE))
    }

    /// The device's migration state.
    pub fn device_state(&mut self) -> Result<DeviceState, Error> {
        let d = self.feature(feature::GET | feature::MIG_DEVICE_STATE, &[], 8)?;
        let raw = Reader::new(&d).u32().map_err(short(cmd::DEVICE_FEATURE))?;
        DeviceState::from_raw(raw)
            .ok_or_else(|| protocol(cmd::DEVICE_FEATURE, format!("state {raw}")))
    }

    /// Moves the device to `to` (the server walks VFIO's arcs).
    pub fn set_device_state(&mut self, to: DeviceState) -> Result<(), Error> {
        let mut d = Vec::with_capacity(8);
        d.u32(to as u32).u32(u32::MAX);
        self.feature(feature::SET | feature::MIG_DEVICE_STATE, &d, 8)
            .map(drop)
    }

    /// Reads at most `max` bytes of the device's migration data; empty: no more (now, in
    /// PRE_COPY; at all, in STOP_COPY).
    pub fn mig_read(&mut self, max: usize) -> Result<Vec<u8>, Error> {
        let max = max.min(MAX_DATA_XFER) as u32;
        let mut p = Vec::with_capacity(8);
        p.u32(8 + max).u32(max);
        let reply = self.call(cmd::MIG_DATA_READ, &p, &[])?;
        let mut r = Reader::new(&reply.payload);
        let s = short(cmd::MIG_DATA_READ);
        let (_argsz, size) = (r.u32().map_err(s)?, r.u32().map_err(s)?);
        let data = r.rest();
        if size > max || size as usize != data.len() {
            return Err(protocol(
                cmd::MIG_DATA_READ,
                format!("{size} bytes said, {} sent", data.len()),
            ));
        }
        Ok(data.to_vec())
    }

    /// Gives the device the next bytes of a state to resume (in steps of at most 1 MiB).
    pub fn mig_write(&mut self, data: &[u8]) -> Result<(), Error> {
        for chunk in data.chunks(MAX_DATA_XFER) {
            let mut p = Vec::with_capacity(8 + chunk.len());
            p.u32(8 + chunk.len() as u32).u32(chunk.len() as u32);
            p.extend_from_slice(chunk);
            self.call(cmd::MIG_DATA_WRITE, &p, &[])?;
        }
        Ok(())
    }

    /// Starts the device's log of its DMA writes into these IOVA ranges.
    pub fn logging_start(&mut self, ranges: &[(u64, u64)]) -> Result<(), Error> {
        let mut d = Vec::with_capacity(16 + 16 * ranges.len());
        d.u64(LOG_PAGE).u32(ranges.len() as u32).u32(0);
        for (iova, len) in ranges {
            d.u64(*iova).u64(*len);
        }
        self.feature(feature::SET | feature::DMA_LOGGING_START, &d, 0)
            .map(drop)
    }

    /// Stops the DMA log.
    pub fn logging_stop(&mut self) -> Result<(), Error> {
        self.feature(feature::SET | feature::DMA_LOGGING_STOP, &[], 0)
            .map(drop)
    }

    /// The 4 KiB pages of `[iova, iova + length)` the device wrote since they were last
    /// reported, by address (reporting clears them). `length` covers at most 32 GiB per call.
    pub fn logging_report(&mut self, iova: u64, length: u64) -> Result<Vec<u64>, Error> {
        let pages = length.div_ceil(LOG_PAGE);
        let bytes = pages.div_ceil(64) * 8;
        let mut d = Vec::with_capacity(24);
        d.u64(iova).u64(length).u64(LOG_PAGE);
        let reply = self.feature(
            feature::GET | feature::DMA_LOGGING_REPORT,
            &d,
            24 + bytes as usize,
        )?;
        let bitmap = reply
            .get(24..)
            .filter(|b| b.len() as u64 == bytes)
            .ok_or_else(|| {
                protocol(
                    cmd::DEVICE_FEATURE,
                    "a dirty-log bitmap of the wrong size".into(),
                )
            })?;
        let mut out = Vec::new();
        for (i, byte) in bitmap.iter().enumerate() {
            for bit in 0..8 {
                let n = (i * 8 + bit) as u64;
                if byte & (1 << bit) != 0 && n < pages {
                    out.push(iova + n * LOG_PAGE);
                }
            }
        }
        Ok(out)
    }
}

fn protocol(command: u16, why: String) -> Error {
    Error::Protocol { command, why }
}

fn short(command: u16) -> impl Fn(Short) -> Error + Copy {
    move |s| protocol(command, s.to_string())
}

/// The mmap-able areas of a region's capability chain (`caps` follows the 32-byte
/// `vfio_region_info`; offsets count from the start of that struct).
fn sparse_areas(caps: &[u8], first: u32) -> Result<Vec<vfio_region_sparse_mmap_area>, String> {
    let mut areas = Vec::new();
    let mut next = first as usize;
    let mut hops = 0;
    while next != 0 {
        hops += 1;
        let at = next
            .checked_sub(REGION_INFO_SIZE)
            .filter(|_| hops <= 16)
            .ok_or_else(|| format!("capability offset {next}"))?;
        let mut r = Reader::new(
            caps.get(at..)
                .ok_or_else(|| format!("capability offset {next} is outside"))?,
        );
        let e = |s: Short| s.to_string();
        let (id, _version, nx) = (
            r.u16().map_err(e)?,
            r.u16().map_err(e)?,
            r.u32().map_err(e)?,
        );
        if u32::from(id) == VFIO_REGION_INFO_CAP_SPARSE_MMAP {
            let (n, _reserved) = (r.u32().map_err(e)?, r.u32().map_err(e)?);
            for _ in 0..n.min(64) {
                areas.push(vfio_region_sparse_mmap_area {
                    offset: r.u64().map_err(e)?,
                    size: r.u64().map_err(e)?,
                });
            }
        }
        next = nx as usize;
    }
    Ok(areas)
}
