//! `tessera bench boot`: start → first serial line → exit of the firmware guest, Tessera vs
//! QEMU `-M microvm`, alternating runs, medians and ratios.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::{default_firmware, median};

/// Options.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Firmware PVH ELF (default: target/firmware/tessera-fw.elf).
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Guest RAM for both VMMs, in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u32,
}

#[derive(Debug, Serialize)]
struct Report {
    runs: u32,
    tessera_ms: f64,
    qemu_ms: f64,
    ratio: f64,
    tessera_first_line_ms: f64,
    qemu_first_line_ms: f64,
    first_line_ratio: f64,
}

struct Sample {
    first_line: Duration,
    exit: Duration,
}

const FIRST_LINE: &str = "tessera-fw: boot";
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `cmd` once; times the first firmware line and the process exit.
fn time_once(mut cmd: Command, expect_status: i32) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let pid = child.id();
    let (cancel_tx, cancel_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = cancel_rx.recv_timeout(RUN_TIMEOUT) {
            // SAFETY: kill(2) on the child's pid; at worst the pid is already gone.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    });
    let mut first_line = None;
    let mut transcript = String::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if first_line.is_none() && line.contains(FIRST_LINE) {
                first_line = Some(start.elapsed());
            }
            transcript.push_str(&line);
            transcript.push('\n');
        }
    }
    let status = child.wait().map_err(|e| format!("wait failed: {e}"))?;
    let exit = start.elapsed();
    let _ = cancel_tx.send(());
    let _ = watchdog.join();
    if status.code() != Some(expect_status) {
        return Err(format!(
            "{:?} exited with {status} (expected {expect_status}); output:\n{transcript}",
            cmd.get_program()
        ));
    }
    let first_line = first_line.ok_or_else(|| {
        format!(
            "{:?} never printed {FIRST_LINE:?}; output:\n{transcript}",
            cmd.get_program()
        )
    })?;
    Ok(Sample { first_line, exit })
}

fn tessera_cmd(fw: &PathBuf, mem: u32) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let mut c = Command::new(exe);
    c.args(["--log-level", "warn", "vm", "--kernel"])
        .arg(fw)
        .args(["--cmdline", "run=info", "--memory"])
        .arg(format!("{mem}M"))
        .args(["--cpus", "1", "--serial", "stdio"]);
    Ok(c)
}

fn qemu_cmd(qemu: &PathBuf, fw: &PathBuf, mem: u32) -> Command {
    let mut c = Command::new(qemu);
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,isa-serial=on",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
    ])
    .arg(format!("{mem}M"))
    .args([
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
    ])
    .arg(fw)
    .args(["-append", "run=info"]);
    c
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(args: BootArgs) -> Result<(), String> {
    let fw = args.firmware.unwrap_or_else(default_firmware);
    if !fw.exists() {
        return Err(format!(
            "firmware {} not found (build it with `cargo xtask firmware`)",
            fw.display()
        ));
    }
    let mut tessera = Vec::new();
    let mut qemu = Vec::new();
    for i in 0..args.runs {
        // Alternate which VMM goes first so drift on a noisy machine hits both alike.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_tessera in order {
            if is_tessera {
                tessera.push(time_once(tessera_cmd(&fw, args.memory_mib)?, 0)?);
            } else {
                // isa-debug-exit reports (status << 1) | 1; the firmware exits with 0.
                qemu.push(time_once(qemu_cmd(&args.qemu, &fw, args.memory_mib), 1)?);
            }
        }
    }
    let med = |v: &[Sample], f: fn(&Sample) -> Duration| {
        median(&v.iter().map(|s| ms(f(s))).collect::<Vec<_>>())
    };
    let r = Report {
        runs: args.runs,
        tessera_ms: med(&tessera, |s| s.exit),
        qemu_ms: med(&qemu, |s| s.exit),
        ratio: 0.0,
        tessera_first_line_ms: med(&tessera, |s| s.first_line),
        qemu_first_line_ms: med(&qemu, |s| s.first_line),
        first_line_ratio: 0.0,
    };
    let r = Report {
        ratio: r.tessera_ms / r.qemu_ms,
        first_line_ratio: r.tessera_first_line_ms / r.qemu_first_line_ms,
        ..r
    };
    if args.json {
        super::print_json(&r)?;
    } else {
        println!("firmware boot, {} runs each, medians (ms)", r.runs);
        println!("{:<24}{:>12}{:>12}{:>10}", "", "tessera", "qemu", "ratio");
        println!(
            "{:<24}{:>12.2}{:>12.2}{:>10.3}",
            "start -> first line",
            r.tessera_first_line_ms,
            r.qemu_first_line_ms,
            r.first_line_ratio
        );
        println!(
            "{:<24}{:>12.2}{:>12.2}{:>10.3}",
            "start -> exit", r.tessera_ms, r.qemu_ms, r.ratio
        );
    }
    Ok(())
}
