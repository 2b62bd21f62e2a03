//! Owns the per-model price map of the plugin configuration (`prices`): which price a model
//! is charged at, in `tollgate_core::usd` units per million input and output tokens.
//!
//! ```json
//! {"prices": {"models": [{"match": "gpt-4o-mini", "input_usd_per_mtok": 0.15,
//!                         "output_usd_per_mtok": 0.60},
//!                        {"match": "llama3*", "input_usd_per_mtok": 0, "output_usd_per_mtok": 0}],
//!             "default": {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 3.0}}}
//! ```
//! The first matching entry wins. A model no entry matches is charged at `default`; without
//! one it has no price, and a caller with a USD budget is refused (`model_not_priced`):
//! the cost of that request could not be counted, so admitting it would spend the budget
//! unseen.

use serde::Deserialize;
use tollgate_core::model_pattern::{ModelPattern, PatternError};
use tollgate_core::usd::{Price, UsdError};

/// Why a `prices` configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PriceConfigError {
    #[error("give models, a default, or both")]
    Empty,
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error("model pattern {0:?} is priced twice")]
    PricedTwice(String),
    #[error("{pattern:?}: {source}")]
    Price { pattern: String, source: UsdError },
    #[error("default: {0}")]
    Default(UsdError),
}

/// One price in the configuration's JSON: USD per million tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    input_usd_per_mtok: f64,
    output_usd_per_mtok: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelPrice {
    #[serde(rename = "match")]
    pattern: String,
    input_usd_per_mtok: f64,
    output_usd_per_mtok: f64,
}

/// `prices` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrices {
    #[serde(default)]
    models: Vec<RawModelPrice>,
    default: Option<RawPrice>,
}

/// The validated price map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceMap {
    models: Vec<(ModelPattern, Price)>,
    default: Option<Price>,
}

impl RawPrice {
    fn price(&self) -> Result<Price, UsdError> {
        Price::from_usd_per_mtok(self.input_usd_per_mtok, self.output_usd_per_mtok)
    }
}

impl RawModelPrice {
    fn price(&self) -> Result<Price, UsdError> {
        Price::from_usd_per_mtok(self.input_usd_per_mtok, self.output_usd_per_mtok)
    }
}

impl PriceMap {
    pub fn from_raw(raw: RawPrices) -> Result<PriceMap, PriceConfigError> {
        if raw.models.is_empty() && raw.default.is_none() {
            return Err(PriceConfigError::Empty);
        }
        let mut models = Vec::with_capacity(raw.models.len());
        for m in &raw.models {
            let pattern = ModelPattern::parse(&m.pattern)?;
            if models.iter().any(|(p, _)| *p == pattern) {
                return Err(PriceConfigError::PricedTwice(m.pattern.clone()));
            }
            let price = m.price().map_err(|source| PriceConfigError::Price {
                pattern: m.pattern.clone(),
                source,
            })?;
            models.push((pattern, price));
        }
        let default = match &raw.default {
            Some(d) => Some(d.price().map_err(PriceConfigError::Default)?),
            None => None,
        };
        Ok(PriceMap { models, default })
    }

    /// The price `model` is charged at: the first matching entry, else the default.
    pub fn price_for(&self, model: &str) -> Option<Price> {
        self.models
            .iter()
            .find(|(p, _)| p.matches(model))
            .map(|(_, price)| *price)
            .or(self.default)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn map(json: &str) -> Result<PriceMap, String> {
        PriceMap::from_raw(serde_json::from_str(json).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn first_matching_entry_wins_then_the_default() {
        let m = map(r#"{"models": [
                {"match": "gpt-4o-mini", "input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6},
                {"match": "gpt-4o*", "input_usd_per_mtok": 2.5, "output_usd_per_mtok": 10},
                {"match": "llama3*", "input_usd_per_mtok": 0, "output_usd_per_mtok": 0}],
              "default": {"input_usd_per_mtok": 1, "output_usd_per_mtok": 3}}"#)
        .unwrap();
        let p = |i, o| {
            Some(Price {
                input: i,
                output: o,
            })
        };
        assert_eq!(m.price_for("gpt-4o-mini"), p(1_500, 6_000));
        assert_eq!(m.price_for("gpt-4o-2024-08-06"), p(25_000, 100_000));
        assert_eq!(m.price_for("llama3.1:8b"), p(0, 0));
        assert_eq!(m.price_for("qwen2:0.5b"), p(10_000, 30_000));
    }

    #[test]
    fn without_a_default_an_unmatched_model_has_no_price() {
        let m = map(
            r#"{"models": [{"match": "llama3*", "input_usd_per_mtok": 0.1,
                                    "output_usd_per_mtok": 0.2}]}"#,
        )
        .unwrap();
        assert!(m.price_for("llama3.1:8b").is_some());
        assert_eq!(m.price_for("qwen2:0.5b"), None);
    }

    #[test]
    fn bad_price_maps_are_refused() {
        for bad in [
            r#"{}"#,
            r#"{"models": []}"#,
            r#"{"default": {"input_usd_per_mtok": -1, "output_usd_per_mtok": 1}}"#,
            r#"{"default": {"input_usd_per_mtok": 1}}"#,
            r#"{"default": {"input_usd_per_mtok": 1, "output_usd_per_mtok": 1, "currency": "EUR"}}"#,
            r#"{"models": [{"match": "a*b", "input_usd_per_mtok": 1, "output_usd_per_mtok": 1}]}"#,
            r#"{"models": [{"match": "", "input_usd_per_mtok": 1, "output_usd_per_mtok": 1}]}"#,
            r#"{"models": [{"match": "m", "input_usd_per_mtok": 0.00001, "output_usd_per_mtok": 1}]}"#,
            r#"{"models": [{"match": "m", "input_usd_per_mtok": 1, "output_usd_per_mtok": 1},
                           {"match": "m", "input_usd_per_mtok": 2, "output_usd_per_mtok": 2}]}"#,
            r#"{"models": [{"match": "m", "input_usd_per_mtok": "1", "output_usd_per_mtok": 1}]}"#,
        ] {
            assert!(map(bad).is_err(), "accepted {bad}");
        }
    }
}
