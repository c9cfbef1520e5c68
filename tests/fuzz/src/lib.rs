//! Fuzz entry points shared by the libFuzzer targets and the stable driver.
//!
//! Each entry point takes arbitrary bytes, drives one decoder of
//! `livemig-core` (or, for `x86_*`, of `livemig-kvm`'s x86 state; for `qmp`,
//! of `livemig-cli`'s QMP client) over them and panics only when an invariant breaks (the
//! decoders themselves must never panic). A `*_corpus` function next to an
//! entry point gives valid inputs for mutation-based drivers to start from.

mod destination;
mod multifd;
mod preempt;
mod qmp;
mod return_path;
mod source;
mod stream;
mod x86;

pub use destination::{destination, destination_accepts, destination_corpus};
pub use multifd::{multifd, multifd_accepts, multifd_corpus};
pub use preempt::{preempt, preempt_accepts, preempt_corpus};
pub use qmp::{qmp, qmp_accepts, qmp_corpus};
pub use return_path::{return_path, return_path_accepts, return_path_corpus};
pub use source::{source, source_accepts, source_corpus};
pub use stream::{stream, stream_accepts, stream_corpus};
pub use x86::{
    x86_cpu_model, x86_cpu_model_accepts, x86_cpu_model_corpus, x86_vcpu_state,
    x86_vcpu_state_accepts, x86_vcpu_state_corpus, x86_vm_state, x86_vm_state_accepts,
    x86_vm_state_corpus,
};
