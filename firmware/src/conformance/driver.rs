//! A minimal driver for the Tessera vGPU, written from the contract
//! (`vgpu_abi`, docs/vgpu-spec.md): registers, GPU memory (guest RAM or
//! VRAM through the BAR2 aperture), GPU page tables, contexts and rings.
//! Everything here runs at CPL3; register accesses are trapped MMIO,
//! memory accesses are plain loads and stores.

use vgpu_abi::{Packet, ctx_control, packet, pte, regs, wait};

use super::{Fail, Suite};
use crate::arena::Arena;
use crate::io::{barrier, mmio_read32, mmio_write32};
use crate::pci::Bdf;

/// GPU and CPU page size.
pub const PAGE: u64 = pte::PAGE_SIZE;
/// Ring of a standard [`Env`] (one page: 64 packets).
pub const RING_VA: u64 = 0x0010_0000;
/// Fence page of a standard [`Env`]: the fence at offset 0, scratch after it.
pub const FENCE_VA: u64 = 0x0020_0000;
/// Where a standard [`Env`] maps its data buffers.
pub const DATA_VA: u64 = 0x1000_0000;
/// How many `WAIT` reads (each up to `WAIT_TIMEOUT_MS`) a wait may take.
const WAIT_TRIES: u32 = 50;

/// Which memory a GPU-physical address names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// Guest RAM: a guest-physical address.
    Sys,
    /// This vGPU's VRAM: an offset.
    Vram,
}

impl core::fmt::Display for Loc {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Loc::Sys => "sysmem",
            Loc::Vram => "vram",
        })
    }
}

/// A GPU-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuAddr {
    pub loc: Loc,
    pub addr: u64,
}

impl GpuAddr {
    pub const fn new(loc: Loc, addr: u64) -> Self {
        Self { loc, addr }
    }

    /// The address with the PTE location bit: a table pointer or leaf base.
    pub fn pte_bits(self) -> u64 {
        self.addr
            | match self.loc {
                Loc::Sys => 0,
                Loc::Vram => pte::VRAM,
            }
    }
}

/// The vGPU as found on the PCI bus.
#[derive(Debug)]
pub struct Gpu {
    pub bdf: Bdf,
    /// Guest-physical address of BAR0 (registers).
    pub bar0: u64,
    /// Guest-physical address of BAR2 (the VRAM aperture, identity-mapped).
    pub bar2: u64,
    /// BAR2 size found by sizing.
    pub bar2_size: u64,
    /// `VRAM_SIZE` (bounded by the BAR size).
    pub vram_size: u64,
    /// `NUM_CONTEXTS` (bounded by `MAX_CONTEXTS`).
    pub num_ctx: u32,
}

impl Gpu {
    /// Read a BAR0 register.
    pub fn rd(&self, off: u64) -> u32 {
        mmio_read32(self.bar0 + off)
    }

    /// Write a BAR0 register.
    pub fn wr(&self, off: u64, v: u32) {
        mmio_write32(self.bar0 + off, v)
    }

    /// Read a `_LO`/`_HI` register pair.
    pub fn rd64(&self, lo: u64) -> u64 {
        let l = self.rd(lo);
        u64::from(self.rd(lo + 4)) << 32 | u64::from(l)
    }

    /// Read context `ctx`'s register `reg`.
    pub fn ctx_rd(&self, ctx: u32, reg: u64) -> u32 {
        self.rd(regs::ctx_reg(ctx, reg))
    }

    /// Write context `ctx`'s register `reg`.
    pub fn ctx_wr(&self, ctx: u32, reg: u64, v: u32) {
        self.wr(regs::ctx_reg(ctx, reg), v)
    }

    /// Read context `ctx`'s `_LO`/`_HI` register pair.
    pub fn ctx_rd64(&self, ctx: u32, lo: u64) -> u64 {
        self.rd64(regs::ctx_reg(ctx, lo))
    }

    /// Write context `ctx`'s `_LO`/`_HI` register pair.
    pub fn ctx_wr64(&self, ctx: u32, lo: u64, v: u64) {
        self.ctx_wr(ctx, lo, v as u32);
        self.ctx_wr(ctx, lo + 4, (v >> 32) as u32);
    }

    /// GPU time in ns (`TIMESTAMP_LO` latches the high half).
    pub fn timestamp(&self) -> u64 {
        self.rd64(regs::TIMESTAMP_LO)
    }

    /// CPU address of GPU-physical `a`: identity for guest RAM, through the
    /// BAR2 aperture for VRAM.
    pub fn cpu_addr(&self, a: GpuAddr) -> u64 {
        match a.loc {
            Loc::Sys => a.addr,
            Loc::Vram => self.bar2 + a.addr,
        }
    }

    /// Stop context `ctx` and clear its fault, TLB, head and tail.
    pub fn ctx_reset(&self, ctx: u32) {
        self.ctx_wr(ctx, regs::CTX_CONTROL, ctx_control::RESET);
    }

    /// A one-line summary of context `ctx`'s state, for failure messages.
    pub fn ctx_state(&self, ctx: u32) -> CtxState {
        CtxState {
            status: self.ctx_rd(ctx, regs::CTX_STATUS),
            head: self.ctx_rd(ctx, regs::CTX_RING_HEAD),
            tail: self.ctx_rd(ctx, regs::CTX_RING_TAIL),
            fault: self.ctx_rd(ctx, regs::CTX_FAULT_CODE),
            fault_addr: self.ctx_rd64(ctx, regs::CTX_FAULT_ADDR_LO),
            fence: self.ctx_rd64(ctx, regs::CTX_FENCE_LO),
        }
    }

    /// Read `WAIT` for `ctx` reaching fence `value`, retrying while it times
    /// out, up to about `WAIT_TRIES * WAIT_TIMEOUT_MS`.
    pub fn wait_fence(&self, ctx: u32, value: u64) -> u32 {
        self.wr(regs::WAIT_CTX, ctx);
        self.wr(regs::WAIT_VALUE, value as u32);
        let mut r = wait::TIMEOUT;
        for _ in 0..WAIT_TRIES {
            r = self.rd(regs::WAIT);
            if r != wait::TIMEOUT {
                break;
            }
        }
        r
    }

    /// One `WAIT` read (at most `WAIT_TIMEOUT_MS`).
    pub fn wait_once(&self, ctx: u32, value: u64) -> u32 {
        self.wr(regs::WAIT_CTX, ctx);
        self.wr(regs::WAIT_VALUE, value as u32);
        self.rd(regs::WAIT)
    }
}

/// A context's registers, for failure messages.
#[derive(Clone, Copy, Debug)]
pub struct CtxState {
    pub status: u32,
    pub head: u32,
    pub tail: u32,
    pub fault: u32,
    pub fault_addr: u64,
    pub fence: u64,
}

impl core::fmt::Display for CtxState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "status={:#x} head={} tail={} fault={} fault_addr={:#x} fence={}",
            self.status, self.head, self.tail, self.fault, self.fault_addr, self.fence
        )
    }
}

/// Allocators for guest RAM and VRAM.
#[derive(Clone, Copy, Debug)]
pub struct Heap {
    pub sys: Arena,
    pub vram: Arena,
}

impl Heap {
    /// `size` bytes of `loc` memory aligned to `align`.
    pub fn alloc(&mut self, loc: Loc, size: u64, align: u64) -> Result<GpuAddr, Fail> {
        let arena = match loc {
            Loc::Sys => &mut self.sys,
            Loc::Vram => &mut self.vram,
        };
        match arena.alloc(size, align) {
            Some(addr) => Ok(GpuAddr::new(loc, addr)),
            None => Err(Fail::new(format_args!(
                "out of {loc} for {size:#x} bytes ({:#x} left)",
                arena.free()
            ))),
        }
    }

    pub fn mark(&self) -> (u64, u64) {
        (self.sys.mark(), self.vram.mark())
    }

    pub fn release(&mut self, mark: (u64, u64)) {
        self.sys.release(mark.0);
        self.vram.release(mark.1);
    }
}

/// A CPU view of a GPU buffer of `len` bytes: contiguous, or page-reversed
/// (GPU virtual page `i` of `n` backed by physical page `n - 1 - i`, so
/// virtually contiguous buffers are physically scattered).
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// GPU-physical base of the backing pages.
    pub at: GpuAddr,
    /// CPU address of the backing pages.
    pub cpu: u64,
    pub len: u64,
    pub reversed: bool,
}

impl Buf {
    /// A contiguous view of `len` bytes at `at`.
    pub fn new(gpu: &Gpu, at: GpuAddr, len: u64) -> Self {
        Self {
            at,
            cpu: gpu.cpu_addr(at),
            len,
            reversed: false,
        }
    }

    fn pages(&self) -> u64 {
        self.len.div_ceil(PAGE)
    }

    /// CPU address of byte `off` and how many bytes follow it contiguously.
    fn cpu_at(&self, off: u64) -> (u64, u64) {
        assert!(off < self.len, "buffer offset out of range");
        if !self.reversed {
            return (self.cpu + off, self.len - off);
        }
        let page = off / PAGE;
        let within = off % PAGE;
        let phys_page = self.pages() - 1 - page;
        (
            self.cpu + phys_page * PAGE + within,
            (PAGE - within).min(self.len - off),
        )
    }

    /// GPU-physical address of byte `off`.
    pub fn gpu_at(&self, off: u64) -> GpuAddr {
        let (cpu, _) = self.cpu_at(off);
        GpuAddr::new(self.at.loc, self.at.addr + (cpu - self.cpu))
    }

    /// Copy `data` in at `off`.
    pub fn write(&self, mut off: u64, mut data: &[u8]) {
        assert!(
            off + data.len() as u64 <= self.len,
            "buffer write out of range"
        );
        while !data.is_empty() {
            let (cpu, run) = self.cpu_at(off);
            let n = (run as usize).min(data.len());
            // SAFETY: `[cpu, cpu + n)` lies inside the buffer's backing memory
            // (checked by `cpu_at` and the assertion), which is mapped RAM or
            // VRAM reserved for this buffer; the device is not using it while
            // the CPU writes it (the suite submits work afterwards).
            unsafe {
                core::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    core::ptr::with_exposed_provenance_mut(cpu as usize),
                    n,
                )
            };
            off += n as u64;
            data = &data[n..];
        }
    }

    /// Copy out `out.len()` bytes at `off`.
    pub fn read(&self, mut off: u64, mut out: &mut [u8]) {
        assert!(
            off + out.len() as u64 <= self.len,
            "buffer read out of range"
        );
        while !out.is_empty() {
            let (cpu, run) = self.cpu_at(off);
            let n = (run as usize).min(out.len());
            // SAFETY: `[cpu, cpu + n)` lies inside the buffer's mapped backing
            // memory (checked as in `write`); the device is done with it
            // (the suite reads results after the completing fence or WAIT,
            // both compiler barriers).
            unsafe {
                core::ptr::copy_nonoverlapping(
                    core::ptr::with_exposed_provenance(cpu as usize),
                    out.as_mut_ptr(),
                    n,
                )
            };
            off += n as u64;
            out = &mut out[n..];
        }
    }

    /// Set every byte to `byte`.
    pub fn fill(&self, byte: u8) {
        let mut off = 0;
        while off < self.len {
            let (cpu, run) = self.cpu_at(off);
            // SAFETY: as in `write`, for `run` bytes from `cpu`.
            unsafe {
                core::ptr::write_bytes(
                    core::ptr::with_exposed_provenance_mut::<u8>(cpu as usize),
                    byte,
                    run as usize,
                )
            };
            off += run;
        }
    }

    /// Fill with a pattern that depends on `seed` and the offset.
    pub fn fill_pattern(&self, seed: u32) {
        let mut chunk = [0u8; 256];
        let mut off = 0;
        while off < self.len {
            let n = (self.len - off).min(chunk.len() as u64) as usize;
            for (i, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern_byte(seed, off + i as u64);
            }
            self.write(off, &chunk[..n]);
            off += n as u64;
        }
    }

    /// The first offset in `[off, off + len)` whose byte differs from
    /// `expect(offset)`, with the byte found.
    pub fn mismatch(
        &self,
        off: u64,
        len: u64,
        mut expect: impl FnMut(u64) -> u8,
    ) -> Option<(u64, u8, u8)> {
        let mut chunk = [0u8; 256];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.read(off + done, &mut chunk[..n]);
            for (i, &b) in chunk[..n].iter().enumerate() {
                let at = off + done + i as u64;
                let want = expect(at);
                if b != want {
                    return Some((at, want, b));
                }
            }
            done += n as u64;
        }
        None
    }

    pub fn read_u32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn read_u64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(off, &mut b);
        u64::from_le_bytes(b)
    }

    pub fn write_u32(&self, off: u64, v: u32) {
        self.write(off, &v.to_le_bytes());
    }

    pub fn write_u64(&self, off: u64, v: u64) {
        self.write(off, &v.to_le_bytes());
    }

    /// Read the u64 at `off` (8-byte aligned) with one volatile load, for
    /// polling memory the device writes.
    pub fn poll_u64(&self, off: u64) -> u64 {
        let (cpu, run) = self.cpu_at(off);
        assert!(cpu.is_multiple_of(8) && run >= 8, "unaligned poll");
        // SAFETY: an aligned u64 inside the buffer's mapped backing memory;
        // a volatile load tolerates the device writing it concurrently.
        unsafe { core::ptr::with_exposed_provenance::<u64>(cpu as usize).read_volatile() }
    }
}

/// A deterministic test byte for `offset` in a buffer seeded with `seed`.
pub fn pattern_byte(seed: u32, offset: u64) -> u8 {
    let x = (offset as u32)
        .wrapping_mul(0x9e37_79b1)
        .wrapping_add(seed.wrapping_mul(0x85eb_ca6b))
        ^ (offset >> 32) as u32;
    (x ^ x >> 15 ^ x >> 24) as u8
}

/// A GPU virtual address space: 4-level page tables in guest RAM or VRAM.
#[derive(Clone, Copy, Debug)]
pub struct Space {
    pub root: GpuAddr,
}

impl Space {
    /// A space with an empty root table in `loc` memory.
    pub fn new(gpu: &Gpu, heap: &mut Heap, loc: Loc) -> Result<Self, Fail> {
        let root = heap.alloc(loc, PAGE, PAGE)?;
        Buf::new(gpu, root, PAGE).fill(0);
        Ok(Self { root })
    }

    /// The value for `CTX_PT_ROOT`.
    pub fn root_reg(&self) -> u64 {
        self.root.pte_bits()
    }

    /// CPU address of the entry for `va` at `level` (4 = root, 1 = 4 KiB
    /// leaves), creating the tables above it (in the root's memory) if
    /// `create`; `None` if a table is missing and `create` is false, or an
    /// entry on the way is a leaf.
    pub fn entry(
        &self,
        gpu: &Gpu,
        heap: &mut Heap,
        va: u64,
        level: u32,
        create: bool,
    ) -> Result<Option<u64>, Fail> {
        let mut table = self.root;
        let mut l = pte::LEVELS;
        loop {
            let index = (va >> (12 + 9 * (l - 1))) & (pte::ENTRIES - 1);
            let at = Buf::new(gpu, table, PAGE);
            if l == level {
                return Ok(Some(at.cpu + index * 8));
            }
            let e = at.read_u64(index * 8);
            table = if e & pte::PRESENT == 0 {
                if !create {
                    return Ok(None);
                }
                let t = heap.alloc(self.root.loc, PAGE, PAGE)?;
                Buf::new(gpu, t, PAGE).fill(0);
                // Non-leaf entries: present only (write permission is
                // checked at the leaf).
                at.write_u64(index * 8, t.pte_bits() | pte::PRESENT);
                t
            } else if e & pte::HUGE != 0 {
                return Ok(None);
            } else {
                let loc = if e & pte::VRAM != 0 {
                    Loc::Vram
                } else {
                    Loc::Sys
                };
                GpuAddr::new(loc, e & pte::ADDR_MASK)
            };
            l -= 1;
        }
    }

    /// Write the raw entry `value` for `va` at `level`, creating tables.
    pub fn set(
        &self,
        gpu: &Gpu,
        heap: &mut Heap,
        va: u64,
        level: u32,
        value: u64,
    ) -> Result<(), Fail> {
        match self.entry(gpu, heap, va, level, true)? {
            Some(cpu) => {
                // SAFETY: `cpu` is the CPU address of an 8-byte aligned entry
                // inside a page-table page this space allocated (mapped RAM
                // or VRAM); the device only reads it.
                unsafe {
                    core::ptr::with_exposed_provenance_mut::<u64>(cpu as usize)
                        .write_volatile(value)
                };
                Ok(())
            }
            None => Err(Fail::new(format_args!(
                "va {va:#x}: a huge page covers level {level}"
            ))),
        }
    }

    /// Map `va` to `target` with a leaf at `level` (1: 4 KiB, 2: 2 MiB,
    /// 3: 1 GiB).
    pub fn map(
        &self,
        gpu: &Gpu,
        heap: &mut Heap,
        va: u64,
        target: GpuAddr,
        level: u32,
        writable: bool,
    ) -> Result<(), Fail> {
        let mut e = target.pte_bits() | pte::PRESENT;
        if writable {
            e |= pte::WRITABLE;
        }
        if level > 1 {
            e |= pte::HUGE;
        }
        self.set(gpu, heap, va, level, e)
    }

    /// Map the pages of `buf` at `va` (4 KiB leaves).
    pub fn map_buf(
        &self,
        gpu: &Gpu,
        heap: &mut Heap,
        va: u64,
        buf: &Buf,
        writable: bool,
    ) -> Result<(), Fail> {
        for page in 0..buf.pages() {
            let at = buf.gpu_at(page * PAGE);
            self.map(gpu, heap, va + page * PAGE, at, 1, writable)?;
        }
        Ok(())
    }
}

pub fn nop() -> Packet {
    Packet::new(packet::OP_NOP, 0, &[])
}

pub fn copy(src: u64, dst: u64, len: u64) -> Packet {
    Packet::new(packet::OP_COPY, 0, &[src, dst, len])
}

pub fn fill(dst: u64, len: u64, pattern: u32) -> Packet {
    Packet::new(packet::OP_FILL, 0, &[dst, len, u64::from(pattern)])
}

pub fn fence(va: u64, value: u64, flags: u32) -> Packet {
    Packet::new(packet::OP_FENCE, flags, &[va, value])
}

pub fn timestamp(va: u64) -> Packet {
    Packet::new(packet::OP_TIMESTAMP, 0, &[va])
}

pub fn dispatch(kernel: u32, args: &[u64]) -> Packet {
    Packet::new(packet::OP_DISPATCH, kernel, args)
}

/// A context: its ring (a CPU view plus the GPU VA it is mapped at) and a
/// fence location.
#[derive(Debug)]
pub struct Ctx {
    pub id: u32,
    pub ring: Buf,
    pub ring_va: u64,
    pub size: u32,
    /// Packets written so far (free-running, like `CTX_RING_TAIL`).
    pub tail: u32,
    pub fence: Buf,
    pub fence_va: u64,
    /// The last fence value pushed.
    pub last_fence: u64,
}

impl Ctx {
    /// Reset context `id`, program its page tables and ring and enable it.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        gpu: &Gpu,
        id: u32,
        space: &Space,
        ring: Buf,
        ring_va: u64,
        size: u32,
        fence: Buf,
        fence_va: u64,
    ) -> Self {
        let mut c = Self {
            id,
            ring,
            ring_va,
            size,
            tail: 0,
            fence,
            fence_va,
            last_fence: 0,
        };
        c.restart(gpu, space);
        c
    }

    /// Reset and re-enable the context with `space` (after a fault, say).
    pub fn restart(&mut self, gpu: &Gpu, space: &Space) {
        gpu.ctx_reset(self.id);
        gpu.ctx_wr64(self.id, regs::CTX_PT_ROOT_LO, space.root_reg());
        gpu.ctx_wr64(self.id, regs::CTX_RING_BASE_LO, self.ring_va);
        gpu.ctx_wr(self.id, regs::CTX_RING_SIZE, self.size);
        gpu.ctx_wr64(self.id, regs::CTX_TAIL_ADDR_LO, 0);
        gpu.ctx_wr(self.id, regs::CTX_TLB_INVALIDATE, 1);
        gpu.ctx_wr(self.id, regs::CTX_CONTROL, ctx_control::ENABLE);
        self.tail = 0;
        self.last_fence = gpu.ctx_rd64(self.id, regs::CTX_FENCE_LO);
    }

    /// Write `p` into the next slot (not yet visible to the GPU).
    pub fn push(&mut self, p: &Packet) {
        let slot = u64::from(self.tail % self.size);
        self.ring.write(slot * packet::PACKET_SIZE, &p.to_bytes());
        self.tail = self.tail.wrapping_add(1);
    }

    /// Push a FENCE with the next value; returns the value.
    pub fn push_fence(&mut self, flags: u32) -> u64 {
        self.last_fence += 1;
        let p = fence(self.fence_va, self.last_fence, flags);
        self.push(&p);
        self.last_fence
    }

    /// Publish the tail through `CTX_RING_TAIL`.
    pub fn kick(&self, gpu: &Gpu) {
        barrier();
        gpu.ctx_wr(self.id, regs::CTX_RING_TAIL, self.tail);
    }

    /// Ring the context's doorbell: the GPU reads the tail from the tail
    /// shadow (`CTX_TAIL_ADDR`), which the caller has updated. The value
    /// written is ignored by the device.
    pub fn ring_doorbell(&self, gpu: &Gpu) {
        self.ring_doorbell_of(gpu, self.id);
    }

    /// Ring context `ctx`'s doorbell (another context's, to test routing).
    pub fn ring_doorbell_of(&self, gpu: &Gpu, ctx: u32) {
        barrier();
        gpu.wr(regs::doorbell(ctx), 0xdead_beef);
    }

    /// `WAIT` for fence `value` of this context.
    pub fn wait(&self, gpu: &Gpu, value: u64) -> u32 {
        gpu.wait_fence(self.id, value)
    }

    /// Submit `packets` and a fence, then wait for the fence: `Ok` when it
    /// completed and the fence location holds its value.
    pub fn run(&mut self, gpu: &Gpu, packets: &[Packet]) -> Result<(), Fail> {
        self.submit(gpu, packets, 0)
            .and_then(|v| self.finish(gpu, v))
    }

    /// Submit `packets` and a fence with `fence_flags`; returns the fence value.
    pub fn submit(&mut self, gpu: &Gpu, packets: &[Packet], fence_flags: u32) -> Result<u64, Fail> {
        if packets.len() as u64 + 1 > u64::from(self.size) {
            return Err(Fail::new(format_args!(
                "{} packets do not fit a ring of {}",
                packets.len() + 1,
                self.size
            )));
        }
        for p in packets {
            self.push(p);
        }
        let v = self.push_fence(fence_flags);
        self.kick(gpu);
        Ok(v)
    }

    /// Wait for fence `value` and check it landed in memory and `CTX_FENCE`.
    pub fn finish(&self, gpu: &Gpu, value: u64) -> Result<(), Fail> {
        let r = self.wait(gpu, value);
        if r != wait::DONE {
            return Err(Fail::new(format_args!(
                "ctx {} fence {value}: WAIT returned {r}: {}",
                self.id,
                gpu.ctx_state(self.id)
            )));
        }
        let mem = self.fence.read_u64(0);
        let reg = gpu.ctx_rd64(self.id, regs::CTX_FENCE_LO);
        if mem != value || reg != value {
            return Err(Fail::new(format_args!(
                "ctx {} fence {value}: memory holds {mem}, CTX_FENCE {reg}",
                self.id
            )));
        }
        Ok(())
    }
}

/// A standard test environment: a context with a fresh address space whose
/// page tables, ring and fence page are in `loc` memory, plus a bump
/// allocator of GPU VAs for data buffers.
#[derive(Debug)]
pub struct Env {
    pub space: Space,
    pub ctx: Ctx,
    next_va: u64,
}

impl Env {
    /// Context `id` with tables, ring (64 packets) and fence page in `loc`.
    pub fn new(s: &mut Suite, id: u32, loc: Loc) -> Result<Self, Fail> {
        Self::with_ring(s, id, loc, (PAGE / packet::PACKET_SIZE) as u32)
    }

    /// As [`Env::new`] with a ring of `size` packets.
    pub fn with_ring(s: &mut Suite, id: u32, loc: Loc, size: u32) -> Result<Self, Fail> {
        let space = Space::new(&s.gpu, &mut s.heap, loc)?;
        let ring_len = (u64::from(size) * packet::PACKET_SIZE).next_multiple_of(PAGE);
        let ring = Buf::new(&s.gpu, s.heap.alloc(loc, ring_len, PAGE)?, ring_len);
        ring.fill(0);
        space.map_buf(&s.gpu, &mut s.heap, RING_VA, &ring, false)?;
        let fence = Buf::new(&s.gpu, s.heap.alloc(loc, PAGE, PAGE)?, PAGE);
        fence.fill(0);
        space.map_buf(&s.gpu, &mut s.heap, FENCE_VA, &fence, true)?;
        let ctx = Ctx::start(&s.gpu, id, &space, ring, RING_VA, size, fence, FENCE_VA);
        Ok(Self {
            space,
            ctx,
            next_va: DATA_VA,
        })
    }

    /// A buffer of `len` bytes of `loc` memory, mapped at the returned VA
    /// with 4 KiB pages (physically page-reversed if `scatter`), followed by
    /// an unmapped guard page.
    pub fn buf(
        &mut self,
        s: &mut Suite,
        loc: Loc,
        len: u64,
        writable: bool,
        scatter: bool,
    ) -> Result<(u64, Buf), Fail> {
        let pages = len.div_ceil(PAGE).max(1);
        let at = s.heap.alloc(loc, pages * PAGE, PAGE)?;
        let mut b = Buf::new(&s.gpu, at, len.max(1));
        b.reversed = scatter;
        let va = self.next_va;
        self.space.map_buf(&s.gpu, &mut s.heap, va, &b, writable)?;
        self.next_va += (pages + 1) * PAGE;
        Ok((va, b))
    }

    /// A VA range of `len` bytes that nothing is mapped at.
    pub fn unmapped_va(&mut self, len: u64) -> u64 {
        let va = self.next_va;
        self.next_va += len.div_ceil(PAGE).max(1) * PAGE + PAGE;
        va
    }

    /// Submit `packets` plus a fence and wait for it.
    pub fn run(&mut self, s: &Suite, packets: &[Packet]) -> Result<(), Fail> {
        self.ctx.run(&s.gpu, packets)
    }

    /// Flush the context's TLB (after changing page tables).
    pub fn invalidate_tlb(&self, s: &Suite) {
        barrier();
        s.gpu.ctx_wr(self.ctx.id, regs::CTX_TLB_INVALIDATE, 1);
    }
}
