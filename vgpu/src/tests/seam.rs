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
    // The aperture is trapped: no host mapping for the VMM, accesses go to the backend.
    assert!(g.dev.bar_memory(pci::BAR_VRAM).is_none());
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
