//! Snapshots of a paused VM to a directory, and restoring one (issue #22). See
//! docs/architecture.md, "Snapshot and restore".
//!
//! A snapshot directory holds:
//! - `state`: the [`Snapshot`] container (fingerprint, sections, CRC-32) with the VM's shape
//!   (`machine`), the KVM VM (`vm`: irqchip, PIT, clock), each vCPU (`vcpu.N`), the serial
//!   port (`serial`), the PCI root (`pci`), each vGPU (`vgpu.N`) and the memory files' sizes
//!   and CRC-32s (`files`). Written last: a directory without it is no snapshot.
//! - `memory`: guest RAM; `vram.N`: each in-process vGPU's VRAM.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::pci::PciRoot;
use devices::serial::SerialDevice;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vgpu::Vgpu;

use crate::config::{CpusConfig, VgpuConfig, VmConfig};
use crate::control::PauseGate;
use crate::kvm_state::{VcpuState, VmState};
use crate::snapshot::{Fingerprint, Snapshot, SnapshotError};

/// The container's file name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Guest RAM's file name.
pub const MEMORY_FILE: &str = "memory";
/// Bytes moved per read or write of a memory file.
const CHUNK: usize = 4 << 20;
/// Longest the vCPUs take to report their state.
const VCPU_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum VmSnapshotError {
    /// The container was refused.
    #[error("{path}: {source}")]
    Container {
        /// The state file.
        path: String,
        /// Why.
        #[source]
        source: SnapshotError,
    },
    /// A memory file is missing, short or changed.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// A section is missing or does not decode.
    #[error("the snapshot's {section} section {why}")]
    Section {
        /// Which.
        section: String,
        /// Why.
        why: String,
    },
    /// The state could not be read from or put into the VM.
    #[error("{0}")]
    State(String),
}

impl VmSnapshotError {
    /// True when the snapshot itself is at fault (a user error: exit status 2), not the host.
    pub fn is_usage(&self) -> bool {
        !matches!(self, VmSnapshotError::State(_))
    }
}

/// The VM's shape: what a restore builds before it puts the state in (section `machine`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// vCPUs.
    pub cpus: u8,
    /// CPUID features hidden (`--cpus hide=`).
    pub hide: Vec<String>,
    /// PVM's default hiding.
    pub pvm_defaults: bool,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The in-process vGPUs, as `--vgpu` values.
    pub vgpus: Vec<String>,
    /// The GPU under them, as a `--gpu` value.
    pub gpu: String,
    /// The kernel command line the VM booted with (for people).
    pub cmdline: String,
    /// How many vGPUs it has over vfio-user (`--user-device`; the sockets are the host's).
    #[serde(default)]
    pub user_devices: usize,
}

impl Machine {
    /// The shape of `config`.
    pub fn of(config: &VmConfig) -> Machine {
        Machine {
            cpus: config.cpus.boot,
            hide: config.cpus.hide.iter().map(|f| f.to_string()).collect(),
            pvm_defaults: config.cpus.pvm_defaults,
            memory: config.memory.size,
            vgpus: config
                .vgpus
                .iter()
                .map(|v| {
                    let mut s = format!(
                        "profile={},weight={},cap={}",
                        v.profile.name, v.weight, v.cap
                    );
                    if let Some(p) = v.partition {
                        s.push_str(&format!(",partition={p}"));
                    }
                    s
                })
                .collect(),
            gpu: match config.gpu {
                vgpu::physical::GpuKind::Soft => "soft".into(),
                vgpu::physical::GpuKind::Vulkan {
                    device,
                    device_memory,
                } => format!(
                    "vulkan,device={device},memory={}",
                    if device_memory { "device" } else { "host" }
                ),
            },
            cmdline: config.cmdline.clone(),
            user_devices: config.user_devices.len(),
        }
    }

    /// `host` (serial, control socket, sandboxing, KVM device: the host's side) with this
    /// shape, its state coming `from` a snapshot or a migration.
    pub fn into_config(
        self,
        host: &VmConfig,
        from: crate::config::VmSource,
    ) -> Result<VmConfig, VmSnapshotError> {
        let bad = |why: String| VmSnapshotError::Section {
            section: "machine".into(),
            why,
        };
        let mut hide = Vec::new();
        for f in &self.hide {
            hide.push(f.parse().map_err(|e| bad(format!("hides {f:?}: {e}")))?);
        }
        let mut vgpus = Vec::new();
        for v in &self.vgpus {
            vgpus.push(
                v.parse::<VgpuConfig>()
                    .map_err(|e| bad(format!("has vGPU {v:?}: {e}")))?,
            );
        }
        let gpu = self
            .gpu
            .parse()
            .map_err(|e| bad(format!("has GPU {:?}: {e}", self.gpu)))?;
        if host.user_devices.len() != self.user_devices {
            return Err(bad(format!(
                "has {} vGPU(s) over vfio-user; give as many --user-device here (not {})",
                self.user_devices,
                host.user_devices.len()
            )));
        }
        Ok(VmConfig {
            kernel: PathBuf::new(),
            initramfs: None,
            cmdline: self.cmdline,
            cpus: CpusConfig {
                boot: self.cpus,
                hide,
                pvm_defaults: self.pvm_defaults,
            },
            memory: crate::config::MemoryConfig { size: self.memory },
            vgpus,
            gpu,
            from,
            ..host.clone()
        })
    }
}

/// A memory file of a snapshot: its name in the directory, length and CRC-32.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileSum {
    name: String,
    len: u64,
    crc: u32,
}

/// The PCI root's own state (section `pci`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PciState {
    address: u32,
}

/// vm-superio's UART state, as data (section `serial`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SerialState {
    regs: [u8; 9],
    in_buffer: Vec<u8>,
}

impl SerialState {
    fn of(s: &vm_superio::serial::SerialState) -> Self {
        SerialState {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }

    fn to_uart(&self) -> vm_superio::serial::SerialState {
        let [
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
        ] = self.regs;
        vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: self.in_buffer.clone(),
        }
    }
}

/// What a snapshot is taken from: the parts of a running VM the control socket reaches.
pub struct Sources {
    pub vm_fd: Arc<VmFd>,
    /// Guest RAM's memfd (read at offsets; its file position is not used).
    pub ram: File,
    pub ram_size: u64,
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    pub root: Arc<Mutex<PciRoot>>,
    pub vgpus: Vec<Arc<Vgpu>>,
    pub fingerprint: Fingerprint,
    pub machine: Machine,
    /// MSRs KVM can save.
    pub msrs: Vec<u32>,
    /// vGPUs served over vfio-user: their device state is in the server, reached over
    /// migration v2; configuration space and MSI-X are here.
    pub user: Vec<crate::user_device::UserHandle>,
    /// Guest RAM's KVM slots (dirty logging for migration).
    pub ram_slots: crate::kvm_glue::RamSlots,
    /// The memory BARs' KVM slots (VRAM; dirty logging for migration).
    pub mapper: Arc<crate::kvm_glue::KvmMapper>,
    /// Guest RAM as the devices see it.
    pub ram_memory: vm_memory::GuestMemoryMmap,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

/// What a snapshot took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    /// The directory.
    pub dir: PathBuf,
    /// Bytes written (state, RAM and VRAM).
    pub bytes: u64,
    /// How long it took (ms).
    pub ms: u64,
}

fn section<T: Serialize>(name: &str, v: &T) -> Result<(String, Vec<u8>), VmSnapshotError> {
    postcard::to_stdvec(v)
        .map(|b| (name.to_string(), b))
        .map_err(|e| VmSnapshotError::State(format!("cannot encode {name}: {e}")))
}

fn decode<T: for<'de> Deserialize<'de>>(snap: &Snapshot, name: &str) -> Result<T, VmSnapshotError> {
    let bytes = snap
        .sections
        .get(name)
        .ok_or_else(|| VmSnapshotError::Section {
            section: name.into(),
            why: "is missing".into(),
        })?;
    postcard::from_bytes(bytes).map_err(|e| VmSnapshotError::Section {
        section: name.into(),
        why: format!("does not decode: {e}"),
    })
}

/// A new file only its owner can read (it holds guest memory), replacing one at `path`.
fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Copies `len` bytes read by `read(offset, buf)` into a new file `path`; returns its CRC-32.
fn write_file(
    path: &Path,
    len: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
) -> Result<FileSum, VmSnapshotError> {
    let mut at = 0;
    write_stream(path, |buf| {
        let n = (len - at).min(CHUNK as u64) as usize;
        buf.resize(n, 0);
        read(at, buf)?;
        at += n as u64;
        Ok(())
    })
}

/// Writes the chunks `next` puts in its buffer to a new file at `path` (mode 0600) until it
/// leaves the buffer empty; returns the file's name, length and CRC-32.
fn write_stream(
    path: &Path,
    mut next: impl FnMut(&mut Vec<u8>) -> Result<(), String>,
) -> Result<FileSum, VmSnapshotError> {
    let shown = path.display().to_string();
    let err = |why: String| VmSnapshotError::File {
        path: shown.clone(),
        why,
    };
    let mut out = create_private(path).map_err(|e| err(format!("cannot create: {e}")))?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = Vec::with_capacity(CHUNK);
    let mut len = 0;
    loop {
        buf.clear();
        next(&mut buf).map_err(|e| err(format!("cannot read the state: {e}")))?;
        if buf.is_empty() {
            break;
        }
        crc.update(&buf);
        out.write_all(&buf)
            .map_err(|e| err(format!("cannot write: {e}")))?;
        len += buf.len() as u64;
    }
    out.sync_all()
        .map_err(|e| err(format!("cannot sync: {e}")))?;
    Ok(FileSum {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        len,
        crc: crc.finalize(),
    })
}

/// Reads file `sum` of `dir` into memory through `write(offset, bytes)`, checking its length
/// and CRC-32. On an error the memory holds part of it: the caller throws the VM away.
fn read_file(
    dir: &Path,
    sum: &FileSum,
    len: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<(), VmSnapshotError> {
    let path = dir.join(&sum.name);
    let shown = path.display().to_string();
    let err = |why: String| VmSnapshotError::File {
        path: shown.clone(),
        why,
    };
    if sum.len != len {
        return Err(err(format!("holds {} bytes, this VM has {len}", sum.len)));
    }
    let f = devices::files::open_regular(&path).map_err(|e| err(format!("cannot open: {e}")))?;
    let actual = f.metadata().map_err(|e| err(e.to_string()))?.len();
    if actual != len {
        return Err(err(format!("is {actual} bytes long, {len} expected")));
    }
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        f.read_exact_at(&mut buf[..n], at)
            .map_err(|e| err(format!("cannot read: {e}")))?;
        crc.update(&buf[..n]);
        write(at, &buf[..n]).map_err(|e| err(format!("cannot load it: {e}")))?;
        at += n as u64;
    }
    let got = crc.finalize();
    if got != sum.crc {
        return Err(err(format!(
            "is corrupt: checksum {got:#010x}, the snapshot says {:#010x}",
            sum.crc
        )));
    }
    Ok(())
}

impl Sources {
    /// The paused VM's state (every vCPU parked in `gate`, every vGPU paused) as the
    /// snapshot's sections, without memory.
    pub fn sections(&self, gate: &PauseGate) -> Result<Vec<(String, Vec<u8>)>, VmSnapshotError> {
        let state_err = |e: String| VmSnapshotError::State(e);
        let msrs = self.msrs.clone();
        let vcpus = gate
            .on_each_vcpu(
                usize::from(self.fingerprint.vcpus),
                Arc::new(move |fd| VcpuState::save(fd, &msrs).map_err(|e| e.to_string())),
                VCPU_TIMEOUT,
            )
            .map_err(state_err)?;
        let vm = VmState::save(&self.vm_fd).map_err(|e| state_err(e.to_string()))?;
        let mut vgpus = Vec::new();
        for (i, v) in self.vgpus.iter().enumerate() {
            vgpus.push(v.save().map_err(|e| state_err(format!("vGPU {i}: {e}")))?);
        }
        let serial = self
            .serial
            .as_ref()
            .map(|s| SerialState::of(&s.lock().unwrap_or_else(|e| e.into_inner()).state()));
        let pci = PciState {
            address: self
                .root
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .address_latch(),
        };

        let mut sections = vec![
            (
                "machine".to_string(),
                serde_json::to_vec(&self.machine).map_err(|e| state_err(e.to_string()))?,
            ),
            section("vm", &vm)?,
            section("pci", &pci)?,
        ];
        if let Some(s) = &serial {
            sections.push(section("serial", s)?);
        }
        for (i, v) in vcpus.iter().enumerate() {
            sections.push(section(&format!("vcpu.{i}"), v)?);
        }
        for (i, v) in vgpus.iter().enumerate() {
            sections.push(section(&format!("vgpu.{i}"), v)?);
        }
        for (k, u) in self.user.iter().enumerate() {
            sections.push(section(&format!("user.{k}"), &u.local_state())?);
        }
        Ok(sections)
    }

    /// Writes a snapshot of the paused VM (every vCPU parked in `gate`, every vGPU paused)
    /// to `dir` (created if needed; a snapshot there is replaced).
    pub fn take(&self, dir: &Path, gate: &PauseGate) -> Result<Taken, VmSnapshotError> {
        let started = Instant::now();
        let mut sections = self.sections(gate)?;

        std::fs::create_dir_all(dir).map_err(|e| VmSnapshotError::File {
            path: dir.display().to_string(),
            why: format!("cannot create the directory: {e}"),
        })?;
        // The old state goes first: a directory caught half-written is no snapshot.
        let state_path = dir.join(STATE_FILE);
        match std::fs::remove_file(&state_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(VmSnapshotError::File {
                    path: state_path.display().to_string(),
                    why: format!("cannot replace: {e}"),
                });
            }
        }
        let mut files = vec![write_file(
            &dir.join(MEMORY_FILE),
            self.ram_size,
            |at, buf| self.ram.read_exact_at(buf, at).map_err(|e| e.to_string()),
        )?];
        for (i, v) in self.vgpus.iter().enumerate() {
            let vram = v.vram();
            files.push(write_file(
                &dir.join(format!("vram.{i}")),
                vram.size(),
                |at, buf| {
                    vram.read(at, buf)
                        .map_err(|f| format!("VRAM fault {:#x}", f.code))
                },
            )?);
        }
        // A vGPU over vfio-user: its server's migration data (STOP_COPY, read until the end:
        // all of VRAM, then the vGPU's state), opaque here.
        for (k, u) in self.user.iter().enumerate() {
            u.set_state(vfu::DeviceState::StopCopy)
                .map_err(VmSnapshotError::State)?;
            // At most all of VRAM and a state: a server that goes on is refused.
            let limit = vm_memory::GuestMemoryRegion::len(u.vram()) + (64 << 20);
            let mut read = 0u64;
            let written = write_stream(&dir.join(format!("device.{k}")), |buf| {
                buf.extend(u.read(CHUNK)?);
                read += buf.len() as u64;
                if read > limit {
                    return Err(format!("its server sent more than {limit} bytes of state"));
                }
                Ok(())
            });
            u.set_state(vfu::DeviceState::Stop)
                .map_err(VmSnapshotError::State)?;
            files.push(written?);
        }
        sections.push(section("files", &files)?);
        let snap = Snapshot {
            fingerprint: self.fingerprint.clone(),
            sections: sections.into_iter().collect(),
        };
        let tmp = dir.join(".state.partial");
        let written = (|| -> Result<u64, SnapshotError> {
            let mut out = std::io::BufWriter::new(create_private(&tmp)?);
            snap.write(&mut out)?;
            let f = out.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            Ok(f.metadata()?.len())
        })()
        .map_err(|source| VmSnapshotError::Container {
            path: tmp.display().to_string(),
            source,
        })?;
        std::fs::rename(&tmp, &state_path).map_err(|e| VmSnapshotError::File {
            path: state_path.display().to_string(),
            why: format!("cannot write: {e}"),
        })?;
        Ok(Taken {
            dir: dir.to_path_buf(),
            bytes: written + files.iter().map(|f| f.len).sum::<u64>(),
            ms: started.elapsed().as_millis() as u64,
        })
    }
}

/// Reads and checks `dir`'s state file (not the memory files yet).
pub fn load(dir: &Path) -> Result<Snapshot, VmSnapshotError> {
    let path = dir.join(STATE_FILE);
    let container = |source| VmSnapshotError::Container {
        path: path.display().to_string(),
        source,
    };
    let f = devices::files::open_regular(&path).map_err(|e| container(SnapshotError::Io(e)))?;
    Snapshot::read(BufReader::new(f), None).map_err(container)
}

/// The configuration that restores `dir`: its shape, `host`'s host-side options.
pub fn restore_config(dir: &Path, host: &VmConfig) -> Result<VmConfig, VmSnapshotError> {
    let snap = load(dir)?;
    let machine: Machine =
        serde_json::from_slice(snap.sections.get("machine").ok_or_else(|| {
            VmSnapshotError::Section {
                section: "machine".into(),
                why: "is missing".into(),
            }
        })?)
        .map_err(|e| VmSnapshotError::Section {
            section: "machine".into(),
            why: format!("does not decode: {e}"),
        })?;
    machine.into_config(host, crate::config::VmSource::Snapshot(dir.to_path_buf()))
}

/// A loaded snapshot, put into a VM piece by piece while it is built (before any vCPU runs).
#[derive(Debug)]
pub struct Restore {
    /// Where the memory files are; `None`: memory is in place already (a migration).
    dir: Option<PathBuf>,
    snap: Snapshot,
}

impl Restore {
    /// Loads `dir` and checks it was taken of a VM shaped like `fingerprint`.
    pub fn open(dir: &Path, fingerprint: &Fingerprint) -> Result<Restore, VmSnapshotError> {
        let snap = load(dir)?;
        crate::snapshot::check_fingerprint(&snap.fingerprint, fingerprint).map_err(|source| {
            VmSnapshotError::Container {
                path: dir.join(STATE_FILE).display().to_string(),
                source,
            }
        })?;
        Ok(Restore {
            dir: Some(dir.to_path_buf()),
            snap,
        })
    }

    /// The state of an incoming migration (its memory was copied into the VM already),
    /// checked against the VM it goes into.
    pub fn incoming(snap: Snapshot, fingerprint: &Fingerprint) -> Result<Restore, VmSnapshotError> {
        crate::snapshot::check_fingerprint(&snap.fingerprint, fingerprint).map_err(|source| {
            VmSnapshotError::Container {
                path: "the migration's state".into(),
                source,
            }
        })?;
        Ok(Restore { dir: None, snap })
    }

    /// The serial port's state, if the snapshot has one.
    pub fn serial(&self) -> Result<Option<vm_superio::serial::SerialState>, VmSnapshotError> {
        if !self.snap.sections.contains_key("serial") {
            return Ok(None);
        }
        decode::<SerialState>(&self.snap, "serial").map(|s| Some(s.to_uart()))
    }

    /// vCPU `cpu`'s state.
    pub fn vcpu(&self, cpu: u8) -> Result<VcpuState, VmSnapshotError> {
        decode(&self.snap, &format!("vcpu.{cpu}"))
    }

    /// Guest RAM, the KVM VM, the vGPUs (state and VRAM) and the PCI root.
    pub fn devices(
        &self,
        vm_fd: &VmFd,
        ram: &File,
        ram_size: u64,
        vgpus: &[Arc<Vgpu>],
        user: &[crate::user_device::UserHandle],
        root: &Mutex<PciRoot>,
    ) -> Result<(), VmSnapshotError> {
        let files: Vec<FileSum> = match self.dir {
            Some(_) => decode(&self.snap, "files")?,
            None => Vec::new(),
        };
        let file = |name: &str| {
            files
                .iter()
                .find(|f| f.name == name)
                .ok_or_else(|| VmSnapshotError::Section {
                    section: "files".into(),
                    why: format!("does not list {name}"),
                })
        };
        if let Some(dir) = &self.dir {
            read_file(dir, file(MEMORY_FILE)?, ram_size, |at, b| {
                ram.write_all_at(b, at).map_err(|e| e.to_string())
            })?;
        }
        for (i, v) in vgpus.iter().enumerate() {
            let state: vgpu::device::VgpuState = decode(&self.snap, &format!("vgpu.{i}"))?;
            let vram = v.vram();
            if let Some(dir) = &self.dir {
                read_file(dir, file(&format!("vram.{i}"))?, vram.size(), |at, b| {
                    vram.write(at, b)
                        .map_err(|f| format!("VRAM fault {:#x}", f.code))
                })?;
            }
            v.restore(&state).map_err(|why| VmSnapshotError::Section {
                section: format!("vgpu.{i}"),
                why: format!("is not a state this vGPU can be in: {why}"),
            })?;
        }
        for (k, u) in user.iter().enumerate() {
            let section = format!("user.{k}");
            let state: crate::user_device::LocalState = decode(&self.snap, &section)?;
            u.restore_local(&state)
                .map_err(|why| VmSnapshotError::Section { section, why })?;
            // From a directory, the server's data is a file (a migration sends it as frames
            // and runs the device itself): RESUMING, the data, then RUNNING, which applies it.
            if let Some(dir) = &self.dir {
                let sum = file(&format!("device.{k}"))?;
                u.set_state(vfu::DeviceState::Resuming)
                    .map_err(VmSnapshotError::State)?;
                read_file(dir, sum, sum.len, |_, b| u.write(b))?;
                u.set_state(vfu::DeviceState::Running)
                    .map_err(VmSnapshotError::State)?;
            }
        }
        let vm: VmState = decode(&self.snap, "vm")?;
        vm.restore(vm_fd)
            .map_err(|e| VmSnapshotError::State(e.to_string()))?;
        let pci: PciState = decode(&self.snap, "pci")?;
        root.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(pci.address)
            .map_err(|e| VmSnapshotError::State(format!("PCI BARs: {e}")))?;
        Ok(())
    }
}
