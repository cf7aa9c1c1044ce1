//! The shared fixture of the isolation tests (`isolation_*.rs`): hostile guests against the
//! vGPU and the PCI root, through the public API of `vgpu`, `vgpu-abi` and `devices` only.
//! Two VMs, each with a vGPU, on one physical GPU with adjacent VRAM; host memory next to
//! guest RAM and above the PCI hole, the other vGPU's VRAM, another VM's RAM and another
//! context's buffer hold known patterns (canaries); page-table builders, the attacks and the
//! faults they must produce. Each test binary uses part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use devices::pci::{MsiSink, PciDeviceSync};
use vgpu::backend::{Aperture, Vram};
use vgpu::physical::{GpuKind, GpuSpec, Lease, PhysicalGpu};
use vgpu::profile::Profile;
use vgpu::{BarAddresses, DmaDomain, Vgpu, VgpuSetup};
use vgpu_abi::{Packet, ctx_control, fault, int, kernel, packet, pci, pte};
use vgpu_abi::{regs, status, wait};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

// ---------------------------------------------------------------------------------------------
// The fixture: two VMs, each with a vGPU, on one physical GPU.

/// Guest RAM of VM A (in its DMA domain).
pub const RAM: u64 = 8 << 20;
/// Host canary right after VM A's RAM: a guest-memory region outside the domain.
pub const ADJ: u64 = RAM;
pub const ADJ_LEN: u64 = 64 << 10;
/// Host canary above the PCI hole, outside the domain.
pub const HIGH: u64 = 1 << 32;
pub const HIGH_LEN: u64 = 64 << 10;
/// VRAM per vGPU; A gets [0, VRAM) of the GPU, B the adjacent [VRAM, 2 VRAM).
pub const VRAM: u64 = 1 << 20;
/// VM B's RAM (a canary for A: another VM).
pub const RAM_B: u64 = 1 << 20;

pub const PAT_ADJ: u8 = 0xc5;
pub const PAT_HIGH: u8 = 0x3c;
pub const PAT_VRAM_B: u8 = 0x96;
pub const PAT_RAM_B: u8 = 0x5a;
pub const PAT_SECRET: u8 = 0x77;
pub const PAT_GUARD: u8 = 0xe1;

pub const RW: u64 = pte::PRESENT | pte::WRITABLE;

/// Guest-physical layout of VM A.
pub const SCRATCH_PA: u64 = 1 << 20;
pub const RO_PA: u64 = 2 << 20;
pub const TABLES: [(u64, u64); 2] = [(0x40_0000, 0x48_0000), (0x48_0000, 0x50_0000)];
pub const RINGS: [u64; 2] = [0x50_0000, 0x50_2000];
/// The last page below the end of RAM: reachable only through the straddling aim.
pub const GUARD_PA: u64 = RAM - 4096;
/// VRAM A: [0, 512 KiB) is context 0's, [768 KiB, 1 MiB) context 1's secret.
pub const SECRET_VRAM: u64 = 768 << 10;

/// GPU virtual layout (both contexts).
pub const SCRATCH_VA: u64 = 0x1000_0000;
pub const VRAM_VA: u64 = 0x2000_0000;
pub const SECRET_VA: u64 = 0x3000_0000;
pub const AIM_VA: u64 = 0x4000_0000;
pub const RING_VA: u64 = 0x7000_0000;
pub const FENCE_VA: u64 = RING_VA + 0x1000;
pub const RING_ENTRIES: u32 = 64;

#[derive(Debug, Default)]
pub struct MsiCount(pub AtomicU64);

impl MsiSink for MsiCount {
    fn send(&self, _address: u64, _data: u32) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn profile(contexts: u32) -> Profile {
    Profile {
        name: "isolation",
        vram: VRAM,
        contexts,
        engines: 2,
    }
}

/// A second mapping of `vram`'s aperture file: what a VMM maps into the guest.
pub fn aperture(vram: &dyn Vram) -> GuestMemoryMmap {
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

pub fn fill(mem: &GuestMemoryMmap, at: u64, len: u64, byte: u8) {
    mem.write_slice(&vec![byte; len as usize], GuestAddress(at))
        .expect("fill");
}

pub fn assert_filled(mem: &GuestMemoryMmap, at: u64, len: u64, byte: u8, what: &str) {
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
pub struct Side {
    pub dev: Vgpu,
    pub sys: GuestMemoryMmap,
    pub lease: Lease,
    pub vram: GuestMemoryMmap,
    pub msis: Arc<MsiCount>,
    pub tails: [u32; 4],
    pub fences: [u64; 4],
    pub rings: [u64; 4],
}

impl Side {
    pub fn new(
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
    pub fn vram(&self) -> &GuestMemoryMmap {
        &self.vram
    }

    pub fn r(&mut self, off: u64) -> u32 {
        let mut d = [0u8; 4];
        self.dev.read_bar(pci::BAR_REGS, off, &mut d);
        u32::from_le_bytes(d)
    }

    pub fn w(&mut self, off: u64, v: u32) {
        self.dev.write_bar(pci::BAR_REGS, off, &v.to_le_bytes());
    }

    pub fn cr(&mut self, ctx: u32, reg: u64) -> u32 {
        self.r(regs::ctx_reg(ctx, reg))
    }

    pub fn cw(&mut self, ctx: u32, reg: u64, v: u32) {
        self.w(regs::ctx_reg(ctx, reg), v)
    }

    pub fn fault_of(&mut self, ctx: u32) -> (u32, u64) {
        let code = self.cr(ctx, regs::CTX_FAULT_CODE);
        let lo = u64::from(self.cr(ctx, regs::CTX_FAULT_ADDR_LO));
        let hi = u64::from(self.cr(ctx, regs::CTX_FAULT_ADDR_HI));
        (code, hi << 32 | lo)
    }

    /// Resets context `ctx`, points it at `root` with its ring at `RING_VA` (guest-physical
    /// `ring_pa`, `entries` packets) and enables it.
    pub fn enable(&mut self, ctx: u32, root: u64, ring_pa: u64, entries: u32) {
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
    pub fn submit(&mut self, ctx: u32, ring_pa: u64, entries: u32, pkts: &[Packet]) {
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
    pub fn wait(&mut self, ctx: u32, value: u64, limit: Duration) -> u32 {
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
    pub fn run(&mut self, ctx: u32, pkts: &[Packet]) -> u32 {
        self.fences[ctx as usize] += 1;
        let value = self.fences[ctx as usize];
        let mut all = pkts.to_vec();
        all.push(Packet::new(packet::OP_FENCE, 0, &[FENCE_VA, value]));
        self.submit(ctx, self.rings[ctx as usize], RING_ENTRIES, &all);
        self.wait(ctx, value, Duration::from_secs(20))
    }

    /// A driver's recovery after a fault: acknowledge, reset the context, enable it again.
    pub fn recover(&mut self, ctx: u32) {
        self.w(regs::INT_STATUS, int::FAULT);
        self.cw(ctx, regs::CTX_CONTROL, ctx_control::RESET);
        assert_eq!(self.cr(ctx, regs::CTX_STATUS), 0, "context reset");
        self.cw(ctx, regs::CTX_CONTROL, ctx_control::ENABLE);
        self.tails[ctx as usize] = 0;
    }

    /// Function-level reset; returns how long it took.
    pub fn reset(&mut self) -> Duration {
        let t = Instant::now();
        self.w(regs::RESET, regs::RESET_VALUE);
        let took = t.elapsed();
        assert_eq!(self.r(regs::STATUS), status::READY, "ready after RESET");
        self.tails = [0; 4];
        self.fences = [0; 4];
        took
    }

    pub fn enable_msix(&mut self, vectors: u64) {
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
pub struct Tables {
    pub root: u64,
    pub next: u64,
    pub limit: u64,
}

impl Tables {
    pub fn new(mem: &GuestMemoryMmap, (at, limit): (u64, u64)) -> Tables {
        fill(mem, at, 4096, 0);
        Tables {
            root: at,
            next: at + 4096,
            limit,
        }
    }

    /// Writes `entry` at `level` (1 = 4 KiB leaf, 2 = 2 MiB, 3 = 1 GiB, 4 = root) on the walk
    /// of `va`, creating intermediate tables.
    pub fn set(&mut self, mem: &GuestMemoryMmap, va: u64, level: u32, entry: u64) {
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
    pub fn map(&mut self, mem: &GuestMemoryMmap, va: u64, pa: u64, pages: u64, flags: u64) {
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
pub struct Aim {
    pub name: &'static str,
    pub va: u64,
    pub len: u64,
    pub read: Expect,
    pub write: Expect,
    /// The fault happens at `va` whatever the length (else only for `len` bytes).
    pub at_start: bool,
}

pub struct Pair {
    pub a: Side,
    pub b: Side,
    pub aims: Vec<Aim>,
    pub _gpu: Arc<PhysicalGpu>,
}

impl Pair {
    pub fn new(watchdog: Duration) -> Pair {
        Pair::on(GpuKind::Soft, watchdog)
    }

    /// Two VMs on a GPU of `kind`.
    pub fn on(kind: GpuKind, watchdog: Duration) -> Pair {
        let gpu = PhysicalGpu::new(&GpuSpec {
            kind,
            ..GpuSpec::whole(2 * VRAM, 2)
        })
        .expect("physical GPU");
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
            "adjacent VRAM ranges"
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

    pub fn setup(&mut self) {
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
    pub fn check_canaries(&mut self) {
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
    pub fn check_host_canaries(&mut self) {
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
pub enum Attack {
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

pub const ATTACKS: [Attack; 9] = [
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
pub fn attack(a: Attack, aim: &Aim) -> (Packet, Expect) {
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
pub fn strike(p: &mut Pair, a: Attack, aim: Aim) {
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
