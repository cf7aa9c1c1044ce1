//! The vfio-user protocol as Tessera speaks it, both ends: [`server::serve`] runs one
//! client's connection against a [`server::Device`], and [`client::Client`] is the VMM's end.
//!
//! Why not the `vfio_user` crate (0.1) alone: it stops at command 14, so it cannot carry
//! migration v2 (`DEVICE_FEATURE` = 16 with `MIG_DEVICE_STATE` and the DMA logging features,
//! `MIG_DATA_READ` = 17, `MIG_DATA_WRITE` = 18), and its server loop cannot be extended (an
//! unknown command leaves the stream out of step), panics on some malformed messages and
//! allocates whatever size a message claims. This crate speaks the same wire format (tested
//! against the `vfio_user` crate's client, which is Cloud Hypervisor's), reads every message
//! whole within [`wire::MAX_MESSAGE`], and never panics on a peer's bytes.

pub mod client;
pub mod mig;
pub mod server;
pub mod wire;

pub use client::{Client, Error, Region};
pub use mig::DeviceState;
pub use server::{Device, DeviceInfo, IrqInfo, Migration, ServeError, ServerRegion, serve};
