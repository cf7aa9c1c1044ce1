//! The i8042 keyboard controller, used by guests only to reset the machine.

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::{ExitHandle, ExitReason};

/// Turns the controller's reset line into a VM exit: Tessera VMs do not reboot.
#[derive(Debug)]
pub struct ResetLine(ExitHandle);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::PowerOff);
        Ok(())
    }
}

/// The controller's data (0x60) through command (0x64) ports.
pub const I8042_BASE: u16 = 0x60;
/// Ports 0x60–0x64.
pub const I8042_LEN: u16 = 5;

/// i8042 whose CPU-reset command (0xfe on port 0x64) ends the VM.
pub struct I8042 {
    dev: I8042Device<ResetLine>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller that requests [`ExitReason::PowerOff`] through `exit` on a CPU reset.
    pub fn new(exit: ExitHandle) -> Self {
        I8042 {
            dev: I8042Device::new(ResetLine(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) => *byte = self.dev.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            let Ok(()) = self.dev.write(off, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = ExitHandle::new().unwrap();
        let mut dev = I8042::new(exit.clone());
        dev.write(0, 4, &[0x20]);
        assert_eq!(exit.reason(), None);
        dev.write(0, 4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }
}
