//! `tessera serve` as a service: systemd readiness (sd_notify), timestamped log lines for what
//! an operator needs to know, `--log-file`, and the systemd unit in contrib/systemd.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tessera_tests::{Server, tessera_bin};

/// Started with `NOTIFY_SOCKET`, the server says `READY=1` once its sockets listen; its log
/// file has a timestamped line for start, instance create and remove, policy change and the
/// signal that stopped it.
#[test]
fn the_server_notifies_readiness_and_logs_what_happens() {
    let scratch = std::env::temp_dir().join(format!("tessera-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let notify = scratch.join("notify.sock");
    let systemd = UnixDatagram::bind(&notify).expect("the service manager's socket");
    systemd
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let log_file = scratch.join("tessera.log");
    let server = Server::start_with_env(
        "service",
        &["--log-file", log_file.to_str().expect("utf-8")],
        &[("NOTIFY_SOCKET", notify.as_path())],
    );
    let mut buf = [0u8; 64];
    let n = systemd.recv(&mut buf).expect("a notification");
    assert_eq!(&buf[..n], b"READY=1\n");

    server.ok(&["vgpu", "create", "--type", "64M", "--name", "svc"]);
    server.ok(&["vgpu", "policy", "fixed-share", "--slice", "3ms"]);
    server.ok(&["vgpu", "remove", "svc"]);
    let status = server.stop();
    assert!(status.success(), "{status}");

    let log = std::fs::read_to_string(&log_file).expect("the log file");
    let lines: Vec<&str> = log.lines().collect();
    for line in &lines {
        assert!(has_timestamp(line), "no RFC 3339 UTC timestamp: {line:?}");
    }
    for what in [
        "vGPU server ready",
        "vGPU instance created name=\"svc\"",
        "policy changed policy=fixed-share slice_ms=3",
        "vGPU instance removed name=\"svc\"",
        "vGPU server stopping signal=\"SIGTERM\"",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(what)),
            "no {what:?} in:\n{log}"
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// `2026-12-06T19:13:22.095255Z  INFO …`
fn has_timestamp(line: &str) -> bool {
    let Some((stamp, _)) = line.split_once(' ') else {
        return false;
    };
    let b = stamp.as_bytes();
    stamp.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && stamp.ends_with('Z')
        && b[..4].iter().all(u8::is_ascii_digit)
}

/// A log file that cannot be opened is a usage error, said in one line.
#[test]
fn an_unwritable_log_file_is_a_usage_error() {
    let out = Command::new(tessera_bin())
        .args([
            "--log-file",
            "/nonexistent/dir/tessera.log",
            "vgpu",
            "types",
        ])
        .output()
        .expect("run tessera");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--log-file /nonexistent/dir/tessera.log"),
        "{err}"
    );
}

/// contrib/systemd/tessera-serve.service passes `systemd-analyze verify` (with its ExecStart
/// pointed at the binary under test, which must exist for the check), without a warning.
#[test]
fn the_systemd_unit_verifies() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("skipped: no systemd-analyze (Debian package systemd)");
        return;
    }
    let unit =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd/tessera-serve.service");
    let text = std::fs::read_to_string(&unit).expect("the unit file");
    assert!(
        text.contains("ExecStart=/usr/local/bin/tessera serve"),
        "{text}"
    );
    let dir = std::env::temp_dir().join(format!("tessera-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let copy = dir.join("tessera-serve.service");
    let bin = tessera_bin();
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/tessera", bin.to_str().expect("utf-8")),
    )
    .expect("write the unit");
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.trim().is_empty(), "warnings: {said}");
    let _ = std::fs::remove_dir_all(&dir);
}
