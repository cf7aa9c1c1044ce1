//! x86 port I/O and physical-memory access from CPL3.
//!
//! The boot code enters Rust with RFLAGS.IOPL = 3 and a TSS I/O permission
//! bitmap that allows every port, so `in`/`out` are legal at CPL3 on hardware
//! KVM and under PVM (which ignores IOPL at CPL3 but honours the bitmap). Each
//! access is a VM exit, never a guest exception. Physical memory below 4 GiB
//! is identity-mapped and user-accessible.
//!
//! Port accessors are deliberately not `nomem`: they also act as compiler
//! barriers, so memory writes (e.g. a command ring) are not reordered past a
//! doorbell written through a port.

use core::arch::asm;

/// Read a byte from an I/O port.
///
/// # Safety
/// Reading a device register can have side effects (e.g. popping a FIFO);
/// the caller must know what the device at `port` does.
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` only reads the port into AL; IOPL 3 and the TSS I/O
    // bitmap make it legal at CPL3; device side effects are the caller's
    // contract.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nostack, preserves_flags)) };
    value
}

/// Write a byte to an I/O port.
///
/// # Safety
/// Writing a device register can have arbitrary device side effects.
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: `out` touches no guest memory or stack; IOPL 3 and the TSS I/O
    // bitmap make it legal at CPL3; device side effects are the caller's
    // contract.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}

/// Read a 32-bit value from an I/O port.
///
/// # Safety
/// See [`inb`].
#[inline(always)]
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `inb`, with a 32-bit access.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nostack, preserves_flags))
    };
    value
}

/// Write a 32-bit value to an I/O port.
///
/// # Safety
/// See [`outb`].
#[inline(always)]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`, with a 32-bit access.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

/// Physical addresses below this limit are identity-mapped by the boot page
/// tables; anything above would page-fault unless [`crate::pages`] mapped it.
pub const MAPPED_LIMIT: u64 = 1 << 32;

/// Whether `[paddr, paddr + len)` is mapped, non-null memory.
pub fn phys_range_ok(paddr: u64, len: u64) -> bool {
    paddr != 0
        && paddr
            .checked_add(len)
            .is_some_and(|end| end <= MAPPED_LIMIT || crate::pages::is_mapped(paddr, len))
}

fn phys_ptr<T>(paddr: u64) -> *const T {
    // A fault here would kill the guest, so refuse loudly instead.
    assert!(
        phys_range_ok(paddr, core::mem::size_of::<T>() as u64),
        "physical address not mapped"
    );
    core::ptr::with_exposed_provenance(paddr as usize)
}

/// Read a little-endian integer of type `T` at a physical address.
///
/// Panics if the address is null or not below [`MAPPED_LIMIT`].
pub fn phys_read<T: Copy>(paddr: u64) -> T {
    let ptr = phys_ptr::<T>(paddr);
    // SAFETY: `ptr` is non-null and inside the identity map of 0-4 GiB set up
    // by the boot code (checked by `phys_ptr`); the firmware never writes the
    // boot-information and firmware-table areas it reads this way; callers
    // use plain integer types, which have no invalid bit patterns;
    // `read_unaligned` allows any alignment.
    unsafe { core::ptr::read_unaligned(ptr) }
}

/// A byte slice of physical memory.
///
/// Panics if the range is null or not below [`MAPPED_LIMIT`].
pub fn phys_bytes(paddr: u64, len: usize) -> &'static [u8] {
    if len == 0 {
        return &[];
    }
    assert!(
        phys_range_ok(paddr, len as u64),
        "physical range not mapped"
    );
    // SAFETY: the range is non-null and identity-mapped (checked above); it is
    // boot information or firmware tables written by the VMM before boot and
    // never written by the firmware, so a shared `'static` view is sound.
    unsafe { core::slice::from_raw_parts(core::ptr::with_exposed_provenance(paddr as usize), len) }
}

/// Read a 32-bit device register at a mapped physical address.
///
/// Also a full compiler barrier ([`barrier`]): data written for a device
/// before a register access (or read from it after one) is really in memory
/// at that point. x86 keeps the order at run time.
///
/// Panics if the address is not mapped.
pub fn mmio_read32(paddr: u64) -> u32 {
    let ptr = phys_ptr::<u32>(paddr);
    barrier();
    // SAFETY: `ptr` is mapped (checked by `phys_ptr`); a volatile 32-bit
    // load is how device registers are read; side effects of reading a
    // register are the caller's business.
    let v = unsafe { core::ptr::read_volatile(ptr) };
    barrier();
    v
}

/// Write a 32-bit device register at a mapped physical address; a full
/// compiler barrier like [`mmio_read32`].
///
/// Panics if the address is not mapped.
pub fn mmio_write32(paddr: u64, value: u32) {
    let ptr = phys_ptr::<u32>(paddr).cast_mut();
    barrier();
    // SAFETY: as for `mmio_read32`: mapped, volatile, 32-bit; what the
    // register does is the caller's business.
    unsafe { core::ptr::write_volatile(ptr, value) };
    barrier();
}

/// A compiler barrier: the compiler must assume any memory (including memory
/// a device shares with the guest) was read and written here, so it neither
/// moves memory accesses across it nor reuses values loaded before it.
#[inline(always)]
pub fn barrier() {
    // SAFETY: an empty asm block executes nothing; without `nomem` it only
    // tells the compiler that memory may have changed.
    unsafe { asm!("", options(nostack, preserves_flags)) };
}
