//! The control protocol of `tessera serve`: one JSON object per line on `control.sock`, each
//! answered by one line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`. A connection may
//! send any number of requests (`tessera top` keeps one open).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vgpu::physical::{PartitionInfo, VgpuStats};

use crate::peer::Peer;

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
    /// The vGPU types (profiles) and how many more of each fit ([`TypesReply`]).
    Types,
    /// Creates an instance and its socket ([`CreateReply`]).
    Create {
        /// Profile name.
        #[serde(rename = "type")]
        profile: String,
        /// Instance name (default `vgpuN`).
        #[serde(default)]
        name: Option<String>,
        /// The instance's UUID (default: a random one), as mdev devices have.
        #[serde(default)]
        uuid: Option<Uuid>,
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
    /// The instances ([`ListReply`]).
    List,
    /// Removes an idle instance; its VRAM is scrubbed and returned ([`RemoveReply`]).
    Remove {
        /// Instance name or UUID.
        name: String,
    },
    /// Live statistics ([`StatsReply`]).
    Stats,
    /// Live statistics, Prometheus text ([`MetricsReply`]).
    Metrics,
    /// The server's version and the protocol's (`schema`) ([`VersionReply`]).
    Version,
    /// Switches the scheduling policy and slice at run time ([`PolicyReply`]).
    Policy {
        /// Policy name (best-effort, equal-share, fixed-share, fixed-quantum).
        policy: String,
        /// Slice in ms (default: unchanged).
        #[serde(default)]
        slice_ms: Option<u64>,
    },
}

/// One vGPU type, as mdev describes its types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeInfo {
    /// Name (`64M`, `256M`, `1G`).
    pub name: String,
    /// What an instance gets, in words.
    pub description: String,
    /// The interface a VMM sees (`vfio-pci`, as mdev's `device_api`).
    pub device_api: String,
    /// VRAM bytes.
    pub vram: u64,
    /// GPU contexts.
    pub contexts: u32,
    /// How many more instances of it fit now.
    pub available_instances: u64,
}

/// What `list` reports about an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Name.
    pub name: String,
    /// UUID (mdev-style address; `remove` takes it as well as the name).
    pub uuid: Uuid,
    /// Type.
    #[serde(rename = "type")]
    pub profile: String,
    /// VRAM bytes.
    pub vram: u64,
    /// Partition.
    pub partition: usize,
    /// Weight.
    pub weight: u32,
    /// Cap in percent.
    pub cap: u32,
    /// Its vfio-user socket.
    pub socket: PathBuf,
    /// Its session socket (`TESSERA_DEVICE=unix:PATH` for a session client).
    #[serde(default)]
    pub session_socket: PathBuf,
    /// The user whose VMM may attach (root always may).
    pub owner: u32,
    /// The connected client's process and user, once it has made a device access.
    pub peer: Option<Peer>,
    /// Whether a client is connected.
    pub attached: bool,
    /// Clients served so far.
    pub attachments: u64,
}

/// Reply to [`Request::Types`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TypesReply {
    /// The GPU under the vGPUs.
    pub gpu: String,
    /// The types.
    pub types: Vec<TypeInfo>,
}

/// Reply to [`Request::Create`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateReply {
    /// The new instance.
    pub instance: InstanceInfo,
}

/// Reply to [`Request::List`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListReply {
    /// The instances, by name.
    pub instances: Vec<InstanceInfo>,
}

/// Reply to [`Request::Remove`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveReply {
    /// The instance removed.
    pub removed: String,
}

/// Reply to [`Request::Stats`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsReply {
    /// Each partition of the GPU.
    pub partitions: Vec<PartitionInfo>,
    /// Each instance.
    pub vgpus: Vec<VgpuStats>,
}

/// Reply to [`Request::Metrics`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsReply {
    /// OpenMetrics text, as `/metrics` serves it.
    pub text: String,
}

/// Reply to [`Request::Version`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionReply {
    /// The server's version.
    pub version: String,
}

/// Reply to [`Request::Policy`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyReply {
    /// Each partition, with its new policy.
    pub partitions: Vec<PartitionInfo>,
}

/// Any reply's body.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// [`TypesReply`].
    Types(TypesReply),
    /// [`CreateReply`].
    Create(CreateReply),
    /// [`ListReply`].
    List(ListReply),
    /// [`RemoveReply`].
    Remove(RemoveReply),
    /// [`StatsReply`].
    Stats(StatsReply),
    /// [`MetricsReply`].
    Metrics(MetricsReply),
    /// [`VersionReply`].
    Version(VersionReply),
    /// [`PolicyReply`].
    Policy(PolicyReply),
}

/// A JSON document as Tessera prints or sends it: `ok`, the [`SCHEMA`] version, and the body's
/// fields (or `error`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Whether the request succeeded.
    pub ok: bool,
    /// [`SCHEMA`].
    pub schema: u32,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The body (absent on failure).
    #[serde(flatten)]
    pub body: Option<T>,
}

impl<T> Envelope<T> {
    /// A success carrying `body`.
    pub fn ok(body: T) -> Self {
        Envelope {
            ok: true,
            schema: SCHEMA,
            error: None,
            body: Some(body),
        }
    }

    /// A failure saying `error`.
    pub fn error(error: impl Into<String>) -> Self {
        Envelope {
            ok: false,
            schema: SCHEMA,
            error: Some(error.into()),
            body: None,
        }
    }
}

impl<T: Serialize> Envelope<T> {
    /// The document on one line.
    pub fn line(&self) -> String {
        // Serializing plain structs, strings and numbers cannot fail.
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
    }

    /// The document, indented for people.
    pub fn pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| self.line())
    }
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

    /// Sends `req` and returns the reply's body, `T` being the reply type the request
    /// names.
    pub fn call<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ControlError> {
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(ControlError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let reply: Envelope<serde_json::Value> = serde_json::from_str(&answer)?;
        match reply {
            Envelope {
                ok: true,
                body: Some(body),
                ..
            } => Ok(serde_json::from_value(body)?),
            Envelope { error, .. } => Err(ControlError::Refused(
                error.unwrap_or_else(|| "request failed".into()),
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
                uuid: None,
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
