//! Fuzz target `command_stream`: see `tessera_fuzz::stream`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tessera_fuzz::stream::run(data));
