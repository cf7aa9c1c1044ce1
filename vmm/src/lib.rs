//! The Tessera VMM: a KVM virtual machine with guest RAM in a memfd, an in-kernel irqchip and
//! PIT, N vCPU threads, a PIO/MMIO bus with legacy devices and a PCI root, and an event loop
//! (event-manager) on the thread that calls [`Vm::run`].
//!
//! See docs/architecture.md for the threads and who owns what.

pub mod boot;
pub mod config;
pub mod control;
pub mod cpuid;
mod event_loop;
pub mod kvm_glue;
pub mod kvm_state;
pub mod memory;
pub mod migration;
pub mod pvm;
pub mod seccomp;
pub mod snapshot;
pub mod user_device;
pub mod vcpu;
mod vm;
pub mod vm_snapshot;

pub use config::{CpusConfig, MemoryConfig, SerialConfig, UserDeviceConfig, VgpuConfig, VmConfig};
pub use devices::ExitReason;
pub use vm::{VgpuProbe, Vm, VmError, error_chain};
