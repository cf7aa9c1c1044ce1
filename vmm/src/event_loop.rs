//! Event-loop subscribers on the VMM's main thread.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::ExitHandle;
use devices::serial::SerialDevice;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

/// Wakes the loop when an exit is requested (the loop then checks the reason).
#[derive(Debug)]
pub struct ExitWatcher(pub ExitHandle);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            tracing::error!("cannot watch the exit event: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain the counter; the reason itself is read by the loop.
        let _ = self.0.eventfd().read();
    }
}

/// Feeds the host's stdin to the guest's UART.
#[derive(Debug)]
pub struct SerialInput {
    /// An unbuffered handle on stdin (a dup of fd 0), so epoll sees every byte still unread.
    pub stdin: File,
    pub serial: Arc<Mutex<SerialDevice>>,
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        // A regular file or /dev/null cannot be polled; such stdin simply gives no input.
        if let Err(e) = ops.add(Events::new(&self.stdin, EventSet::IN)) {
            tracing::debug!("stdin is not pollable, serial input disabled: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let room = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .input_room();
        let mut buf = [0u8; 64];
        let want = room.clamp(1, buf.len());
        let n = if events.event_set().contains(EventSet::IN) {
            self.stdin.read(&mut buf[..want]).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            // EOF, hang-up or error: stop watching stdin.
            let _ = ops.remove(Events::new_raw(self.stdin.as_raw_fd(), EventSet::IN));
            return;
        }
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(&buf[..n]);
    }
}
