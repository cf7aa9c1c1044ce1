//! The built-in kernels as compute pipelines on a vGPU's device, made on first use. The
//! shaders are GLSL in `shaders/`, compiled to the SPIR-V committed beside them (a test
//! recompiles them with glslangValidator and compares).

use ash::vk;

use super::device::Dev;

/// A built-in kernel's shader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shader {
    Saxpy,
    Sgemm,
    Reduce,
    Crc32,
    Spin,
    /// SAXPY through a page table of device addresses (`scatter_costs` only; the device
    /// must have been made with device addresses).
    SaxpyPages,
}

impl Shader {
    pub(super) const ALL: [Shader; 6] = [
        Shader::Saxpy,
        Shader::Sgemm,
        Shader::Reduce,
        Shader::Crc32,
        Shader::Spin,
        Shader::SaxpyPages,
    ];

    /// Its file name in `shaders/`, without extension.
    #[cfg(test)]
    pub(super) fn name(self) -> &'static str {
        match self {
            Shader::Saxpy => "saxpy",
            Shader::Sgemm => "sgemm",
            Shader::Reduce => "reduce",
            Shader::Crc32 => "crc32",
            Shader::Spin => "spin",
            Shader::SaxpyPages => "saxpy_pages",
        }
    }

    /// The committed SPIR-V.
    pub(super) fn spirv(self) -> &'static [u8] {
        match self {
            Shader::Saxpy => include_bytes!("shaders/saxpy.spv"),
            Shader::Sgemm => include_bytes!("shaders/sgemm.spv"),
            Shader::Reduce => include_bytes!("shaders/reduce.spv"),
            Shader::Crc32 => include_bytes!("shaders/crc32.spv"),
            Shader::Spin => include_bytes!("shaders/spin.spv"),
            Shader::SaxpyPages => include_bytes!("shaders/saxpy_pages.spv"),
        }
    }

    /// Storage buffers it binds (0..n).
    pub(super) fn buffers(self) -> u32 {
        match self {
            Shader::Sgemm => 3,
            Shader::Spin | Shader::SaxpyPages => 1,
            _ => 2,
        }
    }

    /// Bytes of push constants.
    fn push_size(self) -> u32 {
        match self {
            Shader::Saxpy | Shader::Reduce | Shader::Crc32 => 12,
            Shader::Sgemm | Shader::SaxpyPages => 16,
            Shader::Spin => 8,
        }
    }
}

/// One kernel's pipeline and what it binds.
pub(super) struct Pipeline {
    pub(super) set_layout: vk::DescriptorSetLayout,
    pub(super) layout: vk::PipelineLayout,
    pub(super) pipeline: vk::Pipeline,
}

impl Pipeline {
    /// Makes `shader`'s pipeline on `device`.
    pub(super) fn new(device: &ash::Device, shader: Shader) -> Result<Pipeline, vk::Result> {
        let words = ash::util::read_spv(&mut std::io::Cursor::new(shader.spirv()))
            .map_err(|_| vk::Result::ERROR_INVALID_SHADER_NV)?;
        let bindings: Vec<vk::DescriptorSetLayoutBinding> = (0..shader.buffers())
            .map(|b| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(b)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        let set_info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
        // SAFETY: `device` is live; `set_info` and what it points to live across the call.
        let set_layout = unsafe { device.create_descriptor_set_layout(&set_info, None) }?;
        let layouts = [set_layout];
        let ranges = [vk::PushConstantRange::default()
            .stage_flags(vk::ShaderStageFlags::COMPUTE)
            .size(shader.push_size())];
        let layout_info = vk::PipelineLayoutCreateInfo::default()
            .set_layouts(&layouts)
            .push_constant_ranges(&ranges);
        let module_info = vk::ShaderModuleCreateInfo::default().code(&words);
        let destroy_set = || {
            // SAFETY: made above on `device`; nothing uses it.
            unsafe { device.destroy_descriptor_set_layout(set_layout, None) }
        };
        // SAFETY: as above.
        let layout = match unsafe { device.create_pipeline_layout(&layout_info, None) } {
            Ok(l) => l,
            Err(e) => {
                destroy_set();
                return Err(e);
            }
        };
        let destroy_layout = || {
            // SAFETY: made above on `device`; nothing uses it.
            unsafe { device.destroy_pipeline_layout(layout, None) };
            destroy_set();
        };
        // SAFETY: as above; the words are SPIR-V (checked by `read_spv`'s magic and the test
        // that rebuilds them).
        let module = match unsafe { device.create_shader_module(&module_info, None) } {
            Ok(m) => m,
            Err(e) => {
                destroy_layout();
                return Err(e);
            }
        };
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(c"main");
        // Slices of a dispatch start at a group other than 0 (`vkCmdDispatchBase`).
        let info = [vk::ComputePipelineCreateInfo::default()
            .flags(vk::PipelineCreateFlags::DISPATCH_BASE)
            .stage(stage)
            .layout(layout)];
        // SAFETY: as above.
        let made =
            unsafe { device.create_compute_pipelines(vk::PipelineCache::null(), &info, None) };
        // SAFETY: the module is only needed while the pipeline is made.
        unsafe { device.destroy_shader_module(module, None) };
        match made {
            Ok(p) => Ok(Pipeline {
                set_layout,
                layout,
                pipeline: p[0],
            }),
            Err((_, e)) => {
                destroy_layout();
                Err(e)
            }
        }
    }

    /// Records a dispatch of workgroups `first..first + count` across x, `rows` down y, with
    /// `set` bound and `push` as the push constants.
    ///
    /// # Safety
    ///
    /// `cmd` is a command buffer of `device` (this pipeline's) being recorded; `set` was made
    /// with this pipeline's set layout on `device` and binds live buffers; `push` is the
    /// layout's push-constant range; the groups lie inside the kernel's.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn record(
        &self,
        device: &ash::Device,
        cmd: vk::CommandBuffer,
        set: vk::DescriptorSet,
        push: &[u8],
        first: u32,
        count: u32,
        rows: u32,
    ) {
        let compute = vk::PipelineBindPoint::COMPUTE;
        // SAFETY: the caller's contract: recording into `device`'s command buffer with this
        // pipeline, its layout and a set of that layout.
        unsafe { device.cmd_bind_pipeline(cmd, compute, self.pipeline) };
        // SAFETY: as above.
        unsafe { device.cmd_bind_descriptor_sets(cmd, compute, self.layout, 0, &[set], &[]) };
        // SAFETY: as above; `push` matches the layout's range.
        unsafe {
            device.cmd_push_constants(cmd, self.layout, vk::ShaderStageFlags::COMPUTE, 0, push)
        };
        // SAFETY: as above; the pipeline allows a base group (DISPATCH_BASE).
        unsafe { device.cmd_dispatch_base(cmd, first, 0, 0, count, rows, 1) };
    }

    /// Destroys it.
    ///
    /// # Safety
    ///
    /// Nothing may use it any more.
    pub(super) unsafe fn destroy(&self, device: &ash::Device) {
        // SAFETY: the caller's contract.
        unsafe { device.destroy_pipeline(self.pipeline, None) };
        // SAFETY: as above.
        unsafe { device.destroy_pipeline_layout(self.layout, None) };
        // SAFETY: as above.
        unsafe { device.destroy_descriptor_set_layout(self.set_layout, None) };
    }
}

/// Makes `dev`'s pipeline for `shader` on first use.
pub(super) fn get(dev: &Dev, shader: Shader) -> Result<&Pipeline, vk::Result> {
    let slot = &dev.pipelines[Shader::ALL.iter().position(|&s| s == shader).unwrap_or(0)];
    if let Some(p) = slot.get() {
        return Ok(p);
    }
    let p = Pipeline::new(&dev.device, shader)?;
    if let Err(p) = slot.set(p) {
        // Another thread made it first.
        // SAFETY: `p` was never used.
        unsafe { p.destroy(&dev.device) };
    }
    slot.get().ok_or(vk::Result::ERROR_INITIALIZATION_FAILED)
}
