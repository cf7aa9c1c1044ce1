//! Port-I/O and MMIO buses that route guest accesses to devices.
//!
//! The bus is safe by construction: a range must be non-empty, must not wrap around the
//! address space and must not overlap a range already on the bus. The bus holds weak
//! references; the VMM owns the devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

/// A device that reacts to guest reads and writes on a bus.
///
/// `base` is the start of the range the access hit and `offset` the distance from it, so one
/// device can serve several ranges (a PCI device with several BARs).
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes; fill `data`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// A guest write of `data`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A device that locks inside (or needs no lock): accesses from several vCPUs reach it at
/// once, so one access that blocks (a register read that waits for the device) does not hold
/// up the others. (Cloud Hypervisor's `BusDeviceSync` is the model.)
pub trait BusDeviceSync: Send + Sync {
    /// A guest read of `data.len()` bytes; fill `data`.
    fn read(&self, base: u64, offset: u64, data: &mut [u8]);
    /// A guest write of `data`.
    fn write(&self, base: u64, offset: u64, data: &[u8]);
}

/// Errors of bus registration and dispatch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of zero length.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
    /// A range that wraps past the end of the address space.
    #[error("bus range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A range that overlaps one already registered.
    #[error("bus range {new} overlaps {existing}")]
    Overlap {
        /// The range being inserted.
        new: BusRange,
        /// The range already on the bus.
        existing: BusRange,
    },
    /// No device is registered at the address.
    #[error("no device at {0:#x}")]
    NoDevice(u64),
    /// The range to remove is not on the bus.
    #[error("no bus range starts at {0:#x}")]
    NotFound(u64),
}

/// A non-empty range `[base, base + len)` that does not wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BusRange {
    base: u64,
    len: u64,
}

impl BusRange {
    /// Validates and creates a range.
    pub fn new(base: u64, len: u64) -> Result<Self, BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        base.checked_add(len - 1)
            .ok_or(BusError::Overflow { base, len })?;
        Ok(BusRange { base, len })
    }

    /// First address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a `BusRange` is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Last address (inclusive).
    pub fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }

    fn contains(&self, addr: u64) -> bool {
        self.base <= addr && addr <= self.last()
    }
}

impl std::fmt::Display for BusRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:#x}, {:#x}]", self.base, self.last())
    }
}

/// A device on the bus: one behind a mutex the bus takes for each access, or one that locks
/// inside.
#[derive(Clone)]
enum DeviceRef {
    Locked(Weak<Mutex<dyn BusDevice>>),
    Sync(Weak<dyn BusDeviceSync>),
}

enum Device {
    Locked(Arc<Mutex<dyn BusDevice>>),
    Sync(Arc<dyn BusDeviceSync>),
}

impl DeviceRef {
    fn upgrade(&self) -> Option<Device> {
        match self {
            DeviceRef::Locked(w) => w.upgrade().map(Device::Locked),
            DeviceRef::Sync(w) => w.upgrade().map(Device::Sync),
        }
    }
}

impl Device {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        match self {
            Device::Locked(d) => d
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(base, offset, data),
            Device::Sync(d) => d.read(base, offset, data),
        }
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        match self {
            Device::Locked(d) => d
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(base, offset, data),
            Device::Sync(d) => d.write(base, offset, data),
        }
    }
}

/// A set of devices, each on one or more non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<BusRange, DeviceRef>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<BusRange> = self.read_map().keys().copied().collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<BusRange, DeviceRef>> {
        self.devices.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<BusRange, DeviceRef>> {
        self.devices.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `device` on `[base, base + len)`; each access locks it.
    pub fn insert(
        &self,
        device: &Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<BusRange, BusError> {
        self.insert_ref(DeviceRef::Locked(Arc::downgrade(device)), base, len)
    }

    /// Puts `device`, which locks inside, on `[base, base + len)`.
    pub fn insert_sync(
        &self,
        device: &Arc<dyn BusDeviceSync>,
        base: u64,
        len: u64,
    ) -> Result<BusRange, BusError> {
        self.insert_ref(DeviceRef::Sync(Arc::downgrade(device)), base, len)
    }

    fn insert_ref(&self, device: DeviceRef, base: u64, len: u64) -> Result<BusRange, BusError> {
        let range = BusRange::new(base, len)?;
        let mut map = self.write_map();
        // The only candidates for overlap are the last range starting at or before our end.
        if let Some((existing, _)) = map
            .range(
                ..=BusRange {
                    base: range.last(),
                    len: u64::MAX,
                },
            )
            .next_back()
            .filter(|(r, _)| r.overlaps(&range))
        {
            return Err(BusError::Overlap {
                new: range,
                existing: *existing,
            });
        }
        map.insert(range, device);
        Ok(range)
    }

    /// Removes the range starting at `base`.
    pub fn remove(&self, base: u64) -> Result<(), BusError> {
        let mut map = self.write_map();
        let key = map
            .keys()
            .find(|r| r.base == base)
            .copied()
            .ok_or(BusError::NotFound(base))?;
        map.remove(&key);
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(BusRange, Device)> {
        let map = self.read_map();
        let (range, dev) = map
            .range(
                ..=BusRange {
                    base: addr,
                    len: u64::MAX,
                },
            )
            .next_back()?;
        if !range.contains(addr) {
            return None;
        }
        Some((*range, dev.upgrade()?))
    }

    /// Dispatches a guest read at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (range, dev) = self.resolve(addr).ok_or(BusError::NoDevice(addr))?;
        dev.read(range.base, addr - range.base, data);
        Ok(())
    }

    /// Dispatches a guest write at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (range, dev) = self.resolve(addr).ok_or(BusError::NoDevice(addr))?;
        dev.write(range.base, addr - range.base, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    fn dev() -> (Arc<Mutex<Recorder>>, Arc<Mutex<dyn BusDevice>>) {
        let d = Arc::new(Mutex::new(Recorder::default()));
        let as_dyn: Arc<Mutex<dyn BusDevice>> = d.clone();
        (d, as_dyn)
    }

    #[test]
    fn rejects_bad_ranges() {
        let bus = Bus::new();
        let (_d, d) = dev();
        assert_eq!(bus.insert(&d, 0x10, 0), Err(BusError::ZeroLength(0x10)));
        assert!(matches!(
            bus.insert(&d, u64::MAX, 2),
            Err(BusError::Overflow { .. })
        ));
        bus.insert(&d, u64::MAX, 1).unwrap();
        bus.insert(&d, 0x10, 0x10).unwrap();
        for (base, len) in [(0x10, 1), (0x1f, 1), (0x8, 0x9), (0x0, 0x100), (0x18, 2)] {
            assert!(
                matches!(bus.insert(&d, base, len), Err(BusError::Overlap { .. })),
                "{base:#x}+{len:#x} must overlap"
            );
        }
        bus.insert(&d, 0x20, 1).unwrap();
        bus.insert(&d, 0x0, 0x10).unwrap();
    }

    #[test]
    fn dispatches_with_base_and_offset() {
        let bus = Bus::new();
        let (rec, d) = dev();
        bus.insert(&d, 0x3f8, 8).unwrap();
        bus.write(0x3fb, &[0x80]).unwrap();
        assert_eq!(rec.lock().unwrap().last, Some((0x3f8, 3, vec![0x80])));
        let mut b = [0u8; 2];
        bus.read(0x3fd, &mut b).unwrap();
        assert_eq!(b, [5, 5]);
        assert_eq!(bus.read(0x3f7, &mut b), Err(BusError::NoDevice(0x3f7)));
        assert_eq!(bus.write(0x400, &b), Err(BusError::NoDevice(0x400)));
    }

    #[test]
    fn holds_weak_references_and_removes() {
        let bus = Bus::new();
        let (rec, d) = dev();
        bus.insert(&d, 0x100, 4).unwrap();
        drop(d);
        drop(rec);
        assert_eq!(bus.write(0x100, &[1]), Err(BusError::NoDevice(0x100)));
        assert_eq!(bus.remove(0x100), Ok(()));
        assert_eq!(bus.remove(0x100), Err(BusError::NotFound(0x100)));
    }
}
