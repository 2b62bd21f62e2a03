//! A limit is `requests_per_unit` per `unit`, as in envoyproxy/ratelimit's configuration
//! and in Envoy's descriptor limit override.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    /// Envoy's `RateLimitUnit` numbering (UNKNOWN = 0 has no unit).
    pub fn from_envoy(value: i32) -> Option<Self> {
        Some(match value {
            1 => Unit::Second,
            2 => Unit::Minute,
            3 => Unit::Hour,
            4 => Unit::Day,
            5 => Unit::Month,
            6 => Unit::Year,
            7 => Unit::Week,
            _ => return None,
        })
    }

    pub fn to_envoy(self) -> i32 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 2,
            Unit::Hour => 3,
            Unit::Day => 4,
            Unit::Month => 5,
            Unit::Year => 6,
            Unit::Week => 7,
        }
    }

    /// The unit named as in envoyproxy/ratelimit's YAML (`second` … `year`, any case).
    pub fn from_name(name: &str) -> Option<Self> {
        const NAMES: [(&str, Unit); 7] = [
            ("second", Unit::Second),
            ("minute", Unit::Minute),
            ("hour", Unit::Hour),
            ("day", Unit::Day),
            ("week", Unit::Week),
            ("month", Unit::Month),
            ("year", Unit::Year),
        ];
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, u)| *u)
    }

    /// Lower-case name, as written in configuration and in counter keys.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// Months and years are fixed lengths (30 and 365 days): a rolling window, not a
    /// calendar one.
    pub fn period(self) -> Duration {
        const DAY: u64 = 86_400;
        Duration::from_secs(match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => DAY,
            Unit::Week => 7 * DAY,
            Unit::Month => 30 * DAY,
            Unit::Year => 365 * DAY,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    pub requests_per_unit: u32,
    pub unit: Unit,
}

impl Limit {
    /// Token limits over a day or longer are budgets; shorter ones are rates (TPM).
    pub fn is_budget(&self) -> bool {
        matches!(self.unit, Unit::Day | Unit::Week | Unit::Month | Unit::Year)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_units_round_trip() {
        for v in 1..=7 {
            assert_eq!(Unit::from_envoy(v).unwrap().to_envoy(), v);
        }
        assert_eq!(Unit::from_envoy(0), None);
        assert_eq!(Unit::Minute.period(), Duration::from_secs(60));
    }

    #[test]
    fn unit_names_are_case_insensitive_and_round_trip() {
        for v in 1..=7 {
            let u = Unit::from_envoy(v).unwrap();
            assert_eq!(Unit::from_name(u.name()), Some(u));
            assert_eq!(Unit::from_name(&u.name().to_uppercase()), Some(u));
        }
        assert_eq!(Unit::from_name("Minute"), Some(Unit::Minute));
        assert_eq!(Unit::from_name("fortnight"), None);
        assert_eq!(Unit::from_name(""), None);
    }
}
