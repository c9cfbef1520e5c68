//! libFuzzer target for livemig-kvm's x86 decoder (`cargo fuzz run x86_vcpu_state`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    livemig_fuzz::x86_vcpu_state(data);
});
