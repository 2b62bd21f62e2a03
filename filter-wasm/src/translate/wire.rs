//! Owns the small serde building blocks every API's wire types share: strings borrowed from the
//! input when they have no escapes, "one or many" fields, and telling an absent field from a
//! `null` one.

use std::borrow::Cow;

use serde::Deserialize;

/// A JSON string, borrowed from the input unless it had escapes. A newtype because serde only
/// borrows a `Cow` that is a field's whole type, not one inside an `Option` or `Vec`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Text<'a>(#[serde(borrow)] pub Cow<'a, str>);

impl Text<'_> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// OpenAI's `stop`, `input` and similar fields: a string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<'a> {
    One(#[serde(borrow)] Text<'a>),
    Many(#[serde(borrow)] Vec<Text<'a>>),
}

impl OneOrMany<'_> {
    pub fn to_vec(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(one) => vec![one.as_str()],
            OneOrMany::Many(many) => many.iter().map(Text::as_str).collect(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        text: Option<Text<'a>>,
        #[serde(borrow)]
        stop: Option<OneOrMany<'a>>,
    }

    #[test]
    fn text_borrows_unless_escaped() {
        let p: Probe<'_> = serde_json::from_str(r#"{"text":"plain"}"#).unwrap();
        assert!(matches!(p.text.unwrap().0, Cow::Borrowed("plain")));
        let p: Probe<'_> = serde_json::from_str(r#"{"text":"a\"b"}"#).unwrap();
        assert!(matches!(p.text.unwrap().0, Cow::Owned(ref s) if s == "a\"b"));
    }

    #[test]
    fn one_or_many_reads_both_shapes() {
        let p: Probe<'_> = serde_json::from_str(r#"{"stop":"x"}"#).unwrap();
        assert_eq!(p.stop.unwrap().to_vec(), ["x"]);
        let p: Probe<'_> = serde_json::from_str(r#"{"stop":["x","y"]}"#).unwrap();
        assert_eq!(p.stop.unwrap().to_vec(), ["x", "y"]);
        assert!(serde_json::from_str::<Probe<'_>>(r#"{"stop":3}"#).is_err());
    }
}
