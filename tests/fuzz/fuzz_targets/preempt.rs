//! libFuzzer target for the postcopy preempt channel (`cargo fuzz run preempt`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    livemig_fuzz::preempt(data);
});
