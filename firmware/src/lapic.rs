//! The local APIC (xAPIC MMIO at 0xfee0_0000, identity-mapped and user-accessible) and the
//! interrupt counters kept by the ring-0 stubs in `boot.rs`.

use core::sync::atomic::{AtomicU32, Ordering};

/// Physical base of the local APIC registers.
pub const BASE: u64 = 0xfee0_0000;
const ID: u64 = 0x020;
const SVR: u64 = 0x0f0;
const IRR: u64 = 0x200;
const ICR_LO: u64 = 0x300;
const LVT_LINT0: u64 = 0x350;
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const ICR_SELF: u32 = 1 << 18;
/// Spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

unsafe extern "C" {
    /// Per-vector interrupt counts, incremented by the ring-0 stubs (boot.rs).
    static boot_irq_counts: [AtomicU32; 256];
}

fn read(reg: u64) -> u32 {
    crate::io::mmio_read32(BASE + reg)
}

fn write(reg: u64, v: u32) {
    crate::io::mmio_write32(BASE + reg, v)
}

/// This CPU's APIC id.
pub fn id() -> u8 {
    (read(ID) >> 24) as u8
}

/// Software-enable the APIC and mask LINT0 (ExtINT from the 8259s).
pub fn enable() {
    write(SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(LVT_LINT0, LVT_MASKED);
}

/// Whether `vector` is pending in the IRR.
pub fn irr_pending(vector: u8) -> bool {
    read(IRR + 0x10 * u64::from(vector / 32)) & (1 << (vector % 32)) != 0
}

/// Send `vector` to this CPU (fixed, edge).
pub fn self_ipi(vector: u8) {
    write(ICR_LO, ICR_SELF | u32::from(vector));
}

/// Interrupts of `vector` handled so far.
pub fn count(vector: u8) -> u32 {
    // SAFETY: the counters are a static array in .bss that only the ring-0
    // stubs write (with `incl`); reading an atomic is always sound.
    unsafe { boot_irq_counts[usize::from(vector)].load(Ordering::Relaxed) }
}
