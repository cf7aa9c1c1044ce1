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
