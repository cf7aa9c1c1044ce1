//! `run=bench-latency mode=fast|suppress|poll|trapped [wait=spin|block|hybrid] iters=N`: N
//! submit → fence round trips of one FENCE packet each, timed with the TSC,
//! the TSC calibrated against the GPU clock (`TIMESTAMP`, ns) over the whole
//! run. The wait for each fence spins on it by default (`wait=`).
//!
//! Output: `bench latency mode=M wait=W iters=N gap_us=G p50_ns=X p99_ns=Y
//! mean_ns=Z doorbells=D`.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;

use vgpu_abi::{ctx_control, regs};

use super::{
    CTX, FENCE_PAGE, RING_PAGE, Ring, SHADOW_OFFSET, SPIN_LIMIT_NS, STATIC_RING_ENTRIES, Waiter,
    clock_pair, finish, gpu_map_statics, open_gpu, page, poke32, publish_tail, rdtsc, start_ctx,
};
use crate::cmdline::{BenchOptions, MAX_ITERS, Submit, Wait};
use crate::conformance::Fail;
use crate::conformance::driver::fence;
use crate::serial::fw_println;

/// Unmeasured round trips first (device threads awake, caches and TLBs warm).
const WARMUP: u32 = 32;

/// Per-iteration TSC ticks (saturated at `u32::MAX`, over a second). In
/// `.noinit` (link.ld): outside `.bss`, so booting does not zero (touch)
/// 400 KiB that only this mode uses.
struct Samples(UnsafeCell<MaybeUninit<[u32; MAX_ITERS as usize]>>);

// SAFETY: the firmware is single-threaded and only `run` below touches the
// buffer, once per boot.
unsafe impl Sync for Samples {}

#[unsafe(link_section = ".noinit.bench_samples")]
static SAMPLES: Samples = Samples(UnsafeCell::new(MaybeUninit::uninit()));

/// `run=bench-latency`; returns the exit status.
pub fn latency(o: &BenchOptions) -> u8 {
    finish(run(o))
}

fn run(o: &BenchOptions) -> Result<(), Fail> {
    let n = o.iters.clamp(1, MAX_ITERS) as usize;
    let gpu = open_gpu()?;
    gpu_map_statics()?;
    let start = clock_pair(&gpu);
    let fence_va = page(FENCE_PAGE);
    let shadow = fence_va + SHADOW_OFFSET;
    let mut ring = Ring {
        base: page(RING_PAGE),
        size: STATIC_RING_ENTRIES,
        tail: 0,
    };
    let (tail_shadow, control) = match o.submit {
        Submit::Fast => (Some(shadow), ctx_control::ENABLE),
        Submit::Suppress => (Some(shadow), ctx_control::ENABLE | ctx_control::SUPPRESS),
        Submit::Poll => (Some(shadow), ctx_control::ENABLE | ctx_control::POLL),
        Submit::Trapped => (None, ctx_control::ENABLE),
    };
    start_ctx(&gpu, &ring, tail_shadow, control);
    let waiter = Waiter::new(&gpu, o.wait, Wait::Spin);
    gpu.wr(regs::WAIT_CTX, CTX);

    let mut value = 0u64;
    let mut doorbells = 0u64;
    // Returns whether it rang the doorbell.
    let mut round_trip = |ring: &mut Ring| -> Result<bool, Fail> {
        value += 1;
        ring.push(&fence(fence_va, value, 0));
        // `push` wrote the packet with plain stores; register accesses are
        // compiler barriers, and the shadow store is volatile after this one.
        crate::io::barrier();
        let rang = match o.submit {
            Submit::Fast | Submit::Suppress => {
                publish_tail(&gpu, shadow, ring.tail, o.submit == Submit::Suppress)
            }
            Submit::Poll => {
                poke32(shadow, ring.tail);
                false
            }
            Submit::Trapped => {
                gpu.ctx_wr(CTX, regs::CTX_RING_TAIL, ring.tail);
                false
            }
        };
        waiter
            .wait(&gpu, fence_va, value, SPIN_LIMIT_NS)
            .map(|()| rang)
    };
    for _ in 0..WARMUP {
        round_trip(&mut ring)?;
    }
    let samples = SAMPLES.0.get().cast::<u32>();
    for i in 0..n {
        if o.gap_us != 0 {
            // Idle: the GPU's polling window closes (the GPU clock is a trapped read).
            let until = gpu.timestamp() + u64::from(o.gap_us) * 1000;
            while gpu.timestamp() < until {
                core::hint::spin_loop();
            }
        }
        let t0 = rdtsc();
        doorbells += u64::from(round_trip(&mut ring)?);
        let ticks = rdtsc() - t0;
        // SAFETY: `i < n <= MAX_ITERS`, inside the static buffer, which
        // nothing else uses; a raw write initialises the element.
        unsafe {
            samples
                .add(i)
                .write(u32::try_from(ticks).unwrap_or(u32::MAX))
        };
    }
    let end = clock_pair(&gpu);

    // SAFETY: the first `n` elements were all written above; this is the
    // only reference to the buffer.
    let samples = unsafe { core::slice::from_raw_parts_mut(samples, n) };
    samples.sort_unstable();
    let (dtsc, dns) = (end.tsc - start.tsc, end.ns.saturating_sub(start.ns));
    if dtsc == 0 || dns == 0 {
        return Err(Fail::new(format_args!(
            "no time passed: {dtsc} TSC ticks, {dns} ns of GPU time"
        )));
    }
    let ns = |ticks: u64| (u128::from(ticks) * u128::from(dns) / u128::from(dtsc)) as u64;
    let sum: u64 = samples.iter().map(|&t| u64::from(t)).sum();
    fw_println!(
        "bench latency mode={} wait={} iters={n} gap_us={} p50_ns={} p99_ns={} mean_ns={} \
         doorbells={}",
        o.submit.name(),
        waiter.how.name(),
        o.gap_us,
        ns(u64::from(samples[(n - 1) * 50 / 100])),
        ns(u64::from(samples[(n - 1) * 99 / 100])),
        ns(sum) / n as u64,
        doorbells
    );
    Ok(())
}
