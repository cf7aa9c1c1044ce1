//! Backends: where VRAM lives and where workgroups run. The software GPU gives each VRAM
//! partition its own sealed memfd and runs workgroups on E engine threads.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::mem::Fault;

/// One workgroup's work: called with the workgroup index.
pub type WorkFn = Arc<dyn Fn(u64) -> Result<(), Fault> + Send + Sync>;

/// Asked before each workgroup starts: `true` stops the dispatch there (a preemption point).
pub type StopFn = Arc<dyn Fn() -> bool + Send + Sync>;

/// Errors creating a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The VRAM file could not be created or sized.
    #[error("cannot create {size} bytes of VRAM")]
    Vram {
        /// Size.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A partition does not fit in VRAM.
    #[error("VRAM partition at {offset:#x} of {size:#x} bytes does not fit in {vram:#x} bytes")]
    Partition {
        /// Offset.
        offset: u64,
        /// Size.
        size: u64,
        /// VRAM size.
        vram: u64,
    },
    /// Mapping VRAM failed.
    #[error("cannot map VRAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// An engine thread could not start.
    #[error("cannot start engine threads")]
    Thread(#[source] std::io::Error),
}

/// What the device model needs from a GPU.
pub trait Backend: Send + Sync {
    /// Runs workgroups `start..end` of `work` on the engines until they are done or `stop`
    /// says to stop before a workgroup; returns `n` such that exactly `start..n` ran (so the
    /// dispatch resumes at `n`). The first fault wins; workgroups already started finish.
    fn run_range(&self, start: u64, end: u64, work: WorkFn, stop: StopFn) -> Result<u64, Fault>;

    /// Runs workgroups `0..groups` to completion.
    fn run(&self, groups: u64, work: WorkFn) -> Result<(), Fault> {
        self.run_range(0, groups, work, Arc::new(|| false))
            .map(|_| ())
    }

    /// Number of engines.
    fn engines(&self) -> usize;
}

/// A slice of a GPU's VRAM given to one vGPU. It is backed by a memfd of its own, so the
/// file can be handed to another process (a vfio-user client mapping the BAR) without
/// exposing any other partition; the file is sealed against shrinking and growing, so no
/// holder of it can truncate it under the engines.
#[derive(Debug, Clone)]
pub struct VramPartition {
    /// The partition, addressed from 0.
    pub memory: GuestMemoryMmap,
    /// The backing file, exactly `size` bytes (shared with whoever maps the BAR).
    pub file: Arc<File>,
    /// Where the partition sits in the GPU's VRAM address space (for accounting).
    pub offset: u64,
    /// Size.
    pub size: u64,
}

impl VramPartition {
    /// Host address of the partition's mapping.
    pub fn host_addr(&self) -> u64 {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        self.memory
            .iter()
            .next()
            .and_then(|r| r.get_host_address(MemoryRegionAddress(0)).ok())
            .map_or(0, |p| p as u64)
    }

    /// Zeroes the partition and returns its pages to the host (FLR, reclaim).
    pub fn scrub(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate on our own memfd; the range lies inside the file.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                self.size as libc::off_t,
            )
        };
        if rc != 0 {
            // Punching holes is best; writing zeroes is always possible.
            let zero = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < self.size {
                let n = (self.size - at).min(zero.len() as u64) as usize;
                use vm_memory::Bytes;
                let _ = self.memory.write_slice(&zero[..n], GuestAddress(at));
                at += n as u64;
            }
        }
    }
}

struct Job {
    work: WorkFn,
    stop: StopFn,
    end: u64,
    /// Next workgroup to claim, and whether the dispatch was stopped. Claiming under a lock
    /// makes "stopped" and "claimed" one decision, so the workgroups that ran are exactly a
    /// prefix of the range.
    claim: Mutex<(u64, bool)>,
    /// Workgroups finished, first fault.
    state: Mutex<(u64, Option<Fault>)>,
    done: Condvar,
}

impl Job {
    fn claim(&self) -> Option<u64> {
        let mut c = self.claim.lock().unwrap_or_else(|e| e.into_inner());
        if c.1 || c.0 >= self.end {
            return None;
        }
        if (self.stop)() {
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

/// The software GPU: VRAM partitions in memfds and a pool of engine threads.
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
                // Drop jobs whose workgroups have all been claimed.
                while g.0.front().is_some_and(|j| j.exhausted()) {
                    g.0.pop_front();
                }
                if let Some(j) = g.0.front() {
                    break j.clone();
                }
                g = queue.ready.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        };
        while let Some(i) = job.claim() {
            let r = (job.work)(i);
            let mut s = job.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0 += 1;
            if let (Err(f), None) = (r, s.1) {
                s.1 = Some(f);
            }
            job.done.notify_all();
        }
        // The claim loop ended (range exhausted or stopped): wake the submitter, under the
        // state lock so the wake-up cannot slip between its check and its wait.
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

    /// VRAM size.
    pub fn vram_size(&self) -> u64 {
        self.vram_size
    }

    /// Maps `[offset, offset + size)` of VRAM as a partition.
    pub fn partition(&self, offset: u64, size: u64) -> Result<VramPartition, BackendError> {
        if size == 0 || offset.checked_add(size).is_none_or(|e| e > self.vram_size) {
            return Err(BackendError::Partition {
                offset,
                size,
                vram: self.vram_size,
            });
        }
        let file = sealed_memfd(size)?;
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(
                file.try_clone()
                    .map_err(|source| BackendError::Vram { size, source })?,
                0,
            )),
        )])
        .map_err(BackendError::Map)?;
        Ok(VramPartition {
            memory,
            file: Arc::new(file),
            offset,
            size,
        })
    }
}

/// A memfd of `size` bytes whose size can no longer change.
fn sealed_memfd(size: u64) -> Result<File, BackendError> {
    memfd("tessera-vram", size, true).map_err(|source| BackendError::Vram { size, source })
}

/// A memfd named `name` of `size` bytes; `sealed`: its size can no longer change.
pub fn memfd(name: &str, size: u64, sealed: bool) -> std::io::Result<File> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is NUL-terminated; flags are valid.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    if sealed {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own fd with a valid command and argument.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(file)
}

impl Backend for SoftGpu {
    fn run_range(&self, start: u64, end: u64, work: WorkFn, stop: StopFn) -> Result<u64, Fault> {
        if start >= end {
            return Ok(start);
        }
        let job = Arc::new(Job {
            work,
            stop,
            end,
            claim: Mutex::new((start, false)),
            state: Mutex::new((0, None)),
            done: Condvar::new(),
        });
        {
            let mut g = self.queue.jobs.lock().unwrap_or_else(|e| e.into_inner());
            g.0.push_back(job.clone());
        }
        self.queue.ready.notify_all();
        let mut s = job.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let claimed = {
                let c = job.claim.lock().unwrap_or_else(|e| e.into_inner());
                (c.0, c.1 || c.0 >= end)
            };
            // Done when no more claims will happen and every claimed workgroup finished.
            if claimed.1 && s.0 == claimed.0 - start {
                break;
            }
            s = job
                .done
                .wait_timeout(s, std::time::Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match s.1 {
            Some(f) => Err(f),
            None => {
                let next = job.claim.lock().unwrap_or_else(|e| e.into_inner()).0;
                Ok(next)
            }
        }
    }

    fn engines(&self) -> usize {
        self.engines.len()
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
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use vm_memory::Bytes;

    #[test]
    fn partitions_have_their_own_sealed_files() {
        let gpu = SoftGpu::new(8 << 20, 1).unwrap();
        let a = gpu.partition(0, 4 << 20).unwrap();
        let b = gpu.partition(4 << 20, 4 << 20).unwrap();
        a.memory.write_obj(0xaaaa_u32, GuestAddress(0)).unwrap();
        b.memory.write_obj(0xbbbb_u32, GuestAddress(0)).unwrap();
        // Each file holds exactly its partition: nothing of the other is reachable through it.
        for (p, v) in [(&a, 0xaaaa_u32), (&b, 0xbbbb)] {
            assert_eq!(p.file.metadata().unwrap().len(), 4 << 20);
            let mut word = [0u8; 4];
            std::os::unix::fs::FileExt::read_exact_at(&*p.file, &mut word, 0).unwrap();
            assert_eq!(u32::from_le_bytes(word), v);
            // A holder of the fd (a vfio-user client) cannot truncate it under the engines.
            assert!(p.file.set_len(0).is_err(), "shrink is sealed");
            assert!(p.file.set_len(8 << 20).is_err(), "grow is sealed");
        }
        a.scrub();
        assert_eq!(a.memory.read_obj::<u32>(GuestAddress(0)).unwrap(), 0);
        assert_eq!(b.memory.read_obj::<u32>(GuestAddress(0)).unwrap(), 0xbbbb);
        assert!(gpu.partition(6 << 20, 4 << 20).is_err(), "past the end");
        assert_ne!(a.host_addr(), 0);
    }

    #[test]
    fn runs_every_workgroup_once_in_parallel() {
        let gpu = SoftGpu::new(1 << 20, 3).unwrap();
        let hits = Arc::new((0..100).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let h = hits.clone();
        gpu.run(
            100,
            Arc::new(move |i| {
                h[i as usize].fetch_add(1, Ordering::Relaxed);
                Ok(())
            }),
        )
        .unwrap();
        assert!(hits.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        let r = gpu.run(
            10,
            Arc::new(|i| {
                if i == 7 {
                    Err(Fault::new(6, i))
                } else {
                    Ok(())
                }
            }),
        );
        assert_eq!(r, Err(Fault::new(6, 7)));
        assert_eq!(gpu.engines(), 3);
    }

    #[test]
    fn stopped_dispatches_resume_exactly_where_they_stopped() {
        let gpu = SoftGpu::new(1 << 20, 2).unwrap();
        let hits = Arc::new((0..1000).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let h = hits.clone();
        let work: WorkFn = Arc::new(move |i| {
            h[i as usize].fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        let budget = Arc::new(AtomicU64::new(0));
        let mut next = 0;
        let mut rounds = 0;
        while next < 1000 {
            budget.store(0, Ordering::Relaxed);
            let b = budget.clone();
            // Stop after roughly 37 claims.
            let stop: StopFn = Arc::new(move || b.fetch_add(1, Ordering::Relaxed) >= 37);
            let n = gpu.run_range(next, 1000, work.clone(), stop).unwrap();
            assert!(n > next);
            next = n;
            rounds += 1;
        }
        assert!(rounds > 10);
        assert!(
            hits.iter().all(|c| c.load(Ordering::Relaxed) == 1),
            "each ran once"
        );
    }
}
