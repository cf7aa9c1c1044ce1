//! A small backend for tests and for reading: it runs every group on the calling thread,
//! keeps VRAM in ordinary memory behind a trapped aperture, and counts the calls it gets.
//! It shares the software GPU's per-group host work, so what it proves is the seam: VRAM that
//! the guest reaches only through register-like accesses, execution that is not the engine
//! pool, and the calls a backend sees (and never an unchecked address).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use vgpu_abi::fault;
use vm_memory::GuestMemoryMmap;

use super::soft::kernels::{self, FinishFn, Plan, WorkFn};
use super::{
    Aperture, BackendError, GpuBackend, Import, Launch, Op, RunControl, Vram, check_range,
};
use crate::domain::DmaDomain;
use crate::mem::{Fault, Spaces};

/// Calls an [`InlineGpu`] has had.
#[derive(Debug, Default)]
pub struct Calls {
    /// `alloc_vram`.
    pub alloc_vram: AtomicU64,
    /// `import_domain` on any of its VRAM slices.
    pub import_domain: AtomicU64,
    /// Imports released (dropped by the device).
    pub released: AtomicU64,
    /// `prepare`.
    pub prepare: AtomicU64,
    /// `Launch::run`.
    pub run: AtomicU64,
    /// Groups that ran.
    pub groups: AtomicU64,
    /// `Launch::finish`.
    pub finish: AtomicU64,
    /// Trapped aperture accesses (reads and writes of VRAM).
    pub vram_accesses: AtomicU64,
}

impl Calls {
    /// The value of one counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// See the module documentation.
#[derive(Debug)]
pub struct InlineGpu {
    vram_size: u64,
    calls: Arc<Calls>,
}

impl InlineGpu {
    /// A GPU with `vram_size` bytes of VRAM.
    pub fn new(vram_size: u64) -> Self {
        InlineGpu {
            vram_size,
            calls: Arc::default(),
        }
    }

    /// Its call counters.
    pub fn calls(&self) -> &Calls {
        &self.calls
    }
}

/// VRAM in a byte vector, reached only through [`Vram::read`] and [`Vram::write`].
#[derive(Debug)]
struct InlineVram {
    bytes: RwLock<Vec<u8>>,
    calls: Arc<Calls>,
}

impl InlineVram {
    fn range(&self, offset: u64, len: usize) -> Option<Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.bytes.read().unwrap_or_else(|e| e.into_inner()).len()).then_some(start..end)
    }
}

impl Vram for InlineVram {
    fn size(&self) -> u64 {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn aperture(&self) -> Aperture<'_> {
        Aperture::Trapped
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Fault> {
        bump(&self.calls.vram_accesses);
        let r = self
            .range(offset, buf.len())
            .ok_or(Fault::new(fault::VRAM_RANGE, offset))?;
        buf.copy_from_slice(&self.bytes.read().unwrap_or_else(|e| e.into_inner())[r]);
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), Fault> {
        bump(&self.calls.vram_accesses);
        let r = self
            .range(offset, buf.len())
            .ok_or(Fault::new(fault::VRAM_RANGE, offset))?;
        self.bytes.write().unwrap_or_else(|e| e.into_inner())[r].copy_from_slice(buf);
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn scrub(&self) {
        self.bytes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .fill(0);
    }

    fn import_domain(
        &self,
        _: &GuestMemoryMmap,
        _: &DmaDomain,
    ) -> Result<Option<Import>, BackendError> {
        bump(&self.calls.import_domain);
        Ok(Some(Box::new(Imported(self.calls.clone()))))
    }
}

/// An import: counts its release.
struct Imported(Arc<Calls>);

impl Drop for Imported {
    fn drop(&mut self) {
        bump(&self.0.released);
    }
}

struct InlineLaunch {
    work: WorkFn,
    finish: Option<FinishFn>,
    calls: Arc<Calls>,
}

impl Launch for InlineLaunch {
    fn run(&mut self, groups: Range<u64>, ctl: Arc<dyn RunControl>) -> Result<u64, Fault> {
        bump(&self.calls.run);
        let ran = super::soft::run_here(groups.clone(), &self.work, &*ctl);
        if let Ok(end) = ran {
            self.calls
                .groups
                .fetch_add(end.saturating_sub(groups.start), Ordering::Relaxed);
        }
        ran
    }

    fn finish(self: Box<Self>) -> Result<(), Fault> {
        bump(&self.calls.finish);
        self.finish.map_or(Ok(()), |f| f())
    }
}

impl GpuBackend for InlineGpu {
    fn name(&self) -> String {
        "inline (test)".into()
    }

    fn engines(&self) -> usize {
        1
    }

    fn vram_size(&self) -> u64 {
        self.vram_size
    }

    fn alloc_vram(&self, offset: u64, size: u64) -> Result<Arc<dyn Vram>, BackendError> {
        check_range(offset, size, self.vram_size)?;
        bump(&self.calls.alloc_vram);
        let len = usize::try_from(size).map_err(|_| BackendError::Range {
            offset,
            size,
            vram: self.vram_size,
        })?;
        Ok(Arc::new(InlineVram {
            bytes: RwLock::new(vec![0; len]),
            calls: self.calls.clone(),
        }))
    }

    fn prepare(&self, op: Op, spaces: Arc<Spaces>) -> Result<Box<dyn Launch>, Fault> {
        bump(&self.calls.prepare);
        let Plan { work, finish } = kernels::plan(op, spaces)?;
        Ok(Box::new(InlineLaunch {
            work,
            finish,
            calls: self.calls.clone(),
        }))
    }
}
