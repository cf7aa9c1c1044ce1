//! `run=conformance`: the vGPU conformance suite.
//!
//! Finds the Tessera vGPU on PCI bus 0, enables memory decode and bus
//! mastering, and runs every case in [`CASES`] in order, printing
//! `case <name> ok` or `case <name> FAIL <why>` for each, then
//! `conformance <passed>/<total> passed`. Everything runs at CPL3; the only
//! ring-0 code involved is the interrupt stubs in `boot.rs`, which count
//! MSI-X messages per vector.
//!
//! Between cases every context is reset, `INT_STATUS` cleared, `INT_MASK`
//! zeroed and all test memory given back, so each case starts from the same
//! state whatever the previous one did.

// `Fail` carries its message inline (there is no heap to box it in); it is
// only built on the failure path, so its size costs nothing that matters.
#![allow(clippy::result_large_err)]

pub(crate) mod driver;
mod fault_cases;
mod irq_cases;
mod mmu_cases;
mod pci_cases;
mod reference;
mod work_cases;

use core::fmt::{self, Write};

use vgpu_abi::{limits, pci as abi_pci, regs};

use crate::arena::Arena;
use crate::pci::{self, Bdf};
use crate::pvh::{MEMMAP_TYPE_RAM, StartInfo};
use crate::serial::fw_println;
use driver::{Gpu, Heap};

/// Why a case failed: a short message in a fixed buffer (no allocator).
pub struct Fail {
    buf: [u8; 200],
    len: usize,
}

impl Fail {
    pub fn new(args: fmt::Arguments<'_>) -> Self {
        let mut f = Self {
            buf: [0; 200],
            len: 0,
        };
        // Writing into a `Fail` truncates instead of failing.
        let _ = f.write_fmt(args);
        f
    }

    fn as_str(&self) -> &str {
        // Only whole UTF-8 characters are stored (see `write_str`).
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl Write for Fail {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut tmp = [0u8; 4];
            let b = c.encode_utf8(&mut tmp).as_bytes();
            if self.len + b.len() > self.buf.len() {
                break;
            }
            self.buf[self.len..self.len + b.len()].copy_from_slice(b);
            self.len += b.len();
        }
        Ok(())
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A case's outcome.
pub type Outcome = Result<(), Fail>;

/// Fail the case with a formatted message.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::conformance::Fail::new(format_args!($($arg)*)))
    };
}
pub(crate) use bail;

/// Fail the case unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::conformance::bail!($($arg)*);
        }
    };
}
pub(crate) use ensure;

/// Fail the case unless `got == want`, printing both in hex.
macro_rules! ensure_eq {
    ($got:expr, $want:expr, $($arg:tt)*) => {{
        let (got, want) = ($got, $want);
        if got != want {
            $crate::conformance::bail!(
                "{}: expected {:#x}, got {:#x}",
                format_args!($($arg)*),
                want,
                got
            );
        }
    }};
}
pub(crate) use ensure_eq;

/// A RAM range from the PVH memory map.
#[derive(Clone, Copy, Debug, Default)]
pub struct Range {
    pub base: u64,
    pub end: u64,
}

/// Guest RAM as the PVH memory map describes it.
#[derive(Clone, Copy, Debug)]
pub struct Ram {
    pub ranges: [Range; 8],
    pub count: usize,
}

impl Ram {
    /// The end of the highest RAM range.
    pub fn end(&self) -> u64 {
        self.ranges[..self.count]
            .iter()
            .map(|r| r.end)
            .max()
            .unwrap_or(0)
    }

    /// Whether `[base, base + len)` is RAM.
    pub fn contains(&self, base: u64, len: u64) -> bool {
        base.checked_add(len).is_some_and(|end| {
            self.ranges[..self.count]
                .iter()
                .any(|r| base >= r.base && end <= r.end)
        })
    }
}

/// The MSI-X capability as set up by the `msix-capability` case.
#[derive(Clone, Copy, Debug)]
pub struct Msix {
    /// Configuration-space offset of the capability.
    pub cap: u8,
    /// Guest-physical address of the vector table and the PBA.
    pub table: u64,
    pub pba: u64,
}

/// Everything the cases share.
pub struct Suite {
    pub gpu: Gpu,
    pub heap: Heap,
    heap_base: (u64, u64),
    pub ram: Ram,
    pub msix: Option<Msix>,
    pub apic_id: u8,
    /// `pci=external`: the VMM emulates config space, decoding and the MSI-X table.
    external_pci: bool,
    /// Checks skipped because that VMM owns what they test.
    skipped: u32,
}

impl Suite {
    /// Whether to skip a check of behaviour that the VMM's PCI emulation owns (decode-off
    /// reads, MSI-X masking, the pending-bit array, the table after a reset). With
    /// `pci=external` the check is reported as skipped; with Tessera's own VMM it runs.
    pub fn vmm_owned(&mut self, what: &str) -> bool {
        if self.external_pci {
            self.skipped += 1;
            fw_println!("skip (owned by the VMM's PCI emulation): {what}");
        }
        self.external_pci
    }
}

/// A named case.
type Case = (&'static str, fn(&mut Suite) -> Outcome);

/// Every case, in the order they run. `reset` is last: it returns the
/// device to its power-on state.
const CASES: &[Case] = &[
    ("ids", pci_cases::ids),
    ("bar-sizing", pci_cases::bar_sizing),
    ("vram-aperture", pci_cases::vram_aperture),
    ("bar-move", pci_cases::bar_move),
    ("registers", pci_cases::registers),
    ("pt-sysmem", mmu_cases::pt_sysmem),
    ("pt-vram", mmu_cases::pt_vram),
    ("pt-huge-2m", mmu_cases::pt_huge_2m),
    ("pt-huge-1g", mmu_cases::pt_huge_1g),
    ("tlb-invalidate", mmu_cases::tlb_invalidate),
    ("cmd-nop", work_cases::cmd_nop),
    ("cmd-copy", work_cases::cmd_copy),
    ("cmd-fill", work_cases::cmd_fill),
    ("cmd-timestamp", work_cases::cmd_timestamp),
    ("kernel-saxpy", work_cases::kernel_saxpy),
    ("kernel-sgemm", work_cases::kernel_sgemm),
    ("kernel-reduce-sum", work_cases::kernel_reduce_sum),
    ("kernel-crc32", work_cases::kernel_crc32),
    ("kernel-spin-us", work_cases::kernel_spin_us),
    ("fences", work_cases::fences),
    ("ring-wrap", work_cases::ring_wrap),
    ("doorbell", work_cases::doorbell),
    ("tail-poll", work_cases::tail_poll),
    ("doorbell-suppress", work_cases::doorbell_suppress),
    ("wait-register", work_cases::wait_register),
    ("fault-not-present", fault_cases::not_present),
    ("fault-write-protect", fault_cases::write_protect),
    ("fault-vram-range", fault_cases::vram_range),
    ("fault-dma-domain", fault_cases::dma_domain),
    ("fault-bad-pte", fault_cases::bad_pte),
    ("fault-bad-root", fault_cases::bad_root),
    ("fault-va-range", fault_cases::va_range),
    ("fault-bad-opcode", fault_cases::bad_opcode),
    ("fault-bad-packet", fault_cases::bad_packet),
    ("fault-ring-config", fault_cases::ring_config),
    ("recovery", fault_cases::recovery),
    ("contexts-isolated", fault_cases::contexts_isolated),
    ("cpu-irq-path", irq_cases::cpu_irq_path),
    ("msix-capability", irq_cases::msix_capability),
    ("msix-fence-irq", irq_cases::msix_fence_irq),
    ("msix-mask-pba", irq_cases::msix_mask_pba),
    ("int-mask", irq_cases::int_mask),
    ("fault-irq", irq_cases::fault_irq),
    ("reset", irq_cases::reset),
];

/// Lowest RAM address the suite allocates from (the image ends near 1.2 MiB).
const ARENA_FLOOR: u64 = 4 << 20;
/// Least RAM the suite needs.
const ARENA_MIN: u64 = 32 << 20;

/// Find the vGPU on bus 0.
fn find_vgpu() -> Option<Bdf> {
    let mut found = None;
    pci::scan_bus(0, &mut |f: &pci::Function| {
        if found.is_none() && f.vendor_id == abi_pci::VENDOR_ID && f.device_id == abi_pci::DEVICE_ID
        {
            found = Some(f.bdf);
        }
    });
    found
}

/// Size memory BAR `bar` (and its upper half if 64-bit) by writing all ones
/// with memory decode off, restoring the original value. Returns
/// `(address, size, low flag bits)`.
pub fn size_bar(bdf: Bdf, bar: u8) -> (u64, u64, u32) {
    let reg = pci::REG_BAR0 + 4 * bar;
    let cmd = bdf.command();
    bdf.set_command(cmd & !pci::COMMAND_MEMORY);
    let lo = bdf.read_u32(reg);
    let wide = lo & pci::BAR_TYPE_MASK == pci::BAR_TYPE_64;
    let hi = if wide { bdf.read_u32(reg + 4) } else { 0 };
    bdf.write_u32(reg, u32::MAX);
    let mut mask = u64::from(bdf.read_u32(reg) & !pci::BAR_MEM_FLAGS);
    if wide {
        bdf.write_u32(reg + 4, u32::MAX);
        mask |= u64::from(bdf.read_u32(reg + 4)) << 32;
        bdf.write_u32(reg + 4, hi);
    } else if mask != 0 {
        mask |= 0xffff_ffff_0000_0000;
    }
    bdf.write_u32(reg, lo);
    bdf.set_command(cmd);
    let size = if mask == 0 {
        0
    } else {
        (!mask).wrapping_add(1)
    };
    let addr = u64::from(hi) << 32 | u64::from(lo & !pci::BAR_MEM_FLAGS);
    (addr, size, lo & pci::BAR_MEM_FLAGS)
}

/// Collect the RAM ranges of the PVH memory map.
pub(crate) fn ram_map(info: Option<&StartInfo>) -> Ram {
    let mut ram = Ram {
        ranges: [Range::default(); 8],
        count: 0,
    };
    if let Some(map) = info.and_then(|i| i.memmap()) {
        for e in map.filter(|e| e.kind == MEMMAP_TYPE_RAM && e.size > 0) {
            if ram.count < ram.ranges.len() {
                ram.ranges[ram.count] = Range {
                    base: e.addr,
                    end: e.addr.saturating_add(e.size),
                };
                ram.count += 1;
            }
        }
    }
    ram
}

/// The largest RAM range below 4 GiB above [`ARENA_FLOOR`], 2 MiB aligned.
fn sys_arena(ram: &Ram) -> Option<Arena> {
    ram.ranges[..ram.count]
        .iter()
        .filter_map(|r| {
            let start = r.base.max(ARENA_FLOOR).next_multiple_of(2 << 20);
            let end = r.end.min(crate::io::MAPPED_LIMIT);
            (end > start).then_some((start, end))
        })
        .max_by_key(|(s, e)| e - s)
        .filter(|(s, e)| e - s >= ARENA_MIN)
        .map(|(s, e)| Arena::new(s, e))
}

/// Put the device back in a known state between cases.
fn tidy(s: &mut Suite) {
    for ctx in 0..s.gpu.num_ctx {
        s.gpu.ctx_reset(ctx);
    }
    s.gpu.wr(regs::INT_STATUS, u32::MAX);
    s.gpu.wr(regs::INT_MASK, 0);
    s.heap.release(s.heap_base);
}

/// Run the suite; returns the exit status (0 only if every case passed).
pub fn run(info: Option<&StartInfo>, external_pci: bool) -> u8 {
    let Some(bdf) = find_vgpu() else {
        fw_println!("conformance: no vGPU found");
        return 1;
    };
    let ram = ram_map(info);
    let Some(sys) = sys_arena(&ram) else {
        fw_println!(
            "conformance: not enough RAM (need {} MiB above 4 MiB)",
            ARENA_MIN >> 20
        );
        return 1;
    };
    let (bar0, _, _) = size_bar(bdf, abi_pci::BAR_REGS as u8);
    let (bar2, bar2_size, _) = size_bar(bdf, abi_pci::BAR_VRAM as u8);
    fw_println!(
        "conformance: vGPU at {bdf}, BAR0 {bar0:#x}, BAR2 {bar2:#x} ({} MiB)",
        bar2_size >> 20
    );
    if bar0 == 0 || bar2 == 0 || bar2_size == 0 {
        fw_println!("conformance: BARs not assigned");
        return 1;
    }
    let mut sys = sys;
    let mut alloc_page = || sys.alloc(4096, 4096);
    if let Err(e) = crate::pages::map_identity(bar2, bar2_size, &mut alloc_page) {
        fw_println!("conformance: cannot map BAR2: {e}");
        return 1;
    }
    bdf.set_command(
        bdf.command() | pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER | pci::COMMAND_INTX_DISABLE,
    );
    let mut gpu = Gpu {
        bdf,
        bar0,
        bar2,
        bar2_size,
        vram_size: 0,
        num_ctx: 0,
    };
    gpu.vram_size = gpu.rd64(regs::VRAM_SIZE_LO).min(bar2_size);
    gpu.num_ctx = gpu.rd(regs::NUM_CONTEXTS).min(limits::MAX_CONTEXTS);
    let heap = Heap {
        sys,
        vram: Arena::new(0, gpu.vram_size),
    };
    let mut s = Suite {
        gpu,
        heap,
        heap_base: heap.mark(),
        ram,
        msix: None,
        apic_id: crate::lapic::id(),
        external_pci,
        skipped: 0,
    };
    crate::lapic::enable();

    let (mut passed, mut total, mut elapsed_ns) = (0u32, 0u32, 0u64);
    for (name, case) in CASES {
        tidy(&mut s);
        let t0 = s.gpu.timestamp();
        let outcome = case(&mut s);
        let t1 = s.gpu.timestamp();
        // The clock restarts at a device reset: count from there.
        elapsed_ns += if t1 >= t0 { t1 - t0 } else { t1 };
        total += 1;
        match outcome {
            Ok(()) => {
                passed += 1;
                fw_println!("case {name} ok");
            }
            Err(why) => fw_println!("case {name} FAIL {why}"),
        }
    }
    tidy(&mut s);
    fw_println!(
        "conformance took {}.{:03} ms of GPU time",
        elapsed_ns / 1_000_000,
        elapsed_ns / 1000 % 1000
    );
    if s.skipped > 0 {
        fw_println!(
            "conformance: {} checks skipped (pci=external: the VMM owns them)",
            s.skipped
        );
    }
    fw_println!("conformance {passed}/{total} passed");
    u8::from(passed != total)
}
