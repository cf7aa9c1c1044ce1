//! The seam between the vGPU and a GPU.
//!
//! Everything that checks guest input stays above this seam and is shared by every GPU kind:
//! packet decoding, the GPU MMU, the DMA domain, faults, fences, the scheduler and the
//! watchdog. What crosses it is already checked:
//!
//! - [`GpuBackend::alloc_vram`] gives a vGPU its slice of the GPU's memory, a [`Vram`]: it
//!   reads and writes it for the device (page tables, rings, fences in VRAM), scrubs it (reset,
//!   watchdog, lease end), says how the aperture (BAR 2) reaches the guest ([`Aperture`]) and
//!   hears when the guest RAM the vGPU may reach changes ([`Vram::import_domain`], where a real
//!   GPU registers those pages, like an IOMMU mapping).
//! - [`GpuBackend::prepare`] takes a resolved operation, an [`Op`], whose every operand is a
//!   [`ScatterList`] of RAM and VRAM extents that the MMU and the DMA domain have checked, and
//!   returns a [`Launch`]. [`Launch::run`] executes a range of its groups, asking a
//!   [`RunControl`] before each group whether to stop (a preemption point), and returns where
//!   it stopped: the saved context that the next `run` resumes from. [`Launch::finish`]
//!   completes what needs every group (a reduction's result).
//!
//! A backend never sees a guest virtual address or an unchecked range. The software GPU
//! ([`soft`]) is one implementation; [`inline`] is a small one for tests.

pub mod inline;
pub mod soft;
pub mod vulkan;

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use devices::pci::HostMemory;
use vgpu_abi::kernel;
use vm_memory::GuestMemoryMmap;

use crate::domain::DmaDomain;
use crate::mem::{Fault, ScatterList, Spaces};

pub use soft::SoftGpu;

/// Errors of a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// VRAM could not be created or sized.
    #[error("cannot create {size} bytes of VRAM")]
    Vram {
        /// Size.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A VRAM range does not fit in the GPU's VRAM.
    #[error("VRAM range at {offset:#x} of {size:#x} bytes does not fit in {vram:#x} bytes")]
    Range {
        /// Offset.
        offset: u64,
        /// Size.
        size: u64,
        /// VRAM size.
        vram: u64,
    },
    /// Mapping VRAM failed.
    #[error("cannot map VRAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// The vGPU is paused inside a packet that uses its DMA memory: the memory cannot change
    /// until it runs again (the swap would wait for that packet forever).
    #[error("the vGPU is paused inside a packet that uses its DMA memory")]
    Paused,
    /// An engine thread could not start.
    #[error("cannot start engine threads")]
    Thread(#[source] std::io::Error),
    /// The GPU refused to import guest RAM.
    #[error("cannot import guest memory: {0}")]
    Import(String),
    /// Vulkan is missing, or the device lacks what the backend needs, or a call failed.
    #[error("{0}")]
    Vulkan(String),
}

/// How a vGPU's VRAM aperture (BAR 2) reaches the guest.
#[derive(Debug, Clone)]
pub enum Aperture<'a> {
    /// A host mapping of the whole VRAM, and the file behind it that another process (a
    /// vfio-user client) may map. Guest accesses never trap.
    Mapped {
        /// The host mapping (`Vram::size` bytes), with a handle that keeps it mapped.
        memory: HostMemory,
        /// The file holding exactly this VRAM, from offset 0.
        file: &'a File,
    },
    /// No host mapping: every guest access becomes a [`Vram::read`] or [`Vram::write`].
    Trapped,
}

/// One vGPU's slice of a GPU's memory. See the module documentation.
pub trait Vram: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// How the aperture reaches the guest.
    fn aperture(&self) -> Aperture<'_>;
    /// Reads at `offset`. The caller has checked the range against [`Vram::size`]; an error
    /// (the memory went away) becomes a fault, never a panic.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Fault>;
    /// Writes at `offset` (checked like [`Vram::read`]).
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), Fault>;
    /// Zeroes all of it (function reset, watchdog reset, end of a lease or an attachment).
    fn scrub(&self);
    /// Itself, for the backend that made it (to reach its own type in `prepare`).
    fn as_any(&self) -> &dyn std::any::Any;
    /// The guest RAM this vGPU may reach from now on (set or replaced whole; empty when the
    /// client unmapped everything). A GPU that cannot address host memory directly imports
    /// (registers) these pages here and returns the import: the device keeps it with the
    /// memories it belongs to and drops it once no packet uses them any more, which is when
    /// the pages must be released.
    fn import_domain(
        &self,
        sys: &GuestMemoryMmap,
        domain: &DmaDomain,
    ) -> Result<Option<Import>, BackendError> {
        let _ = (sys, domain);
        Ok(None)
    }
}

/// Guest RAM imported into a GPU (see [`Vram::import_domain`]); dropping it releases it.
pub type Import = Box<dyn std::any::Any + Send + Sync>;

/// Bytes per group of COPY and FILL.
pub const COPY_GROUP: u64 = 1 << 20;
/// Bytes per CRC-32 group.
pub const CRC_GROUP: u64 = 1 << 20;

/// A built-in kernel with its operands resolved and checked.
#[derive(Debug, Clone)]
pub enum Dispatch {
    /// `y = a·x + y` over `n` f32.
    Saxpy {
        /// Elements.
        n: u64,
        /// Scale.
        a: f32,
        /// x (`4n` bytes).
        x: ScatterList,
        /// y (`4n` bytes, written).
        y: ScatterList,
    },
    /// `C = A·B`, row-major f32.
    Sgemm {
        /// Rows of A and C.
        m: u64,
        /// Columns of B and C.
        n: u64,
        /// Columns of A, rows of B.
        k: u64,
        /// A.
        a: ScatterList,
        /// B.
        b: ScatterList,
        /// C (written).
        c: ScatterList,
    },
    /// Wrapping u64 sum of `n` u32.
    ReduceSum {
        /// Elements.
        n: u64,
        /// Input.
        x: ScatterList,
        /// Output (8 bytes, written).
        out: ScatterList,
    },
    /// CRC-32 of `len` bytes.
    Crc32 {
        /// Bytes.
        len: u64,
        /// Input.
        src: ScatterList,
        /// Output (4 bytes, written).
        out: ScatterList,
    },
    /// Spin `us` microseconds in each of `groups` groups.
    SpinUs {
        /// Microseconds per group.
        us: u64,
        /// Groups.
        groups: u64,
    },
}

/// A resolved operation: what a packet asks of the GPU once every address is checked.
#[derive(Debug, Clone)]
pub enum Op {
    /// Copy `src.len()` bytes (`src` and `dst` have the same length).
    Copy {
        /// Source.
        src: ScatterList,
        /// Destination.
        dst: ScatterList,
    },
    /// Fill `dst` with a 32-bit little-endian pattern (its length is a multiple of 4).
    Fill {
        /// Destination.
        dst: ScatterList,
        /// Pattern.
        pattern: u32,
    },
    /// A kernel.
    Dispatch(Dispatch),
}

impl Op {
    /// How many groups the operation has: the units between which it may be preempted and
    /// from which it resumes (part of the device's contract, the same on every backend).
    pub fn groups(&self) -> u64 {
        match self {
            Op::Copy { src: b, .. } | Op::Fill { dst: b, .. } => b.len().div_ceil(COPY_GROUP),
            Op::Dispatch(d) => match *d {
                Dispatch::Saxpy { n, .. } => n.div_ceil(kernel::SAXPY_GROUP),
                Dispatch::Sgemm { m, .. } => m.div_ceil(kernel::SGEMM_GROUP_ROWS),
                Dispatch::ReduceSum { n, .. } => n.div_ceil(kernel::REDUCE_GROUP),
                Dispatch::Crc32 { len, .. } => len.div_ceil(CRC_GROUP),
                Dispatch::SpinUs { groups, .. } => groups,
            },
        }
    }
}

impl Op {
    /// Whether the operation resumes at its first group that did not run with nothing but
    /// memory carried over: every group writes only its own part of the outputs. A reduction
    /// (REDUCE_SUM, CRC-32) keeps partial results in its launch until the last group; it
    /// restarts from group 0 when a restored snapshot resumes it (its groups only read).
    pub fn resumes_from_memory(&self) -> bool {
        !matches!(
            self,
            Op::Dispatch(Dispatch::ReduceSum { .. } | Dispatch::Crc32 { .. })
        )
    }
}

/// What a running operation asks its caller (the command processor, which holds the GPU from
/// the scheduler and arms the watchdog).
pub trait RunControl: Send + Sync {
    /// Asked before each group starts: `true` stops the range there (a preemption point, a
    /// reset, the watchdog).
    fn stop(&self) -> bool;
    /// Whether the operation's result will be thrown away (a reset or the watchdog): a group
    /// already running may then end early, leaving its output undefined.
    fn abandoned(&self) -> bool;
    /// Called when a group has finished, on whatever thread ran it (for the scheduler's
    /// measure of how long a preempted holder kept the engines).
    fn group_done(&self) {}
}

/// An operation prepared on a backend. See the module documentation.
pub trait Launch: Send {
    /// Runs groups `groups` until they are done or [`RunControl::stop`] says to stop before a
    /// group; returns `n` such that exactly `groups.start..n` ran. The first fault wins (the
    /// operation is then over); groups already started finish.
    fn run(&mut self, groups: Range<u64>, ctl: Arc<dyn RunControl>) -> Result<u64, Fault>;
    /// Completes the operation after every group ran (writes a reduction's result).
    fn finish(self: Box<Self>) -> Result<(), Fault>;
    /// Whether the groups' outputs reach memory only at [`Launch::finish`] (a GPU that runs
    /// kernels on staging copies of their operands). Memory then holds none of a paused
    /// packet's results, so a restored snapshot runs that packet again from group 0 rather
    /// than from where it stopped ([`Op::resumes_from_memory`] is about the operation; this
    /// is about how a backend carries it out).
    fn outputs_at_finish(&self) -> bool {
        false
    }
}

/// A GPU that vGPUs run on. See the module documentation.
pub trait GpuBackend: Send + Sync + std::fmt::Debug {
    /// What the GPU is, for people: `soft (4 engines)`, a device name.
    fn name(&self) -> String;
    /// Engines (parallel units that groups spread over).
    fn engines(&self) -> usize;
    /// VRAM size.
    fn vram_size(&self) -> u64;
    /// A new, zeroed slice `[offset, offset + size)` of VRAM for one vGPU.
    fn alloc_vram(&self, offset: u64, size: u64) -> Result<Arc<dyn Vram>, BackendError>;
    /// Prepares `op` over `spaces` (the vGPU's memories as of its packet). May read inputs
    /// that every group needs; a fault here means no group ran.
    fn prepare(&self, op: Op, spaces: Arc<Spaces>) -> Result<Box<dyn Launch>, Fault>;
}

/// Checks that `[offset, offset + size)` fits in `vram` bytes.
pub fn check_range(offset: u64, size: u64, vram: u64) -> Result<(), BackendError> {
    if size == 0 || offset.checked_add(size).is_none_or(|e| e > vram) {
        return Err(BackendError::Range { offset, size, vram });
    }
    Ok(())
}

pub use memfd::FileSeal;

/// A memfd named `name` of `size` bytes; `sealed`: its size can no longer change, nor its
/// seals ([`memfd_sealed`] with shrink, grow and seal).
pub fn memfd(name: &str, size: u64, sealed: bool) -> std::io::Result<File> {
    let seals: &[FileSeal] = if sealed {
        &[FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal]
    } else {
        &[]
    };
    memfd_sealed(name, size, seals)
}

/// A memfd (close-on-exec, sealable) named `name` of `size` bytes, then `seals` added.
pub fn memfd_sealed(name: &str, size: u64, seals: &[FileSeal]) -> std::io::Result<File> {
    let io = |e: memfd::Error| match e {
        memfd::Error::Create(e) | memfd::Error::AddSeals(e) | memfd::Error::GetSeals(e) => e,
    };
    let fd = memfd::MemfdOptions::new()
        .allow_sealing(true)
        .close_on_exec(true)
        .create(name)
        .map_err(io)?;
    fd.as_file().set_len(size)?;
    if !seals.is_empty() {
        fd.add_seals(seals).map_err(io)?;
    }
    Ok(fd.into_file())
}
