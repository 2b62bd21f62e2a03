//! Money as integers: USD budgets and costs are counted in units of 1/10000 USD. Small
//! enough that a cheap request costs a few units (rounded up, never free), large enough that
//! a budget fits Envoy's `requests_per_unit` (uint32): at most $429,496.7295 per period.

/// Units in one US dollar.
pub const UNITS_PER_USD: u64 = 10_000;
/// The largest budget Envoy can carry (`requests_per_unit` is a uint32), in units.
pub const MAX_BUDGET_UNITS: u64 = u32::MAX as u64;
/// Prices are per this many tokens.
pub const TOKENS_PER_PRICE: u64 = 1_000_000;

/// Why a price or an amount of dollars was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UsdError {
    #[error("price {0} is not between 0 and {MAX_PRICE_USD} USD per million tokens")]
    PriceOutOfRange(f64),
    #[error("price {0} has more than 4 decimal places (1/10000 USD per million tokens)")]
    PriceTooFine(f64),
    #[error("{0:?} is not an amount in dollars like 12.50")]
    NotDollars(String),
    #[error("{0:?} has more than 4 decimal places (the unit is 1/10000 USD)")]
    DollarsTooFine(String),
    #[error("{0:?} is above the largest budget, {max} USD", max = format_dollars(MAX_BUDGET_UNITS))]
    AboveLargestBudget(String),
}

/// A model's price in units (1/10000 USD) per million input and output tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Price {
    pub input: u64,
    pub output: u64,
}

impl Price {
    /// From USD per million tokens, as written in a configuration.
    pub fn from_usd_per_mtok(input: f64, output: f64) -> Result<Price, UsdError> {
        Ok(Price {
            input: price_units(input)?,
            output: price_units(output)?,
        })
    }

    /// The cost of `tokens_in` prompt and `tokens_out` completion tokens, rounded up to
    /// the next unit: any usage of a priced model costs at least one unit.
    pub fn cost(&self, tokens_in: u64, tokens_out: u64) -> u64 {
        let micro = u128::from(tokens_in) * u128::from(self.input)
            + u128::from(tokens_out) * u128::from(self.output);
        let units = micro.div_ceil(u128::from(TOKENS_PER_PRICE));
        u64::try_from(units).unwrap_or(u64::MAX)
    }
}

/// Highest accepted price: $1,000,000 per million tokens (a typo guard, not a policy).
const MAX_PRICE_USD: f64 = 1_000_000.0;

fn price_units(usd: f64) -> Result<u64, UsdError> {
    if !usd.is_finite() || !(0.0..=MAX_PRICE_USD).contains(&usd) {
        return Err(UsdError::PriceOutOfRange(usd));
    }
    let scaled = usd * UNITS_PER_USD as f64;
    let units = scaled.round();
    // Finer than 1/10000 USD per million tokens would be silently rounded: refuse it.
    if (scaled - units).abs() > 1e-6 * scaled.max(1.0) {
        return Err(UsdError::PriceTooFine(usd));
    }
    Ok(units as u64)
}

/// Parses decimal dollars (`12.50`, `0.0001`, `400`) into units; at most 4 decimals, at
/// most `MAX_BUDGET_UNITS`.
pub fn parse_dollars(s: &str) -> Result<u64, UsdError> {
    let t = s.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && frac.is_empty() || !digits(whole) || !digits(frac) {
        return Err(UsdError::NotDollars(s.to_string()));
    }
    if frac.len() > 4 {
        return Err(UsdError::DollarsTooFine(s.to_string()));
    }
    let too_large = || UsdError::AboveLargestBudget(s.to_string());
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let frac_units: u64 = format!("{frac:0<4}").parse().unwrap_or(0);
    let units = whole
        .checked_mul(UNITS_PER_USD)
        .and_then(|w| w.checked_add(frac_units))
        .filter(|u| *u <= MAX_BUDGET_UNITS)
        .ok_or_else(too_large)?;
    Ok(units)
}

/// Units as dollars with at least two decimals: `125000` → `12.50`, `1` → `0.0001`.
pub fn format_dollars(units: u64) -> String {
    let frac = format!("{:04}", units % UNITS_PER_USD);
    let frac = frac.trim_end_matches('0');
    format!("{}.{:0<2}", units / UNITS_PER_USD, frac)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_up_so_priced_usage_is_never_free() {
        // $0.15 / $0.60 per million tokens: 1 500 / 6 000 units per million.
        let p = Price::from_usd_per_mtok(0.15, 0.60).unwrap();
        assert_eq!(
            p,
            Price {
                input: 1500,
                output: 6000
            }
        );
        // 2 in + 10 out = 3 000 + 60 000 micro-units = 0.063 units → 1.
        assert_eq!(p.cost(2, 10), 1);
        assert_eq!(p.cost(1, 0), 1);
        assert_eq!(p.cost(0, 0), 0);
        // Exactly one million of each: $0.75.
        assert_eq!(p.cost(1_000_000, 1_000_000), 7_500);
        // 2 000 input tokens are exactly 3 units; one more rounds up.
        assert_eq!(p.cost(2_000, 0), 3);
        assert_eq!(p.cost(2_001, 0), 4);
        // A free model stays free.
        assert_eq!(Price::default().cost(1_000, 1_000), 0);
        // No overflow on absurd counts.
        let dear = Price::from_usd_per_mtok(1_000_000.0, 1_000_000.0).unwrap();
        assert_eq!(dear.cost(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn prices_are_refused_when_negative_absurd_or_too_precise() {
        assert_eq!(Price::from_usd_per_mtok(2.5, 10.0).unwrap().output, 100_000);
        assert_eq!(Price::from_usd_per_mtok(0.075, 0.0375).unwrap().output, 375);
        assert!(Price::from_usd_per_mtok(-1.0, 1.0).is_err());
        assert!(Price::from_usd_per_mtok(1.0, f64::NAN).is_err());
        assert!(Price::from_usd_per_mtok(2_000_000.0, 1.0).is_err());
        assert!(Price::from_usd_per_mtok(0.00001, 1.0).is_err());
    }

    #[test]
    fn dollars_parse_to_units_and_print_back() {
        assert_eq!(parse_dollars("12.50").unwrap(), 125_000);
        assert_eq!(parse_dollars("12.5").unwrap(), 125_000);
        assert_eq!(parse_dollars("400").unwrap(), 4_000_000);
        assert_eq!(parse_dollars(".0001").unwrap(), 1);
        assert_eq!(parse_dollars("0").unwrap(), 0);
        assert_eq!(parse_dollars("429496.7295").unwrap(), u64::from(u32::MAX));
        for bad in [
            "",
            ".",
            "-1",
            "1.00001",
            "1e3",
            "$5",
            "1,5",
            "429496.7296",
            "99999999999999999999",
        ] {
            assert!(parse_dollars(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(format_dollars(125_000), "12.50");
        assert_eq!(format_dollars(1), "0.0001");
        assert_eq!(format_dollars(4_000_000), "400.00");
        assert_eq!(format_dollars(u64::from(u32::MAX)), "429496.7295");
    }
}
