//! The PCI root bus on configuration mechanism #1 (ports 0xCF8–0xCFF).
//!
//! The root owns the functions on bus 0 and keeps the MMIO bus in step with their BARs: after
//! every configuration write it compares what each BAR decodes with what is on the bus and
//! moves the range. A BAR programmed outside the PCI windows is not mapped (a hostile or
//! confused guest cannot shadow RAM or the APICs).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::config::{BarMapping, NUM_BARS, lane_shift};
use super::{GuestMapper, PciDevice, PciDeviceSync};
use crate::bus::{Bus, BusDevice, BusDeviceSync, BusError};

/// The conf1 address port.
pub const CONF1_BASE: u16 = 0xcf8;
/// Address (4 bytes) plus data (4 bytes).
pub const CONF1_LEN: u16 = 8;
/// Devices on bus 0.
pub const MAX_DEVICES: u8 = 32;

/// Errors while populating the root bus.
#[derive(Debug, thiserror::Error)]
pub enum PciRootError {
    /// Slot number out of range or taken.
    #[error("PCI slot {0} is out of range or already used")]
    Slot(u8),
    /// A BAR could not be put on the MMIO bus.
    #[error("cannot map BAR {bar} of device {slot}")]
    MapBar {
        /// Slot.
        slot: u8,
        /// BAR.
        bar: usize,
        /// Why.
        #[source]
        source: BusError,
    },
    /// A BAR would decode over another function's BAR.
    #[error("BAR {bar} of device {slot} overlaps another device's BAR")]
    Overlap {
        /// Slot.
        slot: u8,
        /// BAR.
        bar: usize,
    },
    /// A memory BAR could not be mapped into the guest.
    #[error("cannot map memory BAR {bar} of device {slot}")]
    MapMemory {
        /// Slot.
        slot: u8,
        /// BAR.
        bar: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Lock helper: a poisoned device lock still holds consistent register state.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A function in a slot: one the root locks for each access, or one that locks inside.
#[derive(Clone)]
enum Function {
    Locked(Arc<Mutex<dyn PciDevice>>),
    Sync(Arc<dyn PciDeviceSync>),
}

impl Function {
    fn read_config_register(&self, reg: usize) -> u32 {
        match self {
            Function::Locked(d) => lock(d).read_config_register(reg),
            Function::Sync(d) => d.read_config_register(reg),
        }
    }
    fn write_config_register(&self, reg: usize, offset: u64, data: &[u8]) {
        match self {
            Function::Locked(d) => lock(d).write_config_register(reg, offset, data),
            Function::Sync(d) => d.write_config_register(reg, offset, data),
        }
    }
    fn bar_mappings(&self) -> Vec<BarMapping> {
        match self {
            Function::Locked(d) => lock(d).bar_mappings(),
            Function::Sync(d) => d.bar_mappings(),
        }
    }
    fn bar_placements(&self) -> Vec<BarMapping> {
        match self {
            Function::Locked(d) => lock(d).bar_placements(),
            Function::Sync(d) => d.bar_placements(),
        }
    }
    fn bar_memory(&self, bar: usize) -> Option<super::HostMemory> {
        match self {
            Function::Locked(d) => lock(d).bar_memory(bar),
            Function::Sync(d) => d.bar_memory(bar),
        }
    }
    fn ioeventfds(&self, bar: usize) -> Vec<(u64, vmm_sys_util::eventfd::EventFd)> {
        match self {
            Function::Locked(d) => lock(d).ioeventfds(bar),
            Function::Sync(d) => d.ioeventfds(bar),
        }
    }
}

/// Forwards MMIO accesses in one BAR to its function, without a lock of its own.
struct BarWindow {
    dev: Function,
    bar: usize,
}

impl BusDeviceSync for BarWindow {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        match &self.dev {
            Function::Locked(d) => lock(d).read_bar(self.bar, offset, data),
            Function::Sync(d) => d.read_bar(self.bar, offset, data),
        }
    }
    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        match &self.dev {
            Function::Locked(d) => lock(d).write_bar(self.bar, offset, data),
            Function::Sync(d) => d.write_bar(self.bar, offset, data),
        }
    }
}

struct Slot {
    dev: Function,
    windows: Vec<Arc<dyn BusDeviceSync>>,
    /// What is on the MMIO bus or in the guest mapper because it decodes now.
    mapped: Vec<BarMapping>,
    /// Memory BARs mapped where the VMM placed them before they ever decoded (see
    /// [`PciRoot::park_placements`]).
    parked: Vec<BarMapping>,
}

/// Whether two BARs share an address.
fn overlap(a: &BarMapping, b: &BarMapping) -> bool {
    a.addr < b.addr.saturating_add(b.size) && b.addr < a.addr.saturating_add(a.size)
}

/// See the module documentation.
pub struct PciRoot {
    address: u32,
    slots: BTreeMap<u8, Slot>,
    mmio: Arc<Bus>,
    bar_windows: Vec<(u64, u64)>,
    mapper: Option<Arc<dyn GuestMapper>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("address", &self.address)
            .field("slots", &self.slots.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PciRoot {
    /// A root whose BARs live on `mmio` and may only decode inside `bar_windows`
    /// (`(base, size)` pairs).
    pub fn new(mmio: Arc<Bus>, bar_windows: Vec<(u64, u64)>) -> Self {
        PciRoot {
            address: 0,
            slots: BTreeMap::new(),
            mmio,
            bar_windows,
            mapper: None,
        }
    }

    /// Lets memory BARs ([`PciDevice::bar_memory`]) be mapped into the guest through `mapper`
    /// instead of trapping on the MMIO bus.
    pub fn with_guest_mapper(mut self, mapper: Arc<dyn GuestMapper>) -> Self {
        self.mapper = Some(mapper);
        self
    }

    /// Plugs `dev` into slot `slot` of bus 0 (function 0); each access locks it.
    pub fn add_device(
        &mut self,
        slot: u8,
        dev: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), PciRootError> {
        self.add_function(slot, Function::Locked(dev))
    }

    /// Plugs `dev`, which locks inside, into slot `slot` of bus 0 (function 0).
    pub fn add_device_sync(
        &mut self,
        slot: u8,
        dev: Arc<dyn PciDeviceSync>,
    ) -> Result<(), PciRootError> {
        self.add_function(slot, Function::Sync(dev))
    }

    fn add_function(&mut self, slot: u8, dev: Function) -> Result<(), PciRootError> {
        if slot >= MAX_DEVICES || self.slots.contains_key(&slot) {
            return Err(PciRootError::Slot(slot));
        }
        let windows = (0..NUM_BARS)
            .map(|bar| {
                let w: Arc<dyn BusDeviceSync> = Arc::new(BarWindow {
                    dev: dev.clone(),
                    bar,
                });
                w
            })
            .collect();
        self.slots.insert(
            slot,
            Slot {
                dev,
                windows,
                mapped: Vec::new(),
                parked: Vec::new(),
            },
        );
        self.park_placements(slot);
        self.sync_bars(slot)
    }

    /// Whether `m` is a memory BAR that the guest mapper maps (rather than a trapped one).
    fn is_memory(&self, dev: &Function, m: &BarMapping) -> bool {
        self.mapper.is_some() && dev.bar_memory(m.bar).is_some()
    }

    /// Maps `slot`'s memory BARs where they are programmed, before the guest first enables
    /// decoding (Cloud Hypervisor maps BAR memory at device creation too): a memory slot
    /// added while vCPUs run costs milliseconds on some KVM hosts, and the guest would pay it
    /// on the way to its first GPU command. One that overlaps anything mapped waits for
    /// decoding. Until the guest first enables decoding, it reads the device's memory there
    /// instead of all ones.
    fn park_placements(&mut self, slot: u8) {
        let Some(dev) = self.slots.get(&slot).map(|s| s.dev.clone()) else {
            return;
        };
        for m in dev.bar_placements() {
            let taken = self
                .slots
                .values()
                .flat_map(|s| s.mapped.iter().chain(&s.parked))
                .any(|o| overlap(o, &m));
            if taken || !self.in_window(&m) || !self.is_memory(&dev, &m) {
                continue;
            }
            match self.map_bar(slot, &dev, &m) {
                Ok(()) => {
                    if let Some(s) = self.slots.get_mut(&slot) {
                        s.parked.push(m);
                    }
                }
                Err(e) => tracing::warn!("memory BAR not mapped ahead of decoding: {e}"),
            }
        }
    }

    /// Unmaps the parked memory BARs of functions other than `slot` that `wanted` overlaps.
    fn evict_parked(&mut self, slot: u8, wanted: &[BarMapping]) {
        let Some(mapper) = self.mapper.clone() else {
            return;
        };
        for (&other, s) in self.slots.iter_mut().filter(|(k, _)| **k != slot) {
            s.parked.retain(|p| {
                let keep = !wanted.iter().any(|w| overlap(w, p));
                if !keep {
                    tracing::debug!(slot = other, ?p, "parked memory BAR evicted");
                    mapper.unmap(p.addr);
                }
                keep
            });
        }
    }

    fn in_window(&self, m: &BarMapping) -> bool {
        self.bar_windows.iter().any(|&(base, size)| {
            m.addr >= base && m.addr.checked_add(m.size).is_some_and(|e| e <= base + size)
        })
    }

    /// Brings the MMIO bus (and the guest mapper) in line with what `slot`'s BARs decode now.
    ///
    /// A memory BAR mapped ahead ([`PciRoot::park_placements`]) is adopted when it first
    /// decodes where it was placed (no mapping call), moved when it first decodes elsewhere,
    /// and removed when any BAR that decodes overlaps it. From then on the BAR follows the
    /// decode bit strictly: decoding off unmaps it.
    fn sync_bars(&mut self, slot: u8) -> Result<(), PciRootError> {
        let Some(s) = self.slots.get(&slot) else {
            return Ok(());
        };
        let dev = s.dev.clone();
        let wanted: Vec<BarMapping> = dev
            .bar_mappings()
            .into_iter()
            .filter(|m| {
                let ok = self.in_window(m);
                if !ok {
                    tracing::debug!(slot, ?m, "BAR outside the PCI windows left unmapped");
                }
                ok
            })
            .collect();
        let (old, mut parked) = match self.slots.get_mut(&slot) {
            Some(s) if s.mapped != wanted => {
                (std::mem::take(&mut s.mapped), std::mem::take(&mut s.parked))
            }
            _ => return Ok(()),
        };
        self.evict_parked(slot, &wanted);
        for m in old.iter().filter(|m| !wanted.contains(m)) {
            self.unmap_bar(&dev, m);
        }
        // This function's parked BARs under one that decodes now go, unless it is the same
        // BAR at the same place (adopted below).
        parked.retain(|p| {
            let keep = wanted.contains(p) || !wanted.iter().any(|w| overlap(w, p));
            if !keep {
                self.unmap_bar(&dev, p);
            }
            keep
        });
        let mut mapped: Vec<BarMapping> = old.into_iter().filter(|m| wanted.contains(m)).collect();
        let mut result = Ok(());
        let missing: Vec<BarMapping> = wanted.into_iter().filter(|m| !mapped.contains(m)).collect();
        for m in missing {
            if let Some(i) = parked.iter().position(|p| *p == m) {
                mapped.push(parked.swap_remove(i));
                continue;
            }
            if let Some(i) = parked.iter().position(|p| p.bar == m.bar) {
                let p = parked.swap_remove(i);
                self.unmap_bar(&dev, &p);
            }
            // A memory slot would shadow another function's trapped BAR, and a trapped BAR
            // would be shadowed by another's memory slot: refused, like overlapping traps.
            // So would one of the function's own BARs: a guest that moves its VRAM over its
            // registers must not hide them (and its MSI-X table) behind a memory slot.
            let taken = mapped.iter().any(|o| overlap(o, &m))
                || self
                    .slots
                    .iter()
                    .any(|(&k, s)| k != slot && s.mapped.iter().any(|o| overlap(o, &m)));
            if taken {
                result = Err(PciRootError::Overlap { slot, bar: m.bar });
                break;
            }
            match self.map_bar(slot, &dev, &m) {
                Ok(()) => mapped.push(m),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if let Some(s) = self.slots.get_mut(&slot) {
            s.mapped = mapped;
            s.parked = parked;
        }
        result
    }

    fn map_bar(&self, slot: u8, dev: &Function, m: &BarMapping) -> Result<(), PciRootError> {
        let memory = dev.bar_memory(m.bar);
        if let (Some(mapper), Some(mem)) = (&self.mapper, memory) {
            return mapper.map(m.addr, mem.truncated(m.size)).map_err(|source| {
                PciRootError::MapMemory {
                    slot,
                    bar: m.bar,
                    source,
                }
            });
        }
        let window = self
            .slots
            .get(&slot)
            .map(|s| s.windows[m.bar].clone())
            .ok_or(PciRootError::Slot(slot))?;
        self.mmio
            .insert_sync(&window, m.addr, m.size)
            .map_err(|source| PciRootError::MapBar {
                slot,
                bar: m.bar,
                source,
            })?;
        if let Some(mapper) = &self.mapper {
            for (offset, evt) in dev.ioeventfds(m.bar) {
                if let Err(reason) = mapper.register_ioevent(m.addr + offset, &evt) {
                    // The write still reaches the device through the trap: slower, not wrong.
                    tracing::warn!(
                        slot,
                        bar = m.bar,
                        offset,
                        "ioeventfd not registered: {reason}"
                    );
                }
            }
        }
        Ok(())
    }

    fn unmap_bar(&self, dev: &Function, m: &BarMapping) {
        let memory = dev.bar_memory(m.bar);
        match (&self.mapper, memory) {
            (Some(mapper), Some(_)) => mapper.unmap(m.addr),
            // Removal cannot fail for a range we inserted ourselves.
            _ => {
                let _ = self.mmio.remove(m.addr);
                if let Some(mapper) = &self.mapper {
                    for (offset, evt) in dev.ioeventfds(m.bar) {
                        mapper.unregister_ioevent(m.addr + offset, &evt);
                    }
                }
            }
        }
    }

    /// The configuration address latch (port 0xcf8), for a snapshot.
    pub fn address_latch(&self) -> u32 {
        self.address
    }

    /// Restores the address latch and brings every function's BAR mappings in line with its
    /// (restored) configuration space, as after guest writes.
    pub fn restore(&mut self, address: u32) -> Result<(), PciRootError> {
        self.address = address & !0x3;
        let slots: Vec<u8> = self.slots.keys().copied().collect();
        for slot in slots {
            self.sync_bars(slot)?;
        }
        Ok(())
    }

    /// The enabled slot and register that the address port selects, if it selects a present
    /// function 0 on bus 0.
    fn selected(&self) -> Option<(u8, usize)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let slot = ((a >> 11) & 0x1f) as u8;
        let func = (a >> 8) & 0x7;
        let reg = ((a >> 2) & 0x3f) as usize;
        (enabled && bus == 0 && func == 0 && self.slots.contains_key(&slot)).then_some((slot, reg))
    }

    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match self.selected() {
            Some((slot, reg)) => self
                .slots
                .get(&slot)
                .map_or(u32::MAX, |s| s.dev.read_config_register(reg)),
            None => u32::MAX,
        };
        let bytes = (value >> (offset * 8)).to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        let Some((slot, reg)) = self.selected() else {
            return;
        };
        if let Some(s) = self.slots.get(&slot) {
            s.dev.write_config_register(reg, offset, data);
        }
        if let Err(e) = self.sync_bars(slot) {
            tracing::warn!("guest BAR programming not applied: {e}");
        }
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if lane_shift(offset - 4, data.len()).is_some() => {
                self.config_read(offset - 4, data)
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                // Bits 1:0 are reserved and read back as zero.
                self.address = u32::from_le_bytes(b) & !0x3;
            }
            4..=7 if lane_shift(offset - 4, data.len()).is_some() => {
                self.config_write(offset - 4, data)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{BarKind, PciConfiguration, PciHeader};
    use crate::pci::host_bridge::HostBridge;

    struct Gpu {
        config: PciConfiguration,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }
    impl PciDevice for Gpu {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.config.write_reg(reg, offset, data);
        }
        fn bar_mappings(&self) -> Vec<BarMapping> {
            self.config.bar_mappings()
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
    }

    fn addr(slot: u32, reg: u32) -> [u8; 4] {
        (0x8000_0000 | slot << 11 | reg << 2).to_le_bytes()
    }

    fn read32(root: &mut PciRoot, slot: u32, reg: u32) -> u32 {
        root.write(0, 0, &addr(slot, reg));
        let mut d = [0u8; 4];
        root.read(0, 4, &mut d);
        u32::from_le_bytes(d)
    }

    fn write32(root: &mut PciRoot, slot: u32, reg: u32, v: u32) {
        root.write(0, 0, &addr(slot, reg));
        root.write(0, 4, &v.to_le_bytes());
    }

    #[test]
    fn enumerates_host_bridge_only() {
        let mut root = PciRoot::new(Arc::new(Bus::new()), vec![]);
        root.add_device(0, Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        assert_eq!(read32(&mut root, 0, 0), 0x0008_1b36);
        assert_eq!(read32(&mut root, 0, 2) >> 16, 0x0600);
        assert_eq!(read32(&mut root, 1, 0), u32::MAX);
        // Sub-dword reads of the data port.
        root.write(0, 0, &addr(0, 0));
        let mut w = [0u8; 2];
        root.read(0, 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008);
        let mut b = [0u8; 1];
        root.read(0, 5, &mut b);
        assert_eq!(b[0], 0x1b);
        // Disabled address, other bus, other function: absent.
        root.write(0, 0, &0x0000_0000u32.to_le_bytes());
        root.read(0, 4, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        root.write(0, 0, &(0x8001_0000u32).to_le_bytes());
        let mut d = [0u8; 4];
        root.read(0, 4, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(
            root.add_device(0, Arc::new(Mutex::new(HostBridge::new())))
                .is_err()
        );
        assert!(
            root.add_device(32, Arc::new(Mutex::new(HostBridge::new())))
                .is_err()
        );
    }

    #[test]
    fn bars_follow_guest_programming() {
        let mmio = Arc::new(Bus::new());
        let mut root = PciRoot::new(mmio.clone(), vec![(0xc000_0000, 0x1000_0000)]);
        let mut config = PciConfiguration::new(PciHeader::for_tests());
        config
            .add_bar(
                0,
                0xc000_0000,
                0x1000,
                BarKind::Mmio32 {
                    prefetchable: false,
                },
            )
            .unwrap();
        let gpu = Arc::new(Mutex::new(Gpu {
            config,
            last_write: None,
        }));
        root.add_device(3, gpu.clone()).unwrap();
        let mut d = [0u8; 4];
        assert!(mmio.read(0xc000_0010, &mut d).is_err(), "decode off");
        write32(&mut root, 3, 1, 0x2);
        mmio.read(0xc000_0010, &mut d).unwrap();
        assert_eq!(d, [0x10; 4]);
        // Sizing with decode on would map at 0xfffff000: outside the window, so unmapped.
        write32(&mut root, 3, 4, u32::MAX);
        assert_eq!(read32(&mut root, 3, 4), 0xffff_f000);
        assert!(mmio.read(0xffff_f000, &mut d).is_err());
        assert!(mmio.read(0xc000_0000, &mut d).is_err());
        write32(&mut root, 3, 4, 0xc800_0000);
        mmio.write(0xc800_0004, &[7]).unwrap();
        assert_eq!(lock(&gpu).last_write, Some((0, 4, vec![7])));
        write32(&mut root, 3, 1, 0);
        assert!(mmio.read(0xc800_0004, &mut d).is_err(), "decode off again");
    }

    #[derive(Default)]
    struct FakeMapper {
        log: Mutex<Vec<String>>,
    }
    impl GuestMapper for FakeMapper {
        fn map(&self, gpa: u64, mem: crate::pci::HostMemory) -> std::io::Result<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("map {gpa:#x} {:#x}", mem.len()));
            Ok(())
        }
        fn unmap(&self, gpa: u64) {
            self.log.lock().unwrap().push(format!("unmap {gpa:#x}"));
        }
        fn register_ioevent(
            &self,
            gpa: u64,
            _evt: &vmm_sys_util::eventfd::EventFd,
        ) -> std::io::Result<()> {
            self.log.lock().unwrap().push(format!("ioevent {gpa:#x}"));
            Ok(())
        }
        fn unregister_ioevent(&self, gpa: u64, _evt: &vmm_sys_util::eventfd::EventFd) {
            self.log.lock().unwrap().push(format!("noioevent {gpa:#x}"));
        }
    }

    struct Vram {
        config: PciConfiguration,
        doorbell: vmm_sys_util::eventfd::EventFd,
        memory: std::sync::Arc<Vec<u8>>,
    }
    impl PciDevice for Vram {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.config.write_reg(reg, offset, data);
        }
        fn bar_mappings(&self) -> Vec<BarMapping> {
            self.config.bar_mappings()
        }
        fn bar_placements(&self) -> Vec<BarMapping> {
            self.config.bar_placements()
        }
        fn bar_memory(&self, bar: usize) -> Option<crate::pci::HostMemory> {
            // SAFETY: the vector's buffer is this process's memory, allocated once and freed
            // only with the last clone of `memory`, which the handle holds.
            (bar == 2).then(|| unsafe {
                crate::pci::HostMemory::new(
                    self.memory.as_ptr() as u64,
                    self.memory.len() as u64,
                    self.memory.clone(),
                )
            })
        }
        fn ioeventfds(&self, bar: usize) -> Vec<(u64, vmm_sys_util::eventfd::EventFd)> {
            if bar == 0 {
                vec![(0x100, self.doorbell.try_clone().unwrap())]
            } else {
                vec![]
            }
        }
    }

    fn vram_device(bar0: u32, bar2: u32) -> Arc<Mutex<Vram>> {
        let mut config = PciConfiguration::new(PciHeader::for_tests());
        config
            .add_bar(
                0,
                u64::from(bar0),
                0x1000,
                BarKind::Mmio32 {
                    prefetchable: false,
                },
            )
            .unwrap();
        config
            .add_bar(
                2,
                u64::from(bar2),
                0x10_0000,
                BarKind::Mmio64 { prefetchable: true },
            )
            .unwrap();
        Arc::new(Mutex::new(Vram {
            config,
            doorbell: vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
            memory: std::sync::Arc::new(vec![0; 0x10_0000]),
        }))
    }

    /// A root with a fake mapper, and a VRAM device at slot 1 (registers at 0xc000_0000,
    /// VRAM at 0xc800_0000).
    fn root_with_vram() -> (Arc<Bus>, Arc<FakeMapper>, PciRoot) {
        let mmio = Arc::new(Bus::new());
        let mapper = Arc::new(FakeMapper::default());
        let mut root = PciRoot::new(mmio.clone(), vec![(0xc000_0000, 0x1000_0000)])
            .with_guest_mapper(mapper.clone());
        root.add_device(1, vram_device(0xc000_0000, 0xc800_0000))
            .unwrap();
        (mmio, mapper, root)
    }

    #[test]
    fn memory_bars_and_ioevents_follow_the_guest() {
        let (mmio, mapper, mut root) = root_with_vram();
        let log = |m: &FakeMapper| std::mem::take(&mut *m.log.lock().unwrap());
        assert_eq!(
            log(&mapper),
            ["map 0xc8000000 0x100000"],
            "the memory BAR is mapped where it is placed, before decoding"
        );
        write32(&mut root, 1, 1, 0x2);
        assert_eq!(
            log(&mapper),
            ["ioevent 0xc0000100"],
            "enabling decoding at the placed address costs no mapping"
        );
        write32(&mut root, 1, 6, 0xc900_000c);
        write32(&mut root, 1, 1, 0x0);
        assert_eq!(
            log(&mapper),
            [
                "unmap 0xc8000000",
                "map 0xc9000000 0x100000",
                "noioevent 0xc0000100",
                "unmap 0xc9000000",
            ],
            "a BAR moved while decoding moves; once it has decoded, decoding off unmaps it"
        );
        write32(&mut root, 1, 1, 0x2);
        assert_eq!(
            log(&mapper),
            ["ioevent 0xc0000100", "map 0xc9000000 0x100000"]
        );
        let mut d = [0u8; 4];
        assert!(
            mmio.read(0xc800_0000, &mut d).is_err(),
            "memory BARs never trap"
        );
    }

    #[test]
    fn a_bar_that_decodes_over_a_parked_one_evicts_it() {
        let (mmio, mapper, mut root) = root_with_vram();
        // A second device whose VRAM would overlap the first's is not mapped ahead.
        root.add_device(2, vram_device(0xc010_0000, 0xc800_0000))
            .unwrap();
        assert_eq!(
            std::mem::take(&mut *mapper.log.lock().unwrap()),
            ["map 0xc8000000 0x100000"]
        );
        // The guest moves device 2's registers onto device 1's parked VRAM and enables them:
        // the parked VRAM goes, so the registers trap instead of being shadowed.
        write32(&mut root, 2, 4, 0xc800_0000);
        write32(&mut root, 2, 6, 0xcc00_000c);
        write32(&mut root, 2, 1, 0x2);
        let log = std::mem::take(&mut *mapper.log.lock().unwrap());
        assert_eq!(
            log,
            [
                "unmap 0xc8000000",
                "ioevent 0xc8000100",
                "map 0xcc000000 0x100000"
            ]
        );
        mmio.write(0xc800_0004, &[1]).unwrap();
        // Device 1 enables decoding with its VRAM over device 2's registers: that BAR is
        // refused (its registers still map), so device 2's registers still trap.
        write32(&mut root, 1, 1, 0x2);
        let log = std::mem::take(&mut *mapper.log.lock().unwrap());
        assert_eq!(log, ["ioevent 0xc0000100"]);
        let mut d = [0u8; 4];
        mmio.read(0xc800_0004, &mut d).unwrap();
    }

    #[test]
    fn a_bar_moved_over_its_own_functions_registers_is_refused() {
        let (mmio, mapper, mut root) = root_with_vram();
        // The guest puts its VRAM where its registers are, then enables decoding.
        write32(&mut root, 1, 6, 0xc000_000c);
        write32(&mut root, 1, 1, 0x2);
        let log = std::mem::take(&mut *mapper.log.lock().unwrap());
        assert!(
            !log.iter().any(|l| l.starts_with("map 0xc0000000")),
            "VRAM mapped over the registers: {log:?}"
        );
        let mut d = [0u8; 4];
        mmio.read(0xc000_0004, &mut d)
            .expect("the registers still trap");
    }
}
