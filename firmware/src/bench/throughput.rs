//! `run=bench-throughput kernel=sgemm|saxpy size=S batch=B`: B dispatches
//! and a fence, timed with the GPU clock, waited for with the blocking `WAIT`
//! register (a spinning vCPU would take CPU time from the GPU's engine
//! threads on a small host).
//!
//! The inputs match the host-side run of `tessera bench vgpu`: element i is
//! `(i % 7) as f32` in A and B (sgemm, S×S each; C is S×S) or in x and y
//! (saxpy, S elements, a = 2.0). Buffers are guest RAM from 4 MiB up,
//! identity-mapped for the GPU with 2 MiB leaves.
//!
//! Output: `bench throughput kernel=K size=S batch=B ns=T`.

use vgpu_abi::{ctx_control, kernel, limits, packet, regs, wait};

use super::{
    CTX, FENCE_PAGE, GPU_MAP_LIMIT, PAGE, PAGE_2M, Ring, finish, gpu_map, gpu_map_statics,
    open_gpu, page,
};
use crate::arena::Arena;
use crate::cmdline::{BenchOptions, Kernel};
use crate::conformance::Fail;
use crate::conformance::driver::{Gpu, dispatch, fence};
use crate::pvh::StartInfo;
use crate::serial::fw_println;

/// Lowest RAM the buffers use (the firmware image ends below 2 MiB).
const RAM_FLOOR: u64 = 4 << 20;
/// `WAIT` reads (each at most `WAIT_TIMEOUT_MS`) before giving up: 60 s.
const WAIT_TRIES: u32 = 60_000 / limits::WAIT_TIMEOUT_MS;

/// `run=bench-throughput`; returns the exit status.
pub fn throughput(info: Option<&StartInfo>, o: &BenchOptions) -> u8 {
    finish(run(info, o))
}

/// The largest RAM range above [`RAM_FLOOR`] and below 4 GiB.
fn ram_arena(info: Option<&StartInfo>) -> Option<Arena> {
    let ram = crate::conformance::ram_map(info);
    ram.ranges[..ram.count]
        .iter()
        .filter_map(|r| {
            let start = r.base.max(RAM_FLOOR).next_multiple_of(PAGE_2M);
            let end = r.end.min(GPU_MAP_LIMIT);
            (end > start).then_some((start, end))
        })
        .max_by_key(|(s, e)| e - s)
        .map(|(s, e)| Arena::new(s, e))
}

/// `len` bytes of RAM from `arena`, page-aligned.
fn alloc(arena: &mut Arena, len: u64, what: &str) -> Result<u64, Fail> {
    arena.alloc(len, PAGE).ok_or_else(|| {
        Fail::new(format_args!(
            "not enough RAM for {what} ({len} bytes, {} free)",
            arena.free()
        ))
    })
}

/// Fill `n` f32 at `addr` with `(i % 7) as f32` (`zero`: with 0.0).
fn init_f32(addr: u64, n: u64, zero: bool) {
    // SAFETY: `[addr, addr + 4n)` is RAM this benchmark allocated for the
    // buffer (identity-mapped below 4 GiB, 4-byte aligned); no other
    // reference to it exists and the device does not use it yet.
    let s = unsafe {
        core::slice::from_raw_parts_mut(
            core::ptr::with_exposed_provenance_mut::<f32>(addr as usize),
            n as usize,
        )
    };
    for (i, v) in s.iter_mut().enumerate() {
        *v = if zero { 0.0 } else { (i % 7) as f32 };
    }
}

/// Wait with the blocking `WAIT` register until context [`CTX`] completed
/// fence `value` (no guest CPU burnt).
fn wait_fence(gpu: &Gpu, value: u64) -> Result<(), Fail> {
    gpu.wr(regs::WAIT_CTX, CTX);
    gpu.wr(regs::WAIT_VALUE, value as u32);
    for _ in 0..WAIT_TRIES {
        match gpu.rd(regs::WAIT) {
            wait::DONE => return Ok(()),
            wait::TIMEOUT => {}
            r => {
                return Err(Fail::new(format_args!(
                    "fence {value}: WAIT returned {r} ({})",
                    gpu.ctx_state(CTX)
                )));
            }
        }
    }
    Err(Fail::new(format_args!(
        "fence {value} not done after {} s ({})",
        WAIT_TRIES * limits::WAIT_TIMEOUT_MS / 1000,
        gpu.ctx_state(CTX)
    )))
}

fn run(info: Option<&StartInfo>, o: &BenchOptions) -> Result<(), Fail> {
    let s = o.size;
    let (elems, buffers) = match o.kernel {
        Kernel::Sgemm if s > limits::MAX_SGEMM_DIM => {
            return Err(Fail::new(format_args!(
                "sgemm size {s} above {}",
                limits::MAX_SGEMM_DIM
            )));
        }
        Kernel::Sgemm => (s * s, 3),
        Kernel::Saxpy => (s, 2),
    };
    let bytes = elems * 4;
    if bytes > limits::MAX_TRANSFER {
        return Err(Fail::new(format_args!(
            "{} buffers of {bytes} bytes exceed MAX_TRANSFER",
            o.kernel.name()
        )));
    }
    let mut arena = ram_arena(info).ok_or_else(|| Fail::new(format_args!("no RAM above 4 MiB")))?;
    let ring_entries = (o.batch + 1).next_power_of_two();
    let ring_base = alloc(
        &mut arena,
        u64::from(ring_entries) * packet::PACKET_SIZE,
        "the ring",
    )?;
    let mut bufs = [0u64; 3];
    for b in bufs.iter_mut().take(buffers) {
        *b = alloc(&mut arena, bytes, "the buffers")?;
    }
    let gpu = open_gpu()?;
    gpu_map_statics()?;
    gpu_map(ring_base, arena.mark())?;
    let packet = match o.kernel {
        Kernel::Sgemm => {
            let [a, b, c] = bufs;
            init_f32(a, elems, false);
            init_f32(b, elems, false);
            init_f32(c, elems, true);
            dispatch(kernel::SGEMM, &[s, s, s, a, b, c])
        }
        Kernel::Saxpy => {
            let [x, y, _] = bufs;
            init_f32(x, elems, false);
            init_f32(y, elems, false);
            dispatch(kernel::SAXPY, &[s, u64::from(2.0f32.to_bits()), x, y])
        }
    };
    let mut ring = Ring {
        base: ring_base,
        size: ring_entries,
        tail: 0,
    };
    super::start_ctx(&gpu, &ring, None, ctx_control::ENABLE);
    let fence_va = page(FENCE_PAGE);

    // Warm-up: one dispatch (page walks, engine threads awake).
    ring.push(&packet);
    ring.push(&fence(fence_va, 1, 0));
    gpu.ctx_wr(CTX, regs::CTX_RING_TAIL, ring.tail);
    wait_fence(&gpu, 1)?;

    let t0 = gpu.timestamp();
    for _ in 0..o.batch {
        ring.push(&packet);
    }
    ring.push(&fence(fence_va, 2, 0));
    gpu.ctx_wr(CTX, regs::CTX_RING_TAIL, ring.tail);
    wait_fence(&gpu, 2)?;
    let t1 = gpu.timestamp();
    fw_println!(
        "bench throughput kernel={} size={s} batch={} ns={}",
        o.kernel.name(),
        o.batch,
        t1.saturating_sub(t0)
    );
    Ok(())
}
