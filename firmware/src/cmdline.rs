//! Command line options: whitespace-separated `key=value` tokens.
//!
//! | key      | values          | default |
//! |----------|-----------------|---------|
//! | `run`    | `info`, `echo`, `panic`, `fault`, `conformance`, `bench-latency`, `bench-throughput`, `first-fence`, `load` | `info` |
//! | `exit`   | `0`..=`255`     | `0`     |
//! | `mode`   | `fast`, `suppress`, `poll`, `trapped` (`run=bench-latency`) | `fast` |
//! | `iters`  | `1`..=`100000` (`run=bench-latency`) | `1000` |
//! | `gap_us` | `0`..=`1000000` (`run=bench-latency`: idle time before each round trip) | `0` |
//! | `wait`   | `spin`, `block`, `hybrid` (how the benchmarks and `run=load` wait for a fence: spin on its memory word; block in the `WAIT` register; spin up to `spin_us`, then block) | `spin` for `run=bench-latency`, `hybrid` otherwise |
//! | `spin_us` | `0`..=`10000` (`wait=hybrid`: longest spin before blocking) | `50` |
//! | `kernel` | `sgemm`, `saxpy` (`run=bench-throughput`) | `sgemm` |
//! | `size`   | `1`..=`268435456` (`run=bench-throughput`; sgemm: at most 4096) | `256` |
//! | `batch`  | `1`..=`4095` (`run=bench-throughput`) | `8` |
//! | `kind`   | `busy`, `bursty`, `long`, `idle`, `dirty` (`run=load`) | `busy` |
//! | `seconds` | `1`..=`600` (`run=load`) | `2` |
//! | `us`     | `1`..=`1000000` (`run=load`: SPIN_US µs per workgroup) | `250` |
//! | `groups` | `1`..=`65536` (`run=load`: SPIN_US workgroups) | `8` (`kind=long`: `4000` for the first dispatch) |
//! | `pci`    | `own`, `external` (`run=conformance`: `external` when the VMM's PCI emulation is not Tessera's, e.g. Cloud Hypervisor over vfio-user; checks of what that VMM owns are reported as skipped) | `own` |
//!
//! Unknown keys (and tokens without `=`) are reported and ignored; a known
//! key with a bad value is reported and ignored. A repeated key: the last
//! one wins. The benchmark and load keys are accepted with any `run=` and
//! only used by the benchmark modes and `run=load`.

use vgpu_abi::limits;

/// What to do after the information lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Nothing more.
    Info,
    /// Read one line from the serial port and print it back.
    Echo,
    /// Self-test of the panic path: panic (exit status 125).
    Panic,
    /// Self-test of the exception path: execute `ud2` at CPL3 (#UD, exit
    /// status 128 + 6 = 134 through the ring-0 handler).
    Fault,
    /// Run the vGPU conformance suite.
    Conformance,
    /// Submit-to-fence round trips, one FENCE at a time.
    BenchLatency,
    /// A batch of kernel dispatches timed with the GPU clock.
    BenchThroughput,
    /// One fence as soon as possible after boot (no information lines).
    FirstFence,
    /// A GPU load for the multi-VM scheduler harness (no information lines).
    Load,
}

/// How `run=bench-latency` publishes the ring tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    /// Tail shadow + doorbell write (an ioeventfd in the VMM).
    Fast,
    /// Tail shadow, then the doorbell only when the GPU's hint asks for one
    /// (`CTX_CONTROL.SUPPRESS`).
    Suppress,
    /// Tail shadow only; the GPU polls it (`CTX_CONTROL.POLL`).
    Poll,
    /// `CTX_RING_TAIL` write (trapped MMIO, handled by the VMM).
    Trapped,
}

impl Submit {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Suppress => "suppress",
            Self::Poll => "poll",
            Self::Trapped => "trapped",
        }
    }
}

/// How a benchmark (or `run=load`) waits for a fence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Spin on the fence word in memory (no exit; the vCPU stays busy).
    Spin,
    /// Block in the `WAIT` register (an exit; the vCPU thread sleeps).
    Block,
    /// Spin up to `spin_us`, then block.
    Hybrid,
}

impl Wait {
    pub fn name(self) -> &'static str {
        match self {
            Self::Spin => "spin",
            Self::Block => "block",
            Self::Hybrid => "hybrid",
        }
    }
}

/// `wait=` and `spin_us=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitOptions {
    /// `None`: the mode's default.
    pub how: Option<Wait>,
    pub spin_us: u32,
}

/// Longest `spin_us=`.
pub const MAX_SPIN_US: u32 = 10_000;

/// The kernel `run=bench-throughput` dispatches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Sgemm,
    Saxpy,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sgemm => "sgemm",
            Self::Saxpy => "saxpy",
        }
    }
}

/// The load `run=load` generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadKind {
    /// The queue kept non-empty for the whole run.
    Busy,
    /// Alternating busy and idle phases.
    Bursty,
    /// One long dispatch, then busy.
    Long,
    /// No GPU work at all.
    Idle,
    /// Memory written all the time, for live migration: the GPU fills guest RAM and the CPU
    /// writes VRAM through the aperture, job after job; at the end every byte is checked.
    Dirty,
}

impl LoadKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::Bursty => "bursty",
            Self::Long => "long",
            Self::Idle => "idle",
            Self::Dirty => "dirty",
        }
    }
}

/// Longest `run=load` (`seconds=`).
pub const MAX_LOAD_SECONDS: u32 = 600;

/// Options of `run=load`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    pub kind: LoadKind,
    pub seconds: u32,
    /// SPIN_US microseconds per workgroup.
    pub us: u64,
    /// SPIN_US workgroups (`None`: the kind's default).
    pub groups: Option<u64>,
    pub wait: WaitOptions,
}

/// Most round trips `run=bench-latency` measures.
pub const MAX_ITERS: u32 = 100_000;
/// Largest `size=` (saxpy elements; 4 bytes each, so one buffer is at most 1 GiB).
pub const MAX_SIZE: u64 = 1 << 28;
/// Largest `batch=` (the dispatches and a fence fill a ring of 4096 packets).
pub const MAX_BATCH: u32 = 4095;

/// Options of the benchmark modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchOptions {
    pub submit: Submit,
    pub iters: u32,
    /// Idle time before each round trip, in µs (`run=bench-latency`).
    pub gap_us: u32,
    pub kernel: Kernel,
    pub size: u64,
    pub batch: u32,
    pub wait: WaitOptions,
}

/// Parsed options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub run: RunMode,
    /// `run=` named no mode this firmware has: the VM exits with status 2 (a usage error).
    pub bad_run: bool,
    pub exit_status: u8,
    /// `pci=external`: configuration space, BAR decoding and the MSI-X table are emulated
    /// by a VMM other than Tessera.
    pub external_pci: bool,
    pub bench: BenchOptions,
    pub load: LoadOptions,
}

const DEFAULT_WAIT: WaitOptions = WaitOptions {
    how: None,
    spin_us: 50,
};

impl Default for Options {
    fn default() -> Self {
        Self {
            run: RunMode::Info,
            bad_run: false,
            exit_status: 0,
            external_pci: false,
            bench: BenchOptions {
                submit: Submit::Fast,
                iters: 1000,
                gap_us: 0,
                kernel: Kernel::Sgemm,
                size: 256,
                batch: 8,
                wait: DEFAULT_WAIT,
            },
            load: LoadOptions {
                kind: LoadKind::Busy,
                seconds: 2,
                us: 250,
                groups: None,
                wait: DEFAULT_WAIT,
            },
        }
    }
}

/// A token the parser ignored.
#[derive(Clone, Copy, Debug)]
pub enum Ignored<'a> {
    /// The key is not known.
    UnknownOption(&'a [u8]),
    /// The key is known but the value is not valid for it.
    InvalidValue(&'a [u8]),
}

/// A decimal number in `[min, max]` (at most 20 digits, no sign).
fn parse_dec(digits: &[u8], min: u64, max: u64) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let mut value: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    (min..=max).contains(&value).then_some(value)
}

fn parse_u8(digits: &[u8]) -> Option<u8> {
    if digits.len() > 3 {
        return None;
    }
    parse_dec(digits, 0, u64::from(u8::MAX)).map(|v| v as u8)
}

/// Parse `cmdline`, calling `ignored` for every token that has no effect.
pub fn parse<'a>(cmdline: &'a [u8], mut ignored: impl FnMut(Ignored<'a>)) -> Options {
    let mut opts = Options::default();
    for token in cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
    {
        let Some(eq) = token.iter().position(|&b| b == b'=') else {
            ignored(Ignored::UnknownOption(token));
            continue;
        };
        let (key, value) = (&token[..eq], &token[eq + 1..]);
        let b = &mut opts.bench;
        let ok = match key {
            b"run" => {
                let run = match value {
                    b"info" => Some(RunMode::Info),
                    b"echo" => Some(RunMode::Echo),
                    b"panic" => Some(RunMode::Panic),
                    b"fault" => Some(RunMode::Fault),
                    b"conformance" => Some(RunMode::Conformance),
                    b"bench-latency" => Some(RunMode::BenchLatency),
                    b"bench-throughput" => Some(RunMode::BenchThroughput),
                    b"first-fence" => Some(RunMode::FirstFence),
                    b"load" => Some(RunMode::Load),
                    _ => None,
                };
                opts.bad_run = run.is_none();
                run.map(|r| opts.run = r).is_some()
            }
            b"exit" => parse_u8(value).map(|s| opts.exit_status = s).is_some(),
            b"pci" => match value {
                b"own" | b"external" => {
                    opts.external_pci = value == b"external";
                    true
                }
                _ => false,
            },
            b"mode" => {
                let submit = match value {
                    b"fast" => Some(Submit::Fast),
                    b"suppress" => Some(Submit::Suppress),
                    b"poll" => Some(Submit::Poll),
                    b"trapped" => Some(Submit::Trapped),
                    _ => None,
                };
                submit.map(|s| b.submit = s).is_some()
            }
            b"iters" => parse_dec(value, 1, u64::from(MAX_ITERS))
                .map(|n| b.iters = n as u32)
                .is_some(),
            b"gap_us" => parse_dec(value, 0, 1_000_000)
                .map(|n| b.gap_us = n as u32)
                .is_some(),
            b"wait" => {
                let how = match value {
                    b"spin" => Some(Wait::Spin),
                    b"block" => Some(Wait::Block),
                    b"hybrid" => Some(Wait::Hybrid),
                    _ => None,
                };
                how.map(|w| b.wait.how = Some(w)).is_some()
            }
            b"spin_us" => parse_dec(value, 0, u64::from(MAX_SPIN_US))
                .map(|n| b.wait.spin_us = n as u32)
                .is_some(),
            b"kernel" => {
                let kernel = match value {
                    b"sgemm" => Some(Kernel::Sgemm),
                    b"saxpy" => Some(Kernel::Saxpy),
                    _ => None,
                };
                kernel.map(|k| b.kernel = k).is_some()
            }
            b"size" => parse_dec(value, 1, MAX_SIZE).map(|n| b.size = n).is_some(),
            b"batch" => parse_dec(value, 1, u64::from(MAX_BATCH))
                .map(|n| b.batch = n as u32)
                .is_some(),
            b"kind" => {
                let kind = match value {
                    b"busy" => Some(LoadKind::Busy),
                    b"bursty" => Some(LoadKind::Bursty),
                    b"long" => Some(LoadKind::Long),
                    b"idle" => Some(LoadKind::Idle),
                    b"dirty" => Some(LoadKind::Dirty),
                    _ => None,
                };
                kind.map(|k| opts.load.kind = k).is_some()
            }
            b"seconds" => parse_dec(value, 1, u64::from(MAX_LOAD_SECONDS))
                .map(|n| opts.load.seconds = n as u32)
                .is_some(),
            b"us" => parse_dec(value, 1, limits::MAX_SPIN_US)
                .map(|n| opts.load.us = n)
                .is_some(),
            b"groups" => parse_dec(value, 1, limits::MAX_SPIN_GROUPS)
                .map(|n| opts.load.groups = Some(n))
                .is_some(),
            _ => {
                ignored(Ignored::UnknownOption(token));
                continue;
            }
        };
        if !ok {
            ignored(Ignored::InvalidValue(token));
        }
    }
    opts.load.wait = opts.bench.wait;
    opts
}
