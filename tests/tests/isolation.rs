//! Hostile guests against the vGPU and the PCI root, through the public API of `vgpu`,
//! `vgpu-abi` and `devices` only (and, for the sandbox, the `tessera` binary):
//!
//! - canaries: two vGPUs on one physical GPU with adjacent VRAM partitions; host memory next
//!   to guest RAM and above the PCI hole (guest-memory regions that are not in the DMA
//!   domain), the other vGPU's VRAM, another VM's RAM and another context's buffer hold known
//!   patterns while a guest aims page-table entries, COPY, FILL, fences and kernels at every
//!   forbidden place. Every bad access must produce its documented fault code and address, and
//!   every canary must survive;
//! - property tests (bounded cases): the GPU MMU never resolves outside the domain or the
//!   partition, register garbage followed by RESET reads back power-on values, configuration
//!   space garbage never maps a BAR outside the PCI windows;
//! - resource abuse: ring floods, giant dispatches (watchdog), fence and interrupt storms,
//!   huge copies in bounded host memory, RESET under load;
//! - the seccomp sandbox: the firmware guest still runs (with a vGPU) with filters installed;
//! - regression tests of bugs found by fuzzing.

use std::collections::BTreeMap;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::pci::{GuestMapper, HostBridge, HostMemory, MsiSink, PciDeviceSync, PciRoot};
use devices::{Bus, BusDevice};
use proptest::prelude::*;
use vgpu::backend::soft::SoftVram;
use vgpu::backend::{Aperture, Vram};
use vgpu::mem::{Loc, Spaces};
use vgpu::mmu::{Root, Tlb};
use vgpu::physical::{GpuSpec, Lease, PhysicalGpu};
use vgpu::profile::Profile;
use vgpu::{BarAddresses, DmaDomain, Vgpu, VgpuSetup};
use vgpu_abi::{Packet, ctx_control, ctx_status, fault, int, kernel, limits, packet, pci, pte};
use vgpu_abi::{regs, status, wait};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

// ---------------------------------------------------------------------------------------------
// The fixture: two VMs, each with a vGPU, on one physical GPU.

/// Guest RAM of VM A (in its DMA domain).
const RAM: u64 = 8 << 20;
/// Host canary right after VM A's RAM: a guest-memory region outside the domain.
const ADJ: u64 = RAM;
const ADJ_LEN: u64 = 64 << 10;
/// Host canary above the PCI hole, outside the domain.
const HIGH: u64 = 1 << 32;
const HIGH_LEN: u64 = 64 << 10;
/// VRAM per vGPU; A gets [0, VRAM) of the GPU, B the adjacent [VRAM, 2 VRAM).
const VRAM: u64 = 1 << 20;
/// VM B's RAM (a canary for A: another VM).
const RAM_B: u64 = 1 << 20;

const PAT_ADJ: u8 = 0xc5;
const PAT_HIGH: u8 = 0x3c;
const PAT_VRAM_B: u8 = 0x96;
const PAT_RAM_B: u8 = 0x5a;
const PAT_SECRET: u8 = 0x77;
const PAT_GUARD: u8 = 0xe1;

const RW: u64 = pte::PRESENT | pte::WRITABLE;

/// Guest-physical layout of VM A.
const SCRATCH_PA: u64 = 1 << 20;
const RO_PA: u64 = 2 << 20;
const TABLES: [(u64, u64); 2] = [(0x40_0000, 0x48_0000), (0x48_0000, 0x50_0000)];
const RINGS: [u64; 2] = [0x50_0000, 0x50_2000];
/// The last page below the end of RAM: reachable only through the straddling aim.
const GUARD_PA: u64 = RAM - 4096;
/// VRAM A: [0, 512 KiB) is context 0's, [768 KiB, 1 MiB) context 1's secret.
const SECRET_VRAM: u64 = 768 << 10;

/// GPU virtual layout (both contexts).
const SCRATCH_VA: u64 = 0x1000_0000;
const VRAM_VA: u64 = 0x2000_0000;
const SECRET_VA: u64 = 0x3000_0000;
const AIM_VA: u64 = 0x4000_0000;
const RING_VA: u64 = 0x7000_0000;
const FENCE_VA: u64 = RING_VA + 0x1000;
const RING_ENTRIES: u32 = 64;

#[derive(Debug, Default)]
struct MsiCount(AtomicU64);

impl MsiSink for MsiCount {
    fn send(&self, _address: u64, _data: u32) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn profile(contexts: u32) -> Profile {
    Profile {
        name: "isolation",
        vram: VRAM,
        contexts,
        engines: 2,
    }
}

/// A second mapping of `vram`'s aperture file: what a VMM maps into the guest.
fn aperture(vram: &dyn Vram) -> GuestMemoryMmap {
    let Aperture::Mapped { file, .. } = vram.aperture() else {
        panic!("the software GPU maps its VRAM");
    };
    let file = file.try_clone().expect("VRAM file");
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        vram.size() as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("VRAM mapping")
}

fn fill(mem: &GuestMemoryMmap, at: u64, len: u64, byte: u8) {
    mem.write_slice(&vec![byte; len as usize], GuestAddress(at))
        .expect("fill");
}

fn assert_filled(mem: &GuestMemoryMmap, at: u64, len: u64, byte: u8, what: &str) {
    let mut buf = vec![0u8; len as usize];
    mem.read_slice(&mut buf, GuestAddress(at)).expect("read");
    if buf.iter().any(|&b| b != byte) {
        let i = buf.iter().position(|&b| b != byte).unwrap_or(0);
        panic!(
            "{what}: byte {:#x} is {:#04x}, not {byte:#04x}",
            at + i as u64,
            buf[i]
        );
    }
}

/// One VM's vGPU and memory.
struct Side {
    dev: Vgpu,
    sys: GuestMemoryMmap,
    lease: Lease,
    vram: GuestMemoryMmap,
    msis: Arc<MsiCount>,
    tails: [u32; 4],
    fences: [u64; 4],
    rings: [u64; 4],
}

impl Side {
    fn new(
        gpu: &Arc<PhysicalGpu>,
        sys: GuestMemoryMmap,
        domain: DmaDomain,
        watchdog: Duration,
    ) -> Side {
        let prof = profile(4);
        let lease = gpu.lease(&prof, None).expect("VRAM lease");
        let msis = Arc::new(MsiCount::default());
        let dev = Vgpu::new(VgpuSetup {
            bars: BarAddresses {
                regs: 0xc000_0000,
                vram: 0x80_0000_0000,
            },
            sys: sys.clone(),
            domain,
            interrupts: vgpu::Interrupts::Msi(msis.clone()),
            watchdog,
            ..VgpuSetup::from_lease(&lease)
        })
        .expect("vGPU");
        Side {
            dev,
            sys,
            vram: aperture(&**lease.vram()),
            lease,
            msis,
            tails: [0; 4],
            fences: [0; 4],
            rings: [0; 4],
        }
    }

    /// The VRAM as the guest's aperture (BAR 2) shows it.
    fn vram(&self) -> &GuestMemoryMmap {
        &self.vram
    }

    fn r(&mut self, off: u64) -> u32 {
        let mut d = [0u8; 4];
        self.dev.read_bar(pci::BAR_REGS, off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(&mut self, off: u64, v: u32) {
        self.dev.write_bar(pci::BAR_REGS, off, &v.to_le_bytes());
    }

    fn cr(&mut self, ctx: u32, reg: u64) -> u32 {
        self.r(regs::ctx_reg(ctx, reg))
    }

    fn cw(&mut self, ctx: u32, reg: u64, v: u32) {
        self.w(regs::ctx_reg(ctx, reg), v)
    }

    fn fault_of(&mut self, ctx: u32) -> (u32, u64) {
        let code = self.cr(ctx, regs::CTX_FAULT_CODE);
        let lo = u64::from(self.cr(ctx, regs::CTX_FAULT_ADDR_LO));
        let hi = u64::from(self.cr(ctx, regs::CTX_FAULT_ADDR_HI));
        (code, hi << 32 | lo)
    }

    /// Resets context `ctx`, points it at `root` with its ring at `RING_VA` (guest-physical
    /// `ring_pa`, `entries` packets) and enables it.
    fn enable(&mut self, ctx: u32, root: u64, ring_pa: u64, entries: u32) {
        self.cw(ctx, regs::CTX_CONTROL, ctx_control::RESET);
        self.rings[ctx as usize] = ring_pa;
        self.cw(ctx, regs::CTX_PT_ROOT_LO, root as u32);
        self.cw(ctx, regs::CTX_PT_ROOT_HI, (root >> 32) as u32);
        self.cw(ctx, regs::CTX_RING_BASE_LO, RING_VA as u32);
        self.cw(ctx, regs::CTX_RING_SIZE, entries);
        self.cw(ctx, regs::CTX_CONTROL, ctx_control::ENABLE);
        self.tails[ctx as usize] = 0;
    }

    /// Writes `pkts` at context `ctx`'s tail (ring at `ring_pa` of `entries`) and publishes it.
    fn submit(&mut self, ctx: u32, ring_pa: u64, entries: u32, pkts: &[Packet]) {
        let mut tail = self.tails[ctx as usize];
        for p in pkts {
            let at = ring_pa + u64::from(tail % entries) * packet::PACKET_SIZE;
            self.sys
                .write_slice(&p.to_bytes(), GuestAddress(at))
                .expect("ring");
            tail = tail.wrapping_add(1);
        }
        self.tails[ctx as usize] = tail;
        self.cw(ctx, regs::CTX_RING_TAIL, tail);
    }

    /// Blocks (in `WAIT`) until context `ctx`'s fence reaches `value` or it faults or
    /// `limit` passes; returns the last `WAIT` result.
    fn wait(&mut self, ctx: u32, value: u64, limit: Duration) -> u32 {
        let start = Instant::now();
        self.w(regs::WAIT_CTX, ctx);
        self.w(regs::WAIT_VALUE, value as u32);
        loop {
            let r = self.r(regs::WAIT);
            if r != wait::TIMEOUT || start.elapsed() > limit {
                return r;
            }
        }
    }

    /// Submits `pkts` plus a fence on context `ctx` and waits for it.
    fn run(&mut self, ctx: u32, pkts: &[Packet]) -> u32 {
        self.fences[ctx as usize] += 1;
        let value = self.fences[ctx as usize];
        let mut all = pkts.to_vec();
        all.push(Packet::new(packet::OP_FENCE, 0, &[FENCE_VA, value]));
        self.submit(ctx, self.rings[ctx as usize], RING_ENTRIES, &all);
        self.wait(ctx, value, Duration::from_secs(20))
    }

    /// A driver's recovery after a fault: acknowledge, reset the context, enable it again.
    fn recover(&mut self, ctx: u32) {
        self.w(regs::INT_STATUS, int::FAULT);
        self.cw(ctx, regs::CTX_CONTROL, ctx_control::RESET);
        assert_eq!(self.cr(ctx, regs::CTX_STATUS), 0, "context reset");
        self.cw(ctx, regs::CTX_CONTROL, ctx_control::ENABLE);
        self.tails[ctx as usize] = 0;
    }

    /// Function-level reset; returns how long it took.
    fn reset(&mut self) -> Duration {
        let t = Instant::now();
        self.w(regs::RESET, regs::RESET_VALUE);
        let took = t.elapsed();
        assert_eq!(self.r(regs::STATUS), status::READY, "ready after RESET");
        self.tails = [0; 4];
        self.fences = [0; 4];
        took
    }

    fn enable_msix(&mut self, vectors: u64) {
        let cap = (self.dev.read_config_register(13) & 0xff) as usize;
        self.dev
            .write_config_register(cap / 4, 2, &0x8000u16.to_le_bytes());
        for v in 0..vectors {
            let e = pci::MSIX_TABLE_OFFSET + v * 16;
            self.w(e, 0xfee0_0000);
            self.w(e + 8, 0x40 + v as u32);
            self.w(e + 12, 0);
        }
    }
}

/// Host-side page-table builder (tables in guest RAM, allocated from a range).
struct Tables {
    root: u64,
    next: u64,
    limit: u64,
}

impl Tables {
    fn new(mem: &GuestMemoryMmap, (at, limit): (u64, u64)) -> Tables {
        fill(mem, at, 4096, 0);
        Tables {
            root: at,
            next: at + 4096,
            limit,
        }
    }

    /// Writes `entry` at `level` (1 = 4 KiB leaf, 2 = 2 MiB, 3 = 1 GiB, 4 = root) on the walk
    /// of `va`, creating intermediate tables.
    fn set(&mut self, mem: &GuestMemoryMmap, va: u64, level: u32, entry: u64) {
        let index = |l: u32| (va >> (12 + 9 * (l - 1))) & 511;
        let mut table = self.root;
        for l in (level + 1..=4).rev() {
            let at = table + index(l) * 8;
            let cur: u64 = mem.read_obj(GuestAddress(at)).expect("table");
            table = if cur & pte::PRESENT != 0 {
                cur & pte::ADDR_MASK
            } else {
                let t = self.next;
                assert!(t < self.limit, "out of table space");
                self.next += 4096;
                fill(mem, t, 4096, 0);
                mem.write_obj(t | pte::PRESENT, GuestAddress(at))
                    .expect("table");
                t
            };
        }
        mem.write_obj(entry, GuestAddress(table + index(level) * 8))
            .expect("entry");
    }

    /// Maps `pages` 4 KiB pages at `va` onto `pa` with `flags`.
    fn map(&mut self, mem: &GuestMemoryMmap, va: u64, pa: u64, pages: u64, flags: u64) {
        for i in 0..pages {
            self.set(mem, va + i * 4096, 1, (pa + i * 4096) | flags);
        }
    }
}

/// The fault an access must produce (`None`: allowed).
type Expect = Option<(u32, u64)>;

/// A forbidden (or read-only) place a guest aims at: the VA to use, the length, and the fault
/// a read and a write must produce (`None`: the access is allowed).
#[derive(Debug, Clone, Copy)]
struct Aim {
    name: &'static str,
    va: u64,
    len: u64,
    read: Expect,
    write: Expect,
    /// The fault happens at `va` whatever the length (else only for `len` bytes).
    at_start: bool,
}

struct Pair {
    a: Side,
    b: Side,
    aims: Vec<Aim>,
    _gpu: Arc<PhysicalGpu>,
}

impl Pair {
    fn new(watchdog: Duration) -> Pair {
        let gpu = PhysicalGpu::new(&GpuSpec::whole(2 * VRAM, 2)).expect("physical GPU");
        let sys_a = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), RAM as usize),
            (GuestAddress(ADJ), ADJ_LEN as usize),
            (GuestAddress(HIGH), HIGH_LEN as usize),
        ])
        .expect("VM A memory");
        let sys_b = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_B as usize)])
            .expect("VM B memory");
        let a = Side::new(&gpu, sys_a, DmaDomain::new([(0, RAM)]), watchdog);
        let b = Side::new(&gpu, sys_b, DmaDomain::new([(0, RAM_B)]), watchdog);
        assert_eq!(
            (a.lease.vram_offset(), b.lease.vram_offset()),
            (0, VRAM),
            "adjacent partitions"
        );
        let mut p = Pair {
            a,
            b,
            aims: Vec::new(),
            _gpu: gpu,
        };
        p.setup();
        p
    }

    fn setup(&mut self) {
        let a = &mut self.a;
        fill(&a.sys, ADJ, ADJ_LEN, PAT_ADJ);
        fill(&a.sys, HIGH, HIGH_LEN, PAT_HIGH);
        fill(&a.sys, GUARD_PA, 4096, PAT_GUARD);
        fill(a.vram(), SECRET_VRAM, VRAM - SECRET_VRAM, PAT_SECRET);
        fill(self.b.vram(), 0, VRAM, PAT_VRAM_B);
        fill(&self.b.sys, 0, RAM_B, PAT_RAM_B);

        // Context 1: its ring, scratch and secret; nothing else.
        let mut t1 = Tables::new(&a.sys, TABLES[1]);
        t1.map(&a.sys, RING_VA, RINGS[1], 2, RW);
        t1.map(&a.sys, SCRATCH_VA, SCRATCH_PA + (512 << 10), 16, RW);
        t1.map(
            &a.sys,
            SECRET_VA,
            SECRET_VRAM,
            (VRAM - SECRET_VRAM) / 4096,
            RW | pte::VRAM,
        );

        // Context 0: ring, scratch, its half of VRAM, a read-only page and the aims.
        let mem = a.sys.clone();
        let mut t = Tables::new(&mem, TABLES[0]);
        t.map(&mem, RING_VA, RINGS[0], 2, RW);
        t.map(&mem, SCRATCH_VA, SCRATCH_PA, 128, RW);
        t.map(&mem, VRAM_VA, 0, 128, RW | pte::VRAM);
        let mut aims = Vec::new();
        let mut slot = 0u64;
        let mut next_va = || {
            slot += 1;
            AIM_VA + slot * (4 << 20)
        };
        let both = |code: u32, va: u64| (Some((code, va)), Some((code, va)));
        let mut add = |name, va, len, (read, write): (Expect, Expect), at_start| {
            aims.push(Aim {
                name,
                va,
                len,
                read,
                write,
                at_start,
            })
        };
        // Leaves into forbidden guest-physical places.
        for (name, pa) in [
            ("past RAM", 16 << 20),
            ("host memory next to RAM", ADJ),
            ("MMIO hole", 0xc000_0000),
            ("APIC page", 0xfee0_0000),
            ("host memory above the hole", HIGH),
        ] {
            let va = next_va();
            t.set(&mem, va, 1, pa | RW);
            add(name, va, 64, both(fault::DMA_DOMAIN, va), true);
        }
        // The other vGPU's partition, by a 4 KiB leaf and inside a 2 MiB VRAM leaf.
        let va = next_va();
        t.set(&mem, va, 1, VRAM | RW | pte::VRAM);
        add(
            "other partition (4 KiB leaf)",
            va,
            64,
            both(fault::VRAM_RANGE, va),
            true,
        );
        let va = next_va();
        t.set(&mem, va, 2, RW | pte::VRAM | pte::HUGE);
        add(
            "other partition (inside a 2 MiB leaf)",
            va + VRAM,
            64,
            both(fault::VRAM_RANGE, va + VRAM),
            true,
        );
        add(
            "straddling the end of the partition",
            va + VRAM - 16,
            32,
            both(fault::VRAM_RANGE, va + VRAM - 16),
            false,
        );
        // A range that starts in RAM and runs into the host memory next to it.
        let va = next_va();
        t.set(&mem, va, 2, (RAM - (2 << 20)) | RW | pte::HUGE);
        t.set(&mem, va + (2 << 20), 2, RAM | RW | pte::HUGE);
        add(
            "straddling the end of RAM",
            va + (2 << 20) - 16,
            32,
            both(fault::DMA_DOMAIN, va + (2 << 20)),
            false,
        );
        // A 1 GiB leaf over RAM, used past RAM.
        let gig = 1u64 << 39;
        t.set(&mem, gig, 3, RW | pte::HUGE);
        add(
            "1 GiB leaf past RAM",
            gig + (16 << 20),
            64,
            both(fault::DMA_DOMAIN, gig + (16 << 20)),
            true,
        );
        // Read-only.
        let va = next_va();
        t.set(&mem, va, 1, RO_PA | pte::PRESENT);
        add(
            "read-only page",
            va,
            64,
            (None, Some((fault::WRITE_PROTECT, va))),
            true,
        );
        // Malformed entries.
        let va = next_va();
        t.set(&mem, va, 1, SCRATCH_PA | RW | 1 << 8);
        add("reserved bit", va, 64, both(fault::BAD_PTE, va), true);
        let va = next_va();
        t.set(&mem, va, 1, SCRATCH_PA | RW | pte::HUGE);
        add(
            "huge bit on a 4 KiB leaf",
            va,
            64,
            both(fault::BAD_PTE, va),
            true,
        );
        let va = next_va();
        t.set(&mem, va, 2, (SCRATCH_PA + 4096) | RW | pte::HUGE);
        add(
            "misaligned 2 MiB leaf",
            va,
            64,
            both(fault::BAD_PTE, va),
            true,
        );
        let va = 2u64 << 39;
        t.set(&mem, va, 4, SCRATCH_PA | RW | pte::HUGE);
        add(
            "huge bit at the root",
            va,
            64,
            both(fault::BAD_PTE, va),
            true,
        );
        // Tables outside RAM and outside the partition.
        let va = next_va();
        t.set(&mem, va, 2, ADJ | pte::PRESENT);
        add(
            "table in host memory",
            va,
            64,
            both(fault::DMA_DOMAIN, va),
            true,
        );
        let va = next_va();
        t.set(&mem, va, 2, VRAM | pte::PRESENT | pte::VRAM);
        add(
            "table in the other partition",
            va,
            64,
            both(fault::VRAM_RANGE, va),
            true,
        );
        let va = next_va();
        t.set(&mem, va, 2, 0xc000_0000 | pte::PRESENT);
        add(
            "table in the MMIO hole",
            va,
            64,
            both(fault::DMA_DOMAIN, va),
            true,
        );
        // Unmapped: nothing there, and context 1's secret (mapped only in context 1).
        let va = next_va();
        add("unmapped", va, 64, both(fault::NOT_PRESENT, va), true);
        add(
            "context 1's buffer",
            SECRET_VA,
            64,
            both(fault::NOT_PRESENT, SECRET_VA),
            true,
        );
        // Virtual-address range.
        let va = u64::MAX - 15;
        add("wrap-around", va, 32, both(fault::VA_RANGE, va), true);
        let va = 1 << pte::VA_BITS;
        add("at 2^48", va, 32, both(fault::VA_RANGE, va), true);
        let va = (1 << pte::VA_BITS) - 16;
        add("straddling 2^48", va, 32, both(fault::VA_RANGE, va), false);
        self.aims = aims;

        let root = t.root;
        a.enable(0, root, RINGS[0], RING_ENTRIES);
        a.enable(1, t1.root, RINGS[1], RING_ENTRIES);
        a.w(regs::FAULT_VECTOR, 2);

        // VM B: one context over its own RAM.
        let b = &mut self.b;
        let mut tb = Tables::new(&b.sys, (0, 0x8000));
        tb.map(&b.sys, RING_VA, 0x8000, 2, RW);
        tb.map(&b.sys, SCRATCH_VA, 0x2_0000, 16, RW);
        tb.map(&b.sys, VRAM_VA, 0, 16, RW | pte::VRAM);
        b.enable(0, tb.root, 0x8000, RING_ENTRIES);
    }

    /// Every canary intact.
    fn check_canaries(&mut self) {
        let a = &self.a;
        assert_filled(
            &a.sys,
            GUARD_PA,
            4096,
            PAT_GUARD,
            "RAM before a faulting straddle",
        );
        assert_filled(
            a.vram(),
            SECRET_VRAM,
            VRAM - SECRET_VRAM,
            PAT_SECRET,
            "context 1's secret",
        );
        self.check_host_canaries();
    }

    /// The canaries outside VM A: host memory, VM B's RAM and VRAM.
    fn check_host_canaries(&mut self) {
        let a = &self.a;
        assert_filled(&a.sys, ADJ, ADJ_LEN, PAT_ADJ, "host memory next to RAM");
        assert_filled(
            &a.sys,
            HIGH,
            HIGH_LEN,
            PAT_HIGH,
            "host memory above the PCI hole",
        );
        let b = &self.b;
        assert_filled(&b.sys, 0x4_0000, RAM_B - 0x4_0000, PAT_RAM_B, "VM B's RAM");
        assert_filled(
            b.vram(),
            0x2_0000,
            VRAM - 0x2_0000,
            PAT_VRAM_B,
            "VM B's VRAM",
        );
    }
}

/// What a hostile guest does with an aim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attack {
    CopyFrom,
    CopyTo,
    Fill,
    Saxpy,
    Crc,
    Reduce,
    Sgemm,
    Fence,
    Timestamp,
}

const ATTACKS: [Attack; 9] = [
    Attack::CopyFrom,
    Attack::CopyTo,
    Attack::Fill,
    Attack::Saxpy,
    Attack::Crc,
    Attack::Reduce,
    Attack::Sgemm,
    Attack::Fence,
    Attack::Timestamp,
];

/// The packet, and the fault it must produce.
fn attack(a: Attack, aim: &Aim) -> (Packet, Expect) {
    let (va, len) = (aim.va, aim.len);
    let scratch = SCRATCH_VA + 0x8000;
    // Fixed-size writes of 8–16 bytes only fault at aims that fault at their first byte.
    let fixed = matches!(
        a,
        Attack::Reduce | Attack::Sgemm | Attack::Fence | Attack::Timestamp
    );
    let a = if fixed && !aim.at_start {
        Attack::CopyTo
    } else {
        a
    };
    match a {
        Attack::CopyFrom => (
            Packet::new(packet::OP_COPY, 0, &[va, scratch, len]),
            aim.read,
        ),
        Attack::CopyTo => (
            Packet::new(packet::OP_COPY, 0, &[scratch, va, len]),
            aim.write,
        ),
        Attack::Fill => (
            Packet::new(packet::OP_FILL, 0, &[va, len, 0xdead_beef]),
            aim.write,
        ),
        Attack::Saxpy => (
            Packet::new(
                packet::OP_DISPATCH,
                kernel::SAXPY,
                &[len / 4, 0x3f80_0000, scratch, va],
            ),
            aim.write,
        ),
        Attack::Crc => (
            Packet::new(packet::OP_DISPATCH, kernel::CRC32, &[len, va, scratch]),
            aim.read,
        ),
        Attack::Reduce => (
            Packet::new(packet::OP_DISPATCH, kernel::REDUCE_SUM, &[16, scratch, va]),
            aim.write,
        ),
        Attack::Sgemm => (
            Packet::new(
                packet::OP_DISPATCH,
                kernel::SGEMM,
                &[2, 2, 2, scratch, scratch + 64, va],
            ),
            aim.write,
        ),
        Attack::Fence => (
            Packet::new(packet::OP_FENCE, packet::FENCE_IRQ, &[va, 7]),
            aim.write,
        ),
        Attack::Timestamp => (Packet::new(packet::OP_TIMESTAMP, 0, &[va]), aim.write),
    }
}

/// Runs one hostile packet on context 0 of VM A and checks the documented outcome.
fn strike(p: &mut Pair, a: Attack, aim: Aim) {
    let (packet, want) = attack(a, &aim);
    let side = &mut p.a;
    let faults = side.r(regs::FAULT_COUNT);
    let index = side.tails[0];
    let r = side.run(0, &[packet]);
    match want {
        None => assert_eq!(r, wait::DONE, "{a:?} at {} must be allowed", aim.name),
        Some((code, addr)) => {
            assert_eq!(r, wait::FAULTED, "{a:?} at {} must fault", aim.name);
            assert_eq!(
                side.fault_of(0),
                (code, addr),
                "{a:?} at {}: fault (code, address)",
                aim.name
            );
            assert_eq!(side.r(regs::FAULT_COUNT), faults + 1, "one fault recorded");
            assert_eq!(side.r(regs::FAULT_CODE), code);
            assert_eq!(side.r(regs::FAULT_CTX), 0);
            assert_ne!(
                side.r(regs::INT_STATUS) & int::FAULT,
                0,
                "FAULT interrupt status"
            );
            assert_ne!(side.r(regs::STATUS) & status::FAULTED, 0);
            assert_eq!(
                side.cr(0, regs::CTX_RING_HEAD),
                index,
                "the faulting packet is not consumed"
            );
            side.recover(0);
        }
    }
}

#[test]
fn every_forbidden_place_faults_with_its_code_and_no_canary_changes() {
    let mut p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
    let aims = p.aims.clone();
    for aim in &aims {
        for a in ATTACKS {
            strike(&mut p, a, *aim);
        }
    }
    // Malformed packets.
    let scratch = SCRATCH_VA;
    for (packet, code) in [
        (
            Packet::new(
                packet::OP_COPY,
                0,
                &[scratch, scratch + 64, limits::MAX_TRANSFER + 1],
            ),
            fault::BAD_PACKET,
        ),
        (
            Packet::new(packet::OP_FILL, 0, &[scratch + 2, 8, 0]),
            fault::BAD_PACKET,
        ),
        (
            Packet::new(
                packet::OP_DISPATCH,
                kernel::SPIN_US,
                &[limits::MAX_SPIN_US + 1, 1],
            ),
            fault::BAD_PACKET,
        ),
        (
            Packet::new(
                packet::OP_DISPATCH,
                kernel::SGEMM,
                &[limits::MAX_SGEMM_DIM + 1, 1, 1, 0, 0, 0],
            ),
            fault::BAD_PACKET,
        ),
        (Packet::new(packet::OP_DISPATCH, 77, &[]), fault::BAD_PACKET),
        (Packet::new(0x1234, 0, &[]), fault::BAD_OPCODE),
    ] {
        let slot = u64::from(p.a.tails[0] % RING_ENTRIES);
        assert_eq!(p.a.run(0, &[packet]), wait::FAULTED, "{packet:?}");
        assert_eq!(
            p.a.fault_of(0),
            (code, RING_VA + slot * packet::PACKET_SIZE),
            "{packet:?}"
        );
        p.a.recover(0);
    }
    // A copy of MAX_TRANSFER bytes: checked page by page up to the first hole, never moved.
    assert_eq!(
        p.a.run(
            0,
            &[Packet::new(
                packet::OP_COPY,
                0,
                &[scratch, scratch, limits::MAX_TRANSFER]
            )]
        ),
        wait::FAULTED
    );
    assert_eq!(p.a.fault_of(0), (fault::NOT_PRESENT, scratch + (128 << 12)));
    p.a.recover(0);
    p.check_canaries();
    // Everyone still works: context 0, context 1 (reading its secret), VM B.
    assert_eq!(
        p.a.run(
            0,
            &[Packet::new(
                packet::OP_COPY,
                0,
                &[scratch, scratch + 0x1000, 256]
            )]
        ),
        wait::DONE
    );
    assert_eq!(
        p.a.run(
            1,
            &[Packet::new(
                packet::OP_COPY,
                0,
                &[SECRET_VA, SCRATCH_VA, 256]
            )]
        ),
        wait::DONE
    );
    assert_filled(
        &p.a.sys,
        SCRATCH_PA + (512 << 10),
        256,
        PAT_SECRET,
        "context 1 reads its secret",
    );
    assert_eq!(
        p.b.run(
            0,
            &[Packet::new(
                packet::OP_FILL,
                0,
                &[VRAM_VA, 4096, 0x0101_0101]
            )]
        ),
        wait::DONE
    );
    assert_filled(p.b.vram(), 0, 4096, 1, "VM B's own work");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any sequence of attacks, interleaved with legitimate work, leaves every canary intact.
    #[test]
    fn hostile_sequences_leave_canaries_intact(
        steps in prop::collection::vec((0usize..64, 0usize..ATTACKS.len(), any::<bool>()), 1..24)
    ) {
        let mut p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
        let aims = p.aims.clone();
        for (i, (aim, a, legit)) in steps.into_iter().enumerate() {
            strike(&mut p, ATTACKS[a], aims[aim % aims.len()]);
            if legit {
                let v = i as u32 * 0x0101_0101;
                assert_eq!(p.a.run(0, &[Packet::new(packet::OP_FILL, 0, &[VRAM_VA, 64, u64::from(v)])]), wait::DONE);
                assert_filled(p.a.vram(), 0, 64, v as u8, "legitimate work between attacks");
            }
        }
        p.check_canaries();
    }
}

// ---------------------------------------------------------------------------------------------
// The GPU MMU on its own: random page-table trees.

const POOL_SYS: u64 = 0x10_0000;
const POOL_VRAM: u64 = 0x8_0000;

fn mmu_spaces() -> Spaces {
    let sys = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), RAM as usize),
        (GuestAddress(ADJ), ADJ_LEN as usize),
    ])
    .expect("memory");
    Spaces {
        sys,
        domain: DmaDomain::new([(0, RAM - (1 << 20))]),
        vram: Arc::new(SoftVram::new(VRAM).expect("vram")),
        import: None,
    }
}

fn entry_strategy() -> impl Strategy<Value = (bool, u64, u64, u64)> {
    // (table in VRAM, table number, index, entry value)
    let target = prop_oneof![
        (0u64..8).prop_map(|k| POOL_SYS + k * 4096),
        (0u64..8).prop_map(|k| (POOL_VRAM + k * 4096) | pte::VRAM),
        (0u64..2048).prop_map(|p| p * 4096),
        (0u64..512).prop_map(|p| (p * 4096) | pte::VRAM),
        (0u64..8).prop_map(|k| k << 21),
        (0u64..4).prop_map(|k| k << 30),
        Just(0xc000_0000u64),
        Just(RAM),
        any::<u64>().prop_map(|v| v & pte::ADDR_MASK),
    ];
    let flags = prop_oneof![
        4 => Just(RW),
        2 => Just(RW | pte::HUGE),
        1 => Just(pte::PRESENT),
        1 => Just(0u64),
        1 => (3u32..64).prop_filter("reserved", |b| pte::RESERVED_MASK & (1 << b) != 0).prop_map(|b| RW | 1 << b),
    ];
    (
        any::<bool>(),
        0u64..8,
        prop_oneof![0u64..4, 0u64..512],
        target,
        flags,
    )
        .prop_map(|(v, t, i, target, flags)| (v, t, i, target | flags))
}

fn va_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..4, 0u64..4, 0u64..4, 0u64..8, 0u64..4096)
            .prop_map(|(a, b, c, d, o)| a << 39 | b << 30 | c << 21 | d << 12 | o),
        1 => any::<u64>(),
        1 => (0u64..64).prop_map(|k| (1 << 48) - k),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever the tables say, a resolved buffer lies inside the DMA domain or the partition,
    /// covers exactly the requested length, and a cached translation agrees with a fresh walk.
    #[test]
    fn mmu_never_resolves_outside_the_domain_or_the_partition(
        root in prop_oneof![
            4 => (0u64..8).prop_map(|k| POOL_SYS + k * 4096),
            2 => (0u64..8).prop_map(|k| (POOL_VRAM + k * 4096) | pte::VRAM),
            1 => any::<u64>(),
        ],
        entries in prop::collection::vec(entry_strategy(), 0..48),
        lookups in prop::collection::vec((va_strategy(), prop_oneof![0u64..8192, 0u64..(3 << 20)], any::<bool>()), 1..8),
    ) {
        let s = mmu_spaces();
        for (vram, table, index, value) in entries {
            if vram {
                s.vram.write(POOL_VRAM + table * 4096 + index * 8, &value.to_le_bytes()).expect("entry");
            } else {
                s.sys.write_obj(value, GuestAddress(POOL_SYS + table * 4096 + index * 8)).expect("entry");
            }
        }
        let mut kept = Tlb::default();
        for (va, len, write) in lookups {
            let fresh = vgpu::mmu::resolve(&s, Root(root), &mut Tlb::default(), va, len, write);
            let cached = vgpu::mmu::resolve(&s, Root(root), &mut kept, va, len, write);
            match (&fresh, &cached) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a.extents(), b.extents()),
                (Err(a), Err(b)) => prop_assert_eq!(a, b),
                _ => prop_assert!(false, "fresh {:?} vs cached {:?}", fresh, cached),
            }
            match fresh {
                Ok(sl) => {
                    prop_assert_eq!(sl.len(), len);
                    for e in sl.extents() {
                        match e.loc {
                            Loc::Sys => prop_assert!(s.domain.contains(e.addr, e.len), "{:?} outside the domain", e),
                            Loc::Vram => prop_assert!(e.addr.checked_add(e.len).is_some_and(|end| end <= VRAM), "{:?} outside the partition", e),
                        }
                    }
                    let mut buf = vec![0u8; len.min(1 << 16) as usize];
                    prop_assert!(sl.read(&s, 0, &mut buf).is_ok());
                }
                Err(f) => prop_assert!(
                    [fault::NOT_PRESENT, fault::WRITE_PROTECT, fault::VRAM_RANGE, fault::DMA_DOMAIN,
                     fault::BAD_ROOT, fault::BAD_PTE, fault::VA_RANGE].contains(&f.code),
                    "undocumented fault {:?}", f
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Registers and configuration space.

fn power_on_registers() -> Vec<u64> {
    let mut v: Vec<u64> = (0..=regs::WAIT_VALUE)
        .step_by(4)
        .filter(|&o| o != regs::TIMESTAMP_LO && o != regs::TIMESTAMP_HI)
        .collect();
    for ctx in 0..=4 {
        v.extend(
            (0..=regs::CTX_TAIL_ADDR_HI)
                .step_by(4)
                .map(|r| regs::ctx_reg(ctx, r)),
        );
    }
    v.extend((0..16 * 16).step_by(4).map(|o| pci::MSIX_TABLE_OFFSET + o));
    v.extend([pci::MSIX_PBA_OFFSET, pci::MSIX_PBA_OFFSET + 4]);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Register garbage (contexts enabled on junk, MSI-X programmed, masks, vectors), then
    /// RESET: every register reads its power-on value, VRAM is scrubbed, the neighbour's VRAM
    /// is untouched, and the reset is quick.
    #[test]
    fn register_garbage_then_reset_reads_power_on(
        writes in prop::collection::vec((0u64..0x1600, any::<u32>(), 0u32..8), 1..200)
    ) {
        let mut p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
        let a = &mut p.a;
        a.reset();
        let offs = power_on_registers();
        let before: Vec<u32> = offs.iter().map(|&o| a.r(o)).collect();
        fill(a.vram(), 0, 4096, 0xab);
        for (off, v, pick) in writes {
            let off = off * 4;
            let v = match pick {
                0 => ctx_control::ENABLE,
                1 => ctx_control::ENABLE | ctx_control::POLL,
                2 => RING_VA as u32,
                _ => v,
            };
            if off == regs::RESET || off == regs::WAIT {
                continue;
            }
            a.w(off, v);
        }
        let took = a.reset();
        prop_assert!(took < Duration::from_secs(2), "RESET took {:?}", took);
        for (&o, &want) in offs.iter().zip(&before) {
            prop_assert_eq!(a.r(o), want, "register {:#x} after RESET", o);
        }
        assert_filled(a.vram(), 0, VRAM, 0, "VRAM after RESET");
        p.check_host_canaries();
    }
}

/// Records the root's memory-BAR mappings and doorbell ioevents.
#[derive(Debug, Default)]
struct Mapper {
    maps: Mutex<BTreeMap<u64, u64>>,
    ioevents: Mutex<Vec<u64>>,
}

const WINDOWS: [(u64, u64); 2] = [(0xc000_0000, 0x3ec0_0000), (1 << 39, 1 << 39)];

fn in_windows(addr: u64, len: u64) -> bool {
    WINDOWS
        .iter()
        .any(|&(b, s)| addr >= b && addr.checked_add(len).is_some_and(|e| e <= b + s))
}

impl GuestMapper for Mapper {
    fn map(&self, gpa: u64, mem: HostMemory) -> std::io::Result<()> {
        assert!(
            in_windows(gpa, mem.len()),
            "memory BAR at {gpa:#x} outside the PCI windows"
        );
        self.maps.lock().expect("lock").insert(gpa, mem.len());
        Ok(())
    }
    fn unmap(&self, gpa: u64) {
        assert!(
            self.maps.lock().expect("lock").remove(&gpa).is_some(),
            "unmap of {gpa:#x}"
        );
    }
    fn register_ioevent(&self, gpa: u64, _evt: &EventFd) -> std::io::Result<()> {
        assert!(
            in_windows(gpa, 4),
            "ioevent at {gpa:#x} outside the PCI windows"
        );
        self.ioevents.lock().expect("lock").push(gpa);
        Ok(())
    }
    fn unregister_ioevent(&self, gpa: u64, _evt: &EventFd) {
        let mut v = self.ioevents.lock().expect("lock");
        let i = v
            .iter()
            .position(|&g| g == gpa)
            .expect("registered ioevent");
        v.remove(i);
    }
}

fn conf1(root: &mut PciRoot, slot: u32, reg: u32) -> u32 {
    root.write(0, 0, &(0x8000_0000 | slot << 11 | reg << 2).to_le_bytes());
    let mut d = [0u8; 4];
    root.read(0, 4, &mut d);
    u32::from_le_bytes(d)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Configuration-space garbage through conf1: identities never change, and a BAR never
    /// decodes outside the PCI windows (nothing on the MMIO bus there, nothing mapped).
    #[test]
    fn config_space_garbage_never_maps_outside_the_windows(
        writes in prop::collection::vec((0u32..4, 0u32..64, 0u64..4, prop_oneof![Just(1usize), Just(2), Just(4)], any::<u32>()), 1..64)
    ) {
        let gpu = PhysicalGpu::new(&GpuSpec::whole(VRAM, 1)).expect("GPU");
        let sys = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_B as usize)]).expect("memory");
        let side = Side::new(&gpu, sys, DmaDomain::new([(0, RAM_B)]), vgpu::device::DEFAULT_WATCHDOG);
        let dev = Arc::new(side.dev);
        let mmio = Arc::new(Bus::new());
        let mapper = Arc::new(Mapper::default());
        let mut root = PciRoot::new(mmio.clone(), WINDOWS.to_vec()).with_guest_mapper(mapper.clone());
        root.add_device(0, Arc::new(Mutex::new(HostBridge::new()))).expect("bridge");
        root.add_device_sync(1, dev.clone()).expect("vGPU");
        let ids: Vec<u32> = [0, 2, 11, 13].iter().map(|&r| conf1(&mut root, 1, r)).collect();
        for (slot, reg, off, size, v) in writes {
            let off = off & !(size as u64 - 1);
            root.write(0, 0, &(0x8000_0000 | slot << 11 | reg << 2).to_le_bytes());
            root.write(0, 4 + off, &v.to_le_bytes()[..size]);
            let now: Vec<u32> = [0, 2, 11, 13].iter().map(|&r| conf1(&mut root, 1, r)).collect();
            prop_assert_eq!(&now, &ids);
            prop_assert_eq!(conf1(&mut root, 3, 0), u32::MAX);
            let bar0 = u64::from(conf1(&mut root, 1, 4) & !0xf);
            let cmd = conf1(&mut root, 1, 1);
            let mut d = [0u8; 4];
            let decodes = mmio.read(bar0, &mut d).is_ok();
            let should = cmd & 2 != 0 && bar0 != 0 && in_windows(bar0, pci::BAR_REGS_SIZE);
            prop_assert_eq!(decodes, should, "BAR0 at {:#x}, command {:#x}", bar0, cmd);
            if should {
                prop_assert_eq!(u32::from_le_bytes(d), regs::MAGIC_VALUE);
            }
            prop_assert!(mapper.maps.lock().expect("lock").len() <= 1);
            prop_assert_eq!(mapper.ioevents.lock().expect("lock").len(), if should { 4 } else { 0 });
        }
        drop(root);
        drop(dev);
        drop(side.lease);
    }
}

// ---------------------------------------------------------------------------------------------
// Resource abuse.

#[test]
fn ring_flood_keeps_other_contexts_and_vgpus_served_and_reset_quick() {
    let mut p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
    let a = &mut p.a;
    // Context 0: the largest ring, full of short spins (4096 × 2 × 200 µs of GPU time: about
    // 0.8 s on two engines). A tail further ahead would be a RING_CONFIG fault, not a flood.
    let entries = limits::MAX_RING_ENTRIES;
    let ring_pa = 0x60_0000;
    let mut t = Tables::new(&a.sys, (0x68_0000, 0x70_0000));
    t.map(&a.sys, RING_VA, ring_pa, u64::from(entries) * 64 / 4096, RW);
    let spin = Packet::new(packet::OP_DISPATCH, kernel::SPIN_US, &[200, 2]).to_bytes();
    for slot in 0..u64::from(entries) {
        a.sys
            .write_slice(&spin, GuestAddress(ring_pa + slot * 64))
            .expect("ring");
    }
    a.enable(0, t.root, ring_pa, entries);
    a.cw(0, regs::CTX_RING_TAIL, entries);
    // Doorbell storm on top.
    for _ in 0..10_000 {
        a.w(regs::doorbell(0), 0);
    }
    // Context 1 and VM B are still served promptly.
    let t0 = Instant::now();
    assert_eq!(a.run(1, &[Packet::new(packet::OP_NOP, 0, &[])]), wait::DONE);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "context 1 waited {:?}",
        t0.elapsed()
    );
    let t0 = Instant::now();
    assert_eq!(
        p.b.run(0, &[Packet::new(packet::OP_NOP, 0, &[])]),
        wait::DONE
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "VM B waited {:?}",
        t0.elapsed()
    );
    let a = &mut p.a;
    assert_ne!(
        a.cr(0, regs::CTX_STATUS) & ctx_status::BUSY,
        0,
        "still flooding"
    );
    let took = a.reset();
    assert!(
        took < Duration::from_secs(1),
        "RESET under a ring flood took {took:?}"
    );
    assert_eq!(a.cr(0, regs::CTX_STATUS), 0);
    p.check_host_canaries();
}

#[test]
fn giant_dispatch_is_stopped_by_the_watchdog_while_the_neighbour_runs() {
    let watchdog = Duration::from_millis(300);
    let mut p = Pair::new(watchdog);
    // MAX_SPIN_US × MAX_SPIN_GROUPS: 18 hours of GPU time in one packet.
    let giant = Packet::new(
        packet::OP_DISPATCH,
        kernel::SPIN_US,
        &[limits::MAX_SPIN_US, limits::MAX_SPIN_GROUPS],
    );
    p.a.submit(0, RINGS[0], RING_ENTRIES, &[giant]);
    let started = Instant::now();
    // The neighbour VM keeps its share meanwhile: 4 × 20 ms of spinning finishes.
    let b_work = Packet::new(packet::OP_DISPATCH, kernel::SPIN_US, &[20_000, 4]);
    assert_eq!(p.b.run(0, &[b_work]), wait::DONE);
    let b_took = started.elapsed();
    assert!(
        b_took < Duration::from_secs(5),
        "VM B waited {b_took:?} behind the giant dispatch"
    );
    // A's packet overran the watchdog: the vGPU was reset (TDR) and the fault recorded.
    let a = &mut p.a;
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.r(regs::FAULT_CODE) != fault::TIMEOUT {
        assert!(
            Instant::now() < deadline,
            "no watchdog fault after {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, addr) = a.fault_of(0);
    assert_eq!((code, addr), (fault::TIMEOUT, RING_VA), "context 0 fault");
    assert_ne!(a.r(regs::INT_STATUS) & int::FAULT, 0);
    // After the TDR the vGPU is usable again once the driver sets it up.
    p.setup();
    assert_eq!(
        p.a.run(0, &[Packet::new(packet::OP_NOP, 0, &[])]),
        wait::DONE
    );
    p.check_canaries();
}

#[test]
fn reset_cuts_a_giant_dispatch_short() {
    let mut p = Pair::new(Duration::from_secs(3600));
    let giant = Packet::new(
        packet::OP_DISPATCH,
        kernel::SPIN_US,
        &[limits::MAX_SPIN_US, limits::MAX_SPIN_GROUPS],
    );
    p.a.submit(0, RINGS[0], RING_ENTRIES, &[giant]);
    std::thread::sleep(Duration::from_millis(50));
    let took = p.a.reset();
    assert!(took < Duration::from_secs(3), "RESET took {took:?}");
    assert_eq!(p.a.cr(0, regs::CTX_STATUS), 0);
    assert_filled(p.a.vram(), 0, VRAM, 0, "VRAM scrubbed");
}

#[test]
fn fence_and_interrupt_storms_are_bounded() {
    let mut p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
    let a = &mut p.a;
    a.enable_msix(4);
    a.cw(0, regs::CTX_IRQ_VECTOR, 1);
    let storm = |a: &mut Side, n: u64| {
        let base = a.fences[0];
        let pkts: Vec<Packet> = (1..=n)
            .map(|i| Packet::new(packet::OP_FENCE, packet::FENCE_IRQ, &[FENCE_VA, base + i]))
            .collect();
        for chunk in pkts.chunks(RING_ENTRIES as usize - 1) {
            a.submit(0, RINGS[0], RING_ENTRIES, chunk);
            let last = chunk.last().map(|p| p.args[1]).unwrap_or(0);
            assert_eq!(a.wait(0, last, Duration::from_secs(20)), wait::DONE);
        }
        a.fences[0] = base + n;
    };
    // One message per fence: no amplification.
    storm(a, 2000);
    assert_eq!(a.msis.0.load(Ordering::Relaxed), 2000);
    // Masked in INT_MASK: the status bit latches, no messages.
    a.w(regs::INT_MASK, int::fence(0));
    storm(a, 2000);
    assert_eq!(a.msis.0.load(Ordering::Relaxed), 2000);
    assert_ne!(a.r(regs::INT_STATUS) & int::fence(0), 0);
    a.w(regs::INT_MASK, 0);
    // Masked in the MSI-X entry: one pending bit, not a queue; one message on unmask.
    a.w(pci::MSIX_TABLE_OFFSET + 16 + 12, 1);
    storm(a, 2000);
    assert_eq!(a.msis.0.load(Ordering::Relaxed), 2000);
    assert_eq!(a.r(pci::MSIX_PBA_OFFSET), 1 << 1);
    a.w(pci::MSIX_TABLE_OFFSET + 16 + 12, 0);
    assert_eq!(a.msis.0.load(Ordering::Relaxed), 2001);
    assert_eq!(a.r(pci::MSIX_PBA_OFFSET), 0);
    // A fault storm: 500 faults, each one message on the fault vector.
    a.w(regs::FAULT_VECTOR, 2);
    for _ in 0..500 {
        assert_eq!(a.run(0, &[Packet::new(0x99, 0, &[])]), wait::FAULTED);
        a.recover(0);
    }
    assert_eq!(a.msis.0.load(Ordering::Relaxed), 2501);
    assert_eq!(a.r(regs::FAULT_COUNT), 500);
    p.check_canaries();
}

/// Anonymous memory of this process (guest RAM and VRAM below are memfds: shared, not
/// anonymous), in bytes.
fn rss_anon() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn memfd(size: u64) -> std::fs::File {
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"isolation-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor that nothing else owns.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size).expect("size the memfd");
    f
}

#[test]
fn huge_copies_and_fills_stream_through_bounded_host_memory() {
    const LEN: u64 = 256 << 20;
    let size = 2 * LEN + (16 << 20);
    let sys = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(memfd(size), 0)),
    )])
    .expect("memfd RAM");
    let gpu = PhysicalGpu::new(&GpuSpec::whole(VRAM, 2)).expect("GPU");
    let mut a = Side::new(
        &gpu,
        sys.clone(),
        DmaDomain::new([(0, size)]),
        Duration::from_secs(600),
    );
    let mut t = Tables::new(&sys, (0x10_0000, 0x20_0000));
    t.map(&sys, RING_VA, RINGS[0], 2, RW);
    for mb2 in (16 << 20..size).step_by(2 << 20) {
        t.set(&sys, mb2, 2, mb2 | RW | pte::HUGE);
    }
    a.enable(0, t.root, RINGS[0], RING_ENTRIES);
    let (src, dst) = (16u64 << 20, (16 << 20) + LEN);
    sys.write_obj(0x1234_5678_9abc_def0u64, GuestAddress(src + LEN - 8))
        .expect("write");
    let stop = Arc::new(AtomicBool::new(false));
    let base = rss_anon();
    let peak = Arc::new(AtomicU64::new(base));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_anon(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    assert_eq!(
        a.run(0, &[Packet::new(packet::OP_COPY, 0, &[src, dst, LEN])]),
        wait::DONE
    );
    assert_eq!(
        a.run(
            0,
            &[Packet::new(packet::OP_FILL, 0, &[src, LEN, 0x0101_0101])]
        ),
        wait::DONE
    );
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let v: u64 = sys.read_obj(GuestAddress(dst + LEN - 8)).expect("read");
    assert_eq!(v, 0x1234_5678_9abc_def0, "copied");
    let v: u64 = sys.read_obj(GuestAddress(src + LEN - 8)).expect("read");
    assert_eq!(v, 0x0101_0101_0101_0101, "filled");
    let grew = peak.load(Ordering::Relaxed).saturating_sub(base);
    // The device streams in 1 MiB chunks; other tests in this process allocate a little too.
    assert!(
        grew < 96 << 20,
        "anonymous memory grew by {} MiB for a {} MiB copy",
        grew >> 20,
        LEN >> 20
    );
}

// ---------------------------------------------------------------------------------------------
// The seccomp sandbox, end to end.

#[test]
fn firmware_with_a_vgpu_runs_under_seccomp() {
    let Some(fw) = tessera_tests::firmware() else {
        return;
    };
    let fw = fw.to_str().expect("utf-8 path");
    for (cmdline, want) in [("run=info exit=7", 7), ("run=conformance", 0)] {
        let (status, out, err) = tessera_tests::run_tessera(
            &[
                "vm",
                "--kernel",
                fw,
                "--cmdline",
                cmdline,
                "--memory",
                "256M",
                "--vgpu",
                "64M",
                "--seccomp",
                "true",
            ],
            &[],
        );
        assert!(!err.contains("panicked"), "stderr: {err}");
        assert_eq!(
            status.code(),
            Some(want),
            "{cmdline}: status {status:?}\n{out}\n{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Regression tests of bugs found by fuzzing (`cargo xtask fuzz`), fixed in 3e15af9.

/// Found by `bar0_registers` (input `03 00 42 b4`: an 8-byte read at BAR0 + 0x4200): an MMIO
/// read wider than 4 bytes of the MSI-X table panicked in `MsixState::read_table`.
#[test]
fn wide_read_of_the_msix_table_does_not_panic() {
    let p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
    let mut d = [0xffu8; 8];
    p.a.dev
        .read_bar(pci::BAR_REGS, pci::MSIX_TABLE_OFFSET + 0x200, &mut d);
    assert_eq!(d, [0; 8]);
}

/// A tail published behind head (or more than a ring ahead of it) names no real packets:
/// the context must fault `RING_CONFIG` at once, not execute up to 2^32 stale ring slots.
/// Found by the `command_stream` fuzz target (a batch that never finished: head had run
/// 19 million packets past a tail of 8).
#[test]
fn a_tail_behind_head_faults_instead_of_running_stale_slots() {
    let mut p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
    let a = &mut p.a;
    assert_eq!(a.run(0, &[]), wait::DONE);
    assert_eq!(a.run(1, &[]), wait::DONE);
    for behind in [true, false] {
        let head = a.tails[0];
        let bad = if behind {
            head.wrapping_sub(1)
        } else {
            head.wrapping_add(RING_ENTRIES + 1)
        };
        a.cw(0, regs::CTX_RING_TAIL, bad);
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.cr(0, regs::CTX_STATUS) & ctx_status::FAULTED == 0 {
            assert!(
                Instant::now() < deadline,
                "tail {bad:#x} with head {head:#x}: no fault, head now {:#x}",
                a.cr(0, regs::CTX_RING_HEAD)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(a.fault_of(0).0, fault::RING_CONFIG);
        assert_eq!(a.cr(0, regs::CTX_RING_HEAD), head, "nothing ran");
        a.recover(0);
        assert_eq!(a.run(0, &[]), wait::DONE, "recovers after a context reset");
    }
    // The other context never noticed.
    assert_eq!(a.run(1, &[]), wait::DONE);
}

/// A ring base moved to the top of the address space after the context was enabled (only
/// enabling validates it): the next packet address must fault, not overflow. Found while
/// writing the `bar0_registers` seeds (`ring-at-top`): `Processor::step` added the slot offset
/// unchecked, and the command processor panicked in debug builds.
#[test]
fn ring_base_moved_to_the_top_faults_instead_of_overflowing() {
    let mut p = Pair::new(vgpu::device::DEFAULT_WATCHDOG);
    let a = &mut p.a;
    assert_eq!(a.run(0, &[]), wait::DONE);
    let next = a.tails[0];
    a.cw(0, regs::CTX_RING_BASE_HI, 0xffff_ffff);
    a.cw(0, regs::CTX_RING_BASE_LO, 0xffff_ffc0);
    a.cw(0, regs::CTX_RING_TAIL, next + 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.cr(0, regs::CTX_STATUS) & ctx_status::FAULTED == 0 {
        assert!(
            Instant::now() < deadline,
            "the context neither faulted nor ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(a.fault_of(0).0, fault::VA_RANGE);
    assert!(a.reset() < Duration::from_secs(2));
}
