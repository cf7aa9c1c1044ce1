//! `cargo xtask …`: project automation.
//!
//! - `cargo xtask demo`: build what is needed, run the vGPU conformance suite in the firmware
//!   guest, then four firmware VMs sharing one GPU.
//! - `cargo xtask test`: everything CI runs: formatting, clippy, firmware and guest-kernel
//!   builds, the whole test suite.
//! - `cargo xtask firmware` / `cargo xtask guest-images`: the individual builds.
//! - `cargo xtask cloud-hypervisor`: Cloud Hypervisor with the vGPU built in (issue #24), from
//!   the source archives in `../shared/src` and `contrib/cloud-hypervisor/`.
//! - `cargo xtask fuzz [TARGET] [--time S] [--jobs N]`: the libFuzzer targets under `fuzz/`.
//!
//! Each installs what it needs (apt-get, rustup components) on a fresh Debian 12, idempotently.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

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
    let started = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", describe(cmd)))?;
    if status.success() {
        // What each step costs CI, in its log.
        eprintln!(
            "xtask: done in {:.0} s: {}",
            started.elapsed().as_secs_f64(),
            describe(cmd)
        );
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

/// Cargo at the repository's root. Debug builds carry line tables only (backtraces keep their
/// file and line; no variables for a debugger): the workspace's build takes 124 s instead of
/// 147 s from scratch and 1.7 GB instead of 2.7 GB (docs/benchmarks.md). Release builds, the
/// firmware, Cloud Hypervisor and the guest tools, are unaffected.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root())
        .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only");
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

/// The one file in `dir` whose name starts with `prefix` and ends with `.tar.gz`.
fn archive(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {dir:?}: {e}"))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".tar.gz"))
        })
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(format!(
            "expected one {prefix}*.tar.gz in {dir:?}, found {n}"
        )),
    }
}

/// Writes `contents` to `path` unless it already holds them (so cargo sees no change).
fn write_if_changed(path: &Path, contents: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    std::fs::write(path, contents).map_err(|e| format!("cannot write {path:?}: {e}"))
}

/// Cloud Hypervisor with the vGPU built into its device manager (`--vgpu`), at
/// `target/cloud-hypervisor/bin/cloud-hypervisor`:
/// 1. extracts Cloud Hypervisor's and micro-http's source archives from `../shared/src` into
///    `target/cloud-hypervisor/src/` and applies `contrib/cloud-hypervisor/vgpu.patch`
///    (again only when an archive or the patch changed: a stamp records them);
/// 2. copies the adapter `contrib/cloud-hypervisor/vgpu.rs` in as
///    `vmm/src/device_manager/vgpu.rs`;
/// 3. builds `--release --features vgpu` into `target/cloud-hypervisor/target` (cargo's own
///    caching makes a second run cheap; [`ch_cargo`] says how it differs from upstream's
///    release build). Nothing but the crates registry is fetched.
fn cloud_hypervisor() -> Result<PathBuf> {
    let root = root();
    let shared = root.join("../shared/src");
    let contrib = root.join("contrib/cloud-hypervisor");
    let work = root.join("target/cloud-hypervisor");
    let src = work.join("src");
    let tree = src.join("cloud-hypervisor");
    apt_install(&["patch"])?;
    let ch = archive(&shared, "cloud-hypervisor-")?;
    let http = archive(&shared, "micro-http-")?;
    let patch = std::fs::read(contrib.join("vgpu.patch"))
        .map_err(|e| format!("cannot read the patch: {e}"))?;
    let mut stamp = Vec::new();
    for a in [&ch, &http] {
        let len = std::fs::metadata(a)
            .map_err(|e| format!("{a:?}: {e}"))?
            .len();
        stamp.extend_from_slice(format!("{} {len}\n", a.display()).as_bytes());
    }
    stamp.extend_from_slice(&patch);
    let stamp_file = work.join("stamp");
    if std::fs::read(&stamp_file).ok().as_deref() != Some(&stamp[..]) || !tree.exists() {
        let _ = std::fs::remove_file(&stamp_file);
        if src.exists() {
            std::fs::remove_dir_all(&src).map_err(|e| format!("cannot remove {src:?}: {e}"))?;
        }
        std::fs::create_dir_all(&src).map_err(|e| format!("cannot create {src:?}: {e}"))?;
        for a in [&ch, &http] {
            run(Command::new("tar").arg("xzf").arg(a).arg("-C").arg(&src))?;
        }
        run(Command::new("patch")
            .args(["-p1", "--forward", "--batch", "-i"])
            .arg(contrib.join("vgpu.patch"))
            .current_dir(&tree))?;
        // Cloud Hypervisor's one git dependency, from its archive.
        std::fs::create_dir_all(tree.join(".cargo")).map_err(|e| format!("{e}"))?;
        write_if_changed(
            &tree.join(".cargo/config.toml"),
            b"[patch.\"https://github.com/firecracker-microvm/micro-http\"]\n\
              micro_http = { path = \"../micro-http\" }\n",
        )?;
        std::fs::write(&stamp_file, &stamp).map_err(|e| format!("cannot write the stamp: {e}"))?;
    }
    let adapter =
        std::fs::read(contrib.join("vgpu.rs")).map_err(|e| format!("cannot read vgpu.rs: {e}"))?;
    std::fs::create_dir_all(tree.join("vmm/src/device_manager")).map_err(|e| format!("{e}"))?;
    write_if_changed(&tree.join("vmm/src/device_manager/vgpu.rs"), &adapter)?;
    run(ch_cargo(&work).args([
        "build",
        "--release",
        "--features",
        "vgpu",
        "--bin",
        "cloud-hypervisor",
    ]))?;
    let bin = work.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("cannot create {bin:?}: {e}"))?;
    let out = bin.join("cloud-hypervisor");
    std::fs::copy(work.join("target/release/cloud-hypervisor"), &out)
        .map_err(|e| format!("cannot copy Cloud Hypervisor: {e}"))?;
    Ok(out)
}

/// Cargo in the patched Cloud Hypervisor tree, building into `target/cloud-hypervisor/target`.
///
/// Upstream's release profile links with fat LTO in one codegen unit. Here the release
/// profile has neither (what `cargo build --release` does by default), and the unit tests
/// below build with the same profile, so they reuse every crate the binary built: CI's
/// Cloud Hypervisor steps took 546 s with upstream's profile and two test builds, 374 s this
/// way (docs/benchmarks.md). The binary is a test vehicle; LTO's speed-up of a VMM whose time
/// goes to KVM exits is not what its tests measure.
fn ch_cargo(work: &Path) -> Command {
    let mut c = cargo();
    c.current_dir(work.join("src/cloud-hypervisor"))
        .arg("--config")
        .arg("profile.release.lto=false")
        .arg("--config")
        .arg("profile.release.codegen-units=16")
        .env("OPENSSL_NO_VENDOR", "1")
        .env("CARGO_TARGET_DIR", work.join("target"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    c
}

/// Cloud Hypervisor's own unit tests for what the patch touches: its CLI (`main.rs`, whose
/// options must stay sorted), its configuration parsing and validation (`vmm::config`), and
/// the adapter's own (`vmm::device_manager::vgpu`).
/// Both test binaries build in one cargo run (in parallel), then each runs with its filter.
fn cloud_hypervisor_unit_tests() -> Result<()> {
    let work = root().join("target/cloud-hypervisor");
    // Their test dependencies link libssh2 with OpenSSL, which they would build from source
    // (minutes on 2 cores); Debian's does as well (`OPENSSL_NO_VENDOR`).
    apt_install(&["libssl-dev", "pkg-config"])?;
    // One package and feature selection for all three runs, so the runs reuse the build.
    let test = |args: &[&str]| {
        run(ch_cargo(&work)
            .args(["test", "--release", "-p", "cloud-hypervisor", "-p", "vmm"])
            .args([
                "--features",
                "cloud-hypervisor/vgpu,vmm/kvm,vmm/io_uring,vmm/vgpu",
            ])
            .args(args))
    };
    test(&["--no-run", "--bin", "cloud-hypervisor", "--lib"])?;
    test(&["--bin", "cloud-hypervisor"])?;
    test(&["--lib", "--", "config::", "device_manager::vgpu::"])
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
    // Its user space: busybox, the guest tools, libtessera and its C check (tests/linux_user.rs).
    run(Command::new("bash")
        .arg(root.join("guest-images/minimal-initramfs.sh"))
        .arg(&out))?;
    if host_is_pvm() {
        eprintln!(
            "xtask: host KVM is PVM: the stock Debian kernel cannot boot here (the minimal one \
             runs user space with pvm_quirks), so its image is not built (its test is skipped)"
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
    // The Vulkan backend's tests run on Mesa's lavapipe (a CPU Vulkan driver); its committed
    // SPIR-V is checked against its GLSL with glslangValidator.
    apt_install(&["libvulkan1", "mesa-vulkan-drivers", "glslang-tools"])?;
    // `systemd-analyze verify` checks contrib/systemd/tessera-serve.service (tests/service.rs).
    apt_install(&["systemd"])?;
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
    host_tools()?;
    // Cloud Hypervisor with the vGPU built in, for tests/tests/embedded_cloud_hypervisor.rs.
    cloud_hypervisor()?;
    cloud_hypervisor_unit_tests()?;
    run(cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("TESSERA_REQUIRE_GUESTS", "1")
        .env("TESSERA_REQUIRE_VULKAN", "1"))?;
    fuzz_harnesses()?;
    eprintln!(
        "xtask: test: all green in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// tessera-run and tessera-smi built for this host with libtessera's session transports
/// (`target/host-tools/release/`; tests/session.rs runs them over a UNIX socket and TLS).
/// The guest image's build of the same tools is static and leaves the transports out.
fn host_tools() -> Result<()> {
    let root = root();
    run(cargo()
        .current_dir(root.join("guest-images/tools"))
        .args([
            "build",
            "--release",
            "--locked",
            "--features",
            "sessions",
            "--target-dir",
        ])
        .arg(root.join("target/host-tools"))
        // Not the static linking its .cargo/config.toml asks for (that is for the guest).
        .env("RUSTFLAGS", ""))
}

fn demo() -> Result<()> {
    let fw = firmware()?;
    run(cargo().args(["build", "--release", "-p", "tessera"]))?;
    let bin = root().join("target/release/tessera");
    let dir = root().join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("xtask: one vGPU server owns the GPU (fixed-share scheduling):");
    let mut server = Command::new(&bin)
        .args([
            "--log-level",
            "warn",
            "serve",
            "--policy",
            "fixed-share",
            "--dir",
        ])
        .arg(&dir)
        .spawn()
        .map_err(|e| format!("cannot start tessera serve: {e}"))?;
    let result = demo_with_server(&bin, &fw, &dir);
    // SAFETY: kill(2) on our own child's pid; SIGTERM makes the server stop cleanly.
    unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGTERM) };
    let _ = server.wait();
    result
}

/// The demo's steps against a running server at `dir`.
fn demo_with_server(bin: &Path, fw: &Path, dir: &Path) -> Result<()> {
    let tessera = |args: &[&str]| -> Result<String> {
        let out = Command::new(bin)
            .args(args)
            .arg("--dir")
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run tessera: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tessera {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Ready when the control socket answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tessera(&["vgpu", "types"]).is_err() {
        if Instant::now() > deadline {
            return Err("tessera serve did not come up".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    print!("{}", tessera(&["vgpu", "types"])?);
    let vm = |socket: &str, cmdline: &str| {
        let mut c = Command::new(bin);
        c.args(["--log-level", "warn", "vm", "--kernel"])
            .arg(fw)
            .args(["--memory", "128M", "--cmdline", cmdline])
            .args(["--user-device", &format!("socket={}", socket.trim())]);
        c
    };

    eprintln!("xtask: a firmware VM runs the vGPU conformance suite over vfio-user:");
    let conf = tessera(&["vgpu", "create", "--type", "256M", "--name", "conformance"])?;
    run(&mut vm(&conf, "run=conformance"))?;
    tessera(&["vgpu", "remove", "conformance"])?;

    eprintln!("xtask: three VM processes share the GPU: busy (weight 1), busy (weight 3), bursty:");
    let loads = [
        ("busy1", "busy", "1"),
        ("busy3", "busy", "3"),
        ("bursty", "bursty", "1"),
    ];
    let mut children = Vec::new();
    for (name, kind, weight) in loads {
        let sock = tessera(&[
            "vgpu", "create", "--type", "64M", "--name", name, "--weight", weight,
        ])?;
        let child = vm(&sock, &format!("run=load kind={kind} seconds=3"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start a VM: {e}"))?;
        children.push((name, child));
    }
    // Measure from when every VM is attached.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list: Listed = parse_json(&tessera(&["vgpu", "list", "--json"])?)?;
        let attached = list.instances.iter().all(|i| i.attached);
        if attached || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    print!("{}", tessera(&["vgpu", "list"])?);
    let busy = |stats: &str| -> Result<Vec<(String, f64)>> {
        let s: Stats = parse_json(stats)?;
        Ok(s.vgpus
            .into_iter()
            .map(|g| (g.name, g.busy_ns as f64))
            .collect())
    };
    let before = busy(&tessera(&["top", "--json", "-n", "1"])?)?;
    let mut failed = Vec::new();
    for (name, child) in children {
        let out = child
            .wait_with_output()
            .map_err(|e| format!("VM {name}: {e}"))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.contains("load ") {
                println!("{name:>8}: {line}");
            }
        }
        if !out.status.success() {
            failed.push(name);
        }
    }
    let after = busy(&tessera(&["top", "--json", "-n", "1"])?)?;
    let delta: Vec<(String, f64)> = after
        .iter()
        .map(|(n, b)| {
            let b0 = before.iter().find(|(m, _)| m == n).map_or(0.0, |x| x.1);
            (n.clone(), b - b0)
        })
        .collect();
    let total: f64 = delta.iter().map(|d| d.1).sum();
    println!(
        "GPU-time share while all three ran (fixed-share, weights 1:3:1, bursty idles half the time):"
    );
    for (n, d) in &delta {
        println!("  {n:<8} {:>5.1} %", 100.0 * d / total.max(1.0));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("VMs failed: {failed:?}"))
    }
}

/// The parts of `tessera vgpu list --json` and `tessera top --json` the demo reads (the
/// server's `ListReply` and `StatsReply`; xtask does not build the server's crate).
#[derive(serde::Deserialize)]
struct Listed {
    instances: Vec<Attached>,
}

#[derive(serde::Deserialize)]
struct Attached {
    attached: bool,
}

#[derive(serde::Deserialize)]
struct Stats {
    vgpus: Vec<Busy>,
}

#[derive(serde::Deserialize)]
struct Busy {
    name: String,
    busy_ns: u64,
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| format!("tessera printed unexpected JSON ({e}): {text}"))
}

/// The fuzz harnesses on stable, without libFuzzer (their own workspace): formatting, clippy,
/// their unit tests, and every checked-in seed replayed through its target's oracles once.
/// They build into the main workspace's `target/`, so the crates whose versions and features
/// match are not built twice (all but 16 of about 110; cargo-fuzz's own builds stay in
/// `fuzz/target`).
fn fuzz_harnesses() -> Result<()> {
    let root = root();
    let manifest = root.join("fuzz/Cargo.toml");
    let fuzz_cargo = |args: &[&str]| {
        let mut c = cargo();
        c.args(args)
            .arg("--manifest-path")
            .arg(&manifest)
            .env("CARGO_TARGET_DIR", root.join("target"));
        c
    };
    run(fuzz_cargo(&["fmt"]).args(["--", "--check"]))?;
    run(fuzz_cargo(&["clippy", "--lib", "--examples", "--tests"]).args(["--", "-D", "warnings"]))?;
    run(&mut fuzz_cargo(&["test", "--lib"]))?;
    run(fuzz_cargo(&["run", "--example", "seeds"]).args(["--", "--check"]))
}

/// The cargo-fuzz targets under `fuzz/`.
const FUZZ_TARGETS: [&str; 6] = [
    "bar0_registers",
    "command_stream",
    "page_tables",
    "pci_config",
    "vfio_user_messages",
    "session_messages",
];

/// `cargo xtask fuzz [TARGET] [--time S] [--jobs N]`: runs every fuzz target (or one) for S
/// seconds (default 60) with libFuzzer on nightly, installing nightly and cargo-fuzz when
/// missing. `--jobs N` runs N fuzzer processes of each target side by side (default 1): a
/// target whose inputs mostly wait on the device's threads (`command_stream`) leaves a core
/// idle with one. New inputs go to `target/fuzz/corpus/<target>` (the checked-in seeds in
/// `fuzz/corpus/<target>` are read, never written), crashes to `target/fuzz/artifacts`, each
/// process's output to `target/fuzz/<target>.log` (`<target>.<k>.log` with several jobs).
/// Sanitizer: none (safe Rust; debug assertions and the targets' invariants are the oracle),
/// `TESSERA_FUZZ_SANITIZER=address` to change it.
fn fuzz(args: &[String]) -> Result<()> {
    let mut time = 60u64;
    let mut jobs = 1u64;
    let mut targets: Vec<&str> = Vec::new();
    let mut it = args.iter();
    let positive = |flag: &str, v: Option<&String>| -> Result<u64> {
        let v = v.ok_or(format!("{flag} needs a number"))?;
        v.parse()
            .ok()
            .filter(|&t| t > 0)
            .ok_or(format!("{flag}: {v:?} is not a positive number"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => time = positive("--time", it.next())?,
            "--jobs" => {
                jobs = Some(positive("--jobs", it.next())?)
                    .filter(|&j| j <= 64)
                    .ok_or("--jobs: at most 64")?;
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
        let logs: Vec<PathBuf> = match jobs {
            1 => vec![work.join(format!("{t}.log"))],
            n => (1..=n).map(|k| work.join(format!("{t}.{k}.log"))).collect(),
        };
        eprintln!(
            "xtask: fuzz {t} for {time} s, {jobs} process(es) (output: {})",
            logs.iter()
                .map(|l| l.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let started = Instant::now();
        let mut children = Vec::new();
        for log_path in &logs {
            let log = std::fs::File::create(log_path)
                .map_err(|e| format!("cannot create {log_path:?}: {e}"))?;
            let err_log = log
                .try_clone()
                .map_err(|e| format!("cannot duplicate the log file: {e}"))?;
            let child = nightly_cargo()
                .args(["fuzz", "run", "-s", &sanitizer, t])
                .arg(&corpus)
                .arg(root.join("fuzz/corpus").join(t))
                .arg("--")
                .arg(format!("-max_total_time={time}"))
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                .args(["-timeout=60", "-print_final_stats=1"])
                .stdout(log)
                .stderr(err_log)
                .spawn()
                .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
            children.push(child);
        }
        let mut execs = 0;
        let mut problems = Vec::new();
        for (mut child, log_path) in children.into_iter().zip(&logs) {
            let status = child
                .wait()
                .map_err(|e| format!("cannot wait for cargo fuzz: {e}"))?;
            let text = std::fs::read_to_string(log_path).unwrap_or_default();
            execs += text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if !status.success() {
                let crash = text
                    .lines()
                    .find_map(|l| l.split("Test unit written to ").nth(1))
                    .map_or_else(|| format!("see {}", log_path.display()), str::to_string);
                problems.push(format!("{status}: {crash}"));
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let rate = (execs as f64 / secs) as u64;
        let corpus_size = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        let outcome = if problems.is_empty() {
            "ok".to_string()
        } else {
            failed.push(t);
            format!("FAILED ({})", problems.join("; "))
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

/// `cargo xtask --help`.
const HELP: &str = "\
usage: cargo xtask TASK
  demo          build everything and run the demo (a VM with a vGPU, a shared GPU, the server)
  test          what CI runs: formatting, clippy, the guest images, every test, the fuzz harnesses
  firmware      build target/firmware/tessera-fw.elf
  cloud-hypervisor
                build Cloud Hypervisor with the vGPU built in (target/cloud-hypervisor/bin/)
  guest-images  build the Linux guests into target/guest/
  deps          install what the benchmarks need (qemu-system-x86)
  fuzz [TARGET] [--time S] [--jobs N]
                run the cargo-fuzz targets (nightly)";

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "-h" | "--help" | "help" => {
            println!("{HELP}");
            Ok(())
        }
        "demo" => demo(),
        "test" => test(),
        "firmware" => firmware().map(|p| eprintln!("xtask: built {}", p.display())),
        "guest-images" => guest_images(),
        "cloud-hypervisor" => cloud_hypervisor().map(|p| eprintln!("xtask: built {}", p.display())),
        "deps" => apt_install(&["qemu-system-x86"]),
        "fuzz" => fuzz(&std::env::args().skip(2).collect::<Vec<_>>()),
        _ => Err(format!("unknown task {task:?}\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
