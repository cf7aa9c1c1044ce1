//! The backend seam, proven with a second backend.

use super::*;

/// The backend seam: every command on a backend that runs groups on the calling thread and
/// keeps VRAM behind a trapped aperture. The device reaches that VRAM only through the
/// backend, hands it only operations whose addresses it checked, and imports and releases
/// guest RAM as the DMA domain changes.
#[test]
fn another_backend_runs_every_command_through_the_seam() {
    use crate::backend::inline::{Calls, InlineGpu};
    let inline = Arc::new(InlineGpu::new(VRAM));
    copy_fill_fence(&mut Gpu::on(inline.clone()));
    every_kernel(&mut Gpu::on(inline.clone()));
    let c = inline.calls();
    assert_eq!(Calls::get(&c.alloc_vram), 2);
    let prepared = Calls::get(&c.prepare);
    assert!(prepared >= 3, "{prepared} operations");
    assert_eq!(Calls::get(&c.finish), prepared, "every operation completed");
    assert!(Calls::get(&c.groups) >= prepared);
    assert!(Calls::get(&c.vram_accesses) > 0);

    let mut g = Gpu::on(inline.clone());
    // The aperture is trapped: no host mapping for the VMM, accesses go to the backend, and
    // the guest can read so.
    assert!(g.dev.bar_memory(pci::BAR_VRAM).is_none());
    assert_ne!(g.r(regs::CAPS) & vgpu_abi::caps::VRAM_TRAPPED, 0);
    assert_eq!(
        Gpu::new().r(regs::CAPS) & vgpu_abi::caps::VRAM_TRAPPED,
        0,
        "the software GPU maps its aperture"
    );
    g.dev.write_bar(pci::BAR_VRAM, 0x40, &[1, 2, 3, 4]);
    let mut w = [0u8; 4];
    g.spaces.vram.read(0x40, &mut w).unwrap();
    assert_eq!(w, [1, 2, 3, 4]);
    g.dev.read_bar(pci::BAR_VRAM, 0x40, &mut w);
    assert_eq!(w, [1, 2, 3, 4]);
    // Past the aperture: nothing written, all zeros read, no panic.
    g.dev.write_bar(pci::BAR_VRAM, VRAM - 2, &[9; 4]);
    g.dev.read_bar(pci::BAR_VRAM, VRAM - 2, &mut w);
    assert_eq!(w, [0; 4]);

    // An operation with an address outside the domain faults above the seam: the backend
    // never sees it.
    g.setup_ctx(0, T0, B0, 8);
    let before = Calls::get(&c.prepare);
    let outside = Packet::new(packet::OP_COPY, 0, &[SYS_VA, 0x7000_0000, 8]);
    g.submit(0, T0, &[outside]);
    assert_eq!(g.wait(0, 1), wait::FAULTED);
    assert_eq!(Calls::get(&c.prepare), before);

    // A new domain is imported; the old import is released once no packet uses it.
    let (imported, released) = (Calls::get(&c.import_domain), Calls::get(&c.released));
    g.dev
        .set_dma(g.spaces.sys.clone(), DmaDomain::new([(0, RAM)]))
        .unwrap();
    assert_eq!(Calls::get(&c.import_domain), imported + 1);
    g.cw(0, regs::CTX_CONTROL, ctx_control::RESET);
    g.cw(0, regs::CTX_CONTROL, ctx_control::ENABLE);
    let copy = Packet::new(packet::OP_COPY, 0, &[SYS_VA, SYS_VA + 0x100, 8]);
    assert_eq!(g.run(0, T0, &[copy], 2), wait::DONE);
    assert_eq!(Calls::get(&c.released), released + 1);
}

/// COPY, FILL, FENCE and TIMESTAMP through the Vulkan backend (lavapipe in CI): guest RAM and
/// VRAM imported into the vGPU's own Vulkan device, copies and fills recorded as commands.
#[test]
fn vulkan_runs_copies_and_fills() {
    let _alone = measuring_alone();
    let Some(vk) = crate::backend::vulkan::tests::gpu(VRAM) else {
        return;
    };
    let mut g = Gpu::on(Arc::new(vk));
    copy_fill_fence(&mut g);
    // A copy across many pages in both directions, and one larger than a group.
    g.setup_ctx(1, T1, B1, 8);
    let data: Vec<u8> = (0..0x8000u32).map(|i| (i * 7 + 3) as u8).collect();
    g.spaces.sys.write_slice(&data, GuestAddress(B1)).unwrap();
    let pkts = [
        Packet::new(packet::OP_COPY, 0, &[SYS_VA, VRAM_VA + 0x8000, 0x8000]),
        Packet::new(packet::OP_FILL, 0, &[SYS_VA, 0x8000, 0x5a5a_5a5a]),
        Packet::new(packet::OP_COPY, 0, &[VRAM_VA + 0x8000, SYS_VA + 4, 0x7ff0]),
    ];
    assert_eq!(g.run(1, T1, &pkts, 5), wait::DONE);
    let mut back = vec![0u8; 0x8000];
    g.spaces
        .sys
        .read_slice(&mut back, GuestAddress(B1))
        .unwrap();
    assert_eq!(&back[..4], &[0x5a; 4]);
    assert_eq!(&back[4..0x7ff4], &data[..0x7ff0]);
}

/// Every built-in kernel as a Vulkan compute shader gives the software GPU's results (bit-exact:
/// integers, and floats through the same fused multiply-adds in the same order).
#[test]
fn vulkan_runs_every_kernel_like_the_cpu() {
    let _alone = measuring_alone();
    let Some(vk) = crate::backend::vulkan::tests::gpu(VRAM) else {
        return;
    };
    every_kernel(&mut Gpu::on(Arc::new(vk)));
}

/// Kernels after larger ones run on the staging buffers those gave back (a device keeps them,
/// `backend/vulkan/staging.rs`), with the larger kernels' data still in them: each reads only
/// its own operands and writes back only its own outputs.
#[test]
fn vulkan_kernels_on_kept_staging_touch_only_their_operands() {
    let _alone = measuring_alone();
    let Some(vk) = crate::backend::vulkan::tests::gpu(VRAM) else {
        return;
    };
    let mut g = Gpu::on(Arc::new(vk));
    g.setup_ctx(0, T0, B0, 16);
    let saxpy = |n: u64, a: f32| {
        Packet::new(
            packet::OP_DISPATCH,
            kernel::SAXPY,
            &[n, u64::from(a.to_bits()), SYS_VA, SYS_VA + 0x8000],
        )
    };
    // (The fence is at +0xf000.) A large SAXPY leaves its x and y in two staging buffers.
    let x: Vec<f32> = (0..7000).map(|i| i as f32).collect();
    let y: Vec<f32> = (0..7000).map(|i| -(i as f32) * 0.25).collect();
    write_f32s(&g, B0, &x);
    write_f32s(&g, B0 + 0x8000, &y);
    assert_eq!(g.run(0, T0, &[saxpy(7000, 2.0)], 1), wait::DONE);
    let big = read_f32s(&g, B0 + 0x8000, 7000);
    assert!((0..7000).all(|i| big[i].to_bits() == 2.0f32.mul_add(x[i], y[i]).to_bits()));
    // A small one on the same buffers: its 100 results, and nothing past them.
    let x2: Vec<f32> = (0..100).map(|i| 0.5 + i as f32).collect();
    let y2: Vec<f32> = (0..100).map(|i| 3.0 - i as f32).collect();
    write_f32s(&g, B0, &x2);
    write_f32s(&g, B0 + 0x8000, &y2);
    assert_eq!(g.run(0, T0, &[saxpy(100, -1.5)], 2), wait::DONE);
    let after = read_f32s(&g, B0 + 0x8000, 7000);
    for i in 0..100 {
        assert_eq!(
            after[i].to_bits(),
            (-1.5f32).mul_add(x2[i], y2[i]).to_bits()
        );
    }
    assert_eq!(&after[100..], &big[100..], "written past the operand");
    // A REDUCE_SUM and a CRC-32 of a few bytes on buffers full of the SAXPY's data.
    let d = Packet::new(
        packet::OP_DISPATCH,
        kernel::REDUCE_SUM,
        &[7, SYS_VA + 0x8000, SYS_VA + 0xfe00],
    );
    assert_eq!(g.run(0, T0, &[d], 3), wait::DONE);
    let sum: u64 = g.spaces.sys.read_obj(GuestAddress(B0 + 0xfe00)).unwrap();
    let want: u64 = after[..7].iter().map(|f| u64::from(f.to_bits())).sum();
    assert_eq!(sum, want);
    g.spaces
        .sys
        .write_slice(b"123456789", GuestAddress(B0 + 0x10))
        .unwrap();
    let d = Packet::new(
        packet::OP_DISPATCH,
        kernel::CRC32,
        &[9, SYS_VA + 0x10, SYS_VA + 0xfe10],
    );
    assert_eq!(g.run(0, T0, &[d], 4), wait::DONE);
    let crc: u32 = g.spaces.sys.read_obj(GuestAddress(B0 + 0xfe10)).unwrap();
    assert_eq!(crc, 0xcbf4_3926);
}

/// The Vulkan backend and the software GPU agree on every kernel over inputs of many groups
/// (random floats through SAXPY and SGEMM, overflowing sums, a CRC over several 1 MiB groups,
/// operands in 2 MiB pages of guest RAM). Integers are bit-exact. Floats: Vulkan does not
/// promise a fused `fma` (lavapipe multiplies and adds with two roundings), so a result may
/// differ from the software GPU's fused one by the rounding of each product and of each sum:
/// the tolerance asserted here is |vulkan − soft| ≤ 2·2⁻²³·(|a·x| + |y'|) for SAXPY and
/// ≤ 2k·2⁻²³·Σ|aᵢ·bᵢ| for each SGEMM element (the classic bound for a k-term dot product,
/// doubled for the two results compared). On a device whose `fma` is fused they are equal.
#[test]
fn vulkan_and_soft_agree() {
    let _alone = measuring_alone();
    let Some(vk) = crate::backend::vulkan::tests::gpu(VRAM) else {
        return;
    };
    const BIG_VA: u64 = 0x4000_0000;
    const BIG_PA: u64 = 0xa0_0000;
    const BIG: u64 = 4 << 20;
    // A deterministic generator (xorshift), so both runs see the same inputs.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let input: Vec<u8> = (0..BIG).map(|_| next() as u8).collect();
    // Finite floats of either sign in [2^-9, 2^11): exponents from the random input.
    let floats = |n: u64, at: u64| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let r = u32::from_le_bytes(input[(at + i * 4) as usize..][..4].try_into().unwrap());
                f32::from_bits((r & 0x807f_ffff) | ((118 + (r >> 23) % 20) << 23))
            })
            .collect()
    };
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|f| f.to_le_bytes()).collect() };
    let n = kernel::SAXPY_GROUP * 7 / 2;
    let (m, nn, k) = (37u64, 29u64, 41u64);
    let (xs, ys) = (floats(n, 0), floats(n, 0x1000));
    let (am, bm) = (floats(m * k, 0x2000), floats(k * nn, 0x3000));
    let a = 1.7f32;
    let (sx, sy, ga, gb, gc) = (0u64, 0x4_0000u64, 0x8_0000u64, 0x9_0000u64, 0xa_0000u64);
    let run = |backend: Arc<dyn GpuBackend>| -> (Vec<f32>, Vec<f32>, u64, u32) {
        let mut g = Gpu::on(backend);
        let mut b = g.setup_ctx(0, T0, B0, 64);
        for h in 0..BIG / (2 << 20) {
            b.map(
                &g.spaces,
                BIG_VA + h * (2 << 20),
                (BIG_PA + h * (2 << 20)) | RW | pte::HUGE,
                2,
            );
        }
        let w = |at: u64, data: &[u8]| {
            g.spaces
                .sys
                .write_slice(data, GuestAddress(BIG_PA + at))
                .unwrap()
        };
        w(0, &input);
        w(sx, &bytes(&xs));
        w(sy, &bytes(&ys));
        w(ga, &bytes(&am));
        w(gb, &bytes(&bm));
        // SAXPY over 3.5 groups; SGEMM 37×29×41 (3 groups of rows); REDUCE over 2.5 groups
        // and CRC-32 over 2.5 MiB (3 groups) of the random bytes past the first MiB (which
        // the float kernels do not touch).
        let rn = kernel::REDUCE_GROUP * 5 / 2;
        let pkts = [
            Packet::new(
                packet::OP_DISPATCH,
                kernel::SAXPY,
                &[n, a.to_bits().into(), BIG_VA + sx, BIG_VA + sy],
            ),
            Packet::new(
                packet::OP_DISPATCH,
                kernel::SGEMM,
                &[m, nn, k, BIG_VA + ga, BIG_VA + gb, BIG_VA + gc],
            ),
            Packet::new(
                packet::OP_DISPATCH,
                kernel::REDUCE_SUM,
                &[rn, BIG_VA + 0x10_0000, SYS_VA],
            ),
            Packet::new(
                packet::OP_DISPATCH,
                kernel::CRC32,
                &[(5 << 20) / 2, BIG_VA + 0x10_0000, SYS_VA + 8],
            ),
        ];
        assert_eq!(g.run(0, T0, &pkts, 9), wait::DONE);
        let r = |at: u64, n: u64| read_f32s(&g, BIG_PA + at, n as usize);
        let sum: u64 = g.spaces.sys.read_obj(GuestAddress(B0)).unwrap();
        let crc: u32 = g.spaces.sys.read_obj(GuestAddress(B0 + 8)).unwrap();
        (r(sy, n), r(gc, m * nn), sum, crc)
    };
    let soft = run(Arc::new(SoftGpu::new(VRAM, 2).unwrap()));
    let vulkan = run(Arc::new(vk));
    assert_eq!(vulkan.2, soft.2, "REDUCE_SUM");
    let want = crc32fast::hash(&input[0x10_0000..0x10_0000 + (5 << 20) / 2]);
    assert_eq!((soft.3, vulkan.3), (want, want), "CRC32 (soft, vulkan)");
    let eps = f32::EPSILON;
    for (i, ((&s, &v), &x)) in soft.0.iter().zip(&vulkan.0).zip(&xs).enumerate() {
        let bound = 2.0 * eps * ((a * x).abs() + s.abs());
        assert!(
            (s - v).abs() <= bound,
            "saxpy[{i}]: soft {s:e}, vulkan {v:e}"
        );
    }
    for r in 0..m as usize {
        for c in 0..nn as usize {
            let mag: f32 = (0..k as usize)
                .map(|p| (am[r * k as usize + p] * bm[p * nn as usize + c]).abs())
                .sum();
            let (s, v) = (soft.1[r * nn as usize + c], vulkan.1[r * nn as usize + c]);
            assert!(
                (s - v).abs() <= 2.0 * k as f32 * eps * mag,
                "sgemm[{r}][{c}]: soft {s:e}, vulkan {v:e}"
            );
        }
    }
}

/// A lost Vulkan device costs its vGPU the work in flight and nothing else: the packet faults
/// `TIMEOUT`, the watchdog's reset gives the vGPU a new device, a neighbour on the same GPU
/// (its own device) goes on meanwhile, and the vGPU works again after the reset.
#[test]
fn a_lost_vulkan_device_resets_its_vgpu_alone() {
    let _alone = measuring_alone();
    let Some(vk) = crate::backend::vulkan::tests::gpu(VRAM) else {
        return;
    };
    let vk = Arc::new(vk);
    let (mut a, mut b) = (Gpu::on(vk.clone()), Gpu::on(vk));
    let copy = Packet::new(packet::OP_COPY, 0, &[SYS_VA, SYS_VA + 0x100, 8]);
    for g in [&mut a, &mut b] {
        g.setup_ctx(0, T0, B0, 8);
        assert_eq!(g.run(0, T0, &[copy], 1), wait::DONE);
    }
    crate::backend::vulkan::lose_device(&*a.spaces.vram);
    a.submit(0, T0, &[copy]);
    assert_ne!(a.wait(0, 2), wait::DONE);
    assert_eq!(a.r(regs::FAULT_CODE), fault::TIMEOUT);
    // The neighbour never noticed.
    assert_eq!(b.run(0, T0, &[copy], 2), wait::DONE);
    // After the reset (and the context's own, which clears its fault) the vGPU runs on its
    // new device.
    a.cw(0, regs::CTX_CONTROL, ctx_control::RESET);
    a.setup_ctx(0, T0, B0, 8);
    assert_eq!(a.run(0, T0, &[copy], 1), wait::DONE);
    assert_eq!(b.run(0, T0, &[copy], 3), wait::DONE);
}

/// VRAM in the device's own memory (a discrete GPU's way): the aperture traps and says so in
/// `CAPS`, guest accesses to it still reach VRAM, and every command runs as with host VRAM.
#[test]
fn vulkan_device_local_vram_traps_and_runs_every_command() {
    let _alone = measuring_alone();
    let Some(vk) = crate::backend::vulkan::tests::gpu(VRAM) else {
        return;
    };
    let vk = Arc::new(vk.device_local());
    let mut g = Gpu::on(vk.clone());
    assert!(g.dev.bar_memory(pci::BAR_VRAM).is_none());
    assert_ne!(g.r(regs::CAPS) & vgpu_abi::caps::VRAM_TRAPPED, 0);
    g.dev.write_bar(pci::BAR_VRAM, 0x1234, &[5, 6, 7, 8]);
    let mut w = [0u8; 4];
    g.dev.read_bar(pci::BAR_VRAM, 0x1234, &mut w);
    assert_eq!(w, [5, 6, 7, 8]);
    copy_fill_fence(&mut Gpu::on(vk.clone()));
    every_kernel(&mut Gpu::on(vk.clone()));
    // The same where the host cannot map the device's memory: each access is a copy through
    // a staging buffer.
    use std::sync::atomic::Ordering;
    crate::backend::vulkan::UNMAPPED_VRAM.store(true, Ordering::Relaxed);
    let mut g = Gpu::on(vk.clone());
    g.dev.write_bar(pci::BAR_VRAM, 0x2345, &[1, 2, 3]);
    let mut w = [0u8; 3];
    g.dev.read_bar(pci::BAR_VRAM, 0x2345, &mut w);
    let unmapped = (
        w,
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            copy_fill_fence(&mut g);
            every_kernel(&mut Gpu::on(vk));
        })),
    );
    crate::backend::vulkan::UNMAPPED_VRAM.store(false, Ordering::Relaxed);
    assert_eq!(unmapped.0, [1, 2, 3]);
    assert!(unmapped.1.is_ok(), "commands with unmapped device VRAM");
}
