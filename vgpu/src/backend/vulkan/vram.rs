//! A vGPU's VRAM on Vulkan and the guest RAM imported into its device: where each lives,
//! how a launch binds to the vGPU's current device, and how a lost device is replaced.

use std::sync::{Arc, Mutex};

use ash::vk;
use vgpu_abi::fault;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::device::{Dev, DeviceBuffer, HostBuffer};
use super::{Instance, vk_err};
use crate::backend::soft::SoftVram;
use crate::backend::{Aperture, BackendError, Import, Vram};
use crate::domain::DmaDomain;
use crate::mem::{Fault, Spaces};

/// A vGPU's device and its VRAM buffer: replaced whole when the device is lost.
pub(super) struct DevVram {
    pub(super) dev: Arc<Dev>,
    pub(super) memory: VramMemory,
}

/// Where a vGPU's VRAM lives on its device.
pub(super) enum VramMemory {
    /// The host memfd, imported (the aperture is a direct mapping).
    Host(HostBuffer),
    /// Device-local memory (the aperture traps).
    Device(DeviceBuffer),
}

impl DevVram {
    /// The buffer the VRAM is bound to.
    pub(super) fn buffer(&self) -> vk::Buffer {
        match &self.memory {
            VramMemory::Host(b) => b.buffer,
            VramMemory::Device(b) => b.buffer(),
        }
    }
}

/// Guest RAM imported again into a device that replaced a lost one (the `Spaces`' own import
/// belongs to the old device), for as long as those memories are the current ones.
struct Rebound {
    /// Which import it stands for (the address of the `Spaces`' import).
    key: usize,
    /// Keeps the imported memory mapped while the import lives.
    _sys: GuestMemoryMmap,
    import: Arc<VulkanImport>,
}

/// A vGPU's VRAM on Vulkan: a sealed memfd (so BAR 2 stays a direct mapping) imported into
/// its device. A lost device is replaced by a new one at the vGPU's next reset (a watchdog
/// reset follows the loss at once), so one vGPU's device failure costs that vGPU its work in
/// flight and nothing else.
pub(super) struct VulkanVram {
    inst: Arc<Instance>,
    state: Mutex<Arc<DevVram>>,
    rebound: Mutex<Option<Rebound>>,
    /// Host VRAM: the memory itself, as the software GPU keeps it (a sealed memfd and its
    /// mapping). `None`: the VRAM is device-local memory.
    host: Option<SoftVram>,
    size: u64,
}

impl std::fmt::Debug for VulkanVram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VulkanVram")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// What a launch runs on: the vGPU's current device and VRAM buffer, and the guest RAM as
/// imported into that device.
pub(super) struct Bound {
    pub(super) vram: Arc<DevVram>,
    /// An import made for this device when the `Spaces`' one belongs to a lost device.
    pub(super) fresh: Option<Arc<VulkanImport>>,
}

impl VulkanVram {
    /// `size` bytes of VRAM on a new device: host memory imported, or device-local memory.
    pub(super) fn new(inst: Arc<Instance>, size: u64, local: bool) -> Result<Self, BackendError> {
        let host = if local {
            None
        } else {
            Some(SoftVram::new(size)?)
        };
        let state = Self::device(&inst, host.as_ref(), size)?;
        Ok(VulkanVram {
            inst,
            state: Mutex::new(Arc::new(state)),
            rebound: Mutex::new(None),
            host,
            size,
        })
    }

    /// A new device with `host` imported, or with `size` bytes of device-local VRAM.
    fn device(
        inst: &Arc<Instance>,
        host: Option<&SoftVram>,
        size: u64,
    ) -> Result<DevVram, BackendError> {
        let dev = Dev::new(inst.clone())?;
        let memory = match host {
            // SAFETY: the VRAM mapping is one page-aligned mapping of `size` bytes that the
            // `VulkanVram` keeps for as long as any `DevVram` of it (a launch's `Bound` holds
            // an `Arc` of one only while the vGPU, and so its VRAM, lives).
            Some(h) => VramMemory::Host(unsafe { dev.import(h.host_ptr(), h.size()) }?),
            None => {
                let b = dev
                    .device_local(size)
                    .map_err(vk_err("cannot allocate device-local VRAM"))?;
                let zero = dev.run(|d, cmd| {
                    // SAFETY: recording into the new device's command buffer; the buffer
                    // is its own.
                    unsafe { d.cmd_fill_buffer(cmd, b.buffer(), 0, vk::WHOLE_SIZE, 0) }
                });
                zero.map_err(|_| BackendError::Vulkan("cannot clear new VRAM".into()))?;
                VramMemory::Device(b)
            }
        };
        Ok(DevVram { dev, memory })
    }

    /// Copies between device-local VRAM at `offset` and a staging buffer of `len` bytes, in
    /// the direction `to_vram` says; returns the staging buffer.
    fn through_staging(
        s: &DevVram,
        vram: vk::Buffer,
        offset: u64,
        data: Result<&[u8], usize>,
    ) -> Result<DeviceBuffer, Fault> {
        let len = match data {
            Ok(d) => d.len(),
            Err(n) => n,
        } as u64;
        let staging = s
            .dev
            .staging(len)
            .map_err(|_| Fault::new(fault::VRAM_RANGE, offset))?;
        let (src, dst, region) = match data {
            Ok(d) => {
                staging.write_at(0, d);
                (
                    staging.buffer(),
                    vram,
                    vk::BufferCopy {
                        src_offset: 0,
                        dst_offset: offset,
                        size: len,
                    },
                )
            }
            Err(_) => (
                vram,
                staging.buffer(),
                vk::BufferCopy {
                    src_offset: offset,
                    dst_offset: 0,
                    size: len,
                },
            ),
        };
        s.dev.run(|d, cmd| {
            // SAFETY: recording into the device's command buffer; both buffers are its own and
            // the range lies inside both (the caller checked it against the VRAM size).
            unsafe { d.cmd_copy_buffer(cmd, src, dst, &[region]) }
        })?;
        Ok(staging)
    }

    /// The device to run on now, and the guest RAM of `spaces` as imported into it.
    pub(super) fn bind(&self, spaces: &Spaces) -> Result<Bound, Fault> {
        let vram = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if vram.dev.is_lost() {
            // The watchdog's reset replaces the device.
            return Err(Fault::new(fault::TIMEOUT, 0));
        }
        let Some(import) = spaces.import.as_ref() else {
            return Ok(Bound { vram, fresh: None });
        };
        let current = import
            .downcast_ref::<VulkanImport>()
            .is_some_and(|i| Arc::ptr_eq(&i.dev, &vram.dev));
        if current {
            return Ok(Bound { vram, fresh: None });
        }
        let key = Arc::as_ptr(import) as usize;
        let mut rebound = self.rebound.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = rebound
            .as_ref()
            .filter(|r| r.key == key && Arc::ptr_eq(&r.import.dev, &vram.dev))
        {
            return Ok(Bound {
                fresh: Some(r.import.clone()),
                vram,
            });
        }
        let import = Arc::new(
            import_into(&vram.dev, &spaces.sys, &spaces.domain)
                .map_err(|_| Fault::new(fault::DMA_DOMAIN, 0))?,
        );
        *rebound = Some(Rebound {
            key,
            _sys: spaces.sys.clone(),
            import: import.clone(),
        });
        Ok(Bound {
            fresh: Some(import),
            vram,
        })
    }

    /// Makes the device fail, as a lost device would (tests).
    #[cfg(test)]
    pub(super) fn lose_device(&self) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.dev.lose();
    }
}

/// Imports the parts of `sys` that `domain` reaches into `dev`.
fn import_into(
    dev: &Arc<Dev>,
    sys: &GuestMemoryMmap,
    domain: &DmaDomain,
) -> Result<VulkanImport, BackendError> {
    let align = dev.inst.import_align;
    let mut regions = Vec::new();
    for r in sys.iter() {
        let (start, len) = (r.start_addr().0, r.len());
        // Only regions the domain reaches into are imported (the IOMMU-style mapping).
        if !domain
            .ranges()
            .iter()
            .any(|&(b, s)| b < start + len && start < b + s)
        {
            continue;
        }
        let host = r
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| BackendError::Import(format!("region at {start:#x}: {e}")))?;
        if !(host as u64).is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(BackendError::Import(format!(
                "region at {start:#x} is not aligned to {align} bytes"
            )));
        }
        // SAFETY: the region is one mapping, aligned as checked; whoever keeps the import
        // keeps `sys` (a clone of these regions) too, so the import is released before the
        // mapping can go.
        let buffer = unsafe { dev.import(host, len) }?;
        regions.push(ImportedRegion { start, len, buffer });
    }
    Ok(VulkanImport {
        dev: dev.clone(),
        regions,
    })
}

impl Vram for VulkanVram {
    fn size(&self) -> u64 {
        self.size
    }

    fn aperture(&self) -> Aperture<'_> {
        self.host
            .as_ref()
            .map_or(Aperture::Trapped, SoftVram::aperture)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Fault> {
        if let Some(h) = &self.host {
            return h.read(offset, buf);
        }
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let VramMemory::Device(b) = &s.memory else {
            return Err(Fault::new(fault::VRAM_RANGE, offset));
        };
        let at = offset as usize;
        if let Some(src) = b.bytes().get(at..at + buf.len()) {
            buf.copy_from_slice(src);
            return Ok(());
        }
        let staging = Self::through_staging(&s, b.buffer(), offset, Err(buf.len()))?;
        buf.copy_from_slice(&staging.bytes()[..buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), Fault> {
        if let Some(h) = &self.host {
            return h.write(offset, buf);
        }
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let VramMemory::Device(b) = &s.memory else {
            return Err(Fault::new(fault::VRAM_RANGE, offset));
        };
        if b.write_at(offset, buf) {
            return Ok(());
        }
        Self::through_staging(&s, b.buffer(), offset, Ok(buf)).map(drop)
    }

    fn scrub(&self) {
        // Host VRAM: the device sees the same pages, zero after the punch (the import pins
        // nothing).
        if let Some(h) = &self.host {
            h.scrub();
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // The next tenant's kernels get new staging memory.
        state.dev.release_staging();
        let scrubbed = if state.dev.is_lost() {
            Err("Vulkan device lost".to_string())
        } else if self.host.is_none() {
            let s = state.clone();
            let buffer = s.buffer();
            s.dev
                .run(|d, cmd| {
                    // SAFETY: recording into the device's command buffer; the VRAM buffer is
                    // its own.
                    unsafe { d.cmd_fill_buffer(cmd, buffer, 0, vk::WHOLE_SIZE, 0) }
                })
                .map_err(|f| format!("the VRAM scrub failed ({f:?})"))
        } else {
            Ok(())
        };
        if let Err(why) = scrubbed {
            // A reset after a device loss, or a scrub that did not run: this vGPU gets a new
            // device (its neighbours never had this one), whose device-local VRAM comes back
            // zeroed.
            match Self::device(&self.inst, self.host.as_ref(), self.size) {
                Ok(fresh) => {
                    tracing::warn!("{why}: the vGPU has a new Vulkan device");
                    *state = Arc::new(fresh);
                }
                Err(e) => tracing::error!("{why}, and no new Vulkan device: {e}"),
            }
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn import_domain(
        &self,
        sys: &GuestMemoryMmap,
        domain: &DmaDomain,
    ) -> Result<Option<Import>, BackendError> {
        let dev = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dev
            .clone();
        // A re-import made for the previous memories is not needed any more (and must not
        // keep them mapped).
        *self.rebound.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(Some(Box::new(import_into(&dev, sys, domain)?)))
    }
}

/// Guest RAM imported into a vGPU's device: one buffer per RAM region.
pub(super) struct VulkanImport {
    /// The device it was imported into.
    dev: Arc<Dev>,
    pub(super) regions: Vec<ImportedRegion>,
}

/// One imported RAM region.
pub(super) struct ImportedRegion {
    /// Guest-physical start.
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) buffer: HostBuffer,
}
