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

/// A range of host memory backing a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// Start of the host mapping.
    pub host_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Maps host memory into guest-physical space (for a KVM VMM: a memory slot).
pub trait GuestMapper: Send + Sync {
    /// Maps `mem` at guest-physical `gpa`.
    fn map(&self, gpa: u64, mem: HostMemory) -> Result<(), String>;
    /// Removes the mapping at `gpa`.
    fn unmap(&self, gpa: u64, mem: HostMemory);
    /// Makes guest writes at `gpa` signal `evt` instead of exiting to the VMM.
    fn register_ioevent(
        &self,
        gpa: u64,
        evt: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), String>;
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
