//! PCI: configuration space, BARs and capabilities (`config`), the root bus behind the conf1
//! ports 0xCF8/0xCFC (`root`), BAR address allocation (`allocator`) and the host bridge.

pub mod allocator;
pub mod config;
pub mod host_bridge;
pub mod root;

pub use allocator::{AllocatorError, BarAllocator};
pub use config::{BarKind, BarMapping, PciConfiguration, PciHeader};
pub use host_bridge::HostBridge;
pub use root::{PciRoot, PciRootError};

/// A PCI function: a configuration space plus the behaviour behind its BARs.
///
/// The default methods give a function whose configuration space is entirely described by its
/// [`PciConfiguration`]; devices with live capabilities (MSI-X) override the config write to
/// observe it.
pub trait PciDevice: Send {
    /// The function's configuration space.
    fn config(&self) -> &PciConfiguration;
    /// The function's configuration space, mutably.
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// Reads the 32-bit configuration register `reg` (0..64).
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` of configuration register `reg`.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config_mut().write_reg(reg, offset, data);
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
