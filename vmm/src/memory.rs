//! Guest physical memory: layout constants and a memfd-backed `GuestMemoryMmap`.
//!
//! Guest RAM is one memfd so that another process (a vfio-user device server) can map the very
//! same pages. RAM fills `[0, 3 GiB)` and continues at 4 GiB; the gap holds the 32-bit PCI
//! window and the interrupt controllers.

use std::fs::File;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Where RAM below 4 GiB ends (the MMIO gap starts).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// Where the MMIO gap ends and high RAM starts.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// The 32-bit PCI BAR window: the gap up to the IOAPIC.
pub const PCI_MMIO32: (u64, u64) = (MMIO_GAP_START, IOAPIC_ADDR - MMIO_GAP_START);
/// The 64-bit PCI BAR window, far above any RAM we hand out.
pub const PCI_MMIO64: (u64, u64) = (1 << 39, 1 << 39);
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Where the Intel MP table lives (the BIOS area, which is never listed as RAM).
pub const MPTABLE_START: u64 = 0xf_0000;
/// Start of the BIOS area reserved in the e820 map.
pub const BIOS_START: u64 = 0xf_0000;
/// High memory (the kernel's home) starts at 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// End of conventional memory (the EBDA and VGA hole follow).
pub const EBDA_START: u64 = 0x9_fc00;
/// Smallest guest RAM we accept.
pub const MIN_MEMORY: u64 = 8 << 20;
/// Largest guest RAM we accept.
pub const MAX_MEMORY: u64 = 1 << 40;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Creating, sizing or sealing the memfd failed.
    #[error("cannot create the guest memory file of {size} bytes")]
    Memfd {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memfd failed.
    #[error("cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
}

/// The RAM ranges `(guest address, size)` for `size` bytes of guest memory.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

/// Guest RAM and the memfd that backs it.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapping, shared by all vCPUs and devices.
    pub memory: GuestMemoryMmap,
    /// The backing file (offset 0 = guest address 0; high RAM follows low RAM).
    pub file: File,
    /// Total RAM in bytes.
    pub size: u64,
}

/// Creates `size` bytes of guest RAM in a fresh memfd.
pub fn create_guest_ram(size: u64) -> Result<GuestRam, MemoryError> {
    use vgpu::backend::FileSeal;
    let err = |source| MemoryError::Memfd { size, source };
    // Its size is fixed: a device server that maps it (vfio-user) can rely on that, and no
    // holder of the fd can truncate it under the other's feet.
    let file = vgpu::backend::memfd_sealed(
        "tessera-guest-ram",
        size,
        &[FileSeal::SealShrink, FileSeal::SealGrow],
    )
    .map_err(err)?;
    let mut offset = 0;
    let mut regions = Vec::new();
    for (base, len) in ram_ranges(size) {
        let file = file.try_clone().map_err(err)?;
        regions.push((
            GuestAddress(base),
            len as usize,
            Some(FileOffset::new(file, offset)),
        ));
        offset += len;
    }
    let memory = GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Mmap)?;
    Ok(GuestRam { memory, file, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn ranges_split_around_the_gap() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn memory_is_backed_by_the_memfd() {
        let ram = create_guest_ram(16 << 20).unwrap();
        assert_eq!(ram.memory.num_regions(), 1);
        ram.memory
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        let mut b = [0u8; 4];
        ram.file.read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        assert!(ram.file.set_len(4096).is_err(), "sealed against shrinking");
    }
}
