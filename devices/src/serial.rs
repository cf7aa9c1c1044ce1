//! The 16550 UART (vm-superio) on the legacy COM1 port.

use std::io::Write;

use vm_superio::Serial;
use vm_superio::serial::NoEvents;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// COM1 I/O base.
pub const COM1_BASE: u16 = 0x3f8;
/// The UART's eight registers.
pub const COM1_LEN: u16 = 8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;

/// A 16550 UART whose output goes to `W` and whose interrupt is an eventfd.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    /// The interrupt line (kept to rebuild the UART in a restored state).
    interrupt: EventFdTrigger,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART that raises `interrupt` and writes what the guest sends to `out`.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            uart: Serial::new(interrupt.clone(), out),
            interrupt,
        }
    }

    /// Queues host input for the guest to read. Returns how many bytes fit in the FIFO;
    /// the rest are dropped, as a real UART drops bytes on overrun.
    /// Puts the UART in the state `state` (a restored snapshot's), keeping its output and
    /// interrupt line; refused, changing nothing, when the state is not one a UART can be in
    /// (more input bytes than its FIFO holds).
    pub fn restore(&mut self, state: &vm_superio::serial::SerialState) -> Result<(), String> {
        // The FIFO's size: what it holds plus the room left.
        let fifo = self.uart.fifo_capacity() + self.uart.state().in_buffer.len();
        if state.in_buffer.len() > fifo {
            return Err(format!(
                "serial port state: {} input bytes, the FIFO holds {fifo}",
                state.in_buffer.len()
            ));
        }
        let sink: Box<dyn Write + Send> = Box::new(std::io::sink());
        let old = std::mem::replace(&mut self.uart, Serial::new(self.interrupt.clone(), sink));
        let out = old.into_writer();
        self.uart = Serial::from_state(state, self.interrupt.clone(), NoEvents, out)
            .map_err(|e| format!("serial port state: {e:?}"))?;
        Ok(())
    }

    /// The UART's registers and pending input (for a snapshot).
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }

    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) if off < COM1_LEN as u8 => *byte = self.uart.read(off),
            (_, data) => {
                tracing::debug!(offset, len = data.len(), "bad serial read");
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) if off < COM1_LEN as u8 => {
                if let Err(e) = self.uart.write(off, *byte) {
                    tracing::warn!("serial write failed: {e:?}");
                }
            }
            _ => tracing::debug!(offset, len = data.len(), "bad serial write"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_input_and_interrupt() {
        let out = Shared::default();
        let irq = EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut s = SerialDevice::new(irq.clone(), Box::new(out.clone()));
        for b in b"hi" {
            s.write(0, 0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi");
        // Enable the received-data interrupt, then feed input.
        s.write(0, 1, &[0x01]);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert!(irq.eventfd().read().unwrap() >= 1);
        let mut lsr = [0u8];
        s.read(0, 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        s.read(0, 0, &mut b);
        assert_eq!(b[0], b'o');
        // Malformed accesses are ignored, not fatal.
        let mut wide = [0u8; 4];
        s.read(0, 0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        s.write(0, 9, &[1]);
    }
}
