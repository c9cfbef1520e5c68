//! What went wrong on the destination's side, typed; each `Display` is the
//! operator's sentence.

use std::fmt;

use livemig_core::destination::{DestError, HostOp};
use livemig_core::stats::ErrorDesc;
use livemig_core::wire::DecodeError;

use super::super::CPU_STATE_VERSION;
use crate::dirty_log::DirtyLogError;
use crate::memory::{MemoryError, PAGE_SIZE};
use crate::postcopy::PostcopyError;
use crate::transport::TransportError;
use crate::vcpu::VcpuError;
use crate::x86::StateError;

/// Why [`super::KvmHost`] refused what the engine asked of it (its
/// `DestinationHost::Error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostFailure {
    /// Writing a page into guest RAM failed.
    WriteRam(MemoryError),
    /// A postcopy command (discard, listen) came before the advise.
    PostcopyBeforeAdvise,
    /// Guest RAM could not be registered with userfaultfd.
    Register(PostcopyError),
    /// The postcopy fault thread could not be started.
    StartFaultThread(PostcopyError),
    /// `UFFDIO_COPY` failed.
    Copy(PostcopyError),
    /// `UFFDIO_ZEROPAGE` failed.
    ZeroPage(PostcopyError),
    /// Guest RAM could not be discarded.
    Discard(PostcopyError),
    /// The stream carries a device this destination does not have.
    UnknownDevice {
        /// The section's id.
        id: String,
        /// The section's instance.
        instance: u32,
    },
    /// The vCPU section has a version this side cannot load.
    DeviceVersion(u32),
    /// KVM refused the vCPU state.
    LoadVcpu(StateError),
    /// The source's page sizes are not this destination's.
    PageSize {
        /// The source's host page size, bytes.
        host: u64,
        /// The source's target page size, bytes.
        target: u64,
    },
    /// The userfaultfd probe's one page of RAM could not be made.
    ProbeMemory(MemoryError),
    /// The userfaultfd probe failed: postcopy cannot work here.
    NoUserfaultfd(PostcopyError),
    /// KVM's dirty log could not be reset at the postcopy advise.
    ResetDirtyLog(DirtyLogError),
    /// The vCPU could not be started by the postcopy run command.
    StartVcpu(VcpuError),
}

impl HostFailure {
    /// What the host was doing, the start of its sentence.
    fn what(&self) -> &'static str {
        match self {
            HostFailure::WriteRam(_) => "writing guest RAM",
            HostFailure::PostcopyBeforeAdvise => "postcopy",
            HostFailure::Register(_) => "registering guest RAM with userfaultfd",
            HostFailure::StartFaultThread(_) => "starting the postcopy fault thread",
            HostFailure::Copy(_) => "UFFDIO_COPY",
            HostFailure::ZeroPage(_) => "UFFDIO_ZEROPAGE",
            HostFailure::Discard(_) => "discarding guest RAM",
            HostFailure::UnknownDevice { .. } => "unknown device",
            HostFailure::DeviceVersion(_) => "vCPU state version",
            HostFailure::LoadVcpu(_) => "vCPU state",
            HostFailure::PageSize { .. } => "postcopy page size",
            HostFailure::ProbeMemory(_) | HostFailure::NoUserfaultfd(_) => {
                "postcopy needs userfaultfd"
            }
            HostFailure::ResetDirtyLog(_) => "resetting the dirty log",
            HostFailure::StartVcpu(_) => "starting the vCPU",
        }
    }
}

impl fmt::Display for HostFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = self.what();
        match self {
            HostFailure::WriteRam(e) | HostFailure::ProbeMemory(e) => write!(f, "{what}: {e}"),
            HostFailure::Register(e)
            | HostFailure::StartFaultThread(e)
            | HostFailure::Copy(e)
            | HostFailure::ZeroPage(e)
            | HostFailure::Discard(e)
            | HostFailure::NoUserfaultfd(e) => write!(f, "{what}: {e}"),
            HostFailure::PostcopyBeforeAdvise => {
                write!(f, "{what}: a postcopy command came before the advise")
            }
            HostFailure::UnknownDevice { id, instance } => {
                write!(f, "unknown device '{id}' instance {instance} in the stream")
            }
            HostFailure::DeviceVersion(v) => write!(
                f,
                "vCPU state version {v} is not supported (this side loads version {CPU_STATE_VERSION})"
            ),
            HostFailure::LoadVcpu(e) => write!(f, "loading the vCPU state failed: {e}"),
            HostFailure::PageSize { host, target } => write!(
                f,
                "{what}: the source uses {host}-byte host and {target}-byte target pages, \
                 this destination only {PAGE_SIZE}-byte pages"
            ),
            HostFailure::ResetDirtyLog(e) => write!(f, "{what}: {e}"),
            HostFailure::StartVcpu(e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for HostFailure {}

/// Why an incoming migration failed ([`super::DestinationReport::error`]).
#[derive(Debug)]
pub enum ReceiveFailure {
    /// The engine refused the stream.
    Engine {
        /// The engine's error.
        error: DestError,
        /// The source's address.
        peer: String,
    },
    /// This host failed an operation the engine asked of it.
    Host {
        /// The engine's operation.
        op: HostOp,
        /// What failed.
        error: HostFailure,
    },
    /// Reading the stream failed.
    ConnectionLost(TransportError),
    /// Writing the return path failed.
    ReturnPathLost(TransportError),
    /// The load was interrupted (by `signal`, 0 for none); the source was
    /// told and resumes its guest.
    Interrupted {
        /// The signal number, 0 for a plain cancel.
        signal: u32,
        /// Why the source could not be told, if it could not.
        untold: Option<TransportError>,
    },
    /// The postcopy fault thread ended while guest RAM was registered.
    FaultThreadStopped,
    /// The engine refused a page fault.
    PageFault(DestError),
    /// A fault came before guest RAM was registered.
    FaultBeforeRegister,
    /// A page that arrived as a zero page could not be filled.
    ZeroFill(PostcopyError),
    /// Guest RAM could not be unregistered at the end of postcopy.
    EndPostcopy(PostcopyError),
    /// The postcopy fault thread failed.
    FaultThread(PostcopyError),
    /// The engine failed for a reason of its own (its description; empty
    /// when it gave none).
    Failed(Box<ErrorDesc>),
}

/// The first bytes of a QEMU migration stream (`QEMU_VM_FILE_MAGIC`).
const QEMU_STREAM_MAGIC: &[u8; 4] = b"QEVM";

/// An engine error in an operator's words.
fn describe(f: &mut fmt::Formatter<'_>, err: &DestError, peer: &str) -> fmt::Result {
    const MIB: u64 = 1 << 20;
    match err {
        DestError::BlockLengthMismatch {
            source,
            destination,
            ..
        } => write!(
            f,
            "RAM size mismatch: the source has {} MiB, this destination {} MiB",
            source / MIB,
            destination / MIB
        ),
        DestError::Decode(DecodeError::BadMagic { found }) if found == QEMU_STREAM_MAGIC => {
            write!(
                f,
                "the peer {peer} sent a QEMU migration stream, which livemig does not read \
             (migrate from a livemig source)"
            )
        }
        DestError::Decode(DecodeError::BadMagic { .. }) => write!(
            f,
            "the peer {peer} is not a livemig source: its stream does not start with the livemig header"
        ),
        DestError::Decode(DecodeError::UnsupportedVersion { found, supported }) => write!(
            f,
            "livemig version mismatch: the source speaks stream version {found}, this destination {supported}"
        ),
        DestError::UnexpectedEof(_) => write!(f, "connection from {peer} lost: {err}"),
        DestError::Decode(DecodeError::TrailingData { len, what }) => write!(
            f,
            "the source {peer} sent {len} bytes {what}, where its stream must end: refused, \
             the guest was not started"
        ),
        _ => fmt::Display::fmt(err, f),
    }
}

impl fmt::Display for ReceiveFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReceiveFailure::Engine { error, peer } => describe(f, error, peer),
            ReceiveFailure::Host { op, error } => {
                write!(f, "the destination failed {op}: {error}")
            }
            ReceiveFailure::ConnectionLost(e) => write!(f, "connection lost: {e}"),
            ReceiveFailure::ReturnPathLost(e) => write!(f, "return path lost: {e}"),
            ReceiveFailure::Interrupted { signal, untold } => {
                fmt::Display::fmt(&DestError::Interrupted { signal: *signal }, f)?;
                match untold {
                    Some(e) => write!(f, " (telling the source failed: {e})"),
                    None => Ok(()),
                }
            }
            ReceiveFailure::FaultThreadStopped => write!(
                f,
                "the postcopy fault thread stopped: page faults are no longer served"
            ),
            ReceiveFailure::PageFault(e) => write!(f, "postcopy page fault: {e}"),
            ReceiveFailure::FaultBeforeRegister => {
                write!(f, "a fault before guest RAM was registered")
            }
            ReceiveFailure::ZeroFill(e) => write!(f, "filling a zero page: {e}"),
            ReceiveFailure::EndPostcopy(e) => write!(f, "ending postcopy: {e}"),
            ReceiveFailure::FaultThread(e) => write!(f, "postcopy fault thread: {e}"),
            ReceiveFailure::Failed(desc) if desc.is_empty() => write!(f, "the migration failed"),
            ReceiveFailure::Failed(desc) => fmt::Display::fmt(desc, f),
        }
    }
}

impl std::error::Error for ReceiveFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReceiveFailure::Engine { error, .. } | ReceiveFailure::PageFault(error) => Some(error),
            ReceiveFailure::Host { error, .. } => Some(error),
            ReceiveFailure::ConnectionLost(e) | ReceiveFailure::ReturnPathLost(e) => Some(e),
            ReceiveFailure::ZeroFill(e)
            | ReceiveFailure::EndPostcopy(e)
            | ReceiveFailure::FaultThread(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_become_operator_sentences() {
        let describe = |error: DestError, peer: &str| {
            ReceiveFailure::Engine {
                error,
                peer: peer.to_string(),
            }
            .to_string()
        };
        let e = DestError::BlockLengthMismatch {
            index: 0,
            source: 512 << 20,
            destination: 256 << 20,
        };
        assert_eq!(
            describe(e, "tcp:x:1"),
            "RAM size mismatch: the source has 512 MiB, this destination 256 MiB"
        );
        let e = DestError::Decode(DecodeError::BadMagic { found: *b"GET " });
        assert!(describe(e, "tcp:x:1").contains("not a livemig source"));
        // Issue 8 item 9: a QEMU source is named as such.
        let e = DestError::Decode(DecodeError::BadMagic { found: *b"QEVM" });
        assert_eq!(
            describe(e, "tcp:x:1"),
            "the peer tcp:x:1 sent a QEMU migration stream, which livemig does not read \
             (migrate from a livemig source)"
        );
        let e = DestError::Decode(DecodeError::UnsupportedVersion {
            found: 9,
            supported: 1,
        });
        assert!(describe(e, "tcp:x:1").contains("version mismatch"));
        let host = ReceiveFailure::Host {
            op: HostOp::LoadDevice,
            error: HostFailure::LoadVcpu(StateError::Kvm {
                op: "KVM_SET_REGS",
                errno: 22,
            }),
        };
        let w = host.to_string();
        assert!(
            w.starts_with(
                "the destination failed loading device state: loading the vCPU state failed:"
            ),
            "{w}"
        );
        assert!(w.contains("KVM_SET_REGS"), "{w}");
        // The engine's own text, or a plain sentence when it gave none.
        assert_eq!(
            ReceiveFailure::Failed(Default::default()).to_string(),
            "the migration failed"
        );
    }
}
