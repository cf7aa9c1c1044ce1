//! Canaries: a guest aims page-table entries, COPY, FILL, fences and kernels at every place it
//! must not reach (host memory beside and above its RAM, the other vGPU's VRAM, another VM's
//! RAM, another context's buffer); every bad access must produce its documented fault code and
//! address, and every canary must survive, alone and in random sequences.

mod isolation;

use proptest::prelude::*;
use vgpu_abi::wait;
use vgpu_abi::{Packet, fault, kernel, limits, packet};

use isolation::*;

#[test]
fn every_forbidden_place_faults_with_its_code_and_no_canary_changes() {
    forbidden_places(vgpu::physical::GpuKind::Soft);
}

/// The same on a Vulkan GPU (lavapipe in CI): each vGPU its own device, guest RAM and VRAM
/// imported; the neighbour's VRAM, host memory and other contexts stay untouched.
#[test]
fn every_forbidden_place_faults_on_a_vulkan_gpu_too() {
    if tessera_tests::vulkan_available() {
        forbidden_places(vgpu::physical::GpuKind::vulkan());
    }
}

fn forbidden_places(kind: vgpu::physical::GpuKind) {
    let mut p = Pair::on(kind, vgpu::device::DEFAULT_WATCHDOG);
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
