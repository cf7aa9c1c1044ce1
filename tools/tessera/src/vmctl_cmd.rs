//! `tessera vmctl`: the control socket of a running `tessera vm` (`--api-socket`), as
//! Cloud Hypervisor's `ch-remote` drives its `--api-socket`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use vmm::control::{Reply, Request, RequestLine};

use crate::{EXIT_FAILURE, EXIT_USAGE};

/// What to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Op {
    /// Stop every vCPU; returns once all are stopped.
    Pause,
    /// Let them run again.
    Resume,
    /// The VM's state: running, paused or stopping; vCPUs; vCPUs paused.
    Info,
    /// End the VM as if the guest had powered off.
    Shutdown,
    /// Write the paused VM's state to DIR (pause first; it stays paused). Restore it with
    /// `tessera vm --restore DIR`.
    Snapshot,
}

/// `tessera vmctl` options.
#[derive(Debug, Args)]
pub struct VmctlArgs {
    /// The VM's control socket (`tessera vm --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Longest wait for the VM's answer (a pause waits up to 5 s for its vCPUs), e.g. 15s.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_timeout)]
    timeout: Duration,
    /// What to do.
    #[arg(value_enum)]
    op: Op,
    /// The snapshot directory (snapshot only).
    #[arg(value_name = "DIR", required_if_eq("op", "snapshot"))]
    dir: Option<PathBuf>,
}

/// An answer timeout: 1 s to 10 minutes.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    crate::serve_cmd::parse_duration(
        s,
        Duration::from_secs(1)..=Duration::from_secs(600),
        "the timeout must be 1s..=600s",
        false,
    )
}

/// Prints the reply (one JSON line). Exit status 0, 1 when the VM refused, 2 when it could
/// not be asked.
pub fn run(args: VmctlArgs) -> ExitCode {
    let req = match args.op {
        Op::Pause => Request::Pause,
        Op::Resume => Request::Resume,
        Op::Info => Request::Info,
        Op::Shutdown => Request::Shutdown,
        Op::Snapshot => Request::Snapshot,
    };
    if args.dir.is_some() && req != Request::Snapshot {
        eprintln!("tessera: only snapshot takes a directory");
        return ExitCode::from(EXIT_USAGE);
    }
    // A relative directory is the caller's, not the VM's.
    let dir = match args.dir.map(std::path::absolute) {
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            eprintln!("tessera: snapshot directory: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        None => None,
    };
    match ask(&args.api_socket, &req, dir, args.timeout) {
        Ok((line, reply)) => {
            println!("{line}");
            if reply.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("tessera: {}: {e}", args.api_socket.display());
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn ask(
    path: &std::path::Path,
    req: &Request,
    dir: Option<PathBuf>,
    timeout: Duration,
) -> Result<(String, Reply), String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("cannot connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut line =
        serde_json::to_string(&RequestLine { op: *req, dir }).map_err(|e| e.to_string())?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .map_err(|e| format!("no answer: {e}"))?;
    let answer = answer.trim().to_string();
    let reply = serde_json::from_str(&answer).map_err(|e| format!("bad answer {answer:?}: {e}"))?;
    Ok((answer, reply))
}
