//! Intel MultiProcessor Specification 1.4 tables: count the enabled CPUs.
//!
//! The floating pointer structure (`_MP_`, 16 bytes, on a 16-byte boundary)
//! is searched, as the specification says, in the first KiB of the EBDA (its
//! segment is the BDA word at 0x40E), else in the last KiB of base memory
//! (BDA word 0x413 = base memory in KiB; 639 KiB when unset), then in the
//! BIOS ROM area 0xF0000-0xFFFFF. It points to the `PCMP` configuration
//! table, whose processor entries (type 0) carry an "enabled" flag. Both
//! structures must pass their checksums.

use crate::io::{phys_bytes, phys_range_ok, phys_read};

const FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
const CONFIG_SIGNATURE: &[u8; 4] = b"PCMP";
const CONFIG_HEADER_LEN: usize = 44;
const ENTRY_PROCESSOR: u8 = 0;
const PROCESSOR_ENTRY_LEN: usize = 20;
const OTHER_ENTRY_LEN: usize = 8;
const CPU_FLAG_ENABLED: u8 = 0x01;

const BDA_EBDA_SEGMENT: u64 = 0x40e;
const BDA_BASE_MEM_KIB: u64 = 0x413;
const DEFAULT_BASE_MEM_KIB: u64 = 639;
const BIOS_ROM: (u64, u64) = (0xf_0000, 0x10_0000);

/// What the MP tables say about processors.
#[derive(Clone, Copy, Debug)]
pub enum MpCpus {
    /// Enabled processor entries in the configuration table.
    Table { enabled: u32 },
    /// No configuration table, a default configuration (always 2 CPUs).
    DefaultConfig { kind: u8, cpus: u32 },
}

/// Why no CPU count could be taken from MP tables.
#[derive(Clone, Copy, Debug)]
pub enum MpError {
    /// No valid `_MP_` floating pointer structure.
    NotFound,
    /// The configuration table is missing, malformed or fails its checksum.
    BadConfigTable(u64),
}

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)) == 0
}

/// The first valid floating pointer structure in `[start, end)`.
fn scan_range(start: u64, end: u64) -> Option<u64> {
    let mut pa = start & !0xf;
    while pa + 16 <= end {
        if phys_range_ok(pa, 16) && phys_bytes(pa, 4) == FLOATING_SIGNATURE {
            let len = usize::from(phys_read::<u8>(pa + 8)) * 16;
            if len != 0 && phys_range_ok(pa, len as u64) && checksum_ok(phys_bytes(pa, len)) {
                return Some(pa);
            }
        }
        pa += 16;
    }
    None
}

/// Find the `_MP_` floating pointer structure.
pub fn find_floating_pointer() -> Option<u64> {
    let ebda = u64::from(phys_read::<u16>(BDA_EBDA_SEGMENT)) << 4;
    // Only believe an EBDA that lies in conventional memory below 640 KiB.
    let ebda_kib = (0x8_0000..0xa_0000)
        .contains(&ebda)
        .then_some((ebda, ebda + 1024));
    let mut base_kib = u64::from(phys_read::<u16>(BDA_BASE_MEM_KIB));
    if !(512..=640).contains(&base_kib) {
        base_kib = DEFAULT_BASE_MEM_KIB;
    }
    let last = (base_kib - 1) * 1024;
    let last_kib = (last != ebda).then_some((last, last + 1024));
    [ebda_kib, last_kib, Some(BIOS_ROM)]
        .into_iter()
        .flatten()
        .find_map(|(start, end)| scan_range(start, end))
}

/// Count the enabled processors described by the MP tables.
pub fn count_cpus() -> Result<MpCpus, MpError> {
    let fp = find_floating_pointer().ok_or(MpError::NotFound)?;
    let config = u64::from(phys_read::<u32>(fp + 4));
    if config == 0 {
        let kind = phys_read::<u8>(fp + 11); // feature byte 1
        return if kind != 0 {
            Ok(MpCpus::DefaultConfig { kind, cpus: 2 })
        } else {
            Err(MpError::BadConfigTable(0))
        };
    }
    let bad = MpError::BadConfigTable(config);
    if !phys_range_ok(config, CONFIG_HEADER_LEN as u64) || phys_bytes(config, 4) != CONFIG_SIGNATURE
    {
        return Err(bad);
    }
    let base_len = usize::from(phys_read::<u16>(config + 4));
    if base_len < CONFIG_HEADER_LEN || !phys_range_ok(config, base_len as u64) {
        return Err(bad);
    }
    let table = phys_bytes(config, base_len);
    if !checksum_ok(table) {
        return Err(bad);
    }
    // Walk the entries up to the base table length, as Linux does: the
    // header's entry count is not reliable (Cloud Hypervisor leaves it 0).
    let mut offset = CONFIG_HEADER_LEN;
    let mut enabled = 0;
    while offset < table.len() {
        let kind = table[offset];
        let len = match kind {
            ENTRY_PROCESSOR => PROCESSOR_ENTRY_LEN,
            1..=4 => OTHER_ENTRY_LEN,
            _ => return Err(bad),
        };
        let Some(entry) = table.get(offset..offset + len) else {
            return Err(bad);
        };
        if kind == ENTRY_PROCESSOR && entry[3] & CPU_FLAG_ENABLED != 0 {
            enabled += 1;
        }
        offset += len;
    }
    Ok(MpCpus::Table { enabled })
}
