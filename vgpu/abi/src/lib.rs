//! The Tessera vGPU hardware contract, version 1.0.
//!
//! Everything a driver needs to drive a Tessera vGPU, and nothing else: PCI identity, BAR
//! layout, register map, command packets, GPU page-table entries, fault codes and limits.
//! `docs/vgpu-spec.md` explains it in prose; `include/tessera_vgpu.h` is generated from this
//! file (a test keeps the two identical). `no_std`, no dependencies: the device model, the
//! firmware guest and the Linux driver's user-space tools all build against it.
//!
//! All registers are 32 bits wide, little-endian, accessed with aligned 32-bit loads and
//! stores. 64-bit quantities are split into `_LO`/`_HI` pairs.

#![no_std]

/// ABI major version: a driver must refuse a device whose major differs.
pub const VERSION_MAJOR: u16 = 1;
/// ABI minor version: additions only.
pub const VERSION_MINOR: u16 = 1;

/// PCI identity.
pub mod pci {
    /// Vendor id. Not registered with the PCI-SIG: an experimental id chosen to collide with no
    /// device Linux drives. Change it here (one place) if it ever does.
    pub const VENDOR_ID: u16 = 0x7e55;
    /// Device id of a Tessera vGPU function.
    pub const DEVICE_ID: u16 = 0x0001;
    /// Base class: display controller.
    pub const CLASS: u8 = 0x03;
    /// Sub-class: 3D controller.
    pub const SUBCLASS: u8 = 0x02;
    /// Programming interface.
    pub const PROG_IF: u8 = 0x00;
    /// Revision id = ABI major version.
    pub const REVISION: u8 = super::VERSION_MAJOR as u8;
    /// Subsystem vendor id (the subsystem id is the profile number).
    pub const SUBSYSTEM_VENDOR_ID: u16 = VENDOR_ID;
    /// BAR slot of the register file (32-bit, non-prefetchable).
    pub const BAR_REGS: usize = 0;
    /// Size of the register file.
    pub const BAR_REGS_SIZE: u64 = 0x1_0000;
    /// BAR slot of VRAM (64-bit, prefetchable; takes slots 2 and 3).
    pub const BAR_VRAM: usize = 2;
    /// Number of MSI-X vectors.
    pub const MSIX_VECTORS: u16 = 16;
    /// MSI-X table offset in BAR 0.
    pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
    /// MSI-X pending-bit array offset in BAR 0.
    pub const MSIX_PBA_OFFSET: u64 = 0x5000;
}

/// The vGPU over vfio-user (`tessera serve`), beyond the PCI function itself.
pub mod vfio_user {
    /// Tessera's private interrupt index: the client hands over one eventfd per context with
    /// `SET_IRQS(DOORBELL_IRQ_INDEX, DATA_EVENTFD | ACTION_TRIGGER, 0, n)`, registers each as a
    /// KVM ioeventfd on that context's doorbell register, and guest doorbell writes then reach
    /// the command processor without an exit or a message (the direction VFIO uses for its
    /// device-signalled request index). It is the first index past VFIO's five PCI interrupt
    /// indices (INTx, MSI, MSI-X, ERR, REQ); clients that do not know it (Cloud Hypervisor)
    /// never ask.
    pub const DOORBELL_IRQ_INDEX: u32 = 5;
}

/// BAR 0 register map.
pub mod regs {
    /// Reads [`MAGIC_VALUE`].
    pub const MAGIC: u64 = 0x000;
    /// The value of [`MAGIC`]: "TESS".
    pub const MAGIC_VALUE: u32 = 0x5445_5353;
    /// `major << 16 | minor`.
    pub const VERSION: u64 = 0x004;
    /// [`caps`](super::caps) bits.
    pub const CAPS: u64 = 0x008;
    /// Number of contexts (≤ [`MAX_CONTEXTS`](super::limits::MAX_CONTEXTS)).
    pub const NUM_CONTEXTS: u64 = 0x00c;
    /// VRAM size, low 32 bits.
    pub const VRAM_SIZE_LO: u64 = 0x010;
    /// VRAM size, high 32 bits.
    pub const VRAM_SIZE_HI: u64 = 0x014;
    /// Bitmap of supported kernels (bit n = kernel id n).
    pub const KERNELS: u64 = 0x018;
    /// Largest ring, in packets.
    pub const MAX_RING_ENTRIES: u64 = 0x01c;
    /// [`status`](super::status) bits (read-only).
    pub const STATUS: u64 = 0x020;
    /// Write [`RESET_VALUE`] for a function-level reset.
    pub const RESET: u64 = 0x024;
    /// The value that triggers a reset through [`RESET`].
    pub const RESET_VALUE: u32 = 0x5253_5431;
    /// [`int`](super::int) bits; write 1 to clear.
    pub const INT_STATUS: u64 = 0x028;
    /// [`int`](super::int) bits; 1 = masked (status still latches, no message is sent).
    pub const INT_MASK: u64 = 0x02c;
    /// Faulting address of the last fault, low 32 bits.
    pub const FAULT_ADDR_LO: u64 = 0x030;
    /// Faulting address of the last fault, high 32 bits.
    pub const FAULT_ADDR_HI: u64 = 0x034;
    /// Context of the last fault.
    pub const FAULT_CTX: u64 = 0x038;
    /// [`fault`](super::fault) code of the last fault (0 = none since reset).
    pub const FAULT_CODE: u64 = 0x03c;
    /// Faults since reset.
    pub const FAULT_COUNT: u64 = 0x040;
    /// MSI-X vector for faults.
    pub const FAULT_VECTOR: u64 = 0x044;
    /// GPU time in ns since reset, low 32 bits (reading it latches the high half).
    pub const TIMESTAMP_LO: u64 = 0x048;
    /// GPU time, high 32 bits as latched by the last [`TIMESTAMP_LO`] read.
    pub const TIMESTAMP_HI: u64 = 0x04c;
    /// Context whose fence [`WAIT`] waits for.
    pub const WAIT_CTX: u64 = 0x050;
    /// Fence value (low 32 bits) [`WAIT`] waits for.
    pub const WAIT_VALUE: u64 = 0x054;
    /// Reading blocks (inside the trap, burning no guest CPU) until the context's completed
    /// fence reaches [`WAIT_VALUE`], the context faults or stops, or
    /// [`WAIT_TIMEOUT_MS`](super::limits::WAIT_TIMEOUT_MS) passes; returns [`wait`](super::wait)
    /// result.
    pub const WAIT: u64 = 0x058;

    /// Doorbells: any 32-bit write to `DOORBELL_BASE + 8 * ctx` (the value is ignored) tells
    /// the GPU to read the context's ring tail from its tail shadow in memory
    /// (`CTX_TAIL_ADDR`). This is the fast path: a VMM catches these writes with an ioeventfd,
    /// so they never reach user space. Without a tail shadow a doorbell only re-checks
    /// `CTX_RING_TAIL`.
    pub const DOORBELL_BASE: u64 = 0x1000;
    /// Stride between doorbells.
    pub const DOORBELL_STRIDE: u64 = 8;

    /// Per-context register blocks: context `n` at `CTX_BASE + n * CTX_STRIDE`.
    pub const CTX_BASE: u64 = 0x2000;
    /// Stride between context blocks.
    pub const CTX_STRIDE: u64 = 0x80;
    /// [`ctx_control`](super::ctx_control) bits.
    pub const CTX_CONTROL: u64 = 0x00;
    /// [`ctx_status`](super::ctx_status) bits (read-only).
    pub const CTX_STATUS: u64 = 0x04;
    /// Page-table root, low 32 bits: bit 2 = [`pte::VRAM`](super::pte::VRAM) location bit (as
    /// in a page-table entry), bits 12.. = address (4 KiB aligned); other bits must be zero.
    pub const CTX_PT_ROOT_LO: u64 = 0x08;
    /// Page-table root, high 32 bits.
    pub const CTX_PT_ROOT_HI: u64 = 0x0c;
    /// Ring base GPU virtual address, low 32 bits (4 KiB aligned).
    pub const CTX_RING_BASE_LO: u64 = 0x10;
    /// Ring base, high 32 bits.
    pub const CTX_RING_BASE_HI: u64 = 0x14;
    /// Ring size in packets: a power of two, 1..=`MAX_RING_ENTRIES`.
    pub const CTX_RING_SIZE: u64 = 0x18;
    /// Free-running count of packets consumed (read-only); slot = head % size.
    pub const CTX_RING_HEAD: u64 = 0x1c;
    /// Free-running count of packets written by the driver; slot = tail % size.
    pub const CTX_RING_TAIL: u64 = 0x20;
    /// Any write flushes the context's GPU TLB.
    pub const CTX_TLB_INVALIDATE: u64 = 0x24;
    /// Last completed fence value, low 32 bits (read-only).
    pub const CTX_FENCE_LO: u64 = 0x28;
    /// Last completed fence value, high 32 bits (read-only).
    pub const CTX_FENCE_HI: u64 = 0x2c;
    /// MSI-X vector for this context's fence interrupts.
    pub const CTX_IRQ_VECTOR: u64 = 0x30;
    /// [`fault`](super::fault) code of the fault that stopped the context (0 = none).
    pub const CTX_FAULT_CODE: u64 = 0x34;
    /// Address of that fault, low 32 bits.
    pub const CTX_FAULT_ADDR_LO: u64 = 0x38;
    /// Address of that fault, high 32 bits.
    pub const CTX_FAULT_ADDR_HI: u64 = 0x3c;
    /// GPU virtual address of the context's tail shadow (a u32 holding the ring tail, 4-byte
    /// aligned; 0 = none), low 32 bits. Read by the GPU on a doorbell and, with
    /// `CTX_CONTROL.POLL`, continuously: a driver then submits with zero exits.
    pub const CTX_TAIL_ADDR_LO: u64 = 0x40;
    /// Tail shadow address, high 32 bits.
    pub const CTX_TAIL_ADDR_HI: u64 = 0x44;

    /// Offset of context `ctx`'s register `reg` in BAR 0.
    pub const fn ctx_reg(ctx: u32, reg: u64) -> u64 {
        CTX_BASE + ctx as u64 * CTX_STRIDE + reg
    }

    /// Offset of context `ctx`'s doorbell in BAR 0.
    pub const fn doorbell(ctx: u32) -> u64 {
        DOORBELL_BASE + ctx as u64 * DOORBELL_STRIDE
    }
}

/// `CAPS` bits.
pub mod caps {
    /// 2 MiB and 1 GiB leaf entries.
    pub const HUGE_PAGES: u32 = 1 << 0;
    /// Page tables and data may live in guest system memory.
    pub const SYSMEM: u32 = 1 << 1;
    /// The `TIMESTAMP` command and register.
    pub const TIMESTAMPS: u32 = 1 << 2;
    /// The blocking `WAIT` register.
    pub const WAIT: u32 = 1 << 3;
    /// Tail shadows, doorbells and tail polling (`CTX_TAIL_ADDR`, `CTX_CONTROL.POLL`).
    pub const TAIL_SHADOW: u32 = 1 << 4;
    /// The VRAM aperture (BAR 2) traps: every access is a register-like round trip to the
    /// device (a GPU whose VRAM the host cannot map). It still reads and writes VRAM, but
    /// slowly: move bulk data with `COPY` from system memory instead.
    pub const VRAM_TRAPPED: u32 = 1 << 5;
    /// Doorbell suppression (since 1.1): `CTX_CONTROL.SUPPRESS` and the doorbell hint next
    /// to the tail shadow ([`shadow`](super::shadow)).
    pub const DOORBELL_SUPPRESS: u32 = 1 << 6;
}

/// `STATUS` bits.
pub mod status {
    /// The device is out of reset and accepts work.
    pub const READY: u32 = 1 << 0;
    /// Some context is stopped on a fault.
    pub const FAULTED: u32 = 1 << 1;
}

/// `INT_STATUS` / `INT_MASK` bits.
pub mod int {
    /// A fault was recorded.
    pub const FAULT: u32 = 1 << 0;
    /// Context `ctx` completed a fence that asked for an interrupt.
    pub const fn fence(ctx: u32) -> u32 {
        1 << (16 + ctx)
    }
}

/// `CTX_CONTROL` bits.
pub mod ctx_control {
    /// Fetch and execute packets while `RING_HEAD != RING_TAIL`. Enabling validates the ring
    /// configuration (a bad one faults the context with `RING_CONFIG`).
    pub const ENABLE: u32 = 1 << 0;
    /// Write 1: stop, clear the fault, the TLB, head and tail; the fence value is kept.
    pub const RESET: u32 = 1 << 1;
    /// The GPU polls the tail shadow while the context is enabled (no doorbell needed).
    pub const POLL: u32 = 1 << 2;
    /// Doorbell suppression: the tail shadow is 8 bytes (8-byte aligned, writable by the
    /// GPU), and the GPU keeps its second word, the hint, at [`shadow::POLLING`](super::shadow)
    /// while it watches the tail without needing a doorbell. Enabling with a tail shadow that
    /// is not 8-byte aligned faults the context with `RING_CONFIG`.
    pub const SUPPRESS: u32 = 1 << 3;
}

/// The tail shadow of a context with `CTX_CONTROL.SUPPRESS`: the driver's tail, then the
/// GPU's doorbell hint. Submitting: write the packets, store the tail, a full memory barrier
/// (a store-load fence: `mfence` on x86), then load the hint and ring the doorbell unless it
/// has [`POLLING`](shadow::POLLING). The GPU clears the hint, fences, and reads the tail once
/// more before it stops watching, so one of the two always sees the other's store: no
/// submission is ever left without a doorbell or a poll.
pub mod shadow {
    /// Offset of the tail (u32, written by the driver).
    pub const TAIL: u64 = 0;
    /// Offset of the doorbell hint (u32, written by the GPU).
    pub const HINT: u64 = 4;
    /// Hint bit: the GPU is watching the tail now; a doorbell is not needed.
    pub const POLLING: u32 = 1 << 0;
}

/// `CTX_STATUS` bits.
pub mod ctx_status {
    /// The context is enabled.
    pub const ENABLED: u32 = 1 << 0;
    /// Packets are pending or executing.
    pub const BUSY: u32 = 1 << 1;
    /// The context is stopped on a fault until `CTX_CONTROL.RESET`.
    pub const FAULTED: u32 = 1 << 2;
}

/// `WAIT` results.
pub mod wait {
    /// The fence reached the value.
    pub const DONE: u32 = 0;
    /// The context faulted.
    pub const FAULTED: u32 = 1;
    /// The timeout passed.
    pub const TIMEOUT: u32 = 2;
    /// `WAIT_CTX` names no context, or the context is not enabled.
    pub const INVALID: u32 = 3;
}

/// Fault codes (`FAULT_CODE`, `CTX_FAULT_CODE`).
pub mod fault {
    /// No fault.
    pub const NONE: u32 = 0;
    /// A page-table entry on the walk is not present.
    pub const NOT_PRESENT: u32 = 1;
    /// A write through a read-only mapping.
    pub const WRITE_PROTECT: u32 = 2;
    /// A VRAM address outside this vGPU's partition.
    pub const VRAM_RANGE: u32 = 3;
    /// A system-memory address outside the VM's DMA domain (MMIO holes, past RAM).
    pub const DMA_DOMAIN: u32 = 4;
    /// Unknown opcode.
    pub const BAD_OPCODE: u32 = 5;
    /// Malformed packet: reserved bits, bad length or alignment, unknown kernel, bad sizes.
    pub const BAD_PACKET: u32 = 6;
    /// Ring size not a power of two in range, or ring base misaligned (at enable); or a tail
    /// published more than a ring's size ahead of head.
    pub const RING_CONFIG: u32 = 7;
    /// Page-table root misaligned or reserved bits set.
    pub const BAD_ROOT: u32 = 8;
    /// A page-table entry with reserved bits set, or a huge entry where none may be.
    pub const BAD_PTE: u32 = 9;
    /// A virtual address at or above 2^48, or a range that wraps.
    pub const VA_RANGE: u32 = 10;
    /// The watchdog stopped a job that overran its limit.
    pub const TIMEOUT: u32 = 11;
}

/// Command packets: [`PACKET_SIZE`](packet::PACKET_SIZE) bytes each, in the ring.
///
/// Layout: `u32 opcode | u32 flags | u64 args[7]`, little-endian.
pub mod packet {
    /// Bytes per packet.
    pub const PACKET_SIZE: u64 = 64;
    /// Arguments per packet.
    pub const NUM_ARGS: usize = 7;
    /// Does nothing.
    pub const OP_NOP: u32 = 0x00;
    /// `args = [src_va, dst_va, len]`: copy `len` bytes (any alignment).
    pub const OP_COPY: u32 = 0x01;
    /// `args = [dst_va, len, pattern]`: fill with the 32-bit `pattern`; `len` a multiple of 4,
    /// `dst_va` 4-byte aligned.
    pub const OP_FILL: u32 = 0x02;
    /// `flags` = kernel id (see [`kernel`](super::kernel)); `args` per kernel.
    pub const OP_DISPATCH: u32 = 0x03;
    /// `args = [va, value]`: after all earlier packets completed, write the 64-bit `value` at
    /// `va` (8-byte aligned) and into `CTX_FENCE`; `flags` bit 0 = raise the context's
    /// interrupt.
    pub const OP_FENCE: u32 = 0x04;
    /// `args = [va]`: write the GPU time in ns (u64, 8-byte aligned).
    pub const OP_TIMESTAMP: u32 = 0x05;
    /// `OP_FENCE` flag: raise an interrupt.
    pub const FENCE_IRQ: u32 = 1 << 0;

    /// How many of a packet's argument words the command `opcode` (for [`OP_DISPATCH`], the
    /// kernel in `flags`) uses; the words after them must be zero. `None`: no such command.
    pub const fn args_used(opcode: u32, flags: u32) -> Option<usize> {
        use super::kernel;
        match opcode {
            OP_NOP => Some(0),
            OP_COPY | OP_FILL => Some(3),
            OP_FENCE => Some(2),
            OP_TIMESTAMP => Some(1),
            OP_DISPATCH => match flags {
                kernel::SAXPY => Some(4),
                kernel::SGEMM => Some(6),
                kernel::REDUCE_SUM | kernel::CRC32 => Some(3),
                kernel::SPIN_US => Some(2),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Built-in kernels for `OP_DISPATCH` (the packet's `flags` field), with their arguments.
/// Work is split into workgroups; workgroups are the preemption points.
pub mod kernel {
    /// `y[i] = a * x[i] + y[i]`, f32. `args = [n, a (f32 bits), x_va, y_va]`.
    pub const SAXPY: u32 = 1;
    /// `C = A × B`, row-major f32, A is m×k, B is k×n, C is m×n.
    /// `args = [m, n, k, a_va, b_va, c_va]`.
    pub const SGEMM: u32 = 2;
    /// Sum of `n` u32 values as a wrapping u64. `args = [n, x_va, out_va]` (u64 out).
    pub const REDUCE_SUM: u32 = 3;
    /// CRC-32 (IEEE 802.3, as zlib) of `len` bytes. `args = [len, src_va, out_va]` (u32 out).
    pub const CRC32: u32 = 4;
    /// Spin `us` microseconds in each of `groups` workgroups. `args = [us, groups]`.
    pub const SPIN_US: u32 = 5;
    /// Elements per SAXPY workgroup.
    pub const SAXPY_GROUP: u64 = 16384;
    /// Rows of C per SGEMM workgroup.
    pub const SGEMM_GROUP_ROWS: u64 = 16;
    /// Elements per REDUCE_SUM workgroup.
    pub const REDUCE_GROUP: u64 = 65536;
    /// Bitmap of every kernel above (the `KERNELS` register).
    pub const ALL: u32 = 1 << SAXPY | 1 << SGEMM | 1 << REDUCE_SUM | 1 << CRC32 | 1 << SPIN_US;
}

/// GPU page-table entries: 64 bits, four levels of 512 entries, 4 KiB pages, 48-bit VAs.
///
/// Level 4 (root) is indexed by VA bits 47..39, level 3 by 38..30, level 2 by 29..21, level 1
/// by 20..12. A level-3 entry with [`HUGE`] maps 1 GiB, a level-2 entry 2 MiB. Table and page
/// addresses are "GPU physical": with [`VRAM`] an offset into this vGPU's VRAM, without it a
/// guest-physical address checked against the VM's DMA domain.
pub mod pte {
    /// The entry is valid.
    pub const PRESENT: u64 = 1 << 0;
    /// Writes allowed (checked at the leaf).
    pub const WRITABLE: u64 = 1 << 1;
    /// The address is a VRAM offset.
    pub const VRAM: u64 = 1 << 2;
    /// Leaf at level 3 (1 GiB) or 2 (2 MiB).
    pub const HUGE: u64 = 1 << 7;
    /// Address bits 51..12.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    /// Bits that must be zero.
    pub const RESERVED_MASK: u64 = !(ADDR_MASK | PRESENT | WRITABLE | VRAM | HUGE);
    /// Bits of GPU virtual address.
    pub const VA_BITS: u32 = 48;
    /// Levels.
    pub const LEVELS: u32 = 4;
    /// Entries per table.
    pub const ENTRIES: u64 = 512;
    /// Page size.
    pub const PAGE_SIZE: u64 = 4096;
}

/// Limits.
pub mod limits {
    /// Contexts per vGPU.
    pub const MAX_CONTEXTS: u32 = 16;
    /// Packets per ring.
    pub const MAX_RING_ENTRIES: u32 = 4096;
    /// Largest COPY / FILL / kernel buffer, in bytes.
    pub const MAX_TRANSFER: u64 = 1 << 30;
    /// Largest SGEMM dimension.
    pub const MAX_SGEMM_DIM: u64 = 4096;
    /// Longest SPIN_US per workgroup.
    pub const MAX_SPIN_US: u64 = 1_000_000;
    /// Most SPIN_US workgroups per dispatch.
    pub const MAX_SPIN_GROUPS: u64 = 65536;
    /// Longest blocking `WAIT` read.
    pub const WAIT_TIMEOUT_MS: u32 = 100;
}

/// One `#define` of the C header.
#[derive(Debug, Clone, Copy)]
pub struct Define {
    /// Name without the `TVGPU_` prefix.
    pub name: &'static str,
    /// Value.
    pub value: u64,
}

macro_rules! defines {
    ($($name:literal = $value:expr),* $(,)?) => {
        /// Every constant of the contract, for generating the C header.
        pub const DEFINES: &[Define] = &[$(Define { name: $name, value: $value as u64 }),*];
    };
}

defines! {
    "VERSION_MAJOR" = VERSION_MAJOR, "VERSION_MINOR" = VERSION_MINOR,
    "PCI_VENDOR_ID" = pci::VENDOR_ID, "PCI_DEVICE_ID" = pci::DEVICE_ID,
    "PCI_CLASS" = pci::CLASS, "PCI_SUBCLASS" = pci::SUBCLASS,
    "PCI_BAR_REGS" = pci::BAR_REGS, "PCI_BAR_REGS_SIZE" = pci::BAR_REGS_SIZE,
    "PCI_BAR_VRAM" = pci::BAR_VRAM, "PCI_MSIX_VECTORS" = pci::MSIX_VECTORS,
    "PCI_MSIX_TABLE_OFFSET" = pci::MSIX_TABLE_OFFSET, "PCI_MSIX_PBA_OFFSET" = pci::MSIX_PBA_OFFSET,
    "REG_MAGIC" = regs::MAGIC, "MAGIC_VALUE" = regs::MAGIC_VALUE, "REG_VERSION" = regs::VERSION,
    "REG_CAPS" = regs::CAPS, "REG_NUM_CONTEXTS" = regs::NUM_CONTEXTS,
    "REG_VRAM_SIZE_LO" = regs::VRAM_SIZE_LO, "REG_VRAM_SIZE_HI" = regs::VRAM_SIZE_HI,
    "REG_KERNELS" = regs::KERNELS, "REG_MAX_RING_ENTRIES" = regs::MAX_RING_ENTRIES,
    "REG_STATUS" = regs::STATUS, "REG_RESET" = regs::RESET, "RESET_VALUE" = regs::RESET_VALUE,
    "REG_INT_STATUS" = regs::INT_STATUS, "REG_INT_MASK" = regs::INT_MASK,
    "REG_FAULT_ADDR_LO" = regs::FAULT_ADDR_LO, "REG_FAULT_ADDR_HI" = regs::FAULT_ADDR_HI,
    "REG_FAULT_CTX" = regs::FAULT_CTX, "REG_FAULT_CODE" = regs::FAULT_CODE,
    "REG_FAULT_COUNT" = regs::FAULT_COUNT, "REG_FAULT_VECTOR" = regs::FAULT_VECTOR,
    "REG_TIMESTAMP_LO" = regs::TIMESTAMP_LO, "REG_TIMESTAMP_HI" = regs::TIMESTAMP_HI,
    "REG_WAIT_CTX" = regs::WAIT_CTX, "REG_WAIT_VALUE" = regs::WAIT_VALUE, "REG_WAIT" = regs::WAIT,
    "DOORBELL_BASE" = regs::DOORBELL_BASE, "DOORBELL_STRIDE" = regs::DOORBELL_STRIDE,
    "CTX_BASE" = regs::CTX_BASE, "CTX_STRIDE" = regs::CTX_STRIDE,
    "CTX_CONTROL" = regs::CTX_CONTROL, "CTX_STATUS" = regs::CTX_STATUS,
    "CTX_PT_ROOT_LO" = regs::CTX_PT_ROOT_LO, "CTX_PT_ROOT_HI" = regs::CTX_PT_ROOT_HI,
    "CTX_RING_BASE_LO" = regs::CTX_RING_BASE_LO, "CTX_RING_BASE_HI" = regs::CTX_RING_BASE_HI,
    "CTX_RING_SIZE" = regs::CTX_RING_SIZE, "CTX_RING_HEAD" = regs::CTX_RING_HEAD,
    "CTX_RING_TAIL" = regs::CTX_RING_TAIL, "CTX_TLB_INVALIDATE" = regs::CTX_TLB_INVALIDATE,
    "CTX_FENCE_LO" = regs::CTX_FENCE_LO, "CTX_FENCE_HI" = regs::CTX_FENCE_HI,
    "CTX_IRQ_VECTOR" = regs::CTX_IRQ_VECTOR, "CTX_FAULT_CODE" = regs::CTX_FAULT_CODE,
    "CTX_FAULT_ADDR_LO" = regs::CTX_FAULT_ADDR_LO, "CTX_FAULT_ADDR_HI" = regs::CTX_FAULT_ADDR_HI,
    "CTX_TAIL_ADDR_LO" = regs::CTX_TAIL_ADDR_LO, "CTX_TAIL_ADDR_HI" = regs::CTX_TAIL_ADDR_HI,
    "CAP_HUGE_PAGES" = caps::HUGE_PAGES, "CAP_SYSMEM" = caps::SYSMEM,
    "CAP_TIMESTAMPS" = caps::TIMESTAMPS, "CAP_WAIT" = caps::WAIT,
    "CAP_TAIL_SHADOW" = caps::TAIL_SHADOW, "CAP_VRAM_TRAPPED" = caps::VRAM_TRAPPED,
    "STATUS_READY" = status::READY, "STATUS_FAULTED" = status::FAULTED,
    "INT_FAULT" = int::FAULT, "INT_FENCE_SHIFT" = 16,
    "CTX_CONTROL_ENABLE" = ctx_control::ENABLE, "CTX_CONTROL_RESET" = ctx_control::RESET,
    "CTX_CONTROL_POLL" = ctx_control::POLL, "CTX_CONTROL_SUPPRESS" = ctx_control::SUPPRESS,
    "CAP_DOORBELL_SUPPRESS" = caps::DOORBELL_SUPPRESS,
    "SHADOW_TAIL" = shadow::TAIL, "SHADOW_HINT" = shadow::HINT,
    "SHADOW_POLLING" = shadow::POLLING,
    "CTX_STATUS_ENABLED" = ctx_status::ENABLED, "CTX_STATUS_BUSY" = ctx_status::BUSY,
    "CTX_STATUS_FAULTED" = ctx_status::FAULTED,
    "WAIT_DONE" = wait::DONE, "WAIT_FAULTED" = wait::FAULTED, "WAIT_TIMEOUT" = wait::TIMEOUT,
    "WAIT_INVALID" = wait::INVALID,
    "FAULT_NONE" = fault::NONE, "FAULT_NOT_PRESENT" = fault::NOT_PRESENT,
    "FAULT_WRITE_PROTECT" = fault::WRITE_PROTECT, "FAULT_VRAM_RANGE" = fault::VRAM_RANGE,
    "FAULT_DMA_DOMAIN" = fault::DMA_DOMAIN, "FAULT_BAD_OPCODE" = fault::BAD_OPCODE,
    "FAULT_BAD_PACKET" = fault::BAD_PACKET, "FAULT_RING_CONFIG" = fault::RING_CONFIG,
    "FAULT_BAD_ROOT" = fault::BAD_ROOT, "FAULT_BAD_PTE" = fault::BAD_PTE,
    "FAULT_VA_RANGE" = fault::VA_RANGE, "FAULT_TIMEOUT" = fault::TIMEOUT,
    "PACKET_SIZE" = packet::PACKET_SIZE, "PACKET_NUM_ARGS" = packet::NUM_ARGS,
    "OP_NOP" = packet::OP_NOP, "OP_COPY" = packet::OP_COPY, "OP_FILL" = packet::OP_FILL,
    "OP_DISPATCH" = packet::OP_DISPATCH, "OP_FENCE" = packet::OP_FENCE,
    "OP_TIMESTAMP" = packet::OP_TIMESTAMP, "FENCE_IRQ" = packet::FENCE_IRQ,
    "KERNEL_SAXPY" = kernel::SAXPY, "KERNEL_SGEMM" = kernel::SGEMM,
    "KERNEL_REDUCE_SUM" = kernel::REDUCE_SUM, "KERNEL_CRC32" = kernel::CRC32,
    "KERNEL_SPIN_US" = kernel::SPIN_US, "KERNELS_ALL" = kernel::ALL,
    "KERNEL_SAXPY_GROUP" = kernel::SAXPY_GROUP, "KERNEL_SGEMM_GROUP_ROWS" = kernel::SGEMM_GROUP_ROWS,
    "KERNEL_REDUCE_GROUP" = kernel::REDUCE_GROUP,
    "PTE_PRESENT" = pte::PRESENT, "PTE_WRITABLE" = pte::WRITABLE, "PTE_VRAM" = pte::VRAM,
    "PTE_HUGE" = pte::HUGE, "PTE_ADDR_MASK" = pte::ADDR_MASK,
    "PTE_RESERVED_MASK" = pte::RESERVED_MASK, "PTE_VA_BITS" = pte::VA_BITS,
    "PTE_LEVELS" = pte::LEVELS, "PTE_ENTRIES" = pte::ENTRIES, "PAGE_SIZE" = pte::PAGE_SIZE,
    "MAX_CONTEXTS" = limits::MAX_CONTEXTS, "MAX_RING_ENTRIES" = limits::MAX_RING_ENTRIES,
    "MAX_TRANSFER" = limits::MAX_TRANSFER, "MAX_SGEMM_DIM" = limits::MAX_SGEMM_DIM,
    "MAX_SPIN_US" = limits::MAX_SPIN_US, "MAX_SPIN_GROUPS" = limits::MAX_SPIN_GROUPS,
    "WAIT_TIMEOUT_MS" = limits::WAIT_TIMEOUT_MS,
}

// The register blocks must not overlap, checked at compile time.
const _: () = {
    assert!(regs::WAIT < regs::DOORBELL_BASE);
    assert!(regs::doorbell(limits::MAX_CONTEXTS) <= regs::CTX_BASE);
    assert!(regs::ctx_reg(limits::MAX_CONTEXTS, 0) <= pci::MSIX_TABLE_OFFSET);
    assert!(pci::MSIX_TABLE_OFFSET + 16 * pci::MSIX_VECTORS as u64 <= pci::MSIX_PBA_OFFSET);
    assert!(pci::MSIX_PBA_OFFSET + 8 < pci::BAR_REGS_SIZE);
    assert!(regs::CTX_TAIL_ADDR_HI < regs::CTX_STRIDE);
    assert!(pte::RESERVED_MASK & pte::HUGE == 0);
    // Fence interrupt bits are INT_STATUS bits 16..31.
    assert!(limits::MAX_CONTEXTS <= 16);
};

/// A command packet as the device reads it from the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Packet {
    /// `OP_*`.
    pub opcode: u32,
    /// Opcode-specific flags (the kernel id for `OP_DISPATCH`).
    pub flags: u32,
    /// Arguments.
    pub args: [u64; packet::NUM_ARGS],
}

impl Packet {
    /// A packet with `args` as its first arguments and zeros after them (what the device
    /// requires of unused arguments). Panics with more than [`packet::NUM_ARGS`] arguments.
    pub fn new(opcode: u32, flags: u32, args: &[u64]) -> Packet {
        let mut p = Packet {
            opcode,
            flags,
            args: [0; packet::NUM_ARGS],
        };
        p.args[..args.len()].copy_from_slice(args);
        p
    }

    /// Decodes 64 little-endian bytes.
    pub fn from_bytes(b: &[u8; packet::PACKET_SIZE as usize]) -> Packet {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut args = [0u64; packet::NUM_ARGS];
        for (n, a) in args.iter_mut().enumerate() {
            let o = 8 + n * 8;
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            *a = u64::from_le_bytes(w);
        }
        Packet {
            opcode: u32_at(0),
            flags: u32_at(4),
            args,
        }
    }

    /// Encodes to 64 little-endian bytes.
    pub fn to_bytes(&self) -> [u8; packet::PACKET_SIZE as usize] {
        let mut b = [0u8; packet::PACKET_SIZE as usize];
        b[0..4].copy_from_slice(&self.opcode.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        for (n, a) in self.args.iter().enumerate() {
            b[8 + n * 8..16 + n * 8].copy_from_slice(&a.to_le_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_roundtrip() {
        let p = Packet {
            opcode: packet::OP_COPY,
            flags: 7,
            args: [1, 2, 3, 4, 5, 6, u64::MAX],
        };
        assert_eq!(Packet::from_bytes(&p.to_bytes()), p);
    }
}
