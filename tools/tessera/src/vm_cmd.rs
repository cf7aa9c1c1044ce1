//! `tessera vm`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use vmm::config::{
    ConsoleConfig, CpusConfig, MemoryConfig, SerialConfig, UserDeviceConfig, VgpuConfig, VmConfig,
};
use vmm::{ExitReason, Vm, error_chain};

use crate::{EXIT_FAILURE, EXIT_USAGE};

/// `tessera vm` options (Cloud Hypervisor style).
#[derive(Debug, Args)]
pub struct VmArgs {
    /// Kernel image: a PVH ELF (vmlinux, the Tessera firmware) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["restore", "receive_migration"])]
    kernel: Option<PathBuf>,
    /// Restore a snapshot directory (`tessera vmctl snapshot`) instead of booting a kernel:
    /// the VM's shape (vCPUs, RAM, vGPUs) comes from it; --serial, --api-socket and
    /// --seccomp apply, and --user-device names the vGPU instances here for a VM whose vGPUs
    /// are served over vfio-user (as many as it has). Cloud Hypervisor's flag: DIR or
    /// source_url=file://DIR.
    #[arg(
        long,
        value_name = "DIR",
        value_parser = parse_restore,
        conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory", "vgpu", "gpu"]
    )]
    restore: Option<PathBuf>,
    /// Wait for a VM sent by `tessera vmctl send-migration` at unix:PATH or tcp:IP:PORT and
    /// run it: its shape and state come from the sender; --serial, --api-socket and --seccomp
    /// apply, and --user-device names the vGPU instances here for a VM whose vGPUs are
    /// served over vfio-user (as many as it has).
    #[arg(
        long,
        value_name = "unix:PATH|tcp:IP:PORT",
        conflicts_with_all = ["restore", "kernel", "initramfs", "cmdline", "cpus", "memory", "vgpu", "gpu"]
    )]
    receive_migration: Option<vmm::migration::Peer>,
    /// Initramfs to load with the kernel.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// vCPUs: boot=<n>[,max=<n>][,hide=<feature>[:<feature>...]][,pvm_hide=on|off] or just
    /// <n> (max, Cloud Hypervisor's, must equal boot: no hotplug).
    #[arg(long, value_name = "boot=N", default_value = "boot=1")]
    cpus: CpusConfig,
    /// Guest RAM: size=<bytes>[K|M|G][,shared=on] or just <bytes>[K|M|G] (always shared).
    #[arg(long, value_name = "size=SIZE", default_value = "size=256M")]
    memory: MemoryConfig,
    /// COM1: stdio (or tty) | file=<path> | null (present, output discarded) | off (absent).
    #[arg(
        long,
        value_name = "stdio|tty|file=PATH|null|off",
        default_value = "stdio"
    )]
    serial: SerialConfig,
    /// Cloud Hypervisor's virtio console: Tessera has none, so only off is accepted.
    #[arg(long, value_name = "off", default_value = "off")]
    console: ConsoleConfig,
    /// An in-process vGPU on a private GPU (see --gpu): profile=<name> (64M, 256M, 1G).
    /// Repeat for more.
    #[arg(long, value_name = "profile=NAME")]
    vgpu: Vec<VgpuConfig>,
    /// The GPU under the in-process vGPUs: soft, or a Vulkan device: vulkan[,device=N].
    #[arg(long, value_name = "soft|vulkan[,device=N]", default_value = "soft")]
    gpu: vgpu::physical::GpuKind,
    /// A vGPU served by `tessera serve` over vfio-user: socket=<path>[,owner=<uid>][,id=<name>]
    /// (the Cloud Hypervisor flag; see `tessera vgpu create`). Repeat for more.
    #[arg(long, value_name = "socket=PATH")]
    user_device: Vec<UserDeviceConfig>,
    /// Sandbox the VMM's threads with seccomp filters (false: for debugging only).
    #[arg(long, value_name = "true|false", default_value_t = true, action = clap::ArgAction::Set)]
    seccomp: bool,
    /// A control socket (mode 0600) for `tessera vmctl`: pause, resume, info, shutdown.
    /// Cloud Hypervisor's flag: PATH or path=PATH.
    #[arg(long, value_name = "PATH", value_parser = parse_api_socket)]
    api_socket: Option<PathBuf>,
}

/// `--restore DIR` or `source_url=file://DIR`.
fn parse_restore(s: &str) -> Result<PathBuf, String> {
    let p = match s.strip_prefix("source_url=") {
        Some(url) => url
            .strip_prefix("file://")
            .ok_or_else(|| format!("{s:?}: only file:// sources are supported"))?,
        None => s,
    };
    if p.is_empty() {
        return Err(format!("{s:?}: expected DIR or source_url=file://DIR"));
    }
    Ok(PathBuf::from(p))
}

/// `--api-socket PATH` or `path=PATH`.
fn parse_api_socket(s: &str) -> Result<PathBuf, String> {
    let p = s.strip_prefix("path=").unwrap_or(s);
    if p.is_empty() || p.contains(",") && s.starts_with("path=") {
        return Err(format!("{s:?}: expected PATH or path=PATH"));
    }
    Ok(PathBuf::from(p))
}

/// The KVM device node; tests override it with `TESSERA_KVM_DEVICE`.
fn kvm_path() -> PathBuf {
    std::env::var_os("TESSERA_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

pub fn run(args: VmArgs) -> ExitCode {
    let ConsoleConfig = args.console;
    let config = VmConfig {
        kernel: args.kernel.unwrap_or_default(),
        initramfs: args.initramfs,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory: args.memory,
        serial: args.serial,
        vgpus: args.vgpu,
        gpu: args.gpu,
        user_devices: args.user_device,
        kvm_path: kvm_path(),
        seccomp: args.seccomp,
        api_socket: args.api_socket,
        from: vmm::config::VmSource::Kernel,
    };
    let config = match &args.restore {
        Some(dir) => match vmm::vm_snapshot::restore_config(dir, &config) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tessera: cannot restore: {}", error_chain(&e));
                return ExitCode::from(if e.is_usage() {
                    EXIT_USAGE
                } else {
                    EXIT_FAILURE
                });
            }
        },
        None => config,
    };
    let vm = match &args.receive_migration {
        Some(peer) => {
            tracing::info!(%peer, "waiting for an incoming migration");
            vmm::migration::receive_vm(peer, &config)
        }
        None => Vm::new(&config),
    };
    let result = vm.and_then(Vm::run);
    match result {
        Ok(reason) => {
            match &reason {
                ExitReason::GuestCrash(why) => eprintln!("tessera: guest crashed: {why}"),
                ExitReason::Failure(why) => eprintln!("tessera: {why}"),
                ExitReason::DebugExit(v) => tracing::debug!("guest exited with status {v}"),
                ExitReason::PowerOff => tracing::debug!("guest powered off"),
            }
            ExitCode::from(reason.status() as u8)
        }
        Err(e) => {
            eprintln!("tessera: {}", error_chain(&e));
            ExitCode::from(if e.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            })
        }
    }
}
