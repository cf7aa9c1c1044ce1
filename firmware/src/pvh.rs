//! The PVH boot information (`struct hvm_start_info`, Xen public
//! `arch-x86/hvm/start_info.h`) that the loader passes in %ebx.
//!
//! Layout (all little-endian):
//! ```text
//!  0 u32 magic = 0x336ec578     24 u64 cmdline_paddr
//!  4 u32 version                32 u64 rsdp_paddr
//!  8 u32 flags                  40 u64 memmap_paddr     (version >= 1)
//! 12 u32 nr_modules             48 u32 memmap_entries   (version >= 1)
//! 16 u64 modlist_paddr          52 u32 reserved
//! ```
//! Memory map entries are `{ addr: u64, size: u64, type: u32, reserved: u32 }`.

use crate::io::{phys_bytes, phys_range_ok, phys_read};

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Size of `hvm_start_info` for version 0 and version >= 1.
const START_INFO_V0_SIZE: u64 = 40;
const START_INFO_V1_SIZE: u64 = 56;
/// Size of one `hvm_memmap_table_entry`.
const MEMMAP_ENTRY_SIZE: u64 = 24;
/// Memory map entry type of usable RAM (E820 numbering).
pub const MEMMAP_TYPE_RAM: u32 = 1;
/// The longest command line the firmware looks at.
pub const CMDLINE_MAX: usize = 4096;
/// The most memory map entries the firmware looks at.
const MEMMAP_MAX_ENTRIES: u32 = 1024;

/// Why the start_info pointer was not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartInfoError {
    /// %ebx was 0 (not started through PVH?).
    Null,
    /// The structure does not start with [`START_INFO_MAGIC`].
    BadMagic(u32),
}

/// A validated `hvm_start_info`.
#[derive(Clone, Copy, Debug)]
pub struct StartInfo {
    cmdline_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
}

/// One entry of the PVH memory map.
#[derive(Clone, Copy, Debug)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl core::fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Null => f.write_str("null pointer"),
            Self::BadMagic(m) => write!(f, "bad magic {m:#010x}"),
        }
    }
}

impl StartInfo {
    /// Read and validate the structure at physical address `paddr`.
    pub fn from_paddr(paddr: u64) -> Result<Self, StartInfoError> {
        if !phys_range_ok(paddr, START_INFO_V0_SIZE) {
            return Err(StartInfoError::Null);
        }
        let magic: u32 = phys_read(paddr);
        if magic != START_INFO_MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        let version: u32 = phys_read(paddr + 4);
        let (memmap_paddr, memmap_entries) =
            if version >= 1 && phys_range_ok(paddr, START_INFO_V1_SIZE) {
                (phys_read::<u64>(paddr + 40), phys_read::<u32>(paddr + 48))
            } else {
                (0, 0)
            };
        Ok(Self {
            cmdline_paddr: phys_read(paddr + 24),
            memmap_paddr,
            memmap_entries,
        })
    }

    /// The NUL-terminated command line, without the NUL (at most
    /// [`CMDLINE_MAX`] bytes); empty when `cmdline_paddr` is 0.
    pub fn cmdline(&self) -> &'static [u8] {
        let base = self.cmdline_paddr;
        if base == 0 {
            return &[];
        }
        let mut len = 0;
        while len < CMDLINE_MAX
            && phys_range_ok(base, len as u64 + 1)
            && phys_read::<u8>(base + len as u64) != 0
        {
            len += 1;
        }
        phys_bytes(base, len)
    }

    /// The memory map, if the loader provided one (version >= 1).
    pub fn memmap(&self) -> Option<impl Iterator<Item = MemmapEntry>> {
        let n = self.memmap_entries.min(MEMMAP_MAX_ENTRIES);
        if n == 0 || !phys_range_ok(self.memmap_paddr, u64::from(n) * MEMMAP_ENTRY_SIZE) {
            return None;
        }
        let base = self.memmap_paddr;
        Some((0..u64::from(n)).map(move |i| {
            let e = base + i * MEMMAP_ENTRY_SIZE;
            MemmapEntry {
                addr: phys_read(e),
                size: phys_read(e + 8),
                kind: phys_read(e + 16),
            }
        }))
    }

    /// Total usable RAM and the number of RAM ranges, if a memory map exists.
    pub fn ram_summary(&self) -> Option<(u64, u32)> {
        self.memmap().map(|entries| {
            entries
                .filter(|e| e.kind == MEMMAP_TYPE_RAM)
                .fold((0u64, 0u32), |(bytes, n), e| {
                    (bytes.saturating_add(e.size), n + 1)
                })
        })
    }
}
