use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::backend::Aperture;

/// Stops when its function says so; never abandons.
pub(crate) struct StopWhen<F>(pub F);

impl<F: Fn() -> bool + Send + Sync> RunControl for StopWhen<F> {
    fn stop(&self) -> bool {
        (self.0)()
    }
    fn abandoned(&self) -> bool {
        false
    }
}

fn never() -> Arc<dyn RunControl> {
    Arc::new(StopWhen(|| false))
}

#[test]
fn vram_slices_have_their_own_sealed_files() {
    let gpu = SoftGpu::new(8 << 20, 1).unwrap();
    let a = gpu.alloc_vram(0, 4 << 20).unwrap();
    let b = gpu.alloc_vram(4 << 20, 4 << 20).unwrap();
    a.write(0, &0xaaaa_u32.to_le_bytes()).unwrap();
    b.write(0, &0xbbbb_u32.to_le_bytes()).unwrap();
    // Each file holds exactly its slice: nothing of the other is reachable through it.
    for (v, want) in [(&a, 0xaaaa_u32), (&b, 0xbbbb)] {
        let Aperture::Mapped { file, memory } = v.aperture() else {
            panic!("the software GPU maps its VRAM");
        };
        assert_ne!(memory.host_addr(), 0);
        assert_eq!(memory.len(), 4 << 20);
        assert_eq!(file.metadata().unwrap().len(), 4 << 20);
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut word, 0).unwrap();
        assert_eq!(u32::from_le_bytes(word), want);
        // A holder of the fd (a vfio-user client) cannot truncate it under the engines.
        assert!(file.set_len(0).is_err(), "shrink is sealed");
        assert!(file.set_len(8 << 20).is_err(), "grow is sealed");
    }
    a.scrub();
    let mut word = [0u8; 4];
    a.read(0, &mut word).unwrap();
    assert_eq!(u32::from_le_bytes(word), 0);
    b.read(0, &mut word).unwrap();
    assert_eq!(u32::from_le_bytes(word), 0xbbbb);
    assert!(gpu.alloc_vram(6 << 20, 4 << 20).is_err(), "past the end");
    assert!(gpu.alloc_vram(0, 0).is_err(), "empty");
}

#[test]
fn runs_every_group_once_in_parallel() {
    let gpu = SoftGpu::new(1 << 20, 3).unwrap();
    let hits = Arc::new((0..100).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let h = hits.clone();
    let work: WorkFn = Arc::new(move |i, _| {
        h[i as usize].fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    assert_eq!(run_on_engines(&gpu.queue, 0..100, &work, never()), Ok(100));
    assert!(hits.iter().all(|c| c.load(Ordering::Relaxed) == 1));
    let faulty: WorkFn = Arc::new(|i, _| {
        if i == 7 {
            Err(Fault::new(6, i))
        } else {
            Ok(())
        }
    });
    let r = run_on_engines(&gpu.queue, 0..10, &faulty, never());
    assert_eq!(r, Err(Fault::new(6, 7)));
    assert_eq!(run_here(0..10, &faulty, &*never()), Err(Fault::new(6, 7)));
    assert_eq!(gpu.engines(), 3);
}

#[test]
fn stopped_ranges_resume_exactly_where_they_stopped() {
    let gpu = SoftGpu::new(1 << 20, 2).unwrap();
    let hits = Arc::new((0..1000).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let h = hits.clone();
    let work: WorkFn = Arc::new(move |i, _| {
        h[i as usize].fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    let mut next = 0;
    let mut rounds = 0;
    while next < 1000 {
        let asked = Arc::new(AtomicU64::new(0));
        // Stop after roughly 37 claims (on the engines), or 37 groups (here).
        let ctl: Arc<dyn RunControl> = Arc::new(StopWhen(move || {
            asked.fetch_add(1, Ordering::Relaxed) >= 37
        }));
        let n = if rounds % 2 == 0 {
            run_on_engines(&gpu.queue, next..1000, &work, ctl).unwrap()
        } else {
            run_here(next..1000, &work, &*ctl).unwrap()
        };
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
