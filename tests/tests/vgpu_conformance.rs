//! The firmware's vGPU conformance suite in a real KVM VM, against the in-process vGPU.
//! Every case prints one line; the VM's exit status is 0 only if all passed.

use std::time::Duration;

use tessera_tests::{Vmm, firmware};

fn conformance(profile: &str, memory: &str, gpu: &str) {
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
        "--gpu",
        gpu,
    ]);
    let status = vm.wait(Duration::from_secs(300));
    vm.assert_conformance(20);
    assert_eq!(status.code(), Some(0), "{}", vm.transcript.join("\n"));
}

#[test]
fn conformance_suite_passes_in_process() {
    conformance("profile=256M", "256M", "soft");
}

/// The same on a Vulkan GPU (lavapipe in CI), with the vGPU's device and the driver's threads
/// under the VM's device filter.
#[test]
fn conformance_suite_passes_in_process_on_vulkan() {
    if tessera_tests::vulkan_available() {
        conformance("profile=256M", "256M", "vulkan");
    }
}

/// Large kernels allocate and free big host buffers on the GPU's threads; under the seccomp
/// filters (on by default) glibc then tries to open /proc/sys/vm/overcommit_memory, which must
/// fail harmlessly rather than kill the VM.
#[test]
fn large_kernels_run_under_seccomp() {
    let Some(fw) = firmware() else { return };
    for cmdline in [
        "run=bench-throughput kernel=sgemm size=256 batch=2",
        "run=bench-throughput kernel=saxpy size=4194304 batch=2",
    ] {
        let mut vm = Vmm::spawn(&[
            "vm",
            "--kernel",
            fw.to_str().expect("utf-8"),
            "--cmdline",
            cmdline,
            "--memory",
            "256M",
            "--vgpu",
            "profile=64M",
        ]);
        vm.expect_line("tessera-fw: bench throughput", Duration::from_secs(60));
        assert_eq!(vm.wait(Duration::from_secs(60)).code(), Some(0));
    }
}
