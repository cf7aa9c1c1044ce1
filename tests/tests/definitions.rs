//! Persistent vGPU definitions, the mdevctl way: `tessera vgpu define` writes them to the state
//! directory, `tessera serve` creates the `--auto` ones whenever it starts (after a SIGKILL
//! too) with their name, UUID, weight and cap, instances are addressable by UUID, and a
//! corrupt definition stops the server with one line naming the file.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tessera_tests::{Server, run_with_deadline, scratch, tessera_bin};

fn names(list: &serde_json::Value, key: &str) -> Vec<String> {
    list[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key}: {list}"))
        .iter()
        .map(|i| i["name"].as_str().expect("a name").to_string())
        .collect()
}

#[test]
fn defined_instances_survive_a_killed_server() {
    let state = scratch("defs-state");
    let st = state.to_str().expect("utf-8");
    let mut server = Server::start("defs-first", &["--state-dir", st]);
    let vgpu = |server: &Server, args: &[&str]| {
        let mut a = vec!["vgpu", "--state-dir", st];
        a.extend_from_slice(args);
        server.ok(&a)
    };
    let keep = vgpu(
        &server,
        &[
            "define", "--type", "64M", "--name", "keep", "--weight", "3", "--cap", "50", "--auto",
        ],
    );
    let keep = keep.trim();
    let manual: serde_json::Value = serde_json::from_str(&vgpu(
        &server,
        &["--json", "define", "--type", "256M", "--partition", "0"],
    ))
    .expect("JSON");
    assert_eq!(manual["schema"], 1, "{manual}");
    let manual_uuid = manual["uuid"].as_str().expect("a uuid").to_string();
    let manual_name = manual["name"].as_str().expect("a name").to_string();
    assert!(manual_name.starts_with("vgpu-"), "{manual}");

    // Defining creates nothing; `start` does, by UUID as well as by name.
    assert!(names(&server.json(&["vgpu", "list"]), "instances").is_empty());
    let sock = vgpu(&server, &["start", &manual_uuid]);
    assert!(PathBuf::from(sock.trim()).exists(), "{sock}");
    let defined: serde_json::Value =
        serde_json::from_str(&vgpu(&server, &["--json", "list", "--defined"])).expect("JSON");
    let running: Vec<(String, bool)> = defined["definitions"]
        .as_array()
        .expect("definitions")
        .iter()
        .map(|d| (d["name"].as_str().unwrap().into(), d["running"] == true))
        .collect();
    let mut want = vec![("keep".to_string(), false), (manual_name.clone(), true)];
    want.sort();
    assert_eq!(running, want, "{defined}");
    server.ok(&["vgpu", "create", "--type", "64M", "--name", "transient"]);

    // A crash: every instance goes with the process.
    server.kill();
    drop(server);
    let server = Server::start("defs-second", &["--state-dir", st]);
    let list = server.json(&["vgpu", "list"]);
    assert_eq!(names(&list, "instances"), ["keep"], "{list}");
    let i = &list["instances"][0];
    assert_eq!(
        (&i["uuid"], &i["type"], &i["weight"], &i["cap"]),
        (
            &serde_json::json!(keep),
            &serde_json::json!("64M"),
            &serde_json::json!(3),
            &serde_json::json!(50)
        ),
        "{list}"
    );
    assert!(
        server
            .log()
            .contains("vGPU instance started from its definition name=\"keep\""),
        "{}",
        server.log()
    );

    // Instances and definitions are addressable by UUID.
    server.ok(&["vgpu", "remove", keep]);
    assert!(names(&server.json(&["vgpu", "list"]), "instances").is_empty());
    vgpu(&server, &["undefine", keep]);
    let defined: serde_json::Value =
        serde_json::from_str(&vgpu(&server, &["--json", "list", "--defined"])).expect("JSON");
    assert_eq!(
        names(&defined, "definitions"),
        std::slice::from_ref(&manual_name)
    );

    // Refused definitions: status 2, a line saying why, nothing written.
    for (args, why) in [
        (
            &["define", "--type", "3G", "--name", "x"][..],
            "unknown vGPU type",
        ),
        (
            &["define", "--type", "64M", "--name", &manual_name],
            "already defined",
        ),
        (&["define", "--type", "64M", "--weight", "0"], "weight 0"),
        (&["undefine", "nothing-here"], "no vGPU definition"),
        (&["start", "nothing-here"], "no vGPU definition"),
    ] {
        let mut a = vec!["vgpu", "--state-dir", st];
        a.extend_from_slice(args);
        let (status, _, err) = server.client(&a);
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    let defined: serde_json::Value =
        serde_json::from_str(&vgpu(&server, &["--json", "list", "--defined"])).expect("JSON");
    assert_eq!(names(&defined, "definitions"), [manual_name]);
    drop(server);
    let _ = std::fs::remove_dir_all(&state);
}

/// A definition file that is not a definition stops the server at start with status 2 and a
/// line naming the file, instead of a server that silently lacks the instance.
#[test]
fn a_corrupt_definition_stops_the_server_naming_its_file() {
    let root = scratch("defs-corrupt");
    let vgpus = root.join("state/vgpus");
    std::fs::create_dir_all(&vgpus).expect("state dir");
    let file = vgpus.join("0b4c7a52-8d3e-4f43-9a3c-3f6a1f0e2b11.json");
    std::fs::write(&file, b"{\"schema\": 1, \"uuid\": ").expect("write");
    let mut cmd = Command::new(tessera_bin());
    cmd.arg("serve")
        .arg("--dir")
        .arg(root.join("run"))
        .arg("--state-dir")
        .arg(root.join("state"));
    let (status, _, err) = run_with_deadline(cmd, Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("corrupt vGPU definition {}", file.display())),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&root);
}
