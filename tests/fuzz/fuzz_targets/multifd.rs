//! libFuzzer target for the multifd channel decoders (`cargo fuzz run multifd`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    livemig_fuzz::multifd(data);
});
