//! Polled 16550 UART on COM1 (I/O port 0x3f8) and the `fw_println!` macro.
//!
//! Every line is prefixed with `tessera-fw: ` and ended with `\r\n`. Output
//! is built in a small buffer and sent in bursts: after one LSR read that
//! shows the transmitter empty, up to a FIFO's worth of bytes is written (16
//! when the UART reports enabled FIFOs, else 1). Every port access is a VM
//! exit, so this roughly halves the cost of printing on a FIFO UART.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::io::{inb, outb};

/// Base port of COM1.
pub const COM1: u16 = 0x3f8;

const RBR_THR: u16 = 0; // receive buffer / transmit holding (DLAB = 0)
const IER: u16 = 1; // interrupt enable (DLAB = 0)
const DLL: u16 = 0; // divisor latch low (DLAB = 1)
const DLM: u16 = 1; // divisor latch high (DLAB = 1)
const IIR_FCR: u16 = 2; // interrupt identification / FIFO control
const LCR: u16 = 3; // line control
const MCR: u16 = 4; // modem control
const LSR: u16 = 5; // line status

const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
/// FIFO enable, clear the TX FIFO, RX trigger at 14 bytes. The RX FIFO is
/// not cleared explicitly, so input that a VMM queued early survives where
/// the UART allows it (vm-superio); a real 16550 and QEMU flush both FIFOs
/// when FIFO mode is switched on anyway.
const FCR_ENABLE: u8 = 0xc5;
const IIR_FIFOS_ENABLED: u8 = 0xc0;
const MCR_DTR_RTS: u8 = 0x03;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;

/// Transmit FIFO depth of a 16550A.
const FIFO_DEPTH_16550A: usize = 16;

/// Bytes that may be written after one THR-empty observation.
static TX_BURST: AtomicUsize = AtomicUsize::new(1);

/// The line prefix of everything the firmware prints.
pub const PREFIX: &str = "tessera-fw: ";

/// Program COM1: 115200 baud (divisor 1), 8N1, FIFOs on, interrupts off.
///
/// Switching FIFO mode on discards input a 16550 (or QEMU) received before
/// this point, so input should be sent only after the firmware says it is
/// ready to read (`tessera-fw: echo ready`).
pub fn init() {
    // SAFETY: standard 16550 programming sequence on COM1; these writes only
    // configure the UART, which the firmware owns.
    unsafe {
        outb(COM1 + IER, 0x00);
        outb(COM1 + LCR, LCR_DLAB);
        outb(COM1 + DLL, 0x01);
        outb(COM1 + DLM, 0x00);
        outb(COM1 + LCR, LCR_8N1);
        outb(COM1 + IIR_FCR, FCR_ENABLE);
        outb(COM1 + MCR, MCR_DTR_RTS);
    }
    // SAFETY: reading IIR only clears a pending THR-empty interrupt
    // indication, and interrupts are disabled.
    let iir = unsafe { inb(COM1 + IIR_FCR) };
    let burst = if iir & IIR_FIFOS_ENABLED == IIR_FIFOS_ENABLED {
        FIFO_DEPTH_16550A
    } else {
        1
    };
    TX_BURST.store(burst, Ordering::Relaxed);
}

fn line_status() -> u8 {
    // SAFETY: reading LSR has no side effect the firmware relies on (it
    // clears error bits, which are not used).
    unsafe { inb(COM1 + LSR) }
}

/// Send raw bytes, polling the transmitter.
pub fn write_bytes(bytes: &[u8]) {
    let burst = TX_BURST.load(Ordering::Relaxed).max(1);
    for chunk in bytes.chunks(burst) {
        while line_status() & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        for &b in chunk {
            // SAFETY: THR is empty (and with FIFOs the whole TX FIFO is), so
            // `chunk.len() <= burst` bytes fit without overrun.
            unsafe { outb(COM1 + RBR_THR, b) };
        }
    }
}

/// Wait for and return one received byte.
pub fn read_byte() -> u8 {
    while line_status() & LSR_DATA_READY == 0 {
        core::hint::spin_loop();
    }
    // SAFETY: data is ready; reading RBR pops exactly that byte.
    unsafe { inb(COM1 + RBR_THR) }
}

/// A line being assembled; flushed to the UART when full and when finished.
struct LineBuf {
    buf: [u8; 128],
    len: usize,
}

impl LineBuf {
    const fn new() -> Self {
        Self {
            buf: [0; 128],
            len: 0,
        }
    }

    fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.len == self.buf.len() {
                self.flush();
            }
            let n = bytes.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
        }
    }

    fn flush(&mut self) {
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

/// Print one prefixed line: `tessera-fw: <args><raw...>\r\n`.
///
/// The `raw` parts are appended byte for byte (for data that need not be
/// UTF-8, such as the command line or echoed input).
pub fn print_line(args: fmt::Arguments<'_>, raw: &[&[u8]]) {
    let mut line = LineBuf::new();
    line.push(PREFIX.as_bytes());
    // `LineBuf::write_str` never fails, so neither does formatting into it.
    let _ = line.write_fmt(args);
    for part in raw {
        line.push(part);
    }
    line.push(b"\r\n");
    line.flush();
}

/// Print a `tessera-fw: `-prefixed line, `format!`-style.
macro_rules! fw_println {
    ($($arg:tt)*) => {
        $crate::serial::print_line(format_args!($($arg)*), &[])
    };
}
pub(crate) use fw_println;
