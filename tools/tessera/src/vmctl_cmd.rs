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
    /// Move the running VM to DEST (unix:PATH or tcp:HOST:PORT), where `tessera vm
    /// --receive-migration` waits; it ends here once the destination runs it, or runs on
    /// here if the migration fails.
    SendMigration,
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
    /// The snapshot directory (snapshot), or the destination (send-migration).
    #[arg(
        value_name = "DIR|DEST",
        required_if_eq("op", "snapshot"),
        required_if_eq("op", "send-migration")
    )]
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
        Op::SendMigration => Request::SendMigration,
    };
    if args.dir.is_some() && !matches!(req, Request::Snapshot | Request::SendMigration) {
        eprintln!("tessera: only snapshot and send-migration take an argument");
        return ExitCode::from(EXIT_USAGE);
    }
    if req == Request::SendMigration {
        let dest = args.dir.unwrap_or_default();
        let url = match resolve_peer(&dest.to_string_lossy()) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("tessera: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        return answer(&args.api_socket, &req, None, Some(url), args.timeout);
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
    answer(&args.api_socket, &req, dir, None, args.timeout)
}

/// `unix:PATH` (made absolute) or `tcp:HOST:PORT` (the host name resolved here: the VM
/// resolves no names) as the VM takes it.
fn resolve_peer(dest: &str) -> Result<String, String> {
    if let Some(p) = dest.strip_prefix("unix:").filter(|p| !p.is_empty()) {
        let p = std::path::absolute(p).map_err(|e| format!("{dest}: {e}"))?;
        return Ok(format!("unix:{}", p.display()));
    }
    if let Some(hp) = dest.strip_prefix("tcp:") {
        use std::net::ToSocketAddrs;
        let addr = hp
            .to_socket_addrs()
            .map_err(|e| format!("{dest}: {e}"))?
            .next()
            .ok_or_else(|| format!("{dest}: no address"))?;
        return Ok(format!("tcp:{addr}"));
    }
    Err(format!("{dest:?}: expected unix:PATH or tcp:HOST:PORT"))
}

/// Asks and prints the reply.
fn answer(
    sock: &std::path::Path,
    req: &Request,
    dir: Option<PathBuf>,
    url: Option<String>,
    timeout: Duration,
) -> ExitCode {
    match ask(sock, req, dir, url, timeout) {
        Ok((line, reply)) => {
            println!("{line}");
            if reply.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("tessera: {}: {e}", sock.display());
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn ask(
    path: &std::path::Path,
    req: &Request,
    dir: Option<PathBuf>,
    url: Option<String>,
    timeout: Duration,
) -> Result<(String, Reply), String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("cannot connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut line =
        serde_json::to_string(&RequestLine { op: *req, dir, url }).map_err(|e| e.to_string())?;
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
