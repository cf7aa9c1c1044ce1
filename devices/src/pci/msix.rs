//! MSI-X: the capability in configuration space plus the vector table and pending-bit array
//! that live in a BAR.
//!
//! The device calls [`MsixState::trigger`]; a vector whose entry is unmasked (and the function
//! not masked) is sent through the [`MsiSink`], otherwise its pending bit is set and the
//! message goes out when the guest unmasks it.
//!
//! A device served to another process (vfio-user) does not see its table: the client VMM
//! emulates table and PBA and hands over one eventfd per vector. Such a device's state is
//! built with [`Interrupts::Vectors`] and triggers go straight to a [`VectorSink`].

use std::sync::Arc;

use super::config::{ConfigError, PciConfiguration};

/// PCI capability id of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// Where interrupts go: the VMM turns (address, data) into a guest interrupt.
pub trait MsiSink: Send + Sync {
    /// Delivers one MSI message.
    fn send(&self, address: u64, data: u32);
}

/// Where interrupts of a function whose table lives elsewhere (in a vfio-user client) go.
pub trait VectorSink: Send + Sync {
    /// Signals vector `v`; the sink drops it if the client gave it no route.
    fn trigger(&self, v: u16);
}

/// Where a function's MSI-X interrupts go.
pub enum Interrupts {
    /// The function emulates the MSI-X table; unmasked vectors become MSI messages (for an
    /// in-process KVM VMM: `KVM_SIGNAL_MSI`).
    Msi(Arc<dyn MsiSink>),
    /// Someone else (a vfio-user client) emulates table and PBA and knows each vector's
    /// route: triggers go straight to the sink; masking and pending bits are its business.
    Vectors(Arc<dyn VectorSink>),
}

impl std::fmt::Debug for Interrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interrupts::Msi(_) => "Interrupts::Msi",
            Interrupts::Vectors(_) => "Interrupts::Vectors",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    const RESET: Entry = Entry {
        addr_lo: 0,
        addr_hi: 0,
        data: 0,
        control: ENTRY_MASKED,
    };
}

/// MSI-X state of one function.
pub struct MsixState {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    cap_offset: usize,
    delivery: Interrupts,
}

impl std::fmt::Debug for MsixState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixState")
            .field("vectors", &self.entries.len())
            .field("cap_offset", &self.cap_offset)
            .finish()
    }
}

impl MsixState {
    /// Adds an MSI-X capability for `vectors` vectors whose table is at `table_offset` and PBA
    /// at `pba_offset` in BAR `bar`, and returns the state that serves them, delivering to
    /// `delivery`.
    pub fn new(
        config: &mut PciConfiguration,
        vectors: u16,
        bar: u8,
        (table_offset, pba_offset): (u32, u32),
        delivery: Interrupts,
    ) -> Result<Self, ConfigError> {
        let control = (vectors - 1) & 0x7ff;
        let table = table_offset | u32::from(bar);
        let pba = pba_offset | u32::from(bar);
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&control.to_le_bytes());
        body.extend_from_slice(&table.to_le_bytes());
        body.extend_from_slice(&pba.to_le_bytes());
        // Only the enable and function-mask bits of Message Control are writable.
        let mut writable = vec![0u8; 10];
        writable[1] = 0xc0;
        let cap_offset = config.add_capability(CAP_ID_MSIX, &body, &writable)?;
        Ok(MsixState {
            entries: vec![Entry::RESET; usize::from(vectors)],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            cap_offset,
            delivery,
        })
    }

    fn control(&self, config: &PciConfiguration) -> u16 {
        u16::from_le_bytes(config.read_bytes::<2>(self.cap_offset + 2))
    }

    /// Whether MSI-X is enabled in the capability.
    pub fn enabled(&self, config: &PciConfiguration) -> bool {
        self.control(config) & CTRL_ENABLE != 0
    }

    fn deliverable(&self, config: &PciConfiguration, v: usize) -> bool {
        let c = self.control(config);
        c & CTRL_ENABLE != 0
            && c & CTRL_FUNCTION_MASK == 0
            && self.entries[v].control & ENTRY_MASKED == 0
    }

    /// Raises vector `v`: delivered now, or left pending while masked. Out-of-range vectors and
    /// a disabled capability drop the interrupt (as hardware would with MSI-X off).
    pub fn trigger(&mut self, config: &PciConfiguration, v: u16) {
        if let Interrupts::Vectors(sink) = &self.delivery {
            if usize::from(v) < self.entries.len() {
                sink.trigger(v);
            }
            return;
        }
        let v = usize::from(v);
        if v >= self.entries.len() || !self.enabled(config) {
            return;
        }
        if self.deliverable(config, v) {
            self.send(v);
        } else {
            self.pending[v / 64] |= 1 << (v % 64);
        }
    }

    /// Sends every pending vector that became deliverable (after an unmask or enable).
    pub fn flush_pending(&mut self, config: &PciConfiguration) {
        for v in 0..self.entries.len() {
            if self.pending[v / 64] & (1 << (v % 64)) != 0 && self.deliverable(config, v) {
                self.pending[v / 64] &= !(1 << (v % 64));
                self.send(v);
            }
        }
    }

    fn send(&self, v: usize) {
        if let Interrupts::Msi(sink) = &self.delivery {
            let e = self.entries[v];
            sink.send(u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo), e.data);
        }
    }

    /// A guest read of the table at `offset` (aligned 4-byte accesses; anything else reads as
    /// zero).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let v = (offset / ENTRY_SIZE) as usize;
        if let (Some(e), 4, 0) = (self.entries.get(v), data.len(), offset % 4) {
            let value = match offset % ENTRY_SIZE {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                _ => e.control,
            };
            data.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// A guest write of the table at `offset` (aligned 4-byte accesses only).
    pub fn write_table(&mut self, config: &PciConfiguration, offset: u64, data: &[u8]) {
        let v = (offset / ENTRY_SIZE) as usize;
        let (Some(e), Ok(bytes)) = (self.entries.get_mut(v), <[u8; 4]>::try_from(data)) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match offset % ENTRY_SIZE {
            0 => e.addr_lo = value & !0x3,
            4 => e.addr_hi = value,
            8 => e.data = value,
            _ => e.control = value & ENTRY_MASKED,
        }
        self.flush_pending(config);
    }

    /// A guest read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let word = self
            .pending
            .get((offset / 8) as usize)
            .copied()
            .unwrap_or(0);
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    /// Whether vector `v` is pending.
    pub fn is_pending(&self, v: u16) -> bool {
        let v = usize::from(v);
        v < self.entries.len() && self.pending[v / 64] & (1 << (v % 64)) != 0
    }

    /// Back to power-on state: every entry masked, nothing pending.
    pub fn reset(&mut self) {
        self.entries.fill(Entry::RESET);
        self.pending.fill(0);
    }

    /// The table and pending bits (for a snapshot): per vector address low, address high,
    /// data and control words; then the pending-bit array.
    pub fn save(&self) -> (Vec<[u32; 4]>, Vec<u64>) {
        let table = self
            .entries
            .iter()
            .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
            .collect();
        (table, self.pending.clone())
    }

    /// Restores what [`MsixState::save`] returned, checked as guest writes are (reserved bits
    /// dropped). Sends nothing: pending vectors stay pending until the guest unmasks them.
    pub fn restore(&mut self, table: &[[u32; 4]], pending: &[u64]) -> Result<(), String> {
        if table.len() != self.entries.len() || pending.len() != self.pending.len() {
            return Err(format!(
                "MSI-X state for {} vectors, this function has {}",
                table.len(),
                self.entries.len()
            ));
        }
        for (e, &[addr_lo, addr_hi, data, control]) in self.entries.iter_mut().zip(table) {
            *e = Entry {
                addr_lo: addr_lo & !0x3,
                addr_hi,
                data,
                control: control & ENTRY_MASKED,
            };
        }
        let vectors = self.entries.len();
        for (i, (p, &v)) in self.pending.iter_mut().zip(pending).enumerate() {
            // Bits past the last vector stay clear.
            let valid = vectors.saturating_sub(i * 64).min(64);
            *p = if valid == 64 {
                v
            } else {
                v & ((1u64 << valid) - 1)
            };
        }
        Ok(())
    }

    /// The capability's offset in configuration space.
    pub fn cap_offset(&self) -> usize {
        self.cap_offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::PciHeader;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u32)>>);
    impl MsiSink for Recorder {
        fn send(&self, address: u64, data: u32) {
            self.0.lock().unwrap().push((address, data));
        }
    }

    fn setup() -> (PciConfiguration, MsixState, Arc<Recorder>) {
        let mut c = PciConfiguration::new(PciHeader::for_tests());
        let rec = Arc::new(Recorder::default());
        let m =
            MsixState::new(&mut c, 4, 0, (0x4000, 0x5000), Interrupts::Msi(rec.clone())).unwrap();
        (c, m, rec)
    }

    fn w32(m: &mut MsixState, c: &PciConfiguration, off: u64, v: u32) {
        m.write_table(c, off, &v.to_le_bytes());
    }

    #[test]
    fn external_delivery_goes_to_the_vector_sink() {
        #[derive(Default)]
        struct Vectors(Mutex<Vec<u16>>);
        impl VectorSink for Vectors {
            fn trigger(&self, v: u16) {
                self.0.lock().unwrap().push(v);
            }
        }
        let mut c = PciConfiguration::new(PciHeader::for_tests());
        let sink = Arc::new(Vectors::default());
        let mut m = MsixState::new(
            &mut c,
            4,
            0,
            (0x4000, 0x5000),
            Interrupts::Vectors(sink.clone()),
        )
        .unwrap();
        // The client owns enable and masks: the state only forwards in-range vectors.
        m.trigger(&c, 2);
        m.trigger(&c, 4);
        m.flush_pending(&c);
        assert_eq!(sink.0.lock().unwrap().as_slice(), &[2]);
        assert!(!m.is_pending(2));
        let off = m.cap_offset();
        assert_eq!(u16::from_le_bytes(c.read_bytes::<2>(off + 2)), 3);
    }

    #[test]
    fn capability_layout() {
        let (c, m, _) = setup();
        let off = m.cap_offset();
        assert_eq!(c.read_bytes::<2>(off), [CAP_ID_MSIX, 0]);
        assert_eq!(u16::from_le_bytes(c.read_bytes::<2>(off + 2)), 3);
        assert_eq!(u32::from_le_bytes(c.read_bytes::<4>(off + 4)), 0x4000);
        assert_eq!(u32::from_le_bytes(c.read_bytes::<4>(off + 8)), 0x5000);
    }

    #[test]
    fn masked_vectors_pend_then_deliver() {
        let (mut c, mut m, rec) = setup();
        let off = m.cap_offset();
        m.trigger(&c, 1);
        assert!(!m.is_pending(1), "disabled MSI-X drops interrupts");
        // Enable MSI-X (config register write of Message Control).
        c.write_reg(off / 4, 2, &CTRL_ENABLE.to_le_bytes());
        assert!(m.enabled(&c));
        w32(&mut m, &c, 16, 0xfee0_0000);
        w32(&mut m, &c, 24, 0x41);
        m.trigger(&c, 1);
        assert!(m.is_pending(1), "entries start masked");
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        assert!(rec.0.lock().unwrap().is_empty());
        w32(&mut m, &c, 28, 0);
        assert_eq!(rec.0.lock().unwrap().as_slice(), &[(0xfee0_0000, 0x41)]);
        assert!(!m.is_pending(1));
        m.trigger(&c, 1);
        assert_eq!(rec.0.lock().unwrap().len(), 2);
        // Function mask holds everything back.
        c.write_reg(
            off / 4,
            2,
            &(CTRL_ENABLE | CTRL_FUNCTION_MASK).to_le_bytes(),
        );
        m.trigger(&c, 1);
        assert!(m.is_pending(1));
        m.trigger(&c, 99);
        let mut d = [0u8; 4];
        m.read_table(16, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xfee0_0000);
        m.read_table(1000, &mut d);
        assert_eq!(d, [0; 4]);
        let mut wide = [0xffu8; 8];
        m.read_table(16, &mut wide);
        assert_eq!(
            wide, [0; 8],
            "8-byte reads are not supported and read as zero"
        );
        m.reset();
        assert!(!m.is_pending(1));
    }
}
