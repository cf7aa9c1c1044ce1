//! A host-process driver for a vGPU: the same device model with no VM around it.
//!
//! It owns a private "guest" memory, identity-maps it (and the VRAM) into context 0 with huge
//! pages, and submits packets through the register interface. Benchmarks compare guest
//! submissions with this path, and the scheduler harness uses it as a load generator.

use std::fs::File;
use std::sync::Arc;

use devices::pci::PciDeviceSync;
use vgpu_abi::{Packet, ctx_control, packet, pci, pte, regs, wait};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::device::{BarAddresses, NoMsi, Vgpu, VgpuError, VgpuSetup};
use crate::domain::DmaDomain;

/// GPU VA where VRAM is mapped in the host client's context.
pub const VRAM_VA: u64 = 1 << 40;
const PML4: u64 = 0x0;
const PDPT_SYS: u64 = 0x1000;
const PDPT_VRAM: u64 = 0x2000;
const PD_BASE: u64 = 0x3000;
const RING: u64 = 0x10_0000;
const RING_ENTRIES: u32 = 1024;
const FENCE: u64 = 0x14_0000;
const HEAP: u64 = 0x20_0000;

/// Errors of the host client.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Building the vGPU failed.
    #[error(transparent)]
    Vgpu(#[from] VgpuError),
    /// Memory setup failed.
    #[error("cannot set up host-client memory: {0}")]
    Memory(String),
    /// The context faulted.
    #[error("the vGPU context faulted: code {code}, address {addr:#x}")]
    Fault {
        /// Fault code.
        code: u32,
        /// Address.
        addr: u64,
    },
    /// Out of heap.
    #[error("host-client heap exhausted")]
    NoMemory,
    /// The vGPU server could not be reached or set up.
    #[error("cannot attach to the vGPU server: {0}")]
    Connect(String),
}

/// The register file a host client drives: a vGPU in this process, or (in `vgpu-server`) an
/// instance of `tessera serve` over vfio-user. A lost device reads as all-ones.
pub trait RegisterPort: Send {
    /// Reads the BAR 0 dword at `off`.
    fn read(&mut self, off: u64) -> u32;
    /// Writes the BAR 0 dword at `off`.
    fn write(&mut self, off: u64, v: u32);
    /// The device, when it is in this process.
    fn device(&self) -> Option<&Vgpu> {
        None
    }
}

impl RegisterPort for Vgpu {
    fn read(&mut self, off: u64) -> u32 {
        let mut d = [0xffu8; 4];
        self.read_bar(pci::BAR_REGS, off, &mut d);
        u32::from_le_bytes(d)
    }

    fn write(&mut self, off: u64, v: u32) {
        self.write_bar(pci::BAR_REGS, off, &v.to_le_bytes());
    }

    fn device(&self) -> Option<&Vgpu> {
        Some(self)
    }
}

/// See the module documentation.
pub struct HostClient {
    port: Box<dyn RegisterPort>,
    mem: GuestMemoryMmap,
    /// The memory's file, for a remote vGPU (handed to the server with DMA_MAP).
    file: Option<Arc<File>>,
    size: u64,
    heap: u64,
    tail: u32,
    fence: u64,
}

impl std::fmt::Debug for HostClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostClient")
            .field("size", &self.size)
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

fn mem_err(e: impl std::fmt::Display) -> HostError {
    HostError::Memory(e.to_string())
}

impl HostClient {
    /// A client with `sys_size` bytes of private memory (a multiple of 2 MiB, ≤ 512 GiB) on a
    /// vGPU built from `setup` (see [`VgpuSetup::from_lease`]; its guest memory, BARs and
    /// interrupts are the client's own).
    pub fn new(setup: VgpuSetup, sys_size: u64) -> Result<Self, HostError> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), sys_size as usize)])
            .map_err(mem_err)?;
        let vram_size = setup.vram.size();
        let dev = Vgpu::new(VgpuSetup {
            bars: BarAddresses {
                regs: 0xc000_0000,
                vram: 1 << 40,
            },
            sys: mem.clone(),
            domain: DmaDomain::new([(0, sys_size)]),
            interrupts: crate::Interrupts::Msi(Arc::new(NoMsi)),
            ..setup
        })?;
        Self::start(Box::new(dev), mem, None, sys_size, vram_size)
    }

    /// A client over `port` (whose VRAM is `vram_size` bytes) with `mem` (`sys_size` bytes,
    /// the device's system memory: reachable by it at 0) as its memory; `file` is the memory's
    /// file when the device is in another process. Builds the page tables in `mem` and
    /// enables context 0.
    pub fn start(
        port: Box<dyn RegisterPort>,
        mem: GuestMemoryMmap,
        file: Option<Arc<File>>,
        sys_size: u64,
        vram_size: u64,
    ) -> Result<Self, HostError> {
        let w = |at: u64, v: u64| mem.write_obj(v, GuestAddress(at)).map_err(mem_err);
        // Identity map of sysmem and VRAM at VRAM_VA, 2 MiB pages.
        let rw = pte::PRESENT | pte::WRITABLE;
        w(PML4, PDPT_SYS | pte::PRESENT)?;
        w(PML4 + ((VRAM_VA >> 39) & 511) * 8, PDPT_VRAM | pte::PRESENT)?;
        let mut pd = PD_BASE;
        for (pdpt, len, flag) in [(PDPT_SYS, sys_size, 0), (PDPT_VRAM, vram_size, pte::VRAM)] {
            let gigs = len.div_ceil(1 << 30);
            for g in 0..gigs {
                w(pdpt + g * 8, pd | pte::PRESENT)?;
                for i in 0..512u64 {
                    let pa = (g << 30) + (i << 21);
                    if pa < len {
                        w(pd + i * 8, pa | rw | flag | pte::HUGE)?;
                    }
                }
                pd += 0x1000;
            }
        }
        if pd > RING {
            return Err(HostError::NoMemory);
        }
        let mut c = HostClient {
            port,
            mem,
            file,
            size: sys_size,
            heap: HEAP,
            tail: 0,
            fence: 0,
        };
        c.enable_context();
        Ok(c)
    }

    /// Points context 0 at the page tables and the (empty) ring, and enables it.
    fn enable_context(&mut self) {
        self.tail = 0;
        self.set_reg(regs::ctx_reg(0, regs::CTX_PT_ROOT_LO), PML4 as u32);
        self.set_reg(regs::ctx_reg(0, regs::CTX_RING_BASE_LO), RING as u32);
        self.set_reg(regs::ctx_reg(0, regs::CTX_RING_SIZE), RING_ENTRIES);
        self.set_reg(regs::ctx_reg(0, regs::CTX_CONTROL), ctx_control::ENABLE);
    }

    /// Resets the vGPU (`RESET`: work cancelled, VRAM zeroed, contexts disabled, a fault
    /// cleared) and sets context 0 up again. Memory and the fence count stay, so the next
    /// [`HostClient::submit`] goes on from here.
    pub fn reset(&mut self) {
        self.set_reg(regs::RESET, regs::RESET_VALUE);
        self.enable_context();
    }

    /// The fence value the device last wrote (each [`HostClient::submit`] ends with a fence
    /// of the next value).
    pub fn fence_value(&self) -> Result<u64, HostError> {
        let mut b = [0u8; 8];
        self.read(FENCE, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Packets of context 0 the device consumed since the context was enabled
    /// (`CTX_RING_HEAD`), and those submitted (the tail).
    pub fn ring_progress(&mut self) -> (u32, u32) {
        (self.reg(regs::ctx_reg(0, regs::CTX_RING_HEAD)), self.tail)
    }

    /// The memory file a remote vGPU maps (`None` for a local one).
    pub fn memory_file(&self) -> Option<&File> {
        self.file.as_deref()
    }

    /// Allocates `len` bytes (64-byte aligned) of sysmem; the GPU VA equals the address.
    pub fn alloc(&mut self, len: u64) -> Result<u64, HostError> {
        let at = self.heap.next_multiple_of(64);
        let end = at
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or(HostError::NoMemory)?;
        self.heap = end;
        Ok(at)
    }

    /// Writes host bytes at a GPU VA inside sysmem.
    pub fn write(&self, va: u64, data: &[u8]) -> Result<(), HostError> {
        self.mem
            .write_slice(data, GuestAddress(va))
            .map_err(mem_err)
    }

    /// Reads bytes at a GPU VA inside sysmem.
    pub fn read(&self, va: u64, data: &mut [u8]) -> Result<(), HostError> {
        self.mem.read_slice(data, GuestAddress(va)).map_err(mem_err)
    }

    /// Queues `pkts`, then a fence, and blocks until the fence signals.
    pub fn run(&mut self, pkts: &[Packet]) -> Result<(), HostError> {
        let fence = self.submit(pkts)?;
        self.wait(fence)
    }

    /// Queues `pkts` and a fence without waiting; returns the fence value to [`wait`] for.
    ///
    /// [`wait`]: HostClient::wait
    pub fn submit(&mut self, pkts: &[Packet]) -> Result<u64, HostError> {
        self.fence += 1;
        let fence = Packet {
            opcode: packet::OP_FENCE,
            flags: 0,
            args: [FENCE, self.fence, 0, 0, 0, 0, 0],
        };
        for p in pkts.iter().chain(std::iter::once(&fence)) {
            // Never overrun the ring: wait for room.
            while self
                .tail
                .wrapping_sub(self.reg(regs::ctx_reg(0, regs::CTX_RING_HEAD)))
                >= RING_ENTRIES
            {
                self.wait_fence(self.fence.saturating_sub(1))?;
                std::hint::spin_loop();
            }
            let slot = u64::from(self.tail % RING_ENTRIES);
            self.write(RING + slot * packet::PACKET_SIZE, &p.to_bytes())?;
            self.tail = self.tail.wrapping_add(1);
            self.set_reg(regs::ctx_reg(0, regs::CTX_RING_TAIL), self.tail);
        }
        Ok(self.fence)
    }

    /// Blocks until fence `value` (from [`HostClient::submit`]) signalled.
    pub fn wait(&mut self, value: u64) -> Result<(), HostError> {
        self.wait_fence(value)
    }

    /// The device underneath (for statistics), when it is in this process.
    pub fn device(&self) -> Option<&Vgpu> {
        self.port.device()
    }

    /// Reads a BAR 0 register (context registers: `regs::ctx_reg`).
    pub fn register(&mut self, off: u64) -> u32 {
        self.port.read(off)
    }

    fn wait_fence(&mut self, value: u64) -> Result<(), HostError> {
        self.set_reg(regs::WAIT_CTX, 0);
        self.set_reg(regs::WAIT_VALUE, value as u32);
        loop {
            match self.reg(regs::WAIT) {
                wait::DONE => return Ok(()),
                wait::TIMEOUT => continue,
                _ => {
                    return Err(HostError::Fault {
                        code: self.reg(regs::ctx_reg(0, regs::CTX_FAULT_CODE)),
                        addr: u64::from(self.reg(regs::ctx_reg(0, regs::CTX_FAULT_ADDR_LO)))
                            | u64::from(self.reg(regs::ctx_reg(0, regs::CTX_FAULT_ADDR_HI))) << 32,
                    });
                }
            }
        }
    }

    fn reg(&mut self, off: u64) -> u32 {
        self.port.read(off)
    }

    fn set_reg(&mut self, off: u64, v: u32) {
        self.port.write(off, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::physical::{GpuSpec, PhysicalGpu};
    use vgpu_abi::kernel;

    #[test]
    fn host_client_runs_kernels() {
        let profile = crate::profile::Profile {
            vram: 4 << 20,
            ..*crate::profile::find("64M").unwrap()
        };
        let gpu = PhysicalGpu::new(&GpuSpec::whole(4 << 20, 2)).unwrap();
        let lease = gpu.lease(&profile, None).unwrap();
        let mut c = HostClient::new(VgpuSetup::from_lease(&lease), 16 << 20).unwrap();
        let src = c.alloc(9).unwrap();
        let out = c.alloc(4).unwrap();
        c.write(src, b"123456789").unwrap();
        c.run(&[
            Packet {
                opcode: packet::OP_DISPATCH,
                flags: kernel::CRC32,
                args: [9, src, out, 0, 0, 0, 0],
            },
            Packet {
                opcode: packet::OP_COPY,
                flags: 0,
                args: [src, VRAM_VA + 100, 9, 0, 0, 0, 0],
            },
        ])
        .unwrap();
        let mut crc = [0u8; 4];
        c.read(out, &mut crc).unwrap();
        assert_eq!(u32::from_le_bytes(crc), 0xcbf4_3926);
        // More packets than the ring holds.
        let many = vec![Packet::default(); 3000];
        c.run(&many).unwrap();
        let err = c
            .run(&[Packet {
                opcode: 0x55,
                ..Default::default()
            }])
            .unwrap_err();
        assert!(matches!(
            err,
            HostError::Fault {
                code: vgpu_abi::fault::BAD_OPCODE,
                ..
            }
        ));
    }
}
