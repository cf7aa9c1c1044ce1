//! The built-in kernels, split into workgroups for a [`Backend`].
//!
//! Every buffer is resolved (and so checked) before the first workgroup runs, so a bad
//! address faults the dispatch precisely and no partial work happens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vgpu_abi::kernel;

use crate::backend::WorkFn;
use crate::command::Kernel;
use crate::mem::{Fault, ScatterList, Spaces};

/// Resolves `(va, len, write)` through the context's MMU.
pub type Resolver<'a> = dyn FnMut(u64, u64, bool) -> Result<ScatterList, Fault> + 'a;

/// Runs `groups` workgroups of a dispatch to completion (the caller decides how: straight on
/// a backend, or in slices with preemption in between).
pub type Runner<'a> = dyn FnMut(u64, WorkFn) -> Result<(), Fault> + 'a;

/// Bytes per CRC-32 workgroup.
const CRC_GROUP: u64 = 1 << 20;

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Says whether the rest of a dispatch must become no-ops (a reset, the watchdog).
pub type AbortFn = Arc<dyn Fn() -> bool + Send + Sync>;

/// Runs `k`. Once `abort` says so, the remaining workgroups (and the rest of a long one)
/// become no-ops.
pub fn run(
    k: &Kernel,
    resolve: &mut Resolver<'_>,
    spaces: &Spaces,
    runner: &mut Runner<'_>,
    abort: AbortFn,
) -> Result<(), Fault> {
    let sp = spaces.clone();
    let live = move || !abort();
    match *k {
        Kernel::Saxpy { n, a, x, y } => {
            let xs = resolve(x, n * 4, false)?;
            let ys = resolve(y, n * 4, true)?;
            let groups = n.div_ceil(kernel::SAXPY_GROUP);
            let work: WorkFn = Arc::new(move |g| {
                if !live() {
                    return Ok(());
                }
                let start = g * kernel::SAXPY_GROUP;
                let count = kernel::SAXPY_GROUP.min(n - start);
                let mut xb = vec![0u8; (count * 4) as usize];
                let mut yb = vec![0u8; (count * 4) as usize];
                xs.read(&sp, start * 4, &mut xb)?;
                ys.read(&sp, start * 4, &mut yb)?;
                for (yc, xv) in yb.chunks_exact_mut(4).zip(f32s(&xb)) {
                    let yv = f32::from_le_bytes([yc[0], yc[1], yc[2], yc[3]]);
                    yc.copy_from_slice(&a.mul_add(xv, yv).to_le_bytes());
                }
                ys.write(&sp, start * 4, &yb)
            });
            runner(groups, work)
        }
        Kernel::Sgemm {
            m,
            n,
            k: kk,
            a,
            b,
            c,
        } => {
            let am = resolve(a, m * kk * 4, false)?;
            let bm = resolve(b, kk * n * 4, false)?;
            let cm = resolve(c, m * n * 4, true)?;
            let mut braw = vec![0u8; (kk * n * 4) as usize];
            bm.read(spaces, 0, &mut braw)?;
            let bv: Arc<Vec<f32>> = Arc::new(f32s(&braw).collect());
            drop(braw);
            let groups = m.div_ceil(kernel::SGEMM_GROUP_ROWS);
            let work: WorkFn = Arc::new(move |g| {
                if !live() {
                    return Ok(());
                }
                let r0 = g * kernel::SGEMM_GROUP_ROWS;
                let rows = kernel::SGEMM_GROUP_ROWS.min(m - r0);
                let mut araw = vec![0u8; (rows * kk * 4) as usize];
                am.read(&sp, r0 * kk * 4, &mut araw)?;
                let av: Vec<f32> = f32s(&araw).collect();
                let (nu, ku) = (n as usize, kk as usize);
                let mut out = vec![0f32; rows as usize * nu];
                for r in 0..rows as usize {
                    if !live() {
                        return Ok(());
                    }
                    let crow = &mut out[r * nu..(r + 1) * nu];
                    for (p, &aval) in av[r * ku..(r + 1) * ku].iter().enumerate() {
                        let brow = &bv[p * nu..(p + 1) * nu];
                        for (cv, &bval) in crow.iter_mut().zip(brow) {
                            *cv = aval.mul_add(bval, *cv);
                        }
                    }
                }
                let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
                cm.write(&sp, r0 * n * 4, &bytes)
            });
            runner(groups, work)
        }
        Kernel::ReduceSum { n, x, out } => {
            let xs = resolve(x, n * 4, false)?;
            let os = resolve(out, 8, true)?;
            let sum = Arc::new(AtomicU64::new(0));
            let s2 = sum.clone();
            let groups = n.div_ceil(kernel::REDUCE_GROUP);
            let work: WorkFn = Arc::new(move |g| {
                if !live() {
                    return Ok(());
                }
                let start = g * kernel::REDUCE_GROUP;
                let count = kernel::REDUCE_GROUP.min(n - start);
                let mut b = vec![0u8; (count * 4) as usize];
                xs.read(&sp, start * 4, &mut b)?;
                let part = b.chunks_exact(4).fold(0u64, |acc, c| {
                    acc.wrapping_add(u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                });
                s2.fetch_add(part, Ordering::Relaxed);
                Ok(())
            });
            runner(groups, work)?;
            os.write(spaces, 0, &sum.load(Ordering::Relaxed).to_le_bytes())
        }
        Kernel::Crc32 { len, src, out } => {
            let ss = resolve(src, len, false)?;
            let os = resolve(out, 4, true)?;
            let groups = len.div_ceil(CRC_GROUP);
            let parts: Arc<Vec<Mutex<Option<crc32fast::Hasher>>>> =
                Arc::new((0..groups).map(|_| Mutex::new(None)).collect());
            let p2 = parts.clone();
            let work: WorkFn = Arc::new(move |g| {
                if !live() {
                    return Ok(());
                }
                let start = g * CRC_GROUP;
                let mut b = vec![0u8; CRC_GROUP.min(len - start) as usize];
                ss.read(&sp, start, &mut b)?;
                let mut h = crc32fast::Hasher::new();
                h.update(&b);
                if let Some(slot) = p2.get(g as usize) {
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
                }
                Ok(())
            });
            runner(groups, work)?;
            let mut total = crc32fast::Hasher::new();
            for p in parts.iter() {
                if let Some(h) = p.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    total.combine(&h);
                }
            }
            os.write(spaces, 0, &total.finalize().to_le_bytes())
        }
        Kernel::SpinUs { us, groups } => {
            let work: WorkFn = Arc::new(move |_| {
                let until = Instant::now() + Duration::from_micros(us);
                while Instant::now() < until && live() {
                    std::hint::spin_loop();
                }
                Ok(())
            });
            runner(groups, work)
        }
    }
}
