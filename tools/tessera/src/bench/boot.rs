//! `tessera bench boot`: start → first serial line → exit of a guest, Tessera vs QEMU,
//! alternating runs, medians and ratios. The guest is the firmware (QEMU `-M microvm`) or the
//! minimal Linux kernel with its initramfs, up to its first user-space line (QEMU `-M pc`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
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
    /// The guest: the firmware, or the minimal Linux kernel and its initramfs.
    #[arg(long, value_enum, default_value_t = Guest::Firmware)]
    guest: Guest,
    /// Firmware PVH ELF (default: target/firmware/tessera-fw.elf).
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// Where `vmlinux-minimal` and `minimal-initramfs.cpio` are (`--guest linux`).
    #[arg(long, value_name = "DIR", default_value = "target/guest")]
    guest_dir: PathBuf,
    /// The QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Guest RAM for both VMMs, e.g. 64M (whole MiB; default: 64M for the firmware, 256M for
    /// Linux).
    #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
    memory: Option<u32>,
}

/// A size in whole MiB, written as `vm --memory` takes it (`64M`, `1G`).
fn parse_mib(s: &str) -> Result<u32, String> {
    vmm::config::parse_size(s)
        .filter(|n| n % (1 << 20) == 0 && (8 << 20..=64 << 30).contains(n))
        .map(|n| (n >> 20) as u32)
        .ok_or_else(|| format!("{s:?}: expected whole MiB from 8M to 64G, e.g. 64M"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Guest {
    Firmware,
    Linux,
}

/// What is booted, the same way in both VMMs.
struct Image {
    guest: Guest,
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    cmdline: String,
    memory_mib: u32,
    /// The line whose arrival is timed.
    first_line: &'static str,
    timeout: Duration,
}

impl Image {
    fn new(args: &BootArgs) -> Result<Image, String> {
        let found = |p: PathBuf, how: &str| {
            if p.exists() {
                Ok(p)
            } else {
                Err(format!("{} not found ({how})", p.display()))
            }
        };
        Ok(match args.guest {
            Guest::Firmware => Image {
                guest: Guest::Firmware,
                kernel: found(
                    args.firmware.clone().unwrap_or_else(default_firmware),
                    "build it with `cargo xtask firmware`",
                )?,
                initramfs: None,
                cmdline: "run=info".into(),
                memory_mib: args.memory.unwrap_or(64),
                first_line: "tessera-fw: boot",
                timeout: Duration::from_secs(60),
            },
            Guest::Linux => {
                let how = "build it with `cargo xtask guest-images`";
                // /init's first line; then `true` runs and /init leaves with its status, 0.
                let quirks = if vmm::pvm::host_is_pvm() {
                    " pvm_quirks"
                } else {
                    ""
                };
                Image {
                    guest: Guest::Linux,
                    kernel: found(args.guest_dir.join("vmlinux-minimal"), how)?,
                    initramfs: Some(found(args.guest_dir.join("minimal-initramfs.cpio"), how)?),
                    cmdline: format!(
                        "console=ttyS0 noxsave clearcpuid=smap,smep,popcnt,xsave,cx16,fsgsbase,\
                         pcid,erms,fsrm nopti rodata=off panic=-1{quirks} tessera.run=true"
                    ),
                    memory_mib: args.memory.unwrap_or(256),
                    first_line: "tessera-guest: ready",
                    timeout: Duration::from_secs(600),
                }
            }
        })
    }
}

#[derive(Debug, Serialize)]
struct Report {
    guest: &'static str,
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

/// Runs `cmd` once; times the image's first line and the process exit.
fn time_once(mut cmd: Command, image: &Image, expect_status: i32) -> Result<Sample, String> {
    let first = image.first_line;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let pid = child.id();
    let timeout = image.timeout;
    let (cancel_tx, cancel_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = cancel_rx.recv_timeout(timeout) {
            // SAFETY: kill(2) on the child's pid; at worst the pid is already gone.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    });
    let mut first_line = None;
    let mut transcript = String::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if first_line.is_none() && line.contains(first) {
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
            "{:?} never printed {first:?}; output:\n{transcript}",
            cmd.get_program()
        )
    })?;
    Ok(Sample { first_line, exit })
}

fn tessera_cmd(image: &Image) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let mut c = Command::new(exe);
    c.args(["--log-level", "warn", "vm", "--kernel"])
        .arg(&image.kernel)
        .args(["--cmdline", &image.cmdline, "--memory"])
        .arg(format!("{}M", image.memory_mib))
        .args(["--cpus", "1", "--serial", "stdio"]);
    if let Some(initramfs) = &image.initramfs {
        c.arg("--initramfs").arg(initramfs);
    }
    Ok(c)
}

fn qemu_cmd(qemu: &PathBuf, image: &Image) -> Command {
    let mut c = Command::new(qemu);
    match image.guest {
        Guest::Firmware => c.args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,isa-serial=on",
            "-cpu",
            "host,-arch-capabilities",
        ]),
        // The minimal kernel has no ACPI: its CPUs come from the MP table SeaBIOS writes. The
        // host's CPU model, as Tessera gives the guest: under `qemu64,-cx16` on PVM hosts the
        // guest reaches /init but hangs when its first command ends (measured 2026-12-06).
        Guest::Linux => c.args([
            "-M",
            "pc",
            "-no-acpi",
            "-cpu",
            "host,-arch-capabilities",
            "-no-reboot",
        ]),
    };
    c.args(["-enable-kvm", "-m"])
        .arg(format!("{}M", image.memory_mib))
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
        .arg(&image.kernel)
        .args(["-append", &image.cmdline]);
    if let Some(initramfs) = &image.initramfs {
        c.arg("-initrd").arg(initramfs);
    }
    c
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(args: BootArgs) -> Result<(), String> {
    let image = Image::new(&args)?;
    let mut tessera = Vec::new();
    let mut qemu = Vec::new();
    let mut progress = super::Progress::new("boot", args.runs as usize);
    for i in 0..args.runs {
        progress.step(format!("run {} of Tessera and QEMU", i + 1));
        // Alternate which VMM goes first so drift on a noisy machine hits both alike.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_tessera in order {
            if is_tessera {
                tessera.push(time_once(tessera_cmd(&image)?, &image, 0)?);
            } else {
                // isa-debug-exit reports (status << 1) | 1; both guests exit with 0.
                qemu.push(time_once(qemu_cmd(&args.qemu, &image), &image, 1)?);
            }
        }
    }
    let med = |v: &[Sample], f: fn(&Sample) -> Duration| {
        median(&v.iter().map(|s| ms(f(s))).collect::<Vec<_>>())
    };
    let r = Report {
        guest: match image.guest {
            Guest::Firmware => "firmware",
            Guest::Linux => "linux",
        },
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
        let what = match image.guest {
            Guest::Firmware => "firmware boot",
            Guest::Linux => "Linux boot to user space (minimal kernel, initramfs)",
        };
        println!("{what}, {} runs each, medians (ms)", r.runs);
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
