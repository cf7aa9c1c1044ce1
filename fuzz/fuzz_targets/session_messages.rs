//! Fuzz target `session_messages`: see `tessera_fuzz::sess`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tessera_fuzz::sess::run(data));
