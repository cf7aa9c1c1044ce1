//! The software GPU: VRAM slices in memfds ([`SoftVram`]) and a pool of engine threads that
//! run the groups of an operation ([`kernels`]) in parallel.

pub mod kernels;
mod vram;

use crate::sync::Condvar;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use vram::SoftVram;

use self::kernels::{FinishFn, Plan, WorkFn};
use crate::backend::{BackendError, GpuBackend, Launch, Op, RunControl, Vram, check_range};
use crate::mem::{Fault, Spaces};

struct Job {
    work: WorkFn,
    ctl: Arc<dyn RunControl>,
    end: u64,
    /// Next group to claim, and whether the range was stopped. Claiming under a lock makes
    /// "stopped" and "claimed" one decision, so the groups that ran are exactly a prefix of
    /// the range.
    claim: Mutex<(u64, bool)>,
    /// Groups finished, first fault.
    state: Mutex<(u64, Option<Fault>)>,
    done: Condvar,
}

impl Job {
    fn claim(&self) -> Option<u64> {
        let mut c = self.claim.lock().unwrap_or_else(|e| e.into_inner());
        if c.1 || c.0 >= self.end {
            return None;
        }
        if self.ctl.stop() {
            c.1 = true;
            return None;
        }
        c.0 += 1;
        Some(c.0 - 1)
    }

    fn exhausted(&self) -> bool {
        let c = self.claim.lock().unwrap_or_else(|e| e.into_inner());
        c.1 || c.0 >= self.end
    }
}

struct Queue {
    jobs: Mutex<(VecDeque<Arc<Job>>, bool)>,
    ready: Condvar,
}

/// The software GPU: VRAM slices in memfds and a pool of engine threads.
pub struct SoftGpu {
    vram_size: u64,
    queue: Arc<Queue>,
    engines: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for SoftGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftGpu")
            .field("vram_size", &self.vram_size)
            .field("engines", &self.engines.len())
            .finish()
    }
}

fn engine_loop(queue: Arc<Queue>) {
    loop {
        let job = {
            let mut g = queue.jobs.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if g.1 {
                    return;
                }
                // Drop jobs whose groups have all been claimed.
                while g.0.front().is_some_and(|j| j.exhausted()) {
                    g.0.pop_front();
                }
                if let Some(j) = g.0.front() {
                    break j.clone();
                }
                g = queue.ready.wait(g);
            }
        };
        while let Some(i) = job.claim() {
            let r = (job.work)(i, &*job.ctl);
            job.ctl.group_done();
            let mut s = job.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0 += 1;
            if let (Err(f), None) = (r, s.1) {
                s.1 = Some(f);
            }
        }
        // The claim loop ended (range exhausted or stopped): wake the submitter, under the
        // state lock so the wake-up cannot slip between its check and its wait. Only here:
        // every engine's last group is followed by this, so the submitter is woken once per
        // engine, not once per group (a SAXPY packet has hundreds of groups of a few µs).
        let _s = job.state.lock().unwrap_or_else(|e| e.into_inner());
        job.done.notify_all();
    }
}

impl SoftGpu {
    /// A software GPU with `vram_size` bytes of VRAM and `engines` engine threads.
    pub fn new(vram_size: u64, engines: usize) -> Result<Self, BackendError> {
        let queue = Arc::new(Queue {
            jobs: Mutex::new((VecDeque::new(), false)),
            ready: Condvar::new(),
        });
        let mut threads = Vec::new();
        for i in 0..engines.max(1) {
            let q = queue.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("gpu-engine{i}"))
                    .spawn(move || engine_loop(q))
                    .map_err(BackendError::Thread)?,
            );
        }
        Ok(SoftGpu {
            vram_size,
            queue,
            engines: threads,
        })
    }
}

/// Runs groups `range` of `work` on the engines of `queue`. See [`Launch::run`].
fn run_on_engines(
    queue: &Queue,
    range: Range<u64>,
    work: &WorkFn,
    ctl: Arc<dyn RunControl>,
) -> Result<u64, Fault> {
    let (start, end) = (range.start, range.end);
    let job = Arc::new(Job {
        work: work.clone(),
        ctl,
        end,
        claim: Mutex::new((start, false)),
        state: Mutex::new((0, None)),
        done: Condvar::new(),
    });
    queue
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .0
        .push_back(job.clone());
    queue.ready.notify_all();
    let mut s = job.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let claimed = {
            let c = job.claim.lock().unwrap_or_else(|e| e.into_inner());
            (c.0, c.1 || c.0 >= end)
        };
        // Done when no more claims will happen and every claimed group finished.
        if claimed.1 && s.0 == claimed.0 - start {
            break;
        }
        s = job
            .done
            .wait_timeout(s, std::time::Duration::from_millis(10))
            .0;
    }
    match s.1 {
        Some(f) => Err(f),
        None => Ok(job.claim.lock().unwrap_or_else(|e| e.into_inner()).0),
    }
}

/// Runs groups `range` of `work` one after another on the calling thread.
pub(crate) fn run_here(
    range: Range<u64>,
    work: &WorkFn,
    ctl: &dyn RunControl,
) -> Result<u64, Fault> {
    for g in range.clone() {
        if ctl.stop() {
            return Ok(g);
        }
        let r = work(g, ctl);
        ctl.group_done();
        r?;
    }
    Ok(range.end.max(range.start))
}

struct SoftLaunch {
    queue: Arc<Queue>,
    work: WorkFn,
    finish: Option<FinishFn>,
}

impl Launch for SoftLaunch {
    fn run(&mut self, groups: Range<u64>, ctl: Arc<dyn RunControl>) -> Result<u64, Fault> {
        if groups.end <= groups.start + 1 {
            // One group (a small copy, a fence-sized kernel): the calling thread runs it,
            // sparing an engine's wake-up.
            return run_here(groups, &self.work, &*ctl);
        }
        run_on_engines(&self.queue, groups, &self.work, ctl)
    }

    fn finish(self: Box<Self>) -> Result<(), Fault> {
        self.finish.map_or(Ok(()), |f| f())
    }
}

impl GpuBackend for SoftGpu {
    fn name(&self) -> String {
        format!("soft ({} engines)", self.engines.len())
    }

    fn engines(&self) -> usize {
        self.engines.len()
    }

    fn vram_size(&self) -> u64 {
        self.vram_size
    }

    fn alloc_vram(&self, offset: u64, size: u64) -> Result<Arc<dyn Vram>, BackendError> {
        check_range(offset, size, self.vram_size)?;
        Ok(Arc::new(SoftVram::new(size)?))
    }

    fn prepare(&self, op: Op, spaces: Arc<Spaces>) -> Result<Box<dyn Launch>, Fault> {
        let Plan { work, finish } = kernels::plan(op, spaces)?;
        Ok(Box::new(SoftLaunch {
            queue: self.queue.clone(),
            work,
            finish,
        }))
    }
}

impl Drop for SoftGpu {
    fn drop(&mut self) {
        self.queue.jobs.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.queue.ready.notify_all();
        for t in self.engines.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
