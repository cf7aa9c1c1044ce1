//! The session workload every transport runs (issue #21): SAXPY, SGEMM, CRC-32, REDUCE_SUM,
//! FILL and copies, each checked bit for bit against the CPU. Operands live in the instance's
//! VRAM and travel inline (`write`, `read`), which every transport carries; a local session
//! also runs SAXPY in client memory (zero copy).

use std::time::Duration;

use vgpu_session::{Command, Session, WaitResult};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn run(s: &mut Session, ctx: u32, commands: &[Command]) -> Result<(), String> {
    let fence = s.submit(ctx, commands).map_err(|e| e.to_string())?;
    match s.wait(ctx, fence, Duration::from_secs(120)) {
        Ok(WaitResult::Done) => Ok(()),
        Ok(w) => Err(format!("{commands:?} did not complete: {w:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// CRC-32/IEEE, bitwise (the reference the GPU's table-driven kernel must match).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Runs the workload on a new context of `s`; `Err` says which result differs.
pub fn check(s: &mut Session) -> Result<(), String> {
    let e = |e: vgpu_session::SessionError| e.to_string();
    let ctx = s.create_context().map_err(e)?;

    // SAXPY in VRAM: y = a·x + y, fused.
    let n = 1u64 << 18;
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.37 - 11.0).collect();
    let y: Vec<f32> = (0..n).map(|i| (i % 777) as f32 * 1.13 + 0.5).collect();
    let a = 2.5f32;
    let want: Vec<f32> = x.iter().zip(&y).map(|(x, y)| a.mul_add(*x, *y)).collect();
    let vx = s.alloc_vram(4 * n).map_err(e)?;
    let vy = s.alloc_vram(4 * n).map_err(e)?;
    s.write(vx.at(0), &f32_bytes(&x)).map_err(e)?;
    s.write(vy.at(0), &f32_bytes(&y)).map_err(e)?;
    let saxpy = |x, y| Command::Saxpy { n, a, x, y };
    run(s, ctx, &[saxpy(vx.at(0), vy.at(0))])?;
    let got = f32s(&s.read(vy.at(0), 4 * n).map_err(e)?);
    if let Some(i) = (0..n as usize).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        return Err(format!(
            "SAXPY in VRAM: y[{i}] = {}, expected {}",
            got[i], want[i]
        ));
    }

    // The same in client memory where the transport shares memory (a UNIX socket).
    if !s.is_remote() {
        let (buf, mem) = s.map_memory(8 * n).map_err(e)?;
        mem.write(0, &f32_bytes(&x)).map_err(e)?;
        mem.write(4 * n, &f32_bytes(&y)).map_err(e)?;
        run(s, ctx, &[saxpy(buf.at(0), buf.at(4 * n))])?;
        let mut out = vec![0u8; 4 * n as usize];
        mem.read(4 * n, &mut out).map_err(e)?;
        if f32s(&out)
            .iter()
            .zip(&want)
            .any(|(g, w)| g.to_bits() != w.to_bits())
        {
            return Err("SAXPY in client memory differs from the CPU".into());
        }
        s.free(buf).map_err(e)?;
    }

    // SGEMM: C = A·B, each element a chain of fused multiply-adds in k order.
    let (m, k, nn) = (48u64, 40u64, 56u64);
    let am: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7) % 13) as f32 * 0.25 - 1.0)
        .collect();
    let bm: Vec<f32> = (0..k * nn)
        .map(|i| ((i * 5) % 11) as f32 * 0.5 - 2.0)
        .collect();
    let va = s.alloc_vram(4 * m * k).map_err(e)?;
    let vb = s.alloc_vram(4 * k * nn).map_err(e)?;
    let vc = s.alloc_vram(4 * m * nn).map_err(e)?;
    s.write(va.at(0), &f32_bytes(&am)).map_err(e)?;
    s.write(vb.at(0), &f32_bytes(&bm)).map_err(e)?;
    let (a_, b_, c_) = (va.at(0), vb.at(0), vc.at(0));
    run(
        s,
        ctx,
        &[Command::Sgemm {
            m,
            n: nn,
            k,
            a: a_,
            b: b_,
            c: c_,
        }],
    )?;
    let c = f32s(&s.read(vc.at(0), 4 * m * nn).map_err(e)?);
    let (k_, n_) = (k as usize, nn as usize);
    for r in 0..m as usize {
        for j in 0..n_ {
            let want = (0..k_).fold(0f32, |acc, p| am[r * k_ + p].mul_add(bm[p * n_ + j], acc));
            if c[r * n_ + j].to_bits() != want.to_bits() {
                return Err(format!(
                    "SGEMM: C[{r}][{j}] = {}, expected {want}",
                    c[r * n_ + j]
                ));
            }
        }
    }

    // COPY, FILL, REDUCE_SUM and CRC-32 in one submission.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let len = data.len() as u64;
    let src = s.alloc_vram(len).map_err(e)?;
    let dst = s.alloc_vram(1 << 20).map_err(e)?;
    s.write(src.at(0), &data).map_err(e)?;
    run(
        s,
        ctx,
        &[
            Command::Copy {
                src: src.at(0),
                dst: dst.at(0),
                len,
            },
            Command::Fill {
                dst: dst.at(200_000),
                len: 4096,
                value: 0x0102_0304,
            },
            Command::ReduceSum {
                n: 25_000,
                x: dst.at(0),
                out: dst.at(300_000),
            },
            Command::Crc32 {
                len,
                src: src.at(0),
                out: dst.at(300_008),
            },
        ],
    )?;
    if s.read(dst.at(0), len).map_err(e)? != data {
        return Err("COPY: the bytes differ".into());
    }
    let filled = s.read(dst.at(200_000), 4096).map_err(e)?;
    if !filled.chunks_exact(4).all(|w| w == [4, 3, 2, 1]) {
        return Err("FILL: the words differ".into());
    }
    let res = s.read(dst.at(300_000), 12).map_err(e)?;
    let sum = data
        .chunks_exact(4)
        .map(|w| u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
        .fold(0u64, u64::wrapping_add);
    let got_sum = u64::from_le_bytes(res[..8].try_into().unwrap_or_default());
    if got_sum != sum {
        return Err(format!("REDUCE_SUM = {got_sum}, expected {sum}"));
    }
    let got_crc = u32::from_le_bytes(res[8..].try_into().unwrap_or_default());
    if got_crc != crc32(&data) {
        return Err(format!(
            "CRC32 = {got_crc:#x}, expected {:#x}",
            crc32(&data)
        ));
    }
    for b in [vx, vy, va, vb, vc, src, dst] {
        s.free(b).map_err(e)?;
    }
    Ok(())
}
