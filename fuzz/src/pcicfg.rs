//! `pci_config`: configuration-space accesses on a vGPU, directly and through
//! `devices::pci::PciRoot`'s conf1 ports, plus MMIO accesses where its BARs decode.
//!
//! The root has the host bridge at 00:00.0 and a fresh vGPU at 00:01.0, PCI windows like the
//! VMM's, and a guest mapper that records memory BAR mappings and doorbell ioevents.
//!
//! Input: records of 8 bytes `[kind, a, b, c, v0, v1, v2, v3]` (see [`Op`]).
//!
//! Invariants: no panic; ids, class, subsystem and BAR type bits never change; BAR sizing
//! reads back the size mask; the capability list stays well formed; absent functions read
//! all ones; the MMIO bus and the mapper hold exactly the BARs that decode inside the windows
//! (nothing else, never outside; before it first decodes, the VRAM BAR may be mapped where it
//! was placed, never over live registers), with no double map and no unmap of something not
//! mapped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use devices::bus::{Bus, BusDevice};
use devices::pci::{GuestMapper, HostBridge, HostMemory, PciDeviceSync, PciRoot};
use vgpu::Vgpu;
use vgpu::backend::SoftGpu;
use vgpu::backend::soft::SoftVram;
use vgpu::sched::Scheduler;
use vgpu_abi::{pci, regs};
use vmm_sys_util::eventfd::EventFd;

use crate::input::Input;
use crate::rig::{self, CONTEXTS, MsiLog, VRAM_SIZE};

/// The 32-bit PCI window (as in the VMM).
pub const MMIO32: (u64, u64) = (0xc000_0000, 0xfec0_0000 - 0xc000_0000);
/// The 64-bit PCI window (as in the VMM).
pub const MMIO64: (u64, u64) = (512 << 30, 512 << 30);

fn in_windows(addr: u64, size: u64) -> bool {
    [MMIO32, MMIO64]
        .iter()
        .any(|&(b, s)| addr >= b && addr.checked_add(size).is_some_and(|e| e <= b + s))
}

/// Records what the root maps, and enforces the bookkeeping a KVM mapper relies on.
#[derive(Debug, Default)]
pub struct Mapper {
    /// Memory mappings: gpa → length.
    pub maps: Mutex<BTreeMap<u64, u64>>,
    /// Ioevents: gpa → count.
    pub ioevents: Mutex<BTreeMap<u64, u32>>,
}

impl GuestMapper for Mapper {
    fn map(&self, gpa: u64, mem: HostMemory) -> std::io::Result<()> {
        assert!(
            in_windows(gpa, mem.len()),
            "memory BAR mapped outside the windows at {gpa:#x}"
        );
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let end = gpa + mem.len();
        if m.iter().any(|(&a, &l)| gpa < a + l && a < end) {
            // KVM refuses overlapping memory slots; so do we.
            return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
        }
        m.insert(gpa, mem.len());
        Ok(())
    }
    fn unmap(&self, gpa: u64) {
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            m.remove(&gpa).is_some(),
            "unmap of {gpa:#x}, which is not mapped"
        );
    }
    fn register_ioevent(&self, gpa: u64, _evt: &EventFd) -> std::io::Result<()> {
        assert!(
            in_windows(gpa, 4),
            "ioevent outside the windows at {gpa:#x}"
        );
        let mut m = self.ioevents.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(gpa).or_default();
        assert_eq!(*n, 0, "ioevent at {gpa:#x} registered twice");
        *n += 1;
        Ok(())
    }
    fn unregister_ioevent(&self, gpa: u64, _evt: &EventFd) {
        let mut m = self.ioevents.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(
            m.remove(&gpa),
            Some(1),
            "ioevent at {gpa:#x} unregistered but not registered"
        );
    }
}

/// One decoded access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A 32-bit write of the conf1 address port.
    Address(u32),
    /// A write of the conf1 data port at byte `offset` (0..4) of `size` bytes.
    DataWrite(u64, usize, u32),
    /// A read of the conf1 data port.
    DataRead(u64, usize),
    /// `write_config_register(reg, offset, data)` straight on the vGPU (any sizes).
    DirectWrite(usize, u64, usize, u32),
    /// `read_config_register(reg)` straight on the vGPU.
    DirectRead(usize),
    /// An MMIO access at BAR `bar`'s current address + `offset` (or a raw address).
    Mmio(u8, u64, bool, u32),
    /// An odd-sized or misplaced access to the conf1 ports.
    PortRaw(u64, usize, bool, u32),
}

/// Sizes odd accesses pick from.
const SIZES: [usize; 8] = [1, 2, 4, 3, 8, 0, 4, 2];

/// Decodes one record.
pub fn decode(inp: &mut Input<'_>) -> Op {
    let (kind, a, b, c) = (inp.u8(), inp.u8(), inp.u8(), inp.u8());
    let v = inp.u32();
    match kind % 8 {
        0 | 1 => {
            if c & 0x80 != 0 {
                Op::Address(v)
            } else {
                let slot = u32::from(a % 4);
                let reg = u32::from(b % 64);
                Op::Address(0x8000_0000 | slot << 11 | reg << 2 | u32::from(c & 3))
            }
        }
        2 | 3 => Op::DataWrite(u64::from(a % 4), [1, 2, 4, 4][usize::from(b % 4)], v),
        4 => Op::DataRead(u64::from(a % 4), [1, 2, 4, 4][usize::from(b % 4)]),
        5 => {
            if c & 1 != 0 {
                Op::DirectRead(usize::from(a))
            } else {
                Op::DirectWrite(
                    usize::from(a % 72),
                    u64::from(b % 8),
                    SIZES[usize::from(c >> 1 & 7)],
                    v,
                )
            }
        }
        6 => Op::Mmio(a, u64::from(u16::from_le_bytes([b, c])), c & 0x80 != 0, v),
        _ => Op::PortRaw(u64::from(a % 10), SIZES[usize::from(b & 7)], c & 1 != 0, v),
    }
}

/// Encodes an op (for seeds).
pub fn encode(op: &Op) -> [u8; 8] {
    let mut r = [0u8; 8];
    match *op {
        Op::Address(v) => {
            r[0] = 0;
            r[3] = 0x80;
            r[4..].copy_from_slice(&v.to_le_bytes());
        }
        Op::DataWrite(off, size, v) => {
            r[0] = 2;
            r[1] = off as u8;
            r[2] = [1, 2, 4].iter().position(|&s| s == size).unwrap_or(2) as u8;
            r[4..].copy_from_slice(&v.to_le_bytes());
        }
        Op::DataRead(off, size) => {
            r[0] = 4;
            r[1] = off as u8;
            r[2] = [1, 2, 4].iter().position(|&s| s == size).unwrap_or(2) as u8;
        }
        Op::DirectWrite(reg, off, size, v) => {
            r[0] = 5;
            r[1] = reg as u8;
            r[2] = off as u8;
            r[3] = (SIZES.iter().position(|&s| s == size).unwrap_or(2) as u8) << 1;
            r[4..].copy_from_slice(&v.to_le_bytes());
        }
        Op::DirectRead(reg) => {
            r[0] = 5;
            r[1] = reg as u8;
            r[3] = 1;
        }
        Op::Mmio(bar, off, write, v) => {
            r[0] = 6;
            r[1] = bar;
            r[2..4].copy_from_slice(&(off as u16).to_le_bytes());
            if write {
                r[3] |= 0x80;
            }
            r[4..].copy_from_slice(&v.to_le_bytes());
        }
        Op::PortRaw(off, size, write, v) => {
            r[0] = 7;
            r[1] = off as u8;
            r[2] = SIZES.iter().position(|&s| s == size).unwrap_or(2) as u8;
            r[3] = u8::from(write);
            r[4..].copy_from_slice(&v.to_le_bytes());
        }
    }
    r
}

struct Fixture {
    root: PciRoot,
    mmio: Arc<Bus>,
    vgpu: Arc<Vgpu>,
    mapper: Arc<Mapper>,
    ids: Vec<(usize, u32)>,
    bridge_ids: Vec<(usize, u32)>,
}

fn shared_gpu() -> &'static Arc<SoftGpu> {
    static GPU: OnceLock<Arc<SoftGpu>> = OnceLock::new();
    GPU.get_or_init(|| Arc::new(SoftGpu::new(VRAM_SIZE, 1).expect("software GPU")))
}

fn guest_memory() -> &'static vm_memory::GuestMemoryMmap {
    static MEM: OnceLock<vm_memory::GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| rig::guest_memory().0)
}

const ID_REGS: [usize; 4] = [0, 2, 11, 13];

impl Fixture {
    fn new() -> Fixture {
        let gpu = shared_gpu();
        let vram = Arc::new(SoftVram::new(VRAM_SIZE).expect("partition"));
        let dev = rig::vgpu(
            gpu,
            guest_memory(),
            vram,
            Arc::new(MsiLog::default()),
            Scheduler::private(),
        );
        let vgpu = Arc::new(dev);
        let mmio = Arc::new(Bus::new());
        let mapper = Arc::new(Mapper::default());
        let mut root =
            PciRoot::new(mmio.clone(), vec![MMIO32, MMIO64]).with_guest_mapper(mapper.clone());
        root.add_device(0, Arc::new(Mutex::new(HostBridge::new())))
            .expect("host bridge");
        root.add_device_sync(1, vgpu.clone()).expect("vGPU");
        let mut f = Fixture {
            root,
            mmio,
            vgpu,
            mapper,
            ids: Vec::new(),
            bridge_ids: Vec::new(),
        };
        f.ids = ID_REGS.iter().map(|&r| (r, f.conf_read(1, r))).collect();
        f.bridge_ids = ID_REGS.iter().map(|&r| (r, f.conf_read(0, r))).collect();
        f
    }

    fn lock(&self) -> &Vgpu {
        &self.vgpu
    }

    /// A 32-bit configuration read through conf1 (leaves the address port changed).
    fn conf_read(&mut self, slot: u32, reg: usize) -> u32 {
        let addr = 0x8000_0000u32 | slot << 11 | (reg as u32) << 2;
        self.root.write(0, 0, &addr.to_le_bytes());
        let mut d = [0u8; 4];
        self.root.read(0, 4, &mut d);
        u32::from_le_bytes(d)
    }

    fn bar(&mut self, n: usize) -> u32 {
        self.lock().read_config_register(4 + n)
    }

    fn check(&mut self) {
        let mut address = [0u8; 4];
        self.root.read(0, 0, &mut address);
        for (reg, want) in self.ids.clone() {
            assert_eq!(
                self.conf_read(1, reg),
                want,
                "vGPU config register {reg} changed"
            );
        }
        for (reg, want) in self.bridge_ids.clone() {
            assert_eq!(
                self.conf_read(0, reg),
                want,
                "host bridge register {reg} changed"
            );
        }
        assert_eq!(self.conf_read(3, 0), u32::MAX, "an empty slot answered");
        // Restore the guest's address port.
        self.root.write(0, 0, &address);

        let (bar0, bar2, bar3, cmd) = (
            self.bar(0),
            self.bar(2),
            self.bar(3),
            self.lock().read_config_register(1),
        );
        assert_eq!(bar0 & 0xf, 0, "BAR0 type bits");
        assert_eq!(bar2 & 0xf, 0xc, "BAR2 type bits");
        assert_eq!(
            bar0 & (pci::BAR_REGS_SIZE as u32 - 1) & !0xf,
            0,
            "BAR0 low bits"
        );
        for unused in [1, 4, 5] {
            assert_eq!(self.bar(unused), 0, "BAR{unused} is not implemented");
        }
        let cap = (self.lock().read_config_register(13) & 0xff) as usize;
        assert_eq!(cap, 0x40, "capability pointer");
        let msix = self.lock().read_config_register(cap / 4);
        assert_eq!(msix & 0xffff, 0x0011, "MSI-X capability header (id, next)");
        assert_eq!(
            msix >> 16 & 0x7ff,
            u32::from(pci::MSIX_VECTORS) - 1,
            "table size"
        );
        assert_eq!(
            self.lock().read_config_register(cap / 4 + 1),
            pci::MSIX_TABLE_OFFSET as u32
        );
        assert_eq!(
            self.lock().read_config_register(cap / 4 + 2),
            pci::MSIX_PBA_OFFSET as u32
        );
        assert_eq!(
            self.lock().read_config_register(64),
            u32::MAX,
            "past the header"
        );

        // What decodes, per the configuration space, and what the root put in place.
        let decoding = cmd & 2 != 0;
        let a0 = u64::from(bar0 & !0xf);
        let a2 = u64::from(bar2 & !0xf) | u64::from(bar3) << 32;
        let bar0_live = decoding && a0 != 0 && in_windows(a0, pci::BAR_REGS_SIZE);
        let bar2_live = decoding && a2 != 0 && in_windows(a2, VRAM_SIZE);
        let maps = self
            .mapper
            .maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if bar2_live {
            let want_maps: BTreeMap<u64, u64> = [(a2, VRAM_SIZE)].into_iter().collect();
            assert_eq!(
                maps, want_maps,
                "VRAM BAR mappings (BAR2 at {a2:#x}, decode {decoding})"
            );
        } else {
            // Not decoding, the VRAM may still be mapped where the root placed it before it
            // ever decoded: one mapping of the whole VRAM at most, never over live registers.
            assert!(maps.len() <= 1, "VRAM mapped twice: {maps:x?}");
            for (&a, &l) in &maps {
                assert_eq!(l, VRAM_SIZE, "parked VRAM at {a:#x}");
                assert!(
                    !(bar0_live && a < a0 + pci::BAR_REGS_SIZE && a0 < a + l),
                    "parked VRAM at {a:#x} shadows BAR0 at {a0:#x}"
                );
            }
        }
        let ioevents: Vec<u64> = self
            .mapper
            .ioevents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        let want_io: Vec<u64> = if bar0_live {
            (0..CONTEXTS).map(|i| a0 + regs::doorbell(i)).collect()
        } else {
            Vec::new()
        };
        assert_eq!(ioevents, want_io, "doorbell ioevents (BAR0 at {a0:#x})");
        let mut d = [0u8; 4];
        if bar0_live {
            self.mmio
                .read(a0 + regs::MAGIC, &mut d)
                .expect("BAR0 decodes");
            assert_eq!(
                u32::from_le_bytes(d),
                regs::MAGIC_VALUE,
                "MAGIC through the bus"
            );
        } else if a0 != 0 {
            assert!(
                self.mmio.read(a0, &mut d).is_err(),
                "BAR0 at {a0:#x} must not decode"
            );
        }
        let in_bar0 = bar0_live && (a0..a0 + pci::BAR_REGS_SIZE).contains(&a2);
        if a2 != 0 && !in_bar0 {
            assert!(
                self.mmio.read(a2, &mut d).is_err(),
                "the VRAM BAR never traps"
            );
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Address(v) => self.root.write(0, 0, &v.to_le_bytes()),
            Op::DataWrite(off, size, v) => {
                self.root.write(0, 4 + off, &v.to_le_bytes()[..size]);
                // BAR sizing: all ones reads back the size mask and the type bits.
                let mut a = [0u8; 4];
                self.root.read(0, 0, &mut a);
                let a = u32::from_le_bytes(a);
                let (slot, func, bus, reg) = (
                    a >> 11 & 31,
                    a >> 8 & 7,
                    a >> 16 & 0xff,
                    (a >> 2 & 63) as usize,
                );
                if a & 0x8000_0000 != 0
                    && (slot, func, bus) == (1, 0, 0)
                    && (off, size) == (0, 4)
                    && v == u32::MAX
                {
                    let want = match reg {
                        4 => Some(!(pci::BAR_REGS_SIZE as u32 - 1)),
                        6 => Some(!(VRAM_SIZE as u32 - 1) | 0xc),
                        7 => Some(!((VRAM_SIZE - 1) >> 32) as u32),
                        5 | 8 | 9 => Some(0),
                        _ => None,
                    };
                    if let Some(want) = want {
                        let got = self.lock().read_config_register(reg);
                        assert_eq!(got, want, "BAR sizing of config register {reg}");
                    }
                }
            }
            Op::DataRead(off, size) => {
                let mut d = vec![0u8; size];
                self.root.read(0, 4 + off, &mut d);
            }
            Op::DirectWrite(reg, off, size, v) => {
                let data: Vec<u8> = v.to_le_bytes().iter().copied().cycle().take(size).collect();
                self.lock().write_config_register(reg, off, &data);
                // Only writes through the root move BARs: let it look (a write to the
                // read-only id register), keeping the guest's address port.
                let mut a = [0u8; 4];
                self.root.read(0, 0, &mut a);
                self.root
                    .write(0, 0, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
                self.root.write(0, 4, &[0u8; 4]);
                self.root.write(0, 0, &a);
            }
            Op::DirectRead(reg) => {
                let v = self.lock().read_config_register(reg);
                if reg >= 64 {
                    assert_eq!(v, u32::MAX, "config register {reg} past the header");
                }
            }
            Op::Mmio(bar, off, write, v) => {
                let addr = match bar % 4 {
                    0 => u64::from(self.bar(0) & !0xf) + off % pci::BAR_REGS_SIZE,
                    1 => (u64::from(self.bar(2) & !0xf) | u64::from(self.bar(3)) << 32) + off,
                    2 => MMIO32.0 + (off << 8),
                    _ => u64::from(v) << 12 | off,
                };
                // Never RESET (slow, not what this target is about) nor WAIT.
                let reg = addr.wrapping_sub(u64::from(self.bar(0) & !0xf));
                if reg == regs::RESET || reg == regs::WAIT {
                    return;
                }
                if write {
                    let _ = self.mmio.write(addr, &v.to_le_bytes());
                } else {
                    let mut d = [0u8; 4];
                    let _ = self.mmio.read(addr, &mut d);
                }
            }
            Op::PortRaw(off, size, write, v) => {
                let mut d: Vec<u8> = v.to_le_bytes().iter().copied().cycle().take(size).collect();
                if write {
                    self.root.write(0, off, &d);
                } else {
                    self.root.read(0, off, &mut d);
                    let lane_ok = matches!(
                        (size, off.wrapping_sub(4)),
                        (1, 0..=3) | (2, 0 | 2) | (4, 0)
                    );
                    let address_port = off == 0 && size == 4;
                    if !address_port && !lane_ok {
                        assert!(
                            d.iter().all(|&b| b == 0xff),
                            "conf1 read at {off} size {size}: {d:x?}"
                        );
                    }
                }
            }
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut f = Fixture::new();
    f.check();
    let mut inp = Input::new(data);
    let mut n = 0;
    while !inp.is_empty() && n < 1024 {
        n += 1;
        let op = decode(&mut inp);
        f.apply(op);
        f.check();
    }
}
