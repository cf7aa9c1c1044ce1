//! The PCI boundary without a device-wide lock: a vCPU blocked in a vGPU's `WAIT` read holds
//! up neither configuration accesses (to any slot) nor other accesses to that vGPU or to
//! another one. Two threads stand in for two vCPUs and go through the same buses a VMM's
//! exits use (conf1 on the port bus, BAR 0 on the MMIO bus).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use devices::pci::{HostBridge, PciRoot};
use devices::{Bus, BusDevice};
use vgpu::physical::{GpuSpec, PhysicalGpu};
use vgpu::profile::Profile;
use vgpu::{BarAddresses, Vgpu, VgpuSetup};
use vgpu_abi::{ctx_control, limits, regs, wait};

const CONF1: u64 = 0xcf8;
const REGS: [u64; 2] = [0xc000_0000, 0xc100_0000];
const VRAM_BARS: [u64; 2] = [1 << 36, (1 << 36) + (4 << 20)];

fn conf1_read(pio: &Bus, slot: u32, reg: u32) -> u32 {
    let addr = 0x8000_0000u32 | slot << 11 | reg << 2;
    pio.write(CONF1, &addr.to_le_bytes())
        .expect("conf1 address");
    let mut d = [0u8; 4];
    pio.read(CONF1 + 4, &mut d).expect("conf1 data");
    u32::from_le_bytes(d)
}

fn conf1_write(pio: &Bus, slot: u32, reg: u32, v: u32) {
    let addr = 0x8000_0000u32 | slot << 11 | reg << 2;
    pio.write(CONF1, &addr.to_le_bytes())
        .expect("conf1 address");
    pio.write(CONF1 + 4, &v.to_le_bytes()).expect("conf1 data");
}

fn mmio_read(mmio: &Bus, addr: u64) -> u32 {
    let mut d = [0u8; 4];
    mmio.read(addr, &mut d).expect("BAR 0 read");
    u32::from_le_bytes(d)
}

fn mmio_write(mmio: &Bus, addr: u64, v: u32) {
    mmio.write(addr, &v.to_le_bytes()).expect("BAR 0 write");
}

#[test]
fn a_vcpu_in_wait_holds_up_no_other_access() {
    let gpu = PhysicalGpu::new(&GpuSpec::whole(8 << 20, 1)).expect("GPU");
    let profile = Profile {
        name: "4M",
        vram: 4 << 20,
        contexts: 2,
        engines: 1,
    };
    let mmio = Arc::new(Bus::new());
    let mut root = PciRoot::new(
        mmio.clone(),
        vec![(0xc000_0000, 0x1000_0000), (1 << 36, 1 << 36)],
    );
    root.add_device(0, Arc::new(Mutex::new(HostBridge::new())))
        .expect("host bridge");
    let mut keep = Vec::new();
    for (i, (regs_bar, vram_bar)) in REGS.iter().zip(VRAM_BARS).enumerate() {
        let lease = gpu.lease(&profile, None).expect("lease");
        let dev = Vgpu::new(VgpuSetup {
            bars: BarAddresses {
                regs: *regs_bar,
                vram: vram_bar,
            },
            ..VgpuSetup::from_lease(&lease)
        })
        .expect("vGPU");
        root.add_device_sync(1 + i as u8, Arc::new(dev))
            .expect("slot");
        keep.push(lease);
    }
    let root: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(root));
    let pio = Arc::new(Bus::new());
    pio.insert(&root, CONF1, 8).expect("conf1");
    for slot in [1, 2] {
        // Memory decoding on: the BARs appear on the MMIO bus.
        conf1_write(&pio, slot, 1, 0x2);
    }
    assert_eq!(mmio_read(&mmio, REGS[0] + regs::MAGIC), regs::MAGIC_VALUE);

    // vGPU 1, context 0: enabled with an empty ring, so its fence never reaches 1 and a WAIT
    // read blocks for the whole WAIT timeout.
    let ctx = |reg| REGS[0] + regs::ctx_reg(0, reg);
    mmio_write(&mmio, ctx(regs::CTX_RING_BASE_LO), 0x1000);
    mmio_write(&mmio, ctx(regs::CTX_RING_SIZE), 16);
    mmio_write(&mmio, ctx(regs::CTX_CONTROL), ctx_control::ENABLE);
    mmio_write(&mmio, REGS[0] + regs::WAIT_CTX, 0);
    mmio_write(&mmio, REGS[0] + regs::WAIT_VALUE, 1);

    let start = Arc::new(Barrier::new(2));
    let waiting = Arc::new(AtomicBool::new(true));
    let blocked = {
        let (mmio, start, waiting) = (mmio.clone(), start.clone(), waiting.clone());
        std::thread::spawn(move || {
            start.wait();
            let t = Instant::now();
            let r = mmio_read(&mmio, REGS[0] + regs::WAIT);
            waiting.store(false, Ordering::Release);
            (r, t.elapsed())
        })
    };
    start.wait();
    // The other "vCPU": configuration reads of every slot, the waiting vGPU's own registers
    // and another vGPU's, for as long as the first one waits.
    let mut took = Vec::new();
    let ids = [0, 1, 2].map(|slot| conf1_read(&pio, slot, 0));
    while waiting.load(Ordering::Acquire) {
        let t = Instant::now();
        for slot in [0, 1, 2] {
            assert_eq!(conf1_read(&pio, slot, 0), ids[slot as usize]);
        }
        assert_eq!(mmio_read(&mmio, REGS[0] + regs::MAGIC), regs::MAGIC_VALUE);
        assert_eq!(mmio_read(&mmio, REGS[1] + regs::MAGIC), regs::MAGIC_VALUE);
        took.push(t.elapsed());
    }
    let (r, waited) = blocked.join().expect("waiting thread");
    assert_eq!(r, wait::TIMEOUT);
    assert!(waited >= Duration::from_millis(u64::from(limits::WAIT_TIMEOUT_MS)));
    took.sort();
    // With a device-wide lock the first access to slot 1 waited for the whole WAIT and this
    // loop ran once; without it, it runs many times, each round in microseconds.
    assert!(
        took.len() >= 10,
        "{} rounds during a {waited:?} WAIT",
        took.len()
    );
    let median = took[took.len() / 2];
    assert!(median < Duration::from_millis(1), "median round {median:?}");
    assert!(
        took[took.len() - 1] < waited / 2,
        "slowest round {:?} of a {waited:?} WAIT",
        took[took.len() - 1]
    );
}
