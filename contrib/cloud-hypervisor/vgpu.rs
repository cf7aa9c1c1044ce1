// Copyright the Tessera authors.
//
// SPDX-License-Identifier: Apache-2.0
//

//! A Tessera vGPU built into Cloud Hypervisor's device manager (`--vgpu profile=NAME`).
//!
//! This file lives in the Tessera repository (`contrib/cloud-hypervisor/vgpu.rs`);
//! `cargo xtask cloud-hypervisor` copies it into Cloud Hypervisor's tree as
//! `vmm/src/device_manager/vgpu.rs`, a child of the device manager, and `vgpu.patch` adds
//! the two calls that reach it. The device model is Tessera's `vgpu` crate; this module only
//! joins it to Cloud Hypervisor's PCI, interrupt and memory machinery:
//!
//! - Configuration space and MSI-X are Cloud Hypervisor's own (`PciConfiguration`,
//!   `MsixConfig`), as for its virtio-pci and ivshmem devices: BAR moves, the MSI-X table,
//!   the PBA and KVM's routes follow its rules. The vGPU is built with
//!   `Interrupts::Vectors`: it asks for vector `v`, and [`Vectors`] sends it, or marks it
//!   pending while it is masked.
//! - BAR 0 (registers) is trapped: the vCPU's access reaches `Vgpu::read_bar/write_bar`
//!   through [`Bars`], the bus device registered for both BARs, which takes no lock of the
//!   device's: a vCPU blocked in the vGPU (a `WAIT` read, up to 100 ms; a reset) holds up no
//!   other vCPU's BAR or configuration accesses. Each context's doorbell is an ioeventfd at
//!   BAR 0 + offset, so a doorbell write never leaves KVM; [`VgpuDevice::move_bar`] moves
//!   them with BAR 0.
//! - BAR 2 (VRAM) is the vGPU's VRAM mapped into the guest as a user memory region, moved
//!   with BAR 2. A backend whose VRAM cannot be mapped leaves it trapped.
//! - Doorbell ioeventfds and the VRAM slot only speed up what the trapped path also serves.
//!   Cloud Hypervisor moves a BAR's bus range before it calls `move_bar` and does not move it
//!   back, so the BAR always moves, and one of them that cannot follow stays trapped.
//! - The vGPU reaches guest RAM through its own mapping of the RAM's files (so
//!   `--memory shared=on` is required, as for vfio-user), checked against a DMA domain of
//!   exactly the guest's RAM regions.
//! - Its threads (command processor, engines) are made here, on the VMM thread, at device
//!   creation; nothing on a vCPU thread creates a thread or a file.
//! - Snapshot and live migration are refused (the VMM refuses them before pausing anything;
//!   the device refuses too). Pause and resume work.

use std::any::Any;
use std::ops::{Range, RangeFrom};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;
use std::{io, result};

use anyhow::anyhow;
use hypervisor::IoEventAddress;
use log::{info, warn};
use pci::{
    BarReprogrammingParams, MaybeMutInterruptSourceGroup, MsixCap, MsixConfig, PciBarConfiguration,
    PciBarPrefetchable, PciBarRegionType, PciBdf, PciClassCode, PciConfiguration, PciDevice,
    PciDeviceError, PciHeaderType, PciSubclass,
};
use tessera_vgpu::abi::pci as abi_pci;
use tessera_vgpu::pci::{HostMemory, Interrupts, PciDeviceSync, VectorSink};
use tessera_vgpu::physical::{GpuSpec, Lease, PhysicalGpu};
use tessera_vgpu::{BarAddresses, DmaDomain, Vgpu, VgpuSetup};
use vm_allocator::{AddressAllocator, MemorySlotAllocator, SystemAllocator};
use vm_device::interrupt::{InterruptManager, InterruptSourceGroup, MsiIrqGroupConfig};
use vm_device::{BusDeviceSync, Resource};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion,
};
use vm_migration::{Migratable, MigratableError, Pausable, Snapshot, Snapshottable, Transportable};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceManager, DeviceManagerError, DeviceManagerResult};
use crate::device_tree::DeviceNode;
use crate::vm_config::{VgpuConfig, VmConfig};

/// The vGPU's own view of guest RAM (no dirty bitmap: its writes are never migrated).
type OwnRam = vm_memory::GuestMemoryMmap<()>;

const BAR_REGS: usize = abi_pci::BAR_REGS;
const BAR_VRAM: usize = abi_pci::BAR_VRAM;
const VECTORS: u16 = abi_pci::MSIX_VECTORS;
/// BAR 0's MSI-X window (table, then PBA, to the end of the BAR): Cloud Hypervisor's
/// `MsixConfig` answers inside it, never the vGPU.
const MSIX_WINDOW: RangeFrom<u64> = abi_pci::MSIX_TABLE_OFFSET..;
/// The table's and the PBA's bytes; the rest of the window reads 0 and ignores writes.
const TABLE: Range<u64> =
    abi_pci::MSIX_TABLE_OFFSET..abi_pci::MSIX_TABLE_OFFSET + VECTORS as u64 * 16;
const PBA: Range<u64> =
    abi_pci::MSIX_PBA_OFFSET..abi_pci::MSIX_PBA_OFFSET + (VECTORS as u64).div_ceil(64) * 8;
/// How long a pause waits for the command processor to stop.
const PAUSE_WITHIN: Duration = Duration::from_secs(5);
/// Generated ids: `_vgpu0`, `_vgpu1`, …
const VGPU_DEVICE_NAME_PREFIX: &str = "_vgpu";

/// The 3D-controller subclass of the display class.
#[derive(Clone, Copy)]
struct ThreeD;

impl PciSubclass for ThreeD {
    fn get_register_value(&self) -> u8 {
        abi_pci::SUBCLASS
    }
}

/// Where the vGPU's vectors go: Cloud Hypervisor's MSI-X table decides.
struct Vectors {
    msix: Arc<Mutex<MsixConfig>>,
    group: Arc<dyn InterruptSourceGroup>,
}

impl VectorSink for Vectors {
    fn trigger(&self, v: u16) {
        let mut msix = self.msix.lock().unwrap();
        let Some(entry) = msix.table_entries.get(usize::from(v)) else {
            return;
        };
        if !msix.enabled() {
            return;
        }
        if msix.masked() || entry.masked() {
            // Sent when the guest unmasks it (`MsixConfig::write_table`).
            msix.set_pba_bit(v, false);
            return;
        }
        if let Err(e) = self.group.trigger(u32::from(v)) {
            warn!("vGPU: cannot send MSI-X vector {v}: {e}");
        }
    }
}

/// Where no BAR is (before allocation).
const UNPLACED: u64 = u64::MAX;

/// The vGPU's BARs on Cloud Hypervisor's MMIO bus, served without the device's lock (the bus
/// holds this, not the `Mutex` around [`VgpuDevice`]). It records where each BAR is; the
/// device, under its lock, places and moves them, and an access names its BAR by the base
/// the bus found it at.
struct Bars {
    vgpu: Arc<Vgpu>,
    msix: Arc<Mutex<MsixConfig>>,
    regs: AtomicU64,
    vram: AtomicU64,
}

impl Bars {
    fn bar_at(&self, base: u64) -> Option<usize> {
        if base == UNPLACED {
            None
        } else if base == self.regs.load(Ordering::Acquire) {
            Some(BAR_REGS)
        } else if base == self.vram.load(Ordering::Acquire) {
            Some(BAR_VRAM)
        } else {
            None
        }
    }

    /// Where `bar` is ([`UNPLACED`] before allocation).
    fn at(&self, bar: usize) -> u64 {
        match bar {
            BAR_REGS => self.regs.load(Ordering::Acquire),
            BAR_VRAM => self.vram.load(Ordering::Acquire),
            _ => UNPLACED,
        }
    }

    fn place(&self, bar: usize, gpa: u64) {
        match bar {
            BAR_REGS => self.regs.store(gpa, Ordering::Release),
            BAR_VRAM => self.vram.store(gpa, Ordering::Release),
            _ => {}
        }
    }
}

impl BusDeviceSync for Bars {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        match self.bar_at(base) {
            Some(BAR_REGS) if TABLE.contains(&offset) => self
                .msix
                .lock()
                .unwrap()
                .read_table(offset - TABLE.start, data),
            Some(BAR_REGS) if PBA.contains(&offset) => {
                self.msix.lock().unwrap().read_pba(offset - PBA.start, data);
            }
            Some(BAR_REGS) if MSIX_WINDOW.contains(&offset) => data.fill(0),
            Some(bar) => self.vgpu.read_bar(bar, offset, data),
            None => data.fill(0),
        }
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) -> Option<Arc<Barrier>> {
        match self.bar_at(base) {
            Some(BAR_REGS) if TABLE.contains(&offset) => self
                .msix
                .lock()
                .unwrap()
                .write_table(offset - TABLE.start, data),
            // The PBA is read-only.
            Some(BAR_REGS) if MSIX_WINDOW.contains(&offset) => {}
            Some(bar) => self.vgpu.write_bar(bar, offset, data),
            None => {}
        }
        None
    }
}

/// A Tessera vGPU as a Cloud Hypervisor PCI device.
pub struct VgpuDevice {
    id: String,
    vgpu: Arc<Vgpu>,
    /// Its BARs on the bus (shared with the bus).
    bars: Arc<Bars>,
    /// Holds the vGPU's share of its GPU.
    _lease: Lease,
    configuration: PciConfiguration,
    vm: Arc<dyn hypervisor::Vm>,
    /// Each context's doorbell and its offset in BAR 0.
    doorbells: Vec<(u64, EventFd)>,
    /// Whether the doorbells are registered at BAR 0 (else they are trapped).
    doorbells_at_regs: bool,
    /// The VRAM aperture and its memory slot, while it is mapped.
    aperture: Option<(HostMemory, u32)>,
    slots: MemorySlotAllocator,
}

impl VgpuDevice {
    fn new(
        id: String,
        profile: &tessera_vgpu::Profile,
        guest_ram: OwnRam,
        vm: Arc<dyn hypervisor::Vm>,
        msi: &Arc<dyn InterruptManager<GroupConfig = MsiIrqGroupConfig>>,
        bdf: PciBdf,
        slots: MemorySlotAllocator,
    ) -> anyhow::Result<Self> {
        let group = msi
            .create_group(MsiIrqGroupConfig {
                base: 0,
                count: u32::from(VECTORS),
            })
            .map_err(|e| anyhow!("cannot create the MSI-X interrupt group: {e}"))?;
        let msix = Arc::new(Mutex::new(
            MsixConfig::new(
                VECTORS,
                MaybeMutInterruptSourceGroup::Immutable(group.clone()),
                bdf.into(),
                None,
            )
            .map_err(|e| anyhow!("cannot set up MSI-X: {e:?}"))?,
        ));
        let mut configuration = PciConfiguration::new(
            abi_pci::VENDOR_ID,
            abi_pci::DEVICE_ID,
            abi_pci::REVISION,
            PciClassCode::DisplayController,
            &ThreeD,
            None,
            PciHeaderType::Device,
            abi_pci::SUBSYSTEM_VENDOR_ID,
            profile.subsystem_id(),
            Some(msix.clone()),
            None,
        );
        let mut cap = MsixCap::new(
            BAR_REGS as u8,
            VECTORS,
            abi_pci::MSIX_TABLE_OFFSET as u32,
            BAR_REGS as u8,
            abi_pci::MSIX_PBA_OFFSET as u32,
        );
        // A function comes out of reset with MSI-X off and unmasked.
        cap.set_msg_ctl(0);
        configuration
            .add_capability(&cap)
            .map_err(|e| anyhow!("cannot add the MSI-X capability: {e:?}"))?;

        // A GPU of its own, shaped like the profile (as `tessera vm --vgpu` does).
        let gpu = PhysicalGpu::new(&GpuSpec::whole(profile.vram, profile.engines))?;
        let lease = gpu.lease(profile, None)?;
        let ranges: Vec<(u64, u64)> = guest_ram
            .iter()
            .map(|r| (r.start_addr().raw_value(), r.len()))
            .collect();
        let vgpu = Vgpu::new(VgpuSetup {
            bars: BarAddresses { regs: 0, vram: 0 },
            sys: guest_ram,
            domain: DmaDomain::new(ranges),
            interrupts: Interrupts::Vectors(Arc::new(Vectors {
                msix: msix.clone(),
                group,
            })),
            ..VgpuSetup::from_lease(&lease)
        })?;
        let doorbells = vgpu.ioeventfds(BAR_REGS);
        let vgpu = Arc::new(vgpu);
        Ok(VgpuDevice {
            id,
            bars: Arc::new(Bars {
                vgpu: vgpu.clone(),
                msix,
                regs: AtomicU64::new(UNPLACED),
                vram: AtomicU64::new(UNPLACED),
            }),
            vgpu,
            _lease: lease,
            configuration,
            vm,
            doorbells,
            doorbells_at_regs: false,
            aperture: None,
            slots,
        })
    }

    /// Registers the doorbells at BAR 0 and maps the VRAM at BAR 2 (once the BARs are
    /// allocated).
    fn activate(&mut self) -> io::Result<()> {
        self.register_doorbells(self.bars.at(BAR_REGS))?;
        self.doorbells_at_regs = true;
        if let Some(memory) = self.vgpu.bar_memory(BAR_VRAM) {
            let slot = self.slots.next_memory_slot();
            if let Err(e) = self.map_vram(slot, self.bars.at(BAR_VRAM), &memory) {
                self.slots.free_memory_slot(slot);
                return Err(e);
            }
            self.aperture = Some((memory, slot));
        }
        Ok(())
    }

    /// Registers every doorbell at `base`, or none (what it registered is taken back).
    fn register_doorbells(&self, base: u64) -> io::Result<()> {
        for (n, (off, evt)) in self.doorbells.iter().enumerate() {
            if let Err(e) = self
                .vm
                .register_ioevent(evt, &IoEventAddress::Mmio(base + off), None)
            {
                self.unregister_first(base, n);
                return Err(io::Error::other(e));
            }
        }
        Ok(())
    }

    fn unregister_doorbells(&self, base: u64) {
        self.unregister_first(base, self.doorbells.len());
    }

    fn unregister_first(&self, base: u64, n: usize) {
        for (off, evt) in &self.doorbells[..n] {
            if let Err(e) = self
                .vm
                .unregister_ioevent(evt, &IoEventAddress::Mmio(base + off))
            {
                warn!("vGPU {}: cannot remove a doorbell: {e}", self.id);
            }
        }
    }

    fn map_vram(&self, slot: u32, gpa: u64, memory: &HostMemory) -> io::Result<()> {
        // SAFETY: `memory` is the vGPU's VRAM mapping, `len` bytes at `host_addr`; the device
        // holds it (in `aperture`) until the region is removed.
        unsafe {
            self.vm.create_user_memory_region(
                slot,
                gpa,
                memory.len() as usize,
                memory.host_addr() as *mut u8,
                false,
                false,
            )
        }
        .map_err(io::Error::other)
    }

    fn unmap_vram(&self, slot: u32, gpa: u64, memory: &HostMemory) -> io::Result<()> {
        // SAFETY: removes the region `map_vram` made with the same arguments.
        unsafe {
            self.vm.remove_user_memory_region(
                slot,
                gpa,
                memory.len() as usize,
                memory.host_addr() as *mut u8,
                false,
                false,
            )
        }
        .map_err(io::Error::other)
    }
}

impl Drop for VgpuDevice {
    fn drop(&mut self) {
        if self.doorbells_at_regs {
            self.unregister_doorbells(self.bars.at(BAR_REGS));
        }
        if let Some((memory, slot)) = self.aperture.take() {
            if let Err(e) = self.unmap_vram(slot, self.bars.at(BAR_VRAM), &memory) {
                warn!("vGPU {}: cannot unmap the VRAM: {e}", self.id);
            }
            self.slots.free_memory_slot(slot);
        }
    }
}

impl PciDevice for VgpuDevice {
    fn allocate_bars(
        &mut self,
        _allocator: &mut SystemAllocator,
        mmio32_allocator: &mut AddressAllocator,
        mmio64_allocator: &mut AddressAllocator,
        resources: Option<Vec<Resource>>,
    ) -> result::Result<Vec<PciBarConfiguration>, PciDeviceError> {
        let (mut regs_at, mut vram_at) = (None, None);
        for r in resources.into_iter().flatten() {
            if let Resource::PciBar { index, base, .. } = r {
                match index {
                    BAR_REGS => regs_at = Some(GuestAddress(base)),
                    BAR_VRAM => vram_at = Some(GuestAddress(base)),
                    _ => {}
                }
            }
        }
        let regs_size = abi_pci::BAR_REGS_SIZE;
        let vram_size = self.vgpu.vram().size();
        // Natural alignment: a BAR's address is a multiple of its size.
        let regs = mmio32_allocator
            .allocate(regs_at, regs_size, Some(regs_size))
            .ok_or(PciDeviceError::IoAllocationFailed(regs_size))?;
        let Some(vram) = mmio64_allocator.allocate(vram_at, vram_size, Some(vram_size)) else {
            mmio32_allocator.free(regs, regs_size);
            return Err(PciDeviceError::IoAllocationFailed(vram_size));
        };
        let bars = vec![
            PciBarConfiguration::default()
                .set_index(BAR_REGS)
                .set_address(regs.raw_value())
                .set_size(regs_size)
                .set_region_type(PciBarRegionType::Memory32BitRegion)
                .set_prefetchable(PciBarPrefetchable::NotPrefetchable),
            PciBarConfiguration::default()
                .set_index(BAR_VRAM)
                .set_address(vram.raw_value())
                .set_size(vram_size)
                .set_region_type(PciBarRegionType::Memory64BitRegion)
                .set_prefetchable(PciBarPrefetchable::Prefetchable),
        ];
        for bar in &bars {
            self.configuration
                .add_pci_bar(bar)
                .map_err(|e| PciDeviceError::IoRegistrationFailed(bar.addr(), e))?;
        }
        self.bars.place(BAR_REGS, regs.raw_value());
        self.bars.place(BAR_VRAM, vram.raw_value());
        Ok(bars)
    }

    fn free_bars(
        &mut self,
        _allocator: &mut SystemAllocator,
        mmio32_allocator: &mut AddressAllocator,
        mmio64_allocator: &mut AddressAllocator,
    ) -> result::Result<(), PciDeviceError> {
        mmio32_allocator.free(GuestAddress(self.bars.at(BAR_REGS)), abi_pci::BAR_REGS_SIZE);
        mmio64_allocator.free(
            GuestAddress(self.bars.at(BAR_VRAM)),
            self.vgpu.vram().size(),
        );
        Ok(())
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> (Vec<BarReprogrammingParams>, Option<Arc<Barrier>>) {
        (
            self.configuration
                .write_config_register(reg_idx, offset, data),
            None,
        )
    }

    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.configuration.read_reg(reg_idx)
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        self.bars.read(base, offset, data);
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Arc<Barrier>> {
        self.bars.write(base, offset, data)
    }

    /// Moves BAR 0 (with its doorbells) or BAR 2 (with its VRAM slot). Cloud Hypervisor has
    /// already moved the bus range and keeps it moved even when this fails, so the BAR moves
    /// here in any case: doorbells that cannot be registered at the new base, or VRAM that
    /// cannot be mapped there, stay trapped (the trapped path serves both). Only a VRAM slot
    /// that cannot be taken down (it would stay at the old address) is an error.
    fn move_bar(&mut self, old_base: u64, new_base: u64) -> io::Result<()> {
        let bar = self.bars.bar_at(old_base);
        if bar == Some(BAR_REGS) {
            if self.doorbells_at_regs {
                self.unregister_doorbells(old_base);
            }
            self.doorbells_at_regs = match self.register_doorbells(new_base) {
                Ok(()) => true,
                Err(e) => {
                    warn!(
                        "vGPU {}: doorbells stay trapped at {new_base:#x}: {e}",
                        self.id
                    );
                    false
                }
            };
        } else if bar == Some(BAR_VRAM) {
            if let Some((memory, slot)) = self.aperture.take() {
                if let Err(e) = self.unmap_vram(slot, old_base, &memory) {
                    self.aperture = Some((memory, slot));
                    return Err(e);
                }
                match self.map_vram(slot, new_base, &memory) {
                    Ok(()) => self.aperture = Some((memory, slot)),
                    Err(e) => {
                        warn!("vGPU {}: VRAM stays trapped at {new_base:#x}: {e}", self.id);
                        self.slots.free_memory_slot(slot);
                    }
                }
            }
        }
        if let Some(bar) = bar {
            self.bars.place(bar, new_base);
        }
        Ok(())
    }

    fn restore_bar_addr(&mut self, params: &BarReprogrammingParams) {
        self.configuration.restore_bar_addr(params);
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn id(&self) -> Option<String> {
        Some(self.id.clone())
    }
}

impl Pausable for VgpuDevice {
    fn pause(&mut self) -> result::Result<(), MigratableError> {
        self.vgpu
            .pause(PAUSE_WITHIN)
            .map_err(|e| MigratableError::Pause(anyhow!("vGPU {}: {e}", self.id)))
    }

    fn resume(&mut self) -> result::Result<(), MigratableError> {
        self.vgpu.resume();
        Ok(())
    }
}

/// Why a VM with an embedded vGPU cannot be snapshotted or migrated.
const NOT_MIGRATABLE: &str = "a VM with a --vgpu device cannot be snapshotted or migrated \
    (its GPU state is not saved); use a vGPU served over vfio-user (tessera serve)";

impl Snapshottable for VgpuDevice {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> result::Result<Snapshot, MigratableError> {
        Err(MigratableError::Snapshot(anyhow!(NOT_MIGRATABLE)))
    }
}

impl Transportable for VgpuDevice {}

impl Migratable for VgpuDevice {
    fn start_dirty_log(&mut self) -> result::Result<(), MigratableError> {
        Err(MigratableError::StartDirtyLog(anyhow!(NOT_MIGRATABLE)))
    }

    fn start_migration(&mut self) -> result::Result<(), MigratableError> {
        Err(MigratableError::StartMigration(anyhow!(NOT_MIGRATABLE)))
    }
}

impl VmConfig {
    /// Why this VM can be neither snapshotted nor migrated: it has embedded vGPUs. Asked by
    /// `Vm::snapshot` and `vm_send_migration` before anything is paused or sent.
    pub(crate) fn vgpu_migration_refusal(&self) -> Option<&'static str> {
        self.vgpus
            .as_ref()
            .is_some_and(|v| !v.is_empty())
            .then_some(NOT_MIGRATABLE)
    }
}

/// The guest's RAM as the vGPU's own mapping of the files behind it.
fn guest_ram_for_vgpu(dm: &DeviceManager) -> anyhow::Result<OwnRam> {
    let memory = dm.memory_manager.lock().unwrap().guest_memory().memory();
    let mut regions = Vec::new();
    for r in memory.iter() {
        let fo = r.file_offset().ok_or_else(|| {
            anyhow!(
                "guest RAM at {:#x} has no file: use --memory shared=on",
                r.start_addr().0
            )
        })?;
        let file = fo.file().try_clone()?;
        regions.push((
            r.start_addr(),
            r.len() as usize,
            Some(FileOffset::new(file, fo.start())),
        ));
    }
    Ok(OwnRam::from_ranges_with_files(regions)?)
}

impl DeviceManager {
    /// Every `--vgpu`: builds it, places it on its PCI segment and commits it.
    pub(super) fn add_vgpu_devices(&mut self) -> DeviceManagerResult<()> {
        let mut vgpus = self.config.lock().unwrap().vgpus.take();
        let result = vgpus
            .iter_mut()
            .flatten()
            .try_for_each(|cfg| self.add_vgpu_device(cfg));
        // Generated ids are kept in the configuration (`vm.info` shows them).
        self.config.lock().unwrap().vgpus = vgpus;
        result
    }

    fn add_vgpu_device(&mut self, cfg: &mut VgpuConfig) -> DeviceManagerResult<()> {
        let id = match &cfg.pci_common.id {
            Some(id) => id.clone(),
            None => {
                let id = self.next_device_name(VGPU_DEVICE_NAME_PREFIX)?;
                cfg.pci_common.id = Some(id.clone());
                id
            }
        };
        let profile = tessera_vgpu::PROFILES
            .iter()
            .find(|p| p.name == cfg.profile)
            .ok_or_else(|| {
                DeviceManagerError::VgpuCreate(anyhow!("unknown profile {}", cfg.profile))
            })?;
        info!("Creating vGPU {id} ({})", profile.name);
        let (segment, bdf, resources) = self.pci_resources(
            &id,
            cfg.pci_common.pci_segment,
            cfg.pci_common.pci_device_id,
        )?;
        let guest_ram = guest_ram_for_vgpu(self).map_err(DeviceManagerError::VgpuCreate)?;
        let slots = self.memory_manager.lock().unwrap().memory_slot_allocator();
        let device = VgpuDevice::new(
            id.clone(),
            profile,
            guest_ram,
            self.address_manager.vm.clone(),
            &self.msi_interrupt_manager,
            bdf,
            slots,
        )
        .map_err(|e| DeviceManagerError::VgpuCreate(e.context(format!("vGPU {id}"))))?;
        let device = Arc::new(Mutex::new(device));
        let (bars, new_resources) = self.allocate_pci_bars(device.clone(), segment, resources)?;
        device
            .lock()
            .unwrap()
            .activate()
            .map_err(|e| DeviceManagerError::VgpuCreate(anyhow!("vGPU {id}: {e}")))?;

        let mut node = crate::device_node!(id, device);
        node.resources = new_resources;
        node.pci_bdf = Some(bdf);
        node.pci_device_handle = None;
        self.device_tree.lock().unwrap().insert(id, node);
        // The bus gets the lock-free BARs, the PCI bus the device (configuration space).
        let bus_device = device.lock().unwrap().bars.clone();
        self.commit_pci_device(bus_device, device, segment, bdf, bars)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    use tessera_vgpu::abi::{ctx_control, limits, regs, wait};
    use vm_device::Bus;
    use vm_device::interrupt::{InterruptIndex, InterruptSourceConfig};

    use super::*;

    /// MSI-X vectors that go nowhere.
    struct Nowhere;

    impl InterruptSourceGroup for Nowhere {
        fn trigger(&self, _: InterruptIndex) -> io::Result<()> {
            Ok(())
        }

        fn notifier(&self, _: InterruptIndex) -> Option<EventFd> {
            None
        }

        fn update(
            &self,
            _: InterruptIndex,
            _: InterruptSourceConfig,
            _: bool,
            _: bool,
        ) -> io::Result<()> {
            Ok(())
        }

        fn set_gsi(&self) -> io::Result<()> {
            Ok(())
        }
    }

    const REGS_AT: u64 = 0xc000_0000;
    const MOVED_TO: u64 = 0xc100_0000;

    fn read(mmio: &Bus, addr: u64) -> u32 {
        let mut d = [0u8; 4];
        mmio.read(addr, &mut d).expect("BAR 0 read");
        u32::from_le_bytes(d)
    }

    fn write(mmio: &Bus, addr: u64, v: u32) {
        mmio.write(addr, &v.to_le_bytes()).expect("BAR 0 write");
    }

    /// What the adapter puts on the MMIO bus serves BAR 0 while another vCPU is blocked in a
    /// `WAIT` read of the same vGPU (registers, the MSI-X table), and follows the BAR when it
    /// moves. With the device's `Mutex` on the bus, the first access would wait for the
    /// whole `WAIT`.
    #[test]
    fn a_vcpu_in_wait_holds_up_no_other_bar_access() {
        let profile = &tessera_vgpu::PROFILES[0];
        let gpu = PhysicalGpu::new(&GpuSpec::whole(profile.vram, profile.engines)).expect("GPU");
        let lease = gpu.lease(profile, None).expect("lease");
        let vgpu = Arc::new(Vgpu::new(VgpuSetup::from_lease(&lease)).expect("vGPU"));
        let msix = MsixConfig::new(
            VECTORS,
            MaybeMutInterruptSourceGroup::Immutable(Arc::new(Nowhere)),
            0,
            None,
        )
        .expect("MSI-X");
        let bars = Arc::new(Bars {
            vgpu,
            msix: Arc::new(Mutex::new(msix)),
            regs: AtomicU64::new(UNPLACED),
            vram: AtomicU64::new(UNPLACED),
        });
        let mmio = Arc::new(Bus::new());
        mmio.insert(bars.clone(), REGS_AT, abi_pci::BAR_REGS_SIZE)
            .expect("BAR 0 on the bus");
        // Not placed yet: reads as nothing.
        assert_eq!(read(&mmio, REGS_AT + regs::MAGIC), 0);
        bars.place(BAR_REGS, REGS_AT);
        assert_eq!(read(&mmio, REGS_AT + regs::MAGIC), regs::MAGIC_VALUE);

        // Context 0 enabled with an empty ring: its fence never reaches 1, so a WAIT read
        // blocks for the whole WAIT timeout.
        let ctx = |reg| REGS_AT + regs::ctx_reg(0, reg);
        write(&mmio, ctx(regs::CTX_RING_BASE_LO), 0x1000);
        write(&mmio, ctx(regs::CTX_RING_SIZE), 16);
        write(&mmio, ctx(regs::CTX_CONTROL), ctx_control::ENABLE);
        write(&mmio, REGS_AT + regs::WAIT_CTX, 0);
        write(&mmio, REGS_AT + regs::WAIT_VALUE, 1);
        let start = Arc::new(Barrier::new(2));
        let waiting = Arc::new(AtomicBool::new(true));
        let blocked = {
            let (mmio, start, waiting) = (mmio.clone(), start.clone(), waiting.clone());
            std::thread::spawn(move || {
                start.wait();
                let t = Instant::now();
                let r = read(&mmio, REGS_AT + regs::WAIT);
                waiting.store(false, Ordering::Release);
                (r, t.elapsed())
            })
        };
        start.wait();
        let mut rounds = 0;
        while waiting.load(Ordering::Acquire) {
            assert_eq!(read(&mmio, REGS_AT + regs::MAGIC), regs::MAGIC_VALUE);
            // Vector 0's control word: masked out of reset.
            assert_eq!(read(&mmio, REGS_AT + TABLE.start + 12), 1);
            rounds += 1;
        }
        let (r, waited) = blocked.join().expect("waiting thread");
        assert_eq!(r, wait::TIMEOUT);
        assert!(waited >= Duration::from_millis(u64::from(limits::WAIT_TIMEOUT_MS)));
        assert!(rounds >= 10, "{rounds} rounds during a {waited:?} WAIT");

        // Moved: the bus range first (as Cloud Hypervisor does), then the address.
        mmio.update_range(
            REGS_AT,
            abi_pci::BAR_REGS_SIZE,
            MOVED_TO,
            abi_pci::BAR_REGS_SIZE,
        )
        .expect("moved on the bus");
        bars.place(BAR_REGS, MOVED_TO);
        assert_eq!(read(&mmio, MOVED_TO + regs::MAGIC), regs::MAGIC_VALUE);
        assert!(
            mmio.read(REGS_AT, &mut [0u8; 4]).is_err(),
            "nothing left at the old base"
        );
    }
}
