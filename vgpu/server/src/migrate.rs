//! An attachment's migration v2 ([`vfu::Migration`]): the vGPU's state as one ordered byte
//! stream, read while it runs (PRE_COPY) and after it stops (STOP_COPY), and written on the
//! other side (RESUMING); and the log of its DMA writes into the client's memory.
//!
//! The stream is a sequence of records (ours: the protocol leaves its content to the
//! device):
//! - `H` `version u32, vram_size u64, contexts u32`: first; the receiver checks its shape.
//! - `V` `offset u64, len u32, bytes`: VRAM contents. The first pass sends every page; each
//!   later pass the pages the engines wrote since they were last sent (the vGPU's own dirty
//!   log), as they were when the pass began. A pass ends with a short read.
//!   Writes the client's CPU makes through its mapping of the aperture are not seen here: the
//!   client (which has them in KVM's log of the BAR) sends those itself.
//! - `S` `len u32, postcard(VgpuState)`: last, only in STOP_COPY, once the vGPU is stopped.
//!
//! The receiver writes `V` records into its VRAM as they come and applies `S` when RESUMING
//! ends; a stream that is cut, out of order or of another shape is refused there and the
//! device stays as it was (the client then resets it).

use std::collections::BTreeSet;
use std::io;
use std::time::Duration;

use vfu::{DeviceState, Migration};
use vgpu::device::{DIRTY_PAGE, MAX_DIRTY_PAGES, VgpuState};

use crate::attach::Attachment;

/// Version of the record stream.
const VERSION: u32 = 1;
/// Most VRAM bytes in one record.
const CHUNK: u64 = 1 << 20;
/// Largest saved vGPU state accepted.
const MAX_STATE: usize = 16 << 20;
/// How long a stop may take (the engines stop at their next workgroup).
const PAUSE_WITHIN: Duration = Duration::from_secs(5);

/// Migration bookkeeping of one attachment.
#[derive(Debug, Default)]
pub(crate) struct MigState {
    /// Whether the stream is being read (PRE_COPY or STOP_COPY).
    saving: bool,
    /// Whether the `H` record went out.
    header_sent: bool,
    /// Next VRAM offset of the first pass; `None` once it is done.
    cursor: Option<u64>,
    /// VRAM pages the engines wrote, not sent since.
    vram: BTreeSet<u64>,
    /// The pages this pass sends: the dirty set when it began. A pass ends with a short
    /// read, so a client that reads until one gets everything written before the pass
    /// began, and nothing of a later pass is left in `out` (bytes there are as old as
    /// the pass).
    pass: BTreeSet<u64>,
    in_pass: bool,
    /// Whether the `S` record is due (STOP_COPY) and whether it went out.
    state_due: bool,
    state_sent: bool,
    /// Bytes produced, not read yet.
    out: Vec<u8>,
    /// The DMA log: its ranges, and the pages written in them, not reported yet: page
    /// addresses, and `[start, end)` ranges wholly taken as written (after the vGPU's log, or
    /// this one, overflowed: memory stays bounded, reports say more).
    dma_ranges: Option<Vec<(u64, u64)>>,
    sys: BTreeSet<u64>,
    sys_all: Vec<(u64, u64)>,
    /// RESUMING: bytes received and not yet a whole record; what has been taken.
    incoming: Vec<u8>,
    header_seen: bool,
    restored: Option<VgpuState>,
    /// Whether this attachment stopped the vGPU, and turned its dirty log on.
    stopped: bool,
    log_on: bool,
}

impl MigState {
    /// Whether a migration state stopped the vGPU (STOP, STOP_COPY, RESUMING).
    pub(crate) fn stopped(&self) -> bool {
        self.stopped
    }
}

fn einval(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

impl Attachment {
    /// Takes what the vGPU's log recorded into the pending sets, and turns the log on or off
    /// as something needs it.
    fn collect_dirty(&mut self) {
        let vgpu = self.vgpu();
        let d = vgpu.take_dirty_log();
        let vram_pages = vgpu.vram().size().div_ceil(DIRTY_PAGE);
        let m = &mut self.mig;
        if m.saving {
            if d.all {
                m.vram.extend(0..vram_pages);
            }
            m.vram.extend(d.vram);
        }
        if let Some(ranges) = &m.dma_ranges {
            m.sys
                .extend(d.sys.into_iter().map(|p| p * DIRTY_PAGE).filter(|a| {
                    ranges
                        .iter()
                        .any(|&(iova, len)| *a >= iova && *a - iova < len)
                }));
            if d.all || m.sys.len() as u64 > MAX_DIRTY_PAGES {
                m.sys.clear();
                m.sys_all = ranges
                    .iter()
                    .map(|&(iova, len)| (iova, iova.saturating_add(len)))
                    .collect();
            }
        }
    }

    fn set_logging(&mut self) {
        let on = self.mig.saving || self.mig.dma_ranges.is_some();
        match (on, self.mig.log_on) {
            (true, false) => self.vgpu().start_dirty_log(),
            (false, true) => self.vgpu().stop_dirty_log(),
            _ => {}
        }
        self.mig.log_on = on;
    }

    fn begin_saving(&mut self) {
        if !self.mig.saving {
            self.collect_dirty();
            let m = &mut self.mig;
            m.saving = true;
            m.header_sent = false;
            m.cursor = Some(0);
            m.vram.clear();
            m.pass.clear();
            m.in_pass = false;
            m.out.clear();
            m.state_sent = false;
        }
        self.set_logging();
    }

    fn end_saving(&mut self) {
        let m = &mut self.mig;
        m.saving = false;
        m.state_due = false;
        m.cursor = None;
        m.vram.clear();
        m.pass.clear();
        m.in_pass = false;
        m.out.clear();
        self.set_logging();
    }

    fn stop(&mut self) -> io::Result<()> {
        if !self.mig.stopped {
            self.vgpu()
                .pause(PAUSE_WITHIN)
                .map_err(|e| io::Error::new(io::ErrorKind::TimedOut, e))?;
            self.mig.stopped = true;
        }
        Ok(())
    }

    fn start(&mut self) {
        if self.mig.stopped {
            self.vgpu().resume();
            self.mig.stopped = false;
        }
    }

    /// Adds records to `out` until it holds `want` bytes or nothing more is due now.
    fn produce(&mut self, want: usize) -> io::Result<()> {
        let vram_size = self.vgpu().vram().size();
        if !self.mig.header_sent {
            let contexts = self.vgpu().contexts();
            let o = &mut self.mig.out;
            o.push(b'H');
            o.extend_from_slice(&VERSION.to_le_bytes());
            o.extend_from_slice(&vram_size.to_le_bytes());
            o.extend_from_slice(&contexts.to_le_bytes());
            self.mig.header_sent = true;
        }
        if !self.mig.in_pass {
            self.collect_dirty();
            self.mig.pass = std::mem::take(&mut self.mig.vram);
            self.mig.in_pass = true;
        }
        while self.mig.out.len() < want {
            let (at, len) = if let Some(c) = self.mig.cursor {
                let len = CHUNK.min(vram_size - c);
                self.mig.cursor = Some(c + len).filter(|&n| n < vram_size);
                (c, len)
            } else {
                match self.mig.pass.pop_first() {
                    Some(first) => {
                        // A run of consecutive pages, up to one chunk.
                        let mut last = first;
                        while (last + 1 - first) * DIRTY_PAGE < CHUNK
                            && self.mig.pass.remove(&(last + 1))
                        {
                            last += 1;
                        }
                        let at = first * DIRTY_PAGE;
                        (
                            at,
                            ((last + 1) * DIRTY_PAGE).min(vram_size).saturating_sub(at),
                        )
                    }
                    None if self.mig.state_due && !self.mig.state_sent => {
                        let state = self.vgpu().save().map_err(io::Error::other)?;
                        let bytes = postcard::to_stdvec(&state).map_err(io::Error::other)?;
                        let o = &mut self.mig.out;
                        o.push(b'S');
                        o.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                        o.extend_from_slice(&bytes);
                        self.mig.state_sent = true;
                        continue;
                    }
                    None => return Ok(()),
                }
            };
            if len == 0 {
                continue;
            }
            let mut buf = vec![0u8; len as usize];
            self.vgpu()
                .vram()
                .read(at, &mut buf)
                .map_err(|f| io::Error::other(format!("VRAM read at {at:#x}: {f:?}")))?;
            let o = &mut self.mig.out;
            o.push(b'V');
            o.extend_from_slice(&at.to_le_bytes());
            o.extend_from_slice(&(len as u32).to_le_bytes());
            o.extend_from_slice(&buf);
        }
        Ok(())
    }

    /// Takes the whole records at the front of `incoming`.
    fn consume(&mut self) -> io::Result<()> {
        let vram_size = self.vgpu().vram().size();
        loop {
            let b = &self.mig.incoming;
            let Some(&kind) = b.first() else {
                return Ok(());
            };
            let field = |at: usize, n: usize| b.get(at..at + n);
            let u32_at =
                |at| field(at, 4).map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()));
            let u64_at =
                |at| field(at, 8).map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()));
            let taken = match kind {
                b'H' => {
                    let (Some(v), Some(size), Some(ctx)) = (u32_at(1), u64_at(5), u32_at(13))
                    else {
                        return Ok(());
                    };
                    if v != VERSION || size != vram_size || ctx != self.vgpu().contexts() {
                        return Err(einval(format_args!(
                            "a state of version {v}, {size:#x} bytes of VRAM and {ctx} contexts; \
                             this vGPU has version {VERSION}, {vram_size:#x} and {}",
                            self.vgpu().contexts()
                        )));
                    }
                    self.mig.header_seen = true;
                    17
                }
                _ if !self.mig.header_seen => {
                    return Err(einval("the state does not start with its header"));
                }
                b'V' => {
                    let (Some(at), Some(len)) = (u64_at(1), u32_at(9)) else {
                        return Ok(());
                    };
                    if u64::from(len) > CHUNK
                        || at.checked_add(len.into()).is_none_or(|e| e > vram_size)
                    {
                        return Err(einval(format_args!("VRAM record {at:#x}+{len:#x}")));
                    }
                    let Some(bytes) = field(13, len as usize) else {
                        return Ok(());
                    };
                    self.vgpu()
                        .vram()
                        .write(at, bytes)
                        .map_err(|f| io::Error::other(format!("VRAM write at {at:#x}: {f:?}")))?;
                    13 + len as usize
                }
                b'S' => {
                    let Some(len) = u32_at(1) else {
                        return Ok(());
                    };
                    if len as usize > MAX_STATE || self.mig.restored.is_some() {
                        return Err(einval("a second or oversized vGPU state record"));
                    }
                    let Some(bytes) = field(5, len as usize) else {
                        return Ok(());
                    };
                    let state: VgpuState = postcard::from_bytes(bytes)
                        .map_err(|e| einval(format_args!("the vGPU state: {e}")))?;
                    self.mig.restored = Some(state);
                    5 + len as usize
                }
                k => return Err(einval(format_args!("unknown record {k:#x} in the state"))),
            };
            self.mig.incoming.drain(..taken);
        }
    }
}

impl Migration for Attachment {
    fn step(&mut self, from: DeviceState, to: DeviceState) -> io::Result<()> {
        use DeviceState::*;
        match (from, to) {
            (Running, Stop) => self.stop()?,
            (Stop, Running) => self.start(),
            (Running, PreCopy) => self.begin_saving(),
            (PreCopy, Running) => self.end_saving(),
            (PreCopy, StopCopy) | (Stop, StopCopy) => {
                self.stop()?;
                self.begin_saving();
                self.mig.state_due = true;
            }
            (StopCopy, Stop) => self.end_saving(),
            (Stop, Resuming) => {
                let m = &mut self.mig;
                m.incoming.clear();
                m.header_seen = false;
                m.restored = None;
            }
            (Resuming, Stop) => {
                let m = &mut self.mig;
                if !m.incoming.is_empty() {
                    return Err(einval(format_args!(
                        "the state ends inside a record ({} bytes left over)",
                        m.incoming.len()
                    )));
                }
                let state = m
                    .restored
                    .take()
                    .ok_or_else(|| einval("the state has no vGPU record"))?;
                self.vgpu().restore(&state).map_err(einval)?;
            }
            (f, t) => return Err(einval(format_args!("{f:?} → {t:?}"))),
        }
        Ok(())
    }

    fn read(&mut self, max: usize) -> io::Result<Vec<u8>> {
        self.produce(max)?;
        let n = max.min(self.mig.out.len());
        if n < max {
            // A short read ends the pass; the next read begins another.
            self.mig.in_pass = false;
        }
        Ok(self.mig.out.drain(..n).collect())
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.mig.incoming.extend_from_slice(data);
        self.consume()
    }

    fn reset(&mut self) {
        self.mig.dma_ranges = None;
        self.end_saving();
        self.start();
        self.mig = MigState::default();
    }

    fn logging_start(&mut self, ranges: &[(u64, u64)]) -> io::Result<()> {
        if self.mig.dma_ranges.is_some() {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.collect_dirty();
        self.mig.sys.clear();
        self.mig.sys_all.clear();
        self.mig.dma_ranges = Some(ranges.to_vec());
        self.set_logging();
        Ok(())
    }

    fn logging_stop(&mut self) -> io::Result<()> {
        if self.mig.dma_ranges.take().is_none() {
            return Err(einval("the DMA log is not on"));
        }
        self.mig.sys.clear();
        self.mig.sys_all.clear();
        self.collect_dirty();
        self.set_logging();
        Ok(())
    }

    fn logging_report(&mut self, iova: u64, length: u64) -> io::Result<Vec<(u64, u64)>> {
        if self.mig.dma_ranges.is_none() {
            return Err(einval("the DMA log is not on"));
        }
        self.collect_dirty();
        let end = iova.saturating_add(length);
        let mut out = take_ranges(&mut self.mig.sys_all, iova, end);
        let pages: Vec<u64> = self.mig.sys.range(iova..end).copied().collect();
        for p in pages {
            self.mig.sys.remove(&p);
            match out.last_mut() {
                Some((_, e)) if *e == p => *e += DIRTY_PAGE,
                _ => out.push((p, p + DIRTY_PAGE)),
            }
        }
        Ok(out)
    }
}

/// Removes `[lo, hi)` from the ranges `all` (each `[start, end)`); returns the parts removed.
fn take_ranges(all: &mut Vec<(u64, u64)>, lo: u64, hi: u64) -> Vec<(u64, u64)> {
    let mut taken = Vec::new();
    let mut kept = Vec::with_capacity(all.len() + 1);
    for &(s, e) in all.iter() {
        let (a, b) = (s.max(lo), e.min(hi));
        if a >= b {
            kept.push((s, e));
            continue;
        }
        taken.push((a, b));
        if s < a {
            kept.push((s, a));
        }
        if b < e {
            kept.push((b, e));
        }
    }
    *all = kept;
    taken
}

#[cfg(test)]
mod tests {
    use super::take_ranges;

    #[test]
    fn reported_ranges_are_taken_out_whole_or_in_part() {
        let mut all = vec![(0, 100), (200, 300)];
        assert_eq!(take_ranges(&mut all, 50, 250), [(50, 100), (200, 250)]);
        assert_eq!(all, [(0, 50), (250, 300)]);
        assert_eq!(take_ranges(&mut all, 0, 1000), [(0, 50), (250, 300)]);
        assert!(all.is_empty());
        let mut one = vec![(0, 100)];
        assert_eq!(take_ranges(&mut one, 10, 20), [(10, 20)]);
        assert_eq!(one, [(0, 10), (20, 100)]);
    }
}
