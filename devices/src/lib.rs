//! Devices for the Tessera VMM: the I/O buses, legacy platform devices and the PCI root.
//!
//! Everything here is independent of KVM: a device sees plain reads and writes at an offset
//! inside the range it was registered for, and signals interrupts through eventfds that the
//! VMM wires to the in-kernel irqchip.

pub mod bus;
pub mod debug_exit;
pub mod exit;
pub mod files;
pub mod i8042;
pub mod pci;
pub mod serial;
mod trigger;

pub use bus::{Bus, BusDevice, BusDeviceSync, BusError, BusRange};
pub use exit::{ExitHandle, ExitReason};
pub use trigger::EventFdTrigger;

/// An error and its causes on one line (`error: cause: cause`), leaving out causes whose text
/// the message already contains.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}
