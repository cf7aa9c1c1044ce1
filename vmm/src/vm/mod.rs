//! One VM: its parts and state (here), how it is built (`build.rs`) and how it runs
//! (`run.rs`).

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::debug_exit::{DEBUG_EXIT_LEN, DEBUG_EXIT_PORT, DebugExit};
use devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use devices::pci::config::BarKind;
use devices::pci::root::{CONF1_BASE, CONF1_LEN};
use devices::pci::{BarAllocator, HostBridge, PciRoot};
use devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN, SerialDevice};
use devices::{Bus, BusDevice, EventFdTrigger, ExitHandle, ExitReason};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use vgpu::physical::{GpuSpec, Lease, PhysicalGpu};
use vgpu::sched::Params;
use vgpu::{BarAddresses, DmaDomain, Vgpu, VgpuSetup};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::boot::{self, BootSources};
use crate::config::VmSource;
use crate::config::{SerialConfig, VgpuConfig, VmConfig};
use crate::control::{ApiServer, Controls, PauseGate};
use crate::cpuid::{self, Feature};
use crate::event_loop::{ExitWatcher, SerialInput};
use crate::kvm_glue::{KvmMapper, KvmMsi, RamSlots};
use crate::memory::{self, GuestRam, PCI_MMIO32, PCI_MMIO64};
use crate::snapshot::Fingerprint;
use crate::vcpu::{self, VcpuRunner};
use crate::vm_snapshot::{Machine, Restore, Sources, VmSnapshotError};
use devices::files::open_regular;

mod build;
mod run;

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    KernelOpen {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs file cannot be opened.
    #[error("cannot open initramfs {path}")]
    InitramfsOpen {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The serial output file cannot be created.
    #[error("cannot listen on control socket {path}")]
    ApiSocket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open serial output file {path}")]
    SerialFile {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// /dev/kvm cannot be opened.
    #[error("cannot open {path} (is KVM available and accessible to this user?)")]
    KvmOpen {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The device node is not KVM.
    #[error("{path} is not a KVM device (KVM_GET_API_VERSION failed or returned {version})")]
    NotKvm {
        /// Path.
        path: String,
        /// The version it returned, or -1.
        version: i32,
    },
    /// More vCPUs than KVM supports.
    #[error("{requested} vCPUs requested but this host's KVM supports at most {max}")]
    TooManyCpus {
        /// Requested.
        requested: u8,
        /// KVM's limit.
        max: usize,
    },
    /// A KVM VM ioctl failed.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Loading the kernel.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// Device setup.
    #[error("cannot set up {what}")]
    Devices {
        /// Which device.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The event loop.
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    /// Threads or descriptors.
    #[error("cannot {0}")]
    Os(&'static str, #[source] std::io::Error),
    /// Sandboxing.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// A vfio-user device.
    #[error(transparent)]
    UserDevice(#[from] crate::user_device::UserDeviceError),
    /// The options do not fit together.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A snapshot that cannot be restored.
    #[error(transparent)]
    Snapshot(#[from] crate::vm_snapshot::VmSnapshotError),
    /// An incoming migration failed.
    #[error("migration: {0}")]
    Migration(String),
}

impl VmError {
    /// True when the error is about the user's arguments (exit status 2), not the host.
    pub fn is_usage(&self) -> bool {
        use boot::BootError as B;
        if let VmError::Snapshot(e) = self {
            return e.is_usage();
        }
        matches!(
            self,
            VmError::KernelOpen { .. }
                | VmError::InitramfsOpen { .. }
                | VmError::SerialFile { .. }
                | VmError::ApiSocket { .. }
                | VmError::TooManyCpus { .. }
                | VmError::Config(_)
                | VmError::UserDevice(
                    crate::user_device::UserDeviceError::NoSocket(_)
                        | crate::user_device::UserDeviceError::Untrusted { .. }
                )
                | VmError::Boot(
                    B::NotAKernel(_)
                        | B::NoPvhEntry(_)
                        | B::Load { .. }
                        | B::Cmdline(_)
                        | B::InitramfsTooLarge { .. }
                )
        )
    }
}

/// The signal that interrupts a vCPU thread in KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// A duplicate of standard descriptor `fd`, owned.
fn dup_fd(fd: libc::c_int, what: &'static str) -> Result<File, VmError> {
    // SAFETY: dup on a standard descriptor; the result is checked.
    let new = unsafe { libc::dup(fd) };
    if new < 0 {
        return Err(VmError::Os(what, std::io::Error::last_os_error()));
    }
    // SAFETY: `new` is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(new) })
}

fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |e| VmError::Os(what, e)
}

/// A built VM, ready to run.
pub struct Vm {
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    exit: ExitHandle,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    vcpus: Vec<VcpuRunner>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    stdin_input: bool,
    /// Install seccomp filters on the VMM's threads.
    seccomp: bool,
    /// Devices the buses refer to weakly.
    _devices: Vec<Arc<Mutex<dyn BusDevice>>>,
    /// VRAM and scheduling leases of the vGPUs, returned after the devices are gone.
    _leases: Vec<vgpu::physical::Lease>,
    /// The vGPUs (the PCI root refers to them too; they lock inside).
    vgpus: Vec<Arc<Vgpu>>,
    /// What the control socket acts on (the pause gate the vCPUs pass).
    controls: Controls,
    /// The control socket, when asked for.
    api: Option<ApiServer>,
}

/// Live statistics of a VM's vGPUs, usable from another thread while the VM runs (it reads
/// their monitors, never the devices, so a probe never waits behind a guest's `WAIT`).
#[derive(Debug, Clone)]
pub struct VgpuProbe(Vec<vgpu::device::VgpuMonitor>);

impl VgpuProbe {
    /// Per vGPU: scheduler statistics and device counters (queued packets, faults, resets).
    pub fn stats(&self) -> Vec<(vgpu::sched::MemberStats, (u64, u64, u64))> {
        self.0
            .iter()
            .map(|m| (m.sched_stats(), m.counters()))
            .collect()
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("ram", &self.ram.size)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Builds a VM from `config`: opens the files, creates the KVM VM and its devices, loads
    /// the kernel and configures the vCPUs. Nothing runs until [`Vm::run`]. Each vGPU gets a
    /// private GPU.
    pub fn new(config: &VmConfig) -> Result<Vm, VmError> {
        Self::with_gpu(config, None)
    }

    /// Puts a snapshot's (or an incoming migration's) state into this VM, built of its shape
    /// and not yet run: the UART, every vCPU (after its CPUID), then memory, the vGPUs, the
    /// KVM VM and the PCI root ([`Restore::devices`]). An error leaves a VM that must not run.
    pub fn apply(&mut self, r: &Restore) -> Result<(), VmError> {
        if let (Some(serial), Some(state)) = (&self.serial, r.serial()?) {
            serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(&state)
                .map_err(|why| VmSnapshotError::Section {
                    section: "serial".into(),
                    why,
                })?;
        }
        for v in &self.vcpus {
            r.vcpu(v.cpu)?
                .restore(&v.fd)
                .map_err(|e| VmSnapshotError::State(format!("vCPU {}: {e}", v.cpu)))?;
        }
        let sources = &self.controls.snapshot;
        r.devices(
            &self.vm_fd,
            &self.ram.file,
            self.ram.size,
            &self.vgpus,
            &sources.user,
            &sources.root,
        )?;
        Ok(())
    }

    /// A handle on the vGPUs' live statistics.
    pub fn vgpu_probe(&self) -> VgpuProbe {
        VgpuProbe(self.vgpus.iter().map(|v| v.monitor()).collect())
    }

    /// What a snapshot or migration of this VM must match.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.controls.snapshot.fingerprint
    }

    /// The vGPUs served over vfio-user.
    pub fn user_devices(&self) -> &[crate::user_device::UserHandle] {
        &self.controls.snapshot.user
    }

    /// The in-process vGPUs.
    pub fn vgpus(&self) -> &[Arc<Vgpu>] {
        &self.vgpus
    }

    /// Guest RAM as devices see it.
    pub fn guest_memory(&self) -> &vm_memory::GuestMemoryMmap {
        &self.ram.memory
    }

    /// The memfd backing guest RAM (for sharing it with another process).
    pub fn guest_memory_file(&self) -> &File {
        &self.ram.file
    }
}

pub use devices::error_chain;
