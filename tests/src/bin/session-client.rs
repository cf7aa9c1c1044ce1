//! A session client for the transport tests (`tests/tests/session.rs`): opens the session
//! that `TESSERA_DEVICE` names (`unix:PATH` or `tls://HOST:PORT/INSTANCE`), runs the session
//! workload ([`tessera_tests::workload`]), checked against the CPU bit for bit, and prints
//! `session ok instance=NAME`. Exit status 1 on any failure. With `--hold` it writes a secret
//! into 1 MiB of VRAM, prints `holding` and waits to be killed.

use vgpu_session::Session;

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
    if std::env::args().nth(1).as_deref() == Some("--hold") {
        // For the reclaim test: leave a secret in VRAM, say so, and wait to be killed.
        let b = s.alloc_vram(1 << 20)?;
        s.write(b.at(0), &[0x5a; 1 << 20])?;
        println!("holding");
        loop {
            std::thread::park();
        }
    }
    tessera_tests::workload::check(&mut s)?;
    Ok(s.info().instance.clone())
}
