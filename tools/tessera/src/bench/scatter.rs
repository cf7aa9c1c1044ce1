//! `tessera bench scatter`: a kernel's operands scattered page by page in guest-like memory,
//! reached through staging buffers (gather/scatter, what the Vulkan backend does) or through a
//! page table of device addresses, side by side on one Vulkan device
//! (`vgpu::backend::vulkan::VulkanGpu::scatter_costs`).

use clap::Args;
use serde::Serialize;
use vgpu::backend::vulkan::VulkanGpu;
use vgpu::physical::GpuKind;

/// Options.
#[derive(Debug, Args)]
pub struct ScatterArgs {
    /// The Vulkan device: vulkan[,device=N].
    #[arg(long, value_name = "vulkan[,device=N]", default_value = "vulkan")]
    gpu: GpuKind,
    /// MiB per operand (SAXPY's x and y each), 1 to 1024.
    #[arg(long, default_value_t = 16)]
    mib: u64,
    /// Timed packets on each path (medians are reported).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    device: String,
    mib_per_operand: u64,
    pages_per_operand: u64,
    runs: usize,
    gather_ms: f64,
    /// Of `gather_ms`: allocating the staging buffers.
    staging_alloc_ms: f64,
    staged_kernel_ms: f64,
    scatter_ms: f64,
    gather_scatter_ms: f64,
    /// The gather/scatter packet again with staging buffers kept from an earlier packet.
    warm_gather_ms: f64,
    warm_gather_scatter_ms: f64,
    table_ms: f64,
    table_kernel_ms: f64,
    device_address_ms: f64,
    /// `device_address_ms / gather_scatter_ms`: below 1, the page table is faster.
    device_address_over_gather_scatter: f64,
}

pub fn run(args: ScatterArgs) -> Result<(), String> {
    let GpuKind::Vulkan { device, .. } = args.gpu else {
        return Err("--gpu: this benchmark measures a Vulkan device (vulkan[,device=N])".into());
    };
    let gpu = VulkanGpu::new(device, 1 << 20).map_err(|e| e.to_string())?;
    let c = gpu
        .scatter_costs(args.mib, args.runs)
        .map_err(|e| e.to_string())?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let r = Report {
        device: vgpu::backend::GpuBackend::name(&gpu),
        mib_per_operand: args.mib,
        pages_per_operand: c.extents,
        runs: c.runs,
        gather_ms: ms(c.gather),
        staging_alloc_ms: ms(c.staging_alloc),
        staged_kernel_ms: ms(c.staged_kernel),
        scatter_ms: ms(c.scatter),
        gather_scatter_ms: ms(c.staged),
        warm_gather_ms: ms(c.warm_gather),
        warm_gather_scatter_ms: ms(c.warm_staged),
        table_ms: ms(c.table),
        table_kernel_ms: ms(c.table_kernel),
        device_address_ms: ms(c.device_address),
        device_address_over_gather_scatter: c.ratio(),
    };
    if args.json {
        return super::print_json(&r);
    }
    println!(
        "{}: SAXPY, x and y of {} MiB each, every 4 KiB page elsewhere, medians of {} packets",
        r.device, r.mib_per_operand, r.runs
    );
    println!(
        "gather/scatter   {:>9.2} ms  (gather {:.2}, of which allocating staging {:.2}; \
         kernel {:.2}; scatter {:.2})",
        r.gather_scatter_ms, r.gather_ms, r.staging_alloc_ms, r.staged_kernel_ms, r.scatter_ms
    );
    println!(
        "  staging kept   {:>9.2} ms  (gather {:.2})",
        r.warm_gather_scatter_ms, r.warm_gather_ms
    );
    println!(
        "device addresses {:>9.2} ms  (page table {:.2} + kernel {:.2})",
        r.device_address_ms, r.table_ms, r.table_kernel_ms
    );
    println!(
        "device addresses / gather-scatter: {:.3}",
        r.device_address_over_gather_scatter
    );
    Ok(())
}
