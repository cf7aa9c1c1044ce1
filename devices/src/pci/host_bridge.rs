//! The host bridge at 00:00.0: what guests look for to trust conf1 (class 06/00).

use super::PciDevice;
use super::config::{PciConfiguration, PciHeader};

/// Red Hat's PCI vendor id, under which QEMU registers its generic devices.
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
/// "PCIe host bridge" in that vendor's list; Linux binds no driver to it.
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;

/// A host bridge with no BARs and no capabilities.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    /// A host bridge in its power-on state.
    pub fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id: HOST_BRIDGE_DEVICE,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0,
                revision: 0,
                subsystem_vendor_id: HOST_BRIDGE_VENDOR,
                subsystem_id: 0x1100,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
    }
    fn bar_mappings(&self) -> Vec<super::BarMapping> {
        self.config.bar_mappings()
    }
}
