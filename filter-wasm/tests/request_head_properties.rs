//! Properties of the request-head reader (`tollgate_filter::request_head`): whatever body it
//! accepts, a Go server (case-insensitive names with Unicode folding, last duplicate wins)
//! and a Python server (exact names, integers also from integral floats and strings) read
//! the same model, stream flag and token budget as the gateway; every count it hands on is
//! one Envoy can carry; nothing panics.
//! Long run: `PROPTEST_CASES=100000 cargo test -p tollgate-filter --test request_head_properties`.

use proptest::prelude::*;
use serde_json::{Map, Value};
use tollgate_filter::request_head::{RequestHead, COUNT_MAX};

/// Go's `encoding/json` field matching (simplified to what the generator produces): exact
/// name first, else a name equal under simple case folding; the last match wins.
fn go_field<'a>(object: &'a [(String, Value)], field: &str) -> Option<&'a Value> {
    let fold = |s: &str| -> String {
        s.chars()
            .map(|c| match c {
                '\u{17F}' => 's',
                '\u{212A}' => 'k',
                c => c.to_ascii_lowercase(),
            })
            .collect()
    };
    let exact = object.iter().rev().find(|(k, _)| k == field);
    exact
        .or_else(|| object.iter().rev().find(|(k, _)| fold(k) == field))
        .map(|(_, v)| v)
}

/// pydantic's lax integer: integral floats and numeric strings are integers too.
fn python_int(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("model".to_owned()),
        Just("Model".to_owned()),
        Just("MODEL".to_owned()),
        Just("stream".to_owned()),
        Just("\u{17F}tream".to_owned()),
        Just("Stream".to_owned()),
        Just("max_tokens".to_owned()),
        Just("max_to\u{212A}ens".to_owned()),
        Just("Max_Tokens".to_owned()),
        Just("messages".to_owned()),
        Just("temperature".to_owned()),
        "[a-z_]{1,8}",
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[a-z0-9.:]{0,12}".prop_map(Value::String),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        Just(Value::Null),
        Just(Value::from(1e5)),
        Just(Value::String("100".into())),
    ]
}

fn body() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec((name(), value()), 0..6)
}

fn render(fields: &[(String, Value)]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), v))
        .collect();
    format!("{{{}}}", parts.join(","))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(head) = RequestHead::parse(&bytes) {
            prop_assert!(head.reservation(&bytes, 1024) <= COUNT_MAX);
        }
    }

    #[test]
    fn an_accepted_body_is_read_alike_by_go_and_python_servers(fields in body()) {
        let text = render(&fields);
        let Ok(head) = RequestHead::parse(text.as_bytes()) else {
            return Ok(());
        };
        for server in ["go", "python"] {
            let read = |field: &str| match server {
                "go" => go_field(&fields, field),
                _ => fields.iter().rev().find(|(k, _)| k == field).map(|(_, v)| v),
            };
            let model = read("model").and_then(Value::as_str).map(str::to_owned);
            prop_assert_eq!(&model, &head.model, "{} read another model: {}", server, text);
            let stream = read("stream").and_then(Value::as_bool);
            prop_assert_eq!(stream, head.stream, "{} read another stream: {}", server, text);
            let max_tokens = read("max_tokens").and_then(python_int);
            if let Some(n) = max_tokens.filter(|n| *n > 0) {
                let (_, completion) = head.reservation_parts(text.as_bytes(), 1);
                prop_assert_eq!(completion, n.min(COUNT_MAX), "{}: {}", server, text);
            }
        }
    }

    #[test]
    fn any_upper_case_or_non_ascii_name_is_refused(fields in body(), at in 0usize..6) {
        let mut fields = fields;
        if fields.is_empty() {
            return Ok(());
        }
        let i = at % fields.len();
        fields[i].0 = format!("X{}", fields[i].0);
        prop_assert!(RequestHead::parse(render(&fields).as_bytes()).is_err());
    }

    #[test]
    fn reservation_is_the_budget_times_choices_clamped(
        max_tokens in prop::option::of(any::<u64>()),
        n in 1u64..=128,
        prompt in "[a-z ]{0,200}",
    ) {
        let mut object = Map::new();
        object.insert("model".into(), "m".into());
        object.insert("n".into(), n.into());
        object.insert("prompt".into(), prompt.into());
        if let Some(m) = max_tokens {
            object.insert("max_tokens".into(), m.into());
        }
        let text = Value::Object(object).to_string();
        let head = RequestHead::parse(text.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (p, c) = head.reservation_parts(text.as_bytes(), 1024);
        let budget = max_tokens.filter(|m| *m > 0).unwrap_or(1024);
        prop_assert_eq!(c, budget.saturating_mul(n).min(COUNT_MAX));
        prop_assert!(p <= COUNT_MAX);
        prop_assert!(head.reservation(text.as_bytes(), 1024) <= COUNT_MAX);
    }
}
