//! vCPUs: initial register state for each boot protocol, and the run loop that turns exits
//! into bus accesses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use devices::{Bus, ExitHandle, ExitReason};
use kvm_bindings::{
    CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, Msrs,
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::BootEntry;

/// vCPU setup errors.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("cannot {what} for vCPU {cpu}")]
    Kvm {
        /// What we were doing.
        what: &'static str,
        /// vCPU index.
        cpu: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing the boot page tables or GDT failed.
    #[error("cannot write boot structures to guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

const GDT_START: u64 = 0x500;
const PML4_START: u64 = 0x9000;
const PDPTE_START: u64 = 0xa000;
const PDE_START: u64 = 0xb000;
const BOOT_STACK: u64 = 0x8ff0;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn kvm_err(what: &'static str, cpu: u8) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { what, cpu, source }
}

/// A flat segment: base 0, 4 GiB limit, granularity on.
fn flat_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Configures the CPUID, FPU, MSRs and local interrupts every vCPU needs.
pub fn configure_common(vcpu: &VcpuFd, cpu: u8, cpuid: &CpuId) -> Result<(), VcpuError> {
    vcpu.set_cpuid2(cpuid).map_err(kvm_err("set CPUID", cpu))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(kvm_err("set the FPU state", cpu))?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|_| VcpuError::Kvm {
        what: "build the MSR list",
        cpu,
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    vcpu.set_msrs(&msrs).map_err(kvm_err("set MSRs", cpu))?;
    // Local APIC virtual-wire mode: LINT0 takes the 8259's ExtINT, LINT1 takes NMIs.
    let mut lapic = vcpu
        .get_lapic()
        .map_err(kvm_err("read the local APIC", cpu))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes = &mut lapic.regs[reg..reg + 4];
        let mut v = [0u8; 4];
        for (d, s) in v.iter_mut().zip(bytes.iter()) {
            *d = *s as u8;
        }
        let v = (u32::from_le_bytes(v) & !0x700) | mode << 8;
        for (d, s) in bytes.iter_mut().zip(v.to_le_bytes()) {
            *d = s as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err("set the local APIC", cpu))?;
    Ok(())
}

/// Puts the boot vCPU at the kernel's entry point in the state its protocol demands.
pub fn configure_boot_cpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), VcpuError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("read sregs", 0))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            let code = flat_segment(0x10, 0xb, false);
            let data = flat_segment(0x18, 0x3, false);
            sregs.cs = code;
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.tr = kvm_segment {
                limit: 0x67,
                type_: 0xb,
                present: 1,
                ..Default::default()
            };
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, zero_page } => {
            write_long_mode_tables(mem)?;
            let code = flat_segment(0x8, 0xb, true);
            let data = flat_segment(0x10, 0x3, false);
            sregs.cs = code;
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.tr = kvm_segment {
                selector: 0x18,
                limit: 0xfffff,
                type_: 0xb,
                present: 1,
                ..Default::default()
            };
            sregs.gdt.base = GDT_START;
            sregs.gdt.limit = 4 * 8 - 1;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs", 0))?;
    vcpu.set_regs(&regs).map_err(kvm_err("set registers", 0))?;
    Ok(())
}

/// GDT and identity page tables for the first GiB (2 MiB pages) for a 64-bit Linux entry.
fn write_long_mode_tables(mem: &GuestMemoryMmap) -> Result<(), VcpuError> {
    let gdt: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff, // code64
        0x00cf_9300_0000_ffff, // data
        0x008f_8b00_0000_ffff, // tss
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))
            .map_err(VcpuError::Memory)?;
    }
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
        .map_err(VcpuError::Memory)?;
    mem.write_obj(PDE_START | 0x3, GuestAddress(PDPTE_START))
        .map_err(VcpuError::Memory)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(VcpuError::Memory)?;
    }
    Ok(())
}

/// What a vCPU thread needs to run.
#[derive(Debug)]
pub struct VcpuRunner {
    /// vCPU index.
    pub cpu: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port I/O.
    pub pio: Arc<Bus>,
    /// MMIO.
    pub mmio: Arc<Bus>,
    /// Where to report the end of the VM.
    pub exit: ExitHandle,
    /// Set when the VM is stopping; checked after every exit.
    pub stop: Arc<AtomicBool>,
    /// Passed before every `KVM_RUN`: where the vCPU waits while the VM is paused.
    pub gate: Arc<crate::control::PauseGate>,
}

impl VcpuRunner {
    /// Runs the vCPU until the VM stops. Every way out records an exit reason.
    pub fn run(mut self) {
        let cpu = self.cpu;
        while !self.stop.load(Ordering::Acquire) {
            self.gate.pass(&self.stop, usize::from(cpu), Some(&self.fd));
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if self.pio.write(u64::from(port), data).is_err() {
                        tracing::trace!(cpu, port, "write to unassigned port");
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if self.pio.read(u64::from(port), data).is_err() {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if self.mmio.read(addr, data).is_err() {
                        tracing::trace!(cpu, addr, "read of unassigned MMIO");
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if self.mmio.write(addr, data).is_err() {
                        tracing::trace!(cpu, addr, "write to unassigned MMIO");
                    }
                }
                Ok(VcpuExit::Hlt) => {
                    // Only without an in-kernel irqchip: nothing can wake this vCPU again.
                    self.exit.request(ExitReason::PowerOff);
                }
                Ok(VcpuExit::Shutdown) => {
                    self.exit.request(ExitReason::GuestCrash(format!(
                        "vCPU {cpu} shut down (triple fault)"
                    )));
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                        self.exit.request(ExitReason::PowerOff)
                    }
                    KVM_SYSTEM_EVENT_CRASH => self.exit.request(ExitReason::GuestCrash(format!(
                        "vCPU {cpu} reported a crash"
                    ))),
                    other => tracing::debug!(cpu, other, "ignored system event"),
                },
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    self.exit.request(ExitReason::Failure(format!(
                        "vCPU {cpu} failed to enter the guest (reason {reason:#x})"
                    )));
                }
                Ok(VcpuExit::InternalError) => {
                    self.exit.request(ExitReason::GuestCrash(format!(
                        "vCPU {cpu}: KVM internal error (an instruction the host cannot emulate?)"
                    )));
                }
                Ok(other) => {
                    tracing::debug!(cpu, ?other, "unhandled vCPU exit");
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    self.exit
                        .request(ExitReason::Failure(format!("vCPU {cpu} run failed: {e}")));
                }
            }
            if self.exit.reason().is_some() {
                break;
            }
        }
    }
}
