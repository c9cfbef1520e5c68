//! Migration parameters: the tunable numbers (downtime limit, bandwidth caps,
//! throttling, channel count…) with QEMU's defaults and allowed ranges.
//!
//! Parameters can be changed while a migration runs (e.g. raising the
//! bandwidth cap of a migration that does not converge), so an update must
//! never leave them half-applied. [`Parameters::apply`] follows QEMU's
//! `qmp_migrate_set_parameters`: merge the partial update into a copy
//! (`migrate_params_test_apply`), validate the whole result
//! (`migrate_params_check`), and only then commit it. On error nothing
//! changes.
//!
//! This module holds data and validation only; turning a bandwidth into a
//! per-slice rate limit is the engines' business.

use core::fmt;

/// Default maximum downtime, in milliseconds (QEMU `DEFAULT_MIGRATE_SET_DOWNTIME`).
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// Largest accepted downtime limit: 2000 seconds (QEMU `MAX_MIGRATE_DOWNTIME`).
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;
/// Default precopy bandwidth cap, 128 MiB/s (QEMU `MAX_THROTTLE` since 5.x;
/// seed 004, QEMU 3.x, still had 32 MiB/s).
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;
/// Default number of multifd channels (QEMU `DEFAULT_MIGRATE_MULTIFD_CHANNELS`).
pub const DEFAULT_MULTIFD_CHANNELS: u8 = 2;
/// Default xbzrle cache size, 64 MiB (QEMU `DEFAULT_MIGRATE_XBZRLE_CACHE_SIZE`).
pub const DEFAULT_XBZRLE_CACHE_SIZE: u64 = 64 << 20;
/// Smallest xbzrle cache: one 4 KiB target page (QEMU checks
/// `>= qemu_target_page_size()`).
pub const MIN_XBZRLE_CACHE_SIZE: u64 = 4096;
/// Default first auto-converge throttle step, percent of vCPU time.
pub const DEFAULT_CPU_THROTTLE_INITIAL: u8 = 20;
/// Default throttle increase per non-converging pass, percent.
pub const DEFAULT_CPU_THROTTLE_INCREMENT: u8 = 10;
/// Highest throttle percentage ever accepted (QEMU `DEFAULT_MIGRATE_MAX_CPU_THROTTLE`,
/// also the upper bound of all three throttle parameters).
pub const MAX_CPU_THROTTLE: u8 = 99;
/// Smallest dirty-log clear chunk, as log2 pages: 64 pages, so chunk bitmaps
/// stay `u64`-aligned (QEMU `CLEAR_BITMAP_SHIFT_MIN`).
pub const CLEAR_BITMAP_SHIFT_MIN: u8 = 6;
/// Default clear chunk: 2^18 pages = 1 GiB of 4 KiB pages (QEMU `CLEAR_BITMAP_SHIFT_DEFAULT`).
pub const CLEAR_BITMAP_SHIFT_DEFAULT: u8 = 18;
/// Largest clear chunk: 2^31 pages = 8 TiB of 4 KiB pages (QEMU `CLEAR_BITMAP_SHIFT_MAX`).
pub const CLEAR_BITMAP_SHIFT_MAX: u8 = 31;

/// The migration parameters in force. Construct with [`Default`] and change
/// with [`Parameters::apply`], which keeps them valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parameters {
    /// Longest the guest may be stopped for the final copy, in ms
    /// (`downtime-limit`, 0..=2 000 000).
    pub downtime_limit_ms: u64,
    /// Precopy bandwidth cap in bytes/s (`max-bandwidth`). As in QEMU 8.1+,
    /// where a zero rate limit disables limiting, 0 means unlimited.
    pub max_bandwidth: u64,
    /// Postcopy bandwidth cap in bytes/s (`max-postcopy-bandwidth`); 0 means
    /// unlimited, the default, because postcopy page faults stall the guest.
    pub max_postcopy_bandwidth: u64,
    /// Bandwidth the switchover may assume is available, bytes/s
    /// (`avail-switchover-bandwidth`); 0, the default, means use the
    /// measured bandwidth.
    pub avail_switchover_bandwidth: u64,
    /// Number of multifd channels (`multifd-channels`, 1..=255).
    pub multifd_channels: u8,
    /// xbzrle cache size in bytes (`xbzrle-cache-size`): a power of two of at
    /// least one page.
    pub xbzrle_cache_size: u64,
    /// First auto-converge throttle, percent (`cpu-throttle-initial`, 1..=99).
    pub cpu_throttle_initial: u8,
    /// Throttle increase per pass, percent (`cpu-throttle-increment`, 1..=99).
    pub cpu_throttle_increment: u8,
    /// Throttle ceiling, percent (`max-cpu-throttle`,
    /// `cpu_throttle_initial..=99`).
    pub max_cpu_throttle: u8,
    /// log2 of the pages cleared per dirty-log clear call
    /// (`clear-bitmap-shift`, 6..=31).
    pub clear_bitmap_shift: u8,
}

impl Default for Parameters {
    /// QEMU's defaults.
    fn default() -> Self {
        Self {
            downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
            max_postcopy_bandwidth: 0,
            avail_switchover_bandwidth: 0,
            multifd_channels: DEFAULT_MULTIFD_CHANNELS,
            xbzrle_cache_size: DEFAULT_XBZRLE_CACHE_SIZE,
            cpu_throttle_initial: DEFAULT_CPU_THROTTLE_INITIAL,
            cpu_throttle_increment: DEFAULT_CPU_THROTTLE_INCREMENT,
            max_cpu_throttle: MAX_CPU_THROTTLE,
            clear_bitmap_shift: CLEAR_BITMAP_SHIFT_DEFAULT,
        }
    }
}

/// Names one parameter, for updates by name and for error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parameter {
    /// `downtime-limit`.
    DowntimeLimit,
    /// `max-bandwidth`.
    MaxBandwidth,
    /// `max-postcopy-bandwidth`.
    MaxPostcopyBandwidth,
    /// `avail-switchover-bandwidth`.
    AvailSwitchoverBandwidth,
    /// `multifd-channels`.
    MultifdChannels,
    /// `xbzrle-cache-size`.
    XbzrleCacheSize,
    /// `cpu-throttle-initial`.
    CpuThrottleInitial,
    /// `cpu-throttle-increment`.
    CpuThrottleIncrement,
    /// `max-cpu-throttle`.
    MaxCpuThrottle,
    /// `clear-bitmap-shift`.
    ClearBitmapShift,
}

impl Parameter {
    /// Every parameter, in the order validation checks them.
    pub const ALL: [Parameter; 10] = [
        Self::DowntimeLimit,
        Self::MaxBandwidth,
        Self::MaxPostcopyBandwidth,
        Self::AvailSwitchoverBandwidth,
        Self::MultifdChannels,
        Self::XbzrleCacheSize,
        Self::CpuThrottleInitial,
        Self::CpuThrottleIncrement,
        Self::MaxCpuThrottle,
        Self::ClearBitmapShift,
    ];

    /// QEMU's hyphenated name, as in `migrate-set-parameters`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::DowntimeLimit => "downtime-limit",
            Self::MaxBandwidth => "max-bandwidth",
            Self::MaxPostcopyBandwidth => "max-postcopy-bandwidth",
            Self::AvailSwitchoverBandwidth => "avail-switchover-bandwidth",
            Self::MultifdChannels => "multifd-channels",
            Self::XbzrleCacheSize => "xbzrle-cache-size",
            Self::CpuThrottleInitial => "cpu-throttle-initial",
            Self::CpuThrottleIncrement => "cpu-throttle-increment",
            Self::MaxCpuThrottle => "max-cpu-throttle",
            Self::ClearBitmapShift => "clear-bitmap-shift",
        }
    }

    /// The parameter QEMU calls `name`, or `None` if unknown.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether values are byte counts, which may carry a `k`/`M`/`G`/`T`
    /// suffix (powers of 1024) when parsed from text.
    pub const fn is_size(self) -> bool {
        matches!(
            self,
            Self::MaxBandwidth
                | Self::MaxPostcopyBandwidth
                | Self::AvailSwitchoverBandwidth
                | Self::XbzrleCacheSize
        )
    }

    /// The range a value must lie in regardless of other parameters
    /// (`max-cpu-throttle` must additionally be at least
    /// `cpu-throttle-initial`).
    pub const fn range(self) -> (u64, u64) {
        match self {
            Self::DowntimeLimit => (0, MAX_DOWNTIME_LIMIT_MS),
            Self::MaxBandwidth | Self::MaxPostcopyBandwidth | Self::AvailSwitchoverBandwidth => {
                (0, u64::MAX)
            }
            Self::MultifdChannels => (1, u8::MAX as u64),
            Self::XbzrleCacheSize => (MIN_XBZRLE_CACHE_SIZE, u64::MAX),
            Self::CpuThrottleInitial | Self::CpuThrottleIncrement | Self::MaxCpuThrottle => {
                (1, MAX_CPU_THROTTLE as u64)
            }
            Self::ClearBitmapShift => {
                (CLEAR_BITMAP_SHIFT_MIN as u64, CLEAR_BITMAP_SHIFT_MAX as u64)
            }
        }
    }

    /// Check `value` against this parameter's own rule (range, and power of
    /// two for the xbzrle cache).
    const fn check(self, value: u64) -> Result<(), ParameterError> {
        let (min, max) = self.range();
        if value < min || value > max {
            return Err(ParameterError::OutOfRange {
                parameter: self,
                value,
                min,
                max,
            });
        }
        if matches!(self, Self::XbzrleCacheSize) && !value.is_power_of_two() {
            return Err(ParameterError::NotPowerOfTwo {
                parameter: self,
                value,
            });
        }
        Ok(())
    }
}

impl fmt::Display for Parameter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What was wrong with the text of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueSyntaxError {
    /// No digits at all.
    Empty,
    /// A character that is not a decimal digit (or an allowed suffix).
    InvalidDigit,
    /// A size suffix on a parameter that is not a byte count.
    SuffixNotAllowed,
    /// The value does not fit in 64 bits.
    Overflow,
}

impl fmt::Display for ValueSyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "no value given",
            Self::InvalidDigit => "not a decimal integer",
            Self::SuffixNotAllowed => "size suffixes are only accepted for byte counts",
            Self::Overflow => "too large for 64 bits",
        })
    }
}

/// Why a parameter update was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParameterError {
    /// No parameter has the given name.
    UnknownName,
    /// The value text could not be read as a number.
    Unparsable {
        /// The parameter being set.
        parameter: Parameter,
        /// What was wrong with the text.
        reason: ValueSyntaxError,
    },
    /// The value lies outside `min..=max`. For `max-cpu-throttle`, `min` is
    /// the `cpu-throttle-initial` it was checked against.
    OutOfRange {
        /// The parameter being set.
        parameter: Parameter,
        /// The rejected value.
        value: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// The value must be a power of two (the xbzrle cache is indexed by a
    /// mask of the page number).
    NotPowerOfTwo {
        /// The parameter being set.
        parameter: Parameter,
        /// The rejected value.
        value: u64,
    },
}

impl fmt::Display for ParameterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::UnknownName => f.write_str("unknown migration parameter name"),
            Self::Unparsable { parameter, reason } => {
                write!(f, "parameter '{parameter}' has an invalid value: {reason}")
            }
            Self::OutOfRange {
                parameter,
                value,
                min,
                max: u64::MAX,
            } => write!(
                f,
                "parameter '{parameter}' must be at least {min} (got {value})"
            ),
            Self::OutOfRange {
                parameter,
                value,
                min,
                max,
            } => write!(
                f,
                "parameter '{parameter}' must be between {min} and {max} (got {value})"
            ),
            Self::NotPowerOfTwo { parameter, value } => {
                write!(
                    f,
                    "parameter '{parameter}' must be a power of two (got {value})"
                )
            }
        }
    }
}

impl core::error::Error for ParameterError {}

/// A partial update: `Some` fields are changed, `None` fields are kept, like
/// QMP's `migrate-set-parameters`. Fill it field by field or by name with
/// [`ParameterUpdate::set`], then hand it to [`Parameters::apply`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParameterUpdate {
    /// New `downtime-limit`, ms.
    pub downtime_limit_ms: Option<u64>,
    /// New `max-bandwidth`, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// New `max-postcopy-bandwidth`, bytes/s.
    pub max_postcopy_bandwidth: Option<u64>,
    /// New `avail-switchover-bandwidth`, bytes/s.
    pub avail_switchover_bandwidth: Option<u64>,
    /// New `multifd-channels`.
    pub multifd_channels: Option<u8>,
    /// New `xbzrle-cache-size`, bytes.
    pub xbzrle_cache_size: Option<u64>,
    /// New `cpu-throttle-initial`, percent.
    pub cpu_throttle_initial: Option<u8>,
    /// New `cpu-throttle-increment`, percent.
    pub cpu_throttle_increment: Option<u8>,
    /// New `max-cpu-throttle`, percent.
    pub max_cpu_throttle: Option<u8>,
    /// New `clear-bitmap-shift`.
    pub clear_bitmap_shift: Option<u8>,
}

/// Narrow a value already checked against a `u8` parameter's range.
fn narrow(parameter: Parameter, value: u64) -> Result<u8, ParameterError> {
    let (min, max) = parameter.range();
    u8::try_from(value).map_err(|_| ParameterError::OutOfRange {
        parameter,
        value,
        min,
        max,
    })
}

impl ParameterUpdate {
    /// Set `parameter` to `value` in this update, after checking the
    /// parameter's own range (cross-parameter rules are checked by
    /// [`Parameters::apply`], which sees the merged result).
    pub fn set_value(&mut self, parameter: Parameter, value: u64) -> Result<(), ParameterError> {
        parameter.check(value)?;
        match parameter {
            Parameter::DowntimeLimit => self.downtime_limit_ms = Some(value),
            Parameter::MaxBandwidth => self.max_bandwidth = Some(value),
            Parameter::MaxPostcopyBandwidth => self.max_postcopy_bandwidth = Some(value),
            Parameter::AvailSwitchoverBandwidth => self.avail_switchover_bandwidth = Some(value),
            Parameter::MultifdChannels => self.multifd_channels = Some(narrow(parameter, value)?),
            Parameter::XbzrleCacheSize => self.xbzrle_cache_size = Some(value),
            Parameter::CpuThrottleInitial => {
                self.cpu_throttle_initial = Some(narrow(parameter, value)?)
            }
            Parameter::CpuThrottleIncrement => {
                self.cpu_throttle_increment = Some(narrow(parameter, value)?)
            }
            Parameter::MaxCpuThrottle => self.max_cpu_throttle = Some(narrow(parameter, value)?),
            Parameter::ClearBitmapShift => {
                self.clear_bitmap_shift = Some(narrow(parameter, value)?)
            }
        }
        Ok(())
    }

    /// Set the parameter QEMU calls `name` from its text form: a decimal
    /// integer, and for byte counts optionally one suffix `b`, `k`, `M`, `G`
    /// or `T` (case-insensitive, powers of 1024). This is what a
    /// `--param name=value` flag calls.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ParameterError> {
        let parameter = Parameter::from_name(name).ok_or(ParameterError::UnknownName)?;
        let number = parse_value(parameter, value)
            .map_err(|reason| ParameterError::Unparsable { parameter, reason })?;
        self.set_value(parameter, number)
    }

    /// Copy every `Some` field into `params` (QEMU's `migrate_params_test_apply`).
    fn merge_into(&self, params: &mut Parameters) {
        fn take<T: Copy>(dst: &mut T, src: Option<T>) {
            if let Some(v) = src {
                *dst = v;
            }
        }
        take(&mut params.downtime_limit_ms, self.downtime_limit_ms);
        take(&mut params.max_bandwidth, self.max_bandwidth);
        take(
            &mut params.max_postcopy_bandwidth,
            self.max_postcopy_bandwidth,
        );
        take(
            &mut params.avail_switchover_bandwidth,
            self.avail_switchover_bandwidth,
        );
        take(&mut params.multifd_channels, self.multifd_channels);
        take(&mut params.xbzrle_cache_size, self.xbzrle_cache_size);
        take(&mut params.cpu_throttle_initial, self.cpu_throttle_initial);
        take(
            &mut params.cpu_throttle_increment,
            self.cpu_throttle_increment,
        );
        take(&mut params.max_cpu_throttle, self.max_cpu_throttle);
        take(&mut params.clear_bitmap_shift, self.clear_bitmap_shift);
    }
}

/// Read `text` as a value for `parameter` (see [`ParameterUpdate::set`]).
fn parse_value(parameter: Parameter, text: &str) -> Result<u64, ValueSyntaxError> {
    let (digits, multiplier) = match text.as_bytes().last() {
        None => return Err(ValueSyntaxError::Empty),
        Some(last) if last.is_ascii_digit() => (text, 1u64),
        Some(last) => {
            let shift = match last.to_ascii_lowercase() {
                b'b' => 0,
                b'k' => 10,
                b'm' => 20,
                b'g' => 30,
                b't' => 40,
                _ => return Err(ValueSyntaxError::InvalidDigit),
            };
            if !parameter.is_size() {
                return Err(ValueSyntaxError::SuffixNotAllowed);
            }
            // The suffix is one ASCII byte, so this slice ends on a char boundary.
            (text.get(..text.len() - 1).unwrap_or(""), 1u64 << shift)
        }
    };
    if digits.is_empty() {
        return Err(ValueSyntaxError::Empty);
    }
    let mut value: u64 = 0;
    for b in digits.bytes() {
        if !b.is_ascii_digit() {
            return Err(ValueSyntaxError::InvalidDigit);
        }
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or(ValueSyntaxError::Overflow)?;
    }
    value
        .checked_mul(multiplier)
        .ok_or(ValueSyntaxError::Overflow)
}

impl Parameters {
    /// The value of `parameter`, widened to `u64` (for display and for
    /// code that handles parameters generically).
    pub const fn value(&self, parameter: Parameter) -> u64 {
        match parameter {
            Parameter::DowntimeLimit => self.downtime_limit_ms,
            Parameter::MaxBandwidth => self.max_bandwidth,
            Parameter::MaxPostcopyBandwidth => self.max_postcopy_bandwidth,
            Parameter::AvailSwitchoverBandwidth => self.avail_switchover_bandwidth,
            Parameter::MultifdChannels => self.multifd_channels as u64,
            Parameter::XbzrleCacheSize => self.xbzrle_cache_size,
            Parameter::CpuThrottleInitial => self.cpu_throttle_initial as u64,
            Parameter::CpuThrottleIncrement => self.cpu_throttle_increment as u64,
            Parameter::MaxCpuThrottle => self.max_cpu_throttle as u64,
            Parameter::ClearBitmapShift => self.clear_bitmap_shift as u64,
        }
    }

    /// Check every rule (QEMU's `migrate_params_check`): each parameter's
    /// range, the xbzrle power of two, and `max-cpu-throttle >=
    /// cpu-throttle-initial`. The first broken rule is reported, in
    /// [`Parameter::ALL`] order.
    pub const fn validate(&self) -> Result<(), ParameterError> {
        let mut i = 0;
        while i < Parameter::ALL.len() {
            let parameter = Parameter::ALL[i];
            if let Err(e) = parameter.check(self.value(parameter)) {
                return Err(e);
            }
            i += 1;
        }
        if self.max_cpu_throttle < self.cpu_throttle_initial {
            return Err(ParameterError::OutOfRange {
                parameter: Parameter::MaxCpuThrottle,
                value: self.max_cpu_throttle as u64,
                min: self.cpu_throttle_initial as u64,
                max: MAX_CPU_THROTTLE as u64,
            });
        }
        Ok(())
    }

    /// Apply a partial update all-or-nothing: merge it into a copy, validate
    /// the copy, and commit only if it is valid. On error `self` is unchanged.
    pub fn apply(&mut self, update: &ParameterUpdate) -> Result<(), ParameterError> {
        let mut merged = *self;
        update.merge_into(&mut merged);
        merged.validate()?;
        *self = merged;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;

    #[test]
    fn defaults_match_qemu() {
        let p = Parameters::default();
        assert_eq!(p.downtime_limit_ms, 300);
        assert_eq!(p.max_bandwidth, 134_217_728);
        assert_eq!(p.max_postcopy_bandwidth, 0);
        assert_eq!(p.avail_switchover_bandwidth, 0);
        assert_eq!(p.multifd_channels, 2);
        assert_eq!(p.xbzrle_cache_size, 64 * 1024 * 1024);
        assert_eq!(p.cpu_throttle_initial, 20);
        assert_eq!(p.cpu_throttle_increment, 10);
        assert_eq!(p.max_cpu_throttle, 99);
        assert_eq!(p.clear_bitmap_shift, 18);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn names_round_trip() {
        for p in Parameter::ALL {
            assert_eq!(Parameter::from_name(p.name()), Some(p));
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!(Parameter::from_name("downtime_limit"), None);
        assert_eq!(Parameter::from_name("x-clear-bitmap-shift"), None);
    }

    /// `(parameter, lowest valid, highest valid)` for every range bound.
    const BOUNDS: [(Parameter, u64, u64); 10] = [
        (Parameter::DowntimeLimit, 0, 2_000_000),
        (Parameter::MaxBandwidth, 0, u64::MAX),
        (Parameter::MaxPostcopyBandwidth, 0, u64::MAX),
        (Parameter::AvailSwitchoverBandwidth, 0, u64::MAX),
        (Parameter::MultifdChannels, 1, 255),
        (Parameter::XbzrleCacheSize, 4096, 1 << 63),
        (Parameter::CpuThrottleInitial, 1, 99),
        (Parameter::CpuThrottleIncrement, 1, 99),
        (Parameter::MaxCpuThrottle, 1, 99),
        (Parameter::ClearBitmapShift, 6, 31),
    ];

    /// Parameters where every throttle bound is reachable: initial at its
    /// minimum so `max-cpu-throttle` can go down to 1.
    fn low_initial() -> Parameters {
        Parameters {
            cpu_throttle_initial: 1,
            ..Parameters::default()
        }
    }

    #[test]
    fn every_bound_just_inside_is_accepted() {
        for (parameter, lo, hi) in BOUNDS {
            for v in [lo, hi] {
                let mut params = low_initial();
                let mut update = ParameterUpdate::default();
                update.set_value(parameter, v).unwrap();
                params.apply(&update).unwrap();
                assert_eq!(params.value(parameter), v, "{parameter}");
            }
        }
    }

    #[test]
    fn every_bound_just_outside_is_rejected() {
        for (parameter, lo, hi) in BOUNDS {
            let (min, max) = parameter.range();
            let outside = [lo.checked_sub(1), hi.checked_add(1)];
            for v in outside.into_iter().flatten() {
                let mut update = ParameterUpdate::default();
                let err = update.set_value(parameter, v).unwrap_err();
                assert!(
                    err == ParameterError::OutOfRange {
                        parameter,
                        value: v,
                        min,
                        max
                    } || err
                        == ParameterError::NotPowerOfTwo {
                            parameter,
                            value: v
                        },
                    "{parameter} {v}: {err:?}"
                );
                assert_eq!(update, ParameterUpdate::default());
            }
        }
    }

    #[test]
    fn out_of_range_fields_set_directly_are_caught_by_apply() {
        let cases = [
            ParameterUpdate {
                downtime_limit_ms: Some(2_000_001),
                ..Default::default()
            },
            ParameterUpdate {
                multifd_channels: Some(0),
                ..Default::default()
            },
            ParameterUpdate {
                xbzrle_cache_size: Some(2048),
                ..Default::default()
            },
            ParameterUpdate {
                xbzrle_cache_size: Some(3 << 20),
                ..Default::default()
            },
            ParameterUpdate {
                cpu_throttle_initial: Some(0),
                ..Default::default()
            },
            ParameterUpdate {
                cpu_throttle_initial: Some(100),
                ..Default::default()
            },
            ParameterUpdate {
                cpu_throttle_increment: Some(0),
                ..Default::default()
            },
            ParameterUpdate {
                cpu_throttle_increment: Some(100),
                ..Default::default()
            },
            ParameterUpdate {
                max_cpu_throttle: Some(100),
                ..Default::default()
            },
            ParameterUpdate {
                clear_bitmap_shift: Some(5),
                ..Default::default()
            },
            ParameterUpdate {
                clear_bitmap_shift: Some(32),
                ..Default::default()
            },
        ];
        for update in cases {
            let mut params = Parameters::default();
            assert!(params.apply(&update).is_err(), "{update:?}");
            assert_eq!(params, Parameters::default());
        }
    }

    #[test]
    fn xbzrle_cache_must_be_power_of_two() {
        let mut update = ParameterUpdate::default();
        let err = update
            .set_value(Parameter::XbzrleCacheSize, 5000)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "parameter 'xbzrle-cache-size' must be a power of two (got 5000)"
        );
        let err = update
            .set_value(Parameter::XbzrleCacheSize, 2048)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "parameter 'xbzrle-cache-size' must be at least 4096 (got 2048)"
        );
    }

    #[test]
    fn max_cpu_throttle_below_initial_rejected() {
        let mut params = Parameters::default();
        let mut update = ParameterUpdate::default();
        update.set("max-cpu-throttle", "10").unwrap();
        let err = params.apply(&update).unwrap_err();
        assert_eq!(
            err,
            ParameterError::OutOfRange {
                parameter: Parameter::MaxCpuThrottle,
                value: 10,
                min: 20,
                max: 99
            }
        );
        assert_eq!(
            err.to_string(),
            "parameter 'max-cpu-throttle' must be between 20 and 99 (got 10)"
        );
        assert_eq!(params, Parameters::default());
        // Equal to initial is fine; lowering initial in the same update is too.
        update.set("cpu-throttle-initial", "10").unwrap();
        params.apply(&update).unwrap();
        assert_eq!(
            (params.cpu_throttle_initial, params.max_cpu_throttle),
            (10, 10)
        );
        // Raising initial above the current maximum is rejected the same way.
        let mut raise = ParameterUpdate::default();
        raise.set("cpu-throttle-initial", "50").unwrap();
        assert!(matches!(
            params.apply(&raise),
            Err(ParameterError::OutOfRange {
                parameter: Parameter::MaxCpuThrottle,
                value: 10,
                min: 50,
                ..
            })
        ));
    }

    #[test]
    fn one_bad_field_changes_nothing() {
        let mut params = Parameters::default();
        let update = ParameterUpdate {
            downtime_limit_ms: Some(50),
            clear_bitmap_shift: Some(40),
            ..Default::default()
        };
        let err = params.apply(&update).unwrap_err();
        assert_eq!(
            err.to_string(),
            "parameter 'clear-bitmap-shift' must be between 6 and 31 (got 40)"
        );
        assert_eq!(params, Parameters::default());
    }

    #[test]
    fn set_by_name_parses_integers_and_size_suffixes() {
        let mut update = ParameterUpdate::default();
        update.set("downtime-limit", "500").unwrap();
        update.set("max-bandwidth", "1G").unwrap();
        update.set("max-postcopy-bandwidth", "512m").unwrap();
        update.set("avail-switchover-bandwidth", "3k").unwrap();
        update.set("xbzrle-cache-size", "128M").unwrap();
        update.set("multifd-channels", "8").unwrap();
        update.set("clear-bitmap-shift", "20").unwrap();
        let mut params = Parameters::default();
        params.apply(&update).unwrap();
        assert_eq!(params.downtime_limit_ms, 500);
        assert_eq!(params.max_bandwidth, 1 << 30);
        assert_eq!(params.max_postcopy_bandwidth, 512 << 20);
        assert_eq!(params.avail_switchover_bandwidth, 3 << 10);
        assert_eq!(params.xbzrle_cache_size, 128 << 20);
        assert_eq!(params.multifd_channels, 8);
        assert_eq!(params.clear_bitmap_shift, 20);
        update.set("max-bandwidth", "2T").unwrap();
        assert_eq!(update.max_bandwidth, Some(2 << 40));
        update.set("max-bandwidth", "7b").unwrap();
        assert_eq!(update.max_bandwidth, Some(7));
    }

    #[test]
    fn set_by_name_reports_bad_text() {
        let mut update = ParameterUpdate::default();
        assert_eq!(
            update.set("no-such-thing", "1"),
            Err(ParameterError::UnknownName)
        );
        let unparsable = |parameter, reason| ParameterError::Unparsable { parameter, reason };
        let cases = [
            (
                "downtime-limit",
                "",
                Parameter::DowntimeLimit,
                ValueSyntaxError::Empty,
            ),
            (
                "max-bandwidth",
                "G",
                Parameter::MaxBandwidth,
                ValueSyntaxError::Empty,
            ),
            (
                "downtime-limit",
                "-1",
                Parameter::DowntimeLimit,
                ValueSyntaxError::InvalidDigit,
            ),
            (
                "downtime-limit",
                "1.5",
                Parameter::DowntimeLimit,
                ValueSyntaxError::InvalidDigit,
            ),
            (
                "downtime-limit",
                " 5",
                Parameter::DowntimeLimit,
                ValueSyntaxError::InvalidDigit,
            ),
            (
                "max-bandwidth",
                "5X",
                Parameter::MaxBandwidth,
                ValueSyntaxError::InvalidDigit,
            ),
            (
                "max-bandwidth",
                "1kk",
                Parameter::MaxBandwidth,
                ValueSyntaxError::InvalidDigit,
            ),
            (
                "multifd-channels",
                "4k",
                Parameter::MultifdChannels,
                ValueSyntaxError::SuffixNotAllowed,
            ),
            (
                "max-bandwidth",
                "18446744073709551616",
                Parameter::MaxBandwidth,
                ValueSyntaxError::Overflow,
            ),
            (
                "max-bandwidth",
                "16777216T",
                Parameter::MaxBandwidth,
                ValueSyntaxError::Overflow,
            ),
            (
                "downtime-limit",
                "5é",
                Parameter::DowntimeLimit,
                ValueSyntaxError::InvalidDigit,
            ),
        ];
        for (name, text, parameter, reason) in cases {
            assert_eq!(
                update.set(name, text),
                Err(unparsable(parameter, reason)),
                "{name}={text}"
            );
        }
        assert_eq!(update, ParameterUpdate::default());
        assert_eq!(
            update
                .set("multifd-channels", "4k")
                .unwrap_err()
                .to_string(),
            "parameter 'multifd-channels' has an invalid value: size suffixes are only accepted for byte counts"
        );
        assert_eq!(
            update
                .set("multifd-channels", "256")
                .unwrap_err()
                .to_string(),
            "parameter 'multifd-channels' must be between 1 and 255 (got 256)"
        );
    }

    fn any_u64() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..40,
            4090u64..4100,
            1_999_990u64..2_000_010,
            Just(64 << 20),
            any::<u64>()
        ]
    }

    fn any_u8() -> impl Strategy<Value = u8> {
        prop_oneof![0u8..35, 95u8..=100, any::<u8>()]
    }

    prop_compose! {
        fn any_update()(
            a in proptest::option::of(any_u64()),
            b in proptest::option::of(any_u64()),
            c in proptest::option::of(any_u64()),
            d in proptest::option::of(any_u64()),
            e in proptest::option::of(any_u8()),
            f in proptest::option::of(any_u64()),
            g in proptest::option::of(any_u8()),
            h in proptest::option::of(any_u8()),
            i in proptest::option::of(any_u8()),
            j in proptest::option::of(any_u8()),
        ) -> ParameterUpdate {
            ParameterUpdate {
                downtime_limit_ms: a,
                max_bandwidth: b,
                max_postcopy_bandwidth: c,
                avail_switchover_bandwidth: d,
                multifd_channels: e,
                xbzrle_cache_size: f,
                cpu_throttle_initial: g,
                cpu_throttle_increment: h,
                max_cpu_throttle: i,
                clear_bitmap_shift: j,
            }
        }
    }

    /// What `update` asks for `p`, widened like [`Parameters::value`].
    fn requested(update: &ParameterUpdate, p: Parameter) -> Option<u64> {
        match p {
            Parameter::DowntimeLimit => update.downtime_limit_ms,
            Parameter::MaxBandwidth => update.max_bandwidth,
            Parameter::MaxPostcopyBandwidth => update.max_postcopy_bandwidth,
            Parameter::AvailSwitchoverBandwidth => update.avail_switchover_bandwidth,
            Parameter::MultifdChannels => update.multifd_channels.map(u64::from),
            Parameter::XbzrleCacheSize => update.xbzrle_cache_size,
            Parameter::CpuThrottleInitial => update.cpu_throttle_initial.map(u64::from),
            Parameter::CpuThrottleIncrement => update.cpu_throttle_increment.map(u64::from),
            Parameter::MaxCpuThrottle => update.max_cpu_throttle.map(u64::from),
            Parameter::ClearBitmapShift => update.clear_bitmap_shift.map(u64::from),
        }
    }

    proptest! {
        #[test]
        fn apply_is_all_or_nothing(first in any_update(), second in any_update()) {
            let mut params = Parameters::default();
            // Start from a possibly non-default valid state.
            let _ = params.apply(&first);
            prop_assert_eq!(params.validate(), Ok(()));
            let before = params;
            match params.apply(&second) {
                Ok(()) => {
                    prop_assert_eq!(params.validate(), Ok(()));
                    for p in Parameter::ALL {
                        let expected = requested(&second, p).unwrap_or(before.value(p));
                        prop_assert_eq!(params.value(p), expected, "{}", p);
                    }
                }
                Err(_) => prop_assert_eq!(params, before),
            }
        }
    }
}
