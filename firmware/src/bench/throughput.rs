//! `run=bench-throughput kernel=sgemm|saxpy size=S batch=B [wait=...]`: B
//! dispatches and a fence, timed with the GPU clock, waited for by default
//! with a short spin and then the blocking `WAIT` register (a vCPU spinning
//! all along, `wait=spin`, takes CPU time from the GPU's engine threads on a
//! small host).
//!
//! The inputs match the host-side run of `tessera bench vgpu`: element i is
//! `(i % 7) as f32` in A and B (sgemm, S×S each; C is S×S) or in x and y
//! (saxpy, S elements, a = 2.0). Buffers are guest RAM from 4 MiB up,
//! identity-mapped for the GPU with 2 MiB leaves.
//!
//! Output: `bench throughput kernel=K size=S batch=B wait=W ns=T`.

use vgpu_abi::{ctx_control, kernel, limits, packet, regs};

use super::{
    BATCH_LIMIT_NS, CTX, FENCE_PAGE, GPU_MAP_LIMIT, PAGE, PAGE_2M, Ring, Waiter, finish, gpu_map,
    gpu_map_statics, open_gpu, page,
};
use crate::arena::Arena;
use crate::cmdline::{BenchOptions, Kernel, Wait};
use crate::conformance::Fail;
use crate::conformance::driver::{dispatch, fence};
use crate::pvh::StartInfo;
use crate::serial::fw_println;

/// Lowest RAM the buffers use (the firmware image ends below 2 MiB).
const RAM_FLOOR: u64 = 4 << 20;

/// `run=bench-throughput`; returns the exit status.
pub fn throughput(info: Option<&StartInfo>, o: &BenchOptions) -> u8 {
    finish(run(info, o))
}

/// The largest RAM range above [`RAM_FLOOR`] and below 4 GiB.
pub(super) fn ram_arena(info: Option<&StartInfo>) -> Option<Arena> {
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
    let waiter = Waiter::new(&gpu, o.wait, Wait::Hybrid);
    gpu.wr(regs::WAIT_CTX, CTX);

    // Warm-up: one dispatch (page walks, engine threads awake).
    ring.push(&packet);
    ring.push(&fence(fence_va, 1, 0));
    gpu.ctx_wr(CTX, regs::CTX_RING_TAIL, ring.tail);
    waiter.wait(&gpu, fence_va, 1, BATCH_LIMIT_NS)?;

    let t0 = gpu.timestamp();
    for _ in 0..o.batch {
        ring.push(&packet);
    }
    ring.push(&fence(fence_va, 2, 0));
    gpu.ctx_wr(CTX, regs::CTX_RING_TAIL, ring.tail);
    waiter.wait(&gpu, fence_va, 2, BATCH_LIMIT_NS)?;
    let t1 = gpu.timestamp();
    fw_println!(
        "bench throughput kernel={} size={s} batch={} wait={} ns={}",
        o.kernel.name(),
        o.batch,
        waiter.how.name(),
        t1.saturating_sub(t0)
    );
    Ok(())
}
