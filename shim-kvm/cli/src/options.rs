//! `--cap NAME=on|off` and `--param NAME=VALUE` flags, in QEMU's names,
//! turned into a validated [`MigrationConfig`].
//!
//! The tool takes the same words as QEMU's `migrate-set-capabilities` and
//! `migrate-set-parameters`, so an operator's muscle memory and scripts carry
//! over. Parsing is all-or-nothing: the first bad flag is the error, and the
//! assembled configuration is validated as a whole (capability dependencies,
//! parameter ranges) before any migration starts.

use std::fmt;

use livemig_core::capabilities::Capabilities;
use livemig_core::config::{ConfigError, MigrationConfig};
use livemig_core::params::{ParameterError, ParameterUpdate};

/// A flag that could not be turned into configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionError {
    /// A flag is not `NAME=VALUE`.
    NotAnAssignment {
        /// `cap` or `param`.
        flag: &'static str,
        /// The text given.
        text: String,
    },
    /// No capability has this name.
    UnknownCapability(String),
    /// A capability value other than `on`/`off` (or `true`/`false`).
    BadSwitch {
        /// The capability.
        name: String,
        /// The value given.
        value: String,
    },
    /// The parameter is unknown or its value is refused.
    Parameter {
        /// The text of the flag.
        text: String,
        /// Why.
        err: ParameterError,
    },
    /// `receive --cap` names a capability the destination does not set:
    /// it takes those from the source's stream.
    NotForDestination(String),
    /// The whole configuration is inconsistent.
    Config(ConfigError),
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionError::NotAnAssignment { flag, text } => {
                write!(f, "--{flag} {text}: expected NAME=VALUE")
            }
            OptionError::UnknownCapability(name) => {
                let known: Vec<&str> = Capabilities::all().names().collect();
                write!(
                    f,
                    "unknown capability '{name}' (known: {})",
                    known.join(", ")
                )
            }
            OptionError::BadSwitch { name, value } => {
                write!(f, "--cap {name}={value}: the value must be on or off")
            }
            OptionError::Parameter { text, err } => write!(f, "--param {text}: {err}"),
            OptionError::NotForDestination(name) => {
                let own: Vec<&str> = DESTINATION_CAPABILITIES.names().collect();
                write!(
                    f,
                    "--cap {name}: not a destination capability; the receiver follows what the \
                     source's stream announces (give it to `livemig send`); `receive` takes \
                     only {}",
                    own.join(", ")
                )
            }
            OptionError::Config(e) => write!(f, "invalid migration configuration: {e}"),
        }
    }
}

impl std::error::Error for OptionError {}

fn split<'t>(flag: &'static str, text: &'t str) -> Result<(&'t str, &'t str), OptionError> {
    text.split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| OptionError::NotAnAssignment {
            flag,
            text: text.to_string(),
        })
}

/// Applies `caps` (`NAME=on|off`) and then `params` (`NAME=VALUE`) to
/// `base`, and validates the result. Later flags override earlier ones.
pub fn build_config(
    base: MigrationConfig,
    caps: &[String],
    params: &[String],
) -> Result<MigrationConfig, OptionError> {
    let mut config = base;
    for text in caps {
        let (name, value) = split("cap", text)?;
        let cap = Capabilities::from_name(name)
            .ok_or_else(|| OptionError::UnknownCapability(name.to_string()))?;
        match value {
            "on" | "true" => config.capabilities.insert(cap),
            "off" | "false" => config.capabilities.remove(cap),
            _ => {
                return Err(OptionError::BadSwitch {
                    name: name.to_string(),
                    value: value.to_string(),
                });
            }
        }
    }
    let mut update = ParameterUpdate::default();
    for text in params {
        let (name, value) = split("param", text)?;
        update
            .set(name, value)
            .map_err(|err| OptionError::Parameter {
                text: text.clone(),
                err,
            })?;
    }
    config
        .parameters
        .apply(&update)
        .map_err(|err| OptionError::Parameter {
            text: params.join(" "),
            err,
        })?;
    config.validate().map_err(OptionError::Config)
}

/// The capabilities a destination sets itself (`receive --cap`); every
/// other one is the source's to choose, and its stream tells the
/// destination.
pub const DESTINATION_CAPABILITIES: Capabilities = Capabilities::POSTCOPY_BLOCKTIME;

/// The destination capabilities `caps` (`NAME=on|off`) turn on. A
/// capability the source chooses is refused
/// ([`OptionError::NotForDestination`]) rather than accepted and ignored.
pub fn destination_capabilities(caps: &[String]) -> Result<Capabilities, OptionError> {
    let mut on = Capabilities::empty();
    for text in caps {
        let (name, value) = split("cap", text)?;
        let cap = Capabilities::from_name(name)
            .ok_or_else(|| OptionError::UnknownCapability(name.to_string()))?;
        if !DESTINATION_CAPABILITIES.contains(cap) {
            return Err(OptionError::NotForDestination(name.to_string()));
        }
        match value {
            "on" | "true" => on.insert(cap),
            "off" | "false" => on.remove(cap),
            _ => {
                return Err(OptionError::BadSwitch {
                    name: name.to_string(),
                    value: value.to_string(),
                });
            }
        }
    }
    Ok(on)
}

/// Whether `params` sets `name` (so a default chosen by the tool, like the
/// demo's unlimited bandwidth, yields to the operator's choice).
pub fn sets_param(params: &[String], name: &str) -> bool {
    params
        .iter()
        .any(|p| p.split_once('=').is_some_and(|(n, _)| n == name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn qemu_names_set_capabilities_and_parameters() {
        let c = build_config(
            MigrationConfig::default(),
            &s(&["return-path=on", "zero-page-detection=off"]),
            &s(&["downtime-limit=100", "max-bandwidth=1G"]),
        )
        .unwrap();
        assert!(c.capabilities.contains(Capabilities::RETURN_PATH));
        assert!(!c.capabilities.contains(Capabilities::ZERO_PAGE_DETECTION));
        assert_eq!(c.parameters.downtime_limit_ms, 100);
        assert_eq!(c.parameters.max_bandwidth, 1 << 30);
        assert!(sets_param(&s(&["max-bandwidth=0"]), "max-bandwidth"));
        assert!(!sets_param(&s(&["downtime-limit=1"]), "max-bandwidth"));
    }

    /// `receive --cap` takes the destination's own capabilities and
    /// refuses the source's, which its stream would override unseen.
    #[test]
    fn a_destination_takes_only_its_own_capabilities() {
        let on = destination_capabilities(&s(&["postcopy-blocktime=on"])).unwrap();
        assert_eq!(on, Capabilities::POSTCOPY_BLOCKTIME);
        let off =
            destination_capabilities(&s(&["postcopy-blocktime=on", "postcopy-blocktime=off"]));
        assert_eq!(off, Ok(Capabilities::empty()));
        for cap in ["multifd=on", "auto-converge=on", "return-path=off"] {
            let e = destination_capabilities(&s(&[cap])).unwrap_err();
            let name = cap.split('=').next().unwrap();
            assert_eq!(e, OptionError::NotForDestination(name.to_string()));
            let text = e.to_string();
            assert!(
                text.contains(name) && text.contains("livemig send"),
                "{text}"
            );
            assert!(text.ends_with("takes only postcopy-blocktime"), "{text}");
        }
        assert_eq!(
            destination_capabilities(&s(&["postcopy-blocktime=maybe"])),
            Err(OptionError::BadSwitch {
                name: "postcopy-blocktime".into(),
                value: "maybe".into()
            })
        );
        assert!(matches!(
            destination_capabilities(&s(&["nosuch=on"])),
            Err(OptionError::UnknownCapability(_))
        ));
    }

    #[test]
    fn bad_flags_are_named_in_the_error() {
        let base = MigrationConfig::default;
        let e = build_config(base(), &s(&["warp-drive=on"]), &[]).unwrap_err();
        assert!(e.to_string().contains("warp-drive"), "{e}");
        let e = build_config(base(), &s(&["return-path=maybe"]), &[]).unwrap_err();
        assert!(e.to_string().contains("on or off"), "{e}");
        let e = build_config(base(), &s(&["return-path"]), &[]).unwrap_err();
        assert!(e.to_string().contains("NAME=VALUE"), "{e}");
        let e = build_config(base(), &[], &s(&["downtime-limit=abc"])).unwrap_err();
        assert!(e.to_string().contains("downtime-limit=abc"), "{e}");
        let e = build_config(base(), &[], &s(&["no-such=1"])).unwrap_err();
        assert!(e.to_string().contains("no-such"), "{e}");
    }
}
