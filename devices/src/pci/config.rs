//! A type-0 PCI configuration space with BARs and a capability list.
//!
//! Registers are kept as 64 little-endian dwords plus a per-bit write mask, so the usual
//! guest protocols fall out of one rule (`new = old & !mask | value & mask`): BAR sizing by
//! writing all ones, read-only ids, capability registers with writable fields.

/// Number of 32-bit registers in a (non-extended) configuration space.
pub const NUM_REGS: usize = 64;
/// Number of BAR slots in a type-0 header.
pub const NUM_BARS: usize = 6;

const REG_COMMAND: usize = 1;
const REG_CLASS: usize = 2;
const REG_HEADER: usize = 3;
const REG_BAR0: usize = 4;
const REG_SUBSYSTEM: usize = 11;
const REG_CAP_PTR: usize = 13;
const REG_INTERRUPT: usize = 15;

/// Command register: memory space decode enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command bits a guest may set: I/O, memory, bus master, parity, SERR, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Status register: a capability list is present.
const STATUS_CAP_LIST: u32 = 1 << 4;
/// The first capability's offset (the header ends at 0x40).
const FIRST_CAP: usize = 0x40;

/// Identity of a function, fixed at construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Base class.
    pub class: u8,
    /// Sub-class.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision id.
    pub revision: u8,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
}

#[cfg(test)]
impl PciHeader {
    /// A 3D controller identity for tests.
    pub(crate) fn for_tests() -> Self {
        PciHeader {
            vendor_id: 1,
            device_id: 2,
            class: 3,
            subclass: 2,
            prog_if: 0,
            revision: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        }
    }
}

/// The kind of a memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// A BAR that decodes below 4 GiB.
    Mmio32 {
        /// Reads have no side effects (the guest may map it write-combining).
        prefetchable: bool,
    },
    /// A 64-bit BAR; it takes two BAR slots.
    Mmio64 {
        /// Reads have no side effects.
        prefetchable: bool,
    },
}

impl BarKind {
    fn type_bits(self) -> u32 {
        match self {
            BarKind::Mmio32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Mmio64 { prefetchable } => (u32::from(prefetchable) << 3) | 0b100,
        }
    }
}

/// A BAR as the guest currently has it programmed and decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMapping {
    /// BAR slot.
    pub bar: usize,
    /// Guest-physical base.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Kind.
    pub kind: BarKind,
}

/// Errors while building a configuration space (host-side programming errors, not guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// BAR slot out of range or already used.
    #[error("BAR slot {0} is out of range or already used")]
    BarSlot(usize),
    /// BAR size is not a power of two of at least 16 bytes.
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BarSize(u64),
    /// BAR address not aligned to its size, or too high for its kind.
    #[error("BAR address {addr:#x} does not fit a BAR of {size:#x} bytes")]
    BarAddress {
        /// Address.
        addr: u64,
        /// Size.
        size: u64,
    },
    /// The capability does not fit in the configuration space.
    #[error("no room for a {0}-byte capability")]
    CapabilityTooLarge(usize),
    /// The mask and the body of a capability differ in length.
    #[error("capability mask length differs from its body")]
    CapabilityMask,
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct PciConfiguration {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    bars: [Option<Bar>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    /// A function with `header`'s identity, no BARs and no capabilities.
    pub fn new(h: PciHeader) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut writable = [0u32; NUM_REGS];
        regs[0] = u32::from(h.device_id) << 16 | u32::from(h.vendor_id);
        regs[REG_CLASS] = u32::from(h.class) << 24
            | u32::from(h.subclass) << 16
            | u32::from(h.prog_if) << 8
            | u32::from(h.revision);
        regs[REG_SUBSYSTEM] = u32::from(h.subsystem_id) << 16 | u32::from(h.subsystem_vendor_id);
        writable[REG_COMMAND] = COMMAND_WRITABLE;
        // Cache line size and latency timer are plain storage; interrupt line too.
        writable[REG_HEADER] = 0x0000_ffff;
        writable[REG_INTERRUPT] = 0x0000_00ff;
        PciConfiguration {
            regs,
            writable,
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP,
        }
    }

    /// Reads register `reg`; registers past the end read as all ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(u32::MAX)
    }

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` of register `reg`, honouring the write
    /// mask. Anything else (bad width, misaligned span, register out of range) is ignored.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let Some(shift) = lane_shift(offset, data.len()) else {
            tracing::debug!(
                reg,
                offset,
                len = data.len(),
                "ignored malformed config write"
            );
            return;
        };
        if reg >= NUM_REGS {
            return;
        }
        let mut value = [0u8; 4];
        value[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(value) << shift;
        let lanes = if data.len() == 4 {
            u32::MAX
        } else {
            ((1u32 << (data.len() * 8)) - 1) << shift
        };
        let mask = self.writable[reg] & lanes;
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
    }

    /// Sets the interrupt pin (1 = INTA#), read-only to the guest.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.regs[REG_INTERRUPT] = (self.regs[REG_INTERRUPT] & !0xff00) | u32::from(pin) << 8;
    }

    /// Declares BAR `slot` of `size` bytes at `addr` (64-bit BARs also take `slot + 1`).
    pub fn add_bar(
        &mut self,
        slot: usize,
        addr: u64,
        size: u64,
        kind: BarKind,
    ) -> Result<(), ConfigError> {
        let wide = matches!(kind, BarKind::Mmio64 { .. });
        let last = slot + usize::from(wide);
        if last >= NUM_BARS || self.bars[slot].is_some() || (wide && self.bars[last].is_some()) {
            return Err(ConfigError::BarSlot(slot));
        }
        if !size.is_power_of_two() || size < 16 || (!wide && size > 1 << 31) {
            return Err(ConfigError::BarSize(size));
        }
        if !addr.is_multiple_of(size)
            || (!wide && addr.checked_add(size).is_none_or(|e| e > 1 << 32))
        {
            return Err(ConfigError::BarAddress { addr, size });
        }
        self.bars[slot] = Some(Bar { size, kind });
        let lo_mask = !(size - 1) as u32 & !0xf;
        self.regs[REG_BAR0 + slot] = (addr as u32 & lo_mask) | kind.type_bits();
        self.writable[REG_BAR0 + slot] = lo_mask;
        if wide {
            self.regs[REG_BAR0 + last] = (addr >> 32) as u32;
            self.writable[REG_BAR0 + last] = !((size - 1) >> 32) as u32;
        }
        Ok(())
    }

    /// The size of BAR `slot`, if it is declared.
    pub fn bar_size(&self, slot: usize) -> Option<u64> {
        self.bars.get(slot)?.map(|b| b.size)
    }

    /// The address BAR `slot` is programmed with (whether or not it decodes).
    pub fn bar_address(&self, slot: usize) -> Option<u64> {
        let bar = self.bars.get(slot)?.as_ref()?;
        let lo = u64::from(self.regs[REG_BAR0 + slot] & !0xf);
        Some(match bar.kind {
            BarKind::Mmio32 { .. } => lo,
            BarKind::Mmio64 { .. } => lo | u64::from(self.regs[REG_BAR0 + slot + 1]) << 32,
        })
    }

    /// The BARs that decode right now: memory decoding is on and the BAR is not at 0.
    pub fn bar_mappings(&self) -> Vec<BarMapping> {
        if self.command() & COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        self.bar_placements()
    }

    /// The BARs as programmed (not at 0), whether or not memory decoding is on.
    pub fn bar_placements(&self) -> Vec<BarMapping> {
        (0..NUM_BARS)
            .filter_map(|bar| {
                let b = self.bars[bar]?;
                let addr = self.bar_address(bar)?;
                (addr != 0).then_some(BarMapping {
                    bar,
                    addr,
                    size: b.size,
                    kind: b.kind,
                })
            })
            .collect()
    }

    /// The register file as the guest sees it (for a snapshot).
    pub fn registers(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Restores registers saved by [`PciConfiguration::registers`] into a function built the
    /// same way: only bits the guest may write are taken; every read-only bit (ids, BAR
    /// sizes and types, capabilities) must equal this function's, else nothing changes and
    /// the first register that differs is named.
    pub fn restore_registers(&mut self, saved: &[u32]) -> Result<(), String> {
        if saved.len() != NUM_REGS {
            return Err(format!(
                "{} configuration registers saved, a function has {NUM_REGS}",
                saved.len()
            ));
        }
        for (reg, (&v, (&ours, &w))) in saved
            .iter()
            .zip(self.regs.iter().zip(&self.writable))
            .enumerate()
        {
            // The status register's bits (upper half of the command register) are read-only
            // here, as are the capability pointers and ids.
            if v & !w != ours & !w {
                return Err(format!(
                    "configuration register {reg:#x} is {v:#010x}, read-only bits of this \
                     function give {:#010x}",
                    ours & !w
                ));
            }
        }
        for (r, (&v, &w)) in self.regs.iter_mut().zip(saved.iter().zip(&self.writable)) {
            *r = (*r & !w) | (v & w);
        }
        Ok(())
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[REG_COMMAND] as u16
    }

    /// Appends a capability with id `id`, whose bytes after the id/next header are `body`, and
    /// whose writable bits are `writable` (same length as `body`). Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        if body.len() != writable.len() {
            return Err(ConfigError::CapabilityMask);
        }
        let len = (2 + body.len()).next_multiple_of(4);
        let offset = self.next_cap;
        if offset + len > NUM_REGS * 4 {
            return Err(ConfigError::CapabilityTooLarge(len));
        }
        self.set_byte(offset, id, 0);
        self.set_byte(offset + 1, 0, 0);
        for (i, (&b, &w)) in body.iter().zip(writable).enumerate() {
            self.set_byte(offset + 2 + i, b, w);
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8, 0),
            None => {
                self.regs[REG_CAP_PTR] = offset as u32;
                self.regs[REG_COMMAND] |= STATUS_CAP_LIST << 16;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = offset + len;
        Ok(offset)
    }

    /// Reads `N` bytes at byte `offset` of the space (for devices that observe their
    /// capabilities); bytes past the end read as 0xff.
    pub fn read_bytes<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut out = [0xff; N];
        for (i, b) in out.iter_mut().enumerate() {
            if let Some(reg) = self.regs.get((offset + i) / 4) {
                *b = (reg >> (((offset + i) % 4) * 8)) as u8;
            }
        }
        out
    }

    fn set_byte(&mut self, offset: usize, value: u8, writable: u8) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | u32::from(value) << shift;
        self.writable[reg] = (self.writable[reg] & !(0xff << shift)) | u32::from(writable) << shift;
    }
}

/// The bit shift of an access of `len` bytes at byte `offset` of a dword, if it is a valid
/// naturally aligned 1-, 2- or 4-byte access.
pub(crate) fn lane_shift(offset: u64, len: usize) -> Option<u32> {
    match (len, offset) {
        (1, 0..=3) | (2, 0 | 2) | (4, 0) => Some(offset as u32 * 8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class: 0x03,
            subclass: 0x02,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: 0x1234,
            subsystem_id: 1,
        }
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = PciConfiguration::new(header());
        assert_eq!(c.read_reg(0), 0x5678_1234);
        c.write_reg(0, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(0), 0x5678_1234);
        assert_eq!(c.read_reg(2), 0x0302_0001);
        assert_eq!(c.read_reg(64), u32::MAX);
    }

    #[test]
    fn command_register_sub_dword_writes() {
        let mut c = PciConfiguration::new(header());
        c.write_reg(1, 0, &[0x06]);
        assert_eq!(c.command(), 0x6);
        c.write_reg(1, 0, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), 0x547);
        // Misaligned and odd-sized writes are ignored.
        c.write_reg(1, 1, &[0, 0]);
        c.write_reg(1, 0, &[0, 0, 0]);
        assert_eq!(c.command(), 0x547);
    }

    #[test]
    fn bar_sizing_32_and_64() {
        let mut c = PciConfiguration::new(header());
        c.add_bar(
            0,
            0xc000_0000,
            0x1000,
            BarKind::Mmio32 {
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            0x2_0000_0000,
            1 << 33,
            BarKind::Mmio64 { prefetchable: true },
        )
        .unwrap();
        assert_eq!(c.read_reg(4), 0xc000_0000);
        assert_eq!(c.read_reg(6), 0x0000_000c);
        assert_eq!(c.read_reg(7), 0x2);
        for r in 4..8 {
            c.write_reg(r, 0, &[0xff; 4]);
        }
        assert_eq!(c.read_reg(4), 0xffff_f000);
        assert_eq!(c.read_reg(6), 0x0000_000c);
        assert_eq!(c.read_reg(7), 0xffff_fffe);
        c.write_reg(4, 0, &0xc010_0000u32.to_le_bytes());
        c.write_reg(6, 0, &0u32.to_le_bytes());
        c.write_reg(7, 0, &0x40u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xc010_0000));
        assert_eq!(c.bar_address(2), Some(0x40_0000_0000));
        assert_eq!(c.bar_size(2), Some(1 << 33));
        assert!(c.bar_mappings().is_empty(), "decode is off");
        c.write_reg(1, 0, &[0x2]);
        let m = c.bar_mappings();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].addr, 0x40_0000_0000);
    }

    #[test]
    fn bad_bars_rejected() {
        let mut c = PciConfiguration::new(header());
        let k = BarKind::Mmio32 {
            prefetchable: false,
        };
        assert_eq!(c.add_bar(6, 0, 0x1000, k), Err(ConfigError::BarSlot(6)));
        assert_eq!(
            c.add_bar(0, 0, 0x1001, k),
            Err(ConfigError::BarSize(0x1001))
        );
        assert!(c.add_bar(0, 0x800, 0x1000, k).is_err());
        assert!(c.add_bar(0, 0xffff_f000, 0x2000, k).is_err());
        c.add_bar(5, 0x1000, 0x1000, k).unwrap();
        assert_eq!(
            c.add_bar(
                5,
                0,
                0x1000,
                BarKind::Mmio64 {
                    prefetchable: false
                }
            ),
            Err(ConfigError::BarSlot(5))
        );
    }

    #[test]
    fn capability_chain_and_masks() {
        let mut c = PciConfiguration::new(header());
        let a = c.add_capability(0x09, &[4, 0xaa], &[0, 0xff]).unwrap();
        let b = c.add_capability(0x11, &[0; 10], &[0xff; 10]).unwrap();
        assert_eq!((a, b), (0x40, 0x44));
        assert_eq!(c.read_reg(13) & 0xff, 0x40);
        assert_ne!(c.read_reg(1) & (STATUS_CAP_LIST << 16), 0);
        assert_eq!(c.read_bytes::<4>(0x40), [0x09, 0x44, 4, 0xaa]);
        assert_eq!(c.read_bytes::<2>(0x44), [0x11, 0]);
        c.write_reg(0x10, 0, &[0xff; 4]);
        assert_eq!(c.read_bytes::<4>(0x40), [0x09, 0x44, 4, 0xff]);
        assert!(c.add_capability(1, &[0; 250], &[0; 250]).is_err());
        assert_eq!(
            c.add_capability(1, &[0; 2], &[0; 3]),
            Err(ConfigError::CapabilityMask)
        );
    }
}
