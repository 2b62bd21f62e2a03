//! JSON as the real servers decode it, not as the gateway does: an order- and
//! duplicate-preserving tree with the integer/float distinction of the literal, and two
//! readers over it.
//!
//! - `go`: Go's `encoding/json` into a struct (Ollama): a key matches a field
//!   case-insensitively under Unicode simple folding (`Model`, `MODEL`, `ſtream` = `stream`,
//!   `max_to\u{212a}ens` = `max_tokens`), the last matching key wins, `null` leaves a
//!   non-pointer field as it was and clears a pointer field, and an integer field refuses
//!   any literal with a fraction or exponent (`1e5`, `1.0`) or out of range.
//! - `lax`: Python's `json` into a pydantic model in lax mode (hosted providers): keys match
//!   exactly, the last duplicate wins, an int field takes `100`, `1e5` (a float with no
//!   fraction, however large) and `"100"`, and refuses `1.5`.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A JSON value with object entries in wire order (duplicates kept) and integer literals
/// apart from floats.
#[derive(Debug, Clone, PartialEq)]
pub enum J {
    Null,
    Bool(bool),
    /// A literal without fraction or exponent that fits i128 (serde_json hands anything
    /// beyond u64 over as a float, which is what such a literal is to Go, too: out of range).
    Int(i128),
    Float(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl<'de> Deserialize<'de> for J {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JVisitor)
    }
}

struct JVisitor;

impl<'de> Visitor<'de> for JVisitor {
    type Value = J;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_none<E>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<J, E> {
        Ok(J::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<J, E> {
        Ok(J::Int(i128::from(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<J, E> {
        Ok(J::Int(i128::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<J, E> {
        Ok(J::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<J, E> {
        Ok(J::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<J, E> {
        Ok(J::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<J, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<J>()? {
            items.push(item);
        }
        Ok(J::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<J, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, J>()? {
            entries.push((k, v));
        }
        Ok(J::Obj(entries))
    }
}

/// Parses a body; `Err` carries the parser's message.
pub fn parse(body: &[u8]) -> Result<J, String> {
    serde_json::from_slice::<J>(body).map_err(|e| e.to_string())
}

impl J {
    pub fn entries(&self) -> Option<&[(String, J)]> {
        match self {
            J::Obj(entries) => Some(entries),
            _ => None,
        }
    }

    /// What Python's `json` (and serde_json) make of it: the last duplicate wins.
    pub fn to_value(&self) -> Value {
        match self {
            J::Null => Value::Null,
            J::Bool(b) => Value::Bool(*b),
            J::Int(i) => u64::try_from(*i)
                .map(Value::from)
                .or_else(|_| i64::try_from(*i).map(Value::from))
                .unwrap_or_else(|_| float_value(*i as f64)),
            J::Float(f) => float_value(*f),
            J::Str(s) => Value::String(s.clone()),
            J::Arr(items) => Value::Array(items.iter().map(J::to_value).collect()),
            J::Obj(entries) => {
                let mut map = Map::new();
                for (k, v) in entries {
                    map.insert(k.clone(), v.to_value());
                }
                Value::Object(map)
            }
        }
    }

    /// A short description for error messages, like Go's `cannot unmarshal X into ...`.
    pub fn kind(&self) -> &'static str {
        match self {
            J::Null => "null",
            J::Bool(_) => "bool",
            J::Int(_) | J::Float(_) => "number",
            J::Str(_) => "string",
            J::Arr(_) => "array",
            J::Obj(_) => "object",
        }
    }
}

fn float_value(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// Go's `encoding/json` reading one struct.
pub mod go {
    use super::J;

    /// Go's name folding (`appendFoldedName`): ASCII upper-cased, every other rune mapped
    /// to the smallest rune of its simple-folding orbit, which sends `ſ` (U+017F) to `S`
    /// and the Kelvin sign (U+212A) to `K`.
    pub fn fold(name: &str) -> String {
        name.chars()
            .map(|c| match c {
                'a'..='z' => c.to_ascii_uppercase(),
                '\u{017f}' => 'S',
                '\u{212a}' => 'K',
                c if c.is_ascii() => c,
                c => {
                    let mut upper = c.to_uppercase();
                    match (upper.next(), upper.next()) {
                        (Some(u), None) => u,
                        _ => c,
                    }
                }
            })
            .collect()
    }

    /// Every value whose key names `field`, in wire order.
    fn matches<'a>(obj: &'a [(String, J)], field: &'a str) -> impl Iterator<Item = &'a J> {
        let want = fold(field);
        obj.iter()
            .filter(move |(k, _)| k == field || fold(k) == want)
            .map(|(_, v)| v)
    }

    /// A non-pointer field: each matching key assigns in turn, `null` assigns nothing.
    pub fn value<'a>(obj: &'a [(String, J)], field: &'a str) -> Option<&'a J> {
        matches(obj, field).filter(|v| **v != J::Null).last()
    }

    /// A pointer field: the last matching key wins, `null` included (it clears).
    pub fn pointer<'a>(obj: &'a [(String, J)], field: &'a str) -> Option<&'a J> {
        match matches(obj, field).last() {
            Some(J::Null) | None => None,
            Some(v) => Some(v),
        }
    }

    pub fn string(obj: &[(String, J)], field: &str) -> Result<Option<String>, String> {
        let mut out = None;
        for v in matches(obj, field) {
            match v {
                J::Null => {}
                J::Str(s) => out = Some(s.clone()),
                other => return Err(type_error(other, field, "string")),
            }
        }
        Ok(out)
    }

    pub fn bool_pointer(obj: &[(String, J)], field: &str) -> Result<Option<bool>, String> {
        let mut out = None;
        for v in matches(obj, field) {
            match v {
                J::Null => out = None,
                J::Bool(b) => out = Some(*b),
                other => return Err(type_error(other, field, "bool")),
            }
        }
        Ok(out)
    }

    pub fn bool_value(obj: &[(String, J)], field: &str) -> Result<Option<bool>, String> {
        let mut out = None;
        for v in matches(obj, field) {
            match v {
                J::Null => {}
                J::Bool(b) => out = Some(*b),
                other => return Err(type_error(other, field, "bool")),
            }
        }
        Ok(out)
    }

    /// An `*int` field (64-bit): only integer literals in range; `null` clears.
    pub fn int_pointer(obj: &[(String, J)], field: &str) -> Result<Option<i64>, String> {
        let mut out = None;
        for v in matches(obj, field) {
            match v {
                J::Null => out = None,
                J::Int(i) => match i64::try_from(*i) {
                    Ok(n) => out = Some(n),
                    Err(_) => return Err(format!("json: cannot unmarshal number {i} into Go struct field .{field} of type int")),
                },
                J::Float(f) => {
                    return Err(format!(
                        "json: cannot unmarshal number {f:e} into Go struct field .{field} of type int"
                    ))
                }
                other => return Err(type_error(other, field, "int")),
            }
        }
        Ok(out)
    }

    /// An option of `Options.FromMap`: the `options` object is a `map[string]any` (exact
    /// keys, last duplicate wins); a number (float64 to Go) is converted with `int64(f)`,
    /// which on amd64 gives the minimum int64 for anything out of range.
    pub fn option_int(options: &[(String, J)], key: &str) -> Result<Option<i64>, String> {
        let Some((_, v)) = options.iter().rev().find(|(k, _)| k == key) else {
            return Ok(None);
        };
        match v {
            J::Null => Ok(None),
            J::Int(i) => Ok(Some(float_to_int64(*i as f64))),
            J::Float(f) => Ok(Some(float_to_int64(*f))),
            _ => Err(format!("option \"{key}\" must be of type integer")),
        }
    }

    pub fn float_to_int64(f: f64) -> i64 {
        // 2^63 is exact as f64; `as` saturates in Rust, Go on amd64 gives i64::MIN instead.
        const TWO_63: f64 = 9_223_372_036_854_775_808.0;
        if f.is_finite() && f > -TWO_63 && f < TWO_63 {
            f.trunc() as i64
        } else {
            i64::MIN
        }
    }

    fn type_error(v: &J, field: &str, go_type: &str) -> String {
        format!(
            "json: cannot unmarshal {} into Go struct field .{field} of type {go_type}",
            v.kind()
        )
    }
}

/// Python `json` + pydantic v2 lax mode.
pub mod lax {
    use super::J;

    /// Exact key, last duplicate wins; `null` is returned as `None` like a missing key.
    pub fn get<'a>(obj: &'a [(String, J)], field: &str) -> Option<&'a J> {
        match obj.iter().rev().find(|(k, _)| k == field) {
            Some((_, J::Null)) | None => None,
            Some((_, v)) => Some(v),
        }
    }

    pub fn string(obj: &[(String, J)], field: &str) -> Result<Option<String>, String> {
        match get(obj, field) {
            None => Ok(None),
            Some(J::Str(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!(
                "{field}: Input should be a valid string, got {}",
                other.kind()
            )),
        }
    }

    /// An int field: integer literals, floats with no fraction (`1e5`, `1e30`), and
    /// strings of digits (`"100"`). Saturates at u64 for the record (negative values are
    /// returned as such for validation).
    pub fn int(obj: &[(String, J)], field: &str) -> Result<Option<i128>, String> {
        let bad = || format!("{field}: Input should be a valid integer");
        match get(obj, field) {
            None => Ok(None),
            Some(J::Int(i)) => Ok(Some(*i)),
            Some(J::Float(f)) if f.is_finite() && f.fract() == 0.0 => {
                // Beyond i128 only for absurd literals; saturate, still "very large".
                Ok(Some(if f.abs() >= 1.7e38 {
                    if *f > 0.0 {
                        i128::MAX
                    } else {
                        i128::MIN
                    }
                } else {
                    *f as i128
                }))
            }
            Some(J::Str(s)) => {
                let t = s.trim();
                let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
                    return Err(bad());
                }
                t.replace('_', "")
                    .parse::<i128>()
                    .map(Some)
                    .or(Ok(Some(i128::MAX)))
            }
            Some(_) => Err(bad()),
        }
    }

    /// A bool field in lax mode: JSON booleans, 0/1, and the strings pydantic accepts.
    pub fn boolean(obj: &[(String, J)], field: &str) -> Result<Option<bool>, String> {
        let bad = || format!("{field}: Input should be a valid boolean");
        match get(obj, field) {
            None => Ok(None),
            Some(J::Bool(b)) => Ok(Some(*b)),
            Some(J::Int(0)) => Ok(Some(false)),
            Some(J::Int(1)) => Ok(Some(true)),
            Some(J::Float(f)) if *f == 0.0 => Ok(Some(false)),
            Some(J::Float(f)) if *f == 1.0 => Ok(Some(true)),
            Some(J::Str(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" | "t" | "y" => Ok(Some(true)),
                "false" | "0" | "no" | "off" | "f" | "n" => Ok(Some(false)),
                _ => Err(bad()),
            },
            Some(_) => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(text: &str) -> Vec<(String, J)> {
        match parse(text.as_bytes()).expect("json") {
            J::Obj(e) => e,
            other => panic!("not an object: {other:?}"),
        }
    }

    #[test]
    fn go_matches_keys_case_insensitively_and_the_last_one_wins() {
        let o = obj(r#"{"model":"qwen2:0.5b","Model":"llama3.1:8b"}"#);
        assert_eq!(go::string(&o, "model"), Ok(Some("llama3.1:8b".into())));
        let o = obj(r#"{"MODEL":"llama3.1:8b","model":"qwen2:0.5b"}"#);
        assert_eq!(go::string(&o, "model"), Ok(Some("qwen2:0.5b".into())));
        let o = obj(r#"{"model":"llama3.1:8b","model":null}"#);
        assert_eq!(go::string(&o, "model"), Ok(Some("llama3.1:8b".into())));
    }

    #[test]
    fn go_folds_long_s_and_kelvin_sign() {
        let o = obj("{\"\u{017f}tream\":false,\"max_to\u{212a}ens\":7}");
        assert_eq!(go::bool_pointer(&o, "stream"), Ok(Some(false)));
        assert_eq!(go::int_pointer(&o, "max_tokens"), Ok(Some(7)));
    }

    #[test]
    fn go_int_fields_refuse_floats_and_overflow() {
        assert!(go::int_pointer(&obj(r#"{"max_tokens":1e5}"#), "max_tokens").is_err());
        assert!(go::int_pointer(&obj(r#"{"max_tokens":1.0}"#), "max_tokens").is_err());
        assert!(go::int_pointer(&obj(r#"{"max_tokens":"100"}"#), "max_tokens").is_err());
        assert!(
            go::int_pointer(&obj(r#"{"max_tokens":9223372036854775808}"#), "max_tokens").is_err()
        );
        assert_eq!(
            go::int_pointer(&obj(r#"{"max_tokens":9223372036854775807}"#), "max_tokens"),
            Ok(Some(i64::MAX))
        );
        assert_eq!(
            go::int_pointer(&obj(r#"{"max_tokens":5,"max_tokens":null}"#), "max_tokens"),
            Ok(None)
        );
    }

    #[test]
    fn ollama_options_convert_floats_like_go_on_amd64() {
        let o = obj(r#"{"num_predict":1e5,"num_ctx":1.5,"x":1e30,"s":"100"}"#);
        assert_eq!(go::option_int(&o, "num_predict"), Ok(Some(100_000)));
        assert_eq!(go::option_int(&o, "num_ctx"), Ok(Some(1)));
        assert_eq!(go::option_int(&o, "x"), Ok(Some(i64::MIN)));
        assert!(go::option_int(&o, "s").is_err());
        assert_eq!(go::option_int(&o, "NUM_PREDICT"), Ok(None));
    }

    #[test]
    fn lax_ints_take_whole_floats_and_digit_strings() {
        let o = obj(r#"{"a":1e5,"b":"100","c":1.5,"d":1e30,"e":null,"f":true}"#);
        assert_eq!(lax::int(&o, "a"), Ok(Some(100_000)));
        assert_eq!(lax::int(&o, "b"), Ok(Some(100)));
        assert!(lax::int(&o, "c").is_err());
        assert!(lax::int(&o, "d").expect("whole float") > Some(i128::from(u64::MAX)));
        assert_eq!(lax::int(&o, "e"), Ok(None));
        assert!(lax::int(&o, "f").is_err());
    }

    #[test]
    fn lax_keys_are_exact_and_the_last_duplicate_wins() {
        let o = obj(r#"{"Model":"x","model":"a","model":"b","stream":"true"}"#);
        assert_eq!(lax::string(&o, "model"), Ok(Some("b".into())));
        assert_eq!(lax::boolean(&o, "stream"), Ok(Some(true)));
        assert_eq!(lax::boolean(&o, "Stream"), Ok(None));
    }
}
