//! libFuzzer target for livemig-kvm's x86 decoder (`cargo fuzz run x86_cpu_model`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    livemig_fuzz::x86_cpu_model(data);
});
