//! `--user-device socket=PATH`: a Tessera vGPU served by another process (`tessera serve`)
//! over vfio-user, as a PCI function of this VM.
//!
//! What stays local and what crosses the socket:
//! - Configuration space is ours: a [`PciConfiguration`] built from the server's ids and
//!   region sizes, with the BARs placed by our allocator. The server's vGPU ignores
//!   configuration writes (its MSI-X table lives here), so none are forwarded.
//! - BAR 0 registers go to the server as region accesses (one message each), except the
//!   MSI-X table and PBA, which a local [`MsixState`] serves, and the doorbells: one eventfd
//!   per context, sent on Tessera's doorbell IRQ index and registered as KVM ioeventfds, so
//!   doorbell writes exit nowhere.
//! - BAR 2 (VRAM) is the server's VRAM file, mapped here and given to the guest as a memory
//!   slot: VRAM accesses never leave the guest.
//! - Guest RAM is sealed memfd memory; each region is sent once with `DMA_MAP` and the server
//!   maps the same pages.
//! - Interrupts: the server signals one eventfd per MSI-X vector; the `vfu-irq` thread turns
//!   each into a `MsixState::trigger`, which honours masks and pending bits like the
//!   in-process device. The same thread checks every 250 ms that the server is alive.
//!
//! A server that dies or breaks the protocol makes the device "lost": reads return all ones
//! (the vGPU spec's lost-device value; `WAIT` returns at once), writes are dropped, and one
//! error line is logged.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::pci::config::{BarKind, ConfigError};
use devices::pci::{
    BarAllocator, BarMapping, HostMemory, MsiSink, MsixState, PciConfiguration, PciDevice,
    PciHeader,
};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR2_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP,
};
use vfu::{Client, DeviceState};
use vgpu_abi::vfio_user::DOORBELL_IRQ_INDEX;
use vgpu_abi::{limits, pci as abi_pci, regs};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::memory::GuestRam;

/// How long connecting may take: a server that is busy with another VM keeps us in its
/// listen backlog.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an idle device checks that the server is still there.
const HEARTBEAT: Duration = Duration::from_millis(250);

/// Errors attaching a user device.
#[derive(Debug, thiserror::Error)]
pub enum UserDeviceError {
    /// The socket does not exist.
    #[error("no vGPU socket at {0} (is `tessera serve` running and the instance created?)")]
    NoSocket(PathBuf),
    /// The socket is not one that only trusted users could have made.
    #[error("refusing the vGPU socket")]
    Untrusted {
        /// Socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to the vGPU server at {path}: {why}")]
    Connect {
        /// Socket.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The server is not a Tessera vGPU, or answered nonsense.
    #[error("{path} is not a usable Tessera vGPU: {why}")]
    Device {
        /// Socket.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A message failed during setup.
    #[error("vfio-user setup with {path} failed: {what}")]
    Protocol {
        /// Socket.
        path: PathBuf,
        /// What.
        what: String,
    },
    /// Local resources.
    #[error("cannot {0}")]
    Os(&'static str, #[source] std::io::Error),
    /// Configuration space.
    #[error("cannot build the configuration space")]
    Config(#[from] ConfigError),
}

/// Configuration space and MSI-X, shared with the interrupt thread.
struct Local {
    config: PciConfiguration,
    msix: MsixState,
}

/// The connection, or nothing once the server is gone.
struct Link {
    client: Mutex<Option<Client>>,
    lost: AtomicBool,
    path: PathBuf,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, Option<Client>> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the client; a failure marks the device lost (once, with one error line).
    fn with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T, vfu::Error>) -> Option<T> {
        self.call(&mut self.lock(), f)
    }

    /// Runs `f` on the client in `slot` (locked by the caller); a failure drops the connection
    /// and marks the device lost.
    fn call<T>(
        &self,
        slot: &mut Option<Client>,
        f: impl FnOnce(&mut Client) -> Result<T, vfu::Error>,
    ) -> Option<T> {
        match f(slot.as_mut()?) {
            Ok(v) => Some(v),
            Err(e) => {
                *slot = None;
                if !self.lost.swap(true, Ordering::AcqRel) {
                    tracing::error!(
                        "vGPU server at {} is gone ({e}); the device now reads as lost",
                        self.path.display()
                    );
                }
                None
            }
        }
    }
}

fn lock(l: &Mutex<Local>) -> MutexGuard<'_, Local> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// What migration, snapshots and pauses need of a user device, shared with the control
/// side: its connection, its local configuration space and MSI-X, its VRAM mapping, and the
/// migration state the server was last moved to.
#[derive(Clone)]
pub struct UserHandle {
    link: Arc<Link>,
    local: Arc<Mutex<Local>>,
    vram: Arc<GuestRegionMmap>,
    state: Arc<Mutex<DeviceState>>,
}

/// The client's own part of a user device's state (configuration space and MSI-X live here,
/// not in the server).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LocalState {
    config: Vec<u32>,
    msix_table: Vec<[u32; 4]>,
    msix_pending: Vec<u64>,
}

impl std::fmt::Debug for UserHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserHandle")
            .field("socket", &self.link.path)
            .finish_non_exhaustive()
    }
}

impl UserHandle {
    fn call<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Client) -> Result<T, vfu::Error>,
    ) -> Result<T, String> {
        let mut slot = self.link.lock();
        let c = slot
            .as_mut()
            .ok_or_else(|| format!("the vGPU server at {} is gone", self.link.path.display()))?;
        f(c).map_err(|e| format!("vGPU server at {}: {what}: {e}", self.link.path.display()))
    }

    /// Moves the server's device to `to` (VFIO migration v2 states).
    pub fn set_state(&self, to: DeviceState) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *st != to {
            self.call(&format!("move to {to:?}"), |c| c.set_device_state(to))?;
            *st = to;
        }
        Ok(())
    }

    /// The state the server was last moved to.
    pub fn state(&self) -> DeviceState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next at most `max` bytes of the device's migration data (empty: none now).
    pub fn read(&self, max: usize) -> Result<Vec<u8>, String> {
        self.call("read its state", |c| c.mig_read(max))
    }

    /// Gives the device the next bytes of a state (RESUMING).
    pub fn write(&self, data: &[u8]) -> Result<(), String> {
        self.call("write its state", |c| c.mig_write(data))
    }

    /// Starts (or stops) the server's log of its DMA writes into `ranges` of guest RAM.
    pub fn dma_logging(&self, ranges: Option<&[(u64, u64)]>) -> Result<(), String> {
        match ranges {
            Some(r) => self.call("start its DMA log", |c| c.logging_start(r)),
            None => self.call("stop its DMA log", |c| c.logging_stop()),
        }
    }

    /// Guest RAM pages (addresses) the device wrote in `[gpa, gpa + len)` since last asked.
    pub fn dma_dirty(&self, gpa: u64, len: u64) -> Result<Vec<u64>, String> {
        // One report covers at most 8 Mi pages (a 1 MiB bitmap).
        const STEP: u64 = 32 << 30;
        let mut out = Vec::new();
        let mut at = gpa;
        while at < gpa + len {
            let n = STEP.min(gpa + len - at);
            out.extend(self.call("report its DMA log", |c| c.logging_report(at, n))?);
            at += n;
        }
        Ok(out)
    }

    /// The VRAM mapping the guest's BAR 2 is.
    pub fn vram(&self) -> &GuestRegionMmap {
        &self.vram
    }

    /// Configuration space and MSI-X.
    pub fn local_state(&self) -> LocalState {
        let l = lock(&self.local);
        let (msix_table, msix_pending) = l.msix.save();
        LocalState {
            config: l.config.registers(),
            msix_table,
            msix_pending,
        }
    }

    /// Puts back configuration space and MSI-X (read-only bits must match).
    pub fn restore_local(&self, s: &LocalState) -> Result<(), String> {
        let mut l = lock(&self.local);
        let mut config = l.config.clone();
        config.restore_registers(&s.config)?;
        l.msix.restore(&s.msix_table, &s.msix_pending)?;
        l.config = config;
        Ok(())
    }
}

/// See the module documentation.
pub struct UserDevice {
    link: Arc<Link>,
    local: Arc<Mutex<Local>>,
    /// The VRAM mapping (kept alive while the guest may use it: a guest mapping holds a
    /// clone).
    vram: Arc<GuestRegionMmap>,
    doorbells: Vec<EventFd>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    state: Arc<Mutex<DeviceState>>,
}

impl std::fmt::Debug for UserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserDevice")
            .field("socket", &self.link.path)
            .field("vram", &self.vram.len())
            .finish_non_exhaustive()
    }
}

/// Connects to the socket at `path` if it is a socket that belongs, like every directory
/// above it, to a user in `trusted` or root: only then is the server behind it one of them
/// (a socket belongs to whoever bound it), and only then may it be handed guest RAM.
fn connect(path: &Path, trusted: &[u32]) -> Result<Client, UserDeviceError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |why: String| UserDeviceError::Connect {
        path: path.to_path_buf(),
        why,
    };
    let untrusted = |source| UserDeviceError::Untrusted {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::metadata(path) {
        Err(_) => return Err(UserDeviceError::NoSocket(path.to_path_buf())),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(untrusted(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not a socket", path.display()),
            )));
        }
        Ok(_) => {}
    }
    devices::files::check_trusted_path(path, trusted).map_err(untrusted)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    std::thread::Builder::new()
        .name("vfu-connect".into())
        .spawn(move || {
            let _ = tx.send(Client::new(&p));
        })
        .map_err(|e| UserDeviceError::Os("start the connect thread", e))?;
    match rx.recv_timeout(CONNECT_TIMEOUT) {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(err(e.to_string())),
        Err(_) => Err(err(format!(
            "no answer within {CONNECT_TIMEOUT:?} (is another VM attached to this vGPU?)"
        ))),
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

impl UserDevice {
    /// Connects to the vGPU at `path` (a socket of a user in `trusted`, or root), maps guest RAM for its DMA and its VRAM for the guest,
    /// places its BARs with `bars`; interrupts go to `msi`.
    /// With `seccomp`, the device's interrupt thread runs under the device filter.
    pub fn connect(
        path: &Path,
        trusted: &[u32],
        ram: &GuestRam,
        bars: &mut BarAllocator,
        msi: Arc<dyn MsiSink>,
        seccomp: bool,
    ) -> Result<Self, UserDeviceError> {
        let mut client = connect(path, trusted)?;
        let dev_err = |why: String| UserDeviceError::Device {
            path: path.to_path_buf(),
            why,
        };
        let proto = |what: &str, e: vfu::Error| UserDeviceError::Protocol {
            path: path.to_path_buf(),
            what: format!("{what}: {e}"),
        };

        let mut cfg = [0u8; 64];
        client
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut cfg)
            .map_err(|e| proto("read configuration space", e))?;
        let (vendor, device) = (
            u16::from_le_bytes([cfg[0], cfg[1]]),
            u16::from_le_bytes([cfg[2], cfg[3]]),
        );
        if (vendor, device) != (abi_pci::VENDOR_ID, abi_pci::DEVICE_ID) {
            return Err(dev_err(format!("PCI id {vendor:04x}:{device:04x}")));
        }
        let regs_size = client
            .region(VFIO_PCI_BAR0_REGION_INDEX)
            .map_or(0, |r| r.size);
        if regs_size != abi_pci::BAR_REGS_SIZE {
            return Err(dev_err(format!("BAR0 is {regs_size:#x} bytes")));
        }
        let vram_region = client
            .region(VFIO_PCI_BAR2_REGION_INDEX)
            .ok_or_else(|| dev_err("no VRAM region".into()))?;
        let vram_size = vram_region.size;
        let fo = vram_region
            .file_offset
            .clone()
            .filter(|_| vram_region.flags & VFIO_REGION_INFO_FLAG_MMAP != 0)
            .ok_or_else(|| dev_err("VRAM cannot be mapped".into()))?;
        // The largest profile's VRAM is 1 GiB; a 64-bit BAR of up to 64 GiB still fits.
        if !vram_size.is_power_of_two() || vram_size > 64 << 30 {
            return Err(dev_err(format!("VRAM of {vram_size:#x} bytes")));
        }
        let vram = GuestRegionMmap::from_range(GuestAddress(0), vram_size as usize, Some(fo))
            .map_err(|e| dev_err(format!("cannot map VRAM: {e}")))?;

        let mut word = [0u8; 4];
        client
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, regs::NUM_CONTEXTS, &mut word)
            .map_err(|e| proto("read NUM_CONTEXTS", e))?;
        let contexts = u32::from_le_bytes(word).min(limits::MAX_CONTEXTS);

        // Guest RAM, once, before any vCPU runs.
        for region in ram.memory.iter() {
            let offset = region
                .file_offset()
                .map(|f| f.start())
                .ok_or_else(|| dev_err("guest RAM is not file-backed".into()))?;
            client
                .dma_map(
                    offset,
                    region.start_addr().0,
                    region.len(),
                    ram.file.as_raw_fd(),
                )
                .map_err(|e| proto("map guest RAM for DMA", e))?;
        }

        let evt =
            || EventFd::new(EFD_NONBLOCK).map_err(|e| UserDeviceError::Os("create an eventfd", e));
        let doorbells = (0..contexts)
            .map(|_| evt())
            .collect::<Result<Vec<_>, _>>()?;
        let fds: Vec<i32> = doorbells.iter().map(|e| e.as_raw_fd()).collect();
        let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        client
            .set_irqs(DOORBELL_IRQ_INDEX, trigger, 0, contexts, &fds)
            .map_err(|e| proto("hand over the doorbells", e))?;
        let vectors = (0..abi_pci::MSIX_VECTORS)
            .map(|_| evt())
            .collect::<Result<Vec<_>, _>>()?;
        let fds: Vec<i32> = vectors.iter().map(|e| e.as_raw_fd()).collect();
        client
            .set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                trigger,
                0,
                u32::from(abi_pci::MSIX_VECTORS),
                &fds,
            )
            .map_err(|e| proto("hand over the MSI-X routes", e))?;

        let mut alloc = |size, kind| {
            bars.allocate(size, kind)
                .map_err(|e| dev_err(format!("no room for its BARs: {e}")))
        };
        let regs_at = alloc(
            abi_pci::BAR_REGS_SIZE,
            BarKind::Mmio32 {
                prefetchable: false,
            },
        )?;
        let vram_at = alloc(vram_size, BarKind::Mmio64 { prefetchable: true })?;
        let class = u32_at(&cfg, 8);
        let subsystem = u32_at(&cfg, 0x2c);
        let header = PciHeader {
            vendor_id: vendor,
            device_id: device,
            class: (class >> 24) as u8,
            subclass: (class >> 16) as u8,
            prog_if: (class >> 8) as u8,
            revision: class as u8,
            subsystem_vendor_id: subsystem as u16,
            subsystem_id: (subsystem >> 16) as u16,
        };
        let bars = vgpu::BarAddresses {
            regs: regs_at,
            vram: vram_at,
        };
        let (config, msix) =
            vgpu::device::function_config(header, bars, vram_size, vgpu::Interrupts::Msi(msi))?;
        let local = Arc::new(Mutex::new(Local { config, msix }));
        let link = Arc::new(Link {
            client: Mutex::new(Some(client)),
            lost: AtomicBool::new(false),
            path: path.to_path_buf(),
        });
        let stop = evt()?;
        let thread = {
            let (link, local) = (link.clone(), local.clone());
            let stop = stop
                .try_clone()
                .map_err(|e| UserDeviceError::Os("clone an eventfd", e))?;
            std::thread::Builder::new()
                .name("vfu-irq".into())
                .spawn(move || {
                    if seccomp && let Err(e) = crate::seccomp::apply(crate::seccomp::Thread::Device)
                    {
                        tracing::error!("vfio-user interrupt thread: {e}; interrupts are lost");
                        return;
                    }
                    irq_loop(&link, &local, &vectors, &stop)
                })
                .map_err(|e| UserDeviceError::Os("start the interrupt thread", e))?
        };
        tracing::info!(
            socket = %path.display(),
            vram = vram_size,
            contexts,
            "vfio-user vGPU attached"
        );
        Ok(UserDevice {
            link,
            local,
            vram: Arc::new(vram),
            doorbells,
            stop,
            thread: Some(thread),
            state: Arc::new(Mutex::new(DeviceState::Running)),
        })
    }

    /// A handle for pausing and migrating it.
    pub fn handle(&self) -> UserHandle {
        UserHandle {
            link: self.link.clone(),
            local: self.local.clone(),
            vram: self.vram.clone(),
            state: self.state.clone(),
        }
    }

    /// Whether the server is gone.
    pub fn lost(&self) -> bool {
        self.link.lost.load(Ordering::Acquire)
    }
}

/// Forwards the server's vector signals into the local MSI-X state and watches the server.
fn irq_loop(link: &Link, local: &Mutex<Local>, vectors: &[EventFd], stop: &EventFd) {
    let Ok(epoll) = Epoll::new() else {
        tracing::error!("vfio-user device: cannot create an epoll; interrupts are lost");
        return;
    };
    let stop_key = vectors.len() as u64;
    let add = |fd: i32, key: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, key),
        )
    };
    for (v, e) in vectors.iter().enumerate() {
        if add(e.as_raw_fd(), v as u64).is_err() {
            tracing::error!("vfio-user device: cannot watch vector {v}");
        }
    }
    let _ = add(stop.as_raw_fd(), stop_key);
    let mut events = [EpollEvent::default(); abi_pci::MSIX_VECTORS as usize + 1];
    loop {
        let n = match epoll.wait(HEARTBEAT.as_millis() as i32, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("vfio-user device: epoll failed: {e}");
                return;
            }
        };
        if n == 0 {
            heartbeat(link);
            continue;
        }
        for ev in &events[..n] {
            let key = ev.data();
            if key == stop_key {
                return;
            }
            if let Some(e) = vectors.get(key as usize)
                && e.read().is_ok()
            {
                let mut l = lock(local);
                let Local { config, msix } = &mut *l;
                msix.trigger(config, key as u16);
            }
        }
    }
}

/// Reads a harmless register unless someone is talking to the server already (then it is
/// alive, or that caller finds out).
fn heartbeat(link: &Link) {
    if link.lost.load(Ordering::Acquire) {
        return;
    }
    let Ok(mut slot) = link.client.try_lock() else {
        return;
    };
    let mut magic = [0u8; 4];
    link.call(&mut slot, |c| {
        c.region_read(VFIO_PCI_BAR0_REGION_INDEX, regs::MAGIC, &mut magic)
    });
}

impl PciDevice for UserDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        lock(&self.local).config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let mut l = lock(&self.local);
        l.config.write_reg(reg, offset, data);
        let Local { config, msix } = &mut *l;
        msix.flush_pending(config);
    }

    fn bar_mappings(&self) -> Vec<BarMapping> {
        lock(&self.local).config.bar_mappings()
    }

    fn bar_placements(&self) -> Vec<BarMapping> {
        lock(&self.local).config.bar_placements()
    }

    fn bar_memory(&self, bar: usize) -> Option<HostMemory> {
        use vm_memory::MemoryRegionAddress;
        if bar != abi_pci::BAR_VRAM {
            return None;
        }
        let host_addr = self.vram.get_host_address(MemoryRegionAddress(0)).ok()? as u64;
        // SAFETY: the region is our mmap of the server's VRAM file, unmapped only when the
        // last clone of the Arc (which the handle holds) is dropped.
        Some(unsafe { HostMemory::new(host_addr, self.vram.len(), self.vram.clone()) })
    }

    fn ioeventfds(&self, bar: usize) -> Vec<(u64, EventFd)> {
        if bar != abi_pci::BAR_REGS {
            return Vec::new();
        }
        self.doorbells
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((regs::doorbell(i as u32), e.try_clone().ok()?)))
            .collect()
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if bar != abi_pci::BAR_REGS {
            return;
        }
        let table = abi_pci::MSIX_TABLE_OFFSET..abi_pci::MSIX_PBA_OFFSET;
        if table.contains(&offset) {
            lock(&self.local)
                .msix
                .read_table(offset - table.start, data);
        } else if offset >= abi_pci::MSIX_PBA_OFFSET {
            lock(&self.local)
                .msix
                .read_pba(offset - abi_pci::MSIX_PBA_OFFSET, data);
        } else if self
            .link
            .with(|c| c.region_read(VFIO_PCI_BAR0_REGION_INDEX, offset, data))
            .is_none()
        {
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != abi_pci::BAR_REGS {
            return;
        }
        let table = abi_pci::MSIX_TABLE_OFFSET..abi_pci::MSIX_PBA_OFFSET;
        if table.contains(&offset) {
            let mut l = lock(&self.local);
            let Local { config, msix } = &mut *l;
            msix.write_table(config, offset - table.start, data);
            return;
        }
        if offset >= abi_pci::MSIX_PBA_OFFSET {
            return;
        }
        self.link
            .with(|c| c.region_write(VFIO_PCI_BAR0_REGION_INDEX, offset, data));
        if offset == regs::RESET && data == regs::RESET_VALUE.to_le_bytes() {
            // A function reset returns the table (which lives here) to power-on state too.
            lock(&self.local).msix.reset();
        }
    }
}

impl Drop for UserDevice {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Closing the socket detaches: the server cancels our work and scrubs the VRAM.
        drop(self.link.lock().take());
    }
}
