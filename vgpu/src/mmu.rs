//! The GPU MMU: walks a context's guest-owned page tables (4 levels, 4 KiB pages, 2 MiB and
//! 1 GiB huge pages, tables in guest RAM or VRAM), caches leaves in a TLB, and turns a
//! `(va, len)` buffer into a checked [`ScatterList`]. Every table and every leaf is checked
//! against VRAM bounds or the DMA domain; anything wrong is a [`Fault`], never a host access.

use std::collections::HashMap;

use vgpu_abi::{fault, pte};

use crate::mem::{Extent, Fault, Loc, ScatterList, Spaces};

/// Most leaves the TLB keeps before it starts over (bounds host memory per context).
pub const TLB_CAPACITY: usize = 4096;

/// A context's page-table root as programmed (`CTX_PT_ROOT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Root(pub u64);

impl Root {
    /// The root table's location and address, or `BAD_ROOT`.
    fn table(self) -> Result<(Loc, u64), Fault> {
        if self.0 & !(pte::ADDR_MASK | pte::VRAM) != 0 {
            return Err(Fault::new(fault::BAD_ROOT, self.0));
        }
        Ok((loc_of(self.0), self.0 & pte::ADDR_MASK))
    }
}

fn loc_of(entry: u64) -> Loc {
    if entry & pte::VRAM != 0 {
        Loc::Vram
    } else {
        Loc::Sys
    }
}

/// A cached leaf translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Leaf {
    loc: Loc,
    /// Physical address of the start of the page.
    base: u64,
    /// Page size (4 KiB, 2 MiB or 1 GiB).
    size: u64,
    writable: bool,
}

/// One context's translation cache. Entries are keyed by the virtual page (of the leaf's
/// size); `invalidate` empties it.
#[derive(Debug, Default)]
pub struct Tlb {
    leaves: HashMap<(u64, u64), Leaf>,
    /// Walks performed (for tests and statistics).
    pub walks: u64,
}

impl Tlb {
    /// Drops every cached translation.
    pub fn invalidate(&mut self) {
        self.leaves.clear();
    }

    fn lookup(&self, va: u64) -> Option<Leaf> {
        [1u64 << 12, 1 << 21, 1 << 30]
            .iter()
            .find_map(|&size| self.leaves.get(&(va & !(size - 1), size)).copied())
    }

    fn insert(&mut self, va: u64, leaf: Leaf) {
        if self.leaves.len() >= TLB_CAPACITY {
            self.leaves.clear();
        }
        self.leaves.insert((va & !(leaf.size - 1), leaf.size), leaf);
    }
}

const VA_LIMIT: u64 = 1 << pte::VA_BITS;

/// Translates `va` by walking the tables from `root`.
fn walk(spaces: &Spaces, root: Root, va: u64) -> Result<Leaf, Fault> {
    let (mut loc, mut table) = root.table()?;
    for level in (1..=pte::LEVELS).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (va >> shift) & (pte::ENTRIES - 1);
        let entry_addr = table + index * 8;
        spaces.check(loc, entry_addr, 8, va)?;
        let entry = spaces
            .read_u64(loc, entry_addr)
            .map_err(|f| Fault { addr: va, ..f })?;
        if entry & pte::PRESENT == 0 {
            return Err(Fault::new(fault::NOT_PRESENT, va));
        }
        if entry & pte::RESERVED_MASK != 0 {
            return Err(Fault::new(fault::BAD_PTE, va));
        }
        let huge = entry & pte::HUGE != 0;
        if level == 1 || huge {
            if huge && !(level == 2 || level == 3) {
                return Err(Fault::new(fault::BAD_PTE, va));
            }
            let size = 1u64 << shift;
            let base = entry & pte::ADDR_MASK;
            if base & (size - 1) != 0 {
                return Err(Fault::new(fault::BAD_PTE, va));
            }
            return Ok(Leaf {
                loc: loc_of(entry),
                base,
                size,
                writable: entry & pte::WRITABLE != 0,
            });
        }
        loc = loc_of(entry);
        table = entry & pte::ADDR_MASK;
    }
    Err(Fault::new(fault::BAD_PTE, va))
}

/// Resolves the buffer `[va, va + len)` for reading (or writing) into a checked scatter list.
/// A zero-length buffer resolves to an empty list without touching the tables.
pub fn resolve(
    spaces: &Spaces,
    root: Root,
    tlb: &mut Tlb,
    va: u64,
    len: u64,
    write: bool,
) -> Result<ScatterList, Fault> {
    let mut list = ScatterList::default();
    if len == 0 {
        return Ok(list);
    }
    if va.checked_add(len).is_none_or(|end| end > VA_LIMIT) {
        return Err(Fault::new(fault::VA_RANGE, va));
    }
    let mut cur = va;
    let end = va + len;
    while cur < end {
        let leaf = match tlb.lookup(cur) {
            Some(l) => l,
            None => {
                tlb.walks += 1;
                let l = walk(spaces, root, cur)?;
                tlb.insert(cur, l);
                l
            }
        };
        if write && !leaf.writable {
            return Err(Fault::new(fault::WRITE_PROTECT, cur));
        }
        let within = cur & (leaf.size - 1);
        let n = (leaf.size - within).min(end - cur);
        let addr = leaf.base + within;
        spaces.check(leaf.loc, addr, n, cur)?;
        list.push(Extent {
            loc: leaf.loc,
            addr,
            len: n,
        });
        cur += n;
    }
    Ok(list)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mem::tests::spaces;

    /// Builds page tables in `loc` memory from `tables_at` upwards, mapping `va` to `pa`
    /// with leaf `flags` (HUGE with `level` 2 or 3 for huge pages).
    pub struct Builder {
        pub loc: Loc,
        pub next: u64,
        pub root: u64,
    }

    impl Builder {
        pub fn new(s: &Spaces, loc: Loc, tables_at: u64) -> Self {
            let b = Builder {
                loc,
                next: tables_at + 0x1000,
                root: tables_at,
            };
            s.write(loc, tables_at, &[0u8; 4096]).unwrap();
            b
        }

        fn flag(&self) -> u64 {
            if self.loc == Loc::Vram { pte::VRAM } else { 0 }
        }

        pub fn root(&self) -> Root {
            Root(self.root | self.flag())
        }

        pub fn map(&mut self, s: &Spaces, va: u64, leaf: u64, leaf_level: u32) {
            let mut table = self.root;
            for level in (leaf_level..=4).rev() {
                let idx = (va >> (12 + 9 * (level - 1))) & 511;
                let at = table + idx * 8;
                if level == leaf_level {
                    s.write(self.loc, at, &leaf.to_le_bytes()).unwrap();
                    return;
                }
                let cur = s.read_u64(self.loc, at).unwrap();
                table = if cur & pte::PRESENT != 0 {
                    cur & pte::ADDR_MASK
                } else {
                    let t = self.next;
                    self.next += 0x1000;
                    s.write(self.loc, t, &[0u8; 4096]).unwrap();
                    s.write(
                        self.loc,
                        at,
                        &(t | pte::PRESENT | self.flag()).to_le_bytes(),
                    )
                    .unwrap();
                    t
                };
            }
        }
    }

    const RW: u64 = pte::PRESENT | pte::WRITABLE;

    #[test]
    fn walks_sysmem_and_vram_tables() {
        let s = spaces();
        for loc in [Loc::Sys, Loc::Vram] {
            let mut b = Builder::new(&s, loc, 0x10000);
            b.map(&s, 0x4000_0000, 0x8_0000 | RW | pte::VRAM, 1);
            b.map(&s, 0x4000_1000, 0x9_0000 | RW, 1);
            let mut tlb = Tlb::default();
            let sl = resolve(&s, b.root(), &mut tlb, 0x4000_0ff0, 0x20, true).unwrap();
            assert_eq!(
                sl.extents(),
                &[
                    Extent {
                        loc: Loc::Vram,
                        addr: 0x8_0ff0,
                        len: 0x10
                    },
                    Extent {
                        loc: Loc::Sys,
                        addr: 0x9_0000,
                        len: 0x10
                    }
                ]
            );
            assert_eq!(tlb.walks, 2);
            resolve(&s, b.root(), &mut tlb, 0x4000_0000, 8, false).unwrap();
            assert_eq!(tlb.walks, 2, "TLB hit");
        }
    }

    #[test]
    fn huge_pages() {
        let mut s = spaces();
        // 4 MiB of VRAM so a 2 MiB page fits.
        s.vram = std::sync::Arc::new(crate::backend::soft::SoftVram::new(4 << 20).unwrap());
        let mut b = Builder::new(&s, Loc::Vram, 0);
        b.map(&s, 0x20_0000, 0x20_0000 | RW | pte::VRAM | pte::HUGE, 2);
        let mut tlb = Tlb::default();
        let sl = resolve(&s, b.root(), &mut tlb, 0x20_0000, 2 << 20, true).unwrap();
        assert_eq!(sl.extents().len(), 1);
        // 1 GiB page pointing at VRAM 0: the leaf itself is legal but any access past the
        // partition faults.
        b.map(&s, 1 << 30, RW | pte::VRAM | pte::HUGE, 3);
        let sl = resolve(&s, b.root(), &mut tlb, 1 << 30, 4096, false).unwrap();
        assert_eq!(sl.extents()[0].addr, 0);
        assert_eq!(
            resolve(&s, b.root(), &mut tlb, (1 << 30) + (4 << 20), 8, false).unwrap_err(),
            Fault::new(fault::VRAM_RANGE, (1 << 30) + (4 << 20))
        );
        // Misaligned huge leaf, huge at level 1 and 4.
        b.map(&s, 0x40_0000, 0x1000 | RW | pte::VRAM | pte::HUGE, 2);
        assert_eq!(
            resolve(&s, b.root(), &mut tlb, 0x40_0000, 8, false)
                .unwrap_err()
                .code,
            fault::BAD_PTE
        );
    }

    #[test]
    fn every_fault_code_of_the_walker() {
        let s = spaces();
        let mut b = Builder::new(&s, Loc::Sys, 0x10000);
        let mut tlb = Tlb::default();
        let mut check = |va: u64, len: u64, write: bool, root: Root, code: u32| {
            tlb.invalidate();
            let f = resolve(&s, root, &mut tlb, va, len, write).unwrap_err();
            assert_eq!(f.code, code, "va {va:#x}");
        };
        let root = b.root();
        check(0x1000, 8, false, root, fault::NOT_PRESENT);
        b.map(&s, 0x2000, 0x3000 | pte::PRESENT, 1);
        check(0x2000, 8, true, root, fault::WRITE_PROTECT);
        b.map(&s, 0x5000, 0xc000_0000 | RW, 1);
        check(0x5000, 8, false, root, fault::DMA_DOMAIN);
        b.map(&s, 0x6000, (1 << 20) | RW, 1);
        check(0x6000, 8, false, root, fault::DMA_DOMAIN);
        b.map(&s, 0x7000, (2 << 20) | RW | pte::VRAM, 1);
        check(0x7000, 8, false, root, fault::VRAM_RANGE);
        b.map(&s, 0x8000, 0x3000 | RW | (1 << 60), 1);
        check(0x8000, 8, false, root, fault::BAD_PTE);
        check(1 << 48, 8, false, root, fault::VA_RANGE);
        check((1 << 48) - 4, 8, false, root, fault::VA_RANGE);
        check(0, 8, false, Root(0x10001 | 0x800), fault::BAD_ROOT);
        check(0, 8, false, Root(0xc000_0000), fault::DMA_DOMAIN);
        // A table pointer outside VRAM faults on the walk, not on the host.
        b.map(&s, 0x40_0000_0000, (8 << 20) | pte::PRESENT | pte::VRAM, 3);
        check(0x40_0000_0000, 8, false, root, fault::VRAM_RANGE);
        // Zero length never walks.
        assert!(
            resolve(&s, root, &mut tlb, 0x1000, 0, false)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn invalidate_sees_new_tables() {
        let s = spaces();
        let mut b = Builder::new(&s, Loc::Sys, 0x10000);
        b.map(&s, 0x1000, 0x3000 | RW, 1);
        let mut tlb = Tlb::default();
        resolve(&s, b.root(), &mut tlb, 0x1000, 8, false).unwrap();
        b.map(&s, 0x1000, 0, 1);
        assert!(
            resolve(&s, b.root(), &mut tlb, 0x1000, 8, false).is_ok(),
            "stale TLB"
        );
        tlb.invalidate();
        assert_eq!(
            resolve(&s, b.root(), &mut tlb, 0x1000, 8, false)
                .unwrap_err()
                .code,
            fault::NOT_PRESENT
        );
    }
}
