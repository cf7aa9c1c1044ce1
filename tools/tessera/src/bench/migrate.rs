//! `tessera bench migrate`: live migration of a firmware VM whose vGPU is busy and whose guest
//! writes memory all along (`run=load kind=dirty`: the GPU fills guest RAM, the CPU writes
//! VRAM through the aperture), between two `tessera vm` processes on this host over a UNIX
//! socket, for each vGPU profile. Reports the downtime (pause to the destination's
//! acknowledgement), the total time, the bytes sent and the pre-copy rounds; the destination's
//! guest checks every word it wrote (a migration that lost a page fails the run).
//! With `--user-device`, the vGPU is an instance of a `tessera serve` child instead, and the
//! destination gets another instance of it: the server's migration v2 carries the vGPU.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::{Progress, default_firmware, median};

/// Options.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// vGPU profiles to migrate, comma-separated.
    #[arg(long, default_value = "64M,256M,1G", value_delimiter = ',')]
    profiles: Vec<String>,
    /// Migrations per profile (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// The firmware image (default: the build's).
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// Serve the vGPU from a `tessera serve` child over vfio-user (`--user-device`; the
    /// destination takes another instance of it) instead of in the VMM.
    #[arg(long)]
    user_device: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    profile: String,
    runs: u32,
    downtime_ms: f64,
    total_ms: f64,
    /// MB (10^6 bytes) sent.
    sent_mb: f64,
    rounds: f64,
    /// Pages sent while the VM was stopped.
    stopped_pages: f64,
    /// The downtime's parts (ms): pause, last dirty pages, device state, the destination.
    pause_ms: f64,
    last_copy_ms: f64,
    state_ms: f64,
    apply_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    /// Where the vGPU lived: "in-process" or "vfio-user".
    transport: &'static str,
    guest_ram_mib: u64,
    rows: Vec<Row>,
    /// Downtime of the largest profile ÷ the smallest (target ≤ 1.5).
    downtime_largest_over_smallest: f64,
}

/// Guest RAM of the benchmark VMs.
const RAM_MIB: u64 = 256;
const T: Duration = Duration::from_secs(300);

/// A `tessera vm` child whose stdout lines are collected by a thread.
struct Vm {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Vm {
    fn spawn(args: &[&str]) -> Result<Vm, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
        let mut child = Command::new(exe)
            .args(["--log-level", "warn", "vm"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start tessera vm: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Vm { child, lines })
    }

    /// The first line containing `needle`.
    fn line(&self, needle: &str) -> Result<String, String> {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Ok(l),
                Ok(_) => {}
                Err(_) => return Err(format!("the VM never printed {needle:?}")),
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tessera vmctl` with `args`; its reply.
fn vmctl(sock: &Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(exe)
        .args([
            "--log-level",
            "warn",
            "vmctl",
            "--timeout",
            "300s",
            "--api-socket",
        ])
        .arg(sock)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "vmctl {args:?}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A `tessera serve` child for `--user-device` runs.
struct Serve {
    child: Child,
    dir: PathBuf,
}

impl Serve {
    fn start(dir: &Path) -> Result<Serve, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = Command::new(exe)
            .args(["--log-level", "warn", "serve", "--dir"])
            .arg(dir)
            .env("TESSERA_STATE_DIR", dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start tessera serve: {e}"))?;
        Ok(Serve {
            child,
            dir: dir.to_path_buf(),
        })
    }

    /// `tessera ARGS --dir DIR --json`: its reply, or why not.
    fn call(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let out = Command::new(exe)
            .args(["--log-level", "warn"])
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .arg("--json")
            .output()
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|_| String::from_utf8_lossy(&out.stderr).trim().to_string())?;
        if v["ok"] != true {
            return Err(format!("tessera {args:?}: {v}"));
        }
        Ok(v)
    }

    /// Creates instance `name` of `profile`; its socket. Waits for the server to answer.
    fn create(&self, profile: &str, name: &str) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.call(&["vgpu", "create", "--type", profile, "--name", name]) {
                Ok(v) => {
                    return v["instance"]["socket"]
                        .as_str()
                        .map(str::to_string)
                        .ok_or(format!("no socket in {v}"));
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// GPU time instance `name` has had (ns).
    fn busy_ns(&self, name: &str) -> u64 {
        self.call(&["top", "-n", "1"])
            .ok()
            .and_then(|v| {
                v["vgpus"].as_array()?.iter().find(|g| g["name"] == name)?["busy_ns"].as_u64()
            })
            .unwrap_or(0)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One migration of a VM with a `profile` vGPU (in-process, or instances of `serve`, named
/// after `run`); the source's report.
fn migrate_once(
    fw: &Path,
    dir: &Path,
    profile: &str,
    serve: Option<&Serve>,
    run: u32,
) -> Result<serde_json::Value, String> {
    let sock = dir.join("vm.api");
    let dest = format!("unix:{}", dir.join("in.sock").display());
    let _ = std::fs::remove_file(&sock);
    let ram = format!("{RAM_MIB}M");
    let (src_name, dst_name) = (format!("a{profile}-{run}"), format!("b{profile}-{run}"));
    let (vgpu_flag, vgpu, target) = match serve {
        Some(s) => {
            let a = s.create(profile, &src_name)?;
            let b = s.create(profile, &dst_name)?;
            let target = Vm::spawn(&[
                "--receive-migration",
                &dest,
                "--user-device",
                &format!("socket={b}"),
            ])?;
            ("--user-device", format!("socket={a}"), target)
        }
        None => (
            "--vgpu",
            format!("profile={profile}"),
            Vm::spawn(&["--receive-migration", &dest])?,
        ),
    };
    let source = Vm::spawn(&[
        "--kernel",
        fw.to_str().ok_or("firmware path is not UTF-8")?,
        "--cmdline",
        "run=load kind=dirty seconds=12",
        "--memory",
        &ram,
        vgpu_flag,
        &vgpu,
        "--api-socket",
        sock.to_str().ok_or("path is not UTF-8")?,
    ])?;
    source.line("tessera-fw: boot")?;
    // Migrate once the guest is writing: a second into its run.
    let deadline = Instant::now() + T;
    loop {
        let busy = match serve {
            Some(s) => s.busy_ns(&src_name) > 0,
            None => {
                sock.exists()
                    && vmctl(&sock, &["info"])
                        .is_ok_and(|i| i["vgpu_busy_ns"][0].as_u64().is_some_and(|ns| ns > 0))
            }
        };
        if busy && dir.join("in.sock").exists() {
            break;
        }
        if Instant::now() > deadline {
            return Err("the source VM never got busy".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // (A pacing delay, not synchronisation: the guest writes its slots over 12 s; 1 s in, it
    // is writing.)
    std::thread::sleep(Duration::from_secs(1));
    let reply = vmctl(&sock, &["send-migration", &dest])?;
    if reply["ok"] != true {
        return Err(format!("migration failed: {reply}"));
    }
    let done = target.line("load kind=dirty")?;
    if !done.contains("mismatches=0") {
        return Err(format!("the migrated guest found lost memory: {done}"));
    }
    drop((source, target));
    if let Some(s) = serve {
        for n in [&src_name, &dst_name] {
            // Removal waits for the instance's client to be gone.
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Err(e) = s.call(&["vgpu", "remove", n]) {
                if Instant::now() > deadline {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Ok(reply["migration"].clone())
}

pub fn run(args: MigrateArgs) -> Result<(), String> {
    let fw = args.firmware.clone().unwrap_or_else(default_firmware);
    if !fw.exists() {
        return Err(format!(
            "{} is missing (cargo xtask firmware builds it)",
            fw.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("tessera-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let serve = if args.user_device {
        Some(Serve::start(&dir.join("serve"))?)
    } else {
        None
    };
    let mut progress = Progress::new("migrate", args.profiles.len() * args.runs as usize);
    let mut rows = Vec::new();
    for profile in &args.profiles {
        let mut samples = Vec::new();
        for run in 0..args.runs {
            progress.step(format!("{profile} vGPU, run {}", run + 1));
            samples.push(migrate_once(&fw, &dir, profile, serve.as_ref(), run)?);
        }
        let med = |key: &str| {
            let v: Vec<f64> = samples
                .iter()
                .map(|s| s[key].as_f64().unwrap_or(f64::NAN))
                .collect();
            median(&v)
        };
        rows.push(Row {
            profile: profile.clone(),
            runs: args.runs,
            downtime_ms: med("downtime_us") / 1000.0,
            total_ms: med("total_ms"),
            sent_mb: med("bytes") / 1e6,
            rounds: med("rounds"),
            stopped_pages: med("stopped_pages"),
            pause_ms: med("pause_us") / 1000.0,
            last_copy_ms: med("last_copy_us") / 1000.0,
            state_ms: med("state_us") / 1000.0,
            apply_ms: med("apply_us") / 1000.0,
        });
    }
    drop(serve);
    let _ = std::fs::remove_dir_all(&dir);
    let ratio = match (rows.first(), rows.last()) {
        (Some(a), Some(b)) => b.downtime_ms / a.downtime_ms,
        _ => f64::NAN,
    };
    let report = Report {
        transport: if args.user_device {
            "vfio-user"
        } else {
            "in-process"
        },
        guest_ram_mib: RAM_MIB,
        rows,
        downtime_largest_over_smallest: ratio,
    };
    if args.json {
        return super::print_json(&report);
    }
    println!(
        "profile  downtime_ms (pause + last copy + state + apply)  total_ms  sent_MB  rounds  \
         stopped_pages"
    );
    for r in &report.rows {
        println!(
            "{:<8} {:>11.2} ({:.2} + {:.2} + {:.2} + {:.2}) {:>9.0} {:>8.0} {:>7.0} {:>14.0}",
            r.profile,
            r.downtime_ms,
            r.pause_ms,
            r.last_copy_ms,
            r.state_ms,
            r.apply_ms,
            r.total_ms,
            r.sent_mb,
            r.rounds,
            r.stopped_pages
        );
    }
    println!(
        "downtime {} / {}: {ratio:.2}",
        report.rows.last().map_or("", |r| r.profile.as_str()),
        report.rows.first().map_or("", |r| r.profile.as_str())
    );
    Ok(())
}
