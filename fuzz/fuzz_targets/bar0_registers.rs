//! Fuzz target `bar0_registers`: see `tessera_fuzz::bar0`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tessera_fuzz::bar0::run(data));
