//! Shared pieces of the Tessera fuzz targets.
//!
//! - [`rig`]: a vGPU with an in-memory guest, surrounded by canaries (host memory next to the
//!   guest's RAM that is not in its DMA domain, a second RAM region above a hole, and the
//!   neighbouring vGPU's VRAM), reset between inputs.
//! - [`input`]: a byte reader that never fails (exhausted input reads as zeros).
//! - [`refmmu`]: a reference GPU page-table walker written from the `vgpu-abi` contract, for
//!   differential checks of the device's MMU.
//! - [`vfu`]: a garbage-speaking vfio-user client against the vGPU server's connection code.
//! - [`sess`]: a garbage-speaking session client against the server's session code.
//! - [`seeds`]: encoders for the targets' input formats, used to write the seed corpus
//!   (`cargo +nightly run --manifest-path fuzz/Cargo.toml --example seeds`).
//!
//! The input formats are fixed-size records decoded by hand (not `arbitrary`), so the checked-in
//! corpus stays meaningful across crate updates.

pub mod bar0;
pub mod input;
pub mod known_bug;
pub mod pcicfg;
pub mod ptables;
pub mod refmmu;
pub mod rig;
pub mod seeds;
pub mod sess;
pub mod stream;
pub mod vfu;
