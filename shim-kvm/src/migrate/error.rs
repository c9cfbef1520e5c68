//! Why a migration could not be set up, carried on or watched (as opposed
//! to a migration that ran and failed, which is a reported status).

use std::fmt;
use std::io;

use livemig_core::bitmap::BitmapError;
use livemig_core::config::ConfigError;
use livemig_core::destination::DestError;
use livemig_core::digest::BooksSizeMismatch;
use livemig_core::return_path::InvalidPageSize;
use livemig_core::source::{SourceError, TrackingError};
use livemig_core::wire::EncodeError;

use super::vcpu_access::VcpuAccess;
use crate::dirty_log::DirtyLogError;
use crate::memory::MemoryError;
use crate::transport::TransportError;
use crate::vmm::VmmError;

/// Why a migration could not be set up or carried on. A migration that ran
/// and failed is not an error: its report says how it ended.
#[derive(Debug)]
pub enum MigrateError {
    /// The connection could not be made, tuned or duplicated.
    Transport(TransportError),
    /// The migration configuration is invalid.
    Config(ConfigError),
    /// The source engine refused its set-up or was driven wrongly.
    Source(SourceError),
    /// The source's dirty-page tracking could not be set up.
    Tracking(TrackingError),
    /// The destination engine refused its set-up.
    Destination(DestError),
    /// The destination's postcopy books could not be set up.
    PostcopyTracking(BitmapError),
    /// The self-check's digest books could not be set up.
    DigestBooks(BooksSizeMismatch),
    /// The return-path decoder refused the page size.
    ReturnPath(InvalidPageSize),
    /// The RAM layout could not be described.
    Layout(EncodeError),
    /// Reading or writing one of the VMM's vCPUs failed.
    Vcpu(VcpuAccess),
    /// The VMM failed to pause or resume its vCPUs.
    Vmm(VmmError),
    /// `/dev/kvm` could not be opened (to probe what a vCPU can save).
    OpenKvm(kvm_ioctls::Error),
    /// More vCPUs than the CPU model record can count.
    TooManyVcpus(usize),
    /// `auto-converge` was asked for, and the VMM's vCPUs cannot be
    /// throttled ([`crate::vmm::Vcpus::can_throttle`]).
    ThrottleUnsupported,
    /// Guest memory could not be read (a digest).
    Memory(MemoryError),
    /// Dirty logging could not be turned on or off on the VMM's memslots.
    DirtyLog(DirtyLogError),
    /// A VMM device uses an id livemig writes itself
    /// ([`super::sections`]).
    ReservedSection(String),
    /// Two VMM devices share an id and instance.
    DuplicateSection {
        /// The id.
        id: String,
        /// The instance.
        instance: u32,
    },
    /// The number of multifd channel connections given is not the
    /// `multifd-channels` parameter (0 without the `multifd` capability).
    ChannelCount {
        /// Channels the configuration asks for.
        expected: usize,
        /// Connections given.
        given: usize,
    },
    /// A thread of the migration (its own, the return-path reader, a
    /// channel's sender) could not be started.
    Spawn {
        /// Which thread.
        thread: &'static str,
        /// Why the OS refused it.
        error: io::Error,
    },
    /// The migration thread panicked (a bug in livemig).
    Panicked,
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::Transport(e) => e.fmt(f),
            MigrateError::Config(e) => write!(f, "migration configuration: {e}"),
            MigrateError::Source(e) => write!(f, "migration engine: {e}"),
            MigrateError::Tracking(e) => write!(f, "dirty-page tracking: {e}"),
            MigrateError::Destination(e) => write!(f, "migration engine: {e}"),
            MigrateError::PostcopyTracking(e) => write!(f, "postcopy tracking: {e}"),
            MigrateError::DigestBooks(e) => write!(f, "verification: {e}"),
            MigrateError::ReturnPath(e) => write!(f, "return path: {e}"),
            MigrateError::Layout(e) => write!(f, "RAM layout: {e}"),
            MigrateError::Vcpu(e) => e.fmt(f),
            MigrateError::Vmm(e) => write!(f, "the VMM's vCPUs: {e}"),
            MigrateError::OpenKvm(e) => write!(f, "opening /dev/kvm: {e}"),
            MigrateError::TooManyVcpus(n) => write!(f, "{n} vCPUs are more than livemig can count"),
            MigrateError::ThrottleUnsupported => {
                f.write_str("auto-converge refused: this VMM cannot throttle its vCPUs")
            }
            MigrateError::Memory(e) => write!(f, "digest: {e}"),
            MigrateError::DirtyLog(e) => write!(f, "dirty logging on the VMM's memslots: {e}"),
            MigrateError::ReservedSection(id) => write!(
                f,
                "device section id '{id}' is livemig's own: give the device another id"
            ),
            MigrateError::DuplicateSection { id, instance } => write!(
                f,
                "two devices are registered as section '{id}' instance {instance}"
            ),
            MigrateError::ChannelCount { expected, given } => write!(
                f,
                "{given} multifd channel connections given, the configuration asks for {expected}"
            ),
            MigrateError::Spawn { thread, error } => {
                write!(f, "starting the {thread} thread: {error}")
            }
            MigrateError::Panicked => write!(f, "the migration thread panicked"),
        }
    }
}

impl std::error::Error for MigrateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MigrateError::Transport(e) => Some(e),
            MigrateError::Config(e) => Some(e),
            MigrateError::Source(e) => Some(e),
            MigrateError::Tracking(e) => Some(e),
            MigrateError::Destination(e) => Some(e),
            MigrateError::PostcopyTracking(e) => Some(e),
            MigrateError::DigestBooks(e) => Some(e),
            MigrateError::ReturnPath(e) => Some(e),
            MigrateError::Layout(e) => Some(e),
            MigrateError::Vcpu(e) => Some(e),
            MigrateError::Vmm(e) => Some(e.as_ref()),
            MigrateError::OpenKvm(e) => Some(e),
            MigrateError::Memory(e) => Some(e),
            MigrateError::DirtyLog(e) => Some(e),
            MigrateError::Spawn { error, .. } => Some(error),
            MigrateError::TooManyVcpus(_)
            | MigrateError::ThrottleUnsupported
            | MigrateError::ReservedSection(_)
            | MigrateError::DuplicateSection { .. }
            | MigrateError::ChannelCount { .. }
            | MigrateError::Panicked => None,
        }
    }
}

impl From<TransportError> for MigrateError {
    fn from(e: TransportError) -> Self {
        MigrateError::Transport(e)
    }
}
