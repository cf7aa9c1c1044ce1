//! Helpers for the integration tests: find the binaries and guest images, run `tessera` as a
//! child process, read its serial console line by line with deadlines.
//!
//! Environment: `TESSERA_BIN` (default `target/debug/tessera`), `TESSERA_FIRMWARE` (default
//! `target/firmware/tessera-fw.elf`), `TESSERA_GUEST_DIR` (default `target/guest`),
//! `TESSERA_CLOUD_HYPERVISOR_VGPU` (default `target/cloud-hypervisor/bin/cloud-hypervisor`).
//! With `TESSERA_REQUIRE_GUESTS=1` (set by `cargo xtask test`) a missing image fails the test
//! instead of skipping it.

pub mod workload;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(default))
}

/// Serialises the tests of one binary that measure how GPU time is shared: on a 2-core host a
/// neighbouring test's vCPUs and command processors steal the CPU time that a measured VM
/// needs to keep its vGPU busy, and the shares then measure the host, not the scheduler.
/// Hold the guard for the whole test.
pub fn measuring_alone() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed neighbour poisons the lock; its failure is reported on its own.
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A session on instance `name` of `server`, over its UNIX session socket.
pub fn session(server: &Server, name: &str) -> vgpu_session::Session {
    vgpu_session::Session::connect(&format!(
        "unix:{}",
        server.dir.join(format!("vgpu-{name}.session")).display()
    ))
    .expect("open a session")
}

/// Whether this machine has a Vulkan driver (`tessera serve --gpu vulkan` can start). Without
/// one, Vulkan tests skip, unless `TESSERA_REQUIRE_VULKAN=1` (set by `cargo xtask test`).
pub fn vulkan_available() -> bool {
    let found = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
        .iter()
        .any(|d| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some()));
    assert!(
        found || std::env::var_os("TESSERA_REQUIRE_VULKAN").is_none(),
        "no Vulkan driver, and TESSERA_REQUIRE_VULKAN is set"
    );
    if !found {
        eprintln!("skipped: no Vulkan driver");
    }
    found
}

/// The `tessera` binary under test.
pub fn tessera_bin() -> PathBuf {
    let p = env_path("TESSERA_BIN", "target/debug/tessera");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p tessera` first (cargo xtask test does)",
        p.display()
    );
    p
}

/// A guest image, or `None` (test skipped, with a message) when it was not built and images
/// are not required.
pub fn guest_image(p: PathBuf, how: &str) -> Option<PathBuf> {
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("TESSERA_REQUIRE_GUESTS").is_none(),
        "{} is missing ({how})",
        p.display()
    );
    eprintln!("skipped: {} is missing ({how})", p.display());
    None
}

/// The firmware guest.
pub fn firmware() -> Option<PathBuf> {
    guest_image(
        env_path("TESSERA_FIRMWARE", "target/firmware/tessera-fw.elf"),
        "build it with `cargo xtask firmware`",
    )
}

/// Cloud Hypervisor with the vGPU built into its device manager (`--vgpu`; issue #24):
/// `TESSERA_CLOUD_HYPERVISOR_VGPU`, else the one `cargo xtask cloud-hypervisor` builds. Required
/// like a guest image under `TESSERA_REQUIRE_GUESTS`.
pub fn cloud_hypervisor_embedded() -> Option<PathBuf> {
    guest_image(
        env_path(
            "TESSERA_CLOUD_HYPERVISOR_VGPU",
            "target/cloud-hypervisor/bin/cloud-hypervisor",
        ),
        "build it with `cargo xtask cloud-hypervisor`",
    )
}

/// A file in the guest image directory.
pub fn guest_file(name: &str) -> Option<PathBuf> {
    guest_image(
        env_path("TESSERA_GUEST_DIR", "target/guest").join(name),
        "build it with `cargo xtask guest-images`",
    )
}

/// The minimal kernel's command line on PVM hosts: features the emulator cannot run are cleared
/// in the guest too, because CPUID executed by the guest kernel can bypass KVM there.
pub const MINIMAL_CMDLINE: &str =
    "console=ttyS0 noxsave clearcpuid=smap,smep,popcnt,xsave,cx16,fsgsbase,pcid nopti";

/// The minimal kernel's command line for Linux user space (tests/linux_user.rs, `tessera bench
/// boot --guest linux`): [`MINIMAL_CMDLINE`] with `erms,fsrm` cleared too (PVM's emulator then
/// copies 8 bytes per instruction, not 1) and `rodata=off` (write-protecting the kernel costs
/// ~10 s of emulated time there). Add `pvm_quirks` on PVM hosts ([`host_is_pvm`]).
pub const MINIMAL_USER_CMDLINE: &str = "console=ttyS0 noxsave \
     clearcpuid=smap,smep,popcnt,xsave,cx16,fsgsbase,pcid,erms,fsrm nopti rodata=off panic=-1";

/// Boots the minimal kernel (1 vCPU, 128 MiB, an in-process 256M vGPU) with `extra` appended
/// to [`MINIMAL_CMDLINE`]; `None` (skipped, with a message) when the kernel was not built.
pub fn spawn_minimal(extra: &str) -> Option<Vmm> {
    spawn_minimal_with(extra, &["--vgpu", "profile=256M"])
}

/// Like [`spawn_minimal`], with `device` (VM flags) giving the vGPU.
pub fn spawn_minimal_with(extra: &str, device: &[&str]) -> Option<Vmm> {
    let kernel = guest_file("vmlinux-minimal")?;
    let cmdline = format!("{MINIMAL_CMDLINE} {extra}");
    let mut args = vec![
        "vm",
        "--kernel",
        kernel.to_str()?,
        "--cmdline",
        cmdline.trim_end(),
        "--cpus",
        "1",
        "--memory",
        "128M",
    ];
    args.extend_from_slice(device);
    Some(Vmm::spawn(&args))
}

/// Boots the stock Debian kernel and initramfs with `tessera.run=<run>` and `extra` flags, on
/// hardware KVM only: `None` (the test is skipped, saying `why_pvm`) on a PVM host, or when the
/// image (or any of `needs`, files in the guest directory) was not built.
pub fn spawn_debian(run: &str, extra: &[&str], needs: &[&str], why_pvm: &str) -> Option<Vmm> {
    if host_is_pvm() {
        eprintln!(
            "skipped: host KVM is PVM (no VMX/SVM); guest ring-0 code is emulated and Linux \
             user space cannot start, so {why_pvm}"
        );
        return None;
    }
    let kernel = guest_file("debian-vmlinuz")?;
    let initramfs = guest_file("debian-initramfs.cpio.gz")?;
    for n in needs {
        guest_file(n)?;
    }
    let cmdline = format!("console=ttyS0 tessera.run={run}");
    let mut args = vec![
        "vm",
        "--kernel",
        kernel.to_str()?,
        "--initramfs",
        initramfs.to_str()?,
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    Some(Vmm::spawn(&args))
}

/// True on PVM hosts (no hardware virtualization).
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// A running `tessera` process whose stdout is read line by line.
#[derive(Debug)]
pub struct Vmm {
    child: Child,
    lines: Receiver<String>,
    stdin: Option<ChildStdin>,
    /// Every line seen so far.
    pub transcript: Vec<String>,
    started: Instant,
}

impl Vmm {
    /// Starts `tessera` with `args`; stdin is a pipe, stderr is discarded.
    pub fn spawn(args: &[&str]) -> Vmm {
        Self::spawn_with(Command::new(tessera_bin()).args(args))
    }

    /// Starts a prepared command.
    pub fn spawn_with(cmd: &mut Command) -> Vmm {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tessera");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Vmm {
            child,
            lines,
            stdin,
            transcript: Vec::new(),
            started,
        }
    }

    /// Waits for a line containing `needle`; returns the time since spawn.
    pub fn expect_line(&mut self, needle: &str, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.transcript.push(line);
                    if hit {
                        return self.started.elapsed();
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no line containing {needle:?} within {timeout:?}; output:\n{}",
                    self.transcript.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "output ended without {needle:?}; output:\n{}",
                    self.transcript.join("\n")
                ),
            }
        }
    }

    /// The lines printed within `window` (none from a paused guest): an observation window
    /// for asserting that nothing happens, not a wait for something to happen.
    pub fn lines_within(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut seen = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.transcript.push(line.clone());
            seen.push(line);
        }
        seen
    }

    /// Sends `bytes` to the guest's serial input.
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).expect("write to tessera stdin");
        stdin.flush().expect("flush");
    }

    /// Waits for the process to exit, collecting the rest of its output.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.transcript.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "tessera did not exit within {timeout:?}; output:\n{}",
                    self.transcript.join("\n")
                ),
            }
        }
        self.child.wait().expect("wait for tessera")
    }

    /// Whether any line so far contains `needle`.
    pub fn saw(&self, needle: &str) -> bool {
        self.transcript.iter().any(|l| l.contains(needle))
    }

    /// Asserts that the firmware's conformance suite ran in full (at least `min_cases` cases)
    /// and every case passed; returns the number of cases.
    pub fn assert_conformance(&self, min_cases: usize) -> usize {
        let out = self.transcript.join("\n");
        let cases: Vec<&String> = self
            .transcript
            .iter()
            .filter(|l| l.starts_with("tessera-fw: case "))
            .collect();
        assert!(
            cases.len() >= min_cases,
            "expected the full suite, got:\n{out}"
        );
        let failed: Vec<&&String> = cases.iter().filter(|l| !l.ends_with(" ok")).collect();
        assert!(failed.is_empty(), "failed cases: {failed:?}\n{out}");
        assert!(
            self.saw(&format!("conformance {0}/{0} passed", cases.len())),
            "{out}"
        );
        cases.len()
    }
}

/// The firmware with `cmdline` in a 64 MiB VM whose vGPU is the server instance at `socket`
/// (`--user-device`).
pub fn user_vm(socket: &str, cmdline: &str) -> Vmm {
    let fw = firmware().expect("firmware");
    Vmm::spawn(&[
        "vm",
        "--kernel",
        fw.to_str().expect("utf-8"),
        "--memory",
        "64M",
        "--cmdline",
        cmdline,
        "--user-device",
        &format!("socket={socket}"),
    ])
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh, empty directory for test `name` under the temporary directory (per process).
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// `tessera vmctl --api-socket SOCK ARGS…`: its status and its reply (one JSON line).
pub fn vmctl(sock: &Path, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut all = vec!["vmctl", "--api-socket", sock.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    let (status, out, err) = run_tessera(&all, &[]);
    let v = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("vmctl {args:?}: not JSON ({e}): {out}{err}"));
    (status.code(), v)
}

/// A firmware VM (`fw`) running `cmdline` with `memory` of RAM, one in-process vGPU of
/// `profile` and the control socket `sock`, past its first line.
pub fn firmware_vm(fw: &Path, cmdline: &str, memory: &str, profile: &str, sock: &Path) -> Vmm {
    firmware_vm_with(
        fw,
        cmdline,
        memory,
        &["--vgpu", &format!("profile={profile}")],
        sock,
    )
}

/// A firmware VM (`fw`) running `cmdline` with `memory` of RAM, the vGPU flags `vgpu` (an
/// in-process `--vgpu` or a `--user-device`) and the control socket `sock`, past its first
/// line.
pub fn firmware_vm_with(fw: &Path, cmdline: &str, memory: &str, vgpu: &[&str], sock: &Path) -> Vmm {
    let mut args = vec![
        "vm",
        "--kernel",
        fw.to_str().expect("utf-8"),
        "--cmdline",
        cmdline,
        "--memory",
        memory,
        "--api-socket",
        sock.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(vgpu);
    let mut vm = Vmm::spawn(&args);
    vm.expect_line("tessera-fw: boot", Duration::from_secs(120));
    vm
}

/// Waits until the VM behind the control socket `sock` reports GPU time on its first vGPU.
pub fn wait_until_vgpu_busy(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if sock.exists()
            && vmctl(sock, &["info"]).1["vgpu_busy_ns"][0]
                .as_u64()
                .is_some_and(|ns| ns > 0)
        {
            return;
        }
        assert!(Instant::now() < deadline, "the vGPU never got busy");
        std::thread::yield_now();
    }
}

/// Runs `tessera` to completion with a deadline; returns (status, stdout, stderr).
pub fn run_tessera(args: &[&str], envs: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(tessera_bin());
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run_with_deadline(cmd, Duration::from_secs(60))
}

/// Runs `cmd` with a deadline, killing it when the deadline passes.
pub fn run_with_deadline(mut cmd: Command, timeout: Duration) -> (ExitStatus, String, String) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id() as libc::pid_t;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().expect("wait");
    let _ = done_tx.send(());
    let _ = watchdog.join();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `tessera serve` child process with its own socket directory; killed and cleaned up on
/// drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// The socket directory.
    pub dir: PathBuf,
    root: PathBuf,
}

impl Server {
    /// Starts `tessera serve` with `extra` flags and waits until its control socket answers.
    pub fn start(name: &str, extra: &[&str]) -> Server {
        Self::start_with_env(name, extra, &[])
    }

    /// Like [`Server::start`], with `env` added to the server's environment.
    pub fn start_with_env(name: &str, extra: &[&str], env: &[(&str, &Path)]) -> Server {
        let root = std::env::temp_dir().join(format!("tessera-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("scratch dir");
        let dir = root.join("run");
        let log = std::fs::File::create(root.join("serve.log")).expect("log file");
        let child = Command::new(tessera_bin())
            .arg("serve")
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            // Never the host's definitions.
            .env("TESSERA_STATE_DIR", root.join("state"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tessera serve");
        let mut s = Server { child, dir, root };
        s.wait_ready(Duration::from_secs(10));
        s
    }

    /// Waits until the control socket answers a request (the server is ready: it serves the
    /// control socket only once the instances of `--create` exist) or the server exits.
    fn wait_ready(&mut self, timeout: Duration) {
        let sock = self.dir.join("control.sock");
        let deadline = Instant::now() + timeout;
        let answers = || -> std::io::Result<()> {
            use std::io::{BufRead, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&sock)?;
            s.set_read_timeout(Some(timeout))?;
            s.write_all(b"{\"op\":\"version\"}\n")?;
            let mut line = String::new();
            std::io::BufReader::new(s).read_line(&mut line)?;
            if line.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(())
        };
        while answers().is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tessera serve exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "tessera serve not ready in {timeout:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The GPU time instance `name` has had so far (`tessera top`), in ns.
    pub fn busy_ns(&self, name: &str) -> u64 {
        let stats = self.json(&["top", "-n", "1"]);
        stats["vgpus"]
            .as_array()
            .and_then(|a| a.iter().find(|g| g["name"] == name))
            .and_then(|g| g["busy_ns"].as_u64())
            .unwrap_or_else(|| panic!("no stats for {name}: {stats}"))
    }

    /// Waits (at most 120 s) until instance `name` has had more GPU time than `since` ns.
    pub fn wait_busy(&self, name: &str, since: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.busy_ns(name) <= since {
            assert!(Instant::now() < deadline, "instance {name} never got busy");
            std::thread::yield_now();
        }
    }

    /// Creates an instance of `profile` for each name; their sockets.
    pub fn instances(&self, profile: &str, names: &[&str]) -> Vec<String> {
        names
            .iter()
            .map(|n| {
                self.ok(&["vgpu", "create", "--type", profile, "--name", n])
                    .trim()
                    .to_string()
            })
            .collect()
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("serve.log")).unwrap_or_default()
    }

    /// Runs a `tessera` client command against this server (`--dir` added).
    pub fn client(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let mut cmd = Command::new(tessera_bin());
        cmd.args(args)
            .arg("--dir")
            .arg(&self.dir)
            .env("TESSERA_STATE_DIR", self.root.join("state"))
            .stdin(Stdio::null());
        run_with_deadline(cmd, Duration::from_secs(30))
    }

    /// Runs a client command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (status, out, err) = self.client(args);
        assert!(status.success(), "tessera {args:?} failed: {err}");
        out
    }

    /// Runs a client command with `--json` that must succeed; returns the parsed output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("JSON output")
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait().expect("wait for tessera serve")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the server (a crash) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The Cloud Hypervisor binary for interop tests: `CLOUD_HYPERVISOR`, else the one in
/// `../shared/bin`; `None` (the test says it is skipped) when neither exists.
pub fn cloud_hypervisor() -> Option<PathBuf> {
    let p = std::env::var_os("CLOUD_HYPERVISOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/bin/cloud-hypervisor"));
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped: no Cloud Hypervisor at {} (set CLOUD_HYPERVISOR=/path)",
            p.display()
        );
        None
    }
}
