//! Fuzz target `pci_config`: see `tessera_fuzz::pcicfg`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tessera_fuzz::pcicfg::run(data));
