//! The x86 state KVM keeps for a guest, outside guest RAM, and the record
//! that says whether a destination can take it.
//!
//! - [`VcpuState`]: everything of one vCPU (registers, FPU/XSAVE, XCRs,
//!   LAPIC, MSRs, pending events, debug registers, run state), saved from
//!   and restored to a `&VcpuFd` that is not in `KVM_RUN`, in the order KVM
//!   needs. [`VcpuCaps`] is what this host's KVM can save of a vCPU (the
//!   XSAVE size, XCRs, and the [`MsrList`]), probed once per VM.
//! - [`VmState`]: the VM-wide devices KVM emulates in the kernel (the two
//!   PICs and the IOAPIC, the PIT, kvmclock), each only when the VM has it.
//! - [`CpuModel`]: the compatibility record the source sends before any
//!   RAM (CPUID, TSC frequency, vCPU count); [`CpuModel::check`] on the
//!   destination names the first difference as a [`Mismatch`].
//!
//! Each has a byte encoding (little-endian, a magic and a version, then
//! tagged sections with lengths) whose decoder validates every length and
//! count and returns a typed [`StateError`], never panics. Register
//! structures travel as kvm-bindings' in-memory layout (zerocopy byte
//! views): like every KVM VMM, this migrates between x86-64 hosts only.
//!
//! Not carried yet: nested virtualization state (`KVM_GET_NESTED_STATE`,
//! for a guest that runs its own guests), Hyper-V enlightenments (their
//! MSRs are only readable with Hyper-V CPUID), exception payloads
//! (`KVM_CAP_EXCEPTION_PAYLOAD` is not enabled), and TSC scaling for a
//! destination with another TSC frequency ([`CpuModel::check`] refuses
//! it). On PVM (the paravirtual KVM of this project's machines) the guest
//! runs on the host's TSC and KVM ignores a restored IA32_TSC, so the TSC
//! continues only between VMs of one host there.
//!
//! The only `unsafe` here is `KVM_GET_XSAVE2` / `KVM_SET_XSAVE2`, whose
//! buffer size the caller must vouch for.

mod cpu_model;
mod error;
mod msrs;
mod vcpu_state;
mod vm_state;
mod wire;

pub use cpu_model::{CpuModel, CpuidRegister, Mismatch};
pub use error::{Blob, MsrAccess, StateError};
pub use msrs::{MsrList, msr};
pub use vcpu_state::{FpuState, VcpuCaps, VcpuState};
pub use vm_state::{Irqchip, VmState};
