//! One vGPU's Vulkan device: its own logical device (a GPU address space and a failure domain
//! of its own), its submissions, host memory imported as buffers, staging and device-local
//! buffers, descriptor sets. Its VRAM and guest RAM are in `vram.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use ash::vk;
use vgpu_abi::fault;

use super::pipelines::{Pipeline, Shader};
use super::staging::{Kept, Raw};
use super::{Instance, vk_err};
use crate::backend::BackendError;
use crate::mem::Fault;

/// What one submission needs, used by one thread at a time.
struct Submit {
    queue: vk::Queue,
    pool: vk::CommandPool,
    cmd: vk::CommandBuffer,
    fence: vk::Fence,
}

/// A vGPU's logical device. See the module documentation.
pub(super) struct Dev {
    pub(super) inst: Arc<Instance>,
    pub(super) device: ash::Device,
    host: ash::ext::external_memory_host::Device,
    submit: Mutex<Submit>,
    /// The kernels' pipelines, made on first use (in `Shader::ALL` order).
    pub(super) pipelines: [OnceLock<Pipeline>; Shader::ALL.len()],
    /// Descriptor sets of running kernels.
    descriptors: Mutex<vk::DescriptorPool>,
    /// Set once a call reported the device lost: every later operation faults.
    lost: AtomicBool,
    /// Made with `bufferDeviceAddress`: every buffer has a device address
    /// ([`Dev::address`]).
    device_addresses: bool,
    /// Staging buffers kept between kernels (`staging.rs`).
    pub(super) kept: Mutex<Kept>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.release_staging();
        for p in self.pipelines.iter_mut().filter_map(OnceLock::take) {
            // SAFETY: nothing is in flight, so no pipeline is in use.
            unsafe { p.destroy(&self.device) };
        }
        let pool = *self
            .descriptors
            .get_mut()
            .unwrap_or_else(|e| e.into_inner());
        // SAFETY: nothing is in flight; destroying the pool frees its sets.
        unsafe { self.device.destroy_descriptor_pool(pool, None) };
        let s = self.submit.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: nothing is in flight (every submission is waited for), and every buffer
        // made on this device holds an `Arc` of it, so all are gone (the kept ones were freed
        // above); the handles are ours.
        unsafe { self.device.destroy_fence(s.fence, None) };
        // SAFETY: as above; destroying the pool frees its command buffer.
        unsafe { self.device.destroy_command_pool(s.pool, None) };
        // SAFETY: as above; the device has no children left.
        unsafe { self.device.destroy_device(None) };
    }
}

impl Dev {
    /// A new logical device with one compute queue.
    pub(super) fn new(inst: Arc<Instance>) -> Result<Arc<Dev>, BackendError> {
        Self::create(inst, false)
    }

    /// A new logical device whose buffers have device addresses (`bufferDeviceAddress`), for
    /// shaders that follow a page table of them.
    pub(super) fn with_device_addresses(inst: Arc<Instance>) -> Result<Arc<Dev>, BackendError> {
        if !inst.device_addresses {
            return Err(BackendError::Vulkan(format!(
                "Vulkan device {} lacks bufferDeviceAddress",
                inst.name
            )));
        }
        Self::create(inst, true)
    }

    fn create(inst: Arc<Instance>, device_addresses: bool) -> Result<Arc<Dev>, BackendError> {
        let priorities = [1.0f32];
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(inst.queue_family)
            .queue_priorities(&priorities)];
        let extensions = [
            ash::ext::external_memory_host::NAME.as_ptr(),
            ash::khr::shader_clock::NAME.as_ptr(),
        ];
        let features = vk::PhysicalDeviceFeatures::default().shader_int64(true);
        let mut clock =
            vk::PhysicalDeviceShaderClockFeaturesKHR::default().shader_device_clock(true);
        let mut addresses = vk::PhysicalDeviceBufferDeviceAddressFeatures::default()
            .buffer_device_address(device_addresses);
        let mut info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_extension_names(&extensions)
            .enabled_features(&features)
            .push_next(&mut clock);
        // Only where asked: the vGPUs' own devices are made exactly as before.
        if device_addresses {
            info = info.push_next(&mut addresses);
        }
        // SAFETY: the physical device belongs to the live instance; `info` and what it points
        // to live across the call; the extension and feature were checked at start.
        let device = unsafe { inst.instance.create_device(inst.physical, &info, None) }
            .map_err(vk_err("cannot create a Vulkan device"))?;
        // A device without its submission objects is destroyed here on error.
        let undo = |device: &ash::Device, pool: Option<vk::CommandPool>| {
            if let Some(p) = pool {
                // SAFETY: the pool was made on `device` and nothing uses it.
                unsafe { device.destroy_command_pool(p, None) };
            }
            // SAFETY: `device` has no other children and nothing uses it.
            unsafe { device.destroy_device(None) };
        };
        // SAFETY: the family was requested with one queue.
        let queue = unsafe { device.get_device_queue(inst.queue_family, 0) };
        let pool_info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(inst.queue_family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: `device` is live; `pool_info` lives across the call.
        let pool = match unsafe { device.create_command_pool(&pool_info, None) } {
            Ok(p) => p,
            Err(e) => {
                undo(&device, None);
                return Err(vk_err("cannot create a command pool")(e));
            }
        };
        let alloc = vk::CommandBufferAllocateInfo::default()
            .command_pool(pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: the pool is live; `alloc` lives across the call.
        let cmd = match unsafe { device.allocate_command_buffers(&alloc) } {
            Ok(c) => c[0],
            Err(e) => {
                undo(&device, Some(pool));
                return Err(vk_err("cannot allocate a command buffer")(e));
            }
        };
        // SAFETY: `device` is live.
        let fence = match unsafe { device.create_fence(&vk::FenceCreateInfo::default(), None) } {
            Ok(f) => f,
            Err(e) => {
                undo(&device, Some(pool));
                return Err(vk_err("cannot create a fence")(e));
            }
        };
        let sizes = [vk::DescriptorPoolSize {
            ty: vk::DescriptorType::STORAGE_BUFFER,
            descriptor_count: 3 * MAX_SETS,
        }];
        let dinfo = vk::DescriptorPoolCreateInfo::default()
            .flags(vk::DescriptorPoolCreateFlags::FREE_DESCRIPTOR_SET)
            .max_sets(MAX_SETS)
            .pool_sizes(&sizes);
        // SAFETY: `device` is live; `dinfo` lives across the call.
        let descriptors = match unsafe { device.create_descriptor_pool(&dinfo, None) } {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: made above; nothing uses it.
                unsafe { device.destroy_fence(fence, None) };
                undo(&device, Some(pool));
                return Err(vk_err("cannot create a descriptor pool")(e));
            }
        };
        let host = ash::ext::external_memory_host::Device::new(&inst.instance, &device);
        Ok(Arc::new(Dev {
            inst,
            device,
            host,
            submit: Mutex::new(Submit {
                queue,
                pool,
                cmd,
                fence,
            }),
            pipelines: Default::default(),
            descriptors: Mutex::new(descriptors),
            lost: AtomicBool::new(false),
            device_addresses,
            kept: Mutex::default(),
        }))
    }

    /// Records commands with `record`, submits them and waits until they completed.
    pub(super) fn run(
        &self,
        record: impl FnOnce(&ash::Device, vk::CommandBuffer),
    ) -> Result<(), Fault> {
        if self.lost.load(Ordering::Acquire) {
            return Err(Fault::new(fault::TIMEOUT, 0));
        }
        let s = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let d = &self.device;
        let begin = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: the command buffer is ours (under the lock) and not pending: every earlier
        // submission was waited for.
        let r = unsafe { d.begin_command_buffer(s.cmd, &begin) };
        r.map_err(|e| self.failed(e))?;
        // Everything earlier submissions (and the host) wrote is visible to these commands,
        // and what they write is visible to the host once the fence signals.
        let before = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::MEMORY_WRITE | vk::AccessFlags::HOST_WRITE)
            .dst_access_mask(vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE)];
        // SAFETY: recording into our command buffer.
        unsafe {
            d.cmd_pipeline_barrier(
                s.cmd,
                vk::PipelineStageFlags::ALL_COMMANDS | vk::PipelineStageFlags::HOST,
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::DependencyFlags::empty(),
                &before,
                &[],
                &[],
            )
        };
        record(d, s.cmd);
        let after = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::MEMORY_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ | vk::AccessFlags::MEMORY_READ)];
        // SAFETY: as above.
        unsafe {
            d.cmd_pipeline_barrier(
                s.cmd,
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::PipelineStageFlags::HOST | vk::PipelineStageFlags::ALL_COMMANDS,
                vk::DependencyFlags::empty(),
                &after,
                &[],
                &[],
            )
        };
        // SAFETY: recording began above.
        unsafe { d.end_command_buffer(s.cmd) }.map_err(|e| self.failed(e))?;
        let cmds = [s.cmd];
        let submit = [vk::SubmitInfo::default().command_buffers(&cmds)];
        // SAFETY: the queue and fence are ours (under the lock); the fence is unsignalled
        // (reset after every wait); `submit` lives across the call.
        unsafe { d.queue_submit(s.queue, &submit, s.fence) }.map_err(|e| self.failed(e))?;
        // SAFETY: the fence is live and was just submitted.
        let waited = unsafe { d.wait_for_fences(&[s.fence], true, u64::MAX) };
        // SAFETY: the fence is live; it has signalled (or the device is lost).
        let reset = unsafe { d.reset_fences(&[s.fence]) };
        waited.and(reset).map_err(|e| self.failed(e))
    }

    /// Marks the device lost, as a failed call would (tests).
    #[cfg(test)]
    pub(super) fn lose(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// Whether a call reported the device lost.
    pub(super) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// A failed call: the device is unusable from now on (this vGPU faults; its neighbours,
    /// on devices of their own, go on).
    fn failed(&self, e: vk::Result) -> Fault {
        tracing::error!("Vulkan device failed: {e}");
        self.lost.store(true, Ordering::Release);
        Fault::new(fault::TIMEOUT, 0)
    }

    /// Imports `[ptr, ptr + len)` of this process's memory as a buffer.
    ///
    /// # Safety
    ///
    /// The range must be one mapping, aligned to the device's import alignment, that stays
    /// mapped for as long as the returned buffer lives.
    pub(super) unsafe fn import(
        self: &Arc<Self>,
        ptr: *mut u8,
        len: u64,
    ) -> Result<HostBuffer, BackendError> {
        let handle = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
        let mut props = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: the device is live, `ptr` a host pointer (the caller's contract), `props`
        // writable for the call.
        let r = unsafe {
            (self.host.fp().get_memory_host_pointer_properties_ext)(
                self.device.handle(),
                handle,
                ptr.cast(),
                &mut props,
            )
        };
        r.result()
            .map_err(vk_err("the device refuses this host memory"))?;
        let mem = &self.inst.memory;
        let pick = |want: vk::MemoryPropertyFlags| {
            (0..mem.memory_type_count).find(|&i| {
                props.memory_type_bits & (1 << i) != 0
                    && mem.memory_types[i as usize].property_flags.contains(want)
            })
        };
        let kind = pick(vk::MemoryPropertyFlags::HOST_COHERENT)
            .or_else(|| pick(vk::MemoryPropertyFlags::empty()))
            .ok_or_else(|| BackendError::Vulkan("no memory type can import host memory".into()))?;
        let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
            .handle_type(handle)
            .host_pointer(ptr.cast());
        let mut flags = Self::address_flags();
        let mut info = vk::MemoryAllocateInfo::default()
            .allocation_size(len)
            .memory_type_index(kind)
            .push_next(&mut import);
        if self.device_addresses {
            info = info.push_next(&mut flags);
        }
        // SAFETY: the device is live; the chain lives across the call; the caller keeps the
        // memory mapped for as long as the allocation lives.
        let memory = unsafe { self.device.allocate_memory(&info, None) }
            .map_err(vk_err("cannot import host memory"))?;
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle);
        let binfo = self.buffer_info(len).push_next(&mut external);
        let free = |m| {
            // SAFETY: `m` was allocated above and nothing uses it.
            unsafe { self.device.free_memory(m, None) }
        };
        // SAFETY: the device is live; `binfo` and its chain live across the call.
        let buffer = match unsafe { self.device.create_buffer(&binfo, None) } {
            Ok(b) => b,
            Err(e) => {
                free(memory);
                return Err(vk_err("cannot create a buffer")(e));
            }
        };
        // SAFETY: buffer and memory are ours, unbound, and the memory is `len` bytes.
        if let Err(e) = unsafe { self.device.bind_buffer_memory(buffer, memory, 0) } {
            // SAFETY: the buffer was made above and nothing uses it.
            unsafe { self.device.destroy_buffer(buffer, None) };
            free(memory);
            return Err(vk_err("cannot bind imported memory")(e));
        }
        Ok(HostBuffer {
            dev: self.clone(),
            buffer,
            memory,
        })
    }
}

impl Dev {
    /// A buffer of `len` bytes that copies and shaders use (by device address too, on a
    /// device made with them).
    fn buffer_info<'a>(&self, len: u64) -> vk::BufferCreateInfo<'a> {
        let mut usage = vk::BufferUsageFlags::TRANSFER_SRC
            | vk::BufferUsageFlags::TRANSFER_DST
            | vk::BufferUsageFlags::STORAGE_BUFFER;
        if self.device_addresses {
            usage |= vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS;
        }
        vk::BufferCreateInfo::default()
            .size(len)
            .usage(usage)
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
    }

    /// What memory for a device made with device addresses is allocated with (chained only
    /// on such a device).
    fn address_flags<'a>() -> vk::MemoryAllocateFlagsInfo<'a> {
        vk::MemoryAllocateFlagsInfo::default().flags(vk::MemoryAllocateFlags::DEVICE_ADDRESS)
    }

    /// The device address of `buffer`'s first byte, on a device made with
    /// [`Dev::with_device_addresses`] (`None` on others).
    pub(super) fn address(&self, buffer: vk::Buffer) -> Option<u64> {
        if !self.device_addresses {
            return None;
        }
        let info = vk::BufferDeviceAddressInfo::default().buffer(buffer);
        // SAFETY: the device was made with bufferDeviceAddress, and `buffer` (a buffer of
        // this device, bound to memory allocated with DEVICE_ADDRESS) has the usage.
        Some(unsafe { self.device.get_buffer_device_address(&info) })
    }
}

/// Tests: device-local VRAM behaves as if the host could not map it (every access through a
/// staging buffer), as on a discrete GPU; lavapipe's device memory is host-visible.
#[cfg(test)]
pub(crate) static UNMAPPED_VRAM: AtomicBool = AtomicBool::new(false);

/// Descriptor sets one device can have at once (one per running kernel).
const MAX_SETS: u32 = 16;

impl Dev {
    /// `len` bytes of device-local memory (a vGPU's VRAM on a GPU whose VRAM the host cannot
    /// map into a guest), mapped for the host too where the device allows it.
    pub(super) fn device_local(self: &Arc<Self>, len: u64) -> Result<DeviceBuffer, vk::Result> {
        let local = vk::MemoryPropertyFlags::DEVICE_LOCAL;
        let host = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let b = self.allocate(len, local | host, local)?;
        #[cfg(test)]
        let b = {
            let mut b = b;
            if UNMAPPED_VRAM.load(Ordering::Relaxed) {
                // As on a GPU whose VRAM the host cannot map (the mapping stays until the
                // memory is freed; nothing uses it).
                b.raw.ptr = None;
            }
            b
        };
        Ok(b)
    }

    /// `len` bytes of memory of a type with `prefer` (else `require`), bound to a buffer and
    /// mapped when host-visible.
    pub(super) fn allocate(
        self: &Arc<Self>,
        len: u64,
        prefer: vk::MemoryPropertyFlags,
        require: vk::MemoryPropertyFlags,
    ) -> Result<DeviceBuffer, vk::Result> {
        let len = len.max(4).next_multiple_of(4);
        let binfo = self.buffer_info(len);
        // SAFETY: the device is live; `binfo` lives across the call.
        let buffer = unsafe { self.device.create_buffer(&binfo, None) }?;
        // SAFETY: the buffer was just made on this device.
        let req = unsafe { self.device.get_buffer_memory_requirements(buffer) };
        let mem = &self.inst.memory;
        let pick = |want: vk::MemoryPropertyFlags| {
            (0..mem.memory_type_count).find(|&i| {
                req.memory_type_bits & (1 << i) != 0
                    && mem.memory_types[i as usize].property_flags.contains(want)
            })
        };
        let kind = pick(prefer).or_else(|| pick(require));
        let destroy = || {
            // SAFETY: made above; nothing uses it.
            unsafe { self.device.destroy_buffer(buffer, None) }
        };
        let Some(kind) = kind else {
            destroy();
            return Err(vk::Result::ERROR_OUT_OF_DEVICE_MEMORY);
        };
        let mut flags = Self::address_flags();
        let mut info = vk::MemoryAllocateInfo::default()
            .allocation_size(req.size)
            .memory_type_index(kind);
        if self.device_addresses {
            info = info.push_next(&mut flags);
        }
        // SAFETY: the device is live; `info` lives across the call.
        let memory = match unsafe { self.device.allocate_memory(&info, None) } {
            Ok(m) => m,
            Err(e) => {
                destroy();
                return Err(e);
            }
        };
        let free = || {
            // SAFETY: allocated above; nothing uses it.
            unsafe { self.device.free_memory(memory, None) };
            destroy();
        };
        // SAFETY: buffer and memory are ours and unbound; the memory is large enough.
        if let Err(e) = unsafe { self.device.bind_buffer_memory(buffer, memory, 0) } {
            free();
            return Err(e);
        }
        let visible = mem.memory_types[kind as usize].property_flags.contains(
            vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT,
        );
        let ptr = if visible {
            // SAFETY: host-visible memory, not mapped yet.
            match unsafe {
                self.device
                    .map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
            } {
                Ok(p) => Some(p.cast::<u8>()),
                Err(e) => {
                    free();
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(DeviceBuffer {
            dev: self.clone(),
            raw: Raw {
                buffer,
                memory,
                ptr,
                cap: len,
            },
            len,
            kept: false,
        })
    }

    /// Frees a buffer and its memory (unmapping it) that nothing in flight uses.
    pub(super) fn free_raw(&self, raw: Raw) {
        // SAFETY: the buffer and memory were made on this device, and no submission uses
        // them (every one is waited for before its buffers are given back).
        unsafe { self.device.destroy_buffer(raw.buffer, None) };
        // SAFETY: as above; freeing unmaps it.
        unsafe { self.device.free_memory(raw.memory, None) };
    }

    /// A descriptor set of `layout` binding `buffers` (whole) at 0, 1, ….
    pub(super) fn descriptor_set(
        &self,
        layout: vk::DescriptorSetLayout,
        buffers: &[vk::Buffer],
    ) -> Result<vk::DescriptorSet, vk::Result> {
        let pool = self.descriptors.lock().unwrap_or_else(|e| e.into_inner());
        let layouts = [layout];
        let info = vk::DescriptorSetAllocateInfo::default()
            .descriptor_pool(*pool)
            .set_layouts(&layouts);
        // SAFETY: the pool is ours (under its lock) and `info` lives across the call.
        let set = unsafe { self.device.allocate_descriptor_sets(&info) }?[0];
        drop(pool);
        let infos: Vec<[vk::DescriptorBufferInfo; 1]> = buffers
            .iter()
            .map(|&b| {
                [vk::DescriptorBufferInfo::default()
                    .buffer(b)
                    .range(vk::WHOLE_SIZE)]
            })
            .collect();
        let writes: Vec<vk::WriteDescriptorSet> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(i as u32)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(info)
            })
            .collect();
        // SAFETY: the set is new and unused; the buffers are live buffers of this device.
        unsafe { self.device.update_descriptor_sets(&writes, &[]) };
        Ok(set)
    }

    /// Frees a set from [`Dev::descriptor_set`] that no submission uses any more.
    pub(super) fn free_set(&self, set: vk::DescriptorSet) {
        let pool = self.descriptors.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the pool is ours (under its lock), was made with FREE_DESCRIPTOR_SET, and
        // nothing in flight uses the set (every submission is waited for).
        let _ = unsafe { self.device.free_descriptor_sets(*pool, &[set]) };
    }
}

/// Device memory the host maps, bound to one buffer; freed on drop.
pub(super) struct DeviceBuffer {
    dev: Arc<Dev>,
    /// The handles, the host mapping (for host-visible memory) and the bytes allocated.
    raw: Raw,
    /// The bytes its user asked for (at most `raw.cap`).
    pub(super) len: u64,
    /// Staging: given back to the device's keeping when dropped, not freed.
    pub(super) kept: bool,
}

// SAFETY: the mapping is plain memory that only this owner reads and writes (after the
// submissions that use it completed); the handles are thread-agnostic.
unsafe impl Send for DeviceBuffer {}
// SAFETY: as above; `&self` only reads.
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// The buffer.
    pub(super) fn buffer(&self) -> vk::Buffer {
        self.raw.buffer
    }

    /// A staging buffer the device kept, now `len` bytes for a new user.
    pub(super) fn from_raw(dev: Arc<Dev>, raw: Raw, len: u64) -> DeviceBuffer {
        DeviceBuffer {
            dev,
            raw,
            len,
            kept: true,
        }
    }

    /// The mapped bytes (read them only when no submission writing them is in flight); empty
    /// when the memory is not host-visible.
    pub(super) fn bytes(&self) -> &[u8] {
        match self.raw.ptr {
            // SAFETY: `p` maps `cap` >= `len` bytes for as long as the memory lives (this struct).
            Some(p) => unsafe { std::slice::from_raw_parts(p, self.len as usize) },
            None => &[],
        }
    }

    /// Writes `data` at `offset` of a host-visible buffer; `false` when it is not mapped or
    /// the range does not fit.
    pub(super) fn write_at(&self, offset: u64, data: &[u8]) -> bool {
        let fits = offset
            .checked_add(data.len() as u64)
            .is_some_and(|e| e <= self.len);
        match self.raw.ptr {
            Some(p) if fits => {
                // SAFETY: `offset` lies inside the `len` mapped bytes (checked).
                let dst = unsafe { p.add(offset as usize) };
                // SAFETY: `offset + data.len()` lies inside the mapping (checked); the memory
                // is plain device memory that the device model writes only between the
                // submissions that use it, like guest RAM.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
                true
            }
            _ => false,
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let raw = Raw {
            ptr: self.raw.ptr.take(),
            ..self.raw
        };
        match self.kept {
            true => {
                if let Err(raw) = self.dev.keep(raw) {
                    self.dev.free_staging(raw);
                }
            }
            false => self.dev.free_raw(raw),
        }
    }
}

/// Host memory imported into a vGPU's device, bound to one buffer; freed on drop.
pub(super) struct HostBuffer {
    dev: Arc<Dev>,
    pub(super) buffer: vk::Buffer,
    memory: vk::DeviceMemory,
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: no submission is in flight (each is waited for), so nothing uses the buffer.
        unsafe { self.dev.device.destroy_buffer(self.buffer, None) };
        // SAFETY: as above; the buffer bound to it is gone.
        unsafe { self.dev.device.free_memory(self.memory, None) };
    }
}
