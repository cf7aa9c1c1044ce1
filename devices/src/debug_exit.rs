//! The debug-exit port: a test guest ends the VM with a status of its choice.
//!
//! A guest write of byte `v` to port 0xf4 (any width; the low byte counts) makes the VMM exit
//! with status `v`. The port is the one QEMU's `isa-debug-exit` uses by convention, so the same
//! guest runs under both (QEMU reports `(v << 1) | 1`). Reads return 0xff.

use crate::bus::BusDevice;
use crate::exit::{ExitHandle, ExitReason};

/// The debug-exit I/O port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Width of the port range (a 32-bit `out` is accepted).
pub const DEBUG_EXIT_LEN: u16 = 4;

/// See the module documentation.
#[derive(Debug)]
pub struct DebugExit {
    exit: ExitHandle,
}

impl DebugExit {
    /// A port that requests the VM's end through `exit`.
    pub fn new(exit: ExitHandle) -> Self {
        DebugExit { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (0, Some(&v)) = (offset, data.first()) {
            self.exit.request(ExitReason::DebugExit(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_requests_exit_with_low_byte() {
        let exit = ExitHandle::new().unwrap();
        let mut port = DebugExit::new(exit.clone());
        port.write(0, 1, &[9]);
        assert_eq!(
            exit.reason(),
            None,
            "writes inside the range but not at its start are ignored"
        );
        port.write(0, 0, &[0x2a, 0x01, 0, 0]);
        assert_eq!(exit.reason(), Some(ExitReason::DebugExit(0x2a)));
    }
}
