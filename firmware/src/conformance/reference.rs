//! CPU reference results for the built-in kernels.

/// CRC-32 (IEEE 802.3 / zlib: reflected polynomial 0xEDB88320, initial value
/// and final xor all ones), bit by bit.
pub fn crc32(data: impl IntoIterator<Item = u8>) -> u32 {
    let mut crc = u32::MAX;
    for b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                crc >> 1 ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `a * x + y` in f32, rounded after the multiply and after the add (no
/// fused multiply-add).
pub fn saxpy(a: f32, x: f32, y: f32) -> f32 {
    core::hint::black_box(a * x) + y
}

/// Distance in units in the last place between two finite f32 values.
pub fn ulps(a: f32, b: f32) -> u32 {
    // Map the sign-magnitude bit patterns onto a monotonic integer line.
    let key = |f: f32| {
        let bits = f.to_bits() as i32;
        if bits < 0 {
            i32::MIN.wrapping_sub(bits)
        } else {
            bits
        }
    };
    key(a).abs_diff(key(b))
}

/// Element `i` of a deterministic test vector in roughly [-4, 4).
pub fn test_f32(seed: u32, i: u32) -> f32 {
    let x = i.wrapping_mul(0x9e37_79b1) ^ seed.wrapping_mul(0x85eb_ca6b);
    let x = x ^ x >> 13;
    // 16 significant bits, scaled: exact in f32.
    ((x & 0xffff) as i32 - 0x8000) as f32 / 8192.0
}
