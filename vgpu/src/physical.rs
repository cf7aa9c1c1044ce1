//! One physical GPU shared by many vGPUs: its backend(s), VRAM allocation, spatial partitions
//! and their schedulers.
//!
//! A GPU is one or more partitions (MIG-like). Each partition has its own engines and VRAM
//! range (a backend of its own: one software GPU each, or one slice of a real GPU) and its own
//! time-slice scheduler; vGPUs are created in a partition and share only its engines. Without
//! partitions the GPU is one partition.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::backend::{BackendError, GpuBackend, SoftGpu, Vram};
use crate::profile::Profile;
use crate::sched::{Clock, MemberStats, MonotonicClock, Policy, Scheduler};

/// One spatial partition's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSpec {
    /// Engines (software GPU threads).
    pub engines: usize,
    /// VRAM bytes.
    pub vram: u64,
}

/// Which kind of GPU runs the vGPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuKind {
    /// The software GPU: engine threads on the host's CPUs.
    #[default]
    Soft,
    /// A Vulkan device (in the loader's order); a partition's engines are its queue.
    Vulkan {
        /// Device index.
        device: usize,
        /// VRAM in the device's own memory, the aperture trapped (`memory=device`); else
        /// host memory imported, the aperture mapped (`memory=host`, the default).
        device_memory: bool,
    },
}

impl std::str::FromStr for GpuKind {
    type Err = String;
    /// `soft`, or `vulkan[,device=N][,memory=host|device]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        match parts.next() {
            Some("soft") if s == "soft" => return Ok(GpuKind::Soft),
            Some("vulkan") => {}
            _ => {
                return Err(format!(
                    "unknown GPU {s:?} (soft, or vulkan[,device=N][,memory=host|device])"
                ));
            }
        }
        let mut kind = GpuKind::vulkan();
        for opt in parts {
            kind.set_vulkan_option(opt)?;
        }
        Ok(kind)
    }
}

impl GpuKind {
    /// Vulkan device 0 with host VRAM.
    pub fn vulkan() -> Self {
        GpuKind::Vulkan {
            device: 0,
            device_memory: false,
        }
    }

    /// Applies one `key=value` option of a Vulkan GPU (`device=N`, `memory=host|device`).
    pub fn set_vulkan_option(&mut self, opt: &str) -> Result<(), String> {
        let GpuKind::Vulkan {
            device,
            device_memory,
        } = self
        else {
            return Err(format!("{opt:?}: only a Vulkan GPU takes it"));
        };
        match opt.split_once('=') {
            Some(("device", n)) => {
                *device = n
                    .parse()
                    .ok()
                    .filter(|n| *n < 64)
                    .ok_or_else(|| format!("device={n}: expected a device index 0..64"))?;
            }
            Some(("memory", "host")) => *device_memory = false,
            Some(("memory", "device")) => *device_memory = true,
            _ => {
                return Err(format!("{opt:?}: expected device=N or memory=host|device"));
            }
        }
        Ok(())
    }

    /// A backend of this kind for one partition.
    pub fn backend(self, p: &PartitionSpec) -> Result<Arc<dyn GpuBackend>, BackendError> {
        Ok(match self {
            GpuKind::Soft => Arc::new(SoftGpu::new(p.vram, p.engines)?),
            GpuKind::Vulkan {
                device,
                device_memory,
            } => {
                let gpu = crate::backend::vulkan::VulkanGpu::new(device, p.vram)?;
                Arc::new(if device_memory {
                    gpu.device_local()
                } else {
                    gpu
                })
            }
        })
    }
}

/// A physical GPU's shape and scheduling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSpec {
    /// What runs the vGPUs.
    pub kind: GpuKind,
    /// The partitions (one for an unpartitioned GPU).
    pub partitions: Vec<PartitionSpec>,
    /// Policy of every partition's scheduler.
    pub policy: Policy,
    /// Time slice.
    pub slice: Duration,
}

impl GpuSpec {
    /// An unpartitioned GPU.
    pub fn whole(vram: u64, engines: usize) -> Self {
        GpuSpec {
            kind: GpuKind::Soft,
            partitions: vec![PartitionSpec { engines, vram }],
            policy: Policy::EqualShare,
            slice: crate::sched::DEFAULT_SLICE,
        }
    }
}

/// Errors of the physical GPU.
#[derive(Debug, thiserror::Error)]
pub enum PhysicalError {
    /// Building a backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// No partition has room for the profile.
    #[error("no room for a {profile} vGPU ({vram} bytes of VRAM){where_}")]
    NoRoom {
        /// Profile name.
        profile: &'static str,
        /// Its VRAM.
        vram: u64,
        /// " in partition N" when one was asked for.
        where_: String,
    },
    /// No such partition.
    #[error("partition {0} does not exist")]
    NoPartition(usize),
    /// Invalid shape.
    #[error("invalid GPU shape: {0}")]
    Shape(String),
}

struct Partition {
    gpu: Arc<dyn GpuBackend>,
    sched: Arc<Scheduler>,
    vram: Mutex<AddressAllocator>,
    spec: PartitionSpec,
}

/// See the module documentation.
pub struct PhysicalGpu {
    partitions: Vec<Partition>,
}

impl std::fmt::Debug for PhysicalGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhysicalGpu")
            .field(
                "partitions",
                &self.partitions.iter().map(|p| p.spec).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// VRAM and scheduling resources of one vGPU instance; returning them (drop) scrubs its VRAM
/// and frees the range for the next instance.
pub struct Lease {
    gpu: Arc<PhysicalGpu>,
    partition: usize,
    range: RangeInclusive,
    vram: Arc<dyn Vram>,
    profile: Profile,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("partition", &self.partition)
            .field("range", &self.range)
            .finish()
    }
}

impl Lease {
    /// The instance's VRAM.
    pub fn vram(&self) -> &Arc<dyn Vram> {
        &self.vram
    }
    /// Where its VRAM lies in its partition's VRAM range (for accounting).
    pub fn vram_offset(&self) -> u64 {
        self.range.start()
    }
    /// The profile it was leased for.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }
    /// The backend to run on.
    pub fn backend(&self) -> Arc<dyn GpuBackend> {
        self.gpu.partitions[self.partition].gpu.clone()
    }
    /// The scheduler to register with.
    pub fn scheduler(&self) -> Arc<Scheduler> {
        self.gpu.partitions[self.partition].sched.clone()
    }
    /// The partition it lives in.
    pub fn partition(&self) -> usize {
        self.partition
    }

    /// A new, zeroed VRAM file for the lease's range. A vfio-user server gives each client its
    /// own (and scrubs it when the client leaves), so a mapping a client keeps after it
    /// leaves never shows the next client's data.
    pub fn fresh_vram(&self) -> Result<Arc<dyn Vram>, BackendError> {
        self.gpu.partitions[self.partition]
            .gpu
            .alloc_vram(self.range.start(), self.vram.size())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.vram.scrub();
        if let Some(p) = self.gpu.partitions.get(self.partition) {
            let mut a = p.vram.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = a.free(&self.range) {
                tracing::error!("cannot return VRAM {:?}: {e}", self.range);
            }
        }
    }
}

/// Scheduler statistics of one partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionInfo {
    /// Index.
    pub index: usize,
    /// Shape.
    pub spec: PartitionSpec,
    /// Free VRAM bytes.
    pub vram_free: u64,
    /// Policy.
    pub policy: String,
    /// Slice in µs.
    pub slice_us: u64,
    /// The GPU under it (`soft (4 engines)`, `vulkan (llvmpipe …)`).
    pub gpu: String,
    /// Longest polling window of its vGPUs, µs (`crate::poll`).
    #[serde(default)]
    pub poll_window_us: u64,
    /// CPU one vGPU may spend polling, percent of a core.
    #[serde(default)]
    pub poll_vgpu_percent: u32,
    /// CPU all vGPUs of the GPU may spend polling, percent of a core.
    #[serde(default)]
    pub poll_total_percent: u32,
    /// Host CPU the GPU's vGPUs have spent polling (ns; the GPU's, shared by its partitions).
    #[serde(default)]
    pub poll_ns: u64,
}

impl PhysicalGpu {
    /// A GPU of `spec`'s kind and shape with the monotonic clock.
    pub fn new(spec: &GpuSpec) -> Result<Arc<Self>, PhysicalError> {
        Self::with_clock(spec, Arc::new(MonotonicClock::default()))
    }

    /// A GPU of `spec`'s kind and shape whose schedulers use `clock`.
    pub fn with_clock(spec: &GpuSpec, clock: Arc<dyn Clock>) -> Result<Arc<Self>, PhysicalError> {
        if spec.partitions.is_empty()
            || spec
                .partitions
                .iter()
                .any(|p| p.engines == 0 || p.vram == 0)
        {
            return Err(PhysicalError::Shape(
                "every partition needs at least one engine and some VRAM".into(),
            ));
        }
        let backends = spec
            .partitions
            .iter()
            .map(|p| spec.kind.backend(p))
            .collect::<Result<Vec<_>, BackendError>>()?;
        Self::from_backends(backends, spec.policy, spec.slice, clock)
    }

    /// A GPU whose partitions are `backends` (one each), scheduled with `policy` and `slice`
    /// on `clock`.
    pub fn from_backends(
        backends: Vec<Arc<dyn GpuBackend>>,
        policy: Policy,
        slice: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, PhysicalError> {
        if backends.is_empty() {
            return Err(PhysicalError::Shape("a GPU needs a backend".into()));
        }
        let mut partitions = Vec::new();
        // One polling budget for the whole GPU (`tessera serve --poll-cpu-total`).
        let poll = Arc::new(crate::poll::PollBudget::default());
        for gpu in backends {
            let spec = PartitionSpec {
                engines: gpu.engines(),
                vram: gpu.vram_size(),
            };
            let vram = AddressAllocator::new(0, spec.vram)
                .map_err(|e| PhysicalError::Shape(format!("VRAM of {} bytes: {e}", spec.vram)))?;
            partitions.push(Partition {
                gpu,
                sched: Scheduler::with_poll(policy, slice, clock.clone(), poll.clone()),
                vram: Mutex::new(vram),
                spec,
            });
        }
        Ok(Arc::new(PhysicalGpu { partitions }))
    }

    /// What the GPU under partition `partition` is, for people (`soft (4 engines)`).
    pub fn backend_name(&self, partition: usize) -> Option<String> {
        self.partitions.get(partition).map(|p| p.gpu.name())
    }

    /// How many more instances of `profile` fit (over all partitions), like mdev's
    /// `available_instances`.
    pub fn available_instances(&self, profile: &Profile) -> u64 {
        self.partitions
            .iter()
            .map(|p| {
                let a = p.vram.lock().unwrap_or_else(|e| e.into_inner());
                // Probe with a clone: allocate as many as fit.
                let mut probe = a.clone();
                let mut n = 0;
                while probe
                    .allocate(profile.vram, profile.vram, AllocPolicy::FirstMatch)
                    .is_ok()
                {
                    n += 1;
                }
                n
            })
            .sum()
    }

    /// Reserves VRAM for an instance of `profile`, in `partition` or wherever it fits.
    pub fn lease(
        self: &Arc<Self>,
        profile: &Profile,
        partition: Option<usize>,
    ) -> Result<Lease, PhysicalError> {
        let candidates: Vec<usize> = match partition {
            Some(i) if i < self.partitions.len() => vec![i],
            Some(i) => return Err(PhysicalError::NoPartition(i)),
            None => (0..self.partitions.len()).collect(),
        };
        for i in candidates {
            let p = &self.partitions[i];
            let range = {
                let mut a = p.vram.lock().unwrap_or_else(|e| e.into_inner());
                match a.allocate(profile.vram, profile.vram, AllocPolicy::FirstMatch) {
                    Ok(r) => r,
                    Err(_) => continue,
                }
            };
            let vram = match p.gpu.alloc_vram(range.start(), profile.vram) {
                Ok(v) => v,
                Err(e) => {
                    let _ = p
                        .vram
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .free(&range);
                    return Err(e.into());
                }
            };
            return Ok(Lease {
                gpu: self.clone(),
                partition: i,
                range,
                vram,
                profile: *profile,
            });
        }
        Err(PhysicalError::NoRoom {
            profile: profile.name,
            vram: profile.vram,
            where_: partition
                .map(|i| format!(" in partition {i}"))
                .unwrap_or_default(),
        })
    }

    /// Switches every partition's policy and slice at run time.
    pub fn set_policy(&self, policy: Policy, slice: Duration) {
        for p in &self.partitions {
            p.sched.set_policy(policy, slice);
        }
    }

    /// The partitions and their state.
    pub fn partitions(&self) -> Vec<PartitionInfo> {
        self.partitions
            .iter()
            .enumerate()
            .map(|(index, p)| {
                let (policy, slice) = p.sched.policy();
                let a = p.vram.lock().unwrap_or_else(|e| e.into_inner());
                let mut probe = a.clone();
                let mut free = 0;
                let mut size = p.spec.vram.next_power_of_two();
                while size >= 4096 {
                    while probe.allocate(size, size, AllocPolicy::FirstMatch).is_ok() {
                        free += size;
                    }
                    size /= 2;
                }
                let poll = p.sched.poll_budget();
                let limits = poll.limits();
                PartitionInfo {
                    index,
                    spec: p.spec,
                    vram_free: free,
                    policy: policy.to_string(),
                    slice_us: slice.as_micros() as u64,
                    gpu: p.gpu.name(),
                    poll_window_us: limits.window.as_micros() as u64,
                    poll_vgpu_percent: limits.vgpu_percent,
                    poll_total_percent: limits.total_percent,
                    poll_ns: poll.spent().as_nanos() as u64,
                }
            })
            .collect()
    }

    /// The polling limits of every vGPU of this GPU (shared by its partitions).
    pub fn poll_budget(&self) -> Arc<crate::poll::PollBudget> {
        self.partitions[0].sched.poll_budget().clone()
    }

    /// The scheduler of `partition`.
    pub fn scheduler(&self, partition: usize) -> Option<Arc<Scheduler>> {
        self.partitions.get(partition).map(|p| p.sched.clone())
    }
}

/// Live statistics of one vGPU instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VgpuStats {
    /// Instance name.
    pub name: String,
    /// Partition.
    pub partition: usize,
    /// GPU-busy ns since creation.
    pub busy_ns: u64,
    /// Share of GPU time over the last 100 ms.
    pub share: f64,
    /// Packets queued in all contexts.
    pub queue_depth: u64,
    /// Times it was given the GPU.
    pub context_switches: u64,
    /// Faults.
    pub faults: u64,
    /// Watchdog resets.
    pub resets: u64,
    /// Host CPU its command processor has spent polling tail shadows (ns).
    #[serde(default)]
    pub poll_ns: u64,
}

impl VgpuStats {
    /// Combines scheduler and device counters.
    pub fn new(name: &str, partition: usize, s: MemberStats, dev: (u64, u64, u64)) -> Self {
        VgpuStats {
            name: name.to_string(),
            partition,
            busy_ns: s.busy_ns,
            share: s.window_share,
            queue_depth: dev.0,
            context_switches: s.switches,
            faults: dev.1,
            resets: dev.2,
            poll_ns: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(vram: u64) -> Profile {
        Profile {
            name: "t",
            vram,
            contexts: 2,
            engines: 1,
        }
    }

    #[test]
    fn leases_follow_vram_and_are_reclaimed() {
        let g = PhysicalGpu::new(&GpuSpec::whole(8 << 20, 1)).unwrap();
        let p = profile(2 << 20);
        assert_eq!(g.available_instances(&p), 4);
        let a = g.lease(&p, None).unwrap();
        let b = g.lease(&p, None).unwrap();
        assert_eq!(g.available_instances(&p), 2);
        a.vram().write(0, &0xfeed_u32.to_le_bytes()).unwrap();
        drop(a);
        assert_eq!(g.available_instances(&p), 3);
        let c = g.lease(&p, None).unwrap();
        let mut word = [0u8; 4];
        c.vram().read(0, &mut word).unwrap();
        assert_eq!(
            word, [0; 4],
            "a new instance never sees the previous one's data"
        );
        let _d = g.lease(&p, None).unwrap();
        let _e = g.lease(&p, None).unwrap();
        assert!(matches!(
            g.lease(&p, None),
            Err(PhysicalError::NoRoom { .. })
        ));
        drop(b);
        assert_eq!(g.partitions()[0].vram_free, 2 << 20);
    }

    #[test]
    fn partitions_are_separate() {
        let spec = GpuSpec {
            kind: GpuKind::Soft,
            partitions: vec![
                PartitionSpec {
                    engines: 1,
                    vram: 4 << 20,
                },
                PartitionSpec {
                    engines: 2,
                    vram: 8 << 20,
                },
            ],
            policy: Policy::BestEffort,
            slice: Duration::from_millis(2),
        };
        let g = PhysicalGpu::new(&spec).unwrap();
        let p = profile(4 << 20);
        assert_eq!(g.available_instances(&p), 3);
        let a = g.lease(&p, Some(0)).unwrap();
        assert!(matches!(
            g.lease(&p, Some(0)),
            Err(PhysicalError::NoRoom { .. })
        ));
        let b = g.lease(&p, Some(1)).unwrap();
        assert_ne!(Arc::as_ptr(&a.scheduler()), Arc::as_ptr(&b.scheduler()));
        assert_eq!(b.backend().engines(), 2);
        assert!(matches!(
            g.lease(&p, Some(5)),
            Err(PhysicalError::NoPartition(5))
        ));
        g.set_policy(Policy::FixedQuantum, Duration::from_millis(6));
        assert_eq!(g.partitions()[1].policy, "fixed-quantum");
        assert_eq!(g.partitions()[1].slice_us, 6000);
    }
}
