//! A reference GPU MMU, written from the `vgpu-abi` contract (`pte` module docs and fault
//! codes) independently of the device's walker: four levels of 512 entries, 4 KiB pages,
//! 2 MiB / 1 GiB huge leaves, tables and leaves in guest RAM (checked against the DMA
//! domain) or VRAM (checked against the partition size).

use vgpu_abi::{fault, pte};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A physically contiguous piece of a resolved buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// In VRAM (else guest RAM).
    pub vram: bool,
    /// Address in that memory.
    pub addr: u64,
    /// Length.
    pub len: u64,
}

/// `(fault code, address)`.
pub type RefFault = (u32, u64);

/// The memories as the contract describes them.
#[derive(Debug, Clone, Copy)]
pub struct RefMem<'a> {
    /// Guest RAM.
    pub sys: &'a GuestMemoryMmap,
    /// The DMA domain: `(base, size)` ranges.
    pub domain: &'a [(u64, u64)],
    /// The vGPU's VRAM.
    pub vram: &'a GuestMemoryMmap,
    /// Its size.
    pub vram_size: u64,
}

#[derive(Debug, Clone, Copy)]
struct Leaf {
    vram: bool,
    base: u64,
    size: u64,
    writable: bool,
}

impl RefMem<'_> {
    /// Whether the device may touch `[addr, addr + len)`.
    pub fn reachable(&self, vram: bool, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        if vram {
            end <= self.vram_size
        } else {
            self.domain
                .iter()
                .any(|&(b, s)| addr >= b && end <= b.saturating_add(s))
        }
    }

    fn range_fault(vram: bool) -> u32 {
        if vram {
            fault::VRAM_RANGE
        } else {
            fault::DMA_DOMAIN
        }
    }

    fn entry(&self, vram: bool, addr: u64, va: u64) -> Result<u64, RefFault> {
        if !self.reachable(vram, addr, 8) {
            return Err((Self::range_fault(vram), va));
        }
        let mem = if vram { self.vram } else { self.sys };
        mem.read_obj::<u64>(GuestAddress(addr))
            .map_err(|_| (Self::range_fault(vram), va))
    }

    fn walk(&self, root: u64, va: u64) -> Result<Leaf, RefFault> {
        if root & !(pte::ADDR_MASK | pte::VRAM) != 0 {
            return Err((fault::BAD_ROOT, root));
        }
        let mut vram = root & pte::VRAM != 0;
        let mut table = root & pte::ADDR_MASK;
        for level in (1..=pte::LEVELS).rev() {
            let shift = 12 + 9 * (level - 1);
            let e = self.entry(vram, table + ((va >> shift) & 511) * 8, va)?;
            if e & pte::PRESENT == 0 {
                return Err((fault::NOT_PRESENT, va));
            }
            if e & pte::RESERVED_MASK != 0 {
                return Err((fault::BAD_PTE, va));
            }
            let huge = e & pte::HUGE != 0;
            if huge && level != 2 && level != 3 {
                return Err((fault::BAD_PTE, va));
            }
            if huge || level == 1 {
                let size = 1u64 << shift;
                let base = e & pte::ADDR_MASK;
                if !base.is_multiple_of(size) {
                    return Err((fault::BAD_PTE, va));
                }
                return Ok(Leaf {
                    vram: e & pte::VRAM != 0,
                    base,
                    size,
                    writable: e & pte::WRITABLE != 0,
                });
            }
            vram = e & pte::VRAM != 0;
            table = e & pte::ADDR_MASK;
        }
        unreachable!("level 1 always returns")
    }

    /// Resolves `[va, va + len)`; pieces are merged when contiguous in the same memory.
    pub fn resolve(
        &self,
        root: u64,
        va: u64,
        len: u64,
        write: bool,
    ) -> Result<Vec<Piece>, RefFault> {
        let (pieces, fault) = self.resolve_prefix(root, va, len, write);
        match fault {
            Some(f) => Err(f),
            None => Ok(pieces),
        }
    }

    /// Like [`RefMem::resolve`], but also returns the pieces resolved before a fault.
    pub fn resolve_prefix(
        &self,
        root: u64,
        va: u64,
        len: u64,
        write: bool,
    ) -> (Vec<Piece>, Option<RefFault>) {
        let mut out: Vec<Piece> = Vec::new();
        if len == 0 {
            return (out, None);
        }
        let Some(end) = va.checked_add(len).filter(|&e| e <= 1 << pte::VA_BITS) else {
            return (out, Some((fault::VA_RANGE, va)));
        };
        let mut cur = va;
        while cur < end {
            let leaf = match self.walk(root, cur) {
                Ok(l) => l,
                Err(f) => return (out, Some(f)),
            };
            if write && !leaf.writable {
                return (out, Some((fault::WRITE_PROTECT, cur)));
            }
            let within = cur % leaf.size;
            let n = (leaf.size - within).min(end - cur);
            let addr = leaf.base + within;
            if !self.reachable(leaf.vram, addr, n) {
                return (out, Some((Self::range_fault(leaf.vram), cur)));
            }
            match out.last_mut() {
                Some(p) if p.vram == leaf.vram && p.addr + p.len == addr => p.len += n,
                _ => out.push(Piece {
                    vram: leaf.vram,
                    addr,
                    len: n,
                }),
            }
            cur += n;
        }
        (out, None)
    }

    /// Reads the bytes of `pieces`.
    pub fn read(&self, pieces: &[Piece]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces {
            let mem = if p.vram { self.vram } else { self.sys };
            let at = out.len();
            out.resize(at + p.len as usize, 0);
            mem.read_slice(&mut out[at..], GuestAddress(p.addr))
                .expect("reference read of a reachable piece");
        }
        out
    }
}

/// Whether any byte is covered by two of `pieces`.
pub fn any_overlap<'a>(pieces: impl IntoIterator<Item = &'a Piece>) -> bool {
    let mut all: Vec<(bool, u64, u64)> = pieces
        .into_iter()
        .map(|p| (p.vram, p.addr, p.addr + p.len))
        .collect();
    all.sort_unstable();
    let mut reach: Option<(bool, u64)> = None;
    for (vram, start, end) in all {
        match reach {
            Some((v, e)) if v == vram && start < e => return true,
            Some((v, e)) if v == vram => reach = Some((v, e.max(end))),
            _ => reach = Some((vram, end)),
        }
    }
    false
}
