//! CPU reference implementations of the built-in kernels, computed the way the device
//! defines them (f32 with fused multiply-add in the same order), so results compare exactly.

/// Deterministic test data.
pub fn xorshift(seed: u32, n: usize) -> Vec<u32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        })
        .collect()
}

/// Small floats in [-2, 2) with few mantissa bits.
pub fn floats(seed: u32, n: usize) -> Vec<f32> {
    xorshift(seed, n)
        .into_iter()
        .map(|v| ((v >> 8) % 64) as f32 / 16.0 - 2.0)
        .collect()
}

/// `y[i] = a * x[i] + y[i]` (fused).
pub fn saxpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = a.mul_add(x, *y);
    }
}

/// `C = A × B`, row-major; A is m×k, B is k×n (fused, k in order).
pub fn sgemm(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for r in 0..m {
        for p in 0..k {
            let av = a[r * k + p];
            for j in 0..n {
                c[r * n + j] = av.mul_add(b[p * n + j], c[r * n + j]);
            }
        }
    }
    c
}

/// Wrapping u64 sum of u32s.
pub fn reduce_sum(x: &[u32]) -> u64 {
    x.iter().fold(0u64, |s, &v| s.wrapping_add(u64::from(v)))
}

/// CRC-32 (IEEE 802.3, as zlib).
pub fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn sgemm_identity() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(sgemm(2, 2, 2, &a, &[1.0, 0.0, 0.0, 1.0]), a.to_vec());
    }

    #[test]
    fn saxpy_and_sum() {
        let mut y = vec![3.0f32; 4];
        saxpy(2.0, &[1.0; 4], &mut y);
        assert_eq!(y, vec![5.0; 4]);
        assert_eq!(reduce_sum(&[u32::MAX, 1]), 1 << 32);
    }
}
