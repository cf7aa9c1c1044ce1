//! Building and running one VM.

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

/// Where KVM's real-mode TSS goes (three pages just below the BIOS ROM area of 4 GiB).
const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// KVM's identity-map page for real mode on Intel, just below the TSS.
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

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

/// Restores the terminal's line discipline when dropped.
struct TermiosGuard(Option<libc::termios>);

impl TermiosGuard {
    /// Puts a terminal stdin in character mode without echo (signals still work).
    fn char_mode() -> Self {
        // SAFETY: isatty only inspects fd 0.
        if unsafe { libc::isatty(0) } != 1 {
            return TermiosGuard(None);
        }
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: t is a valid out-pointer for tcgetattr on fd 0.
        if unsafe { libc::tcgetattr(0, t.as_mut_ptr()) } != 0 {
            return TermiosGuard(None);
        }
        // SAFETY: tcgetattr succeeded, so t is initialized.
        let saved = unsafe { t.assume_init() };
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        // SAFETY: raw is a valid termios derived from the current one.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        TermiosGuard(Some(saved))
    }
}

impl Drop for TermiosGuard {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the termios read from fd 0 earlier.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that interrupts a vCPU thread in KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn dup_fd(fd: libc::c_int, what: &'static str) -> Result<File, VmError> {
    // SAFETY: dup on a standard descriptor; the result is checked.
    let new = unsafe { libc::dup(fd) };
    if new < 0 {
        return Err(VmError::Os(what, std::io::Error::last_os_error()));
    }
    // SAFETY: `new` is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(new) })
}

impl Vm {
    /// Builds a VM from `config`: opens the files, creates the KVM VM and its devices, loads
    /// the kernel and configures the vCPUs. Nothing runs until [`Vm::run`]. Each vGPU gets a
    /// private GPU.
    pub fn new(config: &VmConfig) -> Result<Vm, VmError> {
        Self::with_gpu(config, None)
    }

    /// Like [`Vm::new`], with the vGPUs placed on `shared_gpu` (many VMs, one GPU).
    pub fn with_gpu(
        config: &VmConfig,
        shared_gpu: Option<Arc<PhysicalGpu>>,
    ) -> Result<Vm, VmError> {
        let kpath = config.kernel.display().to_string();
        config.validate()?;
        // A restored VM boots nothing: its memory and registers come from the snapshot.
        let boots = config.from == VmSource::Kernel;
        let mut kernel = match boots {
            false => None,
            true => Some(
                open_regular(&config.kernel).map_err(|source| VmError::KernelOpen {
                    path: kpath.clone(),
                    source,
                })?,
            ),
        };
        let mut initramfs = match config.initramfs.as_ref().filter(|_| boots) {
            Some(p) => Some((
                open_regular(p).map_err(|source| VmError::InitramfsOpen {
                    path: p.display().to_string(),
                    source,
                })?,
                p.display().to_string(),
            )),
            None => None,
        };
        let serial_out: Option<Box<dyn Write + Send>> = match &config.serial {
            SerialConfig::Stdio => Some(Box::new(dup_fd(1, "duplicate stdout")?)),
            SerialConfig::File(p) => Some(Box::new(devices::files::open_output(p).map_err(
                |source| VmError::SerialFile {
                    path: p.display().to_string(),
                    source,
                },
            )?)),
            SerialConfig::Null => Some(Box::new(std::io::sink())),
            SerialConfig::Off => None,
        };

        let kvm = open_kvm(&config.kvm_path)?;
        let max = kvm.get_max_vcpus();
        if usize::from(config.cpus.boot) > max {
            return Err(VmError::TooManyCpus {
                requested: config.cpus.boot,
                max,
            });
        }
        let pvm = crate::pvm::host_is_pvm();
        let mut hidden: Vec<Feature> = config.cpus.hide.clone();
        if pvm && config.cpus.pvm_defaults {
            hidden.extend(
                cpuid::PVM_HIDDEN
                    .iter()
                    .filter_map(|n| n.parse::<Feature>().ok()),
            );
        }

        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("read KVM's supported CPUID", e))?;
        let fingerprint = Fingerprint {
            vcpus: config.cpus.boot,
            memory: config.memory.size,
            vgpus: config
                .vgpus
                .iter()
                .map(|v| v.profile.name.to_string())
                .collect(),
            cpu_features: cpuid::features(&cpuid::vcpu_cpuid(
                &base_cpuid,
                0,
                config.cpus.boot,
                &hidden,
            )),
        };
        // A snapshot is checked whole before anything is built.
        let restore = match &config.from {
            VmSource::Snapshot(dir) => Some(Restore::open(dir, &fingerprint)?),
            _ => None,
        };
        let msrs = crate::kvm_state::msr_index_list(&kvm)
            .map_err(|e| VmError::Os("list the MSRs KVM saves", std::io::Error::other(e)))?;

        let vm_fd = Arc::new(
            kvm.create_vm()
                .map_err(|e| VmError::Kvm("create the KVM VM", e))?,
        );
        vm_fd
            .set_tss_address(KVM_TSS_ADDR)
            .map_err(|e| VmError::Kvm("set the TSS address", e))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(|e| VmError::Kvm("set the identity map address", e))?;
        vm_fd
            .create_irq_chip()
            .map_err(|e| VmError::Kvm("create the in-kernel irqchip", e))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(|e| VmError::Kvm("create the in-kernel PIT", e))?;

        let ram = memory::create_guest_ram(config.memory.size)?;
        let mut ram_regions = Vec::new();
        for (slot, region) in ram.memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::Devices {
                    what: "guest RAM".into(),
                    source: "it has no host mapping".into(),
                })?;
            let mr = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which the Vm keeps for as
            // long as the KVM VM exists (vm_fd is dropped first, see field order).
            unsafe { vm_fd.set_user_memory_region(mr) }
                .map_err(|e| VmError::Kvm("register guest RAM with KVM", e))?;
            ram_regions.push(mr);
        }

        let exit = ExitHandle::new().map_err(os_err("create the exit event"))?;
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let mut devs: Vec<Arc<Mutex<dyn BusDevice>>> = Vec::new();
        let mut add_pio = |dev: Arc<Mutex<dyn BusDevice>>, base: u16, len: u16| {
            pio.insert(&dev, u64::from(base), u64::from(len))
                .map_err(devices_err(format!("the port device at {base:#x}")))?;
            devs.push(dev);
            Ok::<(), VmError>(())
        };

        let serial = match serial_out {
            Some(out) => {
                let irq = EventFd::new(EFD_NONBLOCK).map_err(os_err("create the serial IRQ"))?;
                vm_fd
                    .register_irqfd(&irq, COM1_IRQ)
                    .map_err(|e| VmError::Kvm("wire the serial interrupt", e))?;
                let s = Arc::new(Mutex::new(SerialDevice::new(EventFdTrigger::new(irq), out)));
                add_pio(s.clone(), COM1_BASE, COM1_LEN)?;
                Some(s)
            }
            None => None,
        };
        add_pio(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_BASE,
            I8042_LEN,
        )?;
        add_pio(
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
            DEBUG_EXIT_PORT,
            DEBUG_EXIT_LEN,
        )?;
        let ram_slots = ram.memory.num_regions() as u32;
        let mapper = Arc::new(KvmMapper::new(vm_fd.clone(), ram_slots));
        let mut root = PciRoot::new(mmio.clone(), vec![PCI_MMIO32, PCI_MMIO64])
            .with_guest_mapper(mapper.clone());
        root.add_device(0, Arc::new(Mutex::new(HostBridge::new())))
            .map_err(devices_err("the PCI host bridge"))?;
        let mut bars = BarAllocator::new(PCI_MMIO32, PCI_MMIO64)
            .map_err(devices_err("the PCI BAR allocator"))?;
        let mut leases = Vec::new();
        let mut vgpus = Vec::new();
        for (n, vg) in config.vgpus.iter().enumerate() {
            // A Vulkan GPU is opened here, before the filter: the loader reads its driver
            // manifests and libraries. Its devices and threads come under the filter below.
            let private = match (config.gpu, shared_gpu.as_ref()) {
                (vgpu::physical::GpuKind::Vulkan { .. }, None) => Some(
                    PhysicalGpu::new(&GpuSpec {
                        kind: config.gpu,
                        ..GpuSpec::whole(vg.profile.vram, vg.profile.engines)
                    })
                    .map_err(devices_err(format!("vGPU {n}")))?,
                ),
                _ => None,
            };
            let gpu = shared_gpu.as_ref().or(private.as_ref());
            let mut build = || build_vgpu(vg, n, &ram, &vm_fd, &mut bars, gpu, config.gpu);
            let (dev, lease) = if config.seccomp {
                // Built on a filtered thread: the vGPU's own threads (and a GPU driver's)
                // inherit the device filter.
                let role = match config.gpu {
                    vgpu::physical::GpuKind::Soft => crate::seccomp::Thread::Device,
                    vgpu::physical::GpuKind::Vulkan { .. } => crate::seccomp::Thread::GpuDevice,
                };
                crate::seccomp::on_device_thread(role, build)??
            } else {
                build()?
            };
            leases.push(lease);
            let dev = Arc::new(dev);
            vgpus.push(dev.clone());
            root.add_device_sync(1 + n as u8, dev)
                .map_err(devices_err(format!("vGPU {n}")))?;
        }
        let mut user = Vec::new();
        for (k, ud) in config.user_devices.iter().enumerate() {
            let dev = crate::user_device::UserDevice::connect(
                &ud.socket,
                &ud.trusted(),
                &ram,
                &mut bars,
                Arc::new(KvmMsi(vm_fd.clone())),
                config.seccomp,
            )?;
            user.push(dev.handle());
            root.add_device(
                1 + (config.vgpus.len() + k) as u8,
                Arc::new(Mutex::new(dev)),
            )
            .map_err(devices_err(format!("user device {k}")))?;
        }
        let root = Arc::new(Mutex::new(root));
        add_pio(root.clone(), CONF1_BASE, CONF1_LEN)?;

        let entry = match kernel.as_mut() {
            Some(kernel) => Some(boot::load(
                &ram.memory,
                ram.size,
                config.cpus.boot,
                BootSources {
                    kernel: (kernel, &kpath),
                    initramfs: initramfs.as_mut().map(|(f, p)| (f, p.as_str())),
                    cmdline: &config.cmdline,
                },
            )?),
            None => None,
        };

        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(PauseGate::default());
        let mut vcpus = Vec::new();
        for cpu in 0..config.cpus.boot {
            let fd = vm_fd
                .create_vcpu(u64::from(cpu))
                .map_err(|e| VmError::Kvm("create a vCPU", e))?;
            let cpuid = cpuid::vcpu_cpuid(&base_cpuid, cpu, config.cpus.boot, &hidden);
            vcpu::configure_common(&fd, cpu, &cpuid)?;
            if let (Some(entry), 0) = (entry, cpu) {
                vcpu::configure_boot_cpu(&fd, &ram.memory, entry)?;
            }
            vcpus.push(VcpuRunner {
                cpu,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
                stop: stop.clone(),
                gate: gate.clone(),
            });
        }
        let controls = Controls {
            gate,
            exit: exit.clone(),
            threads: Arc::new(Mutex::new(Vec::new())),
            kick_signal: kick_signal(),
            vgpus: vgpus.clone(),
            snapshot: Arc::new(Sources {
                vm_fd: vm_fd.clone(),
                ram: ram
                    .file
                    .try_clone()
                    .map_err(os_err("share guest RAM with the control socket"))?,
                ram_size: ram.size,
                serial: serial.clone(),
                root,
                vgpus: vgpus.clone(),
                fingerprint,
                machine: Machine::of(config),
                msrs,
                user,
                ram_slots: RamSlots::new(vm_fd.clone(), ram_regions),
                mapper,
                ram_memory: ram.memory.clone(),
            }),
        };
        let api = match &config.api_socket {
            Some(path) => Some(ApiServer::bind(path, controls.clone()).map_err(|source| {
                VmError::ApiSocket {
                    path: path.display().to_string(),
                    source,
                }
            })?),
            None => None,
        };
        tracing::debug!(?entry, cpus = config.cpus.boot, mem = ram.size, "VM built");
        if pvm {
            log_pvm_once(config.cpus.pvm_defaults);
        }

        let mut vm = Vm {
            vm_fd,
            ram,
            exit,
            pio,
            mmio,
            vcpus,
            stdin_input: matches!(config.serial, SerialConfig::Stdio),
            serial,
            _devices: devs,
            seccomp: config.seccomp,
            _leases: leases,
            vgpus,
            controls,
            api,
        };
        if let Some(r) = &restore {
            vm.apply(r)?;
            tracing::info!("VM restored from a snapshot");
        }
        Ok(vm)
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

    /// Runs the VM until the guest exits or the VMM fails; returns why it stopped.
    pub fn run(mut self) -> Result<ExitReason, VmError> {
        static HANDLER: Once = Once::new();
        let mut handler_result = Ok(());
        HANDLER.call_once(|| {
            handler_result = register_signal_handler(kick_signal(), kick_handler);
        });
        handler_result.map_err(|e| VmError::Os("install the vCPU kick handler", e.into()))?;

        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(VmError::EventLoop)?;
        em.add_subscriber(Arc::new(Mutex::new(ExitWatcher(self.exit.clone()))));
        let controlled = self.api.is_some();
        if let Some(api) = self.api.take() {
            em.add_subscriber(Arc::new(Mutex::new(api)));
        }
        let _termios = match (&self.serial, self.stdin_input) {
            (Some(serial), true) => {
                em.add_subscriber(Arc::new(Mutex::new(SerialInput {
                    stdin: dup_fd(0, "duplicate stdin")?,
                    serial: serial.clone(),
                })));
                Some(TermiosGuard::char_mode())
            }
            _ => None,
        };

        if self.seccomp {
            crate::seccomp::install_sigsys_reporter()
                .map_err(|e| VmError::Os("install the seccomp violation reporter", e))?;
        }
        let (done_tx, done_rx) = mpsc::channel::<u8>();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let stop = self.vcpus.first().map(|v| v.stop.clone());
        for runner in self.vcpus.drain(..) {
            let done = done_tx.clone();
            let cpu = runner.cpu;
            let exit = self.exit.clone();
            let (seccomp, vcpu_exit) = (self.seccomp, self.exit.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{cpu}"))
                .spawn(move || {
                    match seccomp.then(|| crate::seccomp::apply(crate::seccomp::Thread::Vcpu)) {
                        Some(Err(e)) => vcpu_exit.request(ExitReason::Failure(error_chain(&e))),
                        _ => runner.run(),
                    }
                    let _ = done.send(cpu);
                });
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    exit.request(ExitReason::Failure(format!(
                        "cannot start vCPU thread {cpu}: {e}"
                    )));
                    break;
                }
            }
        }
        drop(done_tx);
        *self
            .controls
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            threads.iter().map(|h| h.as_pthread_t()).collect();
        if self.seccomp
            && let Err(e) = crate::seccomp::apply(if controlled {
                crate::seccomp::Thread::Controlled
            } else {
                crate::seccomp::Thread::Main
            })
        {
            self.exit.request(ExitReason::Failure(error_chain(&e)));
        }

        let mut loop_error = None;
        while self.exit.reason().is_none() {
            if let Err(e) = em.run() {
                loop_error = Some(VmError::EventLoop(e));
                break;
            }
        }

        // Stop the vCPUs: raise the flag, then kick each thread out of KVM_RUN until it has
        // reported back (a kick that lands just before KVM_RUN is lost, hence the repeat).
        if let Some(stop) = stop {
            stop.store(true, Ordering::Release);
        }
        // Parked (paused) vCPUs wake to see it.
        self.controls.gate.release();
        let mut running = threads.len();
        while running > 0 {
            for h in threads.iter().filter(|h| !h.is_finished()) {
                // SAFETY: the pthread handle belongs to a thread we spawned and have not joined.
                unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
            }
            match done_rx.recv_timeout(Duration::from_millis(5)) {
                Ok(_) => running -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        for h in threads {
            if h.join().is_err() {
                self.exit
                    .request(ExitReason::Failure("a vCPU thread panicked".into()));
            }
        }
        let _ = (&self.vm_fd, &self.pio, &self.mmio);
        if let Some(e) = loop_error {
            return Err(e);
        }
        Ok(self
            .exit
            .reason()
            .unwrap_or(ExitReason::Failure("VM stopped without a reason".into())))
    }
}

/// An in-process vGPU on `shared` (or on a private GPU of its own), with its BARs allocated.
fn build_vgpu(
    vg: &VgpuConfig,
    n: usize,
    ram: &GuestRam,
    vm_fd: &Arc<VmFd>,
    bars: &mut BarAllocator,
    shared: Option<&Arc<PhysicalGpu>>,
    kind: vgpu::physical::GpuKind,
) -> Result<(Vgpu, Lease), VmError> {
    let p = vg.profile;
    let what = format!("vGPU {n}");
    let gpu = match shared {
        Some(g) => g.clone(),
        None => PhysicalGpu::new(&GpuSpec {
            kind,
            ..GpuSpec::whole(p.vram, p.engines)
        })
        .map_err(devices_err(what.clone()))?,
    };
    let lease = gpu
        .lease(p, vg.partition)
        .map_err(devices_err(what.clone()))?;
    let regs = bars
        .allocate(
            vgpu_abi::pci::BAR_REGS_SIZE,
            BarKind::Mmio32 {
                prefetchable: false,
            },
        )
        .map_err(devices_err(what.clone()))?;
    let vram_bar = bars
        .allocate(p.vram, BarKind::Mmio64 { prefetchable: true })
        .map_err(devices_err(what.clone()))?;
    tracing::debug!(n, profile = p.name, regs, vram_bar, "vGPU");
    let dev = Vgpu::new(VgpuSetup {
        bars: BarAddresses {
            regs,
            vram: vram_bar,
        },
        sys: ram.memory.clone(),
        domain: DmaDomain::new(memory::ram_ranges(ram.size)),
        interrupts: vgpu::Interrupts::Msi(Arc::new(KvmMsi(vm_fd.clone()))),
        sched_params: Params {
            weight: vg.weight,
            cap_percent: vg.cap,
        },
        ..VgpuSetup::from_lease(&lease)
    })
    .map_err(devices_err(what))?;
    Ok((dev, lease))
}

/// Wraps an error of setting up `what` into [`VmError::Devices`].
fn devices_err<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> VmError {
    let what = what.into();
    move |e| VmError::Devices {
        what,
        source: Box::new(e),
    }
}

pub use devices::error_chain;

fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let shown = path.display().to_string();
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::KvmOpen {
            path: shown.clone(),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        }
    })?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|source| VmError::KvmOpen {
        path: shown.clone(),
        source,
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::NotKvm {
            path: shown,
            version,
        });
    }
    Ok(kvm)
}

fn log_pvm_once(hiding: bool) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing::info!(
            "host KVM is PVM (no hardware virtualization): guest ring-0 code is emulated and \
             slow, ring-3 code runs natively, and CPUID executed by the guest may bypass KVM \
             (also pass clearcpuid= to Linux guests); {}",
            if hiding {
                format!(
                    "hiding CPUID features its emulator cannot run ({})",
                    cpuid::PVM_HIDDEN.join(", ")
                )
            } else {
                "pvm_hide=off: CPUID features are not hidden".to_string()
            }
        );
    });
}
