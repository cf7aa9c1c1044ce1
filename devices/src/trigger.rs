use std::io;
use std::sync::Arc;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An eventfd that vm-superio devices use to raise their interrupt or reset line.
///
/// The VMM registers the same eventfd as an irqfd (interrupts) or with its event loop (reset).
#[derive(Debug, Clone)]
pub struct EventFdTrigger(Arc<EventFd>);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(Arc::new(evt))
    }

    /// The underlying eventfd, to register it with KVM or an event loop.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
