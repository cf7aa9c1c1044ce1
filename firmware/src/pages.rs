//! Additions to the boot identity map at run time, from CPL3: 2 MiB pages for
//! a guest-physical range above 4 GiB (a 64-bit BAR the VMM placed high).
//!
//! The boot page tables are ordinary user-accessible memory, so CPL3 code
//! can extend them. Only not-present entries are ever filled in (never
//! changed or removed), which needs no TLB invalidation: x86 does not cache
//! not-present translations. That is why mapped windows are never unmapped;
//! a window whose BAR moved away simply stops being used.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::io::MAPPED_LIMIT;

unsafe extern "C" {
    /// The boot PML4 (boot.rs), identity-mapped at its link address.
    static boot_pml4: u8;
}

const PAGE_2M: u64 = 1 << 21;
/// Present | writable | user.
const TABLE_FLAGS: u64 = 0x7;
/// Present | writable | user | page size (2 MiB leaf), write-back.
const LEAF_2M_FLAGS: u64 = 0x87;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Highest canonical lower-half address + 1.
const VA_LIMIT: u64 = 1 << 47;

/// How many windows above 4 GiB can be mapped.
const MAX_WINDOWS: usize = 8;
/// `(base, end)` of each mapped window; `end == 0`: free slot.
static WINDOWS: [(AtomicU64, AtomicU64); MAX_WINDOWS] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_WINDOWS];

/// Why a range could not be mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// Beyond the 47-bit lower half, or it wraps.
    OutOfRange,
    /// The page allocator gave no page (or one not below 4 GiB).
    NoTablePage,
    /// Every window slot is used.
    TooManyWindows,
}

impl core::fmt::Display for MapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::OutOfRange => "range outside the lower half",
            Self::NoTablePage => "no page for a page table",
            Self::TooManyWindows => "too many mapped windows",
        })
    }
}

/// Whether `[addr, addr + len)` lies inside one window mapped by [`map_identity`].
pub fn is_mapped(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    WINDOWS.iter().any(|(b, e)| {
        let (b, e) = (b.load(Ordering::Relaxed), e.load(Ordering::Relaxed));
        e != 0 && addr >= b && end <= e
    })
}

fn entry_ptr(table: u64, index: u64) -> *mut u64 {
    // Page tables are below 4 GiB (boot image or pages checked at allocation).
    core::ptr::with_exposed_provenance_mut((table + index * 8) as usize)
}

/// The table an entry points to, allocating and linking a zeroed one if the
/// entry is not present.
fn next_table(
    table: u64,
    index: u64,
    alloc_page: &mut dyn FnMut() -> Option<u64>,
) -> Result<u64, MapError> {
    let p = entry_ptr(table, index);
    // SAFETY: `p` is an entry of a page table below 4 GiB (identity-mapped,
    // user-writable); the firmware is single-threaded and nothing else
    // writes page tables.
    let e = unsafe { p.read_volatile() };
    if e & 1 != 0 {
        return Ok(e & ADDR_MASK);
    }
    let page = alloc_page().ok_or(MapError::NoTablePage)?;
    if !page.is_multiple_of(4096) || page.checked_add(4096).is_none_or(|e| e > MAPPED_LIMIT) {
        return Err(MapError::NoTablePage);
    }
    let new: *mut u8 = core::ptr::with_exposed_provenance_mut(page as usize);
    // SAFETY: the allocator handed over this page of RAM (identity-mapped
    // below 4 GiB, checked above) for our exclusive use; zero it before it
    // becomes reachable from the tables.
    unsafe { core::ptr::write_bytes(new, 0, 4096) };
    // SAFETY: as above for `p`; the new entry links a zeroed table, so it
    // maps nothing yet (a not-present to present change needs no flush).
    unsafe { p.write_volatile(page | TABLE_FLAGS) };
    Ok(page)
}

/// Identity-map `[base, base + size)` (rounded out to 2 MiB) with write-back
/// 2 MiB pages, taking zeroed page-table pages below 4 GiB from `alloc_page`.
/// Ranges below 4 GiB are mapped already.
pub fn map_identity(
    base: u64,
    size: u64,
    alloc_page: &mut dyn FnMut() -> Option<u64>,
) -> Result<(), MapError> {
    let end = base
        .checked_add(size)
        .filter(|&e| e <= VA_LIMIT)
        .ok_or(MapError::OutOfRange)?;
    if end <= MAPPED_LIMIT || is_mapped(base, size) {
        return Ok(());
    }
    let slot = WINDOWS
        .iter()
        .find(|(_, e)| e.load(Ordering::Relaxed) == 0)
        .ok_or(MapError::TooManyWindows)?;
    let pml4 = core::ptr::addr_of!(boot_pml4) as u64;
    let mut page = base & !(PAGE_2M - 1);
    while page < end {
        let pdpt = next_table(pml4, (page >> 39) & 511, alloc_page)?;
        let pd = next_table(pdpt, (page >> 30) & 511, alloc_page)?;
        let p = entry_ptr(pd, (page >> 21) & 511);
        // SAFETY: `p` is an entry of a page directory below 4 GiB (the boot
        // image or a page from `alloc_page`); present entries already hold
        // this identity mapping, so only not-present ones are written.
        unsafe {
            if p.read_volatile() & 1 == 0 {
                p.write_volatile(page | LEAF_2M_FLAGS);
            }
        }
        page += PAGE_2M;
    }
    slot.0.store(base, Ordering::Relaxed);
    slot.1.store(end, Ordering::Relaxed);
    Ok(())
}
