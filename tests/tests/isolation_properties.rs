//! Property tests (bounded cases) of hostile input: the GPU MMU never resolves outside the
//! domain or the VRAM, register garbage followed by RESET reads back power-on values, and
//! configuration-space garbage never maps a BAR outside the PCI windows.

mod isolation;

use devices::pci::{GuestMapper, HostBridge, HostMemory, PciRoot};
use devices::{Bus, BusDevice};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vgpu::DmaDomain;
use vgpu::backend::soft::SoftVram;
use vgpu::mem::{Loc, Spaces};
use vgpu::mmu::{Root, Tlb};
use vgpu::physical::{GpuSpec, PhysicalGpu};
use vgpu_abi::regs;
use vgpu_abi::{ctx_control, fault, pci, pte};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use isolation::*;

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
