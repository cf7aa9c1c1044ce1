//! GPU sessions without a VM: a host process (or a container that sees one socket) uses an
//! instance of `tessera serve` through a small protocol instead of a PCI function. The server
//! runs everything through the instance's command processor, MMU checks, scheduler and
//! watchdog, exactly as for a VM. See docs/architecture.md, "GPU sessions without a VM".
//!
//! - [`proto`]: the requests and replies.
//! - [`frame`]: how they travel (length-prefixed postcard frames on a UNIX stream socket, a
//!   memfd passed with SCM_RIGHTS for client memory), and [`link`]: on which connection (a
//!   UNIX socket, or TCP with mutual TLS from [`tls`], data inline).
//! - [`Session`]: the Rust client.

pub mod client;
pub mod frame;
pub mod link;
pub mod proto;
pub mod tls;

pub use client::{Buffer, ClientMemory, DEVICE_ENV, Session, SessionError, SessionInfo};
pub use proto::{BufRef, Command, WaitResult};
