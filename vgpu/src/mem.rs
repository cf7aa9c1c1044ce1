//! The two memories the GPU addresses — guest system memory and VRAM — and validated
//! scatter lists over them.

use std::sync::Arc;

use vgpu_abi::fault;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::{Import, Vram};
use crate::domain::DmaDomain;

/// Where a GPU-physical address points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Loc {
    /// Guest RAM (guest-physical address, checked against the DMA domain).
    Sys,
    /// This vGPU's VRAM (offset into its partition).
    Vram,
}

/// A device-side fault: a code from `vgpu_abi::fault` and the address it concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// `vgpu_abi::fault::*`.
    pub code: u32,
    /// The GPU virtual address (or ring/packet address) that faulted.
    pub addr: u64,
}

impl Fault {
    /// A fault with `code` at `addr`.
    pub fn new(code: u32, addr: u64) -> Self {
        Fault { code, addr }
    }
}

/// The memories a vGPU may reach.
#[derive(Clone)]
pub struct Spaces {
    /// What the GPU imported of `sys` (released when the last packet using these memories
    /// is done with them). Declared first so it is dropped before the memory it imported.
    pub import: Option<Arc<Import>>,
    /// Guest RAM.
    pub sys: GuestMemoryMmap,
    /// Which parts of guest RAM the device may touch.
    pub domain: DmaDomain,
    /// This vGPU's VRAM, addressed from 0.
    pub vram: Arc<dyn Vram>,
}

impl std::fmt::Debug for Spaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spaces")
            .field("domain", &self.domain)
            .field("vram", &self.vram)
            .field("imported", &self.import.is_some())
            .finish_non_exhaustive()
    }
}

impl Spaces {
    /// Checks that `[addr, addr + len)` is reachable in `loc`; the fault names `va`.
    pub fn check(&self, loc: Loc, addr: u64, len: u64, va: u64) -> Result<(), Fault> {
        let ok = match loc {
            Loc::Sys => self.domain.contains(addr, len),
            Loc::Vram => addr.checked_add(len).is_some_and(|e| e <= self.vram.size()),
        };
        if ok {
            Ok(())
        } else {
            Err(Fault::new(
                match loc {
                    Loc::Sys => fault::DMA_DOMAIN,
                    Loc::Vram => fault::VRAM_RANGE,
                },
                va,
            ))
        }
    }

    /// Reads a range after checking it. An error past the check means the memory went
    /// away: reported as a fault, never a panic.
    pub fn read(&self, loc: Loc, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.check(loc, addr, buf.len() as u64, addr)?;
        match loc {
            Loc::Sys => self
                .sys
                .read_slice(buf, GuestAddress(addr))
                .map_err(|_| Fault::new(fault::DMA_DOMAIN, addr)),
            Loc::Vram => self.vram.read(addr, buf),
        }
    }

    /// Writes a range after checking it.
    pub fn write(&self, loc: Loc, addr: u64, buf: &[u8]) -> Result<(), Fault> {
        self.check(loc, addr, buf.len() as u64, addr)?;
        match loc {
            Loc::Sys => self
                .sys
                .write_slice(buf, GuestAddress(addr))
                .map_err(|_| Fault::new(fault::DMA_DOMAIN, addr)),
            Loc::Vram => self.vram.write(addr, buf),
        }
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, loc: Loc, addr: u64) -> Result<u64, Fault> {
        let mut b = [0u8; 8];
        self.read(loc, addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// One physically contiguous piece of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Memory.
    pub loc: Loc,
    /// Address in that memory.
    pub addr: u64,
    /// Length.
    pub len: u64,
}

/// A GPU buffer resolved through the page tables and checked, ready for plain accesses.
#[derive(Debug, Clone, Default)]
pub struct ScatterList {
    extents: Vec<Extent>,
    /// Offset (in the buffer) where each extent starts.
    starts: Vec<u64>,
    len: u64,
}

impl ScatterList {
    /// Appends an extent, merging it with the previous one when contiguous.
    pub fn push(&mut self, e: Extent) {
        if let Some(last) = self.extents.last_mut()
            && last.loc == e.loc
            && last.addr + last.len == e.addr
        {
            last.len += e.len;
            self.len += e.len;
            return;
        }
        self.starts.push(self.len);
        self.extents.push(e);
        self.len += e.len;
    }

    /// Buffer length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of extents (after merging).
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Calls `f(extent, offset inside the extent, range inside the request)` for the pieces
    /// that cover `[offset, offset + len)` of the buffer, in order.
    pub fn pieces(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Extent, u64, std::ops::Range<usize>) -> Result<(), Fault>,
    ) -> Result<(), Fault> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Fault::new(fault::BAD_PACKET, offset));
        }
        let mut i = self
            .starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1);
        let mut done = 0u64;
        while done < len {
            let (e, start) = (&self.extents[i], self.starts[i]);
            let within = offset + done - start;
            let n = (e.len - within).min(len - done);
            f(e, within, done as usize..(done + n) as usize)?;
            done += n;
            i += 1;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at buffer offset `offset`.
    pub fn read(&self, spaces: &Spaces, offset: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.pieces(offset, buf.len() as u64, |e, within, r| {
            spaces.read(e.loc, e.addr + within, &mut buf[r])
        })
    }

    /// Writes `buf` at buffer offset `offset`.
    pub fn write(&self, spaces: &Spaces, offset: u64, buf: &[u8]) -> Result<(), Fault> {
        self.pieces(offset, buf.len() as u64, |e, within, r| {
            spaces.write(e.loc, e.addr + within, &buf[r])
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// 1 MiB of RAM at 0 with a hole above, and 1 MiB of VRAM.
    pub fn spaces() -> Spaces {
        let sys = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Spaces {
            sys,
            domain: DmaDomain::new([(0, 1 << 20)]),
            vram: Arc::new(crate::backend::soft::SoftVram::new(1 << 20).unwrap()),
            import: None,
        }
    }

    #[test]
    fn checks_and_faults() {
        let s = spaces();
        assert!(s.check(Loc::Sys, 0, 1 << 20, 0).is_ok());
        assert_eq!(
            s.check(Loc::Sys, 1 << 20, 1, 7),
            Err(Fault::new(fault::DMA_DOMAIN, 7))
        );
        assert_eq!(
            s.check(Loc::Vram, (1 << 20) - 4, 8, 9),
            Err(Fault::new(fault::VRAM_RANGE, 9))
        );
        let mut b = [0u8; 4];
        assert!(s.read(Loc::Vram, u64::MAX - 1, &mut b).is_err());
    }

    #[test]
    fn scatter_list_merges_and_splits() {
        let s = spaces();
        let mut sl = ScatterList::default();
        sl.push(Extent {
            loc: Loc::Sys,
            addr: 0x1000,
            len: 0x1000,
        });
        sl.push(Extent {
            loc: Loc::Sys,
            addr: 0x2000,
            len: 0x1000,
        });
        sl.push(Extent {
            loc: Loc::Vram,
            addr: 0x10,
            len: 0x10,
        });
        assert_eq!(sl.extents().len(), 2);
        assert_eq!(sl.len(), 0x2010);
        let data: Vec<u8> = (0..0x30).map(|i| i as u8).collect();
        sl.write(&s, 0x1ff0, &data[..0x20]).unwrap();
        let mut back = [0u8; 0x20];
        sl.read(&s, 0x1ff0, &mut back).unwrap();
        assert_eq!(&back[..], &data[..0x20]);
        let mut v = [0u8; 0x10];
        s.read(Loc::Vram, 0x10, &mut v).unwrap();
        assert_eq!(&v[..], &data[0x10..0x20]);
        assert!(sl.read(&s, 0x2000, &mut back).is_err(), "past the end");
    }
}
