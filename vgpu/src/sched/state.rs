//! The scheduler's decisions, pure: who runs next under each [`Policy`], and the
//! accounting (GPU-busy time, virtual time, the 100 ms window for caps) they rest on. No
//! threads and no clock of its own, so the policies are tested with simulated time; the
//! [`Scheduler`](super::Scheduler) drives it under its mutex.

use crate::sync::Condvar;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::{MAX_SLICE, MIN_SLICE, MemberId, MemberStats, Params, Policy, WINDOW_NS};

#[derive(Debug)]
pub(super) struct Member {
    pub(super) params: Params,
    pub(super) busy_ns: u64,
    /// Fair-queuing virtual time: busy_ns / weight, with catch-up on wake.
    pub(super) vtime: f64,
    pub(super) waiting: bool,
    pub(super) since: u64,
    /// (start, end) of recent busy intervals, for windowed share and caps.
    pub(super) recent: VecDeque<(u64, u64)>,
    pub(super) switches: u64,
    pub(super) alive: bool,
    /// When it last gave the GPU back (to tell "still busy" from "back from idle").
    pub(super) last_release: Option<u64>,
    /// Signalled when the GPU is handed to this member (no thundering herd).
    pub(super) cv: Arc<Condvar>,
}

impl Member {
    pub(super) fn busy_in_window(&self, now: u64, window: u64) -> u64 {
        let from = now.saturating_sub(window);
        self.recent
            .iter()
            .map(|&(s, e)| e.min(now).saturating_sub(s.max(from)))
            .sum()
    }
}

/// The scheduler's state, pure: `pick` decides (through the policy's
/// [`Discipline`](super::Discipline)), `grant`/`charge` account.
#[derive(Debug)]
pub struct State {
    /// Policy in force.
    pub policy: Policy,
    /// Slice length in ns.
    pub slice_ns: u64,
    pub(super) members: Vec<Member>,
    pub(super) owner: Option<(MemberId, u64)>,
    /// End of the owner's slice.
    pub(super) deadline: u64,
    pub(super) rr_next: usize,
    /// Handoff latencies (release → next grant), ns, most recent last.
    pub handoffs: VecDeque<u64>,
    /// How far contended slices ran past their end, ns, most recent last.
    pub overruns: VecDeque<u64>,
    pub(super) released_at: Option<u64>,
    /// The least virtual time a member may wake with: never decreasing, the lowest virtual
    /// time among the members that wanted the GPU when it was last seen. A member that was
    /// idle (or is new) while the GPU sat idle too comes back here, not at its old (or zero)
    /// virtual time, which would let it hold the GPU until it caught up.
    pub(super) vfloor: f64,
    /// `pick`'s list of eligible members, kept so that a grant allocates nothing.
    eligible: Vec<MemberId>,
}

impl State {
    pub(super) fn new(policy: Policy, slice: Duration) -> Self {
        State {
            policy,
            slice_ns: slice.clamp(MIN_SLICE, MAX_SLICE).as_nanos() as u64,
            members: Vec::new(),
            owner: None,
            deadline: 0,
            rr_next: 0,
            handoffs: VecDeque::new(),
            overruns: VecDeque::new(),
            released_at: None,
            vfloor: 0.0,
            eligible: Vec::new(),
        }
    }

    pub(super) fn add(&mut self, params: Params) -> MemberId {
        let fresh = Member {
            params,
            busy_ns: 0,
            vtime: 0.0,
            waiting: false,
            since: 0,
            recent: VecDeque::new(),
            switches: 0,
            alive: true,
            last_release: None,
            cv: Arc::new(Condvar::new()),
        };
        // Reuse the slot of a member that is gone (a vfio-user server registers one per
        // attachment, for as long as it runs): the list stays as long as the most vGPUs ever
        // alive at once.
        let owner = self.owner.map(|o| o.0);
        if let Some(i) =
            (0..self.members.len()).find(|&i| !self.members[i].alive && owner != Some(i))
        {
            self.members[i] = fresh;
            return i;
        }
        self.members.push(fresh);
        self.members.len() - 1
    }

    pub(super) fn weight(&self, m: &Member) -> f64 {
        self.policy.discipline().weight(&m.params)
    }

    /// Whether `id` is under its cap right now (the owner's time since its grant counts).
    pub(super) fn under_cap(&self, id: MemberId, now: u64) -> bool {
        self.cap_left(id, now) > 0
    }

    /// GPU time `id` may still use before it reaches its cap in the window ending `now` (the
    /// owner's time since its grant counts); `u64::MAX` without a cap.
    pub(super) fn cap_left(&self, id: MemberId, now: u64) -> u64 {
        let m = &self.members[id];
        if m.params.cap_percent >= 100 {
            return u64::MAX;
        }
        let running = match self.owner {
            Some((o, start)) if o == id => {
                now.saturating_sub(start.max(now.saturating_sub(WINDOW_NS)))
            }
            _ => 0,
        };
        let allowed = u64::from(m.params.cap_percent) * WINDOW_NS / 100;
        allowed.saturating_sub(m.busy_in_window(now, WINDOW_NS) + running)
    }

    /// When the slice of owner `id` starting `now` ends: a slice later, or sooner where its
    /// cap runs out first (so a capped vGPU stops at its cap, not a slice past it).
    pub(super) fn slice_end(&self, id: MemberId, now: u64) -> u64 {
        now.saturating_add(self.slice_ns.min(self.cap_left(id, now)))
    }

    /// Marks `id` as wanting the GPU.
    pub(super) fn wait(&mut self, id: MemberId, now: u64) {
        if self.members[id].waiting {
            return;
        }
        // A vGPU coming back from idle starts at the active vGPUs' virtual time, so it gets
        // its share from now on instead of a burst to make up for its idle past. One that
        // just used its slice and still has work keeps its own virtual time.
        let slice = self.slice_ns;
        if self.members[id]
            .last_release
            .is_some_and(|r| now.saturating_sub(r) <= slice)
        {
            let m = &mut self.members[id];
            m.waiting = true;
            m.since = now;
            return;
        }
        self.raise_vfloor(Some(id));
        let floor = self.vfloor;
        let m = &mut self.members[id];
        if m.vtime < floor {
            m.vtime = floor;
        }
        m.waiting = true;
        m.since = now;
    }

    /// Raises the floor to the least virtual time of the members (but `except`) that want
    /// the GPU or hold it, if there are any.
    pub(super) fn raise_vfloor(&mut self, except: Option<MemberId>) {
        let active = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, m)| {
                Some(*i) != except
                    && m.alive
                    && (m.waiting || self.owner.is_some_and(|o| o.0 == *i))
            })
            .map(|(_, m)| m.vtime)
            .fold(f64::INFINITY, f64::min);
        if active.is_finite() && active > self.vfloor {
            self.vfloor = active;
        }
    }

    /// Whether the owner `id`, charged for its time so far, would still be picked next.
    pub(super) fn owner_still_first(&self, id: MemberId, now: u64) -> bool {
        if !self.policy.discipline().extends_slices() {
            return false;
        }
        let Some((o, start)) = self.owner.filter(|o| o.0 == id) else {
            return false;
        };
        let m = &self.members[o];
        let mine = m.vtime + now.saturating_sub(start) as f64 / self.weight(m);
        self.members.iter().enumerate().all(|(i, w)| {
            i == o || !(w.alive && w.waiting && self.under_cap(i, now)) || w.vtime > mine
        })
    }

    /// Who gets the GPU next among the waiting, eligible members.
    pub fn pick(&mut self, now: u64) -> Option<MemberId> {
        let mut eligible = std::mem::take(&mut self.eligible);
        eligible.clear();
        eligible.extend((0..self.members.len()).filter(|&i| {
            let m = &self.members[i];
            m.alive && m.waiting && self.under_cap(i, now)
        }));
        let pick = match eligible.is_empty() {
            true => None,
            false => Some(self.policy.discipline().pick(self, &eligible)),
        };
        self.eligible = eligible;
        pick
    }

    /// Gives the GPU to `id` at `now`.
    pub(super) fn grant(&mut self, id: MemberId, now: u64) {
        let m = &mut self.members[id];
        m.waiting = false;
        m.switches += 1;
        self.owner = Some((id, now));
        self.deadline = self.slice_end(id, now);
    }

    /// Hands a free GPU to the next eligible waiter, if any, and wakes exactly that waiter.
    pub(super) fn hand_off(&mut self, now: u64) {
        if self.owner.is_some() {
            return;
        }
        if let Some(next) = self.pick(now) {
            self.grant(next, now);
            self.members[next].cv.notify_one();
        } else if self.capped_until(now).is_some() {
            // The GPU idles because every waiter is over its cap: they wake and wait with a
            // timeout until the first of them comes under it (waiters otherwise sleep until
            // they are handed the GPU).
            for m in self.members.iter().filter(|m| m.alive && m.waiting) {
                m.cv.notify_one();
            }
        }
    }

    /// While the GPU is free and members wait but none may run (all over their caps): when
    /// the first of them comes under its cap, as the window slides past its busy time.
    pub(super) fn capped_until(&self, now: u64) -> Option<u64> {
        if self.owner.is_some() {
            return None;
        }
        (0..self.members.len())
            .filter(|&i| self.members[i].alive && self.members[i].waiting)
            .map(|i| {
                // No member is running, so its busy time in the window only falls as time
                // goes on: the first instant it is under its cap, by bisection.
                let (mut lo, mut hi) = (now, now + WINDOW_NS);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    if self.under_cap(i, mid) {
                        hi = mid;
                    } else {
                        lo = mid + 1;
                    }
                }
                lo
            })
            .min()
    }

    /// Charges the owner for its time and frees the GPU.
    pub(super) fn charge(&mut self, now: u64) -> Option<MemberId> {
        let (id, start) = self.owner.take()?;
        let busy = now.saturating_sub(start);
        let w = self.weight(&self.members[id]);
        let m = &mut self.members[id];
        m.busy_ns += busy;
        m.vtime += busy as f64 / w;
        let charged = m.vtime;
        m.recent.push_back((start, now));
        m.last_release = Some(now);
        while m.recent.front().is_some_and(|&(_, e)| e + WINDOW_NS < now) {
            m.recent.pop_front();
        }
        self.released_at = Some(now);
        // The member just charged was active until now: with the waiting ones, it bounds
        // the floor (so that one running alone carries the floor along with it).
        self.raise_vfloor(None);
        let waiting_min = self
            .members
            .iter()
            .filter(|m| m.alive && m.waiting)
            .map(|m| m.vtime)
            .fold(charged, f64::min);
        if waiting_min > self.vfloor {
            self.vfloor = waiting_min;
        }
        Some(id)
    }

    /// Statistics of member `id` at `now`.
    pub fn stats(&self, id: MemberId, now: u64) -> MemberStats {
        let m = &self.members[id];
        let running = self.owner.is_some_and(|o| o.0 == id);
        let extra = match self.owner {
            Some((o, start)) if o == id => now.saturating_sub(start),
            _ => 0,
        };
        let window = m.busy_in_window(now, WINDOW_NS)
            + match self.owner {
                Some((o, start)) if o == id => {
                    now.saturating_sub(start.max(now.saturating_sub(WINDOW_NS)))
                }
                _ => 0,
            };
        MemberStats {
            busy_ns: m.busy_ns + extra,
            window_share: window as f64 / WINDOW_NS.min(now.max(1)) as f64,
            switches: m.switches,
            waiting: m.waiting,
            running,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::DEFAULT_SLICE;
    use crate::sched::tests::jain;

    /// Simulates `demand` (true = always has work) members for `total_ms` with the pure
    /// state machine, a slice at a time; returns busy ns per member.
    fn simulate(policy: Policy, params: &[Params], demand: &[bool], total_ms: u64) -> Vec<u64> {
        let mut st = State::new(policy, DEFAULT_SLICE);
        let ids: Vec<_> = params.iter().map(|p| st.add(*p)).collect();
        let mut now = 0u64;
        let end = total_ms * 1_000_000;
        for (&id, &d) in ids.iter().zip(demand) {
            if d {
                st.wait(id, now);
            }
        }
        while now < end {
            match st.pick(now) {
                Some(id) => {
                    st.grant(id, now);
                    now += st.slice_ns;
                    st.charge(now);
                    st.wait(id, now);
                }
                None => now += 100_000, // idle: everyone capped
            }
        }
        ids.iter().map(|&i| st.members[i].busy_ns).collect()
    }

    /// Runs `n` slices from `now` with the pure state machine, every member that runs going
    /// back to waiting (always busy); returns who ran each slice.
    fn busy_slices(st: &mut State, now: &mut u64, n: usize) -> Vec<MemberId> {
        (0..n)
            .map(|_| {
                let id = st.pick(*now).expect("a member waits");
                st.grant(id, *now);
                *now += st.slice_ns;
                st.charge(*now);
                st.wait(id, *now);
                id
            })
            .collect()
    }

    #[test]
    fn equal_share_is_fair() {
        let busy = simulate(
            Policy::EqualShare,
            &[Params::default(); 8],
            &[true; 8],
            1000,
        );
        let v: Vec<f64> = busy.iter().map(|&b| b as f64).collect();
        assert!(jain(&v) > 0.999, "{busy:?}");
    }

    #[test]
    fn weights_give_proportional_shares() {
        let params: Vec<Params> = [1, 2, 4, 8]
            .iter()
            .map(|&w| Params {
                weight: w,
                cap_percent: 100,
            })
            .collect();
        let busy = simulate(Policy::FixedShare, &params, &[true; 4], 2000);
        let total: u64 = busy.iter().sum();
        for (b, w) in busy.iter().zip([1.0, 2.0, 4.0, 8.0]) {
            let share = *b as f64 / total as f64;
            assert!(
                (share - w / 15.0).abs() < 0.01,
                "share {share} for weight {w}: {busy:?}"
            );
        }
    }

    #[test]
    fn caps_hold_and_idle_members_get_nothing() {
        let params = [
            Params {
                weight: 1,
                cap_percent: 25,
            },
            Params::default(),
            Params::default(),
        ];
        let busy = simulate(Policy::EqualShare, &params, &[true, true, false], 1000);
        let total = 1_000_000_000u64;
        assert!(busy[0] as f64 / total as f64 <= 0.26, "{busy:?}");
        assert_eq!(busy[2], 0);
        assert!(busy[1] > busy[0]);
        // A capped member alone leaves the GPU idle for the rest of the window.
        let busy = simulate(Policy::BestEffort, &params[..1], &[true], 1000);
        assert!((busy[0] as f64 / total as f64) <= 0.26, "{busy:?}");
    }

    #[test]
    fn a_gpu_idled_by_caps_knows_when_the_first_waiter_may_run() {
        let capped = |pct| Params {
            weight: 1,
            cap_percent: pct,
        };
        let mut st = State::new(Policy::EqualShare, DEFAULT_SLICE);
        let (a, b) = (st.add(capped(25)), st.add(capped(10)));
        // a ran 25 ms from 0, b 10 ms from 25 ms: both used their whole cap.
        st.wait(a, 0);
        st.grant(a, 0);
        st.charge(25_000_000);
        st.wait(b, 25_000_000);
        st.grant(b, 25_000_000);
        st.charge(35_000_000);
        st.wait(a, 35_000_000);
        st.wait(b, 35_000_000);
        assert_eq!(st.pick(35_000_000), None);
        // a comes under 25 % as soon as the window has slid past the first nanosecond of
        // its run; b only once the window passes the start of its own.
        assert_eq!(st.capped_until(35_000_000), Some(100_000_001));
        assert_eq!(st.pick(100_000_001), Some(a));
        // Nobody waiting, or the GPU held: nothing to wait for.
        st.grant(a, 100_000_001);
        assert_eq!(st.capped_until(100_000_001), None);
    }

    #[test]
    fn best_effort_round_robin_and_returning_members() {
        let busy = simulate(Policy::BestEffort, &[Params::default(); 3], &[true; 3], 300);
        assert!(busy.iter().all(|&b| b == busy[0]), "{busy:?}");
        // A member waking after idling does not get a burst: vtime catch-up.
        let mut st = State::new(Policy::EqualShare, DEFAULT_SLICE);
        let a = st.add(Params::default());
        let b = st.add(Params::default());
        let mut now = 0;
        st.wait(a, now);
        busy_slices(&mut st, &mut now, 100);
        st.wait(b, now);
        let ran = busy_slices(&mut st, &mut now, 10);
        let run_of_b = ran.iter().filter(|&&id| id == b).count();
        assert!((4..=6).contains(&run_of_b), "b ran {run_of_b} of 10 slices");
    }

    #[test]
    fn members_waking_on_an_idle_gpu_get_no_burst() {
        // A runs alone for a long time, then the GPU idles. B joins (new, virtual time 0)
        // while nothing runs, and A comes back: they must alternate, not B run until it has
        // made up A's whole past.
        let mut st = State::new(Policy::EqualShare, DEFAULT_SLICE);
        let a = st.add(Params::default());
        let b = st.add(Params::default());
        let mut now = 0;
        st.wait(a, now);
        busy_slices(&mut st, &mut now, 1000);
        // A's last slice ends, and it goes idle (no wait).
        let id = st.pick(now).unwrap();
        st.grant(id, now);
        now += st.slice_ns;
        st.charge(now);
        assert!(st.pick(now).is_none());
        now += 1_000_000_000;
        st.wait(b, now);
        st.wait(a, now + 1);
        let mut runs = [0usize; 2];
        for id in busy_slices(&mut st, &mut now, 20) {
            runs[id] += 1;
        }
        assert!(runs[a] >= 9 && runs[b] >= 9, "slices of a, b: {runs:?}");
    }
}
