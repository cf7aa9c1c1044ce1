//! The VM's DMA domain: which guest-physical ranges the vGPU may touch in system memory.
//!
//! The VMM registers the guest's RAM (as an IOMMU would map it); MMIO holes and anything past
//! RAM are outside. Every system-memory access the device makes is checked here first.

/// A set of non-overlapping guest-physical ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DmaDomain {
    ranges: Vec<(u64, u64)>,
}

impl DmaDomain {
    /// A domain of `(base, size)` ranges (empty ones are ignored).
    pub fn new(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut ranges: Vec<(u64, u64)> = ranges.into_iter().filter(|r| r.1 > 0).collect();
        ranges.sort_unstable();
        DmaDomain { ranges }
    }

    /// Whether `[addr, addr + len)` lies inside one registered range.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.ranges
            .iter()
            .any(|&(base, size)| addr >= base && end <= base + size)
    }

    /// The registered ranges.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_holes() {
        let d = DmaDomain::new([(1 << 32, 1 << 30), (0, 0xc000_0000), (5, 0)]);
        assert!(d.contains(0, 8));
        assert!(d.contains(0xbfff_fff8, 8));
        assert!(!d.contains(0xbfff_fffc, 8), "straddles into the MMIO hole");
        assert!(!d.contains(0xc000_0000, 4));
        assert!(d.contains(1 << 32, 1 << 30));
        assert!(!d.contains((1 << 32) + (1 << 30), 1), "past RAM");
        assert!(!d.contains(u64::MAX - 3, 8), "wraps");
        assert_eq!(d.ranges().len(), 2);
    }
}
