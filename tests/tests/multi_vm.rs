//! Firmware VMs (each its own KVM VM, in one `tessera` process) sharing one physical GPU:
//! the scheduler's shares as the VMs see them.

use std::time::Duration;

use tessera_tests::{firmware, measuring_alone, run_with_deadline, tessera_bin};

fn bench_vms(args: &[&str]) -> Option<String> {
    let fw = firmware()?;
    let mut cmd = std::process::Command::new(tessera_bin());
    cmd.args([
        "--log-level",
        "warn",
        "bench",
        "vms",
        "--json",
        "--firmware",
    ])
    .arg(fw)
    .args(args);
    let (status, out, err) = run_with_deadline(cmd, Duration::from_secs(120));
    assert!(status.success(), "bench vms failed: {err}\n{out}");
    Some(out)
}

fn field(json: &str, key: &str) -> Vec<f64> {
    json.lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("\"{key}\": ")))
        .filter_map(|v| v.trim_end_matches(',').parse().ok())
        .collect()
}

#[test]
fn four_busy_vms_share_equally() {
    let _alone = measuring_alone();
    let Some(out) = bench_vms(&["--loads", "busy,busy,busy,busy", "--seconds", "3"]) else {
        return;
    };
    let jain = field(&out, "jain_busy");
    assert!(jain[0] >= 0.99, "{out}");
    assert_eq!(
        field(&out, "schema"),
        [1.0],
        "every JSON document says its schema: {out}"
    );
    for share in field(&out, "share") {
        assert!((share - 0.25).abs() < 0.03, "{out}");
    }
}

#[test]
fn weighted_vms_get_proportional_time() {
    let _alone = measuring_alone();
    weighted_shares(&[]);
}

/// Four busy VMs with weights 1:2:4:8 (fixed-share) on the GPU `gpu` flags pick get time in
/// proportion.
fn weighted_shares(gpu: &[&str]) {
    let mut args = gpu.to_vec();
    args.extend([
        "--loads",
        "busy,busy,busy,busy",
        "--weights",
        "1,2,4,8",
        "--policy",
        "fixed-share",
        "--seconds",
        "3",
    ]);
    let Some(out) = bench_vms(&args) else {
        return;
    };
    for (share, w) in field(&out, "share").iter().zip([1.0, 2.0, 4.0, 8.0]) {
        assert!(
            (share - w / 15.0).abs() < 0.02,
            "share {share} for weight {w}: {out}"
        );
    }
}

/// Four VMs share one Vulkan GPU (lavapipe in CI) by weight, like the software GPU.
#[test]
fn vms_share_a_vulkan_gpu_by_weight() {
    if !tessera_tests::vulkan_available() {
        return;
    }
    let _alone = measuring_alone();
    weighted_shares(&["--gpu", "vulkan"]);
}

/// A short soak: eight tenants (firmware VMs and vfio-user host clients with busy, bursty,
/// long, resetting, faulting and coming-and-going loads) on one `tessera serve`; every fence
/// and result is checked, and the server must stop cleanly. (docs/benchmarks.md has a long
/// run with the server's growth.)
#[test]
fn short_soak_checks_every_fence() {
    let _alone = measuring_alone();
    let Some(fw) = firmware() else { return };
    let mut cmd = std::process::Command::new(tessera_bin());
    cmd.args([
        "--log-level",
        "warn",
        "bench",
        "soak",
        "--minutes",
        "0.5",
        "--json",
        "--firmware",
    ])
    .arg(fw);
    let (status, out, err) = run_with_deadline(cmd, Duration::from_secs(180));
    assert!(status.success(), "soak failed: {err}\n{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(report["ok"], true, "{out}");
    assert_eq!(report["failures"], 0, "{out}");
    let tenants = report["tenants"].as_array().expect("tenants");
    assert_eq!(tenants.len(), 8, "{out}");
    for t in tenants {
        assert!(
            t["rounds"].as_u64() > Some(0),
            "a tenant did no work: {out}"
        );
    }
    eprintln!("growth: {}", report["growth"]);
}
