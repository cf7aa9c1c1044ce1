//! The Rust client: a [`Session`] on one instance of `tessera serve`.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

use crate::frame::FrameError;
use crate::link::Link;
use crate::proto::{BufRef, Command, ErrorKind, MAX_WAIT_MS, Reply, Request, VERSION, WaitResult};
use crate::tls::{self, TlsAddr, TlsError, TlsFiles};

/// The environment variable naming the device a program uses (`unix:PATH` or
/// `tls://HOST:PORT/INSTANCE`).
pub const DEVICE_ENV: &str = "TESSERA_DEVICE";

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The address is not one this client understands.
    #[error("unknown device address {0:?} (expected unix:PATH or tls://HOST:PORT/INSTANCE)")]
    Address(String),
    /// `TESSERA_DEVICE` is not set.
    #[error(
        "{DEVICE_ENV} is not set (for example {DEVICE_ENV}=unix:/run/tessera/vgpu-NAME.session)"
    )]
    NoDevice,
    /// TLS could not be set up (files, configuration).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The server could not be reached.
    #[error("cannot connect to {path}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The server refused the request.
    #[error("{kind:?}: {message}")]
    Refused {
        /// What kind of failure.
        kind: ErrorKind,
        /// The server's words.
        message: String,
    },
    /// A reply that does not answer the request.
    #[error("unexpected reply {0:?}")]
    Unexpected(Box<Reply>),
    /// Client memory could not be made.
    #[error("cannot make client memory: {0}")]
    Memory(String),
}

/// What the instance is (from its `Welcome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The instance's name.
    pub instance: String,
    /// Its type.
    pub profile: String,
    /// Its VRAM in bytes.
    pub vram: u64,
    /// Contexts a session may create.
    pub contexts: u32,
}

/// A buffer of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Its number.
    pub id: u32,
    /// Its size.
    pub size: u64,
}

impl Buffer {
    /// `offset` bytes into it.
    pub fn at(&self, offset: u64) -> BufRef {
        BufRef {
            buffer: self.id,
            offset,
        }
    }
}

/// Client memory shared with the server: the GPU reads and writes it in place.
#[derive(Debug)]
pub struct ClientMemory {
    region: MmapRegion,
    _file: File,
}

impl ClientMemory {
    /// Copies `data` in at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), SessionError> {
        self.region
            .as_volatile_slice()
            .write_slice(data, offset as usize)
            .map_err(|e| SessionError::Memory(e.to_string()))
    }

    /// Copies bytes out from `offset` (after the fence of the work that wrote them).
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), SessionError> {
        self.region
            .as_volatile_slice()
            .read_slice(data, offset as usize)
            .map_err(|e| SessionError::Memory(e.to_string()))
    }

    /// Its size.
    pub fn len(&self) -> u64 {
        self.region.size() as u64
    }

    /// Where it is mapped in this process (for a C caller that writes it in place).
    pub fn as_ptr(&self) -> *mut u8 {
        self.region.as_ptr()
    }

    /// Whether it is empty (never: a mapping has at least one page).
    pub fn is_empty(&self) -> bool {
        self.region.size() == 0
    }
}

/// A session: one connection to one instance.
#[derive(Debug)]
pub struct Session {
    link: Link,
    info: SessionInfo,
}

impl Session {
    /// Connects to the device `TESSERA_DEVICE` names.
    pub fn from_env() -> Result<Session, SessionError> {
        let addr = std::env::var(DEVICE_ENV).map_err(|_| SessionError::NoDevice)?;
        Session::connect(&addr)
    }

    /// Connects to `addr` (`unix:PATH`, or `tls://HOST:PORT/INSTANCE` with the TLS files
    /// the environment names: [`TlsFiles::from_env`]) and opens the session.
    pub fn connect(addr: &str) -> Result<Session, SessionError> {
        if let Some(path) = addr.strip_prefix("unix:") {
            return Session::connect_unix(Path::new(path));
        }
        if addr.starts_with("tls://") {
            let a: TlsAddr = addr.parse().map_err(SessionError::Address)?;
            return Session::connect_tls(&a, &TlsFiles::from_env()?);
        }
        Err(SessionError::Address(addr.to_string()))
    }

    /// Connects to the session socket at `path` and opens the session.
    pub fn connect_unix(path: &Path) -> Result<Session, SessionError> {
        let sock = UnixStream::connect(path).map_err(|source| SessionError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Session::open(Link::Unix(sock), None)
    }

    /// Connects to instance `addr.instance` of the server at `addr` over TCP with mutual TLS
    /// (this side's certificate and CA from `files`) and opens the session.
    pub fn connect_tls(addr: &TlsAddr, files: &TlsFiles) -> Result<Session, SessionError> {
        let config = tls::client_config(files)?;
        let link = tls::connect(addr, config).map_err(|source| SessionError::Connect {
            path: format!("{}:{}", addr.host, addr.port),
            source,
        })?;
        Session::open(link, Some(&addr.instance))
    }

    /// Opens the session on `link` (naming `instance` first on TCP, where one listener
    /// serves every instance).
    fn open(link: Link, instance: Option<&str>) -> Result<Session, SessionError> {
        let mut s = Session {
            link,
            info: SessionInfo {
                instance: String::new(),
                profile: String::new(),
                vram: 0,
                contexts: 0,
            },
        };
        if let Some(name) = instance {
            s.send(&Request::Open {
                instance: name.to_string(),
            })?;
        }
        match s.call(&Request::Hello { version: VERSION })? {
            Reply::Welcome {
                instance,
                profile,
                vram,
                contexts,
                ..
            } => {
                s.info = SessionInfo {
                    instance,
                    profile,
                    vram,
                    contexts,
                };
                Ok(s)
            }
            r => Err(SessionError::Unexpected(Box::new(r))),
        }
    }

    /// What the instance is.
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// Whether the session runs over TLS (then there is no client memory: data goes inline
    /// with [`Session::write`] and [`Session::read`]).
    pub fn is_remote(&self) -> bool {
        self.link.is_tls()
    }

    /// Sends `req` without waiting for its reply (pipelining; [`Session::recv`] reads the
    /// replies in order). Over TLS requests are batched: they leave when the session reads
    /// a reply, when [`Session::flush`] is called, or when enough are queued.
    pub fn send(&mut self, req: &Request) -> Result<(), SessionError> {
        Ok(self.link.send(req, None)?)
    }

    /// Sends the requests queued by [`Session::send`] now.
    pub fn flush(&mut self) -> Result<(), SessionError> {
        Ok(self.link.flush()?)
    }

    /// Reads the next reply; a refusal is an error.
    pub fn recv(&mut self) -> Result<Reply, SessionError> {
        match self.link.recv::<Reply>()?.0 {
            Reply::Error { kind, message } => Err(SessionError::Refused { kind, message }),
            r => Ok(r),
        }
    }

    /// Sends `req` and reads its reply.
    pub fn call(&mut self, req: &Request) -> Result<Reply, SessionError> {
        self.send(req)?;
        self.recv()
    }

    /// A new context.
    pub fn create_context(&mut self) -> Result<u32, SessionError> {
        match self.call(&Request::CreateContext)? {
            Reply::Context { ctx } => Ok(ctx),
            r => Err(SessionError::Unexpected(Box::new(r))),
        }
    }

    /// A buffer of `size` bytes in the instance's VRAM.
    pub fn alloc_vram(&mut self, size: u64) -> Result<Buffer, SessionError> {
        buffer(self.call(&Request::AllocVram { size })?)
    }

    /// `size` bytes of new client memory (a sealed memfd, mapped here), and the buffer the
    /// GPU reaches it as.
    pub fn map_memory(&mut self, size: u64) -> Result<(Buffer, ClientMemory), SessionError> {
        let mem = |e: &dyn std::fmt::Display| SessionError::Memory(e.to_string());
        if self.link.is_tls() {
            return Err(mem(
                &"a remote (TLS) session shares no memory with its server: use VRAM buffers, \
                  with write and read",
            ));
        }
        let file = memfd::MemfdOptions::new()
            .allow_sealing(true)
            .close_on_exec(true)
            .create("tessera-session")
            .map_err(|e| mem(&e))?;
        file.as_file().set_len(size).map_err(|e| mem(&e))?;
        file.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
            .map_err(|e| mem(&e))?;
        let file = file.into_file();
        let region = MmapRegion::from_file(
            FileOffset::new(file.try_clone().map_err(|e| mem(&e))?, 0),
            size as usize,
        )
        .map_err(|e| mem(&e))?;
        self.link.send(&Request::MapMemory { size }, Some(&file))?;
        let b = buffer(self.recv()?)?;
        Ok((
            b,
            ClientMemory {
                region,
                _file: file,
            },
        ))
    }

    /// Gives a buffer back.
    pub fn free(&mut self, b: Buffer) -> Result<(), SessionError> {
        done(self.call(&Request::Free { buffer: b.id })?)
    }

    /// Writes `data` at `at` (VRAM or client memory) through the connection.
    pub fn write(&mut self, at: BufRef, data: &[u8]) -> Result<(), SessionError> {
        self.send_write(at, data)?;
        done(self.recv()?)
    }

    /// Sends the `Write` of `data` at `at` without waiting for its reply (pipelining, like
    /// [`Session::send`]); `data` is not copied into a message.
    pub fn send_write(&mut self, at: BufRef, data: &[u8]) -> Result<(), SessionError> {
        let empty = Request::Write {
            at,
            data: Vec::new(),
        };
        Ok(self.link.send_with_tail(&empty, data)?)
    }

    /// Reads `len` bytes at `at` through the connection.
    pub fn read(&mut self, at: BufRef, len: u64) -> Result<Vec<u8>, SessionError> {
        match self.call(&Request::Read { at, len })? {
            Reply::Data { data } => Ok(data),
            r => Err(SessionError::Unexpected(Box::new(r))),
        }
    }

    /// Queues `commands` on `ctx`; returns the fence to wait for.
    pub fn submit(&mut self, ctx: u32, commands: &[Command]) -> Result<u64, SessionError> {
        match self.call(&Request::Submit {
            ctx,
            commands: commands.to_vec(),
        })? {
            Reply::Submitted { fence } => Ok(fence),
            r => Err(SessionError::Unexpected(Box::new(r))),
        }
    }

    /// Waits for fence `fence` of `ctx` (at most `timeout`, up to 10 minutes).
    pub fn wait(
        &mut self,
        ctx: u32,
        fence: u64,
        timeout: Duration,
    ) -> Result<WaitResult, SessionError> {
        let timeout_ms = u32::try_from(timeout.as_millis())
            .unwrap_or(u32::MAX)
            .min(MAX_WAIT_MS);
        match self.call(&Request::Wait {
            ctx,
            fence,
            timeout_ms,
        })? {
            Reply::Waited(w) => Ok(w),
            r => Err(SessionError::Unexpected(Box::new(r))),
        }
    }

    /// Queues `commands` and waits for them (at most a minute); a fault is an error.
    pub fn run(&mut self, ctx: u32, commands: &[Command]) -> Result<(), SessionError> {
        let fence = self.submit(ctx, commands)?;
        match self.wait(ctx, fence, Duration::from_secs(60))? {
            WaitResult::Done => Ok(()),
            w => Err(SessionError::Refused {
                kind: ErrorKind::Device,
                message: format!("the work did not complete: {w:?}"),
            }),
        }
    }

    /// Restarts `ctx` after a fault.
    pub fn reset_context(&mut self, ctx: u32) -> Result<(), SessionError> {
        done(self.call(&Request::ResetContext { ctx })?)
    }
}

fn buffer(r: Reply) -> Result<Buffer, SessionError> {
    match r {
        Reply::Buffer { buffer, size } => Ok(Buffer { id: buffer, size }),
        r => Err(SessionError::Unexpected(Box::new(r))),
    }
}

fn done(r: Reply) -> Result<(), SessionError> {
    match r {
        Reply::Done => Ok(()),
        r => Err(SessionError::Unexpected(Box::new(r))),
    }
}
