//! Migration capabilities: the on/off features a migration is started with,
//! and the rules about which of them can be combined.
//!
//! Capabilities are chosen before a migration starts (QEMU refuses to change
//! them while `migration_is_setup_or_active()`), and some pairs cannot work
//! together. [`check`] is the one place those rules live, so the CLI, the
//! engines and the tests all agree on what a valid set is. It plays the role
//! of QEMU's `migrate_caps_check()`.
//!
//! Names are QEMU's hyphenated QAPI names (`postcopy-ram`, `switchover-ack`),
//! so a capability list reads the same as in `migrate-set-capabilities`.

use core::fmt;
use core::ops::{BitAnd, BitOr, BitOrAssign, Sub};

use bitflags::Flags;

/// A set of migration capabilities.
///
/// Build one from flags (`Capabilities::POSTCOPY_RAM | Capabilities::MULTIFD`)
/// or from QEMU names with [`Capabilities::from_name`]; validate it with
/// [`check`] before use.
///
/// The type implements [`bitflags::Flags`] by hand rather than through the
/// `bitflags!` macro so that the flag names the `bitflags` machinery reports
/// (`iter_names`, `Flags::from_name`) are QEMU's hyphenated names, not Rust
/// identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capabilities(u16);

impl Capabilities {
    /// Send changed pages as deltas against a cache of previously sent
    /// copies (XOR + run-length), saving bandwidth on sparse writes.
    pub const XBZRLE: Self = Self(1 << 0);
    /// Throttle the guest's vCPUs when precopy does not converge.
    pub const AUTO_CONVERGE: Self = Self(1 << 1);
    /// Allow switching to postcopy, where the destination runs the guest
    /// and fetches missing pages on demand.
    pub const POSTCOPY_RAM: Self = Self(1 << 2);
    /// Serve postcopy page requests on a separate channel so they are not
    /// queued behind background pages.
    pub const POSTCOPY_PREEMPT: Self = Self(1 << 3);
    /// Measure how long destination vCPUs block on postcopy page faults.
    pub const POSTCOPY_BLOCKTIME: Self = Self(1 << 4);
    /// Open a destination-to-source channel for acknowledgements and page
    /// requests even in precopy.
    pub const RETURN_PATH: Self = Self(1 << 5);
    /// Send RAM over several parallel channels.
    pub const MULTIFD: Self = Self(1 << 6);
    /// Stop before switchover and wait for the user to continue (time to
    /// e.g. hand over shared storage).
    pub const PAUSE_BEFORE_SWITCHOVER: Self = Self(1 << 7);
    /// Wait for the destination to acknowledge it is ready before switching
    /// over (needs the return path).
    pub const SWITCHOVER_ACK: Self = Self(1 << 8);
    /// Discard source RAM once it has been sent in postcopy (for same-host
    /// migrations that must not double memory use).
    pub const RELEASE_RAM: Self = Self(1 << 9);
    /// Detect all-zero pages and send them as zero records instead of page
    /// contents. (In QEMU this is the `zero-page-detection` parameter; here
    /// it is a plain on/off feature.)
    pub const ZERO_PAGE_DETECTION: Self = Self(1 << 10);
    /// Report every state change as an event.
    pub const EVENTS: Self = Self(1 << 11);
    /// Check that the destination was started for the same VM (UUID in the
    /// stream header).
    pub const VALIDATE_UUID: Self = Self(1 << 12);
}

impl Capabilities {
    /// The capabilities that neither engine acts on yet. A configuration
    /// that asks for one is refused ([`crate::config::MigrationConfig::validate`])
    /// rather than accepted and silently ignored; each leaves this set when
    /// the work that implements it lands.
    pub const NOT_IMPLEMENTED: Self =
        Self(Self::XBZRLE.0 | Self::RELEASE_RAM.0 | Self::EVENTS.0 | Self::VALIDATE_UUID.0);
}

/// Every capability with its QEMU name, in declaration order: the single
/// source for names, parsing and iteration.
const FLAGS: [bitflags::Flag<Capabilities>; 13] = [
    bitflags::Flag::new("xbzrle", Capabilities::XBZRLE),
    bitflags::Flag::new("auto-converge", Capabilities::AUTO_CONVERGE),
    bitflags::Flag::new("postcopy-ram", Capabilities::POSTCOPY_RAM),
    bitflags::Flag::new("postcopy-preempt", Capabilities::POSTCOPY_PREEMPT),
    bitflags::Flag::new("postcopy-blocktime", Capabilities::POSTCOPY_BLOCKTIME),
    bitflags::Flag::new("return-path", Capabilities::RETURN_PATH),
    bitflags::Flag::new("multifd", Capabilities::MULTIFD),
    bitflags::Flag::new(
        "pause-before-switchover",
        Capabilities::PAUSE_BEFORE_SWITCHOVER,
    ),
    bitflags::Flag::new("switchover-ack", Capabilities::SWITCHOVER_ACK),
    bitflags::Flag::new("release-ram", Capabilities::RELEASE_RAM),
    bitflags::Flag::new("zero-page-detection", Capabilities::ZERO_PAGE_DETECTION),
    bitflags::Flag::new("events", Capabilities::EVENTS),
    bitflags::Flag::new("validate-uuid", Capabilities::VALIDATE_UUID),
];

/// Union of every known flag.
const ALL_BITS: u16 = (1 << FLAGS.len()) - 1;

impl Flags for Capabilities {
    const FLAGS: &'static [bitflags::Flag<Self>] = &FLAGS;
    type Bits = u16;

    fn bits(&self) -> u16 {
        self.0
    }

    fn from_bits_retain(bits: u16) -> Self {
        Self(bits)
    }
}

impl Capabilities {
    /// No capabilities.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Every known capability (not a valid set for [`check`], but handy for
    /// listings and masks).
    pub const fn all() -> Self {
        Self(ALL_BITS)
    }

    /// The raw bit pattern.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// The set with exactly `bits`, dropping bits that name no capability
    /// (e.g. from a newer peer).
    pub const fn from_bits_truncate(bits: u16) -> Self {
        Self(bits & ALL_BITS)
    }

    /// The set with exactly `bits`, unknown bits included.
    pub const fn from_bits_retain(bits: u16) -> Self {
        Self(bits)
    }

    /// Whether no capability is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every capability in `other` is also in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` and `other` share any capability.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// Add the capabilities in `other`.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// Remove the capabilities in `other`.
    pub fn remove(&mut self, other: Self) {
        self.0 &= !other.0;
    }

    /// The single capability QEMU calls `name`, or `None` if the name is
    /// unknown. Matched exactly (QEMU names are lower-case).
    pub fn from_name(name: &str) -> Option<Capabilities> {
        <Self as Flags>::from_name(name)
    }

    /// QEMU's name for `self` if it is exactly one known capability; `None`
    /// for the empty set, several flags, or unknown bits.
    pub fn name(self) -> Option<&'static str> {
        FLAGS.iter().find(|f| *f.value() == self).map(|f| f.name())
    }

    /// The QEMU names of the known capabilities in `self`, in a fixed order,
    /// for display and `query-migrate-capabilities`-style listings.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        FLAGS
            .iter()
            .filter(move |f| self.contains(*f.value()))
            .map(|f| f.name())
    }
}

impl BitOr for Capabilities {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitOrAssign for Capabilities {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for Capabilities {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

impl Sub for Capabilities {
    type Output = Self;
    /// The capabilities in `self` but not in `rhs`.
    fn sub(self, rhs: Self) -> Self {
        Self(self.0 & !rhs.0)
    }
}

impl fmt::Display for Capabilities {
    /// Comma-separated QEMU names, or `none` for the empty set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = self.names();
        match names.next() {
            Some(first) => f.write_str(first)?,
            None => return f.write_str("none"),
        }
        for n in names {
            write!(f, ",{n}")?;
        }
        Ok(())
    }
}

/// A capability set that cannot work; each variant names the capabilities
/// involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapabilityError {
    /// `capability` was enabled without `required`, which it depends on.
    Requires {
        /// The capability that was enabled.
        capability: Capabilities,
        /// The capability it cannot work without.
        required: Capabilities,
    },
    /// `xbzrle` together with `multifd`: multifd channels send whole pages
    /// and bypass the xbzrle cache, so QEMU rejects the pair
    /// ("xbzrle is not compatible with multifd").
    XbzrleWithMultifd,
    /// `postcopy-ram` together with `release-ram`: release-ram frees source
    /// pages as soon as they are queued for sending, so if the postcopy
    /// channel breaks, pages in flight are gone from both hosts and the
    /// migration cannot be recovered (QEMU refuses such a resume in
    /// `migrate_prepare`). livemig refuses the combination up front rather
    /// than discover it only after a network failure.
    ReleaseRamPreventsRecovery,
}

impl fmt::Display for CapabilityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Requires {
                capability,
                required,
            } => write!(
                f,
                "capability '{capability}' requires capability '{required}' to be enabled"
            ),
            Self::XbzrleWithMultifd => f.write_str(
                "capabilities 'xbzrle' and 'multifd' cannot be combined: \
                 multifd channels do not use the xbzrle page cache",
            ),
            Self::ReleaseRamPreventsRecovery => f.write_str(
                "capabilities 'postcopy-ram' and 'release-ram' cannot be combined: \
                 pages released after sending would be lost if postcopy had to recover",
            ),
        }
    }
}

impl core::error::Error for CapabilityError {}

/// Dependencies: `(capability, required)`. Checked against the effective set,
/// i.e. after implied capabilities are added.
const REQUIRES: [(Capabilities, Capabilities); 3] = [
    // QEMU: "Postcopy preempt requires postcopy-ram".
    (Capabilities::POSTCOPY_PREEMPT, Capabilities::POSTCOPY_RAM),
    // Blocktime is measured on postcopy page faults; without postcopy there
    // is nothing to measure.
    (Capabilities::POSTCOPY_BLOCKTIME, Capabilities::POSTCOPY_RAM),
    // QEMU: "Capability 'switchover-ack' requires capability 'return-path'".
    (Capabilities::SWITCHOVER_ACK, Capabilities::RETURN_PATH),
];

/// Validate a requested capability set and return the set that will
/// actually be in effect.
///
/// `postcopy-ram` implies `return-path` (the destination's page requests
/// travel on it; QEMU opens it whenever either is set), so it is added. The
/// rules are then checked on the effective set, so `switchover-ack` is
/// accepted with `postcopy-ram` alone (QEMU asks for `return-path` to be
/// named explicitly; the channel exists either way). Unknown bits are
/// dropped. The first broken rule is reported, in a fixed order.
pub fn check(caps: Capabilities) -> Result<Capabilities, CapabilityError> {
    let mut effective = Capabilities::from_bits_truncate(caps.bits());
    if effective.contains(Capabilities::POSTCOPY_RAM) {
        effective |= Capabilities::RETURN_PATH;
    }
    for (capability, required) in REQUIRES {
        if effective.contains(capability) && !effective.contains(required) {
            return Err(CapabilityError::Requires {
                capability,
                required,
            });
        }
    }
    if effective.contains(Capabilities::XBZRLE | Capabilities::MULTIFD) {
        return Err(CapabilityError::XbzrleWithMultifd);
    }
    if effective.contains(Capabilities::POSTCOPY_RAM | Capabilities::RELEASE_RAM) {
        return Err(CapabilityError::ReleaseRamPreventsRecovery);
    }
    Ok(effective)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;
    use std::vec::Vec;

    #[test]
    fn names_round_trip() {
        assert_eq!(FLAGS.len(), 13);
        for f in FLAGS {
            let (cap, name) = (*f.value(), f.name());
            assert_eq!(cap.bits().count_ones(), 1);
            assert_eq!(Capabilities::from_name(name), Some(cap));
            assert_eq!(cap.name(), Some(name));
            assert!(!name.contains('_') && name == name.to_ascii_lowercase());
        }
        assert_eq!(Capabilities::from_name("postcopy_ram"), None);
        assert_eq!(Capabilities::from_name("Multifd"), None);
        assert_eq!(Capabilities::empty().name(), None);
        assert_eq!((Capabilities::XBZRLE | Capabilities::EVENTS).name(), None);
        assert_eq!(Capabilities::from_bits_retain(1 << 15).name(), None);
        assert_eq!(Capabilities::from_name(""), None);
        // The bitflags machinery sees the same names.
        let caps = Capabilities::SWITCHOVER_ACK | Capabilities::XBZRLE;
        let via_trait: Vec<_> = caps.iter_names().map(|(n, _)| n).collect();
        assert_eq!(via_trait, ["xbzrle", "switchover-ack"]);
    }

    #[test]
    fn set_operations() {
        let mut caps = Capabilities::empty();
        assert!(caps.is_empty());
        caps.insert(Capabilities::MULTIFD | Capabilities::EVENTS);
        assert!(caps.contains(Capabilities::MULTIFD) && caps.intersects(Capabilities::EVENTS));
        caps.remove(Capabilities::EVENTS);
        assert_eq!(caps, Capabilities::MULTIFD);
        assert_eq!(
            (caps | Capabilities::XBZRLE) & Capabilities::XBZRLE,
            Capabilities::XBZRLE
        );
        assert_eq!(
            (caps | Capabilities::XBZRLE) - Capabilities::MULTIFD,
            Capabilities::XBZRLE
        );
        assert_eq!(
            Capabilities::from_bits_truncate(u16::MAX),
            Capabilities::all()
        );
        assert_eq!(Capabilities::all().bits(), 0x1fff);
    }

    #[test]
    fn names_and_display_list_members() {
        let caps = Capabilities::MULTIFD | Capabilities::POSTCOPY_RAM | Capabilities::EVENTS;
        assert_eq!(
            caps.names().collect::<Vec<_>>(),
            ["postcopy-ram", "multifd", "events"]
        );
        assert_eq!(caps.to_string(), "postcopy-ram,multifd,events");
        assert_eq!(Capabilities::empty().to_string(), "none");
        assert_eq!(Capabilities::all().names().count(), 13);
    }

    #[test]
    fn empty_and_independent_sets_pass_unchanged() {
        assert_eq!(check(Capabilities::empty()), Ok(Capabilities::empty()));
        let caps = Capabilities::XBZRLE
            | Capabilities::AUTO_CONVERGE
            | Capabilities::PAUSE_BEFORE_SWITCHOVER
            | Capabilities::ZERO_PAGE_DETECTION
            | Capabilities::EVENTS
            | Capabilities::VALIDATE_UUID;
        assert_eq!(check(caps), Ok(caps));
    }

    #[test]
    fn postcopy_ram_adds_return_path() {
        assert_eq!(
            check(Capabilities::POSTCOPY_RAM),
            Ok(Capabilities::POSTCOPY_RAM | Capabilities::RETURN_PATH)
        );
    }

    #[test]
    fn postcopy_preempt_requires_postcopy_ram() {
        let err = check(Capabilities::POSTCOPY_PREEMPT).unwrap_err();
        assert_eq!(
            err,
            CapabilityError::Requires {
                capability: Capabilities::POSTCOPY_PREEMPT,
                required: Capabilities::POSTCOPY_RAM
            }
        );
        assert_eq!(
            err.to_string(),
            "capability 'postcopy-preempt' requires capability 'postcopy-ram' to be enabled"
        );
        assert!(check(Capabilities::POSTCOPY_PREEMPT | Capabilities::POSTCOPY_RAM).is_ok());
    }

    #[test]
    fn postcopy_blocktime_requires_postcopy_ram() {
        assert_eq!(
            check(Capabilities::POSTCOPY_BLOCKTIME),
            Err(CapabilityError::Requires {
                capability: Capabilities::POSTCOPY_BLOCKTIME,
                required: Capabilities::POSTCOPY_RAM
            })
        );
        assert!(check(Capabilities::POSTCOPY_BLOCKTIME | Capabilities::POSTCOPY_RAM).is_ok());
    }

    #[test]
    fn switchover_ack_requires_return_path() {
        assert_eq!(
            check(Capabilities::SWITCHOVER_ACK).unwrap_err().to_string(),
            "capability 'switchover-ack' requires capability 'return-path' to be enabled"
        );
        assert!(check(Capabilities::SWITCHOVER_ACK | Capabilities::RETURN_PATH).is_ok());
        // The return path postcopy-ram implies satisfies it too.
        assert_eq!(
            check(Capabilities::SWITCHOVER_ACK | Capabilities::POSTCOPY_RAM),
            Ok(Capabilities::SWITCHOVER_ACK
                | Capabilities::POSTCOPY_RAM
                | Capabilities::RETURN_PATH)
        );
    }

    #[test]
    fn xbzrle_with_multifd_rejected() {
        let err = check(Capabilities::XBZRLE | Capabilities::MULTIFD).unwrap_err();
        assert_eq!(err, CapabilityError::XbzrleWithMultifd);
        let msg = err.to_string();
        assert!(
            msg.contains("'xbzrle'") && msg.contains("'multifd'"),
            "{msg}"
        );
        assert!(check(Capabilities::MULTIFD | Capabilities::RETURN_PATH).is_ok());
        assert!(check(Capabilities::MULTIFD | Capabilities::POSTCOPY_RAM).is_ok());
    }

    #[test]
    fn postcopy_with_release_ram_rejected() {
        let err = check(Capabilities::POSTCOPY_RAM | Capabilities::RELEASE_RAM).unwrap_err();
        assert_eq!(err, CapabilityError::ReleaseRamPreventsRecovery);
        let msg = err.to_string();
        assert!(
            msg.contains("'postcopy-ram'") && msg.contains("'release-ram'"),
            "{msg}"
        );
        assert!(msg.contains("recover"), "{msg}");
        assert!(check(Capabilities::RELEASE_RAM).is_ok());
    }

    #[test]
    fn unknown_bits_are_dropped() {
        let caps = Capabilities::from_bits_retain(Capabilities::EVENTS.bits() | 1 << 15);
        assert_eq!(check(caps), Ok(Capabilities::EVENTS));
    }

    proptest! {
        #[test]
        fn effective_set_satisfies_every_rule(bits in any::<u16>()) {
            if let Ok(eff) = check(Capabilities::from_bits_retain(bits)) {
                let requested = Capabilities::from_bits_truncate(bits);
                prop_assert!(eff.contains(requested));
                prop_assert_eq!(check(eff), Ok(eff));
                for (c, r) in REQUIRES {
                    prop_assert!(!eff.contains(c) || eff.contains(r));
                }
                prop_assert!(!eff.contains(Capabilities::POSTCOPY_RAM) || eff.contains(Capabilities::RETURN_PATH));
            }
        }
    }
}
