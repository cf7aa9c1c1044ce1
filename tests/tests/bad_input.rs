//! Bad input from the user: one clear line on stderr, status 2 (usage) or 1 (host), never a
//! panic or a backtrace.

use std::path::PathBuf;

use tessera_tests::{firmware, run_tessera};

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("tessera-bad-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write scratch file");
        p.to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `tessera vm` with `args` and checks the one-line error contract.
fn expect_error(args: &[&str], envs: &[(&str, &str)], code: i32, needle: &str) {
    let (status, out, err) = run_tessera(args, envs);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(status.code(), Some(code), "args {args:?}: stderr {err:?}");
    assert_eq!(
        lines.len(),
        1,
        "one line on stderr for {args:?}, got {err:?}"
    );
    assert!(lines[0].starts_with("tessera: "), "{err:?}");
    assert!(lines[0].contains(needle), "{needle:?} not in {err:?}");
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!err.contains(bad), "{err:?}");
    }
    assert!(out.is_empty(), "no guest output expected: {out:?}");
}

fn fw() -> Option<String> {
    firmware().map(|p| p.to_string_lossy().into_owned())
}

#[test]
fn missing_unreadable_and_non_kernels() {
    let s = Scratch::new("kernels");
    expect_error(
        &["vm", "--kernel", "/nonexistent/vmlinux"],
        &[],
        2,
        "cannot open kernel /nonexistent/vmlinux: No such file or directory",
    );
    let dir = s.0.to_string_lossy().into_owned();
    expect_error(&["vm", "--kernel", &dir], &[], 2, "cannot open kernel");
    let text = s.file("notes.txt", &b"this is not a kernel\n".repeat(100));
    expect_error(&["vm", "--kernel", &text], &[], 2, "is not a kernel");
    let tiny = s.file("tiny", b"\x7fELF");
    expect_error(&["vm", "--kernel", &tiny], &[], 2, "is not a kernel");
    let empty = s.file("empty", b"");
    expect_error(&["vm", "--kernel", &empty], &[], 2, "is not a kernel");
}

#[test]
fn truncated_elf() {
    let Some(fw) = fw() else { return };
    let s = Scratch::new("truncated");
    let bytes = std::fs::read(&fw).expect("firmware");
    // Headers intact, segments cut off.
    let cut = s.file("cut.elf", &bytes[..bytes.len().min(600)]);
    expect_error(&["vm", "--kernel", &cut], &[], 2, "cannot load kernel");
}

#[test]
fn initramfs_that_does_not_fit_or_is_missing() {
    let Some(fw) = fw() else { return };
    let s = Scratch::new("initramfs");
    let big = s.0.join("huge.cpio");
    let f = std::fs::File::create(&big).expect("create");
    f.set_len(100 << 20).expect("sparse file");
    let big = big.to_string_lossy().into_owned();
    expect_error(
        &[
            "vm",
            "--kernel",
            &fw,
            "--memory",
            "64M",
            "--initramfs",
            &big,
        ],
        &[],
        2,
        "does not fit",
    );
    expect_error(
        &["vm", "--kernel", &fw, "--initramfs", "/nonexistent/initrd"],
        &[],
        2,
        "cannot open initramfs",
    );
}

#[test]
fn bad_memory_cpus_and_serial_values() {
    let fw = fw().unwrap_or_else(|| "/nonexistent".into());
    for (flag, value, needle) in [
        ("--memory", "garbage", "bad size"),
        ("--memory", "size=", "bad size"),
        ("--memory", "0", "too small"),
        ("--memory", "1M", "too small"),
        ("--memory", "size=64M,shared=maybe", "only shared=on"),
        ("--memory", "size=64M,shared=off", "always shared"),
        ("--cpus", "boot=1,max=2", "no CPU hotplug"),
        ("--serial", "socket=/tmp/s", "not supported"),
        ("--console", "tty", "no virtio console"),
        ("--user-device", "socket=/tmp/s,id=a b", "letters, digits"),
        ("--memory", "4T", "too large"),
        ("--cpus", "0", "at least 1 vCPU"),
        ("--cpus", "boot=0", "at least 1 vCPU"),
        ("--cpus", "300", "more than 254"),
        ("--cpus", "two", "bad vCPU count"),
        ("--cpus", "boot=1,hide=warp-drive", "unknown CPUID feature"),
        ("--serial", "pty", "not supported"),
        ("--serial", "file=", "unknown value"),
    ] {
        expect_error(&["vm", "--kernel", &fw, flag, value], &[], 2, needle);
    }
    expect_error(&["vm"], &[], 2, "--kernel");
    expect_error(&["vm", "--kernel", &fw, "--bogus"], &[], 2, "--bogus");
}

#[test]
fn kvm_absent_or_not_kvm() {
    let Some(fw) = fw() else { return };
    expect_error(
        &["vm", "--kernel", &fw],
        &[("TESSERA_KVM_DEVICE", "/nonexistent/kvm")],
        1,
        "cannot open /nonexistent/kvm",
    );
    expect_error(
        &["vm", "--kernel", &fw],
        &[("TESSERA_KVM_DEVICE", "/dev/null")],
        1,
        "/dev/null is not a KVM device",
    );
}

#[test]
fn kvm_not_accessible_to_an_unprivileged_user() {
    let Some(fw) = fw() else { return };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/usr/bin/setpriv").exists() {
        eprintln!("skipped: needs root and setpriv to run tessera as an unprivileged user");
        return;
    }
    let bin = tessera_tests::tessera_bin();
    let s = Scratch::new("nobody");
    // Copies readable by anyone, outside a possibly private checkout.
    let bin_copy = s.0.join("tessera");
    std::fs::copy(&bin, &bin_copy).expect("copy binary");
    let fw_copy = s.0.join("fw.elf");
    std::fs::copy(&fw, &fw_copy).expect("copy firmware");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&s.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut cmd = std::process::Command::new("/usr/bin/setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin_copy)
        .args(["vm", "--kernel"])
        .arg(&fw_copy)
        .stdin(std::process::Stdio::null());
    let (status, _out, err) =
        tessera_tests::run_with_deadline(cmd, std::time::Duration::from_secs(60));
    if std::fs::metadata("/dev/kvm")
        .map(|m| m.permissions().mode() & 0o006 == 0o006)
        .unwrap_or(false)
    {
        eprintln!("skipped: /dev/kvm is world-accessible here");
        return;
    }
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot open /dev/kvm"), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
}

fn mkfifo(p: &std::path::Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: `c` is a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Like [`expect_error`], but a hang (the old behaviour for a FIFO) fails in seconds.
fn expect_prompt_error(args: &[&str], code: i32, needle: &str) {
    let mut cmd = std::process::Command::new(tessera_tests::tessera_bin());
    cmd.args(args).stdin(std::process::Stdio::null());
    let (status, _out, err) =
        tessera_tests::run_with_deadline(cmd, std::time::Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(code),
        "args {args:?}: {status}, stderr {err:?}"
    );
    assert_eq!(err.lines().count(), 1, "one line for {args:?}: {err:?}");
    assert!(
        err.starts_with("tessera: ") && err.contains(needle),
        "{needle:?} not in {err:?}"
    );
}

#[test]
fn files_that_are_not_regular_files_are_refused_at_once() {
    let fw = fw().unwrap_or_else(|| "/nonexistent".into());
    let s = Scratch::new("kinds");
    let fifo = s.0.join("fifo");
    mkfifo(&fifo);
    let sock = s.0.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let (fifo, sock) = (
        fifo.to_string_lossy().into_owned(),
        sock.to_string_lossy().into_owned(),
    );
    let dir = s.0.to_string_lossy().into_owned();
    // (what it is, path, the phrase of the error)
    let kinds = [
        (
            "FIFO",
            fifo.as_str(),
            "a FIFO (named pipe), not a regular file",
        ),
        ("socket", sock.as_str(), "a socket, not a regular file"),
        ("directory", dir.as_str(), "a directory, not a regular file"),
        (
            "device",
            "/dev/zero",
            "a character device, not a regular file",
        ),
    ];
    for (what, path, phrase) in kinds {
        let msg = format!("cannot open kernel {path}: it is {phrase}");
        eprintln!("kernel: {what}");
        expect_prompt_error(&["vm", "--kernel", path], 2, &msg);
        let Some(_) = firmware() else { continue };
        let msg = format!("cannot open initramfs {path}: it is {phrase}");
        eprintln!("initramfs: {what}");
        expect_prompt_error(&["vm", "--kernel", &fw, "--initramfs", path], 2, &msg);
    }
    // Serial output: a FIFO nobody reads and a directory are refused, not waited on.
    for (path, phrase) in [
        (fifo.as_str(), "a FIFO (named pipe) that nobody reads"),
        (dir.as_str(), "a directory"),
    ] {
        let serial = format!("file={path}");
        expect_prompt_error(&["vm", "--kernel", &fw, "--serial", &serial], 2, phrase);
    }
}

#[test]
fn more_devices_than_pci_slots_is_a_usage_error() {
    let fw = fw().unwrap_or_else(|| "/nonexistent".into());
    let mut args = vec!["vm", "--kernel", fw.as_str()];
    for _ in 0..40 {
        args.extend(["--vgpu", "profile=64M"]);
    }
    expect_prompt_error(
        &args,
        2,
        "40 PCI devices (--vgpu and --user-device) but the PCI bus has 31 free slots",
    );
}

/// A `--json` command that fails says why on stdout too, as JSON a script can parse.
#[test]
fn json_failures_are_json_on_stdout() {
    for args in [
        &["vgpu", "--dir", "/nonexistent/tessera", "--json", "list"][..],
        &["top", "--dir", "/nonexistent/tessera", "--json", "-n", "1"][..],
    ] {
        let (status, out, err) = run_tessera(args, &[]);
        assert!(!status.success(), "{args:?}");
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out:?}"));
        assert_eq!(
            (&v["ok"], &v["schema"]),
            (&false.into(), &1.into()),
            "{out}"
        );
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(!msg.is_empty() && err.contains(msg), "{out} / {err}");
    }
}

#[test]
fn bad_serve_flags_are_usage_errors() {
    for (flag, value, needle) in [
        ("--watchdog", "5ms", "the watchdog must be 10ms..=600s"),
        ("--watchdog", "soon", "expected a duration like 4s or 300ms"),
        ("--slice", "31ms", "the slice must be 1ms..=30ms"),
        ("--gpu", "soft,vram=1K", "at least 64M"),
    ] {
        let (status, _out, err) =
            run_tessera(&["serve", "--dir", "/nonexistent/x", flag, value], &[]);
        assert_eq!(status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(needle), "{flag} {value}: {err}");
    }
}

#[test]
fn untrusted_sockets_and_directories_are_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to make files of other users");
        return;
    }
    let fw = fw().unwrap_or_else(|| "/nonexistent".into());
    let s = Scratch::new("trust");
    // A socket another user made (a fake server): refused before anything is sent to it.
    let fake = s.0.join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fake).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    std::os::unix::fs::chown(&fake, Some(65534), None).expect("chown");
    let fake = fake.to_string_lossy().into_owned();
    let dev = format!("socket={fake}");
    expect_prompt_error(
        &["vm", "--kernel", &fw, "--user-device", &dev],
        2,
        "refusing the vGPU socket: ",
    );
    let (_, _, err) = run_tessera(&["vm", "--kernel", &fw, "--user-device", &dev], &[]);
    assert!(
        err.contains("belongs to uid 65534, which is not trusted here"),
        "{err}"
    );
    assert!(
        listener.accept().is_err(),
        "the VMM connected to an untrusted socket"
    );
    // Trusting that user explicitly gets past the check (and on to talking to it).
    let (_, _, err) = run_tessera(
        &[
            "vm",
            "--kernel",
            &fw,
            "--user-device",
            &format!("{dev},owner=65534"),
        ],
        &[],
    );
    assert!(!err.contains("refusing the vGPU socket"), "{err}");
    // Not a socket at all.
    let file = s.file("plain", b"x");
    expect_prompt_error(
        &[
            "vm",
            "--kernel",
            &fw,
            "--user-device",
            &format!("socket={file}"),
        ],
        2,
        "is not a socket",
    );
    // `serve --dir` that another user made first.
    let theirs = s.0.join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::os::unix::fs::chown(&theirs, Some(65534), None).expect("chown");
    let theirs = theirs.to_string_lossy().into_owned();
    expect_prompt_error(
        &["serve", "--dir", &theirs],
        2,
        "refusing socket directory: ",
    );
}
