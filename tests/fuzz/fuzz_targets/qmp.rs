#![no_main]
//! libFuzzer target: the QMP message decoder (see `livemig_fuzz::qmp`).
libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::qmp(data));
