//! A session's address space: its control memory (page tables, rings, fence words: nothing a
//! client command can name) at system address 0, the instance's VRAM mapped whole at
//! [`VRAM_VA`], and the client's memfds, each a DMA region of its own from 4 GiB up. GPU VA =
//! system address; 2 MiB leaves throughout, and the DMA domain holds exactly the regions, so an
//! access past one faults `DMA_DOMAIN`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vgpu::DmaDomain;
use vgpu::device::Vgpu;
use vgpu_abi::{packet, pte};
use vgpu_session::proto::ErrorKind;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use super::{Refusal, refuse};
use crate::attach::{Charge, DmaBudget};

/// GPU VA of the instance's VRAM.
pub const VRAM_VA: u64 = 1 << 40;
/// Size of the control memory.
const CTRL_SIZE: u64 = 4 << 20;
/// The root page table; table pages live in `[PT_BASE, RINGS)` of the control memory.
pub(super) const ROOT: u64 = 0;
const PT_BASE: u64 = 0x1000;
const RINGS: u64 = 0x10_0000;
/// Packets per context ring.
pub(super) const RING_ENTRIES: u32 = 2048;
const RING_BYTES: u64 = RING_ENTRIES as u64 * packet::PACKET_SIZE;
/// Fence words (8 bytes per context) in the last page of the control memory.
const FENCES: u64 = CTRL_SIZE - 0x1000;
/// Client memory starts here, each region 2 MiB-aligned.
const CLIENT_BASE: u64 = 4 << 30;
/// Client memory ends here (512 GiB of address space).
const CLIENT_END: u64 = 516 << 30;
const HUGE: u64 = 2 << 20;

// Rings for every context fit below the fence page.
const _: () = assert!(RINGS + vgpu_abi::limits::MAX_CONTEXTS as u64 * RING_BYTES <= FENCES);

/// Where context `ctx`'s ring lies.
pub(super) fn ring(ctx: u32) -> u64 {
    RINGS + u64::from(ctx) * RING_BYTES
}

/// Where context `ctx`'s fence word lies.
pub(super) fn fence_addr(ctx: u32) -> u64 {
    FENCES + u64::from(ctx) * 8
}

/// A mapped client memfd.
#[derive(Debug)]
struct ClientRegion {
    region: Arc<GuestRegionMmap>,
    _charge: Charge,
}

/// See the module documentation.
pub(super) struct Space<'a> {
    vgpu: &'a Vgpu,
    ctrl: Arc<GuestRegionMmap>,
    regions: BTreeMap<u64, ClientRegion>,
    next_pt: u64,
    budget: Arc<DmaBudget>,
}

impl<'a> Space<'a> {
    /// Control memory and the VRAM mapped for `vgpu`, no client memory yet.
    pub(super) fn new(vgpu: &'a Vgpu, budget: Arc<DmaBudget>) -> Result<Self, String> {
        let file = vgpu::backend::memfd("tessera-session-ctrl", CTRL_SIZE, true)
            .map_err(|e| format!("cannot make the session's control memory: {e}"))?;
        let ctrl = GuestRegionMmap::from_range(
            GuestAddress(0),
            CTRL_SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )
        .map_err(|e| format!("cannot map the session's control memory: {e}"))?;
        let mut s = Space {
            vgpu,
            ctrl: Arc::new(ctrl),
            regions: BTreeMap::new(),
            next_pt: PT_BASE,
            budget,
        };
        // Control memory and VRAM are mapped once; client memory comes and goes.
        s.map_range(0, 0, CTRL_SIZE, 0)
            .and_then(|()| s.map_range(VRAM_VA, 0, vgpu.vram().size(), pte::VRAM))
            .and_then(|()| s.apply_dma())
            .map_err(|Refusal(_, m)| m)?;
        Ok(s)
    }

    /// Writes `data` at `at` of the control memory (a ring slot).
    pub(super) fn write_ctrl(&self, at: u64, data: &[u8]) -> Result<(), Refusal> {
        self.ctrl
            .write_slice(data, MemoryRegionAddress(at))
            .map_err(|e| refuse(ErrorKind::Device, e.to_string()))
    }

    /// The fence word of context `ctx`.
    pub(super) fn fence(&self, ctx: u32) -> u64 {
        self.ctrl
            .read_obj(MemoryRegionAddress(fence_addr(ctx)))
            .unwrap_or(0)
    }

    /// The client memory mapped at `iova`.
    pub(super) fn client(&self, iova: u64) -> Option<&GuestRegionMmap> {
        self.regions.get(&iova).map(|r| &*r.region)
    }

    /// Maps `size` bytes of the client's memfd `fd` (sealed against shrinking) as a DMA
    /// region of its own, 2 MiB-aligned from 4 GiB up, and returns its address.
    pub(super) fn map_client(&mut self, size: u64, fd: Option<File>) -> Result<u64, Refusal> {
        let bad = |m: String| refuse(ErrorKind::BadMemory, m);
        let fd = fd.ok_or_else(|| bad("MapMemory needs a memfd sent with it".into()))?;
        if size == 0 || size > isize::MAX as u64 {
            return Err(refuse(
                ErrorKind::BadArgument,
                format!("client memory of {size} bytes"),
            ));
        }
        let len = fd
            .metadata()
            .map_err(|e| bad(format!("cannot stat the memfd: {e}")))?
            .len();
        if size > len {
            return Err(bad(format!("{size} bytes asked of a {len}-byte file")));
        }
        // SAFETY: F_GET_SEALS only reads the seals of a descriptor we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(bad(
                "client memory must be a memfd sealed against shrinking (F_SEAL_SHRINK)".into(),
            ));
        }
        let span = size.next_multiple_of(HUGE);
        let iova = self.free_iova(span).ok_or_else(|| {
            refuse(
                ErrorKind::Exhausted,
                "the session's client address space is full",
            )
        })?;
        // One client holds at most as many regions as a vfio-user client may map, so that
        // a few sessions cannot take the server's whole region budget (`DmaBudget`).
        if self.regions.len() >= crate::attach::MAX_DMA_REGIONS {
            return Err(refuse(
                ErrorKind::Exhausted,
                format!(
                    "a session maps at most {} client memory regions",
                    crate::attach::MAX_DMA_REGIONS
                ),
            ));
        }
        let held = self.regions.values().map(|r| r.region.len()).sum();
        let charge = self
            .budget
            .charge(size, held)
            .map_err(|e| refuse(ErrorKind::Exhausted, e.to_string()))?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(iova),
            size as usize,
            Some(FileOffset::new(fd, 0)),
        )
        .map_err(|e| bad(format!("cannot map client memory: {e}")))?;
        self.map_range(iova, iova, span, 0)?;
        self.regions.insert(
            iova,
            ClientRegion {
                region: Arc::new(region),
                _charge: charge,
            },
        );
        if let Err(e) = self.apply_dma() {
            self.regions.remove(&iova);
            self.unmap_range(iova, span);
            return Err(e);
        }
        Ok(iova)
    }

    /// The lowest 2 MiB-aligned address with `span` bytes free in the client range.
    fn free_iova(&self, span: u64) -> Option<u64> {
        let mut at = CLIENT_BASE;
        for (&start, r) in &self.regions {
            if at + span <= start {
                break;
            }
            at = (start + r.region.len()).next_multiple_of(HUGE);
        }
        (at.checked_add(span)? <= CLIENT_END).then_some(at)
    }

    /// Unmaps the client memory at `iova`, once no packet uses it.
    pub(super) fn drop_client(&mut self, iova: u64) {
        if let Some(r) = self.regions.remove(&iova) {
            let span = r.region.len().next_multiple_of(HUGE);
            self.unmap_range(iova, span);
            // Returns once no packet uses the old mapping; only then is the region unmapped
            // (dropped here).
            if let Err(Refusal(_, m)) = self.apply_dma() {
                tracing::warn!("session: the GPU could not import the remaining memory: {m}");
            }
            drop(r);
        }
    }

    /// Maps `[va, va + len)` to system address `pa` (+ `flags`) with 2 MiB leaves.
    fn map_range(&mut self, va: u64, pa: u64, len: u64, flags: u64) -> Result<(), Refusal> {
        let mut off = 0;
        while off < len {
            let pd = self.table_for(va + off)?;
            let leaf = (pa + off) | pte::PRESENT | pte::WRITABLE | pte::HUGE | flags;
            self.write_pte(pd + ((va + off) >> 21 & 511) * 8, leaf)?;
            off += HUGE;
        }
        Ok(())
    }

    fn unmap_range(&mut self, va: u64, len: u64) {
        let mut off = 0;
        while off < len {
            if let Ok(pd) = self.table_for(va + off) {
                let _ = self.write_pte(pd + ((va + off) >> 21 & 511) * 8, 0);
            }
            off += HUGE;
        }
    }

    /// The page directory covering `va`, made on first use.
    fn table_for(&mut self, va: u64) -> Result<u64, Refusal> {
        let pdpt = self.child(ROOT + (va >> 39 & 511) * 8)?;
        self.child(pdpt + (va >> 30 & 511) * 8)
    }

    /// The table entry `slot` points to, made if absent.
    fn child(&mut self, slot: u64) -> Result<u64, Refusal> {
        let e: u64 = self
            .ctrl
            .read_obj(MemoryRegionAddress(slot))
            .map_err(|e| refuse(ErrorKind::Device, e.to_string()))?;
        if e & pte::PRESENT != 0 {
            return Ok(e & pte::ADDR_MASK);
        }
        if self.next_pt >= RINGS {
            return Err(refuse(
                ErrorKind::Exhausted,
                "the session's page tables are full",
            ));
        }
        let t = self.next_pt;
        self.next_pt += 0x1000;
        self.write_pte(slot, t | pte::PRESENT)?;
        Ok(t)
    }

    fn write_pte(&self, at: u64, v: u64) -> Result<(), Refusal> {
        self.ctrl
            .write_obj(v, MemoryRegionAddress(at))
            .map_err(|e| refuse(ErrorKind::Device, e.to_string()))
    }

    fn apply_dma(&self) -> Result<(), Refusal> {
        let mut regions = vec![self.ctrl.clone()];
        regions.extend(self.regions.values().map(|r| r.region.clone()));
        let domain = DmaDomain::new(regions.iter().map(|r| (r.start_addr().0, r.len())));
        let sys = GuestMemoryMmap::from_arc_regions(regions)
            .map_err(|e| refuse(ErrorKind::Device, e.to_string()))?;
        self.vgpu
            .set_dma(sys, domain)
            .map_err(|e| refuse(ErrorKind::Device, e.to_string()))
    }
}
