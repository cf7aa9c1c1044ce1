//! The vGPU server (`tessera serve`) and its vfio-user sockets: management through the CLI,
//! hostile clients, and an unmodified Cloud Hypervisor running the conformance suite against a
//! Tessera vGPU.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_tests::{Server, Vmm, cloud_hypervisor, firmware, user_vm};

/// Waits until instance `name` reports `attached == want`.
fn wait_attached(server: &Server, name: &str, want: bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = server.json(&["vgpu", "list"]);
        let inst = list["instances"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no instance {name} in {list}"));
        if inst["attached"] == want {
            return inst;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became attached={want}: {inst}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn available(server: &Server, ty: &str) -> u64 {
    let types = server.json(&["vgpu", "types"]);
    types["types"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == ty))
        .and_then(|t| t["available_instances"].as_u64())
        .unwrap_or_else(|| panic!("no type {ty} in {types}"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

/// Asserts the one-line error contract of a refused client command.
fn refused(server: &Server, args: &[&str], needle: &str) {
    let (status, _, err) = server.client(args);
    assert_eq!(status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(
        err.starts_with("tessera: ") && err.contains(needle),
        "{needle:?} not in {err:?}"
    );
}

#[test]
fn instances_are_managed_like_mdev_types() {
    let server = Server::start("mgmt", &["--gpu", "soft,vram=1G,engines=2"]);
    assert_eq!(mode(&server.dir), 0o700);
    assert_eq!(mode(&server.dir.join("control.sock")), 0o600);
    assert_eq!(
        (
            available(&server, "64M"),
            available(&server, "256M"),
            available(&server, "1G")
        ),
        (16, 4, 1)
    );

    let sock = server.ok(&["vgpu", "create", "--type", "256M", "--name", "a"]);
    let sock = Path::new(sock.trim()).to_path_buf();
    assert_eq!(mode(&sock), 0o600, "{}", sock.display());
    let b = server.json(&["vgpu", "create", "--type", "64M", "--weight", "4"]);
    let b_name = b["instance"]["name"].as_str().expect("name").to_string();
    assert_eq!(b["instance"]["weight"], 4);
    assert_eq!(available(&server, "1G"), 0, "VRAM is leased");
    assert_eq!(available(&server, "256M"), 2);

    for (args, needle) in [
        (
            &["vgpu", "create", "--type", "256M", "--name", "a"][..],
            "already exists",
        ),
        (&["vgpu", "create", "--type", "3G"][..], "unknown vGPU type"),
        (
            &["vgpu", "create", "--type", "64M", "--name", "../x"][..],
            "instance name",
        ),
        (
            &["vgpu", "create", "--type", "64M", "--weight", "0"][..],
            "weight",
        ),
        (&["vgpu", "create", "--type", "1G"][..], "no room"),
        (&["vgpu", "remove", "nope"][..], "no instance"),
    ] {
        refused(&server, args, needle);
    }

    // A vfio-user client attached: the instance is busy and cannot be removed.
    let client = vfio_user::Client::new(&sock).expect("vfio-user connect");
    let region = client.region(2).expect("VRAM region");
    assert_eq!(region.size, 256 << 20);
    assert!(
        region.file_offset.is_some(),
        "VRAM comes with an mmap-able fd"
    );
    wait_attached(&server, "a", true);
    refused(&server, &["vgpu", "remove", "a"], "EBUSY");
    let mut client = client;
    let mut id = [0u8; 4];
    client.region_read(7, 0, &mut id).expect("config read");
    assert_eq!(u32::from_le_bytes(id), 0x0001_7e55, "vendor and device id");
    drop(client);
    let a = wait_attached(&server, "a", false);
    assert_eq!(a["attachments"], 1);

    server.ok(&["vgpu", "remove", "a"]);
    server.ok(&["vgpu", "remove", &b_name]);
    assert!(!sock.exists(), "socket removed with the instance");
    assert_eq!(available(&server, "1G"), 1, "VRAM returned");
    let list = server.json(&["vgpu", "list"]);
    assert_eq!(list["instances"].as_array().map(Vec::len), Some(0));

    // Run-time policy switch and the statistics readers.
    let out = server.ok(&["vgpu", "policy", "fixed-share", "--slice", "1ms"]);
    assert!(out.contains("fixed-share 1000 µs"), "{out}");
    let top = server.ok(&["top", "-n", "1", "--prometheus"]);
    assert!(top.contains("tessera_server_instances 0"), "{top}");

    let dir = server.dir.clone();
    let status = server.stop();
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    assert!(!dir.join("control.sock").exists());
}

/// Maps a client's VRAM region (what a VMM does for BAR 2).
fn map_vram(client: &vfio_user::Client) -> vm_memory::GuestRegionMmap {
    let r = client.region(2).expect("VRAM region");
    let fo = r.file_offset.clone().expect("VRAM fd");
    vm_memory::GuestRegionMmap::from_range(vm_memory::GuestAddress(0), r.size as usize, Some(fo))
        .expect("map VRAM")
}

#[test]
fn vram_is_scrubbed_between_clients_even_for_a_kept_mapping() {
    use vm_memory::{Bytes, MemoryRegionAddress};
    let server = Server::start("scrub", &["--gpu", "soft,vram=512M,engines=1"]);
    let sock = server.ok(&["vgpu", "create", "--type", "64M", "--name", "s"]);
    let sock = Path::new(sock.trim()).to_path_buf();
    let first = vfio_user::Client::new(&sock).expect("connect");
    let kept = map_vram(&first);
    let secret = [0x5eu8; 4096];
    for at in [0u64, 32 << 20, (64 << 20) - 4096] {
        kept.write_slice(&secret, MemoryRegionAddress(at))
            .expect("write VRAM");
    }
    // The first tenant leaves but keeps its mapping of the VRAM file.
    drop(first);
    wait_attached(&server, "s", false);
    let mut page = [0u8; 4096];
    for at in [0u64, 32 << 20, (64 << 20) - 4096] {
        kept.read_slice(&mut page, MemoryRegionAddress(at))
            .expect("read kept mapping");
        assert!(
            page.iter().all(|&b| b == 0),
            "kept mapping at {at:#x} still holds data"
        );
    }
    // The next tenant gets its own, zeroed VRAM; the old mapping cannot see its writes.
    let second = vfio_user::Client::new(&sock).expect("reconnect");
    let fresh = map_vram(&second);
    fresh
        .read_slice(&mut page, MemoryRegionAddress(0))
        .expect("read");
    assert!(page.iter().all(|&b| b == 0), "new tenant sees old data");
    fresh
        .write_slice(&[0x11; 64], MemoryRegionAddress(0))
        .expect("write");
    kept.read_slice(&mut page, MemoryRegionAddress(0))
        .expect("read kept mapping");
    assert!(
        page.iter().all(|&b| b == 0),
        "old mapping sees the new tenant"
    );
}

#[test]
fn malformed_vfio_user_messages_do_not_take_the_server_down() {
    let server = Server::start("malformed", &["--gpu", "soft,vram=512M,engines=1"]);
    let sock = server.ok(&["vgpu", "create", "--type", "64M", "--name", "m"]);
    let sock = sock.trim();
    // Header: id, command, message_size, flags, error.
    let header = |cmd: u16, size: u32| {
        let mut h = Vec::new();
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&cmd.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h
    };
    let mut attacks: Vec<Vec<u8>> = vec![
        // A version message shorter than its own header.
        [header(1, 8), vec![0, 0, 1, 0]].concat(),
        // A version string without its NUL.
        [header(1, 24), vec![0, 0, 1, 0], b"{}{}".to_vec()].concat(),
        // An unknown command, then garbage.
        [header(0x7777, 16), vec![0xff; 64]].concat(),
        // A region read of 1 GiB at a huge offset of a region that does not exist.
        [
            header(9, 32),
            99u32.to_le_bytes().to_vec(),
            u64::MAX.to_le_bytes().to_vec(),
            (1u32 << 30).to_le_bytes().to_vec(),
        ]
        .concat(),
    ];
    attacks.push(vec![0x42; 7]);
    for (i, bytes) in attacks.iter().enumerate() {
        let mut s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
        drop(s);
        wait_attached(&server, "m", false);
        // Still serving: a well-formed client gets the device.
        let mut c = vfio_user::Client::new(Path::new(sock))
            .unwrap_or_else(|e| panic!("attack {i} broke the instance: {e}\n{}", server.log()));
        let mut id = [0u8; 4];
        c.region_read(7, 0, &mut id).expect("config read");
        assert_eq!(u32::from_le_bytes(id), 0x0001_7e55, "after attack {i}");
        // Reads past a region are all ones, never an error reply (which would hang the
        // crate's client).
        let mut far = [0u8; 8];
        c.region_read(0, 1 << 40, &mut far).expect("far read");
        assert_eq!(far, [0xff; 8]);
    }
    let status = server.stop();
    assert!(status.success(), "{status}");
}

#[test]
fn cloud_hypervisor_passes_the_conformance_suite_over_vfio_user() {
    cloud_hypervisor_conformance("ch", "soft,vram=1G,engines=2", 2);
}

/// An unmodified Cloud Hypervisor with a Vulkan-backed vGPU (lavapipe in CI).
#[test]
fn cloud_hypervisor_passes_the_conformance_suite_on_a_vulkan_gpu() {
    if tessera_tests::vulkan_available() {
        cloud_hypervisor_conformance("ch-vulkan", "vulkan,vram=1G", 1);
    }
}

/// The conformance suite in Cloud Hypervisor against `tessera serve --gpu GPU` (its server
/// directory named `name`), `rounds` times on one instance.
fn cloud_hypervisor_conformance(name: &str, gpu: &str, rounds: u64) {
    let (Some(ch), Some(fw)) = (cloud_hypervisor(), firmware()) else {
        return;
    };
    let server = Server::start(name, &["--gpu", gpu]);
    let sock = server.ok(&["vgpu", "create", "--type", "256M", "--name", "ch"]);
    let sock = sock.trim().to_string();
    // More than once: the instance can be attached again after a VMM goes away.
    for round in 1..=rounds {
        let mut cmd = Command::new(&ch);
        cmd.args(["--kernel", fw.to_str().expect("utf-8")])
            .args(["--cmdline", "run=conformance pci=external"])
            .args(["--cpus", "boot=1", "--memory", "size=128M,shared=on"])
            .args(["--user-device", &format!("socket={sock}")])
            .args(["--serial", "tty", "--console", "off"]);
        let mut vm = Vmm::spawn_with(&mut cmd);
        vm.expect_line(" passed", Duration::from_secs(120));
        // Cloud Hypervisor has no debug-exit port: the firmware powers off through its ACPI
        // sleep register, and Cloud Hypervisor ends by itself.
        let status = vm.wait(Duration::from_secs(60));
        vm.assert_conformance(40);
        assert!(status.success(), "{status}");
        let inst = wait_attached(&server, "ch", false);
        assert_eq!(inst["attachments"], round);
    }
    let stats = server.json(&["top", "-n", "1"]);
    let ch = &stats["vgpus"][0];
    assert_eq!(ch["name"], "ch", "{stats}");
    assert!(ch["busy_ns"].as_u64().unwrap_or(0) > 0, "GPU time: {stats}");
    assert!(
        ch["context_switches"].as_u64().unwrap_or(0) > 0,
        "scheduled: {stats}"
    );
}

/// `tessera vm` with the firmware and one vfio-user vGPU.
/// GPU time `name` gets per second of wall time, over `window`.
fn gpu_rate(server: &Server, name: &str, window: Duration) -> f64 {
    let (b0, t0) = (server.busy_ns(name), Instant::now());
    std::thread::sleep(window);
    let (b1, t1) = (server.busy_ns(name), Instant::now());
    (b1 - b0) as f64 / (t1 - t0).as_nanos() as f64
}

#[test]
fn tessera_vm_passes_the_conformance_suite_over_vfio_user() {
    conformance_over_vfio_user(
        "own-client",
        "soft,vram=1G,engines=2",
        "GPU: soft (2 engines)",
    );
}

/// The same on a Vulkan GPU (lavapipe in CI): every command through the vGPU's own Vulkan
/// device, served under the server's seccomp filter.
#[test]
fn the_conformance_suite_passes_on_a_vulkan_gpu_over_vfio_user() {
    if !tessera_tests::vulkan_available() {
        return;
    }
    conformance_over_vfio_user("vulkan", "vulkan,vram=1G", "GPU: vulkan (");
}

/// The conformance suite through `tessera serve --gpu GPU`, whose `vgpu types` names the GPU
/// with `says`.
fn conformance_over_vfio_user(name: &str, gpu: &str, says: &str) {
    if firmware().is_none() {
        return;
    }
    let server = Server::start(name, &["--gpu", gpu]);
    let types = server.ok(&["vgpu", "types"]);
    assert!(types.starts_with(says), "{types}");
    // Scripts can ask what they talk to.
    let v = server.json(&["vgpu", "version"]);
    assert_eq!(v["schema"], 1, "{v}");
    assert!(v["version"].is_string(), "{v}");
    let sock = server.ok(&["vgpu", "create", "--type", "256M", "--name", "own"]);
    let mut vm = user_vm(sock.trim(), "run=conformance");
    let status = vm.wait(Duration::from_secs(120));
    vm.assert_conformance(40);
    // Every check runs: our VMM emulates decoding and the MSI-X table itself.
    assert!(!vm.saw("skip"), "{}", vm.transcript.join("\n"));
    assert_eq!(status.code(), Some(0), "{}", server.log());
    wait_attached(&server, "own", false);
}

#[test]
fn a_killed_vmm_leaves_its_neighbour_running_and_its_instance_reusable() {
    if firmware().is_none() {
        return;
    }
    let server = Server::start("kill", &["--gpu", "soft,vram=1G,engines=2"]);
    let a = server.ok(&["vgpu", "create", "--type", "64M", "--name", "a"]);
    let b = server.ok(&["vgpu", "create", "--type", "64M", "--name", "b"]);
    let mut vm_a = user_vm(a.trim(), "run=load kind=busy seconds=8");
    let vm_b = user_vm(b.trim(), "run=load kind=busy seconds=60");
    wait_attached(&server, "a", true);
    wait_attached(&server, "b", true);
    // Both running: a gets its share of the GPU.
    let shared = gpu_rate(&server, "a", Duration::from_millis(1500));
    assert!(shared > 0.2, "a runs while b runs: {shared}");
    // SIGKILL b mid-job.
    drop(vm_b);
    wait_attached(&server, "b", false);
    let after = gpu_rate(&server, "a", Duration::from_millis(1500));
    eprintln!("a's GPU time per second: {shared:.3} with b, {after:.3} after b was killed");
    assert!(
        after >= 0.95 * shared,
        "a's GPU time per second fell from {shared:.3} to {after:.3} when b was killed"
    );
    // b's instance takes a new VM, which starts from a clean device.
    let mut vm_c = user_vm(b.trim(), "run=load kind=busy seconds=1");
    let status = vm_c.wait(Duration::from_secs(60));
    let out = vm_c.transcript.join("\n");
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(vm_c.saw("faults=0"), "{out}");
    let status = vm_a.wait(Duration::from_secs(60));
    let out = vm_a.transcript.join("\n");
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(vm_a.saw("faults=0"), "{out}");
}

#[test]
fn a_dead_server_is_seen_by_the_vmm_within_a_second() {
    if firmware().is_none() {
        return;
    }
    let mut server = Server::start("dead", &["--gpu", "soft,vram=1G,engines=2"]);
    let sock = server.ok(&["vgpu", "create", "--type", "64M", "--name", "d"]);
    let mut vm = user_vm(sock.trim(), "run=load kind=busy seconds=60");
    wait_attached(&server, "d", true);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.busy_ns("d") == 0 {
        assert!(Instant::now() < deadline, "the load never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Instant::now();
    server.kill();
    // The guest's next register read returns the lost-device value and its load gives up.
    vm.expect_line("load failed", Duration::from_secs(10));
    let seen = killed.elapsed();
    eprintln!("the guest saw the server die after {seen:?}");
    assert!(seen <= Duration::from_secs(1), "took {seen:?}");
    let status = vm.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", vm.transcript.join("\n"));
}

#[test]
fn user_device_errors_are_one_clear_line() {
    let Some(fw) = firmware() else {
        return;
    };
    let fw = fw.to_str().expect("utf-8").to_string();
    let vm = |dev: &str| {
        tessera_tests::run_tessera(
            &[
                "vm",
                "--kernel",
                &fw,
                "--memory",
                "64M",
                "--user-device",
                dev,
            ],
            &[],
        )
    };
    // No such socket: a usage error.
    let (status, _, err) = vm("socket=/nonexistent/vgpu.sock");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("tessera: ") && err.contains("no vGPU socket"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // Malformed flag.
    let (status, _, err) = vm("path=/x");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--user-device"), "{err}");
    // An instance another client holds: refused after the connect timeout, not a hang.
    let server = Server::start("busy", &["--gpu", "soft,vram=512M,engines=1"]);
    let sock = server.ok(&["vgpu", "create", "--type", "64M", "--name", "b"]);
    let holder = vfio_user::Client::new(Path::new(sock.trim())).expect("first client");
    wait_attached(&server, "b", true);
    let started = Instant::now();
    let (status, _, err) = vm(&format!("socket={}", sock.trim()));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("another VM attached"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(holder);
    wait_attached(&server, "b", false);
}

#[test]
fn partitions_and_policies_are_served() {
    let server = Server::start(
        "parts",
        &[
            "--gpu",
            "soft,vram=1G,engines=2,partitions=2",
            "--policy",
            "best-effort",
            "--slice",
            "5ms",
        ],
    );
    let stats = server.json(&["top", "-n", "1"]);
    let parts = stats["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 2, "{stats}");
    for p in parts {
        assert_eq!(p["spec"]["engines"], 1, "{stats}");
        assert_eq!(p["policy"], "best-effort", "{stats}");
        assert_eq!(p["slice_us"], 5000, "{stats}");
    }
    let inst = server.json(&[
        "vgpu",
        "create",
        "--type",
        "256M",
        "--partition",
        "1",
        "--cap",
        "50",
    ]);
    assert_eq!(inst["instance"]["partition"], 1, "{inst}");
    assert_eq!(inst["instance"]["cap"], 50, "{inst}");
    for (args, needle) in [
        (
            &["vgpu", "create", "--type", "64M", "--partition", "2"][..],
            "partition 2",
        ),
        (
            &["vgpu", "create", "--type", "1G", "--partition", "0"][..],
            "no room",
        ),
        (
            &["vgpu", "create", "--type", "64M", "--cap", "101"][..],
            "cap",
        ),
        (&["vgpu", "policy", "fastest"][..], "policy"),
    ] {
        refused(&server, args, needle);
    }
    // 512 MiB per partition: one 256M left in partition 1, two in partition 0.
    assert_eq!(available(&server, "256M"), 3);
}

fn fill(dst: u64, len: u64, pattern: u32) -> vgpu_abi::Packet {
    vgpu_abi::Packet::new(
        vgpu_abi::packet::OP_FILL,
        0,
        &[dst, len, u64::from(pattern)],
    )
}

#[test]
fn a_client_that_truncates_its_memory_costs_only_its_own_vgpu() {
    use vgpu::host::HostError;
    let server = Server::start("truncate", &["--gpu", "soft,vram=512M,engines=2"]);
    let hostile = server.ok(&["vgpu", "create", "--type", "64M", "--name", "hostile"]);
    let neighbour = server.ok(&["vgpu", "create", "--type", "64M", "--name", "neighbour"]);
    let (hostile, neighbour) = (hostile.trim().to_string(), neighbour.trim().to_string());
    // A busy neighbour: spinning kernels and FILLs checked bit for bit.
    let busy = std::thread::spawn(move || {
        let mut c =
            vgpu_server::remote::connect(Path::new(&neighbour), 16 << 20, true).expect("attach");
        let buf = c.alloc(1 << 20).expect("alloc");
        for round in 0..40u32 {
            let spin = vgpu_abi::Packet::new(
                vgpu_abi::packet::OP_DISPATCH,
                vgpu_abi::kernel::SPIN_US,
                &[2_000, 4],
            );
            c.run(&[spin, fill(buf, 1 << 20, round)])
                .expect("neighbour work");
            let mut back = vec![0u8; 1 << 20];
            c.read(buf, &mut back).expect("read");
            assert!(
                back.chunks_exact(4).all(|w| w == round.to_le_bytes()),
                "round {round}: wrong FILL result"
            );
        }
    });
    // The hostile client maps 16 MiB it did not seal, queues a FILL high in it, truncates
    // the file to 4 MiB (its ring and page tables stay) and rings the doorbell.
    let mut c = vgpu_server::remote::connect(Path::new(&hostile), 16 << 20, false).expect("attach");
    c.alloc(8 << 20).expect("alloc");
    let high = c.alloc(4 << 20).expect("alloc");
    assert!(high >= 8 << 20);
    c.memory_file()
        .expect("a remote client has a memory file")
        .set_len(4 << 20)
        .expect("truncate");
    match c.run(&[fill(high, 4 << 20, 0xdead_beef)]) {
        Err(HostError::Fault { code, .. }) => assert_eq!(code, vgpu_abi::fault::DMA_DOMAIN),
        other => panic!(
            "expected a DMA_DOMAIN fault, got {other:?}\n{}",
            server.log()
        ),
    }
    busy.join().expect("the neighbour finished its work");
    // The server is up, says why, and serves the instance again.
    drop(c);
    wait_attached(&server, "hostile", false);
    let mut again =
        vgpu_server::remote::connect(Path::new(&hostile), 16 << 20, true).expect("re-attach");
    let buf = again.alloc(4096).expect("alloc");
    again
        .run(&[fill(buf, 4096, 7)])
        .expect("a new client works");
    let log = server.log();
    assert!(log.contains("client memory was truncated"), "{log}");
    assert!(!log.contains("seccomp"), "{log}");
    let status = server.stop();
    assert!(status.success(), "{status}");
}

/// The server's virtual address space, in bytes.
fn vm_size(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmSize in {status}"));
    kb << 10
}

/// Maps chunks of 1 TiB of a sparse 2^62-byte sealed memfd at increasing IOVAs, as many as
/// the server takes (the crate's client does not report refusals; the server's size does).
fn map_huge(socket: &str, chunks: u64) -> vfio_user::Client {
    let f = vgpu::backend::memfd("huge", 1 << 62, true).expect("sparse memfd");
    let mut c = vfio_user::Client::new(Path::new(socket)).expect("connect");
    for i in 0..chunks {
        use std::os::fd::AsRawFd;
        c.dma_map(i << 40, i << 40, 1 << 40, f.as_raw_fd())
            .expect("DMA_MAP message");
    }
    c
}

#[test]
fn no_client_can_exhaust_the_servers_address_space() {
    let server = Server::start(
        "mapped",
        &[
            "--gpu",
            "soft,vram=512M,engines=2",
            "--max-client-memory",
            "1T",
            "--max-mapped",
            "2049G",
        ],
    );
    let base = vm_size(&server);
    let sockets = server.instances("64M", &["a", "b", "c", "n"]);
    // Two clients try 64 TiB each: each gets its 1 TiB. A third finds the server's total
    // (2 TiB + 1 GiB) spent and gets nothing.
    let hostile: Vec<_> = sockets[..3].iter().map(|s| map_huge(s, 64)).collect();
    let grown = vm_size(&server).saturating_sub(base);
    assert!(
        grown <= (2 << 40) + (1 << 30),
        "the server mapped {grown:#x} bytes for three hostile clients"
    );
    assert!(
        grown >= 2 << 40,
        "each hostile client keeps its 1 TiB ({grown:#x})"
    );
    // Meanwhile the control plane answers promptly, a new instance can be created, and a
    // neighbour on another instance attaches (VRAM mapped) and works.
    let t = Instant::now();
    let list = server.json(&["vgpu", "list"]);
    assert_eq!(
        list["instances"].as_array().map(Vec::len),
        Some(4),
        "{list}"
    );
    eprintln!("vgpu list under attack: {:?}", t.elapsed());
    server.ok(&["vgpu", "create", "--type", "64M", "--name", "late"]);
    let mut n = vgpu_server::remote::connect(Path::new(&sockets[3]), 16 << 20, true)
        .expect("a neighbour attaches");
    let buf = n.alloc(4096).expect("alloc");
    n.run(&[fill(buf, 4096, 0x5a5a_5a5a)])
        .expect("the neighbour's work runs");
    let mut back = [0u8; 4096];
    n.read(buf, &mut back).expect("read");
    assert!(back.iter().all(|&b| b == 0x5a));
    // The limits are per client: when the hostile clients leave, their bytes come back.
    drop(hostile);
    for name in ["a", "b", "c"] {
        wait_attached(&server, name, false);
    }
    let after = vm_size(&server).saturating_sub(base);
    assert!(
        after < 1 << 40,
        "{after:#x} bytes still mapped after the clients left"
    );
    drop(n);
    let status = server.stop();
    assert!(status.success(), "{status}");
}

#[test]
fn instances_belong_to_their_owner_and_record_their_peer() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: handing a socket to another user needs root");
        return;
    }
    let server = Server::start("owner", &["--gpu", "soft,vram=256M,engines=1"]);
    let sock = server.ok(&[
        "vgpu", "create", "--type", "64M", "--name", "o", "--owner", "65534",
    ]);
    let sock = sock.trim().to_string();
    let m = std::fs::metadata(&sock).expect("socket");
    assert_eq!((m.uid(), m.mode() & 0o777), (65534, 0o600));
    // Root may attach; the server records who is attached (under its sandbox).
    let mut c = vgpu_server::remote::connect(Path::new(&sock), 16 << 20, true).expect("attach");
    let buf = c.alloc(4096).expect("alloc");
    c.run(&[fill(buf, 4096, 1)]).expect("work");
    let list = server.json(&["vgpu", "list"]);
    let o = &list["instances"][0];
    assert_eq!(o["owner"], 65534, "{list}");
    assert_eq!(o["peer"]["uid"], 0, "{list}");
    assert_eq!(o["peer"]["pid"], std::process::id(), "{list}");
    drop(c);
    let status = server.stop();
    assert!(status.success(), "{status}");
}

/// `tessera serve --metrics-addr`: an HTTP scrape while a VM works shows its GPU time and the
/// server's gauges, in the OpenMetrics format, and a second scrape sees the counters move.
#[test]
fn metrics_are_scraped_over_http_while_a_vm_runs() {
    if firmware().is_none() {
        return;
    }
    let server = Server::start(
        "metrics",
        &[
            "--gpu",
            "soft,vram=1G,engines=2",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let log = server.log();
    let url = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("url=http://"))
        .unwrap_or_else(|| panic!("no metrics URL in the log: {log}"));
    let (addr, path) = url.split_once('/').expect("host:port/path");
    let sock = server.ok(&["vgpu", "create", "--type", "64M", "--name", "m"]);
    let mut vm = user_vm(sock.trim(), "run=load kind=busy seconds=6");
    wait_attached(&server, "m", true);
    let busy = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix("tessera_vgpu_busy_seconds_total{vgpu=\"m\",partition=\"0\"} ")
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no busy seconds of m in:\n{text}"))
    };
    let first = http_get(addr, &format!("/{path}"));
    assert!(
        first.starts_with("HTTP/1.0 200"),
        "status line of:\n{first}"
    );
    assert!(first.contains("application/openmetrics-text"), "{first}");
    for line in [
        "# TYPE tessera_vgpu_busy_seconds counter",
        "# HELP tessera_partition_vram_free_bytes",
        "tessera_partition_vram_free_bytes{partition=\"0\"} 1006632960.0",
        "tessera_server_instances 1.0",
        "tessera_server_attached_instances 1.0",
        "# EOF",
    ] {
        assert!(first.contains(line), "no {line:?} in:\n{first}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let second = http_get(addr, &format!("/{path}"));
    assert!(
        busy(&second) > busy(&first),
        "the busy VM's GPU time did not move:\n{first}\n{second}"
    );
    assert!(http_get(addr, "/nothing").starts_with("HTTP/1.0 404"));
    assert_eq!(vm.wait(Duration::from_secs(60)).code(), Some(0));
}

/// The metrics listener holds no more than `MAX_SCRAPERS` connections, each for at most
/// `SCRAPE_TIMEOUT`: clients that open connections and send half a request get the busy ones
/// a `503` and are closed within the timeout, after which scrapes are answered again; a
/// request that is no HTTP gets a `400`.
#[test]
fn the_metrics_listener_bounds_idle_and_slow_scrapers() {
    use std::io::Read;
    use vgpu_server::metrics::{MAX_SCRAPERS, SCRAPE_TIMEOUT};
    let server = Server::start("metrics-bound", &["--metrics-addr", "127.0.0.1:0"]);
    let log = server.log();
    let addr = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("url=http://"))
        .and_then(|u| u.split_once('/'))
        .map(|(a, _)| a.to_string())
        .unwrap_or_else(|| panic!("no metrics URL in the log: {log}"));
    let slow: Vec<_> = (0..MAX_SCRAPERS)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.write_all(b"GET /metr").expect("half a request");
            s
        })
        .collect();
    // Every slot is taken (the listener counts a connection as soon as it accepts it, and it
    // accepts in order): the next one is turned away at once.
    let turned_away = loop {
        let r = http_get(&addr, "/metrics");
        if r.starts_with("HTTP/1.1 503") {
            break r;
        }
        assert!(r.starts_with("HTTP/1.0 200"), "{r}");
    };
    assert!(turned_away.contains("retry"), "{turned_away}");
    // The slow ones are closed with nothing said, within the timeout.
    let started = std::time::Instant::now();
    for mut s in slow {
        s.set_read_timeout(Some(SCRAPE_TIMEOUT * 4))
            .expect("timeout");
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).expect("closed"), 0);
    }
    assert!(started.elapsed() < SCRAPE_TIMEOUT * 3);
    // Slots come back as their threads end.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = http_get(&addr, "/metrics");
        if r.starts_with("HTTP/1.0 200") {
            assert!(r.contains("tessera_server_instances"), "{r}");
            break;
        }
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(std::time::Instant::now() < deadline, "no slot came back");
        std::thread::yield_now();
    }
    let mut junk = std::net::TcpStream::connect(&addr).expect("connect");
    junk.write_all(b"\x16\x03\x01 not http\r\n\r\n")
        .expect("send");
    let mut answer = String::new();
    junk.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// One HTTP/1.0 GET (the server closes the connection after answering): the whole response.
/// A busy server answers `503` at once, without reading the request, and closes: the request
/// may then fail to go out, and the close may reset the connection after the answer. What
/// came before the reset is the response.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics server");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let sent = write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read the response: {e}"),
        }
    }
    assert!(
        !response.is_empty(),
        "no response (sending the request: {sent:?})"
    );
    String::from_utf8(response).expect("UTF-8")
}

/// A client that stops its vGPU through migration v2 and then misbehaves, against the real
/// server: unmapping DMA memory while stopped is refused (`EBUSY`: a packet parked inside could
/// still write it), a reset while stopped returns at once and leaves the device RUNNING, an
/// arc VFIO forbids is refused and changes nothing, and a full state read (STOP_COPY) starts
/// with the stream's header and holds all of VRAM.
#[test]
fn a_stopped_vgpu_refuses_dma_changes_and_takes_a_reset_at_once() {
    use std::os::fd::AsRawFd;
    use vfu::DeviceState::*;
    let server = Server::start("vfu-stop", &[]);
    let sock = server.instances("64M", &["a"]).remove(0);
    let mut c = vfu::Client::new(Path::new(&sock)).expect("connect");
    let ram = vgpu::backend::memfd("ram", 2 << 20, true).expect("memfd");
    // Whole pages only, as VFIO asks.
    for (offset, address, size) in [(0, 0x802, 0x1000), (0, 0, 0x1002), (0x802, 0, 0x1000)] {
        let e = c
            .dma_map(offset, address, size, ram.as_raw_fd())
            .expect_err("a DMA region of part of a page");
        assert_eq!(e.errno(), Some(libc::EINVAL as u32), "{e}");
    }
    c.dma_map(0, 0, 2 << 20, ram.as_raw_fd()).expect("DMA_MAP");
    assert_eq!(c.migration_flags().expect("migration"), 5);
    c.set_device_state(Stop).expect("STOP");
    let busy = c.dma_unmap(0, 2 << 20).expect_err("unmap while stopped");
    assert_eq!(busy.errno(), Some(libc::EBUSY as u32), "{busy}");
    let t = std::time::Instant::now();
    c.reset().expect("reset");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a reset while stopped took {:?}",
        t.elapsed()
    );
    assert_eq!(c.device_state().expect("state"), Running);
    c.dma_unmap(0, 2 << 20).expect("unmap while running");

    c.set_device_state(StopCopy)
        .expect("RUNNING -> STOP -> STOP_COPY");
    let refused = c
        .set_device_state(PreCopy)
        .expect_err("STOP_COPY -> PRE_COPY");
    assert_eq!(refused.errno(), Some(libc::EINVAL as u32), "{refused}");
    assert_eq!(c.device_state().expect("state"), StopCopy);
    let mut stream = Vec::new();
    loop {
        let d = c.mig_read(1 << 20).expect("MIG_DATA_READ");
        if d.is_empty() {
            break;
        }
        stream.extend(d);
    }
    assert_eq!(stream.first(), Some(&b'H'));
    assert!(stream.len() as u64 > 64 << 20, "{} bytes", stream.len());
    c.set_device_state(Running).expect("back to RUNNING");
    // Still a working device: BAR 0 answers with its magic.
    let mut magic = [0u8; 4];
    c.region_read(0, vgpu_abi::regs::MAGIC, &mut magic)
        .expect("MAGIC");
    assert_eq!(u32::from_le_bytes(magic), vgpu_abi::regs::MAGIC_VALUE);
}
