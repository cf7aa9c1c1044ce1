//! The software GPU's VRAM: each vGPU's slice is a memfd of its own, mapped in this process.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use devices::pci::HostMemory;
use vgpu_abi::fault;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::backend::{Aperture, BackendError, Vram, memfd};
use crate::mem::Fault;

/// A slice of the software GPU's VRAM. Its memfd holds exactly this slice, so it can be
/// handed to another process (a vfio-user client mapping the BAR) without exposing any other
/// vGPU's VRAM; it is sealed against shrinking and growing, so no holder of it can truncate it
/// under the engines.
#[derive(Debug)]
pub struct SoftVram {
    memory: GuestMemoryMmap,
    file: File,
    size: u64,
    host_addr: u64,
}

impl SoftVram {
    /// `size` bytes of zeroed VRAM.
    pub fn new(size: u64) -> Result<Self, BackendError> {
        let err = |source| BackendError::Vram { size, source };
        let file = memfd("tessera-vram", size, true).map_err(err)?;
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file.try_clone().map_err(err)?, 0)),
        )])
        .map_err(BackendError::Map)?;
        let host_addr = memory
            .iter()
            .next()
            .and_then(|r| r.get_host_address(MemoryRegionAddress(0)).ok())
            .map_or(0, |p| p as u64);
        Ok(SoftVram {
            memory,
            file,
            size,
            host_addr,
        })
    }
}

impl SoftVram {
    /// The host mapping (for tests and tools that look at VRAM from the host side).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The memfd holding exactly this VRAM.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The start of the host mapping (valid for as long as this `SoftVram`).
    pub fn host_ptr(&self) -> *mut u8 {
        self.host_addr as *mut u8
    }
}

impl Vram for SoftVram {
    fn size(&self) -> u64 {
        self.size
    }

    fn aperture(&self) -> Aperture<'_> {
        // SAFETY: `host_addr` is the start of the mapping of all `size` bytes that `memory`
        // holds; the handle holds a clone of `memory` (its regions are reference-counted), so
        // the mapping outlives every holder of the handle, even this `SoftVram`.
        let memory =
            unsafe { HostMemory::new(self.host_addr, self.size, Arc::new(self.memory.clone())) };
        Aperture::Mapped {
            memory,
            file: &self.file,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.memory
            .read_slice(buf, GuestAddress(offset))
            .map_err(|_| Fault::new(fault::VRAM_RANGE, offset))
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), Fault> {
        self.memory
            .write_slice(buf, GuestAddress(offset))
            .map_err(|_| Fault::new(fault::VRAM_RANGE, offset))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn scrub(&self) {
        // SAFETY: fallocate on our own memfd; the range lies inside the file.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                self.size as libc::off_t,
            )
        };
        if rc != 0 {
            // Punching holes is best (the pages go back to the host); writing zeroes always
            // works.
            let zero = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < self.size {
                let n = (self.size - at).min(zero.len() as u64) as usize;
                let _ = self.write(at, &zero[..n]);
                at += n as u64;
            }
        }
    }
}
