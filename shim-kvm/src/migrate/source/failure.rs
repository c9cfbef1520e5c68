//! What went wrong on the source's side of a migration that ran, typed;
//! each `Display` is the operator's sentence the engine records.

use std::fmt;

use livemig_core::return_path::RpDecodeError;
use livemig_core::source::SourceError;
use livemig_core::wire::EncodeError;

use super::super::vcpu_access::VcpuAccess;
use super::channels::ChannelLost;
use crate::dirty_log::DirtyLogError;
use crate::transport::TransportError;
use crate::vmm::VmmError;
use crate::x86::StateError;

/// Why the source driver failed a migration (the engine's own reasons, such
/// as a timeout or the destination's refusal, are in its statistics).
#[derive(Debug)]
pub enum SourceFailure {
    /// Writing to, or reading from, the connection failed.
    ConnectionLost(TransportError),
    /// Writing to a multifd channel failed.
    ChannelLost(ChannelLost),
    /// `KVM_GET_DIRTY_LOG` failed.
    DirtyLogFetch(DirtyLogError),
    /// `KVM_CLEAR_DIRTY_LOG` failed.
    DirtyLogClear(DirtyLogError),
    /// The VMM could not pause its vCPUs for the stop-and-copy.
    StopVcpus(VmmError),
    /// The VMM could not throttle its vCPUs (auto-converge).
    Throttle(VmmError),
    /// A stopped vCPU's state could not be read.
    SaveVcpu(VcpuAccess),
    /// The VM-wide in-kernel devices' state could not be read.
    SaveVmState(StateError),
    /// A VMM device refused to quiesce or save its state.
    SaveDevice {
        /// The section id.
        id: String,
        /// The section instance.
        instance: u32,
        /// The VMM's error.
        error: VmmError,
    },
    /// The VMM's device dirty log failed for guest-memory region `region`:
    /// pages it wrote could be missed, so the migration stops.
    DeviceDirtyLog {
        /// The region index.
        region: usize,
        /// The VMM's error.
        error: VmmError,
    },
    /// More vCPUs than a section instance can number.
    TooManyVcpus(usize),
    /// More guest-memory regions than the stream can number as blocks.
    TooManyRegions(usize),
    /// A device record could not be framed.
    DeviceRecord(EncodeError),
    /// The engine refused what the driver told it.
    Engine(SourceError),
    /// The destination `peer` sent bytes that are not a valid return path.
    ReturnPath {
        /// The destination's address.
        peer: String,
        /// What the decoder found.
        error: RpDecodeError,
    },
    /// The destination `peer` closed the connection between messages.
    ReturnPathClosed {
        /// The destination's address.
        peer: String,
    },
}

impl fmt::Display for SourceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceFailure::ConnectionLost(e) => write!(f, "connection lost: {e}"),
            SourceFailure::ChannelLost(e) => e.fmt(f),
            SourceFailure::DirtyLogFetch(e) => write!(f, "KVM_GET_DIRTY_LOG failed: {e}"),
            SourceFailure::DirtyLogClear(e) => write!(f, "KVM_CLEAR_DIRTY_LOG failed: {e}"),
            SourceFailure::StopVcpus(e) => write!(f, "pausing the vCPUs failed: {e}"),
            SourceFailure::Throttle(e) => write!(f, "throttling the vCPUs failed: {e}"),
            SourceFailure::SaveVcpu(e) => write!(f, "saving the vCPU state failed: {e}"),
            SourceFailure::SaveVmState(e) => {
                write!(f, "saving the VM's in-kernel devices failed: {e}")
            }
            SourceFailure::SaveDevice {
                id,
                instance,
                error,
            } => write!(
                f,
                "saving device '{id}' instance {instance} failed: {error}"
            ),
            SourceFailure::DeviceDirtyLog { region, error } => write!(
                f,
                "the VMM's device dirty log failed for guest-memory region {region}: {error}"
            ),
            SourceFailure::TooManyVcpus(n) => {
                write!(
                    f,
                    "vCPU {n} cannot be numbered in a 32-bit section instance"
                )
            }
            SourceFailure::TooManyRegions(n) => write!(
                f,
                "guest-memory region {n} cannot be numbered as a RAM block (at most 65536)"
            ),
            SourceFailure::DeviceRecord(e) => write!(f, "device header: {e}"),
            SourceFailure::Engine(e) => write!(f, "migration engine: {e}"),
            // A bad header means the peer does not speak the return path
            // at all; a well-framed message with invalid content, or one
            // cut off by the close, is named as such.
            SourceFailure::ReturnPath { peer, error } if error.is_framing() => write!(
                f,
                "the peer {peer} is not a livemig destination: its reply is not a return-path message ({error})"
            ),
            SourceFailure::ReturnPath {
                peer,
                error: error @ RpDecodeError::Truncated { .. },
            } => write!(
                f,
                "the destination {peer} closed the connection in the middle of a message ({error})"
            ),
            SourceFailure::ReturnPath { peer, error } => write!(
                f,
                "the destination {peer} sent an invalid return-path message ({error})"
            ),
            SourceFailure::ReturnPathClosed { peer } => {
                write!(f, "connection to {peer} closed by the destination")
            }
        }
    }
}

impl std::error::Error for SourceFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SourceFailure::ConnectionLost(e) => Some(e),
            SourceFailure::ChannelLost(e) => e.error.as_ref().map(|e| e as _),
            SourceFailure::DirtyLogFetch(e) | SourceFailure::DirtyLogClear(e) => Some(e),
            SourceFailure::StopVcpus(e) | SourceFailure::Throttle(e) => Some(e.as_ref()),
            SourceFailure::SaveDevice { error, .. }
            | SourceFailure::DeviceDirtyLog { error, .. } => Some(error.as_ref()),
            SourceFailure::SaveVcpu(e) => Some(e),
            SourceFailure::SaveVmState(e) => Some(e),
            SourceFailure::TooManyVcpus(_) | SourceFailure::TooManyRegions(_) => None,
            SourceFailure::DeviceRecord(e) => Some(e),
            SourceFailure::Engine(e) => Some(e),
            SourceFailure::ReturnPath { error, .. } => Some(error),
            SourceFailure::ReturnPathClosed { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_core::return_path::RpDecoder;

    /// Issue 8 item 9: what the source says about bad return-path bytes.
    #[test]
    fn return_path_errors_name_the_real_cause() {
        let words = |bytes: &[u8]| {
            let mut rp = RpDecoder::new(4096).unwrap();
            let peer = "tcp:d:1".to_string();
            match rp.decode(bytes) {
                Err(error) => SourceFailure::ReturnPath { peer, error },
                Ok(_) => match rp.finish() {
                    Err(error) => SourceFailure::ReturnPath { peer, error },
                    Ok(()) => SourceFailure::ReturnPathClosed { peer },
                },
            }
            .to_string()
        };
        assert!(words(b"HTTP/1.1 400").contains("is not a livemig destination"));
        // Well framed, invalid content: a RESUME_ACK of 2, a misaligned
        // page request.
        let w = words(&[0, 6, 0, 4, 0, 0, 0, 2]);
        assert!(w.contains("sent an invalid return-path message"), "{w}");
        assert!(w.contains("RESUME_ACK value 2"), "{w}");
        let w = words(&[0, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0x10, 0]);
        assert!(w.contains("sent an invalid return-path message"), "{w}");
        assert!(w.contains("misaligned page request"), "{w}");
        assert!(!w.contains("not a livemig"), "{w}");
        // Cut off: the close came in the middle of a PONG.
        let w = words(&[0, 2, 0, 4, 0]);
        assert!(
            w.contains("closed the connection in the middle of a message"),
            "{w}"
        );
        assert!(w.contains("PONG"), "{w}");
        assert_eq!(
            words(&[]),
            "connection to tcp:d:1 closed by the destination"
        );
    }
}
