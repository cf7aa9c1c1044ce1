//! Device-level tests with an in-memory guest: registers, rings, every command, faults,
//! interrupts, reset, isolation between contexts, and garbage from a hostile guest.

use std::sync::{Arc, Mutex};

use devices::pci::{MsiSink, PciDeviceSync};
use vgpu_abi::{Packet, ctx_control, ctx_status, fault, int, kernel, packet, pci, pte, regs, wait};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::{GpuBackend, SoftGpu};
use crate::device::{BarAddresses, Vgpu, VgpuSetup};
use crate::domain::DmaDomain;
use crate::mem::{Loc, Spaces};
use crate::mmu::tests::Builder;
use crate::physical::{Lease, PhysicalGpu};
use crate::profile;
use crate::sched::{MonotonicClock, Policy};

#[derive(Default)]
struct Msis(Mutex<Vec<(u64, u32)>>);
impl MsiSink for Msis {
    fn send(&self, address: u64, data: u32) {
        self.0.lock().unwrap().push((address, data));
    }
}

/// Serialises the tests that measure time shares on real threads with those that keep the
/// CPUs busy (the Vulkan tests: lavapipe's threads): on a 2-core host the latter would make
/// the former measure the host.
pub(crate) fn measuring_alone() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const RAM: u64 = 16 << 20;
const VRAM: u64 = 4 << 20;
const RW: u64 = pte::PRESENT | pte::WRITABLE;
/// GPU VA layout used by the tests: ring at 0x10000, buffers at 1 MiB (sysmem) and
/// 2 MiB (VRAM), a read-only page at 3 MiB.
const RING_VA: u64 = 0x1_0000;
const SYS_VA: u64 = 0x10_0000;
const VRAM_VA: u64 = 0x20_0000;
const RO_VA: u64 = 0x30_0000;

struct Gpu {
    dev: Vgpu,
    spaces: Spaces,
    msis: Arc<Msis>,
    _lease: Lease,
}

impl Gpu {
    /// A vGPU on a software GPU of its own.
    fn new() -> Gpu {
        Gpu::on(Arc::new(SoftGpu::new(VRAM, 2).unwrap()))
    }

    /// A vGPU on `backend` (with `VRAM` bytes of VRAM).
    fn on(backend: Arc<dyn GpuBackend>) -> Gpu {
        let sys = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let msis = Arc::new(Msis::default());
        let prof = profile::Profile {
            name: "test",
            vram: VRAM,
            contexts: 4,
            engines: 2,
        };
        let gpu = PhysicalGpu::from_backends(
            vec![backend],
            Policy::BestEffort,
            crate::sched::DEFAULT_SLICE,
            Arc::new(MonotonicClock::default()),
        )
        .unwrap();
        let lease = gpu.lease(&prof, None).unwrap();
        let domain = DmaDomain::new([(0, RAM)]);
        let spaces = Spaces {
            sys: sys.clone(),
            domain: domain.clone(),
            vram: lease.vram().clone(),
            import: None,
        };
        let dev = Vgpu::new(VgpuSetup {
            bars: BarAddresses {
                regs: 0xc000_0000,
                vram: 0xd000_0000,
            },
            sys,
            domain,
            interrupts: crate::Interrupts::Msi(msis.clone()),
            ..VgpuSetup::from_lease(&lease)
        })
        .unwrap();
        Gpu {
            dev,
            spaces,
            msis,
            _lease: lease,
        }
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

    /// Page tables for `ctx` in sysmem at `tables` (ring, sysmem buffer, VRAM buffer,
    /// read-only page), ring of `size` entries, enabled.
    fn setup_ctx(&mut self, ctx: u32, tables: u64, buf_pa: u64, size: u32) -> Builder {
        let mut b = Builder::new(&self.spaces, Loc::Sys, tables);
        let ring_pa = tables + 0x8_0000;
        for p in 0..4u64 {
            b.map(
                &self.spaces,
                RING_VA + p * 0x1000,
                (ring_pa + p * 0x1000) | RW,
                1,
            );
        }
        for p in 0..16u64 {
            b.map(
                &self.spaces,
                SYS_VA + p * 0x1000,
                (buf_pa + p * 0x1000) | RW,
                1,
            );
            b.map(
                &self.spaces,
                VRAM_VA + p * 0x1000,
                (buf_pa + p * 0x1000) | RW | pte::VRAM,
                1,
            );
        }
        b.map(&self.spaces, RO_VA, buf_pa | pte::PRESENT, 1);
        let root = b.root().0;
        self.cw(ctx, regs::CTX_PT_ROOT_LO, root as u32);
        self.cw(ctx, regs::CTX_PT_ROOT_HI, (root >> 32) as u32);
        self.cw(ctx, regs::CTX_RING_BASE_LO, RING_VA as u32);
        self.cw(ctx, regs::CTX_RING_SIZE, size);
        self.cw(ctx, regs::CTX_CONTROL, ctx_control::ENABLE);
        b
    }

    fn ring_pa(tables: u64) -> u64 {
        tables + 0x8_0000
    }

    /// Writes packets at the context's tail and publishes the new tail.
    fn submit(&mut self, ctx: u32, tables: u64, pkts: &[Packet]) -> u32 {
        let size = self.cr(ctx, regs::CTX_RING_SIZE);
        let mut tail = self.cr(ctx, regs::CTX_RING_TAIL);
        for p in pkts {
            let at = Self::ring_pa(tables) + u64::from(tail % size) * packet::PACKET_SIZE;
            self.spaces
                .sys
                .write_slice(&p.to_bytes(), GuestAddress(at))
                .unwrap();
            tail = tail.wrapping_add(1);
        }
        self.cw(ctx, regs::CTX_RING_TAIL, tail);
        tail
    }

    /// Blocks until the context's fence reaches `value` (through the WAIT register).
    fn wait(&mut self, ctx: u32, value: u32) -> u32 {
        self.w(regs::WAIT_CTX, ctx);
        self.w(regs::WAIT_VALUE, value);
        for _ in 0..100 {
            match self.r(regs::WAIT) {
                wait::TIMEOUT => continue,
                other => return other,
            }
        }
        wait::TIMEOUT
    }

    /// Waits until the context is idle or faulted (via a fence for the idle case).
    fn run(&mut self, ctx: u32, tables: u64, pkts: &[Packet], fence: u64) -> u32 {
        let mut all = pkts.to_vec();
        all.push(fence_pkt(SYS_VA + 0xf000, fence, false));
        self.submit(ctx, tables, &all);
        self.wait(ctx, fence as u32)
    }
}

fn fence_pkt(va: u64, value: u64, irq: bool) -> Packet {
    Packet::new(
        packet::OP_FENCE,
        if irq { packet::FENCE_IRQ } else { 0 },
        &[va, value],
    )
}

const T0: u64 = 0x40_0000; // ctx 0 tables (sysmem)
const B0: u64 = 0x20_0000; // ctx 0 buffer pages (sysmem and VRAM offsets)
const T1: u64 = 0x80_0000;
const B1: u64 = 0x30_0000;

#[test]
fn identity_registers() {
    let mut g = Gpu::new();
    assert_eq!(g.r(regs::MAGIC), regs::MAGIC_VALUE);
    assert_eq!(g.r(regs::VERSION) >> 16, u32::from(vgpu_abi::VERSION_MAJOR));
    assert_eq!(g.r(regs::NUM_CONTEXTS), 4);
    assert_eq!(g.r(regs::VRAM_SIZE_LO), VRAM as u32);
    assert_eq!(g.r(regs::KERNELS), kernel::ALL);
    assert_eq!(g.dev.read_config_register(0), 0x0001_7e55);
    assert_eq!(g.dev.read_config_register(2) >> 16, 0x0302);
    // Read-only registers ignore writes; unknown offsets read 0.
    g.w(regs::MAGIC, 0);
    g.w(regs::NUM_CONTEXTS, 99);
    assert_eq!(g.r(regs::MAGIC), regs::MAGIC_VALUE);
    assert_eq!(g.r(regs::NUM_CONTEXTS), 4);
    g.w(0xffc, 5);
    assert_eq!(g.r(0xffc), 0);
    g.w(regs::INT_MASK, 0x1234);
    assert_eq!(g.r(regs::INT_MASK), 0x1234);
    // Contexts past NUM_CONTEXTS do not exist.
    g.w(regs::ctx_reg(4, regs::CTX_RING_SIZE), 8);
    assert_eq!(g.r(regs::ctx_reg(4, regs::CTX_RING_SIZE)), 0);
    // Ts increases.
    let a = g.r(regs::TIMESTAMP_LO);
    let b = g.r(regs::TIMESTAMP_LO);
    assert!(b >= a || g.r(regs::TIMESTAMP_HI) > 0);
}

#[test]
fn copy_fill_fence_through_sysmem_and_vram() {
    copy_fill_fence(&mut Gpu::new());
}

fn copy_fill_fence(g: &mut Gpu) {
    g.setup_ctx(0, T0, B0, 16);
    g.spaces
        .sys
        .write_slice(b"hello, vgpu!", GuestAddress(B0 + 0x100))
        .unwrap();
    let done = g.run(
        0,
        T0,
        &[
            Packet::new(packet::OP_NOP, 0, &[]),
            Packet::new(packet::OP_COPY, 0, &[SYS_VA + 0x100, VRAM_VA + 0x3, 12]),
            Packet::new(
                packet::OP_FILL,
                0,
                &[SYS_VA + 0x2000, 0x1000 + 8, 0xa5a5_0001],
            ),
            Packet::new(packet::OP_COPY, 0, &[VRAM_VA + 0x3, SYS_VA + 0x3000, 12]),
            Packet::new(packet::OP_TIMESTAMP, 0, &[SYS_VA + 0xe000]),
        ],
        7,
    );
    assert_eq!(done, wait::DONE);
    let mut v = [0u8; 12];
    g.spaces.vram.read(B0 + 3, &mut v).unwrap();
    assert_eq!(&v, b"hello, vgpu!");
    g.spaces
        .sys
        .read_slice(&mut v, GuestAddress(B0 + 0x3000))
        .unwrap();
    assert_eq!(&v, b"hello, vgpu!");
    for off in [0x2000, 0x2ffc, 0x3000 + 4] {
        let w: u32 = g.spaces.sys.read_obj(GuestAddress(B0 + off)).unwrap();
        if off < 0x3000 {
            assert_eq!(w, 0xa5a5_0001);
        }
    }
    let fence: u64 = g.spaces.sys.read_obj(GuestAddress(B0 + 0xf000)).unwrap();
    assert_eq!(fence, 7);
    assert_eq!(g.cr(0, regs::CTX_FENCE_LO), 7);
    let ts: u64 = g.spaces.sys.read_obj(GuestAddress(B0 + 0xe000)).unwrap();
    assert!(ts > 0);
    assert_eq!(g.cr(0, regs::CTX_STATUS), ctx_status::ENABLED);
    assert_eq!(g.cr(0, regs::CTX_RING_HEAD), 6);
}

fn write_f32s(g: &Gpu, at: u64, v: &[f32]) {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    g.spaces.sys.write_slice(&b, GuestAddress(at)).unwrap();
}

fn read_f32s(g: &Gpu, at: u64, n: usize) -> Vec<f32> {
    let mut b = vec![0u8; n * 4];
    g.spaces.sys.read_slice(&mut b, GuestAddress(at)).unwrap();
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn every_kernel_matches_the_cpu() {
    every_kernel(&mut Gpu::new());
}

fn every_kernel(g: &mut Gpu) {
    g.setup_ctx(0, T0, B0, 64);
    // saxpy over 1000 elements: x at +0, y at +0x1000.
    let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let y: Vec<f32> = (0..1000).map(|i| 1.0 - i as f32).collect();
    write_f32s(g, B0, &x);
    write_f32s(g, B0 + 0x1000, &y);
    let a = 1.5f32;
    let d = Packet::new(
        packet::OP_DISPATCH,
        kernel::SAXPY,
        &[1000, a.to_bits() as u64, SYS_VA, SYS_VA + 0x1000],
    );
    assert_eq!(g.run(0, T0, &[d], 1), wait::DONE);
    let got = read_f32s(g, B0 + 0x1000, 1000);
    for i in 0..1000 {
        assert_eq!(
            got[i].to_bits(),
            a.mul_add(x[i], y[i]).to_bits(),
            "saxpy[{i}]"
        );
    }
    // sgemm 20x12 * 12x7.
    let (m, n, k) = (20usize, 7usize, 12usize);
    let am: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
    let bm: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.25).collect();
    write_f32s(g, B0 + 0x4000, &am);
    write_f32s(g, B0 + 0x6000, &bm);
    let d = Packet::new(
        packet::OP_DISPATCH,
        kernel::SGEMM,
        &[
            m as u64,
            n as u64,
            k as u64,
            SYS_VA + 0x4000,
            SYS_VA + 0x6000,
            SYS_VA + 0x8000,
        ],
    );
    assert_eq!(g.run(0, T0, &[d], 2), wait::DONE);
    let c = read_f32s(g, B0 + 0x8000, m * n);
    for r in 0..m {
        for col in 0..n {
            let want: f32 = (0..k).map(|p| am[r * k + p] * bm[p * n + col]).sum();
            assert!(
                (c[r * n + col] - want).abs() <= 1e-4 * want.abs().max(1.0),
                "sgemm[{r}][{col}]"
            );
        }
    }
    // reduce_sum of u32s that overflow u32.
    let vals: Vec<u32> = (0..3000u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    let b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    g.spaces
        .sys
        .write_slice(&b, GuestAddress(B0 + 0xa000))
        .unwrap();
    let d = Packet::new(
        packet::OP_DISPATCH,
        kernel::REDUCE_SUM,
        &[3000, SYS_VA + 0xa000, SYS_VA + 0xd000],
    );
    assert_eq!(g.run(0, T0, &[d], 3), wait::DONE);
    let sum: u64 = g.spaces.sys.read_obj(GuestAddress(B0 + 0xd000)).unwrap();
    assert_eq!(sum, vals.iter().map(|&v| u64::from(v)).sum::<u64>());
    // crc32 of "123456789" in VRAM.
    g.spaces.vram.write(B0 + 0x10, b"123456789").unwrap();
    let d = Packet::new(
        packet::OP_DISPATCH,
        kernel::CRC32,
        &[9, VRAM_VA + 0x10, SYS_VA + 0xd100],
    );
    assert_eq!(g.run(0, T0, &[d], 4), wait::DONE);
    let crc: u32 = g.spaces.sys.read_obj(GuestAddress(B0 + 0xd100)).unwrap();
    assert_eq!(crc, 0xcbf4_3926);
    // spin_us: 3 groups of 2 ms on 2 engines take at least 4 ms.
    let t = std::time::Instant::now();
    let d = Packet::new(packet::OP_DISPATCH, kernel::SPIN_US, &[2000, 3]);
    assert_eq!(g.run(0, T0, &[d], 5), wait::DONE);
    assert!(t.elapsed() >= std::time::Duration::from_millis(4));
}

#[test]
fn faults_stop_one_context_and_reset_recovers() {
    let mut g = Gpu::new();
    g.setup_ctx(0, T0, B0, 8);
    g.setup_ctx(1, T1, B1, 8);
    let cases: Vec<(Packet, u32, u64)> = vec![
        (
            Packet::new(packet::OP_COPY, 0, &[0x7000_0000, SYS_VA, 8]),
            fault::NOT_PRESENT,
            0x7000_0000,
        ),
        (
            Packet::new(packet::OP_FILL, 0, &[RO_VA, 8, 1]),
            fault::WRITE_PROTECT,
            RO_VA,
        ),
        (Packet::new(0x42, 0, &[]), fault::BAD_OPCODE, RING_VA),
        (
            Packet::new(packet::OP_FILL, 0, &[SYS_VA + 2, 8, 1]),
            fault::BAD_PACKET,
            RING_VA,
        ),
        (
            Packet::new(packet::OP_COPY, 0, &[1 << 48, SYS_VA, 8]),
            fault::VA_RANGE,
            1 << 48,
        ),
    ];
    for (n, (p, code, addr)) in cases.into_iter().enumerate() {
        let before = g.r(regs::FAULT_COUNT);
        g.submit(0, T0, &[p]);
        assert_eq!(g.wait(0, 1000), wait::FAULTED, "case {n}");
        assert_eq!(g.cr(0, regs::CTX_FAULT_CODE), code, "case {n}");
        let head = g.cr(0, regs::CTX_RING_HEAD);
        let want_addr = if addr == RING_VA {
            RING_VA + u64::from(head % 8) * 64
        } else {
            addr
        };
        assert_eq!(
            u64::from(g.cr(0, regs::CTX_FAULT_ADDR_LO))
                | u64::from(g.cr(0, regs::CTX_FAULT_ADDR_HI)) << 32,
            want_addr,
            "case {n}"
        );
        assert_eq!(g.r(regs::FAULT_COUNT), before + 1);
        assert_eq!(g.r(regs::FAULT_CODE), code);
        assert_ne!(g.r(regs::INT_STATUS) & int::FAULT, 0);
        assert_ne!(g.cr(0, regs::CTX_STATUS) & ctx_status::FAULTED, 0);
        // The other context keeps working.
        assert_eq!(
            g.run(1, T1, &[Packet::new(packet::OP_NOP, 0, &[])], n as u64 + 1),
            wait::DONE
        );
        // Recovery: reset and re-enable.
        g.w(regs::INT_STATUS, int::FAULT);
        g.cw(0, regs::CTX_CONTROL, ctx_control::RESET);
        assert_eq!(g.cr(0, regs::CTX_STATUS), 0);
        g.cw(0, regs::CTX_CONTROL, ctx_control::ENABLE);
        assert_eq!(
            g.run(0, T0, &[], 100 + n as u64),
            wait::DONE,
            "case {n} recovered"
        );
        g.cw(0, regs::CTX_CONTROL, ctx_control::RESET);
        g.cw(0, regs::CTX_CONTROL, ctx_control::ENABLE);
    }
    // Ring configuration faults at enable.
    g.cw(2, regs::CTX_RING_SIZE, 6);
    g.cw(2, regs::CTX_CONTROL, ctx_control::ENABLE);
    assert_eq!(g.cr(2, regs::CTX_FAULT_CODE), fault::RING_CONFIG);
}

#[test]
fn dma_domain_and_vram_bounds_are_enforced() {
    let mut g = Gpu::new();
    let mut b = g.setup_ctx(0, T0, B0, 8);
    // Leaves into the MMIO hole, past RAM, past VRAM.
    b.map(&g.spaces, 0x50_0000, 0xc000_0000 | RW, 1);
    b.map(&g.spaces, 0x50_1000, RAM | RW, 1);
    b.map(&g.spaces, 0x50_2000, VRAM | RW | pte::VRAM, 1);
    b.map(&g.spaces, 0x50_3000, (RAM - 0x1000) | RW, 1);
    g.cw(0, regs::CTX_TLB_INVALIDATE, 1);
    let canary = [0x5au8; 64];
    g.spaces
        .sys
        .write_slice(&canary, GuestAddress(RAM - 64))
        .unwrap();
    for (va, code) in [
        (0x50_0000u64, fault::DMA_DOMAIN),
        (0x50_1000, fault::DMA_DOMAIN),
        (0x50_2000, fault::VRAM_RANGE),
    ] {
        g.submit(0, T0, &[Packet::new(packet::OP_FILL, 0, &[va, 16, 0])]);
        assert_eq!(g.wait(0, 1000), wait::FAULTED);
        assert_eq!(g.cr(0, regs::CTX_FAULT_CODE), code);
        g.cw(0, regs::CTX_CONTROL, ctx_control::RESET);
        g.cw(0, regs::CTX_CONTROL, ctx_control::ENABLE);
    }
    // A copy running off the end of RAM faults before writing anything.
    g.submit(
        0,
        T0,
        &[Packet::new(packet::OP_FILL, 0, &[0x50_3fc0, 0x80, 0])],
    );
    assert_eq!(g.wait(0, 1000), wait::FAULTED);
    assert_eq!(
        g.cr(0, regs::CTX_FAULT_CODE),
        fault::NOT_PRESENT,
        "0x504000 is unmapped"
    );
    let mut after = [0u8; 64];
    g.spaces
        .sys
        .read_slice(&mut after, GuestAddress(RAM - 64))
        .unwrap();
    assert_eq!(after, canary, "no partial write before the fault");
}

#[test]
fn contexts_are_isolated() {
    let mut g = Gpu::new();
    g.setup_ctx(0, T0, B0, 8);
    g.setup_ctx(1, T1, B1, 8);
    g.spaces
        .sys
        .write_slice(b"ctx0-secret", GuestAddress(B0))
        .unwrap();
    // The same VA in ctx 1 maps ctx 1's own buffer, never ctx 0's.
    assert_eq!(
        g.run(
            1,
            T1,
            &[Packet::new(
                packet::OP_COPY,
                0,
                &[SYS_VA, SYS_VA + 0x100, 11]
            )],
            1
        ),
        wait::DONE
    );
    let mut b = [0u8; 11];
    g.spaces
        .sys
        .read_slice(&mut b, GuestAddress(B1 + 0x100))
        .unwrap();
    assert_ne!(&b, b"ctx0-secret");
    // ctx 0's tables are not mapped in ctx 1.
    g.submit(1, T1, &[Packet::new(packet::OP_COPY, 0, &[T0, SYS_VA, 8])]);
    assert_eq!(g.wait(1, 1000), wait::FAULTED);
}

#[test]
fn ring_wraps_around() {
    let mut g = Gpu::new();
    g.setup_ctx(0, T0, B0, 4);
    for round in 0..10u64 {
        let done = g.run(
            0,
            T0,
            &[
                Packet::new(packet::OP_FILL, 0, &[SYS_VA + round * 4, 4, round + 1]),
                Packet::new(packet::OP_NOP, 0, &[]),
            ],
            round + 1,
        );
        assert_eq!(done, wait::DONE);
    }
    assert_eq!(g.cr(0, regs::CTX_RING_HEAD), 30);
    for round in 0..10u64 {
        let v: u32 = g.spaces.sys.read_obj(GuestAddress(B0 + round * 4)).unwrap();
        assert_eq!(v, round as u32 + 1);
    }
}

fn enable_msix(g: &mut Gpu, vectors: &[(u16, u32)]) {
    // Find the MSI-X capability via the capability pointer.
    let cap = (g.dev.read_config_register(13) & 0xff) as usize;
    assert_eq!(g.dev.read_config_register(cap / 4) & 0xff, 0x11);
    for &(v, data) in vectors {
        let e = pci::MSIX_TABLE_OFFSET + u64::from(v) * 16;
        g.w(e, 0xfee0_0000);
        g.w(e + 8, data);
        g.w(e + 12, 0);
    }
    g.dev
        .write_config_register(cap / 4, 2, &0x8000u16.to_le_bytes());
}

#[test]
fn fence_and_fault_interrupts_with_masking() {
    let mut g = Gpu::new();
    g.setup_ctx(0, T0, B0, 8);
    enable_msix(&mut g, &[(3, 0x43), (5, 0x45)]);
    g.cw(0, regs::CTX_IRQ_VECTOR, 3);
    g.w(regs::FAULT_VECTOR, 5);
    g.submit(0, T0, &[fence_pkt(SYS_VA, 1, true)]);
    assert_eq!(g.wait(0, 1), wait::DONE);
    assert_eq!(g.msis.0.lock().unwrap().as_slice(), &[(0xfee0_0000, 0x43)]);
    assert_ne!(g.r(regs::INT_STATUS) & int::fence(0), 0);
    g.w(regs::INT_STATUS, int::fence(0));
    assert_eq!(g.r(regs::INT_STATUS), 0);
    // INT_MASK: status latches, no message.
    g.w(regs::INT_MASK, int::fence(0));
    g.submit(0, T0, &[fence_pkt(SYS_VA, 2, true)]);
    assert_eq!(g.wait(0, 2), wait::DONE);
    assert_eq!(g.msis.0.lock().unwrap().len(), 1);
    assert_ne!(g.r(regs::INT_STATUS) & int::fence(0), 0);
    g.w(regs::INT_MASK, 0);
    // MSI-X entry mask: pending bit, delivered on unmask.
    g.w(pci::MSIX_TABLE_OFFSET + 3 * 16 + 12, 1);
    g.submit(0, T0, &[fence_pkt(SYS_VA, 3, true)]);
    assert_eq!(g.wait(0, 3), wait::DONE);
    assert_eq!(g.msis.0.lock().unwrap().len(), 1);
    assert_eq!(g.r(pci::MSIX_PBA_OFFSET) & (1 << 3), 1 << 3);
    g.w(pci::MSIX_TABLE_OFFSET + 3 * 16 + 12, 0);
    assert_eq!(g.msis.0.lock().unwrap().len(), 2);
    assert_eq!(g.r(pci::MSIX_PBA_OFFSET), 0);
    // Fault vector.
    g.submit(0, T0, &[Packet::new(0x99, 0, &[])]);
    assert_eq!(g.wait(0, 4), wait::FAULTED);
    assert_eq!(g.msis.0.lock().unwrap().last(), Some(&(0xfee0_0000, 0x45)));
}

/// The doorbell eventfds a vfio-user client hands over stay its files: it may read them too.
/// The vGPU never reads them (a read could block for good if the client drained the counter
/// first), so every ring is served and the client finds its counter as it left it.
#[test]
fn a_clients_doorbell_eventfds_are_never_read() {
    let mut g = Gpu::new();
    g.setup_ctx(0, T0, B0, 8);
    g.cw(0, regs::CTX_TAIL_ADDR_LO, (SYS_VA + 0xc000) as u32);
    let client = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let raw = std::os::fd::IntoRawFd::into_raw_fd(client.try_clone().unwrap());
    // SAFETY: `raw` was just released by the EventFd and is owned by nothing else.
    let handed = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    g.dev.set_doorbell_fds(vec![handed]).unwrap();
    let ring = Gpu::ring_pa(T0);
    const RINGS: u32 = 100;
    for v in 1..=RINGS {
        let slot = u64::from((v - 1) % 8) * packet::PACKET_SIZE;
        g.spaces
            .sys
            .write_slice(
                &fence_pkt(SYS_VA, v.into(), false).to_bytes(),
                GuestAddress(ring + slot),
            )
            .unwrap();
        g.spaces
            .sys
            .write_obj(v, GuestAddress(B0 + 0xc000))
            .unwrap();
        client.write(1).unwrap();
        assert_eq!(g.wait(0, v), wait::DONE, "ring {v}");
    }
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&client),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let readable = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert_eq!(readable, 1, "the vGPU read the doorbells");
    assert_eq!(client.read().unwrap(), u64::from(RINGS));
}

#[test]
fn tail_shadow_doorbell_and_polling() {
    let mut g = Gpu::new();
    g.setup_ctx(0, T0, B0, 8);
    g.cw(0, regs::CTX_TAIL_ADDR_LO, (SYS_VA + 0xc000) as u32);
    // Write packets without touching CTX_RING_TAIL; publish the tail in memory.
    let ring = Gpu::ring_pa(T0);
    g.spaces
        .sys
        .write_slice(&fence_pkt(SYS_VA, 11, false).to_bytes(), GuestAddress(ring))
        .unwrap();
    g.spaces
        .sys
        .write_obj(1u32, GuestAddress(B0 + 0xc000))
        .unwrap();
    // Nothing happens until the doorbell (an ioeventfd in a VMM).
    g.dev.doorbell_eventfd(0).unwrap().write(1).unwrap();
    assert_eq!(g.wait(0, 11), wait::DONE);
    assert_eq!(g.cr(0, regs::CTX_RING_TAIL), 1);
    // MMIO doorbell write.
    g.spaces
        .sys
        .write_slice(
            &fence_pkt(SYS_VA, 12, false).to_bytes(),
            GuestAddress(ring + 64),
        )
        .unwrap();
    g.spaces
        .sys
        .write_obj(2u32, GuestAddress(B0 + 0xc000))
        .unwrap();
    g.w(regs::doorbell(0), 0);
    assert_eq!(g.wait(0, 12), wait::DONE);
    // Polling: no doorbell at all.
    g.cw(
        0,
        regs::CTX_CONTROL,
        ctx_control::ENABLE | ctx_control::POLL,
    );
    g.spaces
        .sys
        .write_slice(
            &fence_pkt(SYS_VA, 13, false).to_bytes(),
            GuestAddress(ring + 128),
        )
        .unwrap();
    g.spaces
        .sys
        .write_obj(3u32, GuestAddress(B0 + 0xc000))
        .unwrap();
    assert_eq!(g.wait(0, 13), wait::DONE);
}

#[test]
fn function_reset_returns_to_power_on() {
    let mut g = Gpu::new();
    g.setup_ctx(0, T0, B0, 8);
    g.spaces.vram.write(0, &[0xee; 4096]).unwrap();
    g.w(regs::INT_MASK, 0xffff);
    assert_eq!(
        g.run(
            0,
            T0,
            &[Packet::new(
                packet::OP_DISPATCH,
                kernel::SPIN_US,
                &[1000, 1]
            )],
            9
        ),
        wait::DONE
    );
    // A long job is cut short by the reset.
    g.submit(
        0,
        T0,
        &[Packet::new(
            packet::OP_DISPATCH,
            kernel::SPIN_US,
            &[1_000_000, 64],
        )],
    );
    let t = std::time::Instant::now();
    g.w(regs::RESET, regs::RESET_VALUE);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "reset waited {:?}",
        t.elapsed()
    );
    assert_eq!(g.r(regs::STATUS), vgpu_abi::status::READY);
    assert_eq!(g.r(regs::INT_MASK), 0);
    assert_eq!(g.cr(0, regs::CTX_STATUS), 0);
    assert_eq!(g.cr(0, regs::CTX_FENCE_LO), 0);
    assert_eq!(g.cr(0, regs::CTX_RING_SIZE), 0);
    let mut v = [0u8; 4096];
    g.spaces.vram.read(0, &mut v).unwrap();
    assert!(v.iter().all(|&b| b == 0), "VRAM scrubbed");
    // Usable again.
    g.setup_ctx(0, T0, B0, 8);
    assert_eq!(g.run(0, T0, &[], 1), wait::DONE);
    // Other reset values do nothing.
    g.w(regs::RESET, 1);
    assert_eq!(g.cr(0, regs::CTX_FENCE_LO), 1);
}

/// A hostile guest: random register writes, random page tables, random packets. The device
/// must not panic or hang, and must keep serving reads.
#[test]
fn garbage_never_panics() {
    let mut g = Gpu::new();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..3 {
        g.setup_ctx(0, T0, B0, 8);
        // Random ring contents and page-table garbage.
        for i in 0..8u64 {
            let mut p = Packet::from_bytes(&[0; 64]);
            p.opcode = (rnd() % 8) as u32;
            p.flags = (rnd() % 7) as u32;
            for a in p.args.iter_mut() {
                *a = match rnd() % 4 {
                    0 => rnd(),
                    1 => SYS_VA + rnd() % 0x10000,
                    2 => rnd() % 64,
                    _ => 0,
                };
            }
            g.spaces
                .sys
                .write_slice(&p.to_bytes(), GuestAddress(Gpu::ring_pa(T0) + i * 64))
                .unwrap();
        }
        for _ in 0..32 {
            let at = T0 + rnd() % 0x6000;
            g.spaces
                .sys
                .write_obj(rnd(), GuestAddress(at & !7))
                .unwrap();
        }
        g.cw(0, regs::CTX_RING_TAIL, 8);
        for _ in 0..2000 {
            let off = (rnd() % 0x6000) & !3;
            if off == regs::RESET || off == regs::WAIT {
                continue;
            }
            g.w(off, rnd() as u32);
            let _ = g.r((rnd() % 0x6000) & !3);
        }
        g.w(regs::RESET, regs::RESET_VALUE);
    }
    assert_eq!(g.r(regs::MAGIC), regs::MAGIC_VALUE);
}

#[test]
fn dma_mapping_can_change_between_packets() {
    let mut g = Gpu::new();
    g.setup_ctx(0, T0, B0, 8);
    let copy = Packet::new(packet::OP_COPY, 0, &[SYS_VA, SYS_VA + 0x100, 8]);
    assert_eq!(g.run(0, T0, &[copy], 1), wait::DONE);
    // The client unmaps everything from B0 up (buffers and page tables).
    g.dev
        .set_dma(g.spaces.sys.clone(), DmaDomain::new([(0, B0)]))
        .unwrap();
    g.submit(0, T0, &[copy]);
    assert_eq!(g.wait(0, 2), wait::FAULTED);
    assert_eq!(g.cr(0, regs::CTX_FAULT_CODE), fault::DMA_DOMAIN);
    // Mapped again: the context recovers.
    g.dev
        .set_dma(g.spaces.sys.clone(), DmaDomain::new([(0, RAM)]))
        .unwrap();
    g.cw(0, regs::CTX_CONTROL, ctx_control::RESET);
    g.cw(0, regs::CTX_CONTROL, ctx_control::ENABLE);
    assert_eq!(g.run(0, T0, &[copy], 3), wait::DONE);
}

mod seam;
mod state;
