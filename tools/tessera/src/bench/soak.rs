//! `tessera bench soak --minutes N`: eight tenants share one `tessera serve` for N minutes,
//! every result is checked, and the server's memory, descriptors and threads are sampled.
//!
//! Tenants (each on its own instance):
//! - three firmware VMs (`tessera vm --user-device`) running `run=load` busy, bursty and
//!   long kernels, restarted every cycle (so they also come and go); each cycle must exit 0
//!   having completed its dispatches with no fault (the firmware checks every fence);
//! - a firmware VM running the conformance suite again and again (every case bit-exact);
//! - four host clients over vfio-user (`HostClient::connect`): checked work (FILL, COPY and
//!   CRC32 compared with the CPU), resets in the middle of queued work, deliberate faults,
//!   and a client that attaches, works and leaves in a loop.
//!
//! After each batch a host client checks that the fence it reads is exactly the one it
//! submitted and that the device consumed exactly the packets it queued (ring head = tail):
//! no fence lost or run twice. Server growth is the change of the median of the samples
//! from the first quarter after warm-up to the last quarter.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use vgpu::host::{HostClient, HostError};
use vgpu_abi::{Packet, fault, kernel, packet};

use super::{default_firmware, median};

/// Options.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Length of the run in minutes (fractions allowed, at least 0.25).
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Firmware PVH ELF (default: target/firmware/tessera-fw.elf).
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
}

/// Longest run of one firmware VM before it is restarted.
const CYCLE: Duration = Duration::from_secs(20);
/// Guest memory of every tenant.
const TENANT_MEMORY: u64 = 32 << 20;
/// Failures kept per tenant (the count is complete).
const KEEP_FAILURES: usize = 5;

#[derive(Debug, Default, Serialize)]
struct Tenant {
    name: &'static str,
    /// Rounds completed (a VM run, a checked batch, an attach-work-detach cycle).
    rounds: u64,
    /// Fences (or firmware dispatches) verified.
    fences: u64,
    failures: u64,
    first_failures: Vec<String>,
}

impl Tenant {
    fn fail(&mut self, why: String) {
        self.failures += 1;
        if self.first_failures.len() < KEEP_FAILURES {
            self.first_failures.push(why);
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    at_s: f64,
    /// Resident set: the server's own memory plus the client memory and VRAM pages it has
    /// touched (shared pages, which come and go with the clients).
    rss_kib: u64,
    /// The anonymous part of it: heap and stacks, where a leak would show.
    anon_kib: u64,
    fds: u64,
    threads: u64,
}

#[derive(Debug, Serialize)]
struct Growth {
    rss_kib: (f64, f64),
    rss_ratio: f64,
    anon_kib: (f64, f64),
    anon_ratio: f64,
    fds: (f64, f64),
    fds_ratio: f64,
    threads: (f64, f64),
    threads_ratio: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    minutes: f64,
    tenants: Vec<Tenant>,
    fences: u64,
    failures: u64,
    samples: usize,
    warmup_s: f64,
    growth: Option<Growth>,
    /// Every check passed and the server exited cleanly.
    ok: bool,
}

fn stop_requested(stop: &AtomicBool, deadline: Instant) -> bool {
    stop.load(Ordering::Relaxed) || Instant::now() >= deadline
}

/// Runs one firmware VM attached to `socket` with `cmdline`; returns its serial output.
fn firmware_vm(fw: &Path, socket: &str, cmdline: &str, log: &Path) -> Result<String, String> {
    let _ = std::fs::remove_file(log);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let status = Command::new(exe)
        .args(["vm", "--kernel"])
        .arg(fw)
        .args(["--memory", "64M", "--cmdline", cmdline])
        .args(["--user-device", &format!("socket={socket}")])
        .arg("--serial")
        .arg(format!("file={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot start a VM: {e}"))?;
    let out = std::fs::read_to_string(log).unwrap_or_default();
    if !status.status.success() {
        let err = String::from_utf8_lossy(&status.stderr);
        // The guest's own account: failed cases or the load's complaint, and its last words.
        let tail: Vec<&str> = out
            .lines()
            .map(str::trim_end)
            .filter(|l| (l.contains(" case ") && !l.ends_with(" ok")) || l.contains("failed"))
            .chain(out.lines().rev().take(1))
            .collect();
        let err: Vec<&str> = err.lines().filter(|l| !l.contains(" INFO ")).collect();
        return Err(format!(
            "VM `{cmdline}` exited with {}: {err:?} {tail:?}",
            status.status
        ));
    }
    Ok(out)
}

/// What a firmware VM tenant runs: `run=load kind=…` in cycles, or the conformance suite.
#[derive(Debug, Clone, Copy)]
enum Guest {
    Load(&'static str),
    Conformance,
}

/// Dispatches completed by a clean `run=load` (the firmware checked every fence).
fn check_load(kind: &str, out: &str) -> Result<u64, String> {
    let tag = format!("load kind={kind} jobs=");
    let jobs = out
        .lines()
        .find_map(|l| l.split_once(&tag).map(|(_, rest)| rest))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    match jobs {
        Some(n) if n > 0 && out.contains("faults=0") => Ok(n),
        _ => Err(format!("no clean `{kind}` load: {out:?}")),
    }
}

/// Cases of a conformance run that passed them all.
fn check_conformance(out: &str) -> Result<u64, String> {
    let cases: Vec<&str> = out
        .lines()
        .map(str::trim_end)
        .filter(|l| l.starts_with("tessera-fw: case "))
        .collect();
    let n = cases.len();
    let failed: Vec<&&str> = cases.iter().filter(|l| !l.ends_with(" ok")).collect();
    if n == 0 || !failed.is_empty() || !out.contains(&format!("conformance {n}/{n} passed")) {
        return Err(format!("conformance failed: {failed:?}"));
    }
    Ok(n as u64)
}

/// A firmware VM tenant: one VM after another until the deadline, each checked.
fn firmware_tenant(
    guest: Guest,
    fw: &Path,
    socket: &str,
    log: &Path,
    until: (Instant, &AtomicBool),
) -> Tenant {
    let mut t = Tenant::default();
    let (deadline, stop) = until;
    while !stop_requested(stop, deadline) {
        let cmdline = match guest {
            Guest::Load(kind) => {
                let secs = deadline
                    .saturating_duration_since(Instant::now())
                    .min(CYCLE)
                    .as_secs();
                if secs == 0 {
                    break;
                }
                format!("run=load kind={kind} seconds={secs}")
            }
            Guest::Conformance => "run=conformance".to_string(),
        };
        let checked = firmware_vm(fw, socket, &cmdline, log).and_then(|out| match guest {
            Guest::Load(kind) => check_load(kind, &out),
            Guest::Conformance => check_conformance(&out),
        });
        match checked {
            Ok(n) => {
                t.rounds += 1;
                t.fences += n;
            }
            Err(e) => {
                // Keep this run's serial log; the next run writes a new one.
                let _ = std::fs::rename(log, log.with_extension(format!("fail{}", t.failures)));
                t.fail(e);
            }
        }
    }
    t
}

fn fill(dst: u64, len: u64, pattern: u32) -> Packet {
    Packet::new(packet::OP_FILL, 0, &[dst, len, u64::from(pattern)])
}

/// Bytes of one checked batch.
const BATCH: u64 = 256 << 10;

/// One checked batch on `c`: FILL a buffer with `seed`, COPY it, CRC32 the copy; the CRC,
/// the copy's bytes, the fence value and the ring progress must all be exact.
fn checked_batch(c: &mut HostClient, bufs: (u64, u64, u64), seed: u32) -> Result<(), String> {
    let (a, b, crc_out) = bufs;
    let e = |what: &str, err: HostError| format!("{what}: {err}");
    let fence = c
        .submit(&[
            fill(a, BATCH, seed),
            Packet::new(packet::OP_COPY, 0, &[a, b, BATCH]),
            Packet::new(packet::OP_DISPATCH, kernel::CRC32, &[BATCH, b, crc_out]),
        ])
        .map_err(|err| e("submit", err))?;
    c.wait(fence).map_err(|err| e("batch", err))?;
    let expected: Vec<u8> = seed
        .to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(BATCH as usize)
        .collect();
    let mut copy = vec![0u8; BATCH as usize];
    c.read(b, &mut copy).map_err(|err| e("read", err))?;
    if copy != expected {
        return Err(format!("COPY of seed {seed:#x} is wrong"));
    }
    let mut crc = [0u8; 4];
    c.read(crc_out, &mut crc).map_err(|err| e("read", err))?;
    if u32::from_le_bytes(crc) != crc32fast::hash(&expected) {
        return Err(format!("CRC32 of seed {seed:#x} is wrong"));
    }
    check_fences(c, fence)
}

/// The fence in memory is exactly the last one submitted, and the device consumed exactly
/// the packets queued.
fn check_fences(c: &mut HostClient, fence: u64) -> Result<(), String> {
    let written = c
        .fence_value()
        .map_err(|e| format!("read the fence: {e}"))?;
    if written != fence {
        return Err(format!("fence {written} in memory, {fence} submitted last"));
    }
    let (head, tail) = c.ring_progress();
    if head != tail {
        return Err(format!(
            "ring head {head} != tail {tail}: packets lost or repeated"
        ));
    }
    Ok(())
}

fn attach(socket: &str) -> Result<(HostClient, (u64, u64, u64)), String> {
    let mut c = vgpu_server::remote::connect(Path::new(socket), TENANT_MEMORY, true)
        .map_err(|e| e.to_string())?;
    let bufs = (
        c.alloc(BATCH).map_err(|e| e.to_string())?,
        c.alloc(BATCH).map_err(|e| e.to_string())?,
        c.alloc(64).map_err(|e| e.to_string())?,
    );
    Ok((c, bufs))
}

#[derive(Debug, Clone, Copy)]
enum HostLoad {
    Checked,
    Resets,
    Faults,
    ComesAndGoes,
}

fn host_tenant(load: HostLoad, socket: &str, until: (Instant, &AtomicBool)) -> Tenant {
    let mut t = Tenant::default();
    let (deadline, stop) = until;
    let mut session: Option<(HostClient, (u64, u64, u64))> = None;
    let mut seed = 0x1234_5678u32 ^ load as u32;
    while !stop_requested(stop, deadline) {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        if session.is_none() {
            match attach(socket) {
                Ok(s) => session = Some(s),
                Err(e) => {
                    t.fail(format!("attach: {e}"));
                    continue;
                }
            }
        }
        let Some((c, bufs)) = session.as_mut() else {
            continue;
        };
        let before = c.fence_value().unwrap_or(0);
        let step = match load {
            HostLoad::Checked | HostLoad::ComesAndGoes => checked_batch(c, *bufs, seed),
            HostLoad::Resets => {
                // Queue long work, reset in the middle of it, then check the device works.
                let spin = Packet::new(packet::OP_DISPATCH, kernel::SPIN_US, &[2_000, 64]);
                match c.submit(&[spin]) {
                    Ok(_) => {
                        c.reset();
                        checked_batch(c, *bufs, seed)
                    }
                    Err(e) => Err(format!("submit: {e}")),
                }
            }
            HostLoad::Faults => {
                // A FILL at an unmapped VA must fault NOT_PRESENT; reset; then work again.
                match c.run(&[fill(1 << 46, 4096, seed)]) {
                    Err(HostError::Fault { code, .. }) if code == fault::NOT_PRESENT => {
                        c.reset();
                        checked_batch(c, *bufs, seed)
                    }
                    other => Err(format!("expected a NOT_PRESENT fault, got {other:?}")),
                }
            }
        };
        match step {
            Ok(()) => {
                t.rounds += 1;
                let after = c.fence_value().unwrap_or(0);
                t.fences += after.saturating_sub(before);
            }
            Err(e) => {
                t.fail(e);
                session = None;
            }
        }
        if matches!(load, HostLoad::ComesAndGoes) {
            session = None;
        }
    }
    t
}

fn sample(pid: u32, since: Instant) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample {
        at_s: since.elapsed().as_secs_f64(),
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:")?,
        threads: field("Threads:")?,
        fds,
    })
}

fn growth(samples: &[Sample], warmup_s: f64) -> Option<Growth> {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at_s >= warmup_s).collect();
    let q = after.len() / 4;
    if q < 2 {
        return None;
    }
    let (first, last) = (&after[..q], &after[after.len() - q..]);
    let pair = |f: fn(&Sample) -> u64| {
        let m = |s: &[&Sample]| median(&s.iter().map(|x| f(x) as f64).collect::<Vec<_>>());
        let (a, b) = (m(first), m(last));
        ((a, b), if a > 0.0 { b / a - 1.0 } else { 0.0 })
    };
    let (rss, rss_ratio) = pair(|s| s.rss_kib);
    let (anon, anon_ratio) = pair(|s| s.anon_kib);
    let (fds, fds_ratio) = pair(|s| s.fds);
    let (threads, threads_ratio) = pair(|s| s.threads);
    Some(Growth {
        rss_kib: rss,
        rss_ratio,
        anon_kib: anon,
        anon_ratio,
        fds,
        fds_ratio,
        threads,
        threads_ratio,
    })
}

struct ServerChild {
    child: Child,
    dir: PathBuf,
    /// Keep the directory (the server's and the VMs' logs) for a look after a failure.
    keep: bool,
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

const TENANTS: [&str; 8] = [
    "fw-busy",
    "fw-bursty",
    "fw-long",
    "fw-conformance",
    "host-checked",
    "host-resets",
    "host-faults",
    "host-comes-and-goes",
];

fn start_server(dir: &Path) -> Result<ServerChild, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let run = dir.join("run");
    let log = std::fs::File::create(dir.join("serve.log")).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
    cmd.args(["serve", "--gpu", "soft,vram=1G", "--dir"])
        .arg(&run);
    for (i, _) in TENANTS.iter().enumerate() {
        cmd.args(["--create", &format!("64M:t{i}")]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start tessera serve: {e}"))?;
    let mut server = ServerChild {
        child,
        dir: dir.to_path_buf(),
        keep: false,
    };
    // Ready once the control socket answers a request: the server binds it before it
    // creates the `--create` instances, but serves it only after (a connect alone can
    // succeed while the instance sockets do not exist yet).
    let answers = || -> std::io::Result<()> {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(run.join("control.sock"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"{\"op\":\"version\"}\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    };
    let t0 = Instant::now();
    while answers().is_err() {
        if let Ok(Some(st)) = server.child.try_wait() {
            return Err(format!("tessera serve exited with {st}"));
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err("tessera serve not ready in 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(server)
}

pub fn run(args: SoakArgs) -> Result<(), String> {
    if !(args.minutes.is_finite() && (0.25..=24.0 * 60.0).contains(&args.minutes)) {
        return Err(format!("--minutes {}: expected 0.25 to 1440", args.minutes));
    }
    let fw = args.firmware.unwrap_or_else(default_firmware);
    if !fw.exists() {
        return Err(format!(
            "firmware {} not found (cargo xtask firmware)",
            fw.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("tessera-soak-{}", std::process::id()));
    let mut server = start_server(&dir)?;
    let pid = server.child.id();
    let run_dir = dir.join("run");
    let sock = |i: usize| {
        run_dir
            .join(format!("vgpu-t{i}.sock"))
            .to_string_lossy()
            .into_owned()
    };
    let length = Duration::from_secs_f64(args.minutes * 60.0);
    let start = Instant::now();
    let deadline = start + length;
    let stop = Arc::new(AtomicBool::new(false));

    let sampler = {
        let stop = stop.clone();
        let steps = (length.as_secs() / 30).max(1) as usize;
        std::thread::spawn(move || {
            let mut out: Vec<Sample> = Vec::new();
            // A line every 30 s: how far, and the server's footprint.
            let mut progress = super::Progress::new("soak", steps);
            while !stop.load(Ordering::Relaxed) {
                if let Some(s) = sample(pid, start) {
                    if s.at_s >= 30.0 * (progress.done() + 1) as f64 && progress.done() < steps {
                        progress.step(format!(
                            "server: {} MiB resident ({} MiB anonymous), {} fds, {} threads",
                            s.rss_kib >> 10,
                            s.anon_kib >> 10,
                            s.fds,
                            s.threads
                        ));
                    }
                    out.push(s);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            out
        })
    };
    let mut threads = Vec::new();
    for (i, name) in TENANTS.iter().enumerate() {
        let (socket, fw, stop) = (sock(i), fw.clone(), stop.clone());
        let log = dir.join(format!("{name}.log"));
        threads.push(std::thread::spawn(move || {
            let until = (deadline, &*stop);
            let mut t = match *name {
                "fw-busy" => firmware_tenant(Guest::Load("busy"), &fw, &socket, &log, until),
                "fw-bursty" => firmware_tenant(Guest::Load("bursty"), &fw, &socket, &log, until),
                "fw-long" => firmware_tenant(Guest::Load("long"), &fw, &socket, &log, until),
                "fw-conformance" => firmware_tenant(Guest::Conformance, &fw, &socket, &log, until),
                "host-checked" => host_tenant(HostLoad::Checked, &socket, until),
                "host-resets" => host_tenant(HostLoad::Resets, &socket, until),
                "host-faults" => host_tenant(HostLoad::Faults, &socket, until),
                _ => host_tenant(HostLoad::ComesAndGoes, &socket, until),
            };
            t.name = name;
            t
        }));
    }
    let mut tenants: Vec<Tenant> = threads
        .into_iter()
        .map(|t| {
            t.join().unwrap_or_else(|_| {
                let mut t = Tenant::default();
                t.fail("tenant thread panicked".into());
                t
            })
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap_or_default();
    // SAFETY: kill(2) on our own child's pid: a clean stop, which must exit 0.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let exit = server.child.wait().map_err(|e| e.to_string())?;
    if !exit.success() {
        let log = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
        let mut t = Tenant {
            name: "server",
            ..Tenant::default()
        };
        t.fail(format!("tessera serve exited with {exit}: {log}"));
        tenants.push(t);
    }
    let warmup_s = (length.as_secs_f64() * 0.2)
        .max(10.0)
        .min(length.as_secs_f64() / 2.0);
    let report = Report {
        minutes: args.minutes,
        fences: tenants.iter().map(|t| t.fences).sum(),
        failures: tenants.iter().map(|t| t.failures).sum(),
        samples: samples.len(),
        warmup_s,
        growth: growth(&samples, warmup_s),
        ok: tenants.iter().all(|t| t.failures == 0),
        tenants,
    };
    if args.json {
        super::print_json(&report)?;
    } else {
        print_table(&report);
    }
    server.keep = !report.ok;
    drop(server);
    if report.ok {
        Ok(())
    } else {
        Err(format!(
            "{} failed checks (logs kept in {})",
            report.failures,
            dir.display()
        ))
    }
}

fn print_table(r: &Report) {
    println!("soak: {} min, 8 tenants on one tessera serve", r.minutes);
    println!(
        "{:<22} {:>8} {:>10} {:>9}",
        "tenant", "rounds", "fences", "failures"
    );
    for t in &r.tenants {
        println!(
            "{:<22} {:>8} {:>10} {:>9}",
            t.name, t.rounds, t.fences, t.failures
        );
        for f in &t.first_failures {
            println!("    {f}");
        }
    }
    println!("fences checked: {}, failures: {}", r.fences, r.failures);
    match &r.growth {
        Some(g) => println!(
            "server growth after {:.0} s warm-up (median first quarter -> last quarter): \
             RSS {:.0} -> {:.0} KiB ({:+.2} %; anonymous {:.0} -> {:.0} KiB, {:+.2} %), fds \
             {:.0} -> {:.0} ({:+.2} %), threads {:.0} -> {:.0} ({:+.2} %)",
            r.warmup_s,
            g.rss_kib.0,
            g.rss_kib.1,
            100.0 * g.rss_ratio,
            g.anon_kib.0,
            g.anon_kib.1,
            100.0 * g.anon_ratio,
            g.fds.0,
            g.fds.1,
            100.0 * g.fds_ratio,
            g.threads.0,
            g.threads.1,
            100.0 * g.threads_ratio
        ),
        None => println!("server growth: too few samples ({})", r.samples),
    }
}
