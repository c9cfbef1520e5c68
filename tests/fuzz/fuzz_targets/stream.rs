//! libFuzzer target for the main-stream decoder (`cargo fuzz run stream`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    livemig_fuzz::stream(data);
});
