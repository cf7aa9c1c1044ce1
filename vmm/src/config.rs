//! VM configuration: typed values, parsed from Cloud Hypervisor-style `key=value` option
//! strings at the edge (the CLI), validated once.

use std::path::PathBuf;
use std::str::FromStr;

use crate::cpuid::{Feature, UnknownFeature};
use crate::memory::{MAX_MEMORY, MIN_MEMORY};

/// A malformed or out-of-range option value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `key=value` syntax errors.
    #[error("{option}: {message} (syntax: {syntax})")]
    Syntax {
        /// Option name.
        option: &'static str,
        /// What is wrong.
        message: String,
        /// Accepted syntax.
        syntax: &'static str,
    },
    /// Unknown CPUID feature.
    #[error("--cpus: {0}")]
    Feature(#[from] UnknownFeature),
    /// More PCI devices than the root bus has slots for.
    #[error(
        "{requested} PCI devices (--vgpu and --user-device) but the PCI bus has {slots} free slots"
    )]
    TooManyDevices {
        /// Devices asked for.
        requested: usize,
        /// Slots (00:01.0 onwards; 00:00.0 is the host bridge).
        slots: usize,
    },
}

fn syntax(option: &'static str, syntax: &'static str, message: String) -> ConfigError {
    ConfigError::Syntax {
        option,
        message,
        syntax,
    }
}

/// Splits `a=1,b=2` into pairs; a bare value (no `=`) is given the key `default_key`.
fn pairs<'a>(
    s: &'a str,
    default_key: &'static str,
    option: &'static str,
    syn: &'static str,
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    if s.trim().is_empty() {
        return Err(syntax(option, syn, "empty value".into()));
    }
    s.split(',')
        .enumerate()
        .map(|(i, part)| match part.split_once('=') {
            Some((k, v)) => Ok((k, v)),
            None if i == 0 => Ok((default_key, part)),
            None => Err(syntax(option, syn, format!("{part:?} is not key=value"))),
        })
        .collect()
}

/// Parses a size such as `256M`, `1G`, `65536K` or `1048576` (bytes).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'T' | 't') => (&s[..i], 40),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// `--memory`: guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes of RAM, a multiple of 4 KiB within [`MIN_MEMORY`, `MAX_MEMORY`].
    pub size: u64,
}

impl MemoryConfig {
    /// Accepted syntax.
    pub const SYNTAX: &'static str =
        "size=<bytes>[K|M|G][,shared=on] or just <bytes>[K|M|G], e.g. 256M";
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { size: 256 << 20 }
    }
}

impl FromStr for MemoryConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |m: String| syntax("--memory", Self::SYNTAX, m);
        let mut size = None;
        for (k, v) in pairs(s, "size", "--memory", Self::SYNTAX)? {
            match k {
                "size" => size = Some(parse_size(v).ok_or_else(|| err(format!("bad size {v:?}")))?),
                // Cloud Hypervisor's flag: Tessera's guest RAM is always a shared memfd.
                "shared" if v == "on" => {}
                "shared" => {
                    return Err(err(format!(
                        "shared={v}: guest RAM is always shared (a memfd that vfio-user servers \
                         map); only shared=on is accepted"
                    )));
                }
                other => return Err(err(format!("unknown key {other:?}"))),
            }
        }
        let size = size.ok_or_else(|| err("size is missing".into()))?;
        if size < MIN_MEMORY {
            return Err(err(format!(
                "{size} bytes is too small (at least {} MiB)",
                MIN_MEMORY >> 20
            )));
        }
        if size > MAX_MEMORY {
            return Err(err(format!("{size} bytes is too large (at most 1T)")));
        }
        if size % 4096 != 0 {
            return Err(err(format!("{size} bytes is not a multiple of 4 KiB")));
        }
        Ok(MemoryConfig { size })
    }
}

/// `--cpus`: vCPU count and CPUID features to hide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpusConfig {
    /// vCPUs, at least 1 (the upper bound is KVM's and is checked when the VM is built).
    pub boot: u8,
    /// Features hidden in addition to the host's defaults.
    pub hide: Vec<Feature>,
    /// Whether to hide, on PVM hosts, what PVM's emulator cannot run (default on).
    pub pvm_defaults: bool,
}

impl CpusConfig {
    /// Accepted syntax.
    pub const SYNTAX: &'static str =
        "boot=<n>[,max=<n>][,hide=<feature>[:<feature>...]][,pvm_hide=on|off] or just <n>";
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot: 1,
            hide: Vec::new(),
            pvm_defaults: true,
        }
    }
}

impl FromStr for CpusConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |m: String| syntax("--cpus", Self::SYNTAX, m);
        let mut c = CpusConfig::default();
        let mut max = None;
        for (k, v) in pairs(s, "boot", "--cpus", Self::SYNTAX)? {
            match k {
                // Cloud Hypervisor's flag: without CPU hotplug, max can only be boot.
                "max" => {
                    max = Some(
                        v.parse::<u32>()
                            .map_err(|_| err(format!("bad vCPU count {v:?}")))?,
                    )
                }
                "boot" => {
                    let n: u32 = v
                        .parse()
                        .map_err(|_| err(format!("bad vCPU count {v:?}")))?;
                    if n == 0 {
                        return Err(err("a VM needs at least 1 vCPU".into()));
                    }
                    c.boot = u8::try_from(n)
                        .ok()
                        .filter(|&n| n <= crate::boot::mptable::MAX_CPUS)
                        .ok_or_else(|| err(format!("{n} vCPUs is more than 254")))?;
                }
                "hide" => {
                    for f in v.split(':').filter(|f| !f.is_empty()) {
                        c.hide.push(f.parse()?);
                    }
                }
                "pvm_hide" => {
                    c.pvm_defaults = match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(err(format!("pvm_hide takes on or off, not {v:?}"))),
                    }
                }
                other => return Err(err(format!("unknown key {other:?}"))),
            }
        }
        if let Some(m) = max.filter(|&m| m != u32::from(c.boot)) {
            return Err(err(format!(
                "max={m}: Tessera has no CPU hotplug, so max must equal boot ({})",
                c.boot
            )));
        }
        Ok(c)
    }
}

/// `--serial`: where COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// The VMM's stdin/stdout.
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// COM1 present, its output discarded (Cloud Hypervisor's `null`).
    Null,
    /// No COM1 at all.
    Off,
}

impl SerialConfig {
    /// Accepted syntax.
    pub const SYNTAX: &'static str = "stdio (or tty) | file=<path> | null | off";
}

impl FromStr for SerialConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            // `tty` is Cloud Hypervisor's name for the VMM's terminal.
            None if s == "stdio" || s == "tty" => Ok(SerialConfig::Stdio),
            None if s == "off" => Ok(SerialConfig::Off),
            None if s == "null" => Ok(SerialConfig::Null),
            Some(("file", p)) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            None if s == "pty" => Err(syntax(
                "--serial",
                Self::SYNTAX,
                "pty (Cloud Hypervisor's) is not supported: use tty, file=, null or off".into(),
            )),
            Some(("socket", _)) => Err(syntax(
                "--serial",
                Self::SYNTAX,
                "socket= (Cloud Hypervisor's) is not supported: use tty, file=, null or off".into(),
            )),
            _ => Err(syntax(
                "--serial",
                Self::SYNTAX,
                format!("unknown value {s:?}"),
            )),
        }
    }
}

/// `--vgpu`: an in-process vGPU on a private software GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgpuConfig {
    /// The profile (VRAM size, contexts).
    pub profile: &'static vgpu::Profile,
    /// Scheduler weight (1..=1000) on a shared GPU.
    pub weight: u32,
    /// Cap in percent of GPU time (1..=100).
    pub cap: u32,
    /// Spatial partition of a shared GPU (any that fits when absent).
    pub partition: Option<usize>,
}

impl VgpuConfig {
    /// Accepted syntax.
    pub const SYNTAX: &'static str =
        "profile=<name>[,weight=<1-1000>][,cap=<1-100>][,partition=<n>] or just <name>";
}

impl FromStr for VgpuConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let known = || {
            vgpu::PROFILES
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let err = |m: String| syntax("--vgpu", Self::SYNTAX, m);
        let mut profile = None;
        let (mut weight, mut cap, mut partition) = (1, 100, None);
        let num = |k: &str, v: &str, range: std::ops::RangeInclusive<u32>| {
            v.parse::<u32>()
                .ok()
                .filter(|n| range.contains(n))
                .ok_or_else(|| err(format!("{k} takes {range:?}, not {v:?}")))
        };
        for (k, v) in pairs(s, "profile", "--vgpu", Self::SYNTAX)? {
            match k {
                "weight" => weight = num(k, v, vgpu::sched::WEIGHTS)?,
                "cap" => cap = num(k, v, vgpu::sched::CAPS)?,
                "partition" => partition = Some(num(k, v, 0..=63)? as usize),
                "profile" => {
                    profile = Some(vgpu::profile::find(v).ok_or_else(|| {
                        err(format!("unknown profile {v:?} (known: {})", known()))
                    })?)
                }
                other => return Err(err(format!("unknown key {other:?}"))),
            }
        }
        Ok(VgpuConfig {
            profile: profile.ok_or_else(|| err("profile is missing".into()))?,
            weight,
            cap,
            partition,
        })
    }
}

/// `--console`: Cloud Hypervisor's virtio console. Tessera has none, so only `off` (what a
/// Cloud Hypervisor command line with `--serial tty` says) is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsoleConfig;

impl ConsoleConfig {
    /// Accepted syntax.
    pub const SYNTAX: &'static str = "off";
}

impl FromStr for ConsoleConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(ConsoleConfig);
        }
        Err(syntax(
            "--console",
            Self::SYNTAX,
            format!("{s:?}: Tessera has no virtio console (use --serial for the guest's console)"),
        ))
    }
}

/// `--user-device`: a device served by another process over vfio-user (a Tessera vGPU from
/// `tessera serve`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDeviceConfig {
    /// The server's socket for this device.
    pub socket: PathBuf,
    /// A user besides this one and root that the socket (and the directories above it) may
    /// belong to: the server's user.
    pub owner: Option<u32>,
    /// Cloud Hypervisor's device id (used in messages).
    pub id: Option<String>,
}

impl UserDeviceConfig {
    /// Accepted syntax.
    pub const SYNTAX: &'static str = "socket=<path>[,owner=<uid>][,id=<name>] or just <path>";

    /// The users the socket and its directories may belong to (root always may).
    pub fn trusted(&self) -> Vec<u32> {
        std::iter::once(devices::files::euid())
            .chain(self.owner)
            .collect()
    }
}

impl FromStr for UserDeviceConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |m: String| syntax("--user-device", Self::SYNTAX, m);
        let mut socket = None;
        let mut owner = None;
        let mut id = None;
        for (k, v) in pairs(s, "socket", "--user-device", Self::SYNTAX)? {
            match k {
                "id" if !v.is_empty()
                    && v.len() <= 64
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
                {
                    id = Some(v.to_string())
                }
                "id" => {
                    return Err(err(format!(
                        "id={v:?}: expected 1-64 letters, digits, '-' or '_'"
                    )));
                }
                "socket" if !v.is_empty() => socket = Some(PathBuf::from(v)),
                "socket" => return Err(err("socket is empty".into())),
                "owner" => {
                    owner = Some(
                        v.parse::<u32>()
                            .map_err(|_| err(format!("owner={v}: expected a numeric uid")))?,
                    )
                }
                other => return Err(err(format!("unknown key {other:?}"))),
            }
        }
        Ok(UserDeviceConfig {
            socket: socket.ok_or_else(|| err("socket is missing".into()))?,
            owner,
            id,
        })
    }
}

/// Everything needed to build a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image (PVH ELF or bzImage).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: CpusConfig,
    /// RAM.
    pub memory: MemoryConfig,
    /// COM1.
    pub serial: SerialConfig,
    /// In-process vGPUs, one private GPU each.
    pub vgpus: Vec<VgpuConfig>,
    /// What the in-process vGPUs' private GPUs are.
    pub gpu: vgpu::physical::GpuKind,
    /// Devices served by other processes over vfio-user.
    pub user_devices: Vec<UserDeviceConfig>,
    /// The KVM device node (tests point this elsewhere).
    pub kvm_path: PathBuf,
    /// Install seccomp filters on the VMM's threads (`vmm::seccomp`); off only for debugging.
    pub seccomp: bool,
    /// The control socket (`--api-socket`): pause, resume, info, shutdown.
    pub api_socket: Option<PathBuf>,
    /// Where the VM's memory and registers come from.
    pub from: VmSource,
}

/// Where a VM's memory and registers come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum VmSource {
    /// Boot `kernel` (with `initramfs` and `cmdline`).
    #[default]
    Kernel,
    /// Restore this snapshot directory (the VM's shape comes from the snapshot: see
    /// `vmm::vm_snapshot::restore_config`).
    Snapshot(PathBuf),
    /// An incoming migration fills memory and then hands over the state
    /// (`vmm::migration`).
    Migration,
}

impl VmConfig {
    /// Rules across options: every device needs its own PCI slot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let slots = usize::from(devices::pci::root::MAX_DEVICES) - 1;
        let requested = self.vgpus.len() + self.user_devices.len();
        if requested > slots {
            return Err(ConfigError::TooManyDevices { requested, slots });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_values() {
        assert_eq!("256M".parse::<MemoryConfig>().unwrap().size, 256 << 20);
        assert_eq!("size=1G".parse::<MemoryConfig>().unwrap().size, 1 << 30);
        assert_eq!("65536K".parse::<MemoryConfig>().unwrap().size, 64 << 20);
        // Cloud Hypervisor's spelling.
        assert_eq!(
            "size=128M,shared=on".parse::<MemoryConfig>().unwrap().size,
            128 << 20
        );
        let e = "size=128M,shared=off"
            .parse::<MemoryConfig>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("always shared"), "{e}");
        for bad in [
            "",
            "garbage",
            "size=",
            "size=12Q",
            "0",
            "4M",
            "size=64M,foo=1",
            "2T",
            "-1M",
            "16777217",
            "99999999999999999999G",
        ] {
            assert!(
                bad.parse::<MemoryConfig>().is_err(),
                "{bad:?} must be rejected"
            );
        }
        let e = "4M".parse::<MemoryConfig>().unwrap_err().to_string();
        assert!(e.contains("too small"), "{e}");
    }

    #[test]
    fn cpus_values() {
        assert_eq!("2".parse::<CpusConfig>().unwrap().boot, 2);
        let c: CpusConfig = "boot=4,hide=avx:avx2,pvm_hide=off".parse().unwrap();
        assert_eq!(c.boot, 4);
        assert_eq!(c.hide.len(), 2);
        assert!(!c.pvm_defaults);
        assert_eq!("boot=2,max=2".parse::<CpusConfig>().unwrap().boot, 2);
        assert_eq!("max=3,boot=3".parse::<CpusConfig>().unwrap().boot, 3);
        let e = "boot=1,max=2"
            .parse::<CpusConfig>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("no CPU hotplug"), "{e}");
        for bad in [
            "0",
            "boot=0",
            "255",
            "x",
            "boot=2,hide=sse9",
            "boot=2,foo=1",
            "1,2",
        ] {
            assert!(
                bad.parse::<CpusConfig>().is_err(),
                "{bad:?} must be rejected"
            );
        }
    }

    #[test]
    fn vgpu_values() {
        assert_eq!(
            "256M".parse::<VgpuConfig>().unwrap().profile.vram,
            256 << 20
        );
        assert_eq!(
            "profile=1G".parse::<VgpuConfig>().unwrap().profile.vram,
            1 << 30
        );
        let v: VgpuConfig = "profile=64M,weight=4,cap=50,partition=1".parse().unwrap();
        assert_eq!((v.weight, v.cap, v.partition), (4, 50, Some(1)));
        for bad in [
            "",
            "3G",
            "profile=",
            "profile=256M,x=1",
            "256M,weight=0",
            "256M,cap=101",
            "256M,weight=x",
        ] {
            assert!(
                bad.parse::<VgpuConfig>().is_err(),
                "{bad:?} must be rejected"
            );
        }
    }

    #[test]
    fn serial_values() {
        assert_eq!(
            "stdio".parse::<SerialConfig>().unwrap(),
            SerialConfig::Stdio
        );
        assert_eq!("off".parse::<SerialConfig>().unwrap(), SerialConfig::Off);
        assert_eq!(
            "file=/tmp/x".parse::<SerialConfig>().unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert_eq!("tty".parse::<SerialConfig>().unwrap(), SerialConfig::Stdio);
        assert_eq!("null".parse::<SerialConfig>().unwrap(), SerialConfig::Null);
        for bad in ["", "pty", "socket=/tmp/s", "file=", "pty=1"] {
            assert!(
                bad.parse::<SerialConfig>().is_err(),
                "{bad:?} must be rejected"
            );
        }
    }
}
