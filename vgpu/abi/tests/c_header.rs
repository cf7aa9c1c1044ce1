//! `include/tessera_vgpu.h` is generated from the Rust constants; this test fails when the two
//! differ. Regenerate with `UPDATE_VGPU_HEADER=1 cargo test -p vgpu-abi`.

use std::fmt::Write;

fn generate() -> String {
    let mut h = String::new();
    h.push_str(
        "/* SPDX-License-Identifier: Apache-2.0 */\n\
         /* Tessera vGPU hardware contract. GENERATED from vgpu/abi/src/lib.rs by\n\
          * `UPDATE_VGPU_HEADER=1 cargo test -p vgpu-abi`; do not edit. See docs/vgpu-spec.md. */\n\
         #ifndef TESSERA_VGPU_H\n#define TESSERA_VGPU_H\n\n",
    );
    for d in vgpu_abi::DEFINES {
        let _ = writeln!(h, "#define TVGPU_{:<28} 0x{:x}ULL", d.name, d.value);
    }
    h.push_str(
        "\n#define TVGPU_CTX_REG(ctx, reg) (TVGPU_CTX_BASE + (ctx) * TVGPU_CTX_STRIDE + (reg))\n\
         #define TVGPU_DOORBELL(ctx) (TVGPU_DOORBELL_BASE + (ctx) * TVGPU_DOORBELL_STRIDE)\n\
         #define TVGPU_INT_FENCE(ctx) (1U << (TVGPU_INT_FENCE_SHIFT + (ctx)))\n\n\
         /* A command packet: 64 bytes, little-endian. */\n\
         struct tvgpu_packet {\n\
         \tunsigned int opcode;\n\
         \tunsigned int flags;\n\
         \tunsigned long long args[7];\n\
         };\n\n\
         #endif /* TESSERA_VGPU_H */\n",
    );
    h
}

#[test]
fn c_header_matches_the_rust_contract() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/include/tessera_vgpu.h");
    let want = generate();
    if std::env::var_os("UPDATE_VGPU_HEADER").is_some() {
        std::fs::write(path, &want).expect("write header");
    }
    let have = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        have == want,
        "{path} is stale: run UPDATE_VGPU_HEADER=1 cargo test -p vgpu-abi"
    );
    assert_eq!(
        std::mem::size_of::<vgpu_abi::Packet>() as u64,
        vgpu_abi::packet::PACKET_SIZE
    );
}
