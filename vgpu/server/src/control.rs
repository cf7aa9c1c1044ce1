//! The control protocol of `tessera serve`: one JSON object per line on `control.sock`, each
//! answered by one line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`. A connection may
//! send any number of requests (`tessera top` keeps one open).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Name of the control socket in the server's directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 << 10;

/// The version of the control protocol and of every JSON document Tessera prints (the
/// `schema` field): bumped when a field changes meaning or goes away.
pub const SCHEMA: u32 = 1;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The vGPU types (profiles) and how many more of each fit.
    Types,
    /// Creates an instance and its socket.
    Create {
        /// Profile name.
        #[serde(rename = "type")]
        profile: String,
        /// Instance name (default `vgpuN`).
        #[serde(default)]
        name: Option<String>,
        /// Partition (default: wherever it fits).
        #[serde(default)]
        partition: Option<usize>,
        /// Weight for fixed-share scheduling (default 1).
        #[serde(default)]
        weight: Option<u32>,
        /// Cap in percent (default 100).
        #[serde(default)]
        cap: Option<u32>,
        /// The user whose VMM may attach, besides root (default: the server's user).
        #[serde(default)]
        owner: Option<u32>,
    },
    /// The instances.
    List,
    /// Removes an idle instance; its VRAM is scrubbed and returned.
    Remove {
        /// Instance name.
        name: String,
    },
    /// Live statistics, JSON.
    Stats,
    /// Live statistics, Prometheus text (in `text`).
    Metrics,
    /// The server's version and the protocol's (`schema`).
    Version,
    /// Switches the scheduling policy and slice at run time.
    Policy {
        /// Policy name (best-effort, equal-share, fixed-share, fixed-quantum).
        policy: String,
        /// Slice in ms (default: unchanged).
        #[serde(default)]
        slice_ms: Option<u64>,
    },
}

/// Errors talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No server at the path.
    #[error("cannot reach the vGPU server at {path}")]
    Connect {
        /// Control socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("lost the connection to the vGPU server")]
    Io(#[from] std::io::Error),
    /// The server answered something that is not a response.
    #[error("the vGPU server sent a malformed response")]
    Malformed(#[from] serde_json::Error),
    /// The server refused the request.
    #[error("{0}")]
    Refused(String),
}

/// A connection to a server's control socket.
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to `dir/control.sock`.
    pub fn connect(dir: &Path) -> Result<Self, ControlError> {
        let path = dir.join(CONTROL_SOCKET);
        let stream = UnixStream::connect(&path).map_err(|source| ControlError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        // A stuck server must not hang the CLI.
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(ControlClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends `req` and returns the response's fields (without `ok`).
    pub fn request(&mut self, req: &Request) -> Result<serde_json::Value, ControlError> {
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(ControlError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let mut v: serde_json::Value = serde_json::from_str(&answer)?;
        let obj = v
            .as_object_mut()
            .ok_or_else(|| ControlError::Refused("response is not an object".into()))?;
        match obj.remove("ok") {
            Some(serde_json::Value::Bool(true)) => Ok(v),
            _ => Err(ControlError::Refused(
                obj.get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("request failed")
                    .to_string(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_junk() {
        let r: Request =
            serde_json::from_str(r#"{"op":"create","type":"64M","name":"a","weight":2}"#).unwrap();
        assert_eq!(
            r,
            Request::Create {
                profile: "64M".into(),
                name: Some("a".into()),
                partition: None,
                weight: Some(2),
                cap: None,
                owner: None,
            }
        );
        let back: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        for junk in [
            r#"{"op":"format_disk"}"#,
            r#"{"op":"remove"}"#,
            r#"{"op":"remove","name":"a","force":true}"#,
            r#"[1,2]"#,
            r#"{"op":"create","type":7}"#,
        ] {
            assert!(serde_json::from_str::<Request>(junk).is_err(), "{junk}");
        }
    }
}
