#![no_main]
//! libFuzzer target: the destination engine (see `livemig_fuzz::destination`).
libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::destination(data));
