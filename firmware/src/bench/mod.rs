//! Benchmark modes, read by `tessera bench vgpu`: `run=bench-latency`
//! (submit → fence round trips per submission path), `run=bench-throughput`
//! (a batch of kernel dispatches timed with the GPU clock),
//! `run=first-fence` (one fence as early after boot as possible), and the
//! GPU load generator `run=load` for the multi-VM scheduler harness.
//!
//! They share a deliberately small driver: the vGPU is found with a silent
//! PCI scan that stops at the first match, context 0 gets identity GPU page
//! tables (GPU VA = guest-physical address, 2 MiB leaves) in static pages of
//! the firmware image, and everything lies below 4 GiB, so only the `_LO`
//! halves of 64-bit registers are written (the `_HI` halves are 0 from power-on:
//! nothing else drives the device before these modes). Register access goes
//! through the conformance suite's [`Gpu`].
//!
//! Every register access is a VM exit, so the round trips measured here
//! are exactly the exits of the chosen submission path.

// Errors are the conformance suite's `Fail` (a message in a fixed buffer, no
// heap); they are only built on the failure path.
#![allow(clippy::result_large_err)]

mod latency;
mod load;
mod throughput;

use core::cell::UnsafeCell;

use vgpu_abi::{Packet, ctx_status, packet, pci as abi_pci, pte, regs, wait};

use crate::cmdline::{Wait, WaitOptions};
use crate::conformance::Fail;
use crate::conformance::driver::Gpu;
use crate::io::barrier;
use crate::pci::{self, Bdf};
use crate::serial::fw_println;

pub use latency::latency;
pub use load::load;
pub use throughput::throughput;

/// The context every benchmark uses.
const CTX: u32 = 0;
/// Page size, CPU and GPU.
const PAGE: u64 = pte::PAGE_SIZE;
/// A GPU 2 MiB leaf.
const PAGE_2M: u64 = 1 << 21;
/// The identity map covers GPU VAs (= guest-physical addresses) below this.
const GPU_MAP_LIMIT: u64 = 1 << 32;
/// Level-2 tables: one per GiB below [`GPU_MAP_LIMIT`].
const L2_TABLES: usize = (GPU_MAP_LIMIT >> 30) as usize;
/// Packets in the static ring.
const STATIC_RING_ENTRIES: u32 = (PAGE / packet::PACKET_SIZE) as u32;
/// GPU time a round trip's fence may take before its wait gives up.
const SPIN_LIMIT_NS: u64 = 2_000_000_000;
/// GPU time a batch's fence may take before its wait gives up.
const BATCH_LIMIT_NS: u64 = 60_000_000_000;
/// Spins between looks at the device (context state, GPU clock) in a spinning
/// wait: a millisecond or more, so a normal round trip never pays for one.
const SPINS_PER_CHECK: u32 = 1 << 16;

/// Static page indices: the GPU root table, the level-3 table, the level-2
/// tables, the ring and the fence page (fence at 0, tail shadow at
/// [`SHADOW_OFFSET`]).
const ROOT_PAGE: usize = 0;
const L3_PAGE: usize = 1;
const L2_PAGE: usize = 2;
const RING_PAGE: usize = L2_PAGE + L2_TABLES;
const FENCE_PAGE: usize = RING_PAGE + 1;
const STATIC_PAGES: usize = FENCE_PAGE + 1;
/// Tail shadow in the fence page, a cache line away from the fence.
const SHADOW_OFFSET: u64 = 64;

/// Page-aligned memory the device reads and writes (`.bss`, zeroed at boot).
#[repr(C, align(4096))]
struct Pages(UnsafeCell<[[u8; PAGE as usize]; STATIC_PAGES]>);

// SAFETY: the firmware is single-threaded; the pages are only reached through
// raw pointers (plain or volatile accesses), never through references.
unsafe impl Sync for Pages {}

static PAGES: Pages = Pages(UnsafeCell::new([[0; PAGE as usize]; STATIC_PAGES]));

/// Guest-physical (= CPU virtual = GPU virtual) address of static page `i`.
fn page(i: usize) -> u64 {
    PAGES.0.get().cast::<u8>().expose_provenance() as u64 + i as u64 * PAGE
}

/// Write the u64 at `addr` with one volatile store.
///
/// `addr` must be 8-byte aligned memory owned by the benchmark: a static page
/// or RAM it allocated (identity-mapped below 4 GiB).
fn poke64(addr: u64, v: u64) {
    // SAFETY: per the contract above, an aligned u64 of memory this module
    // owns; volatile because the device reads it.
    unsafe { core::ptr::with_exposed_provenance_mut::<u64>(addr as usize).write_volatile(v) }
}

/// Write the u32 at `addr` with one volatile store (as [`poke64`]).
fn poke32(addr: u64, v: u32) {
    // SAFETY: as in `poke64`, for an aligned u32.
    unsafe { core::ptr::with_exposed_provenance_mut::<u32>(addr as usize).write_volatile(v) }
}

/// Read the u64 at `addr` with one volatile load (as [`poke64`]); the
/// device may write it concurrently.
fn peek64(addr: u64) -> u64 {
    // SAFETY: as in `poke64`; a volatile load tolerates concurrent device
    // writes of the aligned word.
    unsafe { core::ptr::with_exposed_provenance::<u64>(addr as usize).read_volatile() }
}

/// Read the u32 at `addr` with one volatile load (as [`peek64`]).
fn peek32(addr: u64) -> u32 {
    // SAFETY: as in `peek64`, for an aligned u32.
    unsafe { core::ptr::with_exposed_provenance::<u32>(addr as usize).read_volatile() }
}

/// Publish `tail` in the tail shadow at `shadow` and tell the GPU: always ring the doorbell,
/// or (`suppress`) only when the GPU's hint asks for one (vgpu-spec §3: store the tail, a
/// full barrier, load the hint). Returns whether it rang.
fn publish_tail(gpu: &Gpu, shadow: u64, tail: u32, suppress: bool) -> bool {
    poke32(shadow + vgpu_abi::shadow::TAIL, tail);
    if suppress {
        // The tail store must be visible before the hint is read (store-load: mfence).
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        if peek32(shadow + vgpu_abi::shadow::HINT) & vgpu_abi::shadow::POLLING != 0 {
            return false;
        }
    }
    gpu.wr(regs::doorbell(CTX), 1);
    true
}

/// The time-stamp counter, after earlier instructions finished (`lfence`).
fn rdtsc() -> u64 {
    // SAFETY: `lfence` and `rdtsc` only order execution and read the TSC
    // into registers; CR4.TSD is clear (boot.rs), so `rdtsc` works at CPL3.
    unsafe {
        core::arch::x86_64::_mm_lfence();
        core::arch::x86_64::_rdtsc()
    }
}

/// Find the vGPU on bus 0 without printing, stopping at the first match
/// (every configuration access is two port exits), and turn on memory
/// decode and bus mastering.
fn open_gpu() -> Result<Gpu, Fail> {
    let matches = |bdf: Bdf| {
        let id = bdf.read_u32(pci::REG_ID);
        let vendor = id as u16;
        let found = vendor == abi_pci::VENDOR_ID && (id >> 16) as u16 == abi_pci::DEVICE_ID;
        (vendor != 0xffff && vendor != 0, found)
    };
    let mut found = None;
    'scan: for device in 0..pci::DEVICES_PER_BUS {
        let f0 = Bdf::new(0, device, 0);
        match matches(f0) {
            (_, true) => {
                found = Some(f0);
                break;
            }
            (false, _) => continue,
            (true, false) => {}
        }
        if (f0.read_u32(pci::REG_HEADER) >> 16) & 0x80 == 0 {
            continue;
        }
        for function in 1..pci::FUNCTIONS_PER_DEVICE {
            let f = Bdf::new(0, device, function);
            if matches(f).1 {
                found = Some(f);
                break 'scan;
            }
        }
    }
    let bdf = found.ok_or_else(|| Fail::new(format_args!("no vGPU found")))?;
    let bar0 = u64::from(bdf.read_u32(pci::REG_BAR0 + 4 * abi_pci::BAR_REGS as u8) & !0xf);
    if bar0 == 0 {
        return Err(Fail::new(format_args!("vGPU at {bdf}: BAR0 not assigned")));
    }
    // The whole command register is written (no read first, two exits
    // fewer): these are the only bits a vGPU driver wants.
    bdf.set_command(pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER | pci::COMMAND_INTX_DISABLE);
    Ok(Gpu {
        bdf,
        bar0,
        bar2: 0,
        bar2_size: 0,
        vram_size: 0,
        num_ctx: 1,
    })
}

/// Identity-map the GPU VAs `[base, end)`, rounded out to 2 MiB, with
/// writable 2 MiB leaves to guest RAM in the static page tables. Leaves may
/// reach past RAM: the device checks every access, not the mapping.
fn gpu_map(base: u64, end: u64) -> Result<(), Fail> {
    if end > GPU_MAP_LIMIT || base >= end {
        return Err(Fail::new(format_args!(
            "cannot map [{base:#x}, {end:#x}) for the GPU"
        )));
    }
    poke64(page(ROOT_PAGE), page(L3_PAGE) | pte::PRESENT);
    let mut va = base & !(PAGE_2M - 1);
    while va < end {
        let gib = (va >> 30) as usize;
        let l2 = page(L2_PAGE + gib);
        // Non-leaf entries: present only (write permission is checked at the leaf).
        poke64(page(L3_PAGE) + gib as u64 * 8, l2 | pte::PRESENT);
        let leaf = va | pte::PRESENT | pte::WRITABLE | pte::HUGE;
        poke64(l2 + ((va >> 21) & (pte::ENTRIES - 1)) * 8, leaf);
        va += PAGE_2M;
    }
    Ok(())
}

/// Map the static pages (ring, fence, tables) for the GPU.
fn gpu_map_statics() -> Result<(), Fail> {
    gpu_map(page(0), page(STATIC_PAGES))
}

/// A ring in identity-mapped memory and its free-running tail.
struct Ring {
    base: u64,
    size: u32,
    tail: u32,
}

impl Ring {
    /// Write `p` into the next slot; [`barrier`] before publishing the tail.
    fn push(&mut self, p: &Packet) {
        let slot = u64::from(self.tail % self.size);
        let bytes = p.to_bytes();
        let at = self.base + slot * packet::PACKET_SIZE;
        // SAFETY: the slot lies inside the ring's memory (static page or
        // allocated RAM, identity-mapped); the device only reads slots it was
        // given a tail for, and this one is not published yet.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                core::ptr::with_exposed_provenance_mut(at as usize),
                bytes.len(),
            )
        };
        self.tail = self.tail.wrapping_add(1);
    }
}

/// Program context [`CTX`] (power-on state: disabled, empty TLB) with the
/// identity page tables and `ring`, an optional tail shadow, and enable it
/// with `control`.
fn start_ctx(gpu: &Gpu, ring: &Ring, tail_shadow: Option<u64>, control: u32) {
    gpu.ctx_wr(CTX, regs::CTX_PT_ROOT_LO, page(ROOT_PAGE) as u32);
    gpu.ctx_wr(CTX, regs::CTX_RING_BASE_LO, ring.base as u32);
    gpu.ctx_wr(CTX, regs::CTX_RING_SIZE, ring.size);
    if let Some(shadow) = tail_shadow {
        gpu.ctx_wr(CTX, regs::CTX_TAIL_ADDR_LO, shadow as u32);
    }
    gpu.ctx_wr(CTX, regs::CTX_CONTROL, control);
}

/// Spin at CPL3 until the u64 at `fence` holds `value`. Every
/// [`SPINS_PER_CHECK`] spins it looks at the device and gives up when the
/// context faulted or stopped, or after `limit_ns` of GPU time.
fn spin_fence(gpu: &Gpu, fence: u64, value: u64, limit_ns: u64) -> Result<(), Fail> {
    let mut spins: u32 = 0;
    let mut since = None;
    while peek64(fence) != value {
        core::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(SPINS_PER_CHECK) {
            let st = gpu.ctx_rd(CTX, regs::CTX_STATUS);
            let now = gpu.timestamp();
            let waited = now.saturating_sub(*since.get_or_insert(now));
            if st & ctx_status::FAULTED != 0 || st & ctx_status::ENABLED == 0 {
                return Err(Fail::new(format_args!(
                    "fence {value}: context stopped ({})",
                    gpu.ctx_state(CTX)
                )));
            }
            if waited > limit_ns {
                return Err(Fail::new(format_args!(
                    "fence {value} not written within {} s ({})",
                    limit_ns / 1_000_000_000,
                    gpu.ctx_state(CTX)
                )));
            }
        }
    }
    barrier();
    Ok(())
}

/// A TSC reading paired with the GPU clock.
#[derive(Clone, Copy)]
struct ClockPair {
    tsc: u64,
    ns: u64,
}

/// Read `TIMESTAMP` (the `_LO` read latches the value) between two TSC
/// reads; the pair's TSC is their midpoint.
fn clock_pair(gpu: &Gpu) -> ClockPair {
    let a = rdtsc();
    let lo = gpu.rd(regs::TIMESTAMP_LO);
    let b = rdtsc();
    let hi = gpu.rd(regs::TIMESTAMP_HI);
    ClockPair {
        tsc: a + (b - a) / 2,
        ns: u64::from(hi) << 32 | u64::from(lo),
    }
}

/// How a mode waits for its fences ([`Wait`]), with the spin of
/// [`Wait::Hybrid`] in TSC ticks.
#[derive(Clone, Copy)]
struct Waiter {
    how: Wait,
    spin_ticks: u64,
}

impl Waiter {
    /// `o` (its `how`, else `default`); a hybrid wait measures the TSC
    /// against the GPU clock over 1 ms to turn `spin_us` into ticks.
    fn new(gpu: &Gpu, o: WaitOptions, default: Wait) -> Self {
        let how = o.how.unwrap_or(default);
        let spin_ticks = if how == Wait::Hybrid && o.spin_us > 0 {
            let a = clock_pair(gpu);
            let mut b = clock_pair(gpu);
            while b.ns.saturating_sub(a.ns) < 1_000_000 {
                b = clock_pair(gpu);
            }
            let per_us = (b.tsc - a.tsc) * 1000 / (b.ns - a.ns).max(1);
            per_us.max(1) * u64::from(o.spin_us)
        } else {
            0
        };
        Waiter { how, spin_ticks }
    }

    /// Waits until the u64 at `fence` reaches `value` (fence values only
    /// grow): spinning, blocking in `WAIT` for context [`CTX`] (`WAIT_CTX`
    /// must name it), or spinning briefly first. Gives up after `limit_ns` of
    /// GPU time, or when the context faulted or stopped.
    fn wait(&self, gpu: &Gpu, fence: u64, value: u64, limit_ns: u64) -> Result<(), Fail> {
        match self.how {
            Wait::Spin => spin_fence(gpu, fence, value, limit_ns),
            Wait::Hybrid if self.spin_briefly(fence, value) => Ok(()),
            Wait::Block | Wait::Hybrid => block_fence(gpu, value, limit_ns),
        }
    }

    /// Spins on the fence word for at most the hybrid spin; whether it
    /// reached `value`.
    fn spin_briefly(&self, fence: u64, value: u64) -> bool {
        let t0 = rdtsc();
        loop {
            if peek64(fence) >= value {
                barrier();
                return true;
            }
            if rdtsc().wrapping_sub(t0) >= self.spin_ticks {
                return false;
            }
            core::hint::spin_loop();
        }
    }
}

/// Blocks in the `WAIT` register until context [`CTX`] completed fence
/// `value` (no guest CPU burnt), reading it again while it times out, for at
/// most `limit_ns` of GPU time.
fn block_fence(gpu: &Gpu, value: u64, limit_ns: u64) -> Result<(), Fail> {
    gpu.wr(regs::WAIT_VALUE, value as u32);
    let mut since = None;
    loop {
        match gpu.rd(regs::WAIT) {
            wait::DONE => return Ok(()),
            wait::TIMEOUT => {
                let now = gpu.timestamp();
                if now.saturating_sub(*since.get_or_insert(now)) > limit_ns {
                    return Err(Fail::new(format_args!(
                        "fence {value} not done after {} s ({})",
                        limit_ns / 1_000_000_000,
                        gpu.ctx_state(CTX)
                    )));
                }
            }
            r => {
                return Err(Fail::new(format_args!(
                    "fence {value}: WAIT returned {r} ({})",
                    gpu.ctx_state(CTX)
                )));
            }
        }
    }
}

/// Report a benchmark's outcome; returns the exit status (0: it measured).
fn finish(outcome: Result<(), Fail>) -> u8 {
    match outcome {
        Ok(()) => 0,
        Err(why) => {
            fw_println!("bench failed: {why}");
            1
        }
    }
}

/// `run=first-fence`: one FENCE through a minimal set-up, then
/// `first-fence`. Nothing else is printed (every serial byte is an exit).
pub fn first_fence() -> u8 {
    let outcome = (|| {
        let gpu = open_gpu()?;
        gpu_map_statics()?;
        let mut ring = Ring {
            base: page(RING_PAGE),
            size: STATIC_RING_ENTRIES,
            tail: 0,
        };
        start_ctx(&gpu, &ring, None, vgpu_abi::ctx_control::ENABLE);
        let fence = page(FENCE_PAGE);
        ring.push(&crate::conformance::driver::fence(fence, 1, 0));
        gpu.ctx_wr(CTX, regs::CTX_RING_TAIL, ring.tail);
        spin_fence(&gpu, fence, 1, SPIN_LIMIT_NS)
    })();
    if outcome.is_ok() {
        fw_println!("first-fence");
    }
    finish(outcome)
}
