//! `tessera bench …`: side-by-side benchmarks that print medians and ratios from one run.

mod boot;
mod migrate;
mod scatter;
mod sched;
mod session;
mod soak;
mod vgpu;
mod vms;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Firmware boot time: Tessera vs QEMU microvm booting the same PVH ELF.
    Boot(boot::BootArgs),
    /// vGPU fast paths, guest vs native throughput, start to first fence.
    Vgpu(vgpu::VgpuArgs),
    /// Many vGPUs on one GPU: fairness, weights, utilization, preemption, scale, switch cost.
    Sched(sched::SchedArgs),
    /// N firmware VMs sharing one GPU, each running a load.
    Vms(vms::VmsArgs),
    /// Eight tenants on one vGPU server for N minutes: every result checked, server growth.
    Soak(soak::SoakArgs),
    /// GPU sessions without a VM: throughput against the device, per-call latency, pipelined
    /// call rate.
    Session(session::SessionArgs),
    /// Live migration of a busy firmware VM that writes RAM and VRAM between two processes:
    /// downtime and total time per vGPU profile.
    Migrate(migrate::MigrateArgs),
    /// Kernel operands scattered page by page: gather/scatter through staging buffers vs a
    /// page table of device addresses, on one Vulkan device.
    Scatter(scatter::ScatterArgs),
}

pub fn run(cmd: BenchCommand) -> ExitCode {
    let result = match cmd {
        BenchCommand::Boot(args) => boot::run(args),
        BenchCommand::Vgpu(args) => vgpu::run(args),
        BenchCommand::Sched(args) => sched::run(args),
        BenchCommand::Vms(args) => vms::run(args),
        BenchCommand::Soak(args) => soak::run(args),
        BenchCommand::Session(args) => session::run(args),
        BenchCommand::Migrate(args) => migrate::run(args),
        BenchCommand::Scatter(args) => scatter::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: bench: {e}");
            ExitCode::from(crate::EXIT_FAILURE)
        }
    }
}

/// The firmware image: `TESSERA_FIRMWARE`, else `target/firmware/tessera-fw.elf` next to the
/// build directory this binary runs from, else relative to the current directory.
pub fn default_firmware() -> PathBuf {
    if let Some(p) = std::env::var_os("TESSERA_FIRMWARE") {
        return PathBuf::from(p);
    }
    let rel = PathBuf::from("firmware/tessera-fw.elf");
    if let Some(target) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().and_then(|d| d.parent()).map(|t| t.join(&rel)))
        .filter(|p| p.exists())
    {
        return target;
    }
    PathBuf::from("target").join(rel)
}

/// Progress lines on stderr while a benchmark runs (stdout keeps only the report), one per
/// step: `tessera: bench sched [3/7, 12.4 s]: best effort, 4 busy + 4 idle`.
#[derive(Debug)]
pub struct Progress {
    what: &'static str,
    total: usize,
    done: usize,
    start: std::time::Instant,
}

impl Progress {
    /// A benchmark `what` of `total` steps.
    pub fn new(what: &'static str, total: usize) -> Self {
        Progress {
            what,
            total,
            done: 0,
            start: std::time::Instant::now(),
        }
    }

    /// Steps so far.
    pub fn done(&self) -> usize {
        self.done
    }

    /// Says that the next step, `step`, begins.
    pub fn step(&mut self, step: impl std::fmt::Display) {
        self.done += 1;
        eprintln!("{}", self.line(&step));
    }

    fn line(&self, step: &dyn std::fmt::Display) -> String {
        format!(
            "tessera: bench {} [{}/{}, {:.1} s]: {step}",
            self.what,
            self.done,
            self.total,
            self.start.elapsed().as_secs_f64()
        )
    }
}

/// Median of a non-empty sample (mean of the middle two for even counts).
pub fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Prints a report as pretty JSON on stdout, with the `schema` version every Tessera JSON
/// document carries.
pub fn print_json(report: &impl serde::Serialize) -> Result<(), String> {
    let mut v = serde_json::to_value(report).map_err(|e| e.to_string())?;
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "schema".into(),
            serde_json::json!(vgpu_server::control::SCHEMA),
        );
    }
    let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Progress, median};

    #[test]
    fn progress_lines_count_steps() {
        let mut p = Progress::new("sched", 7);
        p.done = 3;
        let l = p.line(&"best effort");
        assert!(
            l.starts_with("tessera: bench sched [3/7, 0.") && l.ends_with(" s]: best effort"),
            "{l}"
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
