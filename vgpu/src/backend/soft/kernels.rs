//! The software GPU's operations: each [`Op`] becomes host work for one group at a time over
//! the vGPU's memories ([`Spaces`]), plus what runs once every group did (a reduction's
//! result). Groups may run on any thread in any order.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vgpu_abi::kernel;

use crate::backend::{COPY_GROUP, CRC_GROUP, Dispatch, Op, RunControl};
use crate::mem::{Fault, Spaces};

/// One group's work: called with the group index.
pub type WorkFn = Arc<dyn Fn(u64, &dyn RunControl) -> Result<(), Fault> + Send + Sync>;

/// What runs after the last group.
pub type FinishFn = Box<dyn FnOnce() -> Result<(), Fault> + Send>;

/// An operation as host work.
pub struct Plan {
    /// Per group.
    pub work: WorkFn,
    /// After every group.
    pub finish: Option<FinishFn>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("finish", &self.finish.is_some())
            .finish_non_exhaustive()
    }
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

thread_local! {
    /// A copy group's bounce buffer, kept per thread: allocating a fresh MiB per group costs
    /// page faults (expensive under nested paging and PVM).
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The byte range `[start, start + n)` of group `g` of a buffer of `len` bytes split in
/// groups of `size`.
fn span(g: u64, size: u64, len: u64) -> (u64, u64) {
    let start = g * size;
    (start, size.min(len.saturating_sub(start)))
}

/// Plans `op` over `spaces`. Inputs every group needs (SGEMM's B) are read here.
pub fn plan(op: Op, spaces: Arc<Spaces>) -> Result<Plan, Fault> {
    let sp = spaces;
    let work: WorkFn;
    let mut finish: Option<FinishFn> = None;
    match op {
        Op::Copy { src, dst } => {
            let len = src.len();
            work = Arc::new(move |g, _| {
                let (start, n) = span(g, COPY_GROUP, len);
                BOUNCE.with_borrow_mut(|buf| {
                    buf.resize(n as usize, 0);
                    src.read(&sp, start, buf)?;
                    dst.write(&sp, start, buf)
                })
            });
        }
        Op::Fill { dst, pattern } => {
            let len = dst.len();
            let chunk: Arc<Vec<u8>> = Arc::new(
                pattern
                    .to_le_bytes()
                    .iter()
                    .copied()
                    .cycle()
                    .take(len.min(COPY_GROUP) as usize)
                    .collect(),
            );
            work = Arc::new(move |g, _| {
                let (start, n) = span(g, COPY_GROUP, len);
                dst.write(&sp, start, &chunk[..n as usize])
            });
        }
        Op::Dispatch(Dispatch::Saxpy { n, a, x, y }) => {
            work = Arc::new(move |g, _| {
                let (start, count) = span(g, kernel::SAXPY_GROUP, n);
                let mut xb = vec![0u8; (count * 4) as usize];
                let mut yb = vec![0u8; (count * 4) as usize];
                x.read(&sp, start * 4, &mut xb)?;
                y.read(&sp, start * 4, &mut yb)?;
                for (yc, xv) in yb.chunks_exact_mut(4).zip(f32s(&xb)) {
                    let yv = f32::from_le_bytes([yc[0], yc[1], yc[2], yc[3]]);
                    yc.copy_from_slice(&a.mul_add(xv, yv).to_le_bytes());
                }
                y.write(&sp, start * 4, &yb)
            });
        }
        Op::Dispatch(Dispatch::Sgemm {
            m,
            n,
            k: kk,
            a,
            b,
            c,
        }) => {
            let mut braw = vec![0u8; (kk * n * 4) as usize];
            b.read(&sp, 0, &mut braw)?;
            let bv: Arc<Vec<f32>> = Arc::new(f32s(&braw).collect());
            drop(braw);
            work = Arc::new(move |g, ctl| {
                let (r0, rows) = span(g, kernel::SGEMM_GROUP_ROWS, m);
                let mut araw = vec![0u8; (rows * kk * 4) as usize];
                a.read(&sp, r0 * kk * 4, &mut araw)?;
                let av: Vec<f32> = f32s(&araw).collect();
                let (nu, ku) = (n as usize, kk as usize);
                let mut out = vec![0f32; rows as usize * nu];
                for r in 0..rows as usize {
                    // A group of big rows takes long: a reset or the watchdog cuts it short.
                    if ctl.abandoned() {
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
                c.write(&sp, r0 * n * 4, &bytes)
            });
        }
        Op::Dispatch(Dispatch::ReduceSum { n, x, out }) => {
            let sum = Arc::new(AtomicU64::new(0));
            let s2 = sum.clone();
            let sp2 = sp.clone();
            work = Arc::new(move |g, _| {
                let (start, count) = span(g, kernel::REDUCE_GROUP, n);
                let mut b = vec![0u8; (count * 4) as usize];
                x.read(&sp, start * 4, &mut b)?;
                let part = b.chunks_exact(4).fold(0u64, |acc, c| {
                    acc.wrapping_add(u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                });
                s2.fetch_add(part, Ordering::Relaxed);
                Ok(())
            });
            finish = Some(Box::new(move || {
                out.write(&sp2, 0, &sum.load(Ordering::Relaxed).to_le_bytes())
            }));
        }
        Op::Dispatch(Dispatch::Crc32 { len, src, out }) => {
            let groups = len.div_ceil(CRC_GROUP);
            let parts: Arc<Vec<Mutex<Option<crc32fast::Hasher>>>> =
                Arc::new((0..groups).map(|_| Mutex::new(None)).collect());
            let p2 = parts.clone();
            let sp2 = sp.clone();
            work = Arc::new(move |g, _| {
                let (start, n) = span(g, CRC_GROUP, len);
                let mut h = crc32fast::Hasher::new();
                BOUNCE.with_borrow_mut(|b| {
                    b.resize(n as usize, 0);
                    src.read(&sp, start, b)?;
                    h.update(b);
                    Ok::<(), Fault>(())
                })?;
                if let Some(slot) = p2.get(g as usize) {
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
                }
                Ok(())
            });
            finish = Some(Box::new(move || {
                let mut total = crc32fast::Hasher::new();
                for p in parts.iter() {
                    if let Some(h) = p.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        total.combine(&h);
                    }
                }
                out.write(&sp2, 0, &total.finalize().to_le_bytes())
            }));
        }
        Op::Dispatch(Dispatch::SpinUs { us, .. }) => {
            work = Arc::new(move |_, ctl| {
                let until = Instant::now() + Duration::from_micros(us);
                while Instant::now() < until && !ctl.abandoned() {
                    std::hint::spin_loop();
                }
                Ok(())
            });
        }
    }
    Ok(Plan { work, finish })
}
