//! Guest-physical windows for PCI BARs, carved with vm-allocator.

use vm_allocator::{AddressAllocator, AllocPolicy};

use super::config::BarKind;

/// BAR allocation errors.
#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    /// The window description is invalid.
    #[error("invalid PCI window at {base:#x} of {size:#x} bytes")]
    Window {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
        /// The allocator's complaint.
        #[source]
        source: vm_allocator::Error,
    },
    /// No room for a BAR of this size.
    #[error("no room for a {size:#x}-byte {kind:?} BAR")]
    NoRoom {
        /// BAR size.
        size: u64,
        /// BAR kind.
        kind: BarKind,
        /// The allocator's complaint.
        #[source]
        source: vm_allocator::Error,
    },
    /// BAR sizes are powers of two of at least 16 bytes (4 for I/O).
    #[error("invalid BAR size {0:#x}")]
    BadSize(u64),
}

/// Largest 64-bit BAR placed below 4 GiB.
pub const LOW_64BIT_MAX: u64 = 256 << 20;

/// Allocates naturally aligned BAR addresses from a 32-bit and a 64-bit MMIO window.
#[derive(Debug)]
pub struct BarAllocator {
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
}

impl BarAllocator {
    /// Windows `[base, base + size)` below and above 4 GiB.
    pub fn new(mmio32: (u64, u64), mmio64: (u64, u64)) -> Result<Self, AllocatorError> {
        let make = |(base, size): (u64, u64)| {
            AddressAllocator::new(base, size).map_err(|source| AllocatorError::Window {
                base,
                size,
                source,
            })
        };
        Ok(BarAllocator {
            mmio32: make(mmio32)?,
            mmio64: make(mmio64)?,
        })
    }

    /// A naturally aligned address for a BAR of `size` bytes. A 64-bit BAR of at most
    /// [`LOW_64BIT_MAX`] goes below 4 GiB when there is room (so 32-bit guest code can reach
    /// it, as PC firmware does), above otherwise.
    pub fn allocate(&mut self, size: u64, kind: BarKind) -> Result<u64, AllocatorError> {
        if !size.is_power_of_two() || size < 16 {
            return Err(AllocatorError::BadSize(size));
        }
        if let BarKind::Mmio64 { .. } = kind
            && size <= LOW_64BIT_MAX
            && let Ok(r) = self.mmio32.allocate(size, size, AllocPolicy::FirstMatch)
        {
            return Ok(r.start());
        }
        let window = match kind {
            BarKind::Mmio32 { .. } => &mut self.mmio32,
            BarKind::Mmio64 { .. } => &mut self.mmio64,
        };
        window
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|source| AllocatorError::NoRoom { size, kind, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_bounded() {
        let mut a = BarAllocator::new((0xc000_0000, 0x1000_0000), (1 << 40, 1 << 36)).unwrap();
        let k32 = BarKind::Mmio32 {
            prefetchable: false,
        };
        let k64 = BarKind::Mmio64 { prefetchable: true };
        let x = a.allocate(0x1000, k32).unwrap();
        let y = a.allocate(0x10_0000, k32).unwrap();
        assert_eq!(x % 0x1000, 0);
        assert_eq!(y % 0x10_0000, 0);
        assert!(x >= 0xc000_0000 && y + 0x10_0000 <= 0xd000_0000);
        assert_ne!(x, y);
        let z = a.allocate(1 << 30, k64).unwrap();
        assert!(z >= 1 << 40 && z.is_multiple_of(1 << 30));
        let low = a.allocate(1 << 20, k64).unwrap();
        assert!(low < 1 << 32, "small 64-bit BARs go low");
        assert!(matches!(
            a.allocate(0x3000, k32),
            Err(AllocatorError::BadSize(_))
        ));
        assert!(matches!(
            a.allocate(0x2000_0000, k32),
            Err(AllocatorError::NoRoom { .. })
        ));
    }
}
