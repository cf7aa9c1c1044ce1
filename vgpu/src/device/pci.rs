//! The vGPU as a PCI function: its configuration space (BARs, MSI-X) and the `&self` path a
//! VMM reaches it through.

use super::*;

/// The configuration space of a vGPU function with `header`'s ids: BAR 0 (registers) and
/// BAR 2 (VRAM, `vram_size` bytes) at `bars`, and the MSI-X capability (table and PBA in
/// BAR 0) delivering to `interrupts`. Used by the device itself and by a VMM that shows a
/// vGPU served by another process.
pub fn function_config(
    header: PciHeader,
    bars: BarAddresses,
    vram_size: u64,
    interrupts: Interrupts,
) -> Result<(PciConfiguration, MsixState), ConfigError> {
    let mut config = PciConfiguration::new(header);
    config.add_bar(
        abi_pci::BAR_REGS,
        bars.regs,
        abi_pci::BAR_REGS_SIZE,
        BarKind::Mmio32 {
            prefetchable: false,
        },
    )?;
    config.add_bar(
        abi_pci::BAR_VRAM,
        bars.vram,
        vram_size,
        BarKind::Mmio64 { prefetchable: true },
    )?;
    let msix = MsixState::new(
        &mut config,
        abi_pci::MSIX_VECTORS,
        abi_pci::BAR_REGS as u8,
        (
            abi_pci::MSIX_TABLE_OFFSET as u32,
            abi_pci::MSIX_PBA_OFFSET as u32,
        ),
        interrupts,
    )?;
    Ok((config, msix))
}

/// The vGPU locks inside (its `State` mutex, held briefly; `WAIT` and `RESET` wait on a
/// condition variable that releases it), so a VMM plugs it in through the `&self` path and
/// one vCPU blocked in `WAIT` holds up no other access.
impl PciDeviceSync for Vgpu {
    fn read_config_register(&self, reg: usize) -> u32 {
        self.shared.lock().config.read_reg(reg)
    }

    fn write_config_register(&self, reg: usize, offset: u64, data: &[u8]) {
        let mut st = self.shared.lock();
        st.config.write_reg(reg, offset, data);
        // Enabling MSI-X or clearing the function mask releases pending vectors.
        let State { config, msix, .. } = &mut *st;
        msix.flush_pending(config);
    }

    fn bar_mappings(&self) -> Vec<BarMapping> {
        self.shared.lock().config.bar_mappings()
    }

    fn bar_placements(&self) -> Vec<BarMapping> {
        self.shared.lock().config.bar_placements()
    }

    fn bar_memory(&self, bar: usize) -> Option<HostMemory> {
        if bar != abi_pci::BAR_VRAM {
            return None;
        }
        match self.shared.vram.aperture() {
            Aperture::Mapped { memory, .. } => Some(memory),
            Aperture::Trapped => None,
        }
    }

    fn ioeventfds(&self, bar: usize) -> Vec<(u64, EventFd)> {
        if bar != abi_pci::BAR_REGS {
            return Vec::new();
        }
        (0..self.shared.contexts)
            .filter_map(|i| {
                let evt = self.shared.doorbells[i as usize].try_clone().ok()?;
                Some((regs::doorbell(i), evt))
            })
            .collect()
    }

    fn read_bar(&self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match bar {
            abi_pci::BAR_REGS => {
                let table = abi_pci::MSIX_TABLE_OFFSET..abi_pci::MSIX_PBA_OFFSET;
                if table.contains(&offset) {
                    let st = self.shared.lock();
                    st.msix.read_table(offset - table.start, data);
                } else if offset >= abi_pci::MSIX_PBA_OFFSET {
                    let st = self.shared.lock();
                    st.msix.read_pba(offset - abi_pci::MSIX_PBA_OFFSET, data);
                } else if data.len() == 4 && offset.is_multiple_of(4) {
                    data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
                }
            }
            abi_pci::BAR_VRAM => {
                // Reached when the aperture is trapped (or the VMM chose not to map it).
                let spaces = self.shared.lock().spaces.clone();
                let _ = spaces.read(crate::mem::Loc::Vram, offset, data);
            }
            _ => {}
        }
    }

    fn write_bar(&self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            abi_pci::BAR_REGS => {
                let table = abi_pci::MSIX_TABLE_OFFSET..abi_pci::MSIX_PBA_OFFSET;
                if table.contains(&offset) {
                    let mut st = self.shared.lock();
                    let State { config, msix, .. } = &mut *st;
                    msix.write_table(config, offset - table.start, data);
                } else if let (Ok(b), 0) = (<[u8; 4]>::try_from(data), offset % 4)
                    && offset < abi_pci::MSIX_TABLE_OFFSET
                {
                    self.write_reg(offset, u32::from_le_bytes(b));
                }
            }
            abi_pci::BAR_VRAM => {
                let spaces = self.shared.lock().spaces.clone();
                if spaces.write(crate::mem::Loc::Vram, offset, data).is_ok() {
                    // A trapped aperture: KVM's dirty log does not see this write.
                    self.shared
                        .mark_range(crate::mem::Loc::Vram, offset, data.len() as u64);
                }
            }
            _ => {}
        }
    }
}
