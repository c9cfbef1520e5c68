//! The VMM's vCPUs as livemig reaches them: one at a time, through
//! [`Vcpus::with_vcpu`], with the VMM's and KVM's failures kept apart.

use kvm_ioctls::VcpuFd;

use crate::vmm::{Vcpus, VmmError};
use crate::x86::StateError;

/// Runs `f` on vCPU `index` through the VMM, with either side's error.
pub(crate) fn on_vcpu<T>(
    vcpus: &dyn Vcpus,
    index: usize,
    mut f: impl FnMut(&VcpuFd) -> Result<T, StateError>,
) -> Result<T, VcpuAccess> {
    let mut out = None;
    vcpus
        .with_vcpu(index, &mut |fd| out = Some(f(fd)))
        .map_err(|e| VcpuAccess::Vmm { index, error: e })?;
    match out {
        Some(r) => r.map_err(|e| VcpuAccess::State { index, error: e }),
        None => Err(VcpuAccess::NotCalled { index }),
    }
}

/// Why livemig could not work on one of the VMM's vCPUs.
#[derive(Debug)]
pub enum VcpuAccess {
    /// The VMM's `with_vcpu` failed.
    Vmm {
        /// The vCPU index.
        index: usize,
        /// The VMM's error.
        error: VmmError,
    },
    /// The VMM's `with_vcpu` returned without calling livemig back.
    NotCalled {
        /// The vCPU index.
        index: usize,
    },
    /// KVM refused the vCPU state.
    State {
        /// The vCPU index.
        index: usize,
        /// What KVM or the decoder refused.
        error: StateError,
    },
}

impl std::fmt::Display for VcpuAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuAccess::Vmm { index, error } => write!(f, "vCPU {index}: the VMM failed: {error}"),
            VcpuAccess::NotCalled { index } => write!(
                f,
                "vCPU {index}: the VMM's with_vcpu returned without lending the vCPU"
            ),
            VcpuAccess::State { index, error } => write!(f, "vCPU {index}: {error}"),
        }
    }
}

impl std::error::Error for VcpuAccess {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VcpuAccess::Vmm { error, .. } => Some(error.as_ref()),
            VcpuAccess::State { error, .. } => Some(error),
            VcpuAccess::NotCalled { .. } => None,
        }
    }
}
