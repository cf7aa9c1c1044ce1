//! GPU sessions without a VM (issue #21): a client process uses an instance of a real
//! `tessera serve` (seccomp on) through its session socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use std::sync::Arc;

use std::path::{Path, PathBuf};
use tessera_tests::{Server, guest_image, session, workload};
use vgpu_abi::fault;

use rustls::pki_types::pem::PemObject;
use vgpu_session::link::Link;
use vgpu_session::proto::{ErrorKind, Reply, Request};
use vgpu_session::tls::{TlsAddr, TlsFiles};
use vgpu_session::{Command, Session, SessionError, WaitResult};

const MINUTE: Duration = Duration::from_secs(60);

fn refused(r: Result<impl std::fmt::Debug, SessionError>) -> (ErrorKind, String) {
    match r {
        Err(SessionError::Refused { kind, message }) => (kind, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_session_runs_every_kernel_bit_exactly_in_client_memory_and_vram() {
    let server = Server::start("session-kernels", &["--create", "64M:s1"]);
    let mut s = session(&server, "s1");
    assert_eq!(
        (s.info().instance.as_str(), s.info().profile.as_str()),
        ("s1", "64M")
    );
    assert_eq!(s.info().vram, 64 << 20);
    workload::check(&mut s).expect("the workload over a UNIX socket");
    pipelined_submissions_are_answered_in_order(&mut s);
}

/// Many submissions sent before any reply is read: replies come in order.
fn pipelined_submissions_are_answered_in_order(s: &mut Session) {
    let ctx = s.create_context().expect("context");
    let b = s.alloc_vram(4096).expect("VRAM");
    for _ in 0..200 {
        s.send(&Request::Submit {
            ctx,
            commands: vec![Command::Fill {
                dst: b.at(0),
                len: 64,
                value: 7,
            }],
        })
        .expect("send");
    }
    let fences: Vec<u64> = (0..200)
        .map(|_| match s.recv().expect("reply") {
            Reply::Submitted { fence } => fence,
            r => panic!("{r:?}"),
        })
        .collect();
    assert_eq!(fences, (1..=200).collect::<Vec<u64>>());
    assert_eq!(s.wait(ctx, 200, MINUTE).expect("wait"), WaitResult::Done);
    assert_eq!(s.read(b.at(0), 64).expect("read"), [7, 0, 0, 0].repeat(16));
}

#[test]
fn quotas_and_bad_requests_get_clear_errors_and_change_nothing() {
    let server = Server::start("session-quota", &["--create", "64M:q1"]);
    let mut s = session(&server, "q1");
    let ctx = s.create_context().unwrap();
    // The type's VRAM is the quota.
    let big = s.alloc_vram(48 << 20).unwrap();
    let (kind, msg) = refused(s.alloc_vram(32 << 20));
    assert_eq!(kind, ErrorKind::Exhausted, "{msg}");
    assert!(msg.contains("67108864 bytes of VRAM"), "{msg}");
    assert_eq!(refused(s.alloc_vram(128 << 20)).0, ErrorKind::BadArgument);
    assert_eq!(refused(s.alloc_vram(0)).0, ErrorKind::BadArgument);
    s.free(big).unwrap();
    let again = s.alloc_vram(60 << 20).expect("freed VRAM is usable again");
    // Operands past their buffer, unknown buffers and contexts: refused before anything is
    // queued, so the next fence is still 1.
    let (kind, msg) = refused(s.submit(
        ctx,
        &[Command::Copy {
            src: again.at(0),
            dst: again.at((60 << 20) - 8),
            len: 16,
        }],
    ));
    assert_eq!(kind, ErrorKind::BadArgument, "{msg}");
    assert_eq!(
        refused(s.submit(
            ctx,
            &[Command::Fill {
                dst: again.at(0).with_buffer(999),
                len: 4,
                value: 0
            }]
        ))
        .0,
        ErrorKind::NoSuchObject
    );
    assert_eq!(refused(s.submit(7, &[])).0, ErrorKind::NoSuchObject);
    assert_eq!(
        refused(s.read(again.at(u64::MAX), 2)).0,
        ErrorKind::BadArgument
    );
    assert_eq!(s.submit(ctx, &[]).unwrap(), 1);
    // A session maps at most as many client memory regions as a vfio-user client (512), so
    // that a few sessions cannot take the server's whole region budget.
    let held: Vec<_> = (0..512)
        .map(|i| {
            s.map_memory(4096)
                .unwrap_or_else(|e| panic!("region {i}: {e}"))
        })
        .collect();
    let (kind, msg) = refused(s.map_memory(4096));
    assert_eq!(kind, ErrorKind::Exhausted, "{msg}");
    assert!(msg.contains("at most 512"), "{msg}");
    drop(held);
    // Client memory must be sealed against shrinking: a plain file is refused.
    let plain = tempfile();
    let fd = std::fs::File::open(&plain).unwrap();
    let sock = raw_session(&server, "q1");
    // (The instance serves one connection at a time: this one waits until `s` is gone.)
    drop(s);
    vgpu_session::frame::send(&sock, &Request::Hello { version: 1 }, None).unwrap();
    assert!(matches!(
        vgpu_session::frame::recv::<Reply>(&sock).unwrap().0,
        Reply::Welcome { .. }
    ));
    vgpu_session::frame::send(&sock, &Request::MapMemory { size: 4096 }, Some(&fd)).unwrap();
    match vgpu_session::frame::recv::<Reply>(&sock).unwrap().0 {
        Reply::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::BadMemory);
            assert!(message.contains("sealed"), "{message}");
        }
        r => panic!("{r:?}"),
    }
    let _ = std::fs::remove_file(plain);
}

#[test]
fn faults_reach_the_session_and_a_reset_context_goes_on() {
    let server = Server::start("session-fault", &["--create", "64M:f1"]);
    let mut s = session(&server, "f1");
    let ctx = s.create_context().unwrap();
    let b = s.alloc_vram(4096).unwrap();
    // FILL needs 4-byte alignment: the device faults the packet, not the server.
    let f = s
        .submit(
            ctx,
            &[Command::Fill {
                dst: b.at(2),
                len: 8,
                value: 1,
            }],
        )
        .unwrap();
    match s.wait(ctx, f, MINUTE).unwrap() {
        WaitResult::Fault { code, .. } => assert_eq!(code, fault::BAD_PACKET),
        w => panic!("expected a fault, got {w:?}"),
    }
    s.reset_context(ctx).unwrap();
    s.run(
        ctx,
        &[Command::Fill {
            dst: b.at(0),
            len: 8,
            value: 0x0909_0909,
        }],
    )
    .expect("work after the reset");
    assert_eq!(s.read(b.at(0), 8).unwrap(), vec![9u8; 8]);
}

#[test]
fn a_garbage_speaking_client_is_refused_and_the_next_one_is_served_on_scrubbed_vram() {
    let server = Server::start("session-garbage", &["--create", "64M:g1"]);
    // A first client leaves a secret in VRAM and goes away without a word.
    let mut s = session(&server, "g1");
    let b = s.alloc_vram(1 << 20).unwrap();
    s.write(b.at(0), &[0x5a; 4096]).unwrap();
    drop(s);
    // Garbage: a frame that is no request, an oversized length, a 32 MiB request that is no
    // `Write` (refused before the server reads or decodes it: 32 MiB of 3-byte commands would
    // decode to 1 GiB), no Hello first.
    let big_request = [(32u32 << 20).to_le_bytes().to_vec(), vec![1u8; 30]].concat();
    for junk in [
        vec![5, 0, 0, 0, 0xff, 0xee, 0xdd, 0xcc, 0xbb],
        u32::MAX.to_le_bytes().to_vec(),
        big_request,
    ] {
        let mut sock = raw_session(&server, "g1");
        sock.write_all(&junk).unwrap();
        match vgpu_session::frame::recv::<Reply>(&sock).unwrap().0 {
            Reply::Error { kind, .. } => assert_eq!(kind, ErrorKind::Protocol),
            r => panic!("{r:?}"),
        }
        let mut rest = Vec::new();
        sock.set_read_timeout(Some(MINUTE)).unwrap();
        assert_eq!(
            sock.read_to_end(&mut rest).unwrap(),
            0,
            "closed after the error"
        );
    }
    let sock = raw_session(&server, "g1");
    vgpu_session::frame::send(&sock, &Request::CreateContext, None).unwrap();
    match vgpu_session::frame::recv::<Reply>(&sock).unwrap().0 {
        Reply::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::Protocol);
            assert!(message.contains("Hello"), "{message}");
        }
        r => panic!("{r:?}"),
    }
    drop(sock);
    // The server is unharmed, and the next tenant sees zeros where the secret was.
    let mut s = session(&server, "g1");
    let b = s.alloc_vram(1 << 20).unwrap();
    assert_eq!(s.read(b.at(0), 4096).unwrap(), vec![0u8; 4096]);
    assert!(
        server.log().contains("session client refused"),
        "{}",
        server.log()
    );
}

fn raw_session(server: &Server, name: &str) -> UnixStream {
    UnixStream::connect(server.dir.join(format!("vgpu-{name}.session"))).expect("connect")
}

fn tempfile() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("tessera-plain-{}", std::process::id()));
    std::fs::write(&p, vec![0u8; 4096]).expect("a plain file");
    p
}

trait WithBuffer {
    fn with_buffer(self, id: u32) -> Self;
}

impl WithBuffer for vgpu_session::BufRef {
    fn with_buffer(mut self, id: u32) -> Self {
        self.buffer = id;
        self
    }
}

#[test]
fn the_cdi_spec_mounts_the_session_socket_and_names_it() {
    let server = Server::start("session-cdi", &["--create", "64M:c1"]);
    let spec: serde_json::Value =
        serde_json::from_str(&server.ok(&["vgpu", "cdi", "c1"])).expect("JSON");
    assert_eq!(spec["cdiVersion"], "0.6.0");
    assert_eq!(spec["kind"], "tessera.dev/vgpu");
    let dev = &spec["devices"][0];
    assert_eq!(dev["name"], "c1");
    let mount = &dev["containerEdits"]["mounts"][0];
    let host = server.dir.join("vgpu-c1.session");
    assert_eq!(mount["hostPath"], host.display().to_string());
    assert_eq!(mount["containerPath"], "/run/tessera/vgpu.session");
    assert_eq!(mount["options"][0], "bind");
    assert_eq!(
        dev["containerEdits"]["env"][0],
        "TESSERA_DEVICE=unix:/run/tessera/vgpu.session"
    );
    // The socket it names opens a session.
    let s = Session::connect_unix(&host).expect("session");
    assert_eq!(s.info().instance, "c1");
    let (status, _, err) = server.client(&["vgpu", "cdi", "nope"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("no instance \"nope\""), "{err}");
}

/// A container's view: a process in its own user, mount and network namespaces (`unshare`)
/// where the server's directory is hidden under an empty tmpfs and only the instance's
/// session socket is bind-mounted in, at the path the CDI spec names. It runs its work there.
#[test]
fn a_process_in_its_own_namespaces_uses_only_its_bind_mounted_socket() {
    let unshare = std::path::Path::new("/usr/bin/unshare");
    if !unshare.exists() {
        eprintln!("skipped: no /usr/bin/unshare (util-linux)");
        return;
    }
    let server = Server::start("session-ns", &["--create", "64M:ct"]);
    let root = server.dir.parent().expect("scratch").join("ct");
    std::fs::create_dir_all(&root).expect("mount point");
    let host = server.dir.join("vgpu-ct.session");
    let script = format!(
        "set -ex; mount -t tmpfs none {root}; touch {root}/vgpu.session; \
         mount --bind {host} {root}/vgpu.session; mount -t tmpfs none {dir}; \
         test ! -e {dir}/control.sock; test \"$(ls {dir})\" = ''; \
         test \"$(awk 'NR > 2 {{print $1}}' /proc/net/dev)\" = lo:; \
         TESSERA_DEVICE=unix:{root}/vgpu.session exec {client}",
        root = root.display(),
        host = host.display(),
        dir = server.dir.display(),
        client = env!("CARGO_BIN_EXE_session-client"),
    );
    let out = std::process::Command::new(unshare)
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "--net",
            "sh",
            "-c",
            &script,
        ])
        .env_remove("TESSERA_DEVICE")
        .output()
        .expect("run unshare");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if !out.status.success() && stderr.contains("unshare failed") {
        eprintln!("skipped: user namespaces are not available here: {stderr}");
        return;
    }
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    assert_eq!(stdout.trim(), "session ok instance=ct");
}

/// A server that also serves sessions over TCP with mutual TLS on loopback, with a test CA
/// whose client certificate names `names`: the server, the TLS files' directory and the
/// listener's address (from the log).
fn tls_server(tag: &str, create: &[&str], names: &[&str]) -> (Server, PathBuf, String) {
    let certs = std::env::temp_dir().join(format!("tessera-{tag}-certs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&certs);
    test_ca(&certs, names);
    let file = |f: &str| certs.join(f).display().to_string();
    let mut args: Vec<String> = create.iter().map(|c| c.to_string()).collect();
    args.extend(
        [
            "--session-tls",
            "127.0.0.1:0",
            "--tls-cert",
            &file("server.pem"),
            "--tls-key",
            &file("server-key.pem"),
            "--tls-client-ca",
            &file("ca.pem"),
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(tag, &args);
    let log = server.log();
    let addr = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tls="))
        .unwrap_or_else(|| panic!("no TLS address in the log: {log}"))
        .to_string();
    (server, certs, addr)
}

/// `tessera tls test-ca DIR --instance …` (a fresh CA each time).
fn test_ca(dir: &Path, names: &[&str]) {
    let mut args = vec![
        "tls",
        "test-ca",
        dir.to_str().expect("utf-8 path"),
        "--force",
    ];
    for n in names {
        args.extend(["--instance", n]);
    }
    let (status, out, err) = tessera_tests::run_tessera(&args, &[]);
    assert!(status.success(), "test-ca: {out}{err}");
}

fn tls_files(dir: &Path) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client-key.pem"),
    }
}

fn tls_addr(addr: &str, instance: &str) -> TlsAddr {
    format!("tls://{addr}/{instance}").parse().expect("address")
}

/// The workload over TCP with mutual TLS: a separate process that finds its server and its
/// certificates in the environment, as a program on a GPU-less machine would; then, in this
/// process, client memory is refused (nothing is shared) and pipelined calls are answered in
/// order.
#[test]
fn a_tls_session_runs_the_workload_bit_exactly_on_loopback() {
    let (server, certs, addr) = tls_server("session-tls", &["--create", "64M:t1"], &["t1"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-client"))
        .env("TESSERA_DEVICE", format!("tls://{addr}/t1"))
        .env("TESSERA_TLS_DIR", &certs)
        .output()
        .expect("run the session client");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}\n{}", server.log());
    assert_eq!(stdout.trim(), "session ok instance=t1");

    let mut s = Session::connect_tls(&tls_addr(&addr, "t1"), &tls_files(&certs)).expect("session");
    assert!(s.is_remote());
    assert_eq!(
        (s.info().instance.as_str(), s.info().vram),
        ("t1", 64 << 20)
    );
    let err = s.map_memory(4096).expect_err("no shared memory over TLS");
    assert!(err.to_string().contains("VRAM buffers"), "{err}");
    pipelined_submissions_are_answered_in_order(&mut s);
    // The VRAM quota holds here too.
    let (kind, message) = refused(s.alloc_vram(65 << 20));
    assert_eq!(kind, ErrorKind::BadArgument, "{message}");
}

/// Whether a client that got this far was served: it sends `Open` and `Hello` and reads.
fn served(mut link: Link, instance: &str) -> Result<Reply, String> {
    link.send(
        &Request::Open {
            instance: instance.into(),
        },
        None,
    )
    .map_err(|e| e.to_string())?;
    link.send(
        &Request::Hello {
            version: vgpu_session::proto::VERSION,
        },
        None,
    )
    .map_err(|e| e.to_string())?;
    match link.recv::<Reply>() {
        Ok((Reply::Welcome { .. }, _)) => Ok(Reply::Done),
        Ok((r, _)) => Err(format!("{r:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The TLS listener serves no one without a certificate from its client CA, nor plain TCP,
/// nor a certificate that does not name the instance; the log says why each time, and a
/// good client is served afterwards.
#[test]
fn the_tls_listener_refuses_clients_without_a_valid_certificate() {
    let (server, certs, addr) = tls_server(
        "session-tls-refusals",
        &["--create", "64M:t1", "--create", "64M:t2"],
        &["t1"],
    );
    let good = tls_files(&certs);
    let connect = |config: Arc<rustls::ClientConfig>| {
        let a = tls_addr(&addr, "t1");
        vgpu_session::tls::connect(&a, config)
    };

    // No client certificate (the server's is trusted).
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::pem_file_iter(&good.ca)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    roots.add(ca).unwrap();
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        #[allow(deprecated)]
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let r = connect(Arc::new(anonymous)).map_err(|e| e.to_string());
    let r = r.and_then(|link| served(link, "t1"));
    assert!(r.is_err(), "served without a certificate: {r:?}");

    // A certificate from another CA that names the instance.
    let other = certs.with_extension("other");
    test_ca(&other, &["t1"]);
    let foreign = TlsFiles {
        ca: good.ca.clone(),
        ..tls_files(&other)
    };
    let r = Session::connect_tls(&tls_addr(&addr, "t1"), &foreign);
    assert!(r.is_err(), "served with another CA's certificate: {r:?}");

    // Plain TCP speaking the session protocol.
    let mut plain = std::net::TcpStream::connect(&addr).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    for req in [
        Request::Open {
            instance: "t1".into(),
        },
        Request::Hello {
            version: vgpu_session::proto::VERSION,
        },
    ] {
        let _ = plain.write_all(&vgpu_session::frame::encode(&req).unwrap());
    }
    let mut back = Vec::new();
    let _ = plain.read_to_end(&mut back);
    let reply = vgpu_session::frame::read::<Reply>(&mut &back[..]);
    assert!(
        !matches!(reply, Ok(Reply::Welcome { .. })),
        "plain TCP was served"
    );

    // A good certificate, for another instance.
    let r = Session::connect_tls(&tls_addr(&addr, "t2"), &good);
    let (kind, message) = refused(r);
    assert_eq!(kind, ErrorKind::Protocol);
    assert!(
        message.contains("does not name instance \"t2\""),
        "{message}"
    );

    let log = server.log();
    for why in [
        "TLS session refused: handshake: peer sent no certificates",
        "TLS session refused: handshake: invalid peer certificate: UnknownIssuer",
        "TLS session refused: handshake: received corrupt message",
        "TLS session refused: the client certificate does not name instance \"t2\"",
    ] {
        assert!(log.contains(why), "the log does not say {why:?}:\n{log}");
    }
    // The server is unharmed: a good client is served.
    let mut s = Session::connect_tls(&tls_addr(&addr, "t1"), &good).expect("a good client");
    let ctx = s.create_context().unwrap();
    s.run(ctx, &[Command::SpinUs { us: 10, groups: 1 }])
        .expect("work");
}

/// libtessera's C check (`guest-images/libtessera/tessera-check.c`, the program the Linux
/// guest runs over its device node) built with the session transports, linked dynamically and
/// statically, runs its `jobs` and `sysmem` checks (SAXPY, SGEMM, REDUCE_SUM, CRC-32, COPY,
/// FILL, bit-exact against the CPU; buffers in VRAM and in system memory) through the same
/// binary over a UNIX socket and over TCP with mutual TLS, the transport picked by
/// `TESSERA_DEVICE`; a device that cannot be reached is one clear line.
#[test]
fn the_c_library_runs_its_checks_over_each_transport_linked_both_ways() {
    let lib = tessera_tests::tessera_bin().with_file_name("libtessera_capi.a");
    let Some(lib) = guest_image(lib, "cargo build -p tessera-capi") else {
        return;
    };
    let (server, certs, addr) = tls_server("session-capi", &["--create", "256M:c1"], &["c1"]);
    let out = server.dir.parent().expect("scratch").join("libtessera");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let made = std::process::Command::new("make")
        .arg("-C")
        .arg(root.join("guest-images/libtessera"))
        .arg(format!("OUT={}", out.display()))
        .arg(format!("SESSION_LIB={}", lib.display()))
        .output()
        .expect("run make");
    assert!(
        made.status.success(),
        "make: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let unix = format!("unix:{}", server.dir.join("vgpu-c1.session").display());
    let tls = format!("tls://{addr}/c1");
    let run = |binary: &str, device: &str, tests: &[&str]| {
        let out = std::process::Command::new(out.join(binary))
            .args(tests)
            .env("TESSERA_DEVICE", device)
            .env("TESSERA_TLS_DIR", &certs)
            .env("LD_LIBRARY_PATH", &out)
            .output()
            .expect("run tessera-check");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status, text)
    };
    for binary in ["tessera-check", "tessera-check-static"] {
        for device in [&unix, &tls] {
            let (status, text) = run(binary, device, &["jobs", "sysmem"]);
            assert!(status.success(), "{binary} over {device}:\n{text}");
            for t in ["jobs ok", "sysmem ok"] {
                assert!(
                    text.contains(t),
                    "{binary} over {device}: no {t:?}:\n{text}"
                );
            }
        }
    }
    let (status, text) = run("tessera-check", "unix:/nonexistent/vgpu.session", &["jobs"]);
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("unix:/nonexistent/vgpu.session: cannot connect to /nonexistent/vgpu.session: No such file or directory"),
        "{text}"
    );
}

/// `tessera-run` and `tessera-smi`, the guest's tools, built for this host with libtessera's
/// session transports (`cargo xtask test` builds them into target/host-tools), work on an
/// instance over a UNIX socket and over TLS as they do on a guest's device node: every job
/// passes (the fault job too: this library's MMU faults an address no buffer holds, as the
/// device would), and the instance's VRAM and kernels are listed.
#[test]
fn tessera_run_and_smi_work_over_each_transport() {
    let tools = tessera_tests::tessera_bin()
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("host-tools/release");
    if guest_image(tools.join("tessera-run"), "cargo xtask test builds it").is_none() {
        return;
    }
    let (server, certs, addr) = tls_server("session-tools", &["--create", "256M:c1"], &["c1"]);
    let unix = format!("unix:{}", server.dir.join("vgpu-c1.session").display());
    let tls = format!("tls://{addr}/c1");
    for device in [&unix, &tls] {
        let run = |tool: &str, args: &[&str]| {
            let out = std::process::Command::new(tools.join(tool))
                .args(args)
                .env("TESSERA_DEVICE", device)
                .env("TESSERA_TLS_DIR", &certs)
                .output()
                .expect("run the tool");
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{tool} {args:?} over {device}:\n{text}"
            );
            text
        };
        let smi = run("tessera-smi", &[]);
        for want in [
            format!("{device}  Tessera vGPU ABI"),
            "vram      256 MiB total".to_string(),
            "kernels   saxpy sgemm reduce_sum crc32 spin_us".to_string(),
        ] {
            assert!(
                smi.contains(&want),
                "tessera-smi over {device}: no {want:?}:\n{smi}"
            );
        }
        for args in [&["all"][..], &["--sysmem", "all"]] {
            let out = run("tessera-run", args);
            for job in ["saxpy", "sgemm", "reduce", "crc32", "copy", "fill", "fault"] {
                assert!(
                    out.contains(&format!("tessera-run: {job} ok")),
                    "tessera-run {args:?} over {device}: {job}:\n{out}"
                );
            }
        }
    }
}

/// The workload through a session on a server in this very process (`vgpu_server::Daemon`,
/// as an embedding program would run it): the in-process transport.
#[test]
fn an_in_process_server_runs_the_workload_bit_exactly() {
    use vgpu::physical::{GpuSpec, PhysicalGpu};
    let dir = std::env::temp_dir().join(format!("tessera-inproc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let profile = vgpu::profile::find("64M").expect("profile");
    let gpu = PhysicalGpu::new(&GpuSpec::whole(profile.vram, 2)).expect("GPU");
    let daemon = vgpu_server::Daemon::new(
        gpu,
        vgpu_server::ServeOptions {
            dir: dir.clone(),
            ..Default::default()
        },
    )
    .expect("server");
    let info = daemon
        .create(profile, Some("p1".into()), None, Default::default())
        .expect("instance");
    let stop = Arc::new(vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd"));
    let (d, st) = (daemon.clone(), stop.clone());
    let serving = std::thread::spawn(move || d.serve(&st));
    let mut s = Session::connect_unix(&info.session_socket).expect("session");
    workload::check(&mut s).expect("the workload in process");
    drop(s);
    stop.write(1).expect("stop");
    serving.join().expect("server thread").expect("served");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two sessions at once on two instances of one GPU: each names only its own buffers (the
/// same numbers mean its own), a number it was not given is refused, and its whole VRAM holds
/// nothing of the other's.
#[test]
fn two_sessions_see_only_their_own_buffers() {
    let server = Server::start(
        "session-isolation",
        &["--create", "64M:a", "--create", "64M:b"],
    );
    let mut a = session(&server, "a");
    let mut b = session(&server, "b");
    let secret = a.alloc_vram(1 << 20).expect("VRAM");
    a.write(secret.at(0), &[0x5a; 1 << 20]).expect("write");
    // `b` has no buffer of that number: the number names nothing of `a`'s.
    let (kind, _) = refused(b.read(secret.at(0), 4096));
    assert_eq!(kind, ErrorKind::NoSuchObject);
    // Its own buffer with the same number, and all of its VRAM, read zeros.
    let own = b.alloc_vram(64 << 20).expect("all of b's VRAM");
    assert_eq!(own.id, secret.id, "numbers are per session");
    let all = b.read(own.at(0), 64 << 20).expect("read");
    assert!(all.iter().all(|&x| x == 0), "b's VRAM holds a's bytes");
    // A copy from past its own buffer is refused before it reaches the device.
    let ctx = b.create_context().expect("context");
    let (kind, _) = refused(b.submit(
        ctx,
        &[Command::Copy {
            src: own.at(64 << 20),
            dst: own.at(0),
            len: 4096,
        }],
    ));
    assert_eq!(kind, ErrorKind::BadArgument);
    assert_eq!(a.read(secret.at(0), 8).expect("read"), [0x5a; 8]);
}

/// A client killed while it holds its instance (SIGKILL, no goodbye): the instance is served
/// to the next client, on VRAM that holds nothing of the killed one's.
#[test]
fn a_killed_clients_instance_is_reclaimed_and_scrubbed() {
    use std::io::BufRead;
    let server = Server::start("session-kill", &["--create", "64M:k1"]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_session-client"))
        .arg("--hold")
        .env(
            "TESSERA_DEVICE",
            format!("unix:{}", server.dir.join("vgpu-k1.session").display()),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the client");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "holding");
    child.kill().expect("kill");
    child.wait().expect("reap");
    let mut s = session(&server, "k1");
    let b = s.alloc_vram(1 << 20).expect("VRAM");
    assert!(
        s.read(b.at(0), 1 << 20)
            .expect("read")
            .iter()
            .all(|&x| x == 0),
        "the killed client's secret is still there"
    );
}

/// A client that hangs up while its `Submit` waits for ring slots frees its instance at once:
/// the next client is served long before the queued work could have drained (over 200 s of
/// spinning) or the server's 60 s grace for a full ring could have run out.
#[test]
fn a_client_that_hangs_up_inside_a_submit_frees_its_instance() {
    let server = Server::start("session-hangup", &["--create", "64M:h1"]);
    let mut s = session(&server, "h1");
    let ctx = s.create_context().expect("context");
    let spin = vec![
        Command::SpinUs {
            us: 200_000,
            groups: 1
        };
        1024
    ];
    // The largest submission (1025 packets with its fence) fits an empty ring (2048 slots)
    // whole; a second waits beside it for two slots (two spins).
    s.submit(ctx, &spin).expect("first submission");
    s.submit(ctx, &spin).expect("second submission");
    // The third waits for the first to finish, and the client leaves without its reply.
    s.send(&Request::Submit {
        ctx,
        commands: spin,
    })
    .expect("send");
    s.flush().expect("flush");
    drop(s);
    let left = std::time::Instant::now();
    let mut next = session(&server, "h1");
    let waited = left.elapsed();
    assert!(
        waited < Duration::from_secs(30),
        "the next client waited {waited:?} for the instance"
    );
    let ctx = next.create_context().expect("context");
    let fence = next
        .submit(ctx, &[Command::SpinUs { us: 10, groups: 1 }])
        .expect("submit");
    assert_eq!(
        next.wait(ctx, fence, MINUTE).expect("wait"),
        WaitResult::Done
    );
}
