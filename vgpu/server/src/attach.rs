//! One vfio-user connection to one vGPU instance: a [`vfu::Device`] over a fresh [`Vgpu`],
//! its DMA mappings and interrupt routes, and its migration ([`crate::migrate`]).
//!
//! Every value here comes from an untrusted client. The `vfio_user` crate's client (Cloud
//! Hypervisor's) hangs when a region access or `dma_unmap` gets an error reply (it reads a
//! full reply struct after a bare header), so those never fail: bad reads return all-ones,
//! bad writes are dropped and counted. Only `dma_map` and `set_irqs`, whose replies are a
//! bare header anyway, return errors.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::pci::PciDeviceSync;
use vfio_bindings::bindings::vfio::{
    VFIO_DMA_UNMAP_FLAG_ALL, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, vfio_region_info,
    vfio_region_sparse_mmap_area,
};
use vfu::{Device, IrqInfo, ServerRegion};
use vgpu_abi::{pci as abi_pci, regs};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use vgpu::device::Vgpu;

pub use crate::irq::{EventVectors, install_relay_signal};
use vgpu::domain::DmaDomain;

/// The page size of DMA mappings.
const PAGE: u64 = 4096;
/// Size of the configuration region (PCI, not PCIe: 256 bytes).
const CONFIG_SIZE: u64 = 256;
/// Largest single region access served. The crate allocates `count` bytes before asking us
/// (a known limit of vfio_user 0.1.x: up to 4 GiB per message, zeroed, so only the pages we
/// touch become resident); this bounds what we touch.
const MAX_ACCESS: usize = 1 << 20;
pub use vgpu_abi::vfio_user::DOORBELL_IRQ_INDEX;
const _: () = assert!(
    DOORBELL_IRQ_INDEX == VFIO_PCI_NUM_IRQS,
    "the index past VFIO's own"
);

/// Most DMA regions one client may map.
pub(crate) const MAX_DMA_REGIONS: usize = 512;

/// What every client of one server together, and each client alone, may make the server
/// map: address space is shared by all tenants (and by VRAM mappings and thread stacks), and
/// every region holds a file descriptor.
#[derive(Debug)]
pub struct DmaBudget {
    /// Bytes one client may have mapped.
    pub per_client: u64,
    /// Bytes all clients together may have mapped.
    pub total: u64,
    /// Regions all clients together may have mapped.
    pub total_regions: u64,
    mapped: AtomicU64,
    regions: AtomicU64,
}

/// Default [`DmaBudget::per_client`]: the most guest RAM `tessera vm` gives a VM.
pub const DEFAULT_CLIENT_MEMORY: u64 = 1 << 40;
/// Default [`DmaBudget::total`]: a quarter of a 47-bit user address space.
pub const DEFAULT_TOTAL_MEMORY: u64 = 32 << 40;
/// Default [`DmaBudget::total_regions`] (the server takes at most half its open-file limit).
pub const DEFAULT_TOTAL_REGIONS: u64 = 8192;

impl Default for DmaBudget {
    fn default() -> Self {
        DmaBudget::new(
            DEFAULT_CLIENT_MEMORY,
            DEFAULT_TOTAL_MEMORY,
            DEFAULT_TOTAL_REGIONS,
        )
    }
}

impl DmaBudget {
    /// A budget with these limits.
    pub fn new(per_client: u64, total: u64, total_regions: u64) -> Self {
        DmaBudget {
            per_client,
            total,
            total_regions,
            mapped: AtomicU64::new(0),
            regions: AtomicU64::new(0),
        }
    }

    /// Bytes mapped by all clients now.
    pub fn mapped(&self) -> u64 {
        self.mapped.load(Ordering::Acquire)
    }

    /// Takes `size` bytes and one region for a client that already holds `held` bytes.
    pub(crate) fn charge(self: &Arc<Self>, size: u64, held: u64) -> std::io::Result<Charge> {
        if held.saturating_add(size) > self.per_client {
            return Err(einval(format_args!(
                "DMA region of {size:#x} bytes would take this client past its limit of \
                 {:#x} mapped bytes",
                self.per_client
            )));
        }
        let take = |counter: &AtomicU64, n: u64, max: u64| {
            counter
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    v.checked_add(n).filter(|&t| t <= max)
                })
                .is_ok()
        };
        if !take(&self.mapped, size, self.total) {
            return Err(einval(format_args!(
                "the server already maps its limit of {:#x} bytes of client memory",
                self.total
            )));
        }
        if !take(&self.regions, 1, self.total_regions) {
            self.mapped.fetch_sub(size, Ordering::AcqRel);
            return Err(einval(format_args!(
                "the server already maps its limit of {} client memory regions",
                self.total_regions
            )));
        }
        Ok(Charge {
            budget: self.clone(),
            size,
        })
    }
}

/// Bytes and a region taken from a [`DmaBudget`], given back on drop.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<DmaBudget>,
    size: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.mapped.fetch_sub(self.size, Ordering::AcqRel);
        self.budget.regions.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The regions a vGPU instance offers: BAR0 (trapped registers), BAR2 (VRAM, mmap-able from
/// `vram_fd`) and configuration space; every other index is empty.
pub fn regions(vram_size: u64, vram_fd: Option<RawFd>) -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
            let (size, flags) = match index {
                VFIO_PCI_BAR0_REGION_INDEX => (abi_pci::BAR_REGS_SIZE, rw),
                VFIO_PCI_BAR2_REGION_INDEX if vram_fd.is_some() => {
                    (vram_size, rw | VFIO_REGION_INFO_FLAG_MMAP)
                }
                // A trapped aperture: every access is a region read or write.
                VFIO_PCI_BAR2_REGION_INDEX => (vram_size, rw),
                VFIO_PCI_CONFIG_REGION_INDEX => (CONFIG_SIZE, rw),
                _ => (0, 0),
            };
            let mmap_fd = vram_fd.filter(|_| index == VFIO_PCI_BAR2_REGION_INDEX);
            ServerRegion {
                info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    // Offset of the region in `mmap_fd`: each attachment's VRAM file holds
                    // exactly its partition.
                    offset: 0,
                },
                // The fd goes only with the sparse-mmap capability (as the vfio_user crate's
                // client expects), so the whole BAR is one sparse area.
                sparse_areas: if mmap_fd.is_some() {
                    vec![vfio_region_sparse_mmap_area {
                        offset: 0,
                        size: vram_size,
                    }]
                } else {
                    Vec::new()
                },
                mmap_fd,
            }
        })
        .collect()
}

/// The file a client maps the VRAM region from, if the aperture is mapped (a trapped one
/// has no mmap-able area: every access is a region read or write).
pub fn mmap_fd(vram: &dyn vgpu::backend::Vram) -> Option<RawFd> {
    match vram.aperture() {
        vgpu::backend::Aperture::Mapped { file, .. } => Some(file.as_raw_fd()),
        vgpu::backend::Aperture::Trapped => None,
    }
}

/// The interrupt indices: MSI-X has the vectors (INTx, MSI, ERR and REQ have none), and
/// [`DOORBELL_IRQ_INDEX`] one doorbell per context.
pub fn irqs(contexts: u32) -> Vec<IrqInfo> {
    (0..=DOORBELL_IRQ_INDEX)
        .map(|index| {
            let (flags, count) = match index {
                VFIO_PCI_MSIX_IRQ_INDEX => (
                    VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
                    u32::from(abi_pci::MSIX_VECTORS),
                ),
                DOORBELL_IRQ_INDEX => (VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE, contexts),
                _ => (0, 0),
            };
            IrqInfo {
                index,
                flags,
                count,
            }
        })
        .collect()
}

struct DmaRegion {
    iova: u64,
    size: u64,
    /// For a file the client can truncate: its `SIGBUS` guard, dropped before the mapping.
    _guard: Option<vgpu::guard::Guard>,
    region: Arc<GuestRegionMmap>,
    /// Given back once the mapping is gone (fields drop in order).
    _charge: Charge,
}

/// Who may use an attachment: checked once, before the client's first device access (see
/// [`crate::peer`]).
#[derive(Debug)]
pub struct Gate {
    /// The connection (served by `vfu::serve`, which owns it while the gate is used).
    pub connection: RawFd,
    /// Users allowed besides root.
    pub allowed: Vec<u32>,
    /// Where the connected peer is recorded.
    pub peer: Arc<Mutex<Option<crate::peer::Peer>>>,
}

/// What the gate decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Unchecked,
    Admitted,
    Refused,
}

/// What one connection may change about its vGPU.
pub struct Attachment {
    gate: Option<Gate>,
    admission: Admission,
    vgpu: Vgpu,
    vectors: Arc<EventVectors>,
    dma: Vec<DmaRegion>,
    require_sealed: bool,
    budget: Arc<DmaBudget>,
    /// Accesses dropped because they were malformed (wrong region, size or offset).
    pub ignored: u64,
    warned_unsealed: bool,
    /// Migration v2 ([`crate::migrate`]).
    pub(crate) mig: crate::migrate::MigState,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("dma_regions", &self.dma.len())
            .field("ignored", &self.ignored)
            .finish_non_exhaustive()
    }
}

fn refused() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "this client may not use the instance",
    )
}

fn einval(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string())
}

impl Attachment {
    /// Serves `vgpu`, whose interrupts go to `vectors`. With `require_sealed`, DMA files a
    /// client could shrink under the device (no `F_SEAL_SHRINK`) are refused; otherwise
    /// they are accepted with a warning. DMA mappings are charged to `budget`.
    pub fn new(
        vgpu: Vgpu,
        vectors: Arc<EventVectors>,
        require_sealed: bool,
        budget: Arc<DmaBudget>,
    ) -> Self {
        Attachment {
            gate: None,
            admission: Admission::Unchecked,
            vgpu,
            vectors,
            dma: Vec::new(),
            require_sealed,
            budget,
            ignored: 0,
            warned_unsealed: false,
            mig: Default::default(),
        }
    }

    /// The vGPU.
    pub fn vgpu(&self) -> &Vgpu {
        &self.vgpu
    }

    /// Serves only peers that `gate` allows (checked at the first device access).
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Whether the connected peer may use the device; decided once. A refused peer's
    /// connection is hung up.
    fn admitted(&mut self) -> bool {
        let Some(gate) = &self.gate else {
            return true;
        };
        if self.admission == Admission::Unchecked {
            let fd = gate.connection;
            self.admission = match crate::peer::of(fd) {
                Some(peer) => {
                    *gate.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer);
                    if peer.uid == 0 || gate.allowed.contains(&peer.uid) {
                        Admission::Admitted
                    } else {
                        tracing::warn!(
                            uid = peer.uid,
                            pid = peer.pid,
                            "refusing a client of another user"
                        );
                        crate::peer::hang_up(fd);
                        Admission::Refused
                    }
                }
                None => {
                    tracing::warn!("cannot find the client's connection; refusing it");
                    Admission::Refused
                }
            };
        }
        self.admission == Admission::Admitted
    }

    fn apply_dma(&self) -> Result<(), vgpu::backend::BackendError> {
        let regions: Vec<Arc<GuestRegionMmap>> =
            self.dma.iter().map(|d| d.region.clone()).collect();
        let sys = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            // Sorted and disjoint by construction (`dma_map` keeps `dma` so).
            GuestMemoryMmap::from_arc_regions(regions).unwrap_or_default()
        };
        let domain = DmaDomain::new(self.dma.iter().map(|d| (d.iova, d.size)));
        self.vgpu.set_dma(sys, domain)
    }

    fn ignore(&mut self, what: &str, region: u32, offset: u64, len: usize) {
        self.ignored += 1;
        tracing::debug!(region, offset, len, "ignored vfio-user {what}");
    }

    fn set_doorbells(
        &mut self,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        if flags & VFIO_IRQ_SET_DATA_NONE != 0 && count == 0 {
            return self.vgpu.set_doorbell_fds(Vec::new());
        }
        let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        if flags & trigger != trigger || start != 0 || count > self.vgpu.contexts() {
            return Err(einval(format_args!(
                "doorbells: flags {flags:#x}, {start}+{count} (expected eventfds for contexts \
                 0..{})",
                self.vgpu.contexts()
            )));
        }
        if fds.len() != count as usize || !fds.iter().all(is_eventfd) {
            return Err(einval("doorbells must be one eventfd per context"));
        }
        self.vgpu.set_doorbell_fds(fds)
    }

    /// Whether `fd` is sealed against shrinking; an error when it must be and is not.
    fn check_sealed(&mut self, fd: &File) -> std::io::Result<bool> {
        // SAFETY: F_GET_SEALS only reads the seals of an fd we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
            return Ok(true);
        }
        if self.require_sealed {
            return Err(einval(
                "DMA file is not sealed against shrinking (server runs with --require-sealed)",
            ));
        }
        if !self.warned_unsealed {
            self.warned_unsealed = true;
            tracing::warn!(
                "the client's guest RAM is not sealed against shrinking; if the client \
                 truncates it, its vGPU loses its system memory (DMA_DOMAIN faults)"
            );
        }
        Ok(false)
    }
}

/// Where a region access goes.
enum Route {
    /// Configuration space, split into dwords (see [`config_dwords`]).
    Config(Vec<(usize, u64, std::ops::Range<usize>)>),
    /// A BAR of the vGPU.
    Bar(usize),
}

impl Attachment {
    /// The target of an access of `len` bytes at `offset` of `region`, or `None` when it is
    /// malformed (no such region, too big, or not inside it).
    fn route(&self, region: u32, offset: u64, len: usize) -> Option<Route> {
        let (bar, size) = match region {
            VFIO_PCI_CONFIG_REGION_INDEX => return config_dwords(offset, len).map(Route::Config),
            VFIO_PCI_BAR0_REGION_INDEX => (abi_pci::BAR_REGS, abi_pci::BAR_REGS_SIZE),
            VFIO_PCI_BAR2_REGION_INDEX => (abi_pci::BAR_VRAM, self.vgpu.vram().size()),
            _ => return None,
        };
        let end = offset.checked_add(len as u64)?;
        (len <= MAX_ACCESS && end <= size).then_some(Route::Bar(bar))
    }
}

/// Whether `f` is an eventfd (a write to it never blocks).
fn is_eventfd(f: &File) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

/// Splits an access at `offset` of `len` bytes into aligned dwords of configuration space:
/// (register, byte offset in it, range in the caller's buffer).
fn config_dwords(offset: u64, len: usize) -> Option<Vec<(usize, u64, std::ops::Range<usize>)>> {
    let end = offset.checked_add(len as u64)?;
    if end > CONFIG_SIZE {
        return None;
    }
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let reg_end = (at / 4 + 1) * 4;
        let n = (reg_end.min(end) - at) as usize;
        let buf = (at - offset) as usize;
        out.push(((at / 4) as usize, at % 4, buf..buf + n));
        at += n as u64;
    }
    Some(out)
}

impl Device for Attachment {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        if data.len() <= MAX_ACCESS && !self.admitted() {
            // A refused peer reads what a lost device reads.
            data.fill(0xff);
            return Ok(());
        }
        if data.len() > MAX_ACCESS {
            // The crate allocated `count` zeroed bytes (up to 4 GiB, mapped lazily); touching
            // them would make that memory real. The client gets the zeros back.
            self.ignore("oversized read", region, offset, data.len());
            return Ok(());
        }
        data.fill(0xff);
        match self.route(region, offset, data.len()) {
            Some(Route::Config(parts)) => {
                for (reg, at, range) in parts {
                    let v = self.vgpu.read_config_register(reg).to_le_bytes();
                    let at = at as usize;
                    let n = range.len();
                    data[range].copy_from_slice(&v[at..at + n]);
                }
            }
            Some(Route::Bar(bar)) => self.vgpu.read_bar(bar, offset, data),
            None => self.ignore("read", region, offset, data.len()),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if !self.admitted() {
            return Ok(());
        }
        match self.route(region, offset, data.len()) {
            Some(Route::Config(parts)) => {
                for (reg, at, range) in parts {
                    self.vgpu.write_config_register(reg, at, &data[range]);
                }
            }
            Some(Route::Bar(bar)) => self.vgpu.write_bar(bar, offset, data),
            None => self.ignore("write", region, offset, data.len()),
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        if !self.admitted() {
            return Err(refused());
        }
        let fd = fd.ok_or_else(|| {
            einval("DMA regions need a file descriptor (guest RAM must be shared memory)")
        })?;
        let end = address
            .checked_add(size)
            .filter(|_| size > 0 && size <= isize::MAX as u64)
            .ok_or_else(|| einval(format_args!("bad DMA range {address:#x}+{size:#x}")))?;
        // As VFIO asks of its IOMMU mappings: whole pages. (A GPU backend may address memory
        // by its offset from a region's start, with alignment rules of its own: Vulkan's
        // buffer fills and copies want 4-byte offsets.)
        if !(address | size | offset).is_multiple_of(PAGE) {
            return Err(einval(format_args!(
                "DMA region {address:#x}+{size:#x} at file offset {offset:#x} is not whole {PAGE}-byte pages"
            )));
        }
        let file_len = fd.metadata()?.len();
        if offset.checked_add(size).is_none_or(|e| e > file_len) {
            return Err(einval(format_args!(
                "DMA region {offset:#x}+{size:#x} lies past the end of its file ({file_len:#x})"
            )));
        }
        if self
            .dma
            .iter()
            .any(|d| address < d.iova + d.size && d.iova < end)
        {
            return Err(einval(format_args!(
                "DMA region {address:#x}+{size:#x} overlaps a mapped one"
            )));
        }
        if self.dma.len() >= MAX_DMA_REGIONS {
            return Err(einval("too many DMA regions"));
        }
        let held = self.dma.iter().map(|d| d.size).sum();
        let charge = self.budget.charge(size, held)?;
        let sealed = self.check_sealed(&fd)?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(address),
            size as usize,
            Some(FileOffset::new(fd, offset)),
        )
        .map_err(|e| einval(format_args!("cannot map DMA region {address:#x}: {e}")))?;
        let guard = if sealed {
            None
        } else {
            // A truncated file faults on access: contain it to this vGPU (see guard.rs).
            vgpu::guard::install()?;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| einval(format_args!("DMA region {address:#x}: {e}")))?;
            Some(
                vgpu::guard::register(host, size as usize, self.vgpu.dma_owner())
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            )
        };
        tracing::debug!(address, size, flags, "DMA map");
        let at = self.dma.partition_point(|d| d.iova < address);
        self.dma.insert(
            at,
            DmaRegion {
                iova: address,
                size,
                _guard: guard,
                region: Arc::new(region),
                _charge: charge,
            },
        );
        if let Err(e) = self.apply_dma() {
            // The GPU could not import the new region: the client's map fails, and the
            // device keeps what it had.
            self.dma.remove(at);
            return Err(std::io::Error::other(e.to_string()));
        }
        Ok(())
    }

    fn dma_unmap(&mut self, flags: u32, address: u64, size: u64) -> std::io::Result<()> {
        // Stopped (migration), the vGPU may be parked inside a packet that uses this memory:
        // it cannot be let go of until the packet runs on, and nothing may write it after
        // the unmap returns.
        if self.mig.stopped() {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        // VFIO's "unmap all" bit, and the one the vfio_user crate's client uses for it.
        let all = flags & (VFIO_DMA_UNMAP_FLAG_ALL | 1 << 2) != 0;
        let (gone, kept): (Vec<DmaRegion>, Vec<DmaRegion>) = std::mem::take(&mut self.dma)
            .into_iter()
            .partition(|d| all || (d.iova == address && d.size == size));
        self.dma = kept;
        if gone.is_empty() {
            tracing::debug!(address, size, "DMA unmap of nothing mapped");
            self.ignored += 1;
            return Ok(());
        }
        // Returns once no packet uses the old mappings; only then are they unguarded and
        // unmapped (dropped here).
        if let Err(e) = self.apply_dma() {
            // Unmapping never fails for the client; the GPU is told of an empty domain.
            tracing::warn!("the GPU could not import the remaining DMA regions: {e}");
            let _ = self
                .vgpu
                .set_dma(GuestMemoryMmap::new(), DmaDomain::default());
        }
        drop(gone);
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        if !self.admitted() {
            return Ok(());
        }
        self.vgpu.write_bar(
            abi_pci::BAR_REGS,
            regs::RESET,
            &regs::RESET_VALUE.to_le_bytes(),
        );
        Ok(())
    }

    fn migration(&mut self) -> Option<&mut dyn vfu::Migration> {
        // Only the admitted client may stop, read or replace the vGPU's state.
        if self.admitted() { Some(self) } else { None }
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        if !self.admitted() {
            return Err(refused());
        }
        if index == DOORBELL_IRQ_INDEX {
            return self.set_doorbells(flags, start, count, fds);
        }
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            // No vectors at the other indices: only "none" requests make sense there.
            return if count == 0 {
                Ok(())
            } else {
                Err(einval(format_args!("IRQ index {index} has no vectors")))
            };
        }
        let vectors = usize::from(abi_pci::MSIX_VECTORS);
        let (start, count) = (start as usize, count as usize);
        if flags & VFIO_IRQ_SET_DATA_NONE != 0 && count == 0 {
            // Disable: drop every route.
            return self
                .vectors
                .set(0, std::iter::repeat_with(|| None).take(vectors));
        }
        if start.checked_add(count).is_none_or(|e| e > vectors) {
            return Err(einval(format_args!(
                "MSI-X vectors {start}+{count} past the {vectors} the device has"
            )));
        }
        if flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 && flags & VFIO_IRQ_SET_ACTION_TRIGGER != 0 {
            if !fds.iter().all(is_eventfd) {
                // A pipe or socket could block the command processor when signalled.
                return Err(einval("MSI-X routes must be eventfds"));
            }
            if fds.len() != count {
                return Err(einval(format_args!(
                    "{count} vectors but {} file descriptors",
                    fds.len()
                )));
            }
            return self.vectors.set(start, fds.into_iter().map(Some));
        }
        if flags & VFIO_IRQ_SET_DATA_NONE != 0 {
            return self
                .vectors
                .set(start, std::iter::repeat_with(|| None).take(count));
        }
        Err(einval(format_args!(
            "unsupported set_irqs flags {flags:#x}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_accesses_split_into_dwords() {
        assert_eq!(config_dwords(0, 4), Some(vec![(0, 0, 0..4)]));
        assert_eq!(config_dwords(2, 4), Some(vec![(0, 2, 0..2), (1, 0, 2..4)]));
        assert_eq!(config_dwords(0x3e, 2), Some(vec![(15, 2, 0..2)]));
        assert_eq!(config_dwords(254, 4), None);
        assert_eq!(config_dwords(u64::MAX - 1, 4), None);
        assert_eq!(config_dwords(8, 0), Some(vec![]));
    }

    #[test]
    fn only_eventfds_are_routes() {
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(evt);
        // SAFETY: `raw` was just released by the EventFd and is owned by nothing else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        assert!(is_eventfd(&f));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!is_eventfd(&File::from(std::os::fd::OwnedFd::from(a))));
        assert!(!is_eventfd(&File::open("/dev/null").unwrap()));
    }

    #[test]
    fn region_table_matches_the_bars() {
        let r = regions(64 << 20, Some(7));
        assert_eq!(r.len(), VFIO_PCI_NUM_REGIONS as usize);
        for (i, region) in r.iter().enumerate() {
            assert_eq!(region.info.index as usize, i);
        }
        assert_eq!(r[2].info.size, 64 << 20);
        assert_eq!(r[2].mmap_fd, Some(7));
        assert_eq!(r[2].sparse_areas.len(), 1);
        assert_eq!(r[0].info.size, abi_pci::BAR_REGS_SIZE);
        assert!(r[0].mmap_fd.is_none() && r[1].info.size == 0);
        let irqs = irqs(16);
        assert_eq!(irqs[VFIO_PCI_MSIX_IRQ_INDEX as usize].count, 16);
        assert_eq!(irqs[DOORBELL_IRQ_INDEX as usize].count, 16);
        assert_eq!(irqs.len(), 6);
    }
}
