//! A session client for the transport tests (`tests/tests/session.rs`): opens the session
//! that `TESSERA_DEVICE` names (`unix:PATH` or `tls://HOST:PORT/INSTANCE`), runs the session
//! workload ([`tessera_tests::workload`]), checked against the CPU bit for bit, and prints
//! `session ok instance=NAME`. Exit status 1 on any failure.

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
    tessera_tests::workload::check(&mut s)?;
    Ok(s.info().instance.clone())
}
