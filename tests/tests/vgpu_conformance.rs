//! The firmware's vGPU conformance suite in a real KVM VM, against the in-process vGPU.
//! Every case prints one line; the VM's exit status is 0 only if all passed.

use std::time::Duration;

use tessera_tests::{Vmm, firmware};

fn conformance(profile: &str, memory: &str) {
    let Some(fw) = firmware() else { return };
    let mut vm = Vmm::spawn(&[
        "vm",
        "--kernel",
        fw.to_str().expect("utf-8"),
        "--cmdline",
        "run=conformance",
        "--memory",
        memory,
        "--vgpu",
        profile,
    ]);
    let status = vm.wait(Duration::from_secs(300));
    let out = vm.transcript.join("\n");
    let cases: Vec<&String> = vm
        .transcript
        .iter()
        .filter(|l| l.starts_with("tessera-fw: case "))
        .collect();
    assert!(cases.len() >= 20, "expected the full suite, got:\n{out}");
    let failed: Vec<&&String> = cases.iter().filter(|l| !l.ends_with(" ok")).collect();
    assert!(failed.is_empty(), "failed cases: {failed:?}\n{out}");
    assert!(
        vm.saw(&format!("conformance {0}/{0} passed", cases.len())),
        "{out}"
    );
    assert_eq!(status.code(), Some(0), "{out}");
}

#[test]
fn conformance_suite_passes_in_process() {
    conformance("profile=256M", "256M");
}
