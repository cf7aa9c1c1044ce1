//! `cargo xtask …`: project automation.
//!
//! - `cargo xtask demo`: build what is needed and boot the firmware guest (what it finds).
//! - `cargo xtask test`: everything CI runs: formatting, clippy, firmware and guest-kernel
//!   builds, the whole test suite.
//! - `cargo xtask firmware` / `cargo xtask guest-images`: the individual builds.
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
    eprintln!("xtask: booting the firmware guest (2 vCPUs, 64 MiB):");
    run(Command::new(bin).args(["vm", "--kernel"]).arg(fw).args([
        "--cmdline",
        "run=info",
        "--cpus",
        "2",
        "--memory",
        "64M",
    ]))
}

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "demo" => demo(),
        "test" => test(),
        "firmware" => firmware().map(|p| eprintln!("xtask: built {}", p.display())),
        "guest-images" => guest_images(),
        "deps" => apt_install(&["qemu-system-x86"]),
        _ => Err(format!(
            "unknown task {task:?}; tasks: demo, test, firmware, guest-images, deps"
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
