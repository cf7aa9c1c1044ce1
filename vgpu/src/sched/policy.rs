//! What distinguishes one scheduling policy from another. The scheduler's accounting (busy
//! time, virtual time and its floor, caps over the 100 ms window), grants, preemption points
//! and hand-over are shared; a [`Discipline`] makes the four decisions that differ. Each
//! [`Policy`] names one.

use super::state::State;
use super::{MemberId, Params, Policy};

/// The decisions of one policy. See the module documentation.
pub trait Discipline: Send + Sync + std::fmt::Debug {
    /// How fast a member's virtual time advances per ns of GPU time is `1 / weight`.
    fn weight(&self, params: &Params) -> f64;
    /// Who runs next among the waiting members under their cap (`eligible`, in slot order,
    /// never empty).
    fn pick(&self, st: &mut State, eligible: &[MemberId]) -> MemberId;
    /// Whether a holder whose slice is over may keep the GPU for another slice while it is
    /// still the one [`Discipline::pick`] would choose (saving a switch).
    fn extends_slices(&self) -> bool;
    /// Whether a holder keeps the GPU to the end of its quantum even when it has no more work
    /// (and always yields at that end).
    fn whole_quanta(&self) -> bool;
}

/// Round robin over the members with work, a slice each.
#[derive(Debug)]
pub struct RoundRobin {
    /// MxGPU-like world switch: a member keeps its whole quantum.
    pub whole_quanta: bool,
}

/// Fair queuing on virtual time: the member with the least goes next.
#[derive(Debug)]
pub struct FairQueuing {
    /// Virtual time counts GPU time divided by the member's weight (else all weigh 1).
    pub weighted: bool,
}

impl Discipline for RoundRobin {
    fn weight(&self, _: &Params) -> f64 {
        1.0
    }

    fn pick(&self, st: &mut State, eligible: &[MemberId]) -> MemberId {
        // The first eligible slot at or after the cursor, wrapping.
        let pick = eligible
            .iter()
            .copied()
            .find(|&i| i >= st.rr_next)
            .unwrap_or(eligible[0]);
        st.rr_next = (pick + 1) % st.members.len().max(1);
        pick
    }

    fn extends_slices(&self) -> bool {
        false
    }

    fn whole_quanta(&self) -> bool {
        self.whole_quanta
    }
}

impl Discipline for FairQueuing {
    fn weight(&self, params: &Params) -> f64 {
        if self.weighted {
            f64::from(params.weight.max(1))
        } else {
            1.0
        }
    }

    fn pick(&self, st: &mut State, eligible: &[MemberId]) -> MemberId {
        let m = &st.members;
        eligible
            .iter()
            .copied()
            .min_by(|&a, &b| {
                m[a].vtime
                    .total_cmp(&m[b].vtime)
                    .then(m[a].since.cmp(&m[b].since))
            })
            .unwrap_or(eligible[0])
    }

    fn extends_slices(&self) -> bool {
        true
    }

    fn whole_quanta(&self) -> bool {
        false
    }
}

impl Policy {
    /// The decisions this policy makes.
    pub fn discipline(self) -> &'static dyn Discipline {
        match self {
            Policy::BestEffort => &RoundRobin {
                whole_quanta: false,
            },
            Policy::FixedQuantum => &RoundRobin { whole_quanta: true },
            Policy::EqualShare => &FairQueuing { weighted: false },
            Policy::FixedShare => &FairQueuing { weighted: true },
        }
    }
}
