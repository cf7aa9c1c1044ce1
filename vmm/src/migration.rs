//! Live migration of a VM with in-process vGPUs (issue #22): pre-copy of guest RAM and VRAM
//! while the guest runs, then a short stop for the last dirty pages and the device state. See
//! docs/architecture.md, "Live migration".
//!
//! The stream, both ways, is frames: `kind u8, index u32, addr u64, len u64`, then `len`
//! bytes. The source sends `HELLO` (the VM's shape and fingerprint, JSON), waits for `READY`
//! (the destination built a VM of that shape), sends `RAM` (`addr`: guest-physical) and `VRAM`
//! (`index`: vGPU, `addr`: offset) pages, then `STATE` (a snapshot container without memory),
//! and waits for `RESUMED`. Either side may send `ERROR` (a UTF-8 reason) instead. Every length
//! and address is checked against limits and the VM's memory before use.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{VmConfig, VmSource};
use crate::control::Controls;
use crate::snapshot::{Fingerprint, Snapshot};
use crate::vm_snapshot::{Machine, Restore};
use crate::{Vm, VmError};

const HELLO: u8 = 1;
const RAM: u8 = 2;
const VRAM: u8 = 3;
const STATE: u8 = 4;
/// A vGPU over vfio-user: `index` its number; the server's migration data (opaque here).
const DEVICE: u8 = 5;
/// A vGPU over vfio-user: VRAM the guest's CPU wrote through this VMM's mapping (the
/// server cannot see those writes), `addr` the offset.
const USER_VRAM: u8 = 6;
const READY: u8 = 10;
const RESUMED: u8 = 11;
const ERROR: u8 = 12;

/// The protocol this code speaks (in `HELLO`).
const VERSION: u32 = 1;
/// Page size of every dirty log.
const PAGE: u64 = 4096;
/// Most bytes of memory in one frame.
const MAX_CHUNK: u64 = 4 << 20;
/// Most bytes of a `HELLO`, `ERROR` or `STATE` frame.
const MAX_HELLO: u64 = 64 << 10;
const MAX_STATE: u64 = 64 << 20;
/// Longest wait for the peer's next frame, or to send one.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Pre-copy stops when a round finds at most this many dirty pages (1 MiB), or after
/// `MAX_ROUNDS` rounds.
const STOP_PAGES: usize = 256;
const MAX_ROUNDS: u32 = 12;

/// Where a migration goes: `unix:PATH` or `tcp:IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A UNIX socket.
    Unix(PathBuf),
    /// A TCP address (numeric: `tessera vmctl` resolves host names).
    Tcp(SocketAddr),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Unix(p) => write!(f, "unix:{}", p.display()),
            Peer::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for Peer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            return Ok(Peer::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return a
                .parse()
                .map(Peer::Tcp)
                .map_err(|_| format!("{s:?}: expected tcp:IP:PORT"));
        }
        Err(format!("{s:?}: expected unix:PATH or tcp:HOST:PORT"))
    }
}

/// A connected stream of either kind.
trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

fn timeouts<S>(s: &S, set: impl Fn(&S, Option<Duration>) -> std::io::Result<()>) {
    let _ = set(s, Some(IO_TIMEOUT));
}

fn connect(peer: &Peer) -> std::io::Result<Box<dyn Stream>> {
    Ok(match peer {
        Peer::Unix(p) => {
            let s = UnixStream::connect(p)?;
            timeouts(&s, UnixStream::set_read_timeout);
            timeouts(&s, UnixStream::set_write_timeout);
            Box::new(s)
        }
        Peer::Tcp(a) => {
            let s = TcpStream::connect(a)?;
            timeouts(&s, TcpStream::set_read_timeout);
            timeouts(&s, TcpStream::set_write_timeout);
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
    })
}

/// Listens at `peer` and accepts one connection.
fn accept(peer: &Peer) -> std::io::Result<Box<dyn Stream>> {
    Ok(match peer {
        Peer::Unix(p) => {
            if std::fs::symlink_metadata(p)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                && UnixStream::connect(p).is_err()
            {
                std::fs::remove_file(p)?;
            }
            let l = UnixListener::bind(p)?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
            let accepted = l.accept();
            let _ = std::fs::remove_file(p);
            let (s, _) = accepted?;
            timeouts(&s, UnixStream::set_read_timeout);
            timeouts(&s, UnixStream::set_write_timeout);
            Box::new(s)
        }
        Peer::Tcp(a) => {
            let (s, from) = TcpListener::bind(a)?.accept()?;
            tracing::info!(%from, "incoming migration");
            timeouts(&s, TcpStream::set_read_timeout);
            timeouts(&s, TcpStream::set_write_timeout);
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
    })
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    index: u32,
    addr: u64,
    payload: Vec<u8>,
}

fn send(w: &mut dyn Stream, kind: u8, index: u32, addr: u64, payload: &[u8]) -> Result<(), String> {
    let mut head = [0u8; 21];
    head[0] = kind;
    head[1..5].copy_from_slice(&index.to_le_bytes());
    head[5..13].copy_from_slice(&addr.to_le_bytes());
    head[13..21].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&head)
        .and_then(|()| w.write_all(payload))
        .map_err(|e| format!("cannot send to the peer: {e}"))
}

fn recv(r: &mut dyn Stream) -> Result<Frame, String> {
    let mut head = [0u8; 21];
    r.read_exact(&mut head)
        .map_err(|e| format!("the peer went away or said nothing: {e}"))?;
    let kind = head[0];
    let index = u32::from_le_bytes(head[1..5].try_into().unwrap_or_default());
    let addr = u64::from_le_bytes(head[5..13].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(head[13..21].try_into().unwrap_or_default());
    let limit = match kind {
        RAM | VRAM | DEVICE | USER_VRAM => MAX_CHUNK,
        STATE => MAX_STATE,
        HELLO | ERROR => MAX_HELLO,
        READY | RESUMED => 0,
        other => return Err(format!("the peer sent a frame of unknown kind {other}")),
    };
    if len > limit {
        return Err(format!(
            "the peer sent a frame of kind {kind} with {len} bytes (at most {limit})"
        ));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .map_err(|e| format!("the peer went away in the middle of a frame: {e}"))?;
    if kind == ERROR {
        return Err(format!(
            "the peer failed: {}",
            String::from_utf8_lossy(&payload)
        ));
    }
    Ok(Frame {
        kind,
        index,
        addr,
        payload,
    })
}

fn expect(r: &mut dyn Stream, kind: u8, what: &str) -> Result<Frame, String> {
    let f = recv(r)?;
    if f.kind != kind {
        return Err(format!(
            "the peer sent frame kind {} instead of {what}",
            f.kind
        ));
    }
    Ok(f)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hello {
    version: u32,
    machine: Machine,
    fingerprint: Fingerprint,
}

/// What a migration did (the source's reply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Where the VM went.
    pub peer: String,
    /// Pre-copy rounds after the first full copy.
    pub rounds: u32,
    /// Bytes sent (memory and state).
    pub bytes: u64,
    /// Pages sent while the VM was stopped.
    pub stopped_pages: u64,
    /// From the start to the destination's `RESUMED` (ms).
    pub total_ms: u64,
    /// From the pause to the destination's `RESUMED` (µs): the guest's downtime (the
    /// destination's vCPU threads start right after).
    pub downtime_us: u64,
    /// Where the downtime went (µs): stopping the vCPUs and vGPUs; reading the last dirty
    /// logs and sending those pages; reading and sending the device state; the destination
    /// putting it in and answering.
    pub pause_us: u64,
    pub last_copy_us: u64,
    pub state_us: u64,
    pub apply_us: u64,
}

/// Dirty pages of one round: guest-physical RAM pages, per in-process vGPU its VRAM pages,
/// and per vGPU over vfio-user the VRAM pages the guest's CPU wrote.
#[derive(Default)]
struct Dirty {
    ram: std::collections::BTreeSet<u64>,
    vram: Vec<std::collections::BTreeSet<u64>>,
    user_vram: Vec<std::collections::BTreeSet<u64>>,
}

impl Dirty {
    fn count(&self) -> usize {
        self.ram.len()
            + self
                .vram
                .iter()
                .chain(&self.user_vram)
                .map(|v| v.len())
                .sum::<usize>()
    }

    fn merge(&mut self, other: Dirty) {
        self.ram.extend(other.ram);
        for (a, b) in self.vram.iter_mut().zip(other.vram) {
            a.extend(b);
        }
        for (a, b) in self.user_vram.iter_mut().zip(other.user_vram) {
            a.extend(b);
        }
    }
}

/// Contiguous runs of `pages` as (first page, count), each at most [`MAX_CHUNK`].
fn runs(pages: &std::collections::BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((first, n)) if *first + *n == p && (*n + 1) * PAGE <= MAX_CHUNK => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// The source's side, on the thread of the control socket.
struct Source<'a> {
    c: &'a Controls,
    conn: Box<dyn Stream>,
    bytes: u64,
    buf: Vec<u8>,
}

impl Source<'_> {
    fn logging(&self, on: bool) -> Result<(), String> {
        let s = &self.c.snapshot;
        s.ram_slots
            .set_dirty_logging(on)
            .map_err(|e| format!("KVM dirty log of RAM: {e}"))?;
        s.mapper
            .set_dirty_logging(on)
            .map_err(|e| format!("KVM dirty log of VRAM: {e}"))?;
        for v in &s.vgpus {
            if on {
                v.start_dirty_log();
            } else {
                v.stop_dirty_log();
            }
        }
        // A vGPU over vfio-user logs its DMA into guest RAM, and pre-copies its VRAM in its
        // migration data (PRE_COPY).
        let ranges = self.ram_regions();
        for u in &s.user {
            if on {
                u.dma_logging(Some(&ranges))?;
                u.set_state(vfu::DeviceState::PreCopy)?;
            } else if let Err(e) = u.dma_logging(None) {
                tracing::warn!("{e}");
            }
        }
        Ok(())
    }

    fn ram_regions(&self) -> Vec<(u64, u64)> {
        self.c
            .snapshot
            .ram_memory
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }

    /// One pass of a vfio-user vGPU's migration data: read until a short read (the server
    /// ends a pass there, so nothing read later is older than what this round sends). A pass
    /// holds at most all of VRAM and the vGPU's state: a server that goes on past that is
    /// refused rather than followed forever.
    fn send_device(&mut self, k: usize) -> Result<(), String> {
        const STEP: usize = MAX_CHUNK as usize / 4;
        let user = &self.c.snapshot.user[k];
        let limit = user.vram().len() + MAX_STATE;
        let mut passed = 0u64;
        loop {
            let data = user.read(STEP)?;
            passed += data.len() as u64;
            if passed > limit {
                return Err(format!(
                    "vGPU {k}'s server sent more than {limit} bytes in one pass of its state"
                ));
            }
            if !data.is_empty() {
                send(&mut *self.conn, DEVICE, k as u32, 0, &data)?;
                self.bytes += data.len() as u64;
            }
            if data.len() < STEP {
                return Ok(());
            }
        }
    }

    fn send_user_vram(&mut self, k: usize, offset: u64, len: u64) -> Result<(), String> {
        let vram = self.c.snapshot.user[k].vram();
        let len = len.min(vram.len().saturating_sub(offset));
        self.buf.resize(len as usize, 0);
        vram.read_slice(&mut self.buf, vm_memory::MemoryRegionAddress(offset))
            .map_err(|e| format!("cannot read VRAM at {offset:#x}: {e}"))?;
        send(&mut *self.conn, USER_VRAM, k as u32, offset, &self.buf)?;
        self.bytes += len;
        Ok(())
    }

    /// Everything written since the last call: KVM's logs (the guest's CPU) and each vGPU's
    /// (its engines).
    fn collect(&self) -> Result<Dirty, String> {
        let s = &self.c.snapshot;
        let mut d = Dirty {
            ram: s
                .ram_slots
                .take_dirty()
                .map_err(|e| format!("KVM dirty log of RAM: {e}"))?
                .into_iter()
                .collect(),
            vram: vec![Default::default(); s.vgpus.len()],
            user_vram: vec![Default::default(); s.user.len()],
        };
        let bars = s
            .mapper
            .take_dirty()
            .map_err(|e| format!("KVM dirty log of VRAM: {e}"))?;
        for (i, v) in s.vgpus.iter().enumerate() {
            let host = match v.vram().aperture() {
                vgpu::backend::Aperture::Mapped { memory, .. } => Some(memory.host_addr()),
                vgpu::backend::Aperture::Trapped => None,
            };
            for (addr, pages) in &bars {
                if Some(*addr) == host {
                    d.vram[i].extend(pages);
                }
            }
            let gpu = v.take_dirty_log();
            if gpu.all {
                // The vGPU's log overflowed: everything it can reach is taken as written.
                for r in s.ram_memory.iter() {
                    let first = r.start_addr().0 / PAGE;
                    d.ram.extend(first..first + r.len().div_ceil(PAGE));
                }
                d.vram[i].extend(0..v.vram().size().div_ceil(PAGE));
            }
            d.ram
                .extend(gpu.sys.iter().map(|p| p * vgpu::device::DIRTY_PAGE / PAGE));
            d.vram[i].extend(gpu.vram);
        }
        let ranges = self.ram_regions();
        for (k, u) in s.user.iter().enumerate() {
            let host = u.vram().as_ptr() as u64;
            for (addr, pages) in &bars {
                if *addr == host {
                    d.user_vram[k].extend(pages);
                }
            }
            for &(start, len) in &ranges {
                d.ram
                    .extend(u.dma_dirty(start, len)?.into_iter().map(|a| a / PAGE));
            }
        }
        Ok(d)
    }

    fn send_ram(&mut self, gpa: u64, len: u64) -> Result<(), String> {
        self.buf.resize(len as usize, 0);
        self.c
            .snapshot
            .ram_memory
            .read_slice(&mut self.buf, GuestAddress(gpa))
            .map_err(|e| format!("cannot read guest RAM at {gpa:#x}: {e}"))?;
        send(&mut *self.conn, RAM, 0, gpa, &self.buf)?;
        self.bytes += len;
        Ok(())
    }

    fn send_vram(&mut self, i: usize, offset: u64, len: u64) -> Result<(), String> {
        let vram = self.c.snapshot.vgpus[i].vram().clone();
        let len = len.min(vram.size().saturating_sub(offset));
        self.buf.resize(len as usize, 0);
        vram.read(offset, &mut self.buf)
            .map_err(|f| format!("cannot read VRAM at {offset:#x}: fault {:#x}", f.code))?;
        send(&mut *self.conn, VRAM, i as u32, offset, &self.buf)?;
        self.bytes += len;
        Ok(())
    }

    /// All of RAM and every VRAM.
    fn send_all(&mut self) -> Result<(), String> {
        let regions: Vec<(u64, u64)> = self
            .c
            .snapshot
            .ram_memory
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        for (start, len) in regions {
            let mut at = 0;
            while at < len {
                let n = (len - at).min(MAX_CHUNK);
                self.send_ram(start + at, n)?;
                at += n;
            }
        }
        for i in 0..self.c.snapshot.vgpus.len() {
            let size = self.c.snapshot.vgpus[i].vram().size();
            let mut at = 0;
            while at < size {
                let n = (size - at).min(MAX_CHUNK);
                self.send_vram(i, at, n)?;
                at += n;
            }
        }
        // A vfio-user vGPU's first pass is all of its VRAM.
        for k in 0..self.c.snapshot.user.len() {
            self.send_device(k)?;
        }
        Ok(())
    }

    fn send_dirty(&mut self, d: &Dirty) -> Result<(), String> {
        for (first, n) in runs(&d.ram) {
            self.send_ram(first * PAGE, n * PAGE)?;
        }
        for (i, pages) in d.vram.iter().enumerate() {
            for (first, n) in runs(pages) {
                self.send_vram(i, first * PAGE, n * PAGE)?;
            }
        }
        for (k, pages) in d.user_vram.iter().enumerate() {
            for (first, n) in runs(pages) {
                self.send_user_vram(k, first * PAGE, n * PAGE)?;
            }
            self.send_device(k)?;
        }
        Ok(())
    }
}

/// Migrates the VM behind `c` to `peer`: pre-copy while it runs, then stop, send the rest and
/// the state, and wait for the destination to take over. On success the caller ends this VM;
/// on an error the VM runs on here as before (resumed if this paused it).
pub fn send_vm(c: &Controls, peer: &Peer) -> Result<Report, String> {
    let started = Instant::now();
    if c.gate.status().0 {
        return Err("the VM is paused: resume it, a migration pauses it itself".into());
    }
    let conn = connect(peer).map_err(|e| format!("cannot connect to {peer}: {e}"))?;
    let mut src = Source {
        c,
        conn,
        bytes: 0,
        buf: Vec::new(),
    };
    let hello = serde_json::to_vec(&Hello {
        version: VERSION,
        machine: c.snapshot.machine.clone(),
        fingerprint: c.snapshot.fingerprint.clone(),
    })
    .map_err(|e| e.to_string())?;
    send(&mut *src.conn, HELLO, 0, 0, &hello)?;
    expect(&mut *src.conn, READY, "READY")?;
    src.logging(true)?;
    let mut paused = false;
    let result = (|| -> Result<Report, String> {
        // Everything once, then what was written meanwhile, until little is.
        src.send_all()?;
        let mut rounds = 0;
        let mut pending = src.collect()?;
        while pending.count() > STOP_PAGES && rounds < MAX_ROUNDS {
            src.send_dirty(&pending)?;
            rounds += 1;
            pending = src.collect()?;
        }
        let stopped = Instant::now();
        c.pause()?;
        paused = true;
        // vGPUs over vfio-user stop here (PRE_COPY → STOP_COPY): their last pass ends with
        // their state.
        for u in &c.snapshot.user {
            u.set_state(vfu::DeviceState::StopCopy)?;
        }
        let us = |t: Instant| t.elapsed().as_micros() as u64;
        let pause_us = us(stopped);
        let t = Instant::now();
        pending.merge(src.collect()?);
        let stopped_pages = pending.count() as u64;
        src.send_dirty(&pending)?;
        let last_copy_us = us(t);
        let t = Instant::now();
        let sections = c.snapshot.sections(&c.gate).map_err(|e| e.to_string())?;
        let mut state = Vec::new();
        Snapshot {
            fingerprint: c.snapshot.fingerprint.clone(),
            sections: sections.into_iter().collect(),
        }
        .write(&mut state)
        .map_err(|e| e.to_string())?;
        send(&mut *src.conn, STATE, 0, 0, &state)?;
        src.bytes += state.len() as u64;
        let state_us = us(t);
        let t = Instant::now();
        expect(&mut *src.conn, RESUMED, "RESUMED")?;
        let apply_us = us(t);
        Ok(Report {
            peer: peer.to_string(),
            rounds,
            bytes: src.bytes,
            stopped_pages,
            total_ms: started.elapsed().as_millis() as u64,
            downtime_us: us(stopped),
            pause_us,
            last_copy_us,
            state_us,
            apply_us,
        })
    })();
    if let Err(e) = src.logging(false) {
        tracing::warn!("{e}");
    }
    if result.is_err() {
        let _ = send(&mut *src.conn, ERROR, 0, 0, b"the source gave up");
        if paused {
            c.resume();
        } else {
            // Out of PRE_COPY: the vGPUs over vfio-user run on.
            for u in &c.snapshot.user {
                if let Err(e) = u.set_state(vfu::DeviceState::Running) {
                    tracing::error!("{e}");
                }
            }
        }
    }
    result
}

/// The destination's side: listens at `peer`, builds a VM of the shape the source announces
/// (`host`'s host-side options), fills its memory, puts the state in, and returns it ready to
/// run. A peer that disconnects, sends garbage or a VM this host cannot run ends it with an
/// error before the VM ever runs.
pub fn receive_vm(peer: &Peer, host: &VmConfig) -> Result<Vm, VmError> {
    let err = |e: String| VmError::Migration(e);
    let mut conn = accept(peer).map_err(|e| err(format!("cannot receive at {peer}: {e}")))?;
    let result = (|| -> Result<Vm, VmError> {
        let f = expect(&mut *conn, HELLO, "HELLO").map_err(err)?;
        let hello: Hello = serde_json::from_slice(&f.payload)
            .map_err(|e| err(format!("the source's HELLO does not decode: {e}")))?;
        if hello.version != VERSION {
            return Err(err(format!(
                "the source speaks migration version {}, this Tessera {VERSION}",
                hello.version
            )));
        }
        let config = hello
            .machine
            .into_config(host, VmSource::Migration)
            .map_err(|e| err(e.to_string()))?;
        let mut vm = Vm::new(&config)?;
        crate::snapshot::check_fingerprint(&hello.fingerprint, vm.fingerprint())
            .map_err(|e| err(e.to_string()))?;
        // vGPUs over vfio-user take their state as migration data (RESUMING).
        let user = vm.user_devices().to_vec();
        for u in &user {
            u.set_state(vfu::DeviceState::Resuming).map_err(err)?;
        }
        send(&mut *conn, READY, 0, 0, &[]).map_err(err)?;
        let vgpus = vm.vgpus().to_vec();
        let memory = vm.guest_memory().clone();
        loop {
            let f = recv(&mut *conn).map_err(err)?;
            match f.kind {
                RAM => memory
                    .write_slice(&f.payload, GuestAddress(f.addr))
                    .map_err(|_| {
                        err(format!(
                            "the source sent {} bytes of RAM at {:#x}, outside guest RAM",
                            f.payload.len(),
                            f.addr
                        ))
                    })?,
                VRAM => {
                    let vram = vgpus
                        .get(f.index as usize)
                        .ok_or_else(|| err(format!("the source sent VRAM of vGPU {}", f.index)))?
                        .vram();
                    let fits = f
                        .addr
                        .checked_add(f.payload.len() as u64)
                        .is_some_and(|e| e <= vram.size());
                    if !fits {
                        return Err(err(format!(
                            "the source sent {} bytes of VRAM at {:#x}, past its end",
                            f.payload.len(),
                            f.addr
                        )));
                    }
                    vram.write(f.addr, &f.payload)
                        .map_err(|_| err("cannot write VRAM".into()))?;
                }
                DEVICE => user
                    .get(f.index as usize)
                    .ok_or_else(|| err(format!("the source sent the state of vGPU {}", f.index)))?
                    .write(&f.payload)
                    .map_err(err)?,
                USER_VRAM => {
                    let vram = user
                        .get(f.index as usize)
                        .ok_or_else(|| err(format!("the source sent VRAM of vGPU {}", f.index)))?
                        .vram();
                    vram.write_slice(&f.payload, vm_memory::MemoryRegionAddress(f.addr))
                        .map_err(|_| {
                            err(format!(
                                "the source sent {} bytes of VRAM at {:#x}, past its end",
                                f.payload.len(),
                                f.addr
                            ))
                        })?;
                }
                STATE => {
                    let snap = Snapshot::read(&f.payload[..], Some(vm.fingerprint()))
                        .map_err(|e| err(format!("the source's state: {e}")))?;
                    let r = Restore::incoming(snap, vm.fingerprint())?;
                    vm.apply(&r)?;
                    // The servers check and apply their vGPUs' states (RESUMING → STOP),
                    // then run them.
                    for u in &user {
                        u.set_state(vfu::DeviceState::Running).map_err(err)?;
                    }
                    send(&mut *conn, RESUMED, 0, 0, &[]).map_err(err)?;
                    return Ok(vm);
                }
                other => {
                    return Err(err(format!(
                        "the source sent frame kind {other} in the middle of the copy"
                    )));
                }
            }
        }
    })();
    if let Err(e) = &result {
        let _ = send(&mut *conn, ERROR, 0, 0, e.to_string().as_bytes());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<Peer>(),
            Ok(Peer::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:7000".parse::<Peer>(),
            Ok(Peer::Tcp("127.0.0.1:7000".parse().unwrap()))
        );
        for bad in ["unix:", "tcp:nowhere", "tcp:1.2.3.4", "file:/x", ""] {
            assert!(bad.parse::<Peer>().is_err(), "{bad}");
        }
    }

    #[test]
    fn dirty_pages_go_in_runs_of_at_most_a_chunk() {
        let pages: std::collections::BTreeSet<u64> = [1, 2, 3, 7, 9, 10]
            .into_iter()
            .chain(100..100 + 2048)
            .collect();
        assert_eq!(
            runs(&pages),
            vec![(1, 3), (7, 1), (9, 2), (100, 1024), (1124, 1024)]
        );
    }

    #[test]
    fn frames_past_their_limits_or_of_unknown_kinds_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut a: Box<dyn Stream> = Box::new(a);
        let mut b: Box<dyn Stream> = Box::new(b);
        send(&mut *a, RAM, 0, 0x1000, &[7u8; 16]).unwrap();
        let f = recv(&mut *b).unwrap();
        assert_eq!((f.kind, f.addr, f.payload.len()), (RAM, 0x1000, 16));
        let mut head = [0u8; 21];
        head[0] = RAM;
        head[13..21].copy_from_slice(&(MAX_CHUNK + 1).to_le_bytes());
        a.write_all(&head).unwrap();
        assert!(recv(&mut *b).unwrap_err().contains("at most"));
        head[0] = 99;
        a.write_all(&head).unwrap();
        assert!(recv(&mut *b).unwrap_err().contains("unknown kind"));
        send(&mut *a, ERROR, 0, 0, b"no room").unwrap();
        assert!(recv(&mut *b).unwrap_err().contains("no room"));
        drop(a);
        assert!(recv(&mut *b).unwrap_err().contains("went away"));
    }
}
