//! `cargo xtask …`: project automation.
//!
//! - `cargo xtask demo`: build what is needed, run the vGPU conformance suite in the firmware
//!   guest, then four firmware VMs sharing one GPU.
//! - `cargo xtask test`: everything CI runs: formatting, clippy, firmware and guest-kernel
//!   builds, the whole test suite.
//! - `cargo xtask firmware` / `cargo xtask guest-images`: the individual builds.
//! - `cargo xtask fuzz [TARGET] [--time S]`: the libFuzzer targets under `fuzz/`.
//!
//! Each installs what it needs (apt-get, rustup components) on a fresh Debian 12, idempotently.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

type Result<T> = std::result::Result<T, String>;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", describe(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} failed with {status}", describe(cmd)))
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian packages that are missing (apt-get update only when something is).
fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn firmware() -> Result<PathBuf> {
    let root = root();
    let out_dir = root.join("target/firmware");
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("cannot create {out_dir:?}: {e}"))?;
    let mut c = cargo();
    c.current_dir(root.join("firmware"))
        .args([
            "build",
            "--release",
            "--target-dir",
            "../target/firmware-build",
        ])
        // The workspace's flags must not leak into the bare-metal build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run(&mut c)?;
    let elf = out_dir.join("tessera-fw.elf");
    std::fs::copy(root.join("target/firmware-build/release/tessera-fw"), &elf)
        .map_err(|e| format!("cannot copy the firmware ELF: {e}"))?;
    Ok(elf)
}

fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn guest_images() -> Result<()> {
    let root = root();
    let out = root.join("target/guest");
    run(Command::new("bash")
        .arg(root.join("guest-images/minimal-kernel.sh"))
        .arg(&out))?;
    if host_is_pvm() {
        eprintln!(
            "xtask: host KVM is PVM: Linux user space cannot start here, so the stock Debian \
             image is not built (its test is skipped)"
        );
    } else {
        // The tessera_vgpu module, libtessera and the guest tools go into the image.
        run(Command::new("bash")
            .arg(root.join("guest-images/guest-tools.sh"))
            .arg(&out))?;
        run(Command::new("bash")
            .arg(root.join("guest-images/debian-image.sh"))
            .arg(&out)
            .env("EXTRA_DIR", out.join("extra")))?;
    }
    Ok(())
}

fn test() -> Result<()> {
    let started = Instant::now();
    if !have("cargo-clippy") || !have("rustfmt") {
        run(Command::new("rustup").args(["component", "add", "clippy", "rustfmt"]))?;
    }
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo()
        .current_dir(root().join("firmware"))
        .args(["fmt", "--", "--check"]))?;
    firmware()?;
    guest_images()?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    run(cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("TESSERA_REQUIRE_GUESTS", "1"))?;
    eprintln!(
        "xtask: test: all green in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn demo() -> Result<()> {
    let fw = firmware()?;
    run(cargo().args(["build", "--release", "-p", "tessera"]))?;
    let bin = root().join("target/release/tessera");
    eprintln!(
        "xtask: the firmware guest with a vGPU runs the conformance suite (2 vCPUs, 256 MiB):"
    );
    run(Command::new(&bin)
        .args(["vm", "--kernel"])
        .arg(&fw)
        .args([
            "--cmdline",
            "run=conformance",
            "--cpus",
            "2",
            "--memory",
            "256M",
        ])
        .args(["--vgpu", "profile=256M"]))?;
    eprintln!("xtask: four firmware VMs share one GPU, weights 1:2:4:8:");
    run(Command::new(&bin)
        .args(["--log-level", "warn", "bench", "vms", "--firmware"])
        .arg(&fw)
        .args(["--loads", "busy,busy,busy,busy", "--weights", "1,2,4,8"])
        .args(["--policy", "fixed-share", "--seconds", "2"]))
}

/// The cargo-fuzz targets under `fuzz/`.
const FUZZ_TARGETS: [&str; 4] = [
    "bar0_registers",
    "command_stream",
    "page_tables",
    "pci_config",
];

/// `cargo xtask fuzz [TARGET] [--time S]`: runs every fuzz target (or one) for S seconds
/// (default 60) with libFuzzer on nightly, installing nightly and cargo-fuzz when missing.
/// New inputs go to `target/fuzz/corpus/<target>` (the checked-in seeds in
/// `fuzz/corpus/<target>` are read, never written), crashes to `target/fuzz/artifacts`, each
/// run's output to `target/fuzz/<target>.log`. Sanitizer: none (safe Rust; debug assertions and
/// the targets' invariants are the oracle), `TESSERA_FUZZ_SANITIZER=address` to change it.
fn fuzz(args: &[String]) -> Result<()> {
    let mut time = 60u64;
    let mut targets: Vec<&str> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => {
                let v = it.next().ok_or("--time needs a number of seconds")?;
                time = v
                    .parse()
                    .ok()
                    .filter(|&t| t > 0)
                    .ok_or(format!("--time: {v:?} is not a positive number of seconds"))?;
            }
            t => match FUZZ_TARGETS.iter().find(|&&k| k == t) {
                Some(k) => targets.push(k),
                None => {
                    return Err(format!(
                        "unknown fuzz target {t:?}; targets: {}",
                        FUZZ_TARGETS.join(", ")
                    ));
                }
            },
        }
    }
    if targets.is_empty() {
        targets = FUZZ_TARGETS.to_vec();
    }
    let nightly = || {
        Command::new("rustup")
            .args(["run", "nightly", "rustc", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !nightly() {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    // Through rustup's `cargo` proxy (`CARGO` is this stable toolchain's own binary, which
    // knows no `+nightly`), without the outer build's flags.
    let nightly_cargo = || {
        let mut c = Command::new("cargo");
        c.arg("+nightly")
            .current_dir(root())
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        c
    };
    let have_fuzz = nightly_cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fuzz {
        run(nightly_cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let sanitizer = std::env::var("TESSERA_FUZZ_SANITIZER").unwrap_or_else(|_| "none".into());
    let root = root();
    let work = root.join("target/fuzz");
    run(nightly_cargo().args(["fuzz", "build", "-s", &sanitizer]))?;
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for t in targets {
        let corpus = work.join("corpus").join(t);
        let artifacts = work.join("artifacts").join(t);
        for d in [&corpus, &artifacts] {
            std::fs::create_dir_all(d).map_err(|e| format!("cannot create {d:?}: {e}"))?;
        }
        let log_path = work.join(format!("{t}.log"));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("cannot create {log_path:?}: {e}"))?;
        let err_log = log
            .try_clone()
            .map_err(|e| format!("cannot duplicate the log file: {e}"))?;
        eprintln!(
            "xtask: fuzz {t} for {time} s (output: {})",
            log_path.display()
        );
        let started = Instant::now();
        let status = nightly_cargo()
            .args(["fuzz", "run", "-s", &sanitizer, t])
            .arg(&corpus)
            .arg(root.join("fuzz/corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={time}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args(["-timeout=60", "-print_final_stats=1"])
            .stdout(log)
            .stderr(err_log)
            .status()
            .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let stat = |key: &str| {
            text.lines()
                .rev()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let execs = stat("stat::number_of_executed_units:").unwrap_or(0);
        let secs = started.elapsed().as_secs_f64();
        let rate = stat("stat::average_exec_per_sec:").unwrap_or((execs as f64 / secs) as u64);
        let corpus_size = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        let outcome = if status.success() {
            "ok".to_string()
        } else {
            let crash = text
                .lines()
                .find_map(|l| l.split("Test unit written to ").nth(1))
                .unwrap_or("see the log");
            failed.push(t);
            format!("FAILED ({status}): {crash}")
        };
        eprintln!(
            "xtask: fuzz {t}: {execs} executions in {secs:.0} s ({rate} exec/s), corpus {corpus_size}, {outcome}"
        );
        results.push((t, execs, rate, outcome));
    }
    println!(
        "{:<16} {:>12} {:>8}  result",
        "target", "executions", "exec/s"
    );
    for (t, execs, rate, outcome) in &results {
        println!("{t:<16} {execs:>12} {rate:>8}  {outcome}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzzing found problems in: {}", failed.join(", ")))
    }
}

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "demo" => demo(),
        "test" => test(),
        "firmware" => firmware().map(|p| eprintln!("xtask: built {}", p.display())),
        "guest-images" => guest_images(),
        "deps" => apt_install(&["qemu-system-x86"]),
        "fuzz" => fuzz(&std::env::args().skip(2).collect::<Vec<_>>()),
        _ => Err(format!(
            "unknown task {task:?}; tasks: demo, test, firmware, guest-images, deps, fuzz"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
