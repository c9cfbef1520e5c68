//! What a migration is asked to do: capabilities, parameters and limits,
//! validated together once, before an engine exists.

use crate::capabilities::{self, Capabilities, CapabilityError};
use crate::params::{ParameterError, Parameters};

/// Bounds on how long precopy may try to converge. QEMU has none and will
/// iterate forever on a guest that dirties memory faster than the link; an
/// operator usually prefers a clear "did not converge" and a guest that keeps
/// running on the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Give up after this many dirty-memory passes without converging.
    pub max_iterations: Option<u64>,
    /// Give up after this many milliseconds without converging.
    pub max_time_ms: Option<u64>,
    /// Give up after this many passes in a row that did not shrink what a
    /// stop would still have to send (by at least a sixteenth of the best so
    /// far): a guest that dirties memory as fast as the link carries it, or
    /// a downtime limit below the fixed cost of stopping, never converges,
    /// however long precopy goes on. A pass that raised the auto-converge
    /// throttle counts as progress.
    pub max_stalled_iterations: Option<u64>,
    /// With a return path, how long the source waits after the end of the
    /// stream for the destination's SHUT before declaring the migration
    /// failed (a destination that stops answering must not leave the source
    /// waiting forever with its guest stopped).
    pub confirm_timeout_ms: u64,
    /// With postcopy-ram, switch to postcopy by itself once this many
    /// precopy passes have not converged (`None`: only when asked).
    pub postcopy_after_iterations: Option<u64>,
}

/// Default for [`Limits::confirm_timeout_ms`]: generous enough for a
/// destination that still has to flush gigabytes it received, short enough
/// that an operator is not left wondering.
pub const DEFAULT_CONFIRM_TIMEOUT_MS: u64 = 30_000;

/// Default for [`Limits::max_stalled_iterations`]: enough passes for a
/// noisy dirty rate to show a trend, few enough that a hopeless migration
/// is given up on in seconds rather than never.
pub const DEFAULT_MAX_STALLED_ITERATIONS: u64 = 10;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_iterations: None,
            max_time_ms: None,
            max_stalled_iterations: Some(DEFAULT_MAX_STALLED_ITERATIONS),
            confirm_timeout_ms: DEFAULT_CONFIRM_TIMEOUT_MS,
            postcopy_after_iterations: None,
        }
    }
}

/// How precopy picks the moment to stop the guest, among the moments at
/// which the stop is expected to fit `downtime-limit` (neither rule ever
/// stops the guest for longer; see `source::shortest_stop`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SwitchoverPolicy {
    /// Keep iterating while passes shrink the expected stop, and switch at
    /// the shortest stop the dirty rate allows: the limit is a ceiling,
    /// not a target.
    #[default]
    ShortestStop,
    /// QEMU's rule: switch as soon as the expected stop fits the limit,
    /// which on a fast link means a large final copy.
    FitsLimit,
}

impl SwitchoverPolicy {
    /// Every policy, default first.
    pub const ALL: [SwitchoverPolicy; 2] = [Self::ShortestStop, Self::FitsLimit];

    /// The policy's name on a command line: `shortest-stop`, `fits-limit`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::ShortestStop => "shortest-stop",
            Self::FitsLimit => "fits-limit",
        }
    }

    /// The policy called `name`, or `None` if unknown.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl core::fmt::Display for SwitchoverPolicy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Capabilities, parameters and limits of one migration.
#[derive(Clone, Debug, PartialEq)]
pub struct MigrationConfig {
    /// Enabled capabilities, as requested; [`MigrationConfig::validate`]
    /// returns the effective set (some capabilities imply others).
    pub capabilities: Capabilities,
    /// Tunables with QEMU's defaults.
    pub parameters: Parameters,
    /// Convergence bounds.
    pub limits: Limits,
    /// When, among the stops that fit the downtime limit, to stop.
    pub switchover: SwitchoverPolicy,
    /// Under [`SwitchoverPolicy::ShortestStop`]: whether the policy may
    /// throttle the guest when passes stop shrinking a stop that is still
    /// longer than [`SWITCH_AT_ONCE`](crate::source::shortest_stop::SWITCH_AT_ONCE),
    /// or when a pass does not fit the limit and the guest outran the link
    /// (see [`shortest_stop`](crate::source::shortest_stop)). On by
    /// default; the caller must be able to carry out
    /// [`SetThrottle`](crate::source::SourceAction::SetThrottle), and one
    /// that cannot turns this off (its migrations stop as before, at the
    /// shortest stop the guest's own dirty rate allows).
    pub stop_throttle: bool,
}

impl Default for MigrationConfig {
    /// Zero-page detection on (an idle guest is mostly zero pages), every
    /// other capability off, QEMU's default parameters, no iteration or
    /// time limit, the no-progress rule on, and the shortest stop, with
    /// its throttle.
    fn default() -> Self {
        MigrationConfig {
            capabilities: Capabilities::ZERO_PAGE_DETECTION,
            parameters: Parameters::default(),
            limits: Limits::default(),
            switchover: SwitchoverPolicy::default(),
            stop_throttle: true,
        }
    }
}

/// Why a configuration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The capability set is inconsistent.
    Capabilities(CapabilityError),
    /// A parameter is out of range.
    Parameter(ParameterError),
    /// A capability no engine implements yet (one of
    /// [`Capabilities::NOT_IMPLEMENTED`]; the first, in declaration order).
    NotImplemented(Capabilities),
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ConfigError::Capabilities(e) => e.fmt(f),
            ConfigError::Parameter(e) => e.fmt(f),
            ConfigError::NotImplemented(cap) => write!(
                f,
                "capability '{}' is not implemented yet: turn it off",
                cap.name().unwrap_or("unknown")
            ),
        }
    }
}

impl core::error::Error for ConfigError {}

impl MigrationConfig {
    /// Checks the capabilities and parameters together and returns the
    /// configuration with the effective capability set.
    pub fn validate(&self) -> Result<MigrationConfig, ConfigError> {
        let capabilities =
            capabilities::check(self.capabilities).map_err(ConfigError::Capabilities)?;
        let unimplemented = capabilities & Capabilities::NOT_IMPLEMENTED;
        if let Some(cap) = bitflags::Flags::iter(&unimplemented).next() {
            return Err(ConfigError::NotImplemented(cap));
        }
        self.parameters.validate().map_err(ConfigError::Parameter)?;
        Ok(MigrationConfig {
            capabilities,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn unimplemented_capabilities_are_refused_by_name() {
        for (cap, name) in [
            (Capabilities::XBZRLE, "xbzrle"),
            (Capabilities::RELEASE_RAM, "release-ram"),
            (Capabilities::EVENTS, "events"),
            (Capabilities::VALIDATE_UUID, "validate-uuid"),
        ] {
            let mut config = MigrationConfig::default();
            config.capabilities |= cap | Capabilities::POSTCOPY_RAM;
            if cap == Capabilities::RELEASE_RAM {
                config.capabilities.remove(Capabilities::POSTCOPY_RAM);
            }
            let err = config.validate().unwrap_err();
            assert_eq!(err, ConfigError::NotImplemented(cap));
            assert_eq!(
                err.to_string(),
                std::format!("capability '{name}' is not implemented yet: turn it off")
            );
        }
    }

    #[test]
    fn switchover_policies_round_trip_their_names() {
        for policy in SwitchoverPolicy::ALL {
            assert_eq!(SwitchoverPolicy::from_name(policy.name()), Some(policy));
            assert_eq!(policy.to_string(), policy.name());
        }
        assert_eq!(
            SwitchoverPolicy::from_name("fits-limit"),
            Some(SwitchoverPolicy::FitsLimit)
        );
        assert_eq!(SwitchoverPolicy::from_name("shortest"), None);
        assert_eq!(
            MigrationConfig::default().switchover,
            SwitchoverPolicy::ShortestStop
        );
    }

    #[test]
    fn implemented_capabilities_validate() {
        let mut config = MigrationConfig::default();
        config.capabilities |= Capabilities::POSTCOPY_RAM
            | Capabilities::POSTCOPY_BLOCKTIME
            | Capabilities::AUTO_CONVERGE
            | Capabilities::SWITCHOVER_ACK
            | Capabilities::PAUSE_BEFORE_SWITCHOVER;
        let effective = config.validate().unwrap().capabilities;
        assert!(effective.contains(Capabilities::RETURN_PATH));
    }
}
