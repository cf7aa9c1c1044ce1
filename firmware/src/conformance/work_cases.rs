//! Commands, kernels, fences, the ring protocol, doorbells and `WAIT`.

use vgpu_abi::{caps, ctx_control, ctx_status, fault, int, kernel, regs, shadow, wait};

use super::driver::{
    Buf, Env, FENCE_VA, Gpu, Loc, PAGE, copy, dispatch, fence, fill, nop, pattern_byte, timestamp,
};
use super::mmu_cases::check;
use super::reference::{crc32, saxpy, test_f32, ulps};
use super::{Outcome, Suite, bail, ensure, ensure_eq};

/// Scratch offsets in a standard environment's fence page.
const TS0: u64 = 64;
const TS1: u64 = 72;
const OUT: u64 = 128;
const SHADOW: u64 = 512;

/// Spin on `done` with a few GPU clock reads, for at most `ms` (and a bounded
/// number of rounds, should the clock not advance).
fn poll_until(g: &Gpu, ms: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = g.timestamp();
    for _ in 0..ms * 1000 {
        for _ in 0..4096 {
            if done() {
                return true;
            }
            core::hint::spin_loop();
        }
        if g.timestamp().wrapping_sub(start) > ms * 1_000_000 {
            break;
        }
    }
    done()
}

pub fn cmd_nop(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let nops = [nop(); 40];
    env.run(s, &nops)?;
    let st = s.gpu.ctx_state(0);
    ensure_eq!(st.head, 41, "CTX_RING_HEAD after 40 NOPs and a fence");
    ensure_eq!(st.tail, 41, "CTX_RING_TAIL");
    ensure_eq!(st.status, ctx_status::ENABLED, "CTX_STATUS when idle");
    Ok(())
}

pub fn cmd_copy(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let len = 5 * PAGE;
    let (src_va, src) = env.buf(s, Loc::Sys, len, false, true)?;
    let (dst_va, dst) = env.buf(s, Loc::Sys, len, true, true)?;
    src.fill_pattern(51);
    for (from, to, n) in [
        (0, 0, 1),
        (1, 2, 3),
        (4093, 5, 7),
        (3, 4095, 4097),
        (100, 201, 12345),
        (0, 0, 4096),
        (7, 9, 0),
        (0, 0, len),
    ] {
        dst.fill(0);
        env.run(s, &[copy(src_va + from, dst_va + to, n)])?;
        if let Some((at, want, got)) = dst.mismatch(0, len, |o| {
            if (to..to + n).contains(&o) {
                pattern_byte(51, o - to + from)
            } else {
                0
            }
        }) {
            bail!(
                "COPY {n} bytes from +{from} to +{to}: byte {at:#x} is {got:#x}, expected {want:#x}"
            );
        }
    }
    // A few MiB from guest RAM to VRAM and back (bigger than any internal chunk).
    let big = 3 << 20;
    let (a_va, a) = env.buf(s, Loc::Sys, big, false, false)?;
    let (v_va, _) = env.buf(s, Loc::Vram, big, true, false)?;
    let (b_va, b) = env.buf(s, Loc::Sys, big, true, false)?;
    a.fill_pattern(52);
    b.fill(0);
    env.run(s, &[copy(a_va, v_va, big), copy(v_va, b_va, big)])?;
    check(&b, 0, big, "3 MiB through VRAM", |o| pattern_byte(52, o))
}

pub fn cmd_fill(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let len = 4 * PAGE;
    let (va, buf) = env.buf(s, Loc::Sys, len, true, true)?;
    for (k, (off, n)) in [(0, 4), (4, 8), (4092, 8), (8, 4096), (12, 12344), (16, 0)]
        .into_iter()
        .enumerate()
    {
        let pattern = 0x0102_0304u32.wrapping_mul(k as u32 + 1) ^ 0x8000_0001;
        buf.fill(0xee);
        env.run(s, &[fill(va + off, n, pattern)])?;
        let bytes = pattern.to_le_bytes();
        if let Some((at, want, got)) = buf.mismatch(0, len, |o| {
            if (off..off + n).contains(&o) {
                bytes[((o - off) % 4) as usize]
            } else {
                0xee
            }
        }) {
            bail!("FILL {n} bytes at +{off}: byte {at:#x} is {got:#x}, expected {want:#x}");
        }
    }
    Ok(())
}

pub fn cmd_timestamp(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let before = s.gpu.timestamp();
    env.run(
        s,
        &[
            timestamp(FENCE_VA + TS0),
            dispatch(kernel::SPIN_US, &[1000, 1]),
            timestamp(FENCE_VA + TS1),
        ],
    )?;
    let after = s.gpu.timestamp();
    let (t0, t1) = (env.ctx.fence.read_u64(TS0), env.ctx.fence.read_u64(TS1));
    ensure!(
        before <= t0 && t0 < t1 && t1 <= after,
        "timestamps out of order: register {before}, packets {t0} and {t1}, register {after}"
    );
    ensure!(
        t1 - t0 >= 1_000_000,
        "TIMESTAMPs around a 1000 us spin differ by {} ns",
        t1 - t0
    );
    Ok(())
}

/// Write `n` f32 from `f(i)` into `buf` at `off`.
fn write_f32s(buf: &Buf, off: u64, n: u32, mut f: impl FnMut(u32) -> f32) {
    let mut chunk = [0u8; 256];
    let mut i = 0;
    while i < n {
        let m = (n - i).min(64);
        for j in 0..m {
            chunk[j as usize * 4..j as usize * 4 + 4].copy_from_slice(&f(i + j).to_le_bytes());
        }
        buf.write(off + u64::from(i) * 4, &chunk[..m as usize * 4]);
        i += m;
    }
}

fn read_f32(buf: &Buf, i: u64) -> f32 {
    f32::from_bits(buf.read_u32(i * 4))
}

pub fn kernel_saxpy(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    // Three workgroups, the last one partial, and 16 elements past the end.
    let n = 2 * kernel::SAXPY_GROUP as u32 + 1234;
    let a = 1.75f32;
    let bytes = u64::from(n + 16) * 4;
    let (x_va, x) = env.buf(s, Loc::Sys, bytes, false, true)?;
    let (y_va, y) = env.buf(s, Loc::Vram, bytes, true, false)?;
    write_f32s(&x, 0, n + 16, |i| test_f32(1, i));
    write_f32s(&y, 0, n + 16, |i| test_f32(2, i));
    env.run(
        s,
        &[dispatch(
            kernel::SAXPY,
            &[u64::from(n), u64::from(a.to_bits()), x_va, y_va],
        )],
    )?;
    for i in 0..n + 16 {
        let got = read_f32(&y, u64::from(i));
        let want = if i < n {
            saxpy(a, test_f32(1, i), test_f32(2, i))
        } else {
            test_f32(2, i)
        };
        ensure!(
            ulps(got, want) <= 1,
            "y[{i}] = {got} ({:#x}), expected {want} ({:#x})",
            got.to_bits(),
            want.to_bits()
        );
    }
    Ok(())
}

pub fn kernel_sgemm(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    // C (m×n) = A (m×k) × B (k×n); m spans three row groups, the last partial.
    let (m, n, k) = (40u32, 24u32, 32u32);
    let (a_va, a) = env.buf(s, Loc::Sys, u64::from(m * k) * 4, false, false)?;
    let (b_va, b) = env.buf(s, Loc::Vram, u64::from(k * n) * 4, false, false)?;
    let (c_va, c) = env.buf(s, Loc::Sys, u64::from(m * n) * 4, true, false)?;
    write_f32s(&a, 0, m * k, |i| test_f32(3, i));
    write_f32s(&b, 0, k * n, |i| test_f32(4, i));
    c.fill(0xff);
    env.run(
        s,
        &[dispatch(
            kernel::SGEMM,
            &[m.into(), n.into(), k.into(), a_va, b_va, c_va],
        )],
    )?;
    for i in 0..m {
        for j in 0..n {
            let (mut sum, mut mag) = (0f32, 0f32);
            for l in 0..k {
                let p = test_f32(3, i * k + l) * test_f32(4, l * n + j);
                sum += p;
                mag += p.abs();
            }
            let got = read_f32(&c, u64::from(i * n + j));
            // Relative to the sum of magnitudes; false for NaN.
            let close = (got - sum).abs() <= 1e-4 * mag.max(f32::MIN_POSITIVE);
            ensure!(close, "C[{i}][{j}] = {got}, expected {sum}");
        }
    }
    Ok(())
}

pub fn kernel_reduce_sum(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let n = 2 * kernel::REDUCE_GROUP as u32 + 4321;
    let value = |i: u32| 0xffff_0000u32 ^ i.wrapping_mul(2_654_435_761);
    let (x_va, x) = env.buf(s, Loc::Sys, u64::from(n) * 4, false, true)?;
    let mut chunk = [0u8; 256];
    let mut want = 0u64;
    let mut i = 0;
    while i < n {
        let m = (n - i).min(64);
        for j in 0..m {
            let v = value(i + j);
            want = want.wrapping_add(u64::from(v));
            chunk[j as usize * 4..j as usize * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        x.write(u64::from(i) * 4, &chunk[..m as usize * 4]);
        i += m;
    }
    env.ctx.fence.write_u64(OUT, u64::MAX);
    env.run(
        s,
        &[dispatch(
            kernel::REDUCE_SUM,
            &[n.into(), x_va, FENCE_VA + OUT],
        )],
    )?;
    ensure_eq!(env.ctx.fence.read_u64(OUT), want, "sum of {n} u32");
    Ok(())
}

pub fn kernel_crc32(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let (va, buf) = env.buf(s, Loc::Sys, 100_000 + 3, false, true)?;
    buf.write(3, b"123456789");
    env.run(s, &[dispatch(kernel::CRC32, &[9, va + 3, FENCE_VA + OUT])])?;
    ensure_eq!(
        env.ctx.fence.read_u32(OUT),
        0xcbf4_3926u32,
        "CRC-32 of \"123456789\""
    );
    buf.fill_pattern(61);
    env.run(
        s,
        &[dispatch(
            kernel::CRC32,
            &[100_000, va + 3, FENCE_VA + OUT + 4],
        )],
    )?;
    let want = crc32((0..100_000u64).map(|i| pattern_byte(61, i + 3)));
    ensure_eq!(
        env.ctx.fence.read_u32(OUT + 4),
        want,
        "CRC-32 of 100000 bytes"
    );
    Ok(())
}

pub fn kernel_spin_us(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let us = 2000;
    env.run(
        s,
        &[
            timestamp(FENCE_VA + TS0),
            dispatch(kernel::SPIN_US, &[us, 4]),
            timestamp(FENCE_VA + TS1),
        ],
    )?;
    let (t0, t1) = (env.ctx.fence.read_u64(TS0), env.ctx.fence.read_u64(TS1));
    ensure!(
        t1.saturating_sub(t0) >= us * 1000,
        "4 workgroups of {us} us took {} ns",
        t1.saturating_sub(t0)
    );
    Ok(())
}

pub fn fences(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let big = 8 << 20;
    let (src_va, src) = env.buf(s, Loc::Sys, big, false, false)?;
    let (dst_va, dst) = env.buf(s, Loc::Sys, big, true, false)?;
    src.fill_pattern(71);
    dst.fill(0);
    // A 64-bit fence value: both halves land in memory and CTX_FENCE.
    let value = (5u64 << 32) | (env.ctx.last_fence + 1);
    env.ctx.fence.write_u64(0, 0);
    env.ctx.push(&copy(src_va, dst_va, big));
    env.ctx.push(&fence(FENCE_VA, value, 0));
    env.ctx.kick(&s.gpu);
    // Watch the fence in memory (no WAIT): once it shows, the copy before it
    // must be complete.
    let f = env.ctx.fence;
    ensure!(
        poll_until(&s.gpu, 5000, || f.poll_u64(0) == value),
        "fence {value:#x} not written within 5 s ({})",
        s.gpu.ctx_state(0)
    );
    check(
        &dst,
        big - 4096,
        4096,
        "end of the copy once its fence is visible",
        |o| pattern_byte(71, o),
    )?;
    check(&dst, 0, big, "the copy", |o| pattern_byte(71, o))?;
    ensure_eq!(s.gpu.ctx_rd64(0, regs::CTX_FENCE_LO), value, "CTX_FENCE");
    env.ctx.last_fence = value;
    // WAIT compares the low 32 bits as a sequence number.
    ensure_eq!(
        s.gpu.wait_fence(0, value),
        wait::DONE,
        "WAIT for the 64-bit fence"
    );
    // Several fences in one submission: the last one wins; no interrupt
    // status without FENCE_IRQ.
    env.run(
        s,
        &[
            fence(FENCE_VA + 8, 10, 0),
            fence(FENCE_VA + 16, 11, 0),
            fence(FENCE_VA + 24, 12, 0),
        ],
    )?;
    for (off, v) in [(8, 10), (16, 11), (24, 12)] {
        ensure_eq!(env.ctx.fence.read_u64(off), v, "fence at +{off}");
    }
    ensure_eq!(
        s.gpu.rd(regs::INT_STATUS) & int::fence(0),
        0,
        "INT_STATUS fence bit without FENCE_IRQ"
    );
    Ok(())
}

pub fn ring_wrap(s: &mut Suite) -> Outcome {
    let size = 8u32;
    let mut env = Env::with_ring(s, 0, Loc::Sys, size)?;
    let (va, buf) = env.buf(s, Loc::Sys, PAGE, true, false)?;
    buf.fill(0);
    let g = &s.gpu;
    let mut word = 0u64;
    let mut batch = 0;
    // Batches of 1..=7 FILLs plus a fence; some filling the ring exactly.
    while word < 64 {
        let n = [3u64, 7, 1, 5, 7, 2, 6, 4][batch % 8].min(64 - word);
        for _ in 0..n {
            env.ctx.push(&fill(va + word * 4, 4, 0x1000 + word as u32));
            word += 1;
            // Publish part of the batch early once: the GPU may start while
            // the rest is being written.
            if batch == 3 && word.is_multiple_of(2) {
                env.ctx.kick(g);
            }
        }
        let v = env.ctx.push_fence(0);
        env.ctx.kick(g);
        env.ctx.finish(g, v)?;
        let head = g.ctx_rd(0, regs::CTX_RING_HEAD);
        ensure_eq!(head, env.ctx.tail, "CTX_RING_HEAD after batch {batch}");
        batch += 1;
    }
    ensure!(
        env.ctx.tail > 3 * size,
        "only {} packets went through the ring",
        env.ctx.tail
    );
    check(
        &buf,
        0,
        256,
        "words written through the wrapping ring",
        |o| (0x1000 + (o / 4) as u32).to_le_bytes()[(o % 4) as usize],
    )?;
    // The extremes: a one-packet ring (every submission wraps it) and the
    // largest ring.
    let mut one = Env::with_ring(s, 1, Loc::Sys, 1)?;
    for i in 0..5 {
        let v = one.ctx.push_fence(0);
        one.ctx.kick(&s.gpu);
        one.ctx.finish(&s.gpu, v)?;
        ensure_eq!(
            s.gpu.ctx_rd(1, regs::CTX_RING_HEAD),
            i + 1,
            "head of a one-packet ring"
        );
    }
    let max = s.gpu.rd(regs::MAX_RING_ENTRIES);
    let mut big = Env::with_ring(s, 2, Loc::Sys, max)?;
    big.run(s, &[nop(), nop(), nop()])?;
    ensure_eq!(
        s.gpu.ctx_rd(2, regs::CTX_RING_HEAD),
        4,
        "head of a {max}-packet ring"
    );
    Ok(())
}

pub fn doorbell(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let g = &s.gpu;
    g.ctx_wr64(0, regs::CTX_TAIL_ADDR_LO, FENCE_VA + SHADOW);
    for round in 0..3u32 {
        env.ctx.push(&fill(
            FENCE_VA + OUT + u64::from(round) * 4,
            4,
            0xd00d_0000 + round,
        ));
        let v = env.ctx.push_fence(0);
        env.ctx.fence.write_u32(SHADOW, env.ctx.tail);
        if round == 1 {
            // Another context's doorbell does not make this one look.
            env.ctx.ring_doorbell_of(g, 1);
            ensure_eq!(
                g.wait_once(0, v),
                wait::TIMEOUT,
                "WAIT after ringing context 1's doorbell"
            );
        }
        // The value written to a doorbell is ignored.
        env.ctx.ring_doorbell(g);
        env.ctx.finish(g, v)?;
        ensure_eq!(
            g.ctx_rd(0, regs::CTX_RING_TAIL),
            env.ctx.tail,
            "CTX_RING_TAIL after the doorbell"
        );
        ensure_eq!(
            env.ctx.fence.read_u32(OUT + u64::from(round) * 4),
            0xd00d_0000 + round,
            "FILL submitted through the doorbell"
        );
    }
    Ok(())
}

/// Publish the tail in the shadow and ring the doorbell only when the hint
/// does not say `POLLING` (vgpu-spec §3); returns whether it rang.
fn publish_suppressed(env: &mut Env, g: &Gpu) -> bool {
    crate::io::barrier();
    env.ctx.fence.write_u32(SHADOW + shadow::TAIL, env.ctx.tail);
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    if env.ctx.fence.read_u32(SHADOW + shadow::HINT) & shadow::POLLING != 0 {
        return false;
    }
    env.ctx.ring_doorbell(g);
    true
}

pub fn doorbell_suppress(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let g = &s.gpu;
    ensure!(
        g.rd(regs::CAPS) & caps::DOORBELL_SUPPRESS != 0,
        "CAPS.DOORBELL_SUPPRESS is clear"
    );
    let suppress = ctx_control::ENABLE | ctx_control::SUPPRESS;
    // The hint shares the tail's page: a shadow that is not 8-byte aligned is
    // refused when the context is enabled.
    g.ctx_wr(0, regs::CTX_CONTROL, 0);
    g.ctx_wr64(0, regs::CTX_TAIL_ADDR_LO, FENCE_VA + SHADOW + 4);
    g.ctx_wr(0, regs::CTX_CONTROL, suppress);
    ensure_eq!(
        g.ctx_rd(0, regs::CTX_FAULT_CODE),
        fault::RING_CONFIG,
        "fault code after enabling SUPPRESS with a 4-byte aligned shadow"
    );
    ensure_eq!(
        g.ctx_rd64(0, regs::CTX_FAULT_ADDR_LO),
        FENCE_VA + SHADOW + 4,
        "fault address"
    );
    env.ctx.restart(g, &env.space);
    g.ctx_wr(0, regs::CTX_CONTROL, 0);
    env.ctx.fence.write_u32(SHADOW + shadow::HINT, 0);
    g.ctx_wr64(0, regs::CTX_TAIL_ADDR_LO, FENCE_VA + SHADOW);
    g.ctx_wr(0, regs::CTX_CONTROL, suppress);
    // While the GPU works it watches the tail: the hint says POLLING, and a
    // submission made without a doorbell runs after the current packet. A vCPU
    // the host does not run for the whole dispatch cannot see the hint: such a
    // try proves nothing either way and is made again (at most 4 tries).
    let f = env.ctx.fence;
    let mut busy = 0;
    let mut seen = false;
    for _ in 0..4 {
        env.ctx.push(&dispatch(kernel::SPIN_US, &[100_000, 4]));
        busy = env.ctx.push_fence(0);
        // Rung or not (the GPU may still be awake from enabling the context), it runs.
        publish_suppressed(&mut env, g);
        poll_until(g, 2000, || {
            seen = f.read_u32(SHADOW + shadow::HINT) & shadow::POLLING != 0;
            seen || f.poll_u64(0) >= busy
        });
        if seen {
            break;
        }
    }
    ensure!(
        seen,
        "the hint never said POLLING while a 200 ms dispatch ran, in 4 tries ({})",
        g.ctx_state(0)
    );
    env.ctx.push(&fill(FENCE_VA + OUT, 4, 0xb05e));
    let v = env.ctx.push_fence(0);
    let rang = publish_suppressed(&mut env, g);
    // Still working after the hint was read: then it said POLLING.
    ensure!(
        !(rang && f.poll_u64(0) < busy),
        "the hint asked for a doorbell while the GPU was still working"
    );
    env.ctx.finish(g, v)?;
    ensure_eq!(
        env.ctx.fence.read_u32(OUT),
        0xb05e,
        "FILL submitted without a doorbell while the GPU worked"
    );
    // Back to back, every submission runs, whether or not the hint spared
    // its doorbell (how many it spares depends on the host's load).
    const ROUNDS: u32 = 64;
    for round in 0..ROUNDS {
        let at = FENCE_VA + OUT + u64::from(round % 16) * 4;
        env.ctx.push(&fill(at, 4, 0x5eed_0000 + round));
        let v = env.ctx.push_fence(0);
        publish_suppressed(&mut env, g);
        // Back to back: spin on the fence in memory, without register accesses (each is a
        // round trip to the VMM, over vfio-user longer than the GPU's polling window).
        let f = env.ctx.fence;
        ensure!(
            poll_until(g, 2000, || f.poll_u64(0) == v),
            "fence {v} not written within 2 s ({})",
            g.ctx_state(0)
        );
        ensure_eq!(
            env.ctx.fence.read_u32(OUT + u64::from(round % 16) * 4),
            0x5eed_0000 + round,
            "FILL {round} submitted with doorbell suppression"
        );
    }
    env.ctx.finish(g, env.ctx.last_fence)?;
    // Idle, the GPU stops watching and says so: doorbells are needed again.
    ensure!(
        poll_until(g, 2000, || f.read_u32(SHADOW + shadow::HINT)
            & shadow::POLLING
            == 0),
        "the hint still says POLLING 2 s after the last submission"
    );
    env.ctx.push(&fill(FENCE_VA + OUT, 4, 0x1d1e));
    let v = env.ctx.push_fence(0);
    publish_suppressed(&mut env, g);
    env.ctx.finish(g, v)?;
    ensure_eq!(
        env.ctx.fence.read_u32(OUT),
        0x1d1e,
        "FILL submitted to an idle GPU"
    );
    Ok(())
}

pub fn tail_poll(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    let g = &s.gpu;
    g.ctx_wr64(0, regs::CTX_TAIL_ADDR_LO, FENCE_VA + SHADOW);
    g.ctx_wr(
        0,
        regs::CTX_CONTROL,
        ctx_control::ENABLE | ctx_control::POLL,
    );
    for round in 0..3u32 {
        env.ctx.push(&fill(
            FENCE_VA + OUT + u64::from(round) * 4,
            4,
            0xf00d_0000 + round,
        ));
        let v = env.ctx.push_fence(0);
        // Submission without any register access: only the shadow changes.
        crate::io::barrier();
        env.ctx.fence.write_u32(SHADOW, env.ctx.tail);
        let f = env.ctx.fence;
        ensure!(
            poll_until(g, 2000, || f.poll_u64(0) == v),
            "fence {v} not written within 2 s of updating the tail shadow ({})",
            g.ctx_state(0)
        );
        ensure_eq!(
            env.ctx.fence.read_u32(OUT + u64::from(round) * 4),
            0xf00d_0000 + round,
            "FILL submitted through the polled tail shadow"
        );
    }
    Ok(())
}

pub fn wait_register(s: &mut Suite) -> Outcome {
    let mut env = Env::new(s, 0, Loc::Sys)?;
    env.run(s, &[nop()])?;
    let g = &s.gpu;
    let v = env.ctx.last_fence;
    ensure_eq!(
        g.wait_fence(0, v),
        wait::DONE,
        "WAIT for the completed fence"
    );
    ensure_eq!(
        g.wait_fence(0, v - 1),
        wait::DONE,
        "WAIT for an older fence"
    );
    g.wr(regs::WAIT_CTX, 0);
    g.wr(regs::WAIT_VALUE, (v + 100) as u32);
    let t0 = g.timestamp();
    let r = g.rd(regs::WAIT);
    let ms = (g.timestamp() - t0) / 1_000_000;
    ensure_eq!(r, wait::TIMEOUT, "WAIT for a fence never submitted");
    let limit = u64::from(vgpu_abi::limits::WAIT_TIMEOUT_MS);
    ensure!(
        ms + 5 >= limit && ms < 10 * limit,
        "WAIT timed out after {ms} ms, expected about {limit}"
    );
    g.wr(regs::WAIT_CTX, vgpu_abi::limits::MAX_CONTEXTS + 3);
    ensure_eq!(
        g.rd(regs::WAIT),
        wait::INVALID,
        "WAIT on a context that does not exist"
    );
    ensure_eq!(
        g.wait_fence(2, 1),
        wait::INVALID,
        "WAIT on a disabled context"
    );
    // WAIT blocks until the fence completes: 30 ms of work, one read on an idle GPU. On a
    // GPU shared with busy neighbours the work may take longer than one read; then the
    // reads before the last return TIMEOUT, each after blocking its full time.
    let t0 = g.timestamp();
    let v = env
        .ctx
        .submit(g, &[dispatch(kernel::SPIN_US, &[30_000, 1])], 0)?;
    g.wr(regs::WAIT_CTX, 0);
    g.wr(regs::WAIT_VALUE, v as u32);
    let mut r = g.rd(regs::WAIT);
    for _ in 0..100 {
        if r != wait::TIMEOUT {
            break;
        }
        r = g.rd(regs::WAIT);
    }
    let ms = (g.timestamp() - t0) / 1_000_000;
    ensure_eq!(r, wait::DONE, "WAIT across 30 ms of work");
    ensure!(
        ms >= 29,
        "WAIT returned DONE after {ms} ms of 30 ms of work"
    );
    ensure_eq!(
        env.ctx.fence.read_u64(0),
        v,
        "fence after WAIT returned DONE"
    );
    Ok(())
}
