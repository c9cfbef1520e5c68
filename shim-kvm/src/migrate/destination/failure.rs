//! What went wrong on the destination's side, typed; each `Display` is the
//! operator's sentence.

use std::fmt;

use livemig_core::destination::{DestError, HostOp};
use livemig_core::stats::ErrorDesc;
use livemig_core::wire::DecodeError;

use super::super::vcpu_access::VcpuAccess;
use super::channels::ChannelFailure;
use crate::memory::{MemoryError, PAGE_SIZE};
use crate::postcopy::PostcopyError;
use crate::transport::TransportError;
use crate::vmm::VmmError;
use crate::x86::{Mismatch, StateError};

/// Why [`super::KvmHost`] refused what the engine asked of it (its
/// `DestinationHost::Error`).
#[derive(Debug)]
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
    /// A page range reaches past the end of its block.
    OutsideBlock {
        /// The block.
        block: u16,
        /// The first page.
        page: u64,
        /// Pages in the range.
        count: u64,
    },
    /// The stream carries a section this destination did not register.
    UnknownSection {
        /// The section's id.
        id: String,
        /// The section's instance.
        instance: u32,
    },
    /// A section's version is outside what this destination loads.
    SectionVersion {
        /// The section's id.
        id: String,
        /// The section's instance.
        instance: u32,
        /// The version in the stream.
        version: u32,
        /// The oldest version this side loads.
        oldest: u32,
        /// The newest version this side loads.
        newest: u32,
    },
    /// The source's CPU model record could not be decoded.
    DecodeCpuModel(StateError),
    /// The source's CPU model is not this destination's.
    CpuMismatch(Mismatch),
    /// The runstate section is not one byte of 0 or 1.
    Runstate(Vec<u8>),
    /// A vCPU state record could not be decoded.
    DecodeVcpu(StateError),
    /// A vCPU's state could not be loaded.
    LoadVcpu(VcpuAccess),
    /// The VM-wide record could not be decoded.
    DecodeVmState(StateError),
    /// KVM refused the VM-wide devices' state.
    LoadVmState(StateError),
    /// A VMM device refused its state.
    LoadDevice {
        /// The section's id.
        id: String,
        /// The section's instance.
        instance: u32,
        /// The VMM's error.
        error: VmmError,
    },
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
    /// The source advised postcopy and guest RAM is preallocated
    /// ([`crate::memory::GuestMemory::prealloc`]): userfaultfd reports only missing
    /// pages, none is missing, so a vCPU would read a page not yet sent as
    /// zeros instead of waiting for it.
    PostcopyPreallocated,
    /// The VMM could not resume its vCPUs to start the guest.
    StartVcpus(VmmError),
    /// A multifd channel failed (accepting it, its hello, a packet, a sync).
    Channel(ChannelFailure),
    /// The source announced the postcopy preempt channel and this
    /// destination was given no listener to accept it on.
    NoPreemptListener,
    /// Accepting the postcopy preempt channel failed or timed out.
    AcceptPreempt(TransportError),
    /// The postcopy preempt channel's reader thread could not be started.
    SpawnPreempt(std::io::Error),
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
            HostFailure::OutsideBlock { .. } => "placing pages",
            HostFailure::UnknownSection { .. } => "unknown section",
            HostFailure::SectionVersion { .. } => "section version",
            HostFailure::DecodeCpuModel(_) | HostFailure::CpuMismatch(_) => "CPU model",
            HostFailure::Runstate(_) => "runstate",
            HostFailure::DecodeVcpu(_) | HostFailure::LoadVcpu(_) => "vCPU state",
            HostFailure::DecodeVmState(_) | HostFailure::LoadVmState(_) => "VM device state",
            HostFailure::LoadDevice { .. } => "device state",
            HostFailure::PageSize { .. } => "postcopy page size",
            HostFailure::ProbeMemory(_) | HostFailure::NoUserfaultfd(_) => {
                "postcopy needs userfaultfd"
            }
            HostFailure::PostcopyPreallocated => "postcopy over preallocated RAM",
            HostFailure::StartVcpus(_) => "starting the vCPUs",
            HostFailure::Channel(_) => "multifd",
            HostFailure::NoPreemptListener
            | HostFailure::AcceptPreempt(_)
            | HostFailure::SpawnPreempt(_) => "the postcopy preempt channel",
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
            HostFailure::OutsideBlock { block, page, count } => write!(
                f,
                "{what}: pages {page}+{count} reach past the end of RAM block {block}"
            ),
            HostFailure::UnknownSection { id, instance } => write!(
                f,
                "the stream carries section '{id}' instance {instance}, which this destination \
                 did not register: refused before the guest starts"
            ),
            HostFailure::SectionVersion {
                id,
                instance,
                version,
                oldest,
                newest,
            } => write!(
                f,
                "section '{id}' instance {instance} has version {version}, this destination \
                 loads versions {oldest} to {newest}: refused before the guest starts"
            ),
            HostFailure::DecodeCpuModel(e) => write!(f, "{what}: the source's record: {e}"),
            HostFailure::CpuMismatch(e) => write!(
                f,
                "the source's CPU model does not match this destination's: {e}"
            ),
            HostFailure::Runstate(data) => write!(
                f,
                "{what}: {} bytes where one byte of 0 or 1 belongs",
                data.len()
            ),
            HostFailure::DecodeVcpu(e) => write!(f, "decoding the vCPU state failed: {e}"),
            HostFailure::LoadVcpu(e) => write!(f, "loading the vCPU state failed: {e}"),
            HostFailure::DecodeVmState(e) | HostFailure::LoadVmState(e) => {
                write!(f, "{what}: {e}")
            }
            HostFailure::LoadDevice {
                id,
                instance,
                error,
            } => write!(
                f,
                "loading device '{id}' instance {instance} failed: {error}"
            ),
            HostFailure::PageSize { host, target } => write!(
                f,
                "{what}: the source uses {host}-byte host and {target}-byte target pages, \
                 this destination only {PAGE_SIZE}-byte pages"
            ),
            HostFailure::PostcopyPreallocated => write!(
                f,
                "{what}: refused, guest RAM was preallocated (mem-prealloc), so no page is \
                 missing and userfaultfd could not hold a vCPU until its page arrives; \
                 migrate by precopy, or receive without mem-prealloc"
            ),
            HostFailure::StartVcpus(e) => write!(f, "{what}: {e}"),
            HostFailure::Channel(e) => e.fmt(f),
            HostFailure::NoPreemptListener => {
                write!(f, "{what}: no listener to accept it on")
            }
            HostFailure::AcceptPreempt(e) => write!(f, "{what}: accepting it: {e}"),
            HostFailure::SpawnPreempt(e) => write!(f, "{what}: starting its reader thread: {e}"),
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
    /// A fault at a guest-physical address outside every region.
    FaultOutsideRam(u64),
    /// The loaded guest could not be started after the COMMIT.
    StartGuest(HostFailure),
    /// The guest of a failed postcopy could not be paused again.
    PauseAfterFailure(VmmError),
    /// A multifd channel failed between two syncs.
    Channel(ChannelFailure),
    /// Reading the postcopy preempt channel failed.
    PreemptLost(TransportError),
    /// The source closed the postcopy preempt channel before the end.
    PreemptClosed,
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
            ReceiveFailure::FaultOutsideRam(gpa) => {
                write!(f, "a postcopy fault at {gpa:#x}, outside guest RAM")
            }
            ReceiveFailure::StartGuest(e) => write!(f, "starting the loaded guest: {e}"),
            ReceiveFailure::PauseAfterFailure(e) => {
                write!(f, "pausing the guest after the failed postcopy: {e}")
            }
            ReceiveFailure::Channel(e) => e.fmt(f),
            ReceiveFailure::PreemptLost(e) => write!(f, "postcopy preempt channel lost: {e}"),
            ReceiveFailure::PreemptClosed => {
                write!(
                    f,
                    "the source closed the postcopy preempt channel before the end"
                )
            }
            ReceiveFailure::Failed(desc) if desc.is_empty() => write!(f, "the migration failed"),
            ReceiveFailure::Failed(desc) => fmt::Display::fmt(desc, f),
        }
    }
}

impl std::error::Error for ReceiveFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReceiveFailure::Engine { error, .. } | ReceiveFailure::PageFault(error) => Some(error),
            ReceiveFailure::Host { error, .. } | ReceiveFailure::StartGuest(error) => Some(error),
            ReceiveFailure::PauseAfterFailure(e) => Some(e.as_ref()),
            ReceiveFailure::Channel(e) => Some(e),
            ReceiveFailure::ConnectionLost(e)
            | ReceiveFailure::ReturnPathLost(e)
            | ReceiveFailure::PreemptLost(e) => Some(e),
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
            error: HostFailure::LoadVcpu(VcpuAccess::State {
                index: 0,
                error: StateError::Kvm {
                    op: "KVM_SET_REGS",
                    errno: 22,
                },
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
