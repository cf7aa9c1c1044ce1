//! The Vulkan backend: any Vulkan 1.2 GPU with compute queues and `VK_EXT_external_memory_host`
//! (tested on Mesa's lavapipe). See docs/architecture.md, "The Vulkan backend".
//!
//! The loader (`libvulkan.so.1`) is opened at run time, so building needs no Vulkan package
//! and a machine without a driver gets one clear error naming what is missing.

mod device;
mod ops;
mod pipelines;
mod scatter;
mod staging;
mod vram;

use std::ffi::CStr;
use std::sync::Arc;

use ash::vk;

pub use self::scatter::ScatterCosts;
use self::vram::VulkanVram;
use super::{BackendError, GpuBackend, Launch, Op, Vram, check_range};
use crate::mem::{Fault, Spaces};

/// The instance and the physical device every vGPU's logical device is made on.
pub(crate) struct Instance {
    /// Keeps the loader open.
    _entry: ash::Entry,
    instance: ash::Instance,
    physical: vk::PhysicalDevice,
    /// A queue family with compute.
    queue_family: u32,
    memory: vk::PhysicalDeviceMemoryProperties,
    /// `minImportedHostPointerAlignment`.
    import_align: u64,
    /// Nanoseconds per tick of the device clock (`timestampPeriod`).
    timestamp_period: f32,
    name: String,
    /// Whether the device has `bufferDeviceAddress` (only `scatter_costs` uses it).
    device_addresses: bool,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: every device made on this instance holds an `Arc` of it and is gone.
        unsafe { self.instance.destroy_instance(None) };
    }
}

/// A Vulkan GPU under the vGPUs. See the module documentation.
pub struct VulkanGpu {
    inst: Arc<Instance>,
    vram_size: u64,
    /// VRAM in device-local memory (a trapped aperture) instead of imported host memory.
    device_local: bool,
}

impl std::fmt::Debug for VulkanGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VulkanGpu")
            .field("device", &self.inst.name)
            .field("vram_size", &self.vram_size)
            .finish()
    }
}

fn missing(what: impl Into<String>) -> BackendError {
    BackendError::Vulkan(what.into())
}

fn vk_err(what: &'static str) -> impl Fn(vk::Result) -> BackendError {
    move |e| BackendError::Vulkan(format!("{what}: {e}"))
}

impl VulkanGpu {
    /// Vulkan device `index` (in the loader's order) with `vram_size` bytes of VRAM for its
    /// vGPUs.
    pub fn new(index: usize, vram_size: u64) -> Result<Self, BackendError> {
        // SAFETY: loading the system's Vulkan loader runs its initialisers; it is the library
        // every Vulkan application loads, and nothing else of ours runs meanwhile.
        let entry = unsafe { ash::Entry::load() }.map_err(|e| {
            missing(format!(
                "no Vulkan loader ({e}); install one and a driver (Debian: libvulkan1 and \
                 mesa-vulkan-drivers)"
            ))
        })?;
        let app = vk::ApplicationInfo::default()
            .application_name(c"tessera")
            .api_version(vk::API_VERSION_1_2);
        let info = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: `info` and what it points to live across the call.
        let instance = unsafe { entry.create_instance(&info, None) }.map_err(vk_err(
            "cannot create a Vulkan instance (is a Vulkan driver installed?)",
        ))?;
        // From here on the instance is destroyed on every error path by `Instance`'s drop.
        let mut inst = Instance {
            _entry: entry,
            instance,
            physical: vk::PhysicalDevice::null(),
            queue_family: 0,
            memory: vk::PhysicalDeviceMemoryProperties::default(),
            import_align: 0,
            timestamp_period: 1.0,
            name: String::new(),
            device_addresses: false,
        };
        // SAFETY: the instance is live.
        let devices = unsafe { inst.instance.enumerate_physical_devices() }
            .map_err(vk_err("cannot list Vulkan devices"))?;
        let Some(&physical) = devices.get(index) else {
            return Err(missing(format!(
                "Vulkan device {index} does not exist ({} found)",
                devices.len()
            )));
        };
        inst.physical = physical;
        // SAFETY: `physical` belongs to the live instance.
        let props = unsafe { inst.instance.get_physical_device_properties(physical) };
        inst.timestamp_period = props.limits.timestamp_period;
        inst.name = props
            .device_name_as_c_str()
            .unwrap_or(c"?")
            .to_string_lossy()
            .into_owned();
        let name = inst.name.clone();
        let lacks = |what: &str| missing(format!("Vulkan device {index} ({name}) lacks {what}"));
        // SAFETY: as above.
        let families = unsafe {
            inst.instance
                .get_physical_device_queue_family_properties(physical)
        };
        inst.queue_family = families
            .iter()
            .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .ok_or_else(|| lacks("a compute queue"))? as u32;
        // SAFETY: as above.
        let extensions = unsafe {
            inst.instance
                .enumerate_device_extension_properties(physical)
        }
        .map_err(vk_err("cannot list the device's extensions"))?;
        let has = |want: &CStr| {
            extensions
                .iter()
                .any(|e| e.extension_name_as_c_str().is_ok_and(|n| n == want))
        };
        if !has(ash::ext::external_memory_host::NAME) {
            return Err(lacks(
                "VK_EXT_external_memory_host (zero-copy guest memory)",
            ));
        }
        if !has(ash::khr::shader_clock::NAME) {
            return Err(lacks("VK_KHR_shader_clock (the SPIN_US kernel)"));
        }
        let mut clock = vk::PhysicalDeviceShaderClockFeaturesKHR::default();
        let mut addresses = vk::PhysicalDeviceBufferDeviceAddressFeatures::default();
        let mut features = vk::PhysicalDeviceFeatures2::default()
            .push_next(&mut clock)
            .push_next(&mut addresses);
        // SAFETY: as above; `features` and its chain live across the call.
        unsafe {
            inst.instance
                .get_physical_device_features2(physical, &mut features)
        };
        if features.features.shader_int64 == vk::FALSE {
            return Err(lacks("shaderInt64"));
        }
        if clock.shader_device_clock == vk::FALSE {
            return Err(lacks("shaderDeviceClock"));
        }
        inst.device_addresses = addresses.buffer_device_address == vk::TRUE;
        let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
        let mut props2 = vk::PhysicalDeviceProperties2::default().push_next(&mut host);
        // SAFETY: as above; `props2` and its chain live across the call.
        unsafe {
            inst.instance
                .get_physical_device_properties2(physical, &mut props2)
        };
        inst.import_align = host.min_imported_host_pointer_alignment.max(1);
        if !page_size().is_multiple_of(inst.import_align) {
            return Err(lacks(&format!(
                "host-pointer imports at page granularity (it needs {} bytes)",
                inst.import_align
            )));
        }
        // SAFETY: as above.
        inst.memory = unsafe {
            inst.instance
                .get_physical_device_memory_properties(physical)
        };
        Ok(VulkanGpu {
            inst: Arc::new(inst),
            vram_size,
            device_local: false,
        })
    }
}

impl VulkanGpu {
    /// Puts each vGPU's VRAM in device-local memory: the GPU's own memory on a discrete GPU,
    /// which the host cannot hand to a guest, so the aperture (BAR 2) traps
    /// (`CAPS.VRAM_TRAPPED`). The default imports host memory and maps the aperture.
    pub fn device_local(mut self) -> Self {
        self.device_local = true;
        self
    }

    /// The median wall time of one empty submission waited on its fence (the fixed cost of
    /// each slice of a kernel and of each COPY/FILL group), over `n` on a new device.
    pub fn submit_cost(&self, n: usize) -> Result<std::time::Duration, BackendError> {
        let dev = self::device::Dev::new(self.inst.clone())?;
        let mut times = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let t = std::time::Instant::now();
            dev.run(|_, _| {})
                .map_err(|_| BackendError::Vulkan("a submission failed".into()))?;
            times.push(t.elapsed());
        }
        times.sort();
        Ok(times[times.len() / 2])
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096)
}

impl GpuBackend for VulkanGpu {
    fn name(&self) -> String {
        let vram = if self.device_local {
            ", device-local VRAM"
        } else {
            ""
        };
        format!("vulkan ({}{vram})", self.inst.name)
    }

    fn engines(&self) -> usize {
        1
    }

    fn vram_size(&self) -> u64 {
        self.vram_size
    }

    fn alloc_vram(&self, offset: u64, size: u64) -> Result<Arc<dyn Vram>, BackendError> {
        check_range(offset, size, self.vram_size)?;
        Ok(Arc::new(VulkanVram::new(
            self.inst.clone(),
            size,
            self.device_local,
        )?))
    }

    fn prepare(&self, op: Op, spaces: Arc<Spaces>) -> Result<Box<dyn Launch>, Fault> {
        ops::prepare(op, spaces)
    }
}

/// Makes the device under `vram` (a Vulkan vGPU's) fail, as a lost device would.
#[cfg(test)]
pub(crate) fn lose_device(vram: &dyn Vram) {
    if let Some(v) = vram.as_any().downcast_ref::<VulkanVram>() {
        v.lose_device();
    }
}

/// See [`device::UNMAPPED_VRAM`].
#[cfg(test)]
pub(crate) use self::device::UNMAPPED_VRAM;

#[cfg(test)]
pub(crate) mod tests;
