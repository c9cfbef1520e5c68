#![no_main]
//! libFuzzer target: the source engine (see `livemig_fuzz::source`).
libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::source(data));
