//! Fuzz target `page_tables`: see `tessera_fuzz::ptables`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tessera_fuzz::ptables::run(data));
