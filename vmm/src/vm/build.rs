//! Building a VM: KVM, memory, devices, vGPUs, the kernel and the vCPUs.

use super::*;

/// Where KVM's real-mode TSS goes (three pages just below the BIOS ROM area of 4 GiB).
const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// KVM's identity-map page for real mode on Intel, just below the TSS.
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

impl Vm {
    /// Like [`Vm::new`], with the vGPUs placed on `shared_gpu` (many VMs, one GPU).
    pub fn with_gpu(
        config: &VmConfig,
        shared_gpu: Option<Arc<PhysicalGpu>>,
    ) -> Result<Vm, VmError> {
        let kpath = config.kernel.display().to_string();
        config.validate()?;
        let (mut kernel, mut initramfs) = boot_files(config, &kpath)?;
        let serial_out = serial_output(config)?;

        let kvm = open_kvm(&config.kvm_path)?;
        let cpu = GuestCpu::new(&kvm, config)?;
        let fingerprint = Fingerprint {
            vcpus: config.cpus.boot,
            memory: config.memory.size,
            vgpus: config
                .vgpus
                .iter()
                .map(|v| v.profile.name.to_string())
                .collect(),
            cpu_features: cpuid::features(&cpu.of(0, config.cpus.boot)),
        };
        // A snapshot is checked whole before anything is built.
        let restore = match &config.from {
            VmSource::Snapshot(dir) => Some(Restore::open(dir, &fingerprint)?),
            _ => None,
        };
        let msrs = crate::kvm_state::msr_index_list(&kvm)
            .map_err(|e| VmError::Os("list the MSRs KVM saves", std::io::Error::other(e)))?;

        let vm_fd = create_kvm_vm(&kvm)?;
        let ram = memory::create_guest_ram(config.memory.size)?;
        let ram_regions = register_ram(&vm_fd, &ram)?;

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
        let (leases, vgpus) = add_vgpus(config, shared_gpu, &ram, &vm_fd, &mut bars, &mut root)?;
        let user = add_user_devices(config, &ram, &vm_fd, &mut bars, &mut root)?;
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
        for n in 0..config.cpus.boot {
            let fd = vm_fd
                .create_vcpu(u64::from(n))
                .map_err(|e| VmError::Kvm("create a vCPU", e))?;
            vcpu::configure_common(&fd, n, &cpu.of(n, config.cpus.boot))?;
            if let (Some(entry), 0) = (entry, n) {
                vcpu::configure_boot_cpu(&fd, &ram.memory, entry)?;
            }
            vcpus.push(VcpuRunner {
                cpu: n,
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
        if cpu.pvm {
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
}

/// The kernel, and the initramfs with its path for messages.
type BootFiles = (Option<File>, Option<(File, String)>);

/// The kernel and the initramfs, opened (none for a VM restored from a snapshot: it boots
/// nothing, its memory and registers come from the snapshot).
fn boot_files(config: &VmConfig, kpath: &str) -> Result<BootFiles, VmError> {
    if config.from != VmSource::Kernel {
        return Ok((None, None));
    }
    let kernel = open_regular(&config.kernel).map_err(|source| VmError::KernelOpen {
        path: kpath.to_string(),
        source,
    })?;
    let initramfs = match &config.initramfs {
        Some(p) => Some((
            open_regular(p).map_err(|source| VmError::InitramfsOpen {
                path: p.display().to_string(),
                source,
            })?,
            p.display().to_string(),
        )),
        None => None,
    };
    Ok((Some(kernel), initramfs))
}

/// Where the serial port's output goes (`None`: no serial port).
fn serial_output(config: &VmConfig) -> Result<Option<Box<dyn Write + Send>>, VmError> {
    Ok(match &config.serial {
        SerialConfig::Stdio => Some(Box::new(dup_fd(1, "duplicate stdout")?)),
        SerialConfig::File(p) => Some(Box::new(devices::files::open_output(p).map_err(
            |source| VmError::SerialFile {
                path: p.display().to_string(),
                source,
            },
        )?)),
        SerialConfig::Null => Some(Box::new(std::io::sink())),
        SerialConfig::Off => None,
    })
}

/// The CPU the guest sees: KVM's supported CPUID less the hidden features.
struct GuestCpu {
    base: kvm_bindings::CpuId,
    hidden: Vec<Feature>,
    /// The host is PVM (its emulator's gaps hidden unless `pvm_hide=off`).
    pvm: bool,
}

impl GuestCpu {
    fn new(kvm: &Kvm, config: &VmConfig) -> Result<Self, VmError> {
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
        let base = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("read KVM's supported CPUID", e))?;
        Ok(GuestCpu { base, hidden, pvm })
    }

    /// vCPU `cpu`'s CPUID, of `ncpus`.
    fn of(&self, cpu: u8, ncpus: u8) -> kvm_bindings::CpuId {
        cpuid::vcpu_cpuid(&self.base, cpu, ncpus, &self.hidden)
    }
}

/// A KVM VM with its real-mode TSS and identity map, the in-kernel irqchip and PIT.
fn create_kvm_vm(kvm: &Kvm) -> Result<Arc<VmFd>, VmError> {
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
    Ok(vm_fd)
}

/// Registers each guest RAM region with KVM in slots 0, 1, …; returns what was registered.
fn register_ram(
    vm_fd: &VmFd,
    ram: &GuestRam,
) -> Result<Vec<kvm_bindings::kvm_userspace_memory_region>, VmError> {
    let mut regions = Vec::new();
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
        // SAFETY: the region is a live mapping owned by `ram`, which the Vm keeps for as long
        // as the KVM VM exists (vm_fd is dropped first, see field order).
        unsafe { vm_fd.set_user_memory_region(mr) }
            .map_err(|e| VmError::Kvm("register guest RAM with KVM", e))?;
        regions.push(mr);
    }
    Ok(regions)
}

/// The in-process vGPUs of `config` at 00:01.0, 00:02.0, … of `root`.
fn add_vgpus(
    config: &VmConfig,
    shared_gpu: Option<Arc<PhysicalGpu>>,
    ram: &GuestRam,
    vm_fd: &Arc<VmFd>,
    bars: &mut BarAllocator,
    root: &mut PciRoot,
) -> Result<(Vec<Lease>, Vec<Arc<Vgpu>>), VmError> {
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
        let mut build = || build_vgpu(vg, n, ram, vm_fd, bars, gpu, config.gpu);
        let (dev, lease) = if config.seccomp {
            // Built on a filtered thread: the vGPU's own threads (and a GPU driver's) inherit
            // the device filter.
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
    Ok((leases, vgpus))
}

/// The vfio-user devices of `config`, in the slots after the in-process vGPUs.
fn add_user_devices(
    config: &VmConfig,
    ram: &GuestRam,
    vm_fd: &Arc<VmFd>,
    bars: &mut BarAllocator,
    root: &mut PciRoot,
) -> Result<Vec<crate::user_device::UserHandle>, VmError> {
    let mut user = Vec::new();
    for (k, ud) in config.user_devices.iter().enumerate() {
        let dev = crate::user_device::UserDevice::connect(
            &ud.socket,
            &ud.trusted(),
            ram,
            bars,
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
    Ok(user)
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
