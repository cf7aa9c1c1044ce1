//! `tessera`: run VMs and benchmarks.
//!
//! Exit status: 0 when the guest powers off, the debug-exit value when the guest uses the
//! debug-exit port, 1 on a runtime failure, 2 on bad usage (flags, files).

mod bench;
mod serve_cmd;
mod tls_cmd;
mod vgpu_cmd;
mod vm_cmd;
mod vmctl_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tessera: a KVM hypervisor that shares one GPU among many VMs.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, about, long_about = None)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace or a tracing directive list).
    #[arg(long, global = true, default_value = "info", env = "TESSERA_LOG")]
    log_level: String,
    /// Append log lines to this file instead of writing them to stderr.
    #[arg(long, global = true, value_name = "PATH")]
    log_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a VM from a kernel (PVH ELF or bzImage), or restore one from a snapshot.
    Vm(vm_cmd::VmArgs),
    /// Control a running VM through its --api-socket: pause, resume, info, shutdown, snapshot.
    Vmctl(vmctl_cmd::VmctlArgs),
    /// Benchmarks that compare Tessera with other VMMs side by side.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Own one (software) GPU and serve its vGPUs to other VMMs over vfio-user.
    Serve(serve_cmd::ServeArgs),
    /// Manage the vGPU instances of a running `tessera serve`: types, create, list, remove.
    Vgpu(vgpu_cmd::VgpuArgs),
    /// Live per-vGPU statistics of a running `tessera serve`.
    Top(vgpu_cmd::TopArgs),
    /// Certificates for GPU sessions over TCP with mutual TLS.
    #[command(subcommand)]
    Tls(tls_cmd::TlsCommand),
}

/// Status for bad usage.
pub const EXIT_USAGE: u8 = 2;
/// Status for runtime failures.
pub const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(EXIT_USAGE);
            }
            // One line: clap's first paragraph names the flag and the problem.
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            eprintln!("tessera: {}", first.join(" ").trim_start_matches("error: "));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Log lines carry UTC timestamps (RFC 3339), to stderr or appended to --log-file.
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match &cli.log_file {
        Some(path) => {
            let file = match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("tessera: --log-file {}: {e}", path.display());
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            log.with_writer(std::sync::Mutex::new(file))
                .with_ansi(false)
                .init();
        }
        None => log
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    match cli.command {
        Command::Vm(args) => vm_cmd::run(args),
        Command::Vmctl(args) => vmctl_cmd::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Serve(args) => serve_cmd::serve(args),
        Command::Vgpu(args) => vgpu_cmd::vgpu(args),
        Command::Top(args) => vgpu_cmd::top(args),
        Command::Tls(cmd) => tls_cmd::run(cmd),
    }
}
