//! PCI: configuration space, BARs and capabilities (`config`), the root bus behind the conf1
//! ports 0xCF8/0xCFC (`root`), BAR address allocation (`allocator`) and the host bridge.

pub mod allocator;
pub mod config;
pub mod host_bridge;
pub mod msix;
pub mod root;

pub use allocator::{AllocatorError, BarAllocator};
pub use config::{BarKind, BarMapping, PciConfiguration, PciHeader};
pub use host_bridge::HostBridge;
pub use msix::{Interrupts, MsiSink, MsixState, VectorSink};
pub use root::{PciRoot, PciRootError};

/// A range of host memory backing a BAR, and a handle on what keeps it mapped: whoever holds
/// a `HostMemory` (a [`GuestMapper`] that put it in the guest) holds the mapping alive, so
/// mapping it into a guest is safe by construction. Only [`HostMemory::new`] is unsafe.
#[derive(Clone)]
pub struct HostMemory {
    host_addr: u64,
    len: u64,
    /// Keeps the mapping alive; never read.
    _owner: std::sync::Arc<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMemory")
            .field("host_addr", &format_args!("{:#x}", self.host_addr))
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl HostMemory {
    /// `len` bytes at `host_addr`, kept mapped by `owner`.
    ///
    /// # Safety
    ///
    /// `[host_addr, host_addr + len)` must be one readable and writable mapping of this
    /// process that stays mapped for as long as `owner` (any clone of it) lives.
    pub unsafe fn new(
        host_addr: u64,
        len: u64,
        owner: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        HostMemory {
            host_addr,
            len,
            _owner: owner,
        }
    }

    /// Start of the host mapping.
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `len` bytes (at most all of it) of the same mapping, with the same owner.
    pub fn truncated(&self, len: u64) -> Self {
        HostMemory {
            len: len.min(self.len),
            ..self.clone()
        }
    }
}

/// Maps host memory into guest-physical space (for a KVM VMM: a memory slot).
pub trait GuestMapper: Send + Sync {
    /// Maps `mem` at guest-physical `gpa`, holding `mem` (and so the mapping) until
    /// [`GuestMapper::unmap`].
    fn map(&self, gpa: u64, mem: HostMemory) -> std::io::Result<()>;
    /// Removes the mapping at `gpa` and lets go of its memory.
    fn unmap(&self, gpa: u64);
    /// Makes guest writes at `gpa` signal `evt` instead of exiting to the VMM.
    fn register_ioevent(
        &self,
        gpa: u64,
        evt: &vmm_sys_util::eventfd::EventFd,
    ) -> std::io::Result<()>;
    /// Undoes [`GuestMapper::register_ioevent`].
    fn unregister_ioevent(&self, gpa: u64, evt: &vmm_sys_util::eventfd::EventFd);
}

/// A PCI function: a configuration space plus the behaviour behind its BARs.
///
/// Most functions keep a [`PciConfiguration`] and delegate the three configuration methods to
/// it; devices with live capabilities (MSI-X) also observe the writes.
pub trait PciDevice: Send {
    /// Reads the 32-bit configuration register `reg` (0..64).
    fn read_config_register(&mut self, reg: usize) -> u32;

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` of configuration register `reg`.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]);

    /// The BARs that decode right now ([`PciConfiguration::bar_mappings`]).
    fn bar_mappings(&self) -> Vec<BarMapping>;

    /// The BARs as programmed, decoding or not ([`PciConfiguration::bar_placements`]): the
    /// root maps memory BARs ([`PciDevice::bar_memory`]) there before the guest enables
    /// decoding. The default, [`PciDevice::bar_mappings`], maps them when it does.
    fn bar_placements(&self) -> Vec<BarMapping> {
        self.bar_mappings()
    }

    /// If BAR `bar` is plain memory (a VRAM aperture), its host mapping: the root then maps it
    /// straight into the guest through its [`GuestMapper`] and guest accesses never exit.
    fn bar_memory(&self, bar: usize) -> Option<HostMemory> {
        let _ = bar;
        None
    }

    /// Eventfds that should fire on guest writes at `(offset, eventfd)` inside trapped BAR
    /// `bar` (doorbells): the root registers them with its [`GuestMapper`] wherever the BAR
    /// decodes, so those writes never reach the device through `write_bar`.
    fn ioeventfds(&self, bar: usize) -> Vec<(u64, vmm_sys_util::eventfd::EventFd)> {
        let _ = bar;
        Vec::new()
    }

    /// A guest read of `data.len()` bytes at `offset` inside BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xff);
    }

    /// A guest write at `offset` inside BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }
}

/// A PCI function that locks inside (or needs no lock), reached through `&self`: accesses from
/// several vCPUs reach it at once, so one that blocks (a register read that waits for the
/// device, a reset) holds up neither the other vCPUs' accesses to it nor configuration
/// accesses to any slot. (Cloud Hypervisor's `BusDeviceSync` is the model.) The methods mean
/// what they mean in [`PciDevice`].
pub trait PciDeviceSync: Send + Sync {
    /// See [`PciDevice::read_config_register`].
    fn read_config_register(&self, reg: usize) -> u32;
    /// See [`PciDevice::write_config_register`].
    fn write_config_register(&self, reg: usize, offset: u64, data: &[u8]);
    /// See [`PciDevice::bar_mappings`].
    fn bar_mappings(&self) -> Vec<BarMapping>;
    /// See [`PciDevice::bar_placements`].
    fn bar_placements(&self) -> Vec<BarMapping> {
        self.bar_mappings()
    }
    /// See [`PciDevice::bar_memory`].
    fn bar_memory(&self, bar: usize) -> Option<HostMemory> {
        let _ = bar;
        None
    }
    /// See [`PciDevice::ioeventfds`].
    fn ioeventfds(&self, bar: usize) -> Vec<(u64, vmm_sys_util::eventfd::EventFd)> {
        let _ = bar;
        Vec::new()
    }
    /// See [`PciDevice::read_bar`].
    fn read_bar(&self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xff);
    }
    /// See [`PciDevice::write_bar`].
    fn write_bar(&self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }
}
