//! Tessera firmware: a `no_std` bare-metal x86-64 guest booted as a PVH ELF.
//!
//! A few dozen ring-0 instructions (`boot`) switch to long mode and `iretq`
//! to CPL3, where all of this Rust code runs natively, even on PVM hosts
//! that emulate ring 0. See README.md for the serial protocol.

#![no_std]
#![no_main]

mod arena;
mod bench;
mod boot;
mod cmdline;
mod conformance;
mod io;
mod lapic;
mod mem;
mod mptable;
mod pages;
mod pci;
mod pvh;
mod serial;

use core::sync::atomic::{AtomicBool, Ordering};

use cmdline::{Ignored, RunMode};
use mptable::MpCpus;
use serial::fw_println;

/// Exit status used after a panic.
pub const PANIC_EXIT_STATUS: u8 = 125;
/// Longest line `run=echo` reads.
const ECHO_MAX: usize = 256;

/// Rust entry point, reached from the boot code at CPL3 with port I/O
/// allowed and interrupts on (nothing raises one until the local APIC is
/// enabled). `start_info` is the physical address of the PVH
/// `hvm_start_info` (%ebx at entry).
#[unsafe(no_mangle)]
pub extern "C" fn main(start_info: u64) -> ! {
    serial::init();
    fw_println!("boot");

    let info = pvh::StartInfo::from_paddr(start_info);
    let cmdline = match &info {
        Ok(info) => info.cmdline(),
        Err(e) => {
            fw_println!("no PVH start_info at {start_info:#x}: {e}");
            &[]
        }
    };
    // `run=first-fence` races to its fence: no information lines (every
    // serial byte is a VM exit), and ignored options are not reported.
    // `run=load` skips the information lines too (many VMs boot at once) but
    // reports ignored options: a wrong `seconds=` should not pass unnoticed.
    match cmdline::parse(cmdline, |_| {}).run {
        RunMode::FirstFence => exit(bench::first_fence()),
        RunMode::Load => exit(bench::load(
            info.as_ref().ok(),
            &cmdline::parse(cmdline, report_ignored).load,
        )),
        _ => {}
    }
    serial::print_line(format_args!("cmdline \""), &[cmdline, b"\""]);
    report_memory(info.as_ref().ok());
    report_cpus();
    report_pci();

    let opts = cmdline::parse(cmdline, report_ignored);
    if opts.bad_run {
        // A typo in the mode must not look like a pass to a script.
        fw_println!(
            "unknown run mode (info, echo, panic, fault, conformance, bench-latency, bench-throughput, first-fence, load)"
        );
        exit(2);
    }

    match opts.run {
        RunMode::Info => {}
        RunMode::Echo => echo(),
        RunMode::Panic => panic!("requested by run=panic"),
        RunMode::Fault => fault(),
        RunMode::Conformance => {
            // The suite decides the status: 0 only if every case passed.
            exit(conformance::run(info.as_ref().ok(), opts.external_pci))
        }
        // The benchmarks decide the status too: 0 when they measured.
        RunMode::BenchLatency => exit(bench::latency(&opts.bench)),
        RunMode::BenchThroughput => exit(bench::throughput(info.as_ref().ok(), &opts.bench)),
        RunMode::FirstFence => exit(bench::first_fence()),
        RunMode::Load => exit(bench::load(info.as_ref().ok(), &opts.load)),
    }
    exit(opts.exit_status)
}

/// Print a command-line token the parser ignored.
fn report_ignored(ignored: Ignored<'_>) {
    match ignored {
        Ignored::UnknownOption(tok) => serial::print_line(format_args!("unknown option "), &[tok]),
        Ignored::InvalidValue(tok) => serial::print_line(format_args!("invalid option "), &[tok]),
    }
}

fn report_memory(info: Option<&pvh::StartInfo>) {
    match info.and_then(|i| i.ram_summary()) {
        Some((bytes, ranges)) => fw_println!("memory {} MiB in {} ranges", bytes >> 20, ranges),
        None => fw_println!("memory unknown"),
    }
}

fn report_cpus() {
    match mptable::count_cpus() {
        Ok(MpCpus::Table { enabled, .. }) => fw_println!("cpus {enabled}"),
        Ok(MpCpus::DefaultConfig { cpus, kind }) => {
            fw_println!("cpus {cpus} (MP default configuration {kind})")
        }
        Err(mptable::MpError::NotFound) => fw_println!("cpus unknown (no MP table)"),
        Err(mptable::MpError::BadConfigTable(pa)) => {
            fw_println!("cpus unknown (bad MP configuration table at {pa:#x})")
        }
    }
}

fn report_pci() {
    let n = pci::scan_bus(0, &mut |f: &pci::Function| {
        fw_println!(
            "pci {} vendor={:04x} device={:04x} class={:06x}",
            f.bdf,
            f.vendor_id,
            f.device_id,
            f.class
        );
    });
    fw_println!("pci {n} functions");
}

fn echo() {
    fw_println!("echo ready");
    let mut line = [0u8; ECHO_MAX];
    let mut len = 0;
    while len < ECHO_MAX {
        let b = serial::read_byte();
        if b == b'\n' || b == b'\r' {
            break;
        }
        line[len] = b;
        len += 1;
    }
    serial::print_line(format_args!("echo "), &[&line[..len]]);
}

/// Raise #UD at CPL3. The boot IDT sends it to the ring-0 stub that exits
/// with status 128 + 6 (hardware KVM, and PVM as observed here).
fn fault() -> ! {
    const UD_VECTOR: u8 = 6;
    fw_println!(
        "fault: executing ud2, expect exit status {}",
        boot::EXCEPTION_EXIT_BASE + UD_VECTOR
    );
    // SAFETY: `ud2` touches no memory; it deliberately raises #UD, which the
    // boot IDT turns into a VM exit with status 134. Control never returns.
    unsafe { core::arch::asm!("ud2", options(noreturn, nomem, nostack)) }
}

/// Write `status` to the debug-exit port without printing anything. If the
/// VMM has no exit port, spin forever (CPL3 cannot `hlt`).
fn terminate(status: u8) -> ! {
    // SAFETY: port 0xf4 is the debug-exit device; writing it ends the VM or,
    // where no device is there, does nothing.
    unsafe { io::outb(boot::DEBUG_EXIT_PORT, status) };
    // Still running: a VMM without a debug-exit port. Cloud Hypervisor has an
    // ACPI sleep control register at 0x600; S5 (powered off) ends its VM, with
    // status 0 (the serial output says how the run went).
    // SAFETY: an I/O port write; where no device decodes 0x600 it does nothing.
    unsafe { io::outb(ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_S5) };
    loop {
        core::hint::spin_loop();
    }
}

/// Cloud Hypervisor's ACPI sleep control register (its `AcpiShutdownDevice`).
const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// Sleep type 5 (soft off) with the sleep-enable bit: `SLP_TYP << 2 | SLP_EN`.
const ACPI_SLEEP_S5: u8 = 5 << 2 | 1 << 5;

/// Print `tessera-fw: exit <status>` and end the VM with that status.
pub fn exit(status: u8) -> ! {
    fw_println!("exit {status}");
    terminate(status)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if PANICKING.swap(true, Ordering::Relaxed) {
        // A panic while reporting a panic: just stop.
        terminate(PANIC_EXIT_STATUS);
    }
    match info.location() {
        Some(loc) => fw_println!("panic {} at {}:{}", info.message(), loc.file(), loc.line()),
        None => fw_println!("panic {}", info.message()),
    }
    exit(PANIC_EXIT_STATUS)
}
