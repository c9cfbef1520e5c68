#![no_main]
//! libFuzzer target: the return-path decoder (see `livemig_fuzz::return_path`).
libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::return_path(data));
