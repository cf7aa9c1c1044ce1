//! Detection of PVM hosts (KVM without hardware virtualization; see docs/architecture.md).

use std::path::Path;

/// True when the host's KVM is the PVM flavour (`kvm_pvm` module loaded).
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}
