//! Owns the few top-level fields of a request body that decide where it goes and how many
//! tokens it reserves, read in one pass that skips everything else (messages are not
//! materialised), and renaming the model for the upstream.

use std::collections::HashSet;

use serde::de::{Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::translate::{body_error, object_start, RequestError};

#[derive(Debug, Default, Deserialize)]
struct Options {
    num_predict: Option<i64>,
}

/// `model`, and the completion budget the client asked for.
#[derive(Debug, Default, Deserialize)]
pub struct RequestHead {
    pub model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    options: Option<Options>,
}

impl RequestHead {
    /// The head of a JSON object body; the same errors as the full translation.
    pub fn parse(body: &[u8]) -> Result<RequestHead, RequestError> {
        check_keys(body)?;
        serde_json::from_slice(body).map_err(body_error)
    }

    /// The model, or why a request without one cannot be routed.
    pub fn model(&self) -> Result<&str, RequestError> {
        self.model
            .as_deref()
            .filter(|m| !m.is_empty())
            .ok_or(RequestError::MissingModel)
    }

    /// Tokens reserved before the real count is known: the completion budget the client
    /// asked for (`max_completion_tokens`, `max_tokens`, Ollama's `num_predict`) or
    /// `default_completion`, plus the prompt at about four bytes a token. Over-reserving only
    /// delays the next request until the stream-done debit refunds the difference.
    pub fn reservation(&self, body_len: usize, default_completion: u64) -> u64 {
        let (prompt, completion) = self.reservation_parts(body_len, default_completion);
        completion.saturating_add(prompt)
    }

    /// The reservation as (prompt estimate, completion budget): USD budgets price the two
    /// at the model's input and output prices.
    pub fn reservation_parts(&self, body_len: usize, default_completion: u64) -> (u64, u64) {
        let asked = self
            .max_completion_tokens
            .or(self.max_tokens)
            .or(self.options.as_ref().and_then(|o| o.num_predict));
        let completion = match asked {
            Some(n) if n > 0 => n as u64,
            _ => default_completion,
        };
        (body_len as u64 / 4, completion)
    }
}

/// Refuses a JSON object body holding two keys that differ only in ASCII case, at the top
/// level or in `options` (`"model"` and `"Model"`). Go's encoding/json, which Ollama decodes
/// with (its OpenAI-compatible API too), matches keys ignoring case and keeps the last, so
/// the model server would run another model than the one checked here, or stream unlike
/// planned. Deeper objects (tool schemas) may legitimately hold such keys and are not read.
pub fn check_keys(body: &[u8]) -> Result<(), RequestError> {
    object_start(body)?;
    let mut de = serde_json::Deserializer::from_slice(body);
    de.deserialize_map(Keys).map_err(body_error)
}

struct Keys;

impl<'de> Visitor<'de> for Keys {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let folded = key.to_ascii_lowercase();
            if folded == "options" {
                let options: serde_json::Value = map.next_value()?;
                let mut inner = HashSet::new();
                let keys = options.as_object().into_iter().flat_map(|o| o.keys());
                if let Some(k) = keys
                    .into_iter()
                    .find(|k| !inner.insert(k.to_ascii_lowercase()))
                {
                    return Err(A::Error::custom(format!(
                        "options holds keys that differ only in case ({k:?})"
                    )));
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
            if !seen.insert(folded) {
                return Err(A::Error::custom(format!(
                    "duplicate field {key:?} (keys may not differ only in case)"
                )));
            }
        }
        Ok(())
    }
}

/// The body with its top-level `model` replaced; `None` if it is not a JSON object.
pub fn with_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    v.insert("model".into(), serde_json::Value::String(model.to_owned()));
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reservation_uses_what_the_client_asked_else_the_default() {
        let head = |b: &str| RequestHead::parse(b.as_bytes()).unwrap();
        let b = r#"{"model":"m","max_tokens":7,"messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(head(b).model.as_deref(), Some("m"));
        assert_eq!(head(b).reservation(b.len(), 1000), 7 + b.len() as u64 / 4);
        assert_eq!(
            head(b).reservation_parts(b.len(), 1000),
            (b.len() as u64 / 4, 7)
        );
        let b = r#"{"model":"m","max_tokens":7,"max_completion_tokens":9}"#;
        assert_eq!(head(b).reservation(0, 1000), 9);
        let b = r#"{"model":"m","options":{"num_predict":5,"temperature":1}}"#;
        assert_eq!(head(b).reservation(0, 1000), 5);
        let b = r#"{"model":"m","max_tokens":0}"#;
        assert_eq!(head(b).reservation(0, 1000), 1000);
        assert!(matches!(
            RequestHead::parse(b"[1]"),
            Err(RequestError::InvalidRequest(_))
        ));
        assert!(matches!(
            RequestHead::parse(br#"{"model":3}"#),
            Err(RequestError::InvalidRequest(_))
        ));
        assert!(matches!(
            RequestHead::parse(b"{nope"),
            Err(RequestError::MalformedJson(_))
        ));
        assert!(matches!(
            head(r#"{"model":""}"#).model(),
            Err(RequestError::MissingModel)
        ));
    }

    #[test]
    fn model_is_replaced_and_other_fields_kept() {
        let out = with_model(br#"{"model":"alias","stream":true}"#, "llama3.1:8b").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "llama3.1:8b");
        assert_eq!(v["stream"], true);
        assert!(with_model(b"[]", "x").is_none());
    }
}
