//! How devices and vCPUs ask the VMM to stop.

use std::io;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote `status` to the debug-exit port.
    DebugExit(u8),
    /// The guest powered off (KVM system event) or reset itself (i8042 or a KVM reset event);
    /// a Tessera VM does not reboot, so both end the VM with success.
    PowerOff,
    /// The guest shut down abnormally (a triple fault).
    GuestCrash(String),
    /// The VMM failed while the guest ran (a vCPU ioctl failed, a thread died).
    Failure(String),
}

impl ExitReason {
    /// The process exit status that `tessera vm` reports for this reason.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::DebugExit(v) => i32::from(*v),
            ExitReason::PowerOff => 0,
            ExitReason::GuestCrash(_) | ExitReason::Failure(_) => 1,
        }
    }
}

#[derive(Debug)]
struct Inner {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

/// A cloneable handle through which any thread requests the end of the VM.
///
/// The first request wins; later ones are ignored, so a debug-exit status cannot be overwritten
/// by the errors of vCPUs that are being torn down.
#[derive(Debug, Clone)]
pub struct ExitHandle(Arc<Inner>);

impl ExitHandle {
    /// Creates a handle with a fresh, non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(ExitHandle(Arc::new(Inner {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })))
    }

    /// Records `reason` unless another reason was recorded first, and wakes the event loop.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.0.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            tracing::debug!(?reason, "exit requested");
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(e) = self.0.evt.write(1) {
            tracing::error!("cannot signal the VM exit event: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.0
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable once an exit was requested.
    pub fn eventfd(&self) -> &EventFd {
        &self.0.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let h = ExitHandle::new().unwrap();
        assert_eq!(h.reason(), None);
        h.clone().request(ExitReason::DebugExit(7));
        h.request(ExitReason::Failure("late".into()));
        assert_eq!(h.reason(), Some(ExitReason::DebugExit(7)));
        assert_eq!(h.reason().unwrap().status(), 7);
        assert_eq!(h.eventfd().read().unwrap(), 2);
    }
}
