//! The Vulkan backend on whatever driver this machine has (lavapipe in CI). Without a Vulkan
//! driver the tests say so and pass, unless `TESSERA_REQUIRE_VULKAN=1`.

use super::*;

pub(crate) fn gpu(vram: u64) -> Option<VulkanGpu> {
    match VulkanGpu::new(0, vram) {
        Ok(g) => Some(g),
        Err(e) if std::env::var_os("TESSERA_REQUIRE_VULKAN").is_none() => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn missing_devices_are_one_clear_line() {
    let Some(_) = gpu(1 << 20) else { return };
    let e = VulkanGpu::new(99, 1 << 20).unwrap_err().to_string();
    assert!(e.contains("Vulkan device 99 does not exist"), "{e}");
    assert!(!e.contains('\n'));
}

/// The committed SPIR-V is what the GLSL beside it compiles to (glslangValidator, Debian's
/// glslang-tools; `cargo xtask test` installs it). Regenerate with
/// `UPDATE_SHADERS=1 cargo test -p vgpu shaders`.
#[test]
fn shaders_match_their_sources() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/vulkan/shaders");
    let out = std::env::temp_dir().join(format!("tessera-spv-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    for s in pipelines::Shader::ALL {
        let spv = out.join(format!("{}.spv", s.name()));
        let run = std::process::Command::new("glslangValidator")
            .args(["-V", "--target-env", "vulkan1.2", "-o"])
            .arg(&spv)
            .arg(dir.join(format!("{}.comp", s.name())))
            .output();
        let Ok(run) = run else {
            assert!(
                std::env::var_os("TESSERA_REQUIRE_VULKAN").is_none(),
                "glslangValidator is missing"
            );
            eprintln!("skipped: no glslangValidator");
            return;
        };
        assert!(
            run.status.success(),
            "{}: {}",
            s.name(),
            String::from_utf8_lossy(&run.stdout)
        );
        let built = std::fs::read(&spv).unwrap();
        if std::env::var_os("UPDATE_SHADERS").is_some() {
            std::fs::write(dir.join(format!("{}.spv", s.name())), &built).unwrap();
        } else {
            assert!(
                built == s.spirv(),
                "shaders/{}.spv is stale: run UPDATE_SHADERS=1 cargo test -p vgpu shaders",
                s.name()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// Both ways of reaching scattered operands (gather/scatter through staging, a page table of
/// device addresses) give SAXPY's fused result bit for bit; `scatter_costs` checks every
/// element before it times anything.
#[test]
fn gather_scatter_and_device_addresses_agree() {
    let Some(g) = gpu(1 << 20) else { return };
    let c = g.scatter_costs(1, 1).unwrap();
    assert_eq!((c.bytes, c.extents, c.runs), (1 << 20, 256, 1));
    assert!(c.staged >= c.gather && c.device_address >= c.table);
    let e = g.scatter_costs(0, 1).unwrap_err().to_string();
    assert!(e.contains("1 to 1024"), "{e}");
}
