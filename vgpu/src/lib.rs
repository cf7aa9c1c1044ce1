//! The Tessera vGPU device model.
//!
//! A vGPU is a PCI function (`device`) whose guest drives it through trapped registers, a
//! VRAM aperture mapped straight into the guest, and per-context command rings. A command
//! processor thread fetches packets (`command`) through each context's GPU MMU (`mmu`), whose
//! every access is checked against VRAM bounds and the VM's DMA domain (`domain`, `mem`),
//! and runs them on a backend (`backend`: the seam a GPU implements, with the software GPU in
//! `backend::soft`).
//!
//! The crate does not depend on KVM: a VMM gives it guest memory (vm-memory), an MSI sink and
//! (optionally) eventfds for doorbells, and maps the VRAM BAR where the guest programs it.

pub mod backend;
pub mod command;
pub mod device;
pub mod domain;
pub mod guard;
pub mod host;
pub mod mem;
pub mod mmu;
pub mod physical;
pub mod poll;
pub mod profile;
pub mod sched;
mod sync;
#[cfg(test)]
mod tests;

pub use device::{BarAddresses, Interrupts, Vgpu, VgpuError, VgpuSetup};
/// The PCI traits and types the vGPU implements, and the ABI it speaks, for a VMM that embeds
/// it (Cloud Hypervisor's adapter, `contrib/cloud-hypervisor/vgpu.rs`).
pub use devices::pci;
pub use domain::DmaDomain;
pub use profile::{PROFILES, Profile};
pub use vgpu_abi as abi;
