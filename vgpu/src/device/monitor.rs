//! Statistics of a vGPU read from another thread, without the device.

use super::*;

/// Reads a vGPU's statistics (see [`Vgpu::monitor`]). Read it only while the vGPU lives: a
/// departed vGPU's scheduler slot is reused by the next one.
#[derive(Clone)]
pub struct VgpuMonitor(pub(super) Arc<Shared>);

impl std::fmt::Debug for VgpuMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VgpuMonitor").finish_non_exhaustive()
    }
}

impl VgpuMonitor {
    /// See [`Vgpu::counters`].
    pub fn counters(&self) -> (u64, u64, u64) {
        let st = self.0.lock();
        let queued = st
            .ctx
            .iter()
            .filter(|c| c.runnable())
            .map(|c| u64::from(c.tail.wrapping_sub(c.head)))
            .sum();
        (
            queued,
            u64::from(st.fault_count),
            self.0.tdr_resets.load(Ordering::Relaxed),
        )
    }

    /// How much GPU time past the watchdog limit the last packet it stopped had used (how
    /// late the reset came: the watchdog checks at preemption points).
    pub fn last_tdr_overshoot(&self) -> Duration {
        Duration::from_nanos(self.0.tdr_overshoot_ns.load(Ordering::Relaxed))
    }

    /// Host CPU time its command processor has spent polling tail shadows (`crate::poll`).
    pub fn poll_time(&self) -> Duration {
        Duration::from_nanos(self.0.poll_ns.load(Ordering::Relaxed))
    }

    /// See [`Vgpu::sched_stats`].
    pub fn sched_stats(&self) -> crate::sched::MemberStats {
        self.0.sched.stats(self.0.member)
    }
}
