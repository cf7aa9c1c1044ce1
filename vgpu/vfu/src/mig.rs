//! Migration v2 as vfio-user carries it: the device states, which moves between them a
//! device makes, and the `DEVICE_FEATURE` payloads.

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
};

pub use vfio_bindings::bindings::vfio::{VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};

/// Feature numbers (the low 16 bits of `DEVICE_FEATURE`'s flags).
#[allow(missing_docs)]
pub mod feature {
    use super::*;
    pub const MIGRATION: u32 = VFIO_DEVICE_FEATURE_MIGRATION;
    pub const MIG_DEVICE_STATE: u32 = VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
    pub const DMA_LOGGING_START: u32 = VFIO_DEVICE_FEATURE_DMA_LOGGING_START;
    pub const DMA_LOGGING_STOP: u32 = VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP;
    pub const DMA_LOGGING_REPORT: u32 = VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT;
    pub const MASK: u32 = VFIO_DEVICE_FEATURE_MASK;
    pub const GET: u32 = VFIO_DEVICE_FEATURE_GET;
    pub const SET: u32 = VFIO_DEVICE_FEATURE_SET;
    pub const PROBE: u32 = VFIO_DEVICE_FEATURE_PROBE;
}

/// A device's migration state (`enum vfio_device_mig_state`). The peer-to-peer states are
/// not offered (a vGPU does no peer-to-peer DMA), so they are refused like unknown values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DeviceState {
    /// A transition failed; only a device reset leaves it.
    Error = 0,
    /// Stopped: no work runs, nothing changes; state may be read or written next.
    Stop = 1,
    /// Running normally.
    Running = 2,
    /// Stopped, with the rest of its state being read (`MIG_DATA_READ` until it returns 0).
    StopCopy = 3,
    /// Stopped, taking a state (`MIG_DATA_WRITE`); leaving it applies the state.
    Resuming = 4,
    /// Running, with its state being read ahead of the stop (pre-copy).
    PreCopy = 6,
}

impl DeviceState {
    /// The state with this number, if a device here can be in it.
    pub fn from_raw(v: u32) -> Option<DeviceState> {
        use DeviceState::*;
        Some(match v {
            0 => Error,
            1 => Stop,
            2 => Running,
            3 => StopCopy,
            4 => Resuming,
            6 => PreCopy,
            _ => return None,
        })
    }

    /// Whether a device moves from `self` to `to` in one step (VFIO's arcs, without the
    /// peer-to-peer states).
    pub fn arc(self, to: DeviceState) -> bool {
        use DeviceState::*;
        matches!(
            (self, to),
            (Running, Stop)
                | (Running, PreCopy)
                | (PreCopy, Running)
                | (PreCopy, StopCopy)
                | (Stop, Running)
                | (Stop, StopCopy)
                | (Stop, Resuming)
                | (StopCopy, Stop)
                | (Resuming, Stop)
        )
    }

    /// The steps from `self` to `to` (not including `self`), as VFIO walks a combination
    /// transition: the shortest path of arcs whose intermediate states have no side effects
    /// on the data stream (never through STOP_COPY, RESUMING or PRE_COPY). `None` where there
    /// is no such path (from or to ERROR, for one).
    pub fn path(self, to: DeviceState) -> Option<Vec<DeviceState>> {
        use DeviceState::*;
        const ALL: [DeviceState; 5] = [Stop, Running, StopCopy, Resuming, PreCopy];
        if self == to {
            return Some(Vec::new());
        }
        // Named as forbidden by the vfio-user specification.
        if (self, to) == (StopCopy, PreCopy) {
            return None;
        }
        // Breadth-first over at most five states.
        let mut paths: Vec<Vec<DeviceState>> = vec![vec![self]];
        let mut seen = vec![self];
        while !paths.is_empty() {
            let mut next = Vec::new();
            for p in paths {
                let last = *p.last()?;
                if last != self && matches!(last, StopCopy | Resuming | PreCopy) {
                    continue;
                }
                for s in ALL {
                    if last.arc(s) && !seen.contains(&s) {
                        let mut q = p.clone();
                        q.push(s);
                        if s == to {
                            q.remove(0);
                            return Some(q);
                        }
                        seen.push(s);
                        next.push(q);
                    }
                }
            }
            paths = next;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceState::*;
    use super::*;

    #[test]
    fn arcs_and_combinations_follow_vfio() {
        assert_eq!(Running.path(StopCopy), Some(vec![Stop, StopCopy]));
        assert_eq!(Resuming.path(Running), Some(vec![Stop, Running]));
        assert_eq!(PreCopy.path(Stop), Some(vec![Running, Stop]));
        assert_eq!(StopCopy.path(Running), Some(vec![Stop, Running]));
        assert_eq!(Running.path(Resuming), Some(vec![Stop, Resuming]));
        // Never through a state that moves data.
        assert_eq!(StopCopy.path(Resuming), Some(vec![Stop, Resuming]));
        assert_eq!(Resuming.path(PreCopy), Some(vec![Stop, Running, PreCopy]));
        assert_eq!(PreCopy.path(Resuming), Some(vec![Running, Stop, Resuming]));
        assert_eq!(Error.path(Running), None);
        assert_eq!(Running.path(Error), None);
        assert_eq!(StopCopy.path(PreCopy), None);
        assert_eq!(Stop.path(Stop), Some(vec![]));
        assert_eq!(
            DeviceState::from_raw(5),
            None,
            "peer-to-peer is not offered"
        );
        assert_eq!(DeviceState::from_raw(6), Some(PreCopy));
    }
}
