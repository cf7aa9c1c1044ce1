//! PCI configuration access through configuration mechanism #1 (address
//! port 0xCF8, data port 0xCFC, 32-bit accesses) and bus enumeration.
//!
//! Enumeration is per bus ([`scan_bus`]) and reports every present function
//! to a visitor, so following PCI-to-PCI bridges later only needs a visitor
//! that calls [`scan_bus`] for a bridge's secondary bus.

use crate::io::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const CONFIG_ENABLE: u32 = 1 << 31;

/// Register offsets in the common configuration header.
pub const REG_ID: u8 = 0x00; // vendor id (15:0), device id (31:16)
pub const REG_COMMAND: u8 = 0x04; // command (15:0), status (31:16)
pub const REG_CLASS: u8 = 0x08; // revision (7:0), class code (31:8)
pub const REG_HEADER: u8 = 0x0c; // header type in bits 23:16
pub const REG_BAR0: u8 = 0x10; // BARs 0-5 at 0x10 + 4 * n
pub const REG_SUBSYSTEM: u8 = 0x2c; // subsystem vendor (15:0), subsystem (31:16)
pub const REG_CAP_PTR: u8 = 0x34;

/// Command register bits.
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register bit: a capability list is present.
const STATUS_CAP_LIST: u32 = 1 << 4;

/// BAR low bits.
pub const BAR_IO: u32 = 1 << 0;
pub const BAR_TYPE_MASK: u32 = 0x6;
pub const BAR_TYPE_64: u32 = 0x4;
pub const BAR_PREFETCHABLE: u32 = 1 << 3;
pub const BAR_MEM_FLAGS: u32 = 0xf;

/// Capability ids.
pub const CAP_MSIX: u8 = 0x11;
const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;

pub const DEVICES_PER_BUS: u8 = 32;
pub const FUNCTIONS_PER_DEVICE: u8 = 8;

/// A bus/device/function address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl Bdf {
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self {
            bus,
            device,
            function,
        }
    }

    fn config_address(self, offset: u8) -> u32 {
        CONFIG_ENABLE
            | u32::from(self.bus) << 16
            | u32::from(self.device & 0x1f) << 11
            | u32::from(self.function & 0x7) << 8
            | u32::from(offset & 0xfc)
    }

    /// Read the aligned 32-bit configuration register at `offset`.
    pub fn read_u32(self, offset: u8) -> u32 {
        // SAFETY: conf1 is a two-step access (select, then read) owned by the
        // single-threaded firmware, so nothing can interleave; reading a
        // configuration register has no side effects on standard registers.
        unsafe {
            outl(CONFIG_ADDRESS, self.config_address(offset));
            inl(CONFIG_DATA)
        }
    }

    /// Write the aligned 32-bit configuration register at `offset`.
    pub fn write_u32(self, offset: u8, value: u32) {
        // SAFETY: as for `read_u32`; what the write does to the function is
        // the caller's business (the firmware only programs functions it
        // drives).
        unsafe {
            outl(CONFIG_ADDRESS, self.config_address(offset));
            outl(CONFIG_DATA, value);
        }
    }

    /// The command register.
    pub fn command(self) -> u16 {
        self.read_u32(REG_COMMAND) as u16
    }

    /// Write the command register. The status half is written as zeros,
    /// which leaves its write-1-to-clear bits alone.
    pub fn set_command(self, command: u16) {
        self.write_u32(REG_COMMAND, u32::from(command));
    }

    /// Offset of the first capability with id `id`, if any.
    pub fn find_capability(self, id: u8) -> Option<u8> {
        if self.read_u32(REG_COMMAND) >> 16 & STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut at = self.read_u32(REG_CAP_PTR) as u8 & 0xfc;
        // At most 48 capabilities fit in 192 bytes: stop on a loop.
        for _ in 0..48 {
            if at < 0x40 {
                return None;
            }
            let head = self.read_u32(at);
            if head as u8 == id {
                return Some(at);
            }
            at = (head >> 8) as u8 & 0xfc;
        }
        None
    }
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// A present PCI function, as found by enumeration.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor_id: u16,
    pub device_id: u16,
    /// Base class (23:16), subclass (15:8) and programming interface (7:0).
    pub class: u32,
}

/// Probe one function; `None` if nothing answers there.
pub fn probe(bdf: Bdf) -> Option<Function> {
    let id = bdf.read_u32(REG_ID);
    let vendor_id = id as u16;
    if vendor_id == 0xffff || vendor_id == 0x0000 {
        return None;
    }
    let class = bdf.read_u32(REG_CLASS) >> 8;
    Some(Function {
        bdf,
        vendor_id,
        device_id: (id >> 16) as u16,
        class,
    })
}

fn is_multifunction(bdf: Bdf) -> bool {
    (bdf.read_u32(REG_HEADER) >> 16) as u8 & HEADER_TYPE_MULTIFUNCTION != 0
}

/// Enumerate one bus: function 0 of each device, and functions 1-7 when
/// function 0 has the multifunction bit. Returns the number of functions.
pub fn scan_bus(bus: u8, visit: &mut impl FnMut(&Function)) -> u32 {
    let mut found = 0;
    for device in 0..DEVICES_PER_BUS {
        let Some(f0) = probe(Bdf::new(bus, device, 0)) else {
            continue;
        };
        visit(&f0);
        found += 1;
        if !is_multifunction(f0.bdf) {
            continue;
        }
        for function in 1..FUNCTIONS_PER_DEVICE {
            if let Some(f) = probe(Bdf::new(bus, device, function)) {
                visit(&f);
                found += 1;
            }
        }
    }
    found
}
