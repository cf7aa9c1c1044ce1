//! Live migration (issue #22): `tessera vmctl send-migration` moves a running VM with an
//! in-process vGPU to a `tessera vm --receive-migration` in another process, over a UNIX socket
//! or TCP (loopback here).
//!
//! - A guest that writes memory all along (`run=load kind=dirty`: the GPU fills guest RAM, the
//!   CPU writes VRAM through the aperture, every slot once, every word checked at the end)
//!   finishes on the destination with every byte right: what KVM's dirty log misses (the
//!   GPU's writes) the vGPU's own log catches.
//! - A guest in the middle of a long dispatch finishes it there, every fence counted once.
//! - A migration that fails at any step (no destination, a destination that refuses, sends
//!   garbage or goes away) leaves the source running unharmed: its guest finishes its checks.
//! - A destination that is sent garbage ends with one line and never runs a VM.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use tessera_tests::{
    Server, Vmm, firmware, firmware_vm, firmware_vm_with, run_tessera, scratch, vmctl,
    wait_until_vgpu_busy,
};

const T: Duration = Duration::from_secs(120);

/// A firmware VM running `cmdline` with a 64M vGPU and a control socket, its GPU busy.
fn source(fw: &Path, sock: &Path, cmdline: &str) -> Vmm {
    let vm = firmware_vm(fw, cmdline, "64M", "64M", sock);
    wait_until_vgpu_busy(sock);
    vm
}

fn send(sock: &Path, dest: &str) -> (Option<i32>, serde_json::Value) {
    vmctl(sock, &["--timeout", "120s", "send-migration", dest])
}

/// After a migration: the source ends without finishing the load itself, the destination
/// prints a line with `expect` and ends well; returns that line.
fn moved(source: &mut Vmm, target: &mut Vmm, expect: &str) -> String {
    assert_eq!(source.wait(T).code(), Some(0));
    assert!(
        !source.saw("load kind="),
        "{}",
        source.transcript.join("\n")
    );
    target.expect_line(expect, T);
    let line = target
        .transcript
        .iter()
        .find(|l| l.contains(expect))
        .cloned()
        .unwrap_or_default();
    let out = target.transcript.join("\n");
    assert_eq!(target.wait(T).code(), Some(0), "{out}");
    line
}

/// Migrates a `cmdline` VM to a destination listening at `dest`; returns the destination's
/// transcript line that starts with `expect` and the report.
fn migrate(dest: &str, cmdline: &str, expect: &str) -> (String, serde_json::Value) {
    let fw = firmware().expect("firmware");
    let work = scratch(&format!("mig-{}", dest.len()));
    let sock = work.join("vm.api");
    let mut target = Vmm::spawn(&["vm", "--receive-migration", dest]);
    let mut vm = source(&fw, &sock, cmdline);
    let (code, reply) = send(&sock, dest);
    assert_eq!(code, Some(0), "{reply}");
    assert_eq!(reply["state"], "stopping", "{reply}");
    let line = moved(&mut vm, &mut target, expect);
    let _ = std::fs::remove_dir_all(&work);
    (line, reply["migration"].clone())
}

#[test]
fn a_vm_writing_ram_and_vram_moves_with_every_byte_over_unix_and_tcp() {
    if firmware().is_none() {
        return;
    }
    let work = scratch("mig-dirty");
    let unix = format!("unix:{}", work.join("in.sock").display());
    // Port 0 is not a destination; pick a free loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    for dest in [unix, tcp] {
        let (line, report) = migrate(&dest, "run=load kind=dirty seconds=4", "load kind=dirty");
        assert!(line.contains("jobs=256"), "{line}");
        assert!(line.contains("mismatches=0"), "{line}");
        // All of RAM and VRAM went at least once.
        assert!(
            report["bytes"].as_u64().unwrap_or(0) >= 128 << 20,
            "{report}"
        );
        assert!(report["downtime_us"].as_u64().is_some(), "{report}");
        assert!(
            report["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with(&dest[..4]))
        );
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_vm_in_the_middle_of_a_long_dispatch_finishes_it_on_the_destination() {
    if firmware().is_none() {
        return;
    }
    let work = scratch("mig-long");
    let dest = format!("unix:{}", work.join("in.sock").display());
    let (line, _) = migrate(&dest, "run=load kind=long seconds=3", "load kind=long");
    // The firmware checks that the fence counts every dispatch once and nothing faulted.
    assert!(line.contains("faults=0"), "{line}");
    let _ = std::fs::remove_dir_all(&work);
}

/// The same over vfio-user: the source's vGPU is instance `a` of a `tessera serve`, the
/// destination's instance `b`. The server's vGPU goes through migration v2 (PRE_COPY with its
/// VRAM, DMA dirty logging of guest RAM, STOP_COPY with its state, RESUMING on `b`); the
/// guest's CPU writes through the mapped aperture travel as the client's own pages.
#[test]
fn a_vm_whose_vgpu_is_served_over_vfio_user_moves_to_another_instance() {
    let Some(fw) = firmware() else {
        return;
    };
    let server = Server::start("mig-vfu", &[]);
    let [a, b]: [String; 2] = server
        .instances("64M", &["a", "b"])
        .try_into()
        .expect("two instances");
    let work = scratch("mig-vfu-vms");
    // Loads long enough to outlast a loaded CI machine's start of three processes.
    for (n, (cmdline, expect)) in [
        ("run=load kind=dirty seconds=8", "load kind=dirty"),
        ("run=load kind=long seconds=5", "load kind=long"),
    ]
    .into_iter()
    .enumerate()
    {
        let sock = work.join(format!("vm{n}.api"));
        let listen = work.join(format!("in{n}.sock"));
        let dest = format!("unix:{}", listen.display());
        let busy_before = server.busy_ns("a");
        let mut target = Vmm::spawn(&[
            "vm",
            "--receive-migration",
            &dest,
            "--user-device",
            &format!("socket={b}"),
        ]);
        let user = format!("socket={a}");
        let mut vm = firmware_vm_with(&fw, cmdline, "64M", &["--user-device", &user], &sock);
        server.wait_busy("a", busy_before);
        // The destination listens once it has connected to instance b.
        let deadline = Instant::now() + T;
        while !listen.exists() {
            assert!(Instant::now() < deadline, "the destination never listened");
            std::thread::yield_now();
        }
        let (code, reply) = send(&sock, &dest);
        assert_eq!(code, Some(0), "{reply}\n{}", server.log());
        let line = moved(&mut vm, &mut target, expect);
        if n == 0 {
            assert!(
                line.contains("jobs=256") && line.contains("mismatches=0"),
                "{line}"
            );
            // All of RAM and all of VRAM (in the server's migration data) went.
            let bytes = reply["migration"]["bytes"].as_u64().unwrap_or(0);
            assert!(bytes >= 128 << 20, "{reply}");
        } else {
            assert!(line.contains("faults=0"), "{line}");
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// A fake destination: accepts one connection and does `act` with it.
fn fake_destination(
    path: &Path,
    act: impl FnOnce(std::os::unix::net::UnixStream) + Send + 'static,
) {
    let l = UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            act(s);
        }
    });
}

/// Reads one frame (header and payload); `None` at the end of the stream.
fn read_frame(s: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 21];
    s.read_exact(&mut head).ok()?;
    let len = u64::from_le_bytes(head[13..21].try_into().ok()?);
    let mut body = vec![0u8; usize::try_from(len).ok()?];
    s.read_exact(&mut body).ok()?;
    Some((head[0], body))
}

fn frame(kind: u8, len: u64) -> Vec<u8> {
    let mut f = vec![0u8; 21];
    f[0] = kind;
    f[13..21].copy_from_slice(&len.to_le_bytes());
    f
}

#[test]
fn a_failed_migration_leaves_the_source_running_unharmed() {
    let Some(fw) = firmware() else { return };
    let work = scratch("mig-fail");
    let sock = work.join("vm.api");
    let mut vm = source(&fw, &sock, "run=load kind=dirty seconds=6");
    let fail = |dest: &str, why: &str| {
        let (code, reply) = send(&sock, dest);
        assert_eq!(code, Some(1), "{dest}: {reply}");
        let e = reply["error"].as_str().unwrap_or_default().to_string();
        assert!(e.contains(why), "{dest}: {e}");
        assert!(e.contains("the VM runs on"), "{e}");
        let (_, info) = vmctl(&sock, &["info"]);
        assert_eq!(info["state"], "running", "{info}");
    };
    // Nobody listens.
    fail(
        &format!("unix:{}", work.join("nobody.sock").display()),
        "cannot connect",
    );
    // A destination that refuses the VM.
    let p = work.join("refuses.sock");
    fake_destination(&p, |mut s| {
        let _ = read_frame(&mut s);
        let mut f = frame(12, 9);
        f.extend_from_slice(b"no thanks");
        let _ = s.write_all(&f);
    });
    fail(&format!("unix:{}", p.display()), "no thanks");
    // A destination that answers garbage.
    let p = work.join("garbage.sock");
    fake_destination(&p, |mut s| {
        let _ = read_frame(&mut s);
        let _ = s.write_all(&frame(77, 3));
    });
    fail(&format!("unix:{}", p.display()), "unknown kind 77");
    // A destination that says READY, takes part of the copy and goes away.
    let p = work.join("goes-away.sock");
    fake_destination(&p, |mut s| {
        let _ = read_frame(&mut s);
        let _ = s.write_all(&frame(10, 0));
        for _ in 0..3 {
            let _ = read_frame(&mut s);
        }
    });
    fail(&format!("unix:{}", p.display()), "cannot send to the peer");
    // A destination that takes everything and never says RESUMED: the source stopped the VM
    // for the last round and must run it again.
    let p = work.join("silent.sock");
    fake_destination(&p, |mut s| {
        let _ = read_frame(&mut s);
        let _ = s.write_all(&frame(10, 0));
        while let Some((kind, _)) = read_frame(&mut s) {
            if kind == 4 {
                // The state: hang up instead of answering.
                return;
            }
        }
    });
    fail(&format!("unix:{}", p.display()), "went away");
    // Every byte the guest wrote is still right, and it ends as it would have.
    vm.expect_line("load kind=dirty", T);
    let out = vm.transcript.join("\n");
    assert!(vm.saw("mismatches=0"), "{out}");
    assert_eq!(vm.wait(T).code(), Some(0), "{out}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_destination_sent_garbage_ends_with_one_line_and_runs_nothing() {
    let work = scratch("mig-garbage");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "junk",
            b"hello there, this is no migration".to_vec(),
            "unknown kind",
        ),
        (
            "hello-not-json",
            {
                let mut f = frame(1, 5);
                f.extend_from_slice(b"{{{{{");
                f
            },
            "does not decode",
        ),
        ("state-first", frame(4, 0), "instead of HELLO"),
        ("huge", frame(2, u64::MAX), "at most"),
        ("cut", frame(1, 100), "went away"),
    ];
    for (name, bytes, why) in cases {
        let path = work.join(format!("{name}.sock"));
        let dest = format!("unix:{}", path.display());
        let p2 = path.clone();
        let sender = std::thread::spawn(move || {
            let deadline = Instant::now() + T;
            let mut s = loop {
                if let Ok(s) = std::os::unix::net::UnixStream::connect(&p2) {
                    break s;
                }
                assert!(Instant::now() < deadline, "the destination never listened");
                std::thread::yield_now();
            };
            let _ = s.write_all(&bytes);
            // Then nothing more (a sender that went away mid-frame), and read until the
            // destination gives up on it.
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        let (status, out, err) = run_tessera(&["vm", "--receive-migration", &dest], &[]);
        sender.join().expect("sender");
        assert_eq!(status.code(), Some(1), "{name}: {out}{err}");
        assert!(out.is_empty(), "{name}: a VM ran: {out}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("tessera:")).collect();
        assert_eq!(lines.len(), 1, "{name}: {err}");
        assert!(lines[0].contains(why), "{name}: {}", lines[0]);
        assert!(!path.exists(), "{name}: the socket was left behind");
    }
    let _ = std::fs::remove_dir_all(&work);
}
