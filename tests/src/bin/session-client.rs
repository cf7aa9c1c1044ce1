//! A session client for the container test (`tests/tests/session.rs`): opens the session that
//! `TESSERA_DEVICE` names, runs SAXPY in client memory, checks it against the CPU bit for bit
//! and prints `session ok instance=NAME`. Exit status 1 on any failure.

use std::time::Duration;

use vgpu_session::{Command, Session, WaitResult};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(name) => {
            println!("session ok instance={name}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("session-client: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<String, Box<dyn std::error::Error>> {
    let mut s = Session::from_env()?;
    let ctx = s.create_context()?;
    let n = 4096u64;
    let (buf, mem) = s.map_memory(8 * n)?;
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let y: Vec<f32> = (0..n).map(|i| 3.0 - i as f32).collect();
    let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    mem.write(0, &bytes(&x))?;
    mem.write(4 * n, &bytes(&y))?;
    let fence = s.submit(
        ctx,
        &[Command::Saxpy {
            n,
            a: 1.5,
            x: buf.at(0),
            y: buf.at(4 * n),
        }],
    )?;
    match s.wait(ctx, fence, Duration::from_secs(60))? {
        WaitResult::Done => {}
        w => return Err(format!("saxpy did not complete: {w:?}").into()),
    }
    let mut out = vec![0u8; 4 * n as usize];
    mem.read(4 * n, &mut out)?;
    for (i, c) in out.chunks_exact(4).enumerate() {
        let got = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let want = 1.5f32.mul_add(x[i], y[i]);
        if got.to_bits() != want.to_bits() {
            return Err(format!("y[{i}] = {got}, expected {want}").into());
        }
    }
    Ok(s.info().instance.clone())
}
