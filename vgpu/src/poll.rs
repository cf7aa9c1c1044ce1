//! Adaptive polling of tail shadows, and the host CPU it may cost.
//!
//! After work, or after a doorbell, a vGPU's command processor keeps watching the tail shadows
//! of its contexts for a *window* before it sleeps, so a guest that submits again soon needs no
//! doorbell (with `CTX_CONTROL.SUPPRESS` the guest sees the hint and does not ring, so it pays
//! no exit) and the processor no wake-up. The window adapts like KVM's halt polling: a sleep
//! that a longer window would have avoided (woken within the longest window) doubles it; a
//! long sleep halves it. Polling stops at once when other vGPUs are waiting for the GPU (the
//! engines have work; a spinning processor would only take their CPU), and it is bounded by a
//! [`PollBudget`]: CPU per vGPU and for all vGPUs of a GPU, per 100 ms period. An idle vGPU
//! whose window has closed costs no CPU at all: it blocks on its doorbells.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The accounting period of the CPU limits.
pub const PERIOD: Duration = Duration::from_millis(100);
/// Default longest polling window of a vGPU.
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(300);
/// Default CPU one vGPU may spend polling, in percent of one core.
pub const DEFAULT_VGPU_PERCENT: u32 = 25;
/// Default CPU all vGPUs of a GPU may spend polling, in percent of one core.
pub const DEFAULT_TOTAL_PERCENT: u32 = 100;
/// Longest window that may be configured.
pub const MAX_WINDOW: Duration = Duration::from_millis(10);

/// The limits of a [`PollBudget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollLimits {
    /// Longest window (0: never poll; every submission needs its doorbell).
    pub window: Duration,
    /// CPU one vGPU may spend polling per period, in percent of one core.
    pub vgpu_percent: u32,
    /// CPU all vGPUs together may spend polling per period, in percent of one core.
    pub total_percent: u32,
}

impl Default for PollLimits {
    fn default() -> Self {
        PollLimits {
            window: DEFAULT_WINDOW,
            vgpu_percent: DEFAULT_VGPU_PERCENT,
            total_percent: DEFAULT_TOTAL_PERCENT,
        }
    }
}

/// CPU spent polling in one period.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Period {
    index: u64,
    used_ns: u64,
}

impl Period {
    fn at(&mut self, index: u64) -> &mut Self {
        if self.index != index {
            *self = Period { index, used_ns: 0 };
        }
        self
    }
}

fn period_index() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    (BASE.get_or_init(Instant::now).elapsed().as_nanos() / PERIOD.as_nanos()) as u64
}

fn share_of_period(percent: u32) -> u64 {
    (PERIOD.as_nanos() as u64).saturating_mul(u64::from(percent)) / 100
}

/// The polling limits of one GPU, shared by its vGPUs (through their scheduler), and what
/// they have spent. Limits can change at run time.
#[derive(Debug)]
pub struct PollBudget {
    window_ns: AtomicU64,
    vgpu_percent: AtomicU32,
    total_percent: AtomicU32,
    period: Mutex<Period>,
    spent_ns: AtomicU64,
}

impl Default for PollBudget {
    fn default() -> Self {
        Self::new(PollLimits::default())
    }
}

impl PollBudget {
    /// A budget with `limits`.
    pub fn new(limits: PollLimits) -> Self {
        let b = PollBudget {
            window_ns: AtomicU64::new(0),
            vgpu_percent: AtomicU32::new(0),
            total_percent: AtomicU32::new(0),
            period: Mutex::new(Period::default()),
            spent_ns: AtomicU64::new(0),
        };
        b.set_limits(limits);
        b
    }

    /// Changes the limits (the window is clamped to [`MAX_WINDOW`]).
    pub fn set_limits(&self, l: PollLimits) {
        let w = l.window.min(MAX_WINDOW).as_nanos() as u64;
        self.window_ns.store(w, Ordering::Relaxed);
        self.vgpu_percent.store(l.vgpu_percent, Ordering::Relaxed);
        self.total_percent.store(l.total_percent, Ordering::Relaxed);
    }

    /// The limits now.
    pub fn limits(&self) -> PollLimits {
        PollLimits {
            window: Duration::from_nanos(self.window_ns.load(Ordering::Relaxed)),
            vgpu_percent: self.vgpu_percent.load(Ordering::Relaxed),
            total_percent: self.total_percent.load(Ordering::Relaxed),
        }
    }

    /// CPU time all vGPUs have spent polling so far.
    pub fn spent(&self) -> Duration {
        Duration::from_nanos(self.spent_ns.load(Ordering::Relaxed))
    }

    fn period(&self) -> std::sync::MutexGuard<'_, Period> {
        self.period.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a vGPU that spent `own` this period may poll now.
    pub(crate) fn allows(&self, own: &mut Period) -> bool {
        let index = period_index();
        let mine = share_of_period(self.vgpu_percent.load(Ordering::Relaxed));
        let all = share_of_period(self.total_percent.load(Ordering::Relaxed));
        own.at(index).used_ns < mine && self.period().at(index).used_ns < all
    }

    /// Charges `spent` of polling to a vGPU's period and to the GPU's.
    pub(crate) fn charge(&self, own: &mut Period, spent: Duration) {
        let ns = spent.as_nanos() as u64;
        let index = period_index();
        own.at(index).used_ns += ns;
        self.period().at(index).used_ns += ns;
        self.spent_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// Shortest window a growing window starts from.
const GROW_FROM: Duration = Duration::from_micros(10);
/// A vGPU's first window.
const FIRST_WINDOW: Duration = Duration::from_micros(50);

/// One vGPU's adaptive window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    now: Duration,
}

impl Default for Window {
    fn default() -> Self {
        Window { now: FIRST_WINDOW }
    }
}

impl Window {
    /// The window now, at most `max`.
    pub(crate) fn get(&self, max: Duration) -> Duration {
        self.now.min(max)
    }

    /// Adapts to a sleep of `slept` that ended with an event: had the window been that long
    /// (and within `max`), polling would have caught it, so it grows; a longer sleep means
    /// polling would have been wasted, so it shrinks.
    pub(crate) fn after_sleep(&mut self, slept: Duration, max: Duration) {
        self.now = if slept <= max {
            (self.now * 2).max(GROW_FROM).min(max)
        } else {
            self.now / 2
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_grow_on_short_sleeps_and_shrink_on_long_ones() {
        let max = Duration::from_micros(300);
        let mut w = Window::default();
        assert_eq!(w.get(max), FIRST_WINDOW);
        w.after_sleep(Duration::from_micros(80), max);
        assert_eq!(w.get(max), Duration::from_micros(100));
        for _ in 0..10 {
            w.after_sleep(Duration::from_micros(80), max);
        }
        assert_eq!(w.get(max), max, "capped at the longest window");
        w.after_sleep(Duration::from_millis(5), max);
        assert_eq!(w.get(max), Duration::from_micros(150));
        for _ in 0..40 {
            w.after_sleep(Duration::from_secs(1), max);
        }
        assert_eq!(w.get(max), Duration::ZERO, "an idle vGPU stops polling");
        w.after_sleep(Duration::from_micros(5), max);
        assert_eq!(
            w.get(max),
            GROW_FROM,
            "and starts again when work comes back soon"
        );
        assert_eq!(
            w.get(Duration::ZERO),
            Duration::ZERO,
            "a window of 0 never polls"
        );
    }

    #[test]
    fn budgets_bound_each_vgpu_and_all_together() {
        let b = PollBudget::new(PollLimits {
            window: Duration::from_micros(300),
            vgpu_percent: 10,
            total_percent: 15,
        });
        let (mut a, mut c) = (Period::default(), Period::default());
        // The checks between two charges hold within one period (100 ms); one that rolled
        // over in between is not checked.
        let start = period_index();
        assert!(b.allows(&mut a) && b.allows(&mut c));
        b.charge(&mut a, Duration::from_millis(10));
        let a_spent = !b.allows(&mut a);
        let c_may = b.allows(&mut c);
        if period_index() == start {
            assert!(a_spent, "a used its 10 ms of 100");
            assert!(c_may, "c has used nothing, the GPU 10 of its 15 ms");
        }
        b.charge(&mut c, Duration::from_millis(5));
        let c_may = b.allows(&mut c);
        if period_index() == start {
            assert!(!c_may, "the GPU's 15 ms are spent");
        }
        // A period of the past counts for nothing.
        let mut old = Period {
            index: start.wrapping_sub(1),
            used_ns: u64::MAX,
        };
        old.at(start);
        assert_eq!(old.used_ns, 0);
        assert_eq!(b.spent(), Duration::from_millis(15));
        b.set_limits(PollLimits {
            window: Duration::from_secs(1),
            ..b.limits()
        });
        assert_eq!(b.limits().window, MAX_WINDOW);
    }
}
