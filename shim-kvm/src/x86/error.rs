//! Why an x86 state blob was rejected, or could not be saved or applied.

use std::fmt;

/// Which of the encodings a [`StateError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blob {
    /// A [`super::VcpuState`].
    VcpuState,
    /// A [`super::VmState`].
    VmState,
    /// A [`super::CpuModel`].
    CpuModel,
}

impl fmt::Display for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Blob::VcpuState => "vCPU state",
            Blob::VmState => "VM state",
            Blob::CpuModel => "CPU model",
        })
    }
}

/// Whether KVM refused to read or to write an MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrAccess {
    /// `KVM_GET_MSRS` stopped at it.
    Read,
    /// `KVM_SET_MSRS` stopped at it.
    Write,
}

/// Why an x86 state blob was rejected, or could not be saved or applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The blob ends before its header or a section it declares.
    Truncated {
        /// Which encoding.
        blob: Blob,
        /// Bytes needed at the point of failure.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The magic number is wrong: not this kind of blob.
    BadMagic {
        /// Which encoding was expected.
        blob: Blob,
        /// The magic found.
        found: u32,
    },
    /// A layout version this code does not read.
    BadVersion {
        /// Which encoding.
        blob: Blob,
        /// The version found.
        found: u16,
        /// The version this code reads.
        supported: u16,
    },
    /// The header's body length disagrees with the bytes carried, or the
    /// declared sections do not fill the body exactly.
    LengthMismatch {
        /// Which encoding.
        blob: Blob,
        /// Declared body length.
        declared: usize,
        /// Actual body length (or bytes the sections used).
        actual: usize,
    },
    /// A section has the wrong size for what it holds.
    BadSectionLength {
        /// Which encoding.
        blob: Blob,
        /// Section tag.
        tag: u32,
        /// Its length.
        len: usize,
    },
    /// A section tag this version does not define.
    UnknownSection {
        /// Which encoding.
        blob: Blob,
        /// The tag.
        tag: u32,
    },
    /// A section appears twice, or two sections that exclude each other
    /// both appear (legacy FPU and XSAVE).
    DuplicateSection {
        /// Which encoding.
        blob: Blob,
        /// The tag seen second.
        tag: u32,
    },
    /// A required section is missing.
    MissingSection {
        /// Which encoding.
        blob: Blob,
        /// The missing tag.
        tag: u32,
    },
    /// A VM-state irqchip section carries another chip's id.
    BadChipId {
        /// The section tag.
        tag: u32,
        /// The chip id it carries.
        chip_id: u32,
    },
    /// A CPU model lists one CPUID leaf twice, so a check would be
    /// ambiguous.
    DuplicateCpuidLeaf {
        /// The leaf (EAX input).
        function: u32,
        /// The subleaf (ECX input).
        index: u32,
    },
    /// A list is longer than KVM accepts.
    TooMany {
        /// What is counted ("MSRs", "CPUID entries").
        what: &'static str,
        /// How many the blob or the caller has.
        count: usize,
        /// The most KVM takes.
        max: usize,
    },
    /// The XSAVE area is larger than this host's KVM takes
    /// (`KVM_CAP_XSAVE2`), so restoring it would lose state.
    XsaveTooLarge {
        /// Bytes in the saved area.
        len: usize,
        /// Bytes this host's KVM takes.
        max: usize,
    },
    /// KVM refused one MSR of a `KVM_GET_MSRS` / `KVM_SET_MSRS` batch.
    Msr {
        /// The MSR index.
        index: u32,
        /// Read or write.
        access: MsrAccess,
    },
    /// A KVM ioctl failed.
    Kvm {
        /// The operation.
        op: &'static str,
        /// Its errno.
        errno: i32,
    },
    /// The vCPU is not paused, so its state cannot be read or written.
    NotPaused,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Truncated { blob, needed, have } => {
                write!(f, "{blob} truncated: need {needed} bytes, have {have}")
            }
            StateError::BadMagic { blob, found } => {
                write!(f, "{blob} has bad magic {found:#010x}")
            }
            StateError::BadVersion {
                blob,
                found,
                supported,
            } => write!(
                f,
                "{blob} layout version {found} unsupported (this side reads {supported})"
            ),
            StateError::LengthMismatch {
                blob,
                declared,
                actual,
            } => write!(
                f,
                "{blob} declares {declared} body bytes but carries {actual}"
            ),
            StateError::BadSectionLength { blob, tag, len } => write!(
                f,
                "{blob} section {tag} ({}) has bad length {len}",
                section_name(*blob, *tag)
            ),
            StateError::UnknownSection { blob, tag } => {
                write!(f, "{blob} section {tag} is unknown")
            }
            StateError::DuplicateSection { blob, tag } => write!(
                f,
                "{blob} section {tag} ({}) repeated or conflicting",
                section_name(*blob, *tag)
            ),
            StateError::MissingSection { blob, tag } => write!(
                f,
                "{blob} section {tag} ({}) missing",
                section_name(*blob, *tag)
            ),
            StateError::BadChipId { tag, chip_id } => write!(
                f,
                "VM state section {tag} ({}) carries irqchip id {chip_id}",
                section_name(Blob::VmState, *tag)
            ),
            StateError::DuplicateCpuidLeaf { function, index } => write!(
                f,
                "CPU model lists CPUID function {function:#x} index {index} twice"
            ),
            StateError::TooMany { what, count, max } => {
                write!(f, "{count} {what}, more than the {max} KVM takes")
            }
            StateError::XsaveTooLarge { len, max } => write!(
                f,
                "XSAVE area of {len} bytes, larger than the {max} this host's KVM takes"
            ),
            StateError::Msr { index, access } => {
                let verb = match access {
                    MsrAccess::Read => "read",
                    MsrAccess::Write => "write",
                };
                write!(f, "KVM refused to {verb} MSR {index:#x}")
            }
            StateError::Kvm { op, errno } => write!(f, "{op} failed: errno {errno}"),
            StateError::NotPaused => f.write_str("vCPU state needs a paused vCPU"),
        }
    }
}

impl std::error::Error for StateError {}

/// The name of section `tag` of `blob`, for messages.
fn section_name(blob: Blob, tag: u32) -> &'static str {
    let names = match blob {
        Blob::VcpuState => super::vcpu_state::SECTION_NAMES,
        Blob::VmState => super::vm_state::SECTION_NAMES,
        Blob::CpuModel => super::cpu_model::SECTION_NAMES,
    };
    names
        .iter()
        .find(|(t, _)| *t == tag)
        .map_or("unknown", |(_, n)| n)
}

/// Maps a kvm-ioctls error to [`StateError::Kvm`] for operation `op`.
pub(super) fn kvm(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Kvm {
        op,
        errno: e.errno(),
    }
}
