//! KVM implementations of the device-facing traits: memory slots for BARs that are plain
//! memory, ioeventfds for doorbells, and MSI injection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::pci::{GuestMapper, HostMemory, MsiSink};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_msi, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// Maps device memory into the guest as KVM memory slots and registers MMIO ioeventfds.
#[derive(Debug)]
pub struct KvmMapper {
    vm: Arc<VmFd>,
    slots: Mutex<Slots>,
}

/// The slots a [`KvmMapper`] made.
#[derive(Debug)]
struct Slots {
    /// Guest-physical base → slot and the memory it maps (held until the slot is removed).
    by_gpa: HashMap<u64, (u32, HostMemory)>,
    /// The next slot never used.
    next: u32,
    /// Slots used and removed since, taken again first: a guest that toggles a BAR's memory
    /// decode or moves it again and again must not run out of KVM's slot numbers.
    free: Vec<u32>,
    /// KVM logs the guest's writes to every slot (live migration).
    logging: bool,
}

impl KvmMapper {
    /// A mapper whose slots start at `first_free_slot` (RAM uses the ones below).
    pub fn new(vm: Arc<VmFd>, first_free_slot: u32) -> Self {
        KvmMapper {
            vm,
            slots: Mutex::new(Slots {
                by_gpa: HashMap::new(),
                next: first_free_slot,
                free: Vec::new(),
                logging: false,
            }),
        }
    }

    /// Points `slot` at `mem` (`len` bytes of it; 0 removes the slot), logging writes when
    /// `logging`.
    fn set(
        &self,
        slot: u32,
        gpa: u64,
        mem: &HostMemory,
        len: u64,
        logging: bool,
    ) -> std::io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if logging { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: gpa,
            memory_size: len.min(mem.len()),
            userspace_addr: mem.host_addr(),
        };
        // SAFETY: `mem` is a live mapping of this process for as long as its handle lives
        // (`HostMemory::new`'s contract), and the handle stays in `slots` until this slot is
        // removed, so KVM never sees memory that was unmapped under it.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(std::io::Error::from)
    }
}

impl KvmMapper {
    /// Turns KVM's log of guest writes on or off for every memory BAR mapped now or later.
    pub fn set_dirty_logging(&self, on: bool) -> std::io::Result<()> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for (&gpa, (slot, mem)) in &s.by_gpa {
            self.set(*slot, gpa, mem, mem.len(), on)?;
        }
        s.logging = on;
        Ok(())
    }

    /// The pages the guest wrote in each mapped memory BAR since the last call: (the host
    /// address of the memory mapped, page indexes in it).
    pub fn take_dirty(&self) -> std::io::Result<Vec<(u64, Vec<u64>)>> {
        let s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (slot, mem) in s.by_gpa.values() {
            let bitmap = self.vm.get_dirty_log(*slot, mem.len() as usize)?;
            out.push((mem.host_addr(), pages(&bitmap)));
        }
        Ok(out)
    }
}

/// The page indexes set in a KVM dirty bitmap.
pub fn pages(bitmap: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros();
            out.push(w as u64 * 64 + u64::from(b));
            bits &= bits - 1;
        }
    }
    out
}

/// Guest RAM's KVM memory slots, for turning on the dirty log and reading it.
#[derive(Debug)]
pub struct RamSlots {
    vm: Arc<VmFd>,
    regions: Vec<kvm_userspace_memory_region>,
}

impl RamSlots {
    /// The slots registered with `regions` (flags 0).
    pub fn new(vm: Arc<VmFd>, regions: Vec<kvm_userspace_memory_region>) -> Self {
        RamSlots { vm, regions }
    }

    /// Turns KVM's log of guest writes to RAM on or off.
    pub fn set_dirty_logging(&self, on: bool) -> std::io::Result<()> {
        for r in &self.regions {
            let region = kvm_userspace_memory_region {
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                ..*r
            };
            // SAFETY: the same region as registered at boot (a live mapping of guest RAM that
            // the VM owns until after the KVM VM is gone), only the flags differ.
            unsafe { self.vm.set_user_memory_region(region) }.map_err(std::io::Error::from)?;
        }
        Ok(())
    }

    /// The guest-physical page numbers the guest wrote since the last call.
    pub fn take_dirty(&self) -> std::io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for r in &self.regions {
            let bitmap = self
                .vm
                .get_dirty_log(r.slot, r.memory_size as usize)
                .map_err(std::io::Error::from)?;
            let base = r.guest_phys_addr / 4096;
            out.extend(pages(&bitmap).into_iter().map(|p| base + p));
        }
        Ok(out)
    }
}

impl GuestMapper for KvmMapper {
    fn map(&self, gpa: u64, mem: HostMemory) -> std::io::Result<()> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = s.free.last().copied().unwrap_or(s.next);
        self.set(slot, gpa, &mem, mem.len(), s.logging)?;
        s.by_gpa.insert(gpa, (slot, mem));
        if s.free.pop().is_none() {
            s.next += 1;
        }
        Ok(())
    }

    fn unmap(&self, gpa: u64) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let Some((slot, mem)) = s.by_gpa.remove(&gpa) else {
            return;
        };
        match self.set(slot, gpa, &mem, 0, false) {
            Ok(()) => s.free.push(slot),
            Err(e) => {
                tracing::error!("cannot remove the guest mapping at {gpa:#x}: {e}");
                // KVM may still map it: keep the memory alive rather than free it under the
                // guest, and never hand that slot out again.
                std::mem::forget(mem);
            }
        }
    }

    fn register_ioevent(&self, gpa: u64, evt: &EventFd) -> std::io::Result<()> {
        self.vm
            .register_ioevent(evt, &IoEventAddress::Mmio(gpa), NoDatamatch)
            .map_err(std::io::Error::from)
    }

    fn unregister_ioevent(&self, gpa: u64, evt: &EventFd) {
        if let Err(e) = self
            .vm
            .unregister_ioevent(evt, &IoEventAddress::Mmio(gpa), NoDatamatch)
        {
            tracing::warn!("cannot remove the ioeventfd at {gpa:#x}: {e}");
        }
    }
}

/// Injects MSIs with KVM_SIGNAL_MSI.
#[derive(Debug)]
pub struct KvmMsi(pub Arc<VmFd>);

impl MsiSink for KvmMsi {
    fn send(&self, address: u64, data: u32) {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        if let Err(e) = self.0.signal_msi(msi) {
            tracing::warn!("MSI to {address:#x} (data {data:#x}) not delivered: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    /// A BAR mapped and unmapped many more times than KVM has slots (a guest toggling memory
    /// decode) reuses its slot: the mapper's slot numbers stay where they began.
    #[test]
    fn a_bar_mapped_again_and_again_reuses_its_slot() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let ram = Arc::new(crate::memory::create_guest_ram(2 << 20).unwrap());
        let host = ram.memory.get_host_address(GuestAddress(0)).unwrap() as u64;
        // SAFETY: guest RAM's mapping, alive while `ram` (the owner) is.
        let mem = unsafe { HostMemory::new(host, 2 << 20, ram.clone()) };
        let mapper = KvmMapper::new(vm, 1);
        let (a, b) = (0xc000_0000, 0xd000_0000);
        mapper.map(b, mem.clone()).unwrap();
        for _ in 0..100 {
            mapper.map(a, mem.clone()).unwrap();
            mapper.unmap(a);
        }
        mapper.map(a, mem.clone()).unwrap();
        let s = mapper.slots.lock().unwrap();
        assert_eq!(s.by_gpa[&b].0, 1);
        assert_eq!(s.by_gpa[&a].0, 2);
        assert_eq!((s.next, s.free.len()), (3, 0));
        drop(s);
        // A slot given back by one BAR serves another.
        mapper.unmap(b);
        mapper.map(0xe000_0000, mem).unwrap();
        assert_eq!(mapper.slots.lock().unwrap().by_gpa[&0xe000_0000].0, 1);
    }
}
