//! The Intel MultiProcessor table (spec 1.4): how a guest without ACPI finds its CPUs, the
//! IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{IOAPIC_ADDR, LAPIC_ADDR};

/// MP table errors.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Too many CPUs for 8-bit APIC ids (the IOAPIC takes the next id).
    #[error("{0} vCPUs do not fit in an MP table (at most 254)")]
    TooManyCpus(u8),
    /// Writing guest memory failed.
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Most vCPUs the MP table can describe.
pub const MAX_CPUS: u8 = 254;

const BUS_PCI: u8 = 0;
const BUS_ISA: u8 = 1;
const ISA_IRQS: u8 = 16;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, &b| acc.wrapping_add(b))
        .wrapping_neg()
}

/// Builds the table bytes for a table whose floating pointer sits at `base`.
pub fn build(base: u64, ncpus: u8) -> Result<Vec<u8>, MpTableError> {
    if ncpus == 0 || ncpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(ncpus));
    }
    let ioapic_id = ncpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..ncpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    for (id, name) in [(BUS_PCI, b"PCI   "), (BUS_ISA, b"ISA   ")] {
        entries.extend_from_slice(&[1, id]);
        entries.extend_from_slice(name);
        count += 1;
    }
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // IRQ 0 reaches pin 0 as ExtINT (the 8259 cascade); the others are plain interrupts.
        let kind = if irq == 0 { 3 } else { 0 };
        entries.extend_from_slice(&[3, kind, 0, 0, BUS_ISA, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 = ExtINT, LINT1 = NMI, on every local APIC (0xff).
    for (kind, lint) in [(3u8, 0u8), (1, 1)] {
        entries.extend_from_slice(&[4, kind, 0, 0, BUS_ISA, 0, 0xff, lint]);
        count += 1;
    }

    let table_addr = base + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"TESSERA ");
    header.extend_from_slice(b"VM          ");
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the table for `ncpus` CPUs at `base`.
pub fn write(mem: &GuestMemoryMmap, base: u64, ncpus: u8) -> Result<usize, MpTableError> {
    let bytes = build(base, ncpus)?;
    mem.write_slice(&bytes, GuestAddress(base))
        .map_err(MpTableError::Write)?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(0xf0000, 4).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let cpus = (0..4).filter(|i| table[44 + i * 20] == 0).count();
        assert_eq!(cpus, 4);
        assert_eq!(table[44 + 3], 3, "BSP flag on cpu 0");
        assert!(build(0, 0).is_err());
        assert!(build(0, 255).is_err());
        assert!(build(0, 254).unwrap().len() < 0x10000);
    }
}
