//! KVM implementations of the device-facing traits: memory slots for BARs that are plain
//! memory, ioeventfds for doorbells, and MSI injection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::pci::{GuestMapper, HostMemory, MsiSink};
use kvm_bindings::{kvm_msi, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// Maps device memory into the guest as KVM memory slots and registers MMIO ioeventfds.
#[derive(Debug)]
pub struct KvmMapper {
    vm: Arc<VmFd>,
    /// guest-physical base → slot.
    slots: Mutex<(HashMap<u64, u32>, u32)>,
}

impl KvmMapper {
    /// A mapper whose slots start at `first_free_slot` (RAM uses the ones below).
    pub fn new(vm: Arc<VmFd>, first_free_slot: u32) -> Self {
        KvmMapper {
            vm,
            slots: Mutex::new((HashMap::new(), first_free_slot)),
        }
    }

    fn set(&self, slot: u32, gpa: u64, mem: HostMemory, len: u64) -> Result<(), String> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: mem.host_addr,
        };
        // SAFETY: `mem` is a live mapping owned by the device, which keeps it for as long as
        // the device exists; the device unmaps (len 0) before it moves or goes away, and KVM
        // copes with a mapping torn down under a slot (the guest then faults).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| e.to_string())
    }
}

impl GuestMapper for KvmMapper {
    fn map(&self, gpa: u64, mem: HostMemory) -> Result<(), String> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = s.1;
        self.set(slot, gpa, mem, mem.len)?;
        s.0.insert(gpa, slot);
        s.1 += 1;
        Ok(())
    }

    fn unmap(&self, gpa: u64, mem: HostMemory) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = s.0.remove(&gpa)
            && let Err(e) = self.set(slot, gpa, mem, 0)
        {
            tracing::error!("cannot remove the guest mapping at {gpa:#x}: {e}");
        }
    }

    fn register_ioevent(&self, gpa: u64, evt: &EventFd) -> Result<(), String> {
        self.vm
            .register_ioevent(evt, &IoEventAddress::Mmio(gpa), NoDatamatch)
            .map_err(|e| e.to_string())
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
