//! Fuzz target `vfio_user_messages`: see `tessera_fuzz::vfu`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tessera_fuzz::vfu::run(data));
