//! Prometheus metrics of tollgate-authz: its own decisions, and the gateway-wide request,
//! token and latency metrics derived from Envoy's access log. Label values are bounded:
//! tenants are ids from the key store, models past a fixed number of distinct names are
//! folded into `other`, and every value is cleaned of control characters and capped in
//! length (a model name is whatever a client sent).

use crate::argon2_budget::Argon2Metrics;
use crate::audit::AuditEvent;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use std::collections::HashSet;
use std::sync::Mutex;

const MAX_MODELS: usize = 100;
const MAX_TENANTS: usize = 10_000;
/// Longest label value, in bytes (cut at a character boundary).
const MAX_LABEL_BYTES: usize = 128;

/// A label value that keeps the exposition valid and readable: control characters (NUL,
/// newline, tab, DEL, C1 controls …) become `?`, and the value is capped at
/// `MAX_LABEL_BYTES`. The encoder escapes `\` and `"` itself.
pub fn label_value(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_LABEL_BYTES));
    for c in raw.chars() {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > MAX_LABEL_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

#[derive(Debug)]
struct LabelCap {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl LabelCap {
    fn new(max: usize) -> Self {
        Self {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    fn label(&self, value: Option<&str>) -> String {
        let Some(v) = value.filter(|v| !v.is_empty()) else {
            return "none".into();
        };
        let v = label_value(v);
        let v = v.as_str();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(v) {
            return v.to_string();
        }
        if seen.len() < self.max {
            seen.insert(v.to_string());
            return v.to_string();
        }
        "other".into()
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub checks: IntCounterVec,
    pub check_seconds: HistogramVec,
    requests: IntCounterVec,
    tokens: IntCounterVec,
    duration: HistogramVec,
    first_byte: HistogramVec,
    pub audit: IntCounterVec,
    /// The argon2 budget's counters (`Argon2Budget::attach`).
    pub argon2: Argon2Metrics,
    models: LabelCap,
    tenants: LabelCap,
}

fn buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 120.0,
    ]
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let checks = IntCounterVec::new(
            Opts::new(
                "tollgate_authz_checks_total",
                "ext_authz decisions by result and code",
            ),
            &["result", "code"],
        )?;
        let check_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_authz_check_duration_seconds",
                "Time to decide one check",
            )
            .buckets(buckets()),
            &["result"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new("gateway_requests_total", "Requests through the gateway"),
            &["tenant", "model", "status"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "gateway_tokens_total",
                "Tokens counted from model server usage",
            ),
            &["tenant", "model", "direction"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_request_duration_seconds",
                "Whole request, first byte in to last byte out",
            )
            .buckets(buckets()),
            &["tenant"],
        )?;
        let first_byte = HistogramVec::new(
            HistogramOpts::new(
                "gateway_time_to_first_token_seconds",
                "First byte of the request to first byte of the response (the first token of a stream)",
            )
            .buckets(buckets()),
            &["tenant"],
        )?;
        let audit = IntCounterVec::new(
            Opts::new(
                "tollgate_audit_events_total",
                "Audit events by outcome: written, dropped (queue full), failed (store error)",
            ),
            &["result"],
        )?;
        let argon2 = Argon2Metrics {
            runs: IntCounter::new(
                "tollgate_authz_argon2_verifications_total",
                "argon2id verifications run (each ~20 ms of one core)",
            )?,
            admitted: IntGauge::new(
                "tollgate_authz_argon2_admitted",
                "Checks admitted to the argon2 budget now (looking up, waiting or hashing)",
            )?,
            admitted_peak: IntGauge::new(
                "tollgate_authz_argon2_admitted_peak",
                "Most checks admitted to the argon2 budget at once since start",
            )?,
            capacity: IntGauge::new(
                "tollgate_authz_argon2_capacity",
                "argon2 slots plus queue places; past them a check gets 503 authz_overloaded",
            )?,
        };
        registry.register(Box::new(argon2.runs.clone()))?;
        registry.register(Box::new(argon2.admitted.clone()))?;
        registry.register(Box::new(argon2.admitted_peak.clone()))?;
        registry.register(Box::new(argon2.capacity.clone()))?;
        registry.register(Box::new(checks.clone()))?;
        registry.register(Box::new(check_seconds.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(first_byte.clone()))?;
        registry.register(Box::new(audit.clone()))?;
        Ok(Self {
            registry,
            checks,
            check_seconds,
            requests,
            tokens,
            duration,
            first_byte,
            audit,
            argon2,
            models: LabelCap::new(MAX_MODELS),
            tenants: LabelCap::new(MAX_TENANTS),
        })
    }

    pub fn observe(&self, e: &AuditEvent) {
        let tenant = self.tenants.label(e.tenant_id.as_deref());
        let model = self.models.label(e.model.as_deref());
        let status = e.status.to_string();
        self.requests
            .with_label_values(&[&tenant, &model, &status])
            .inc();
        if let Some(n) = e.tokens_in {
            self.tokens
                .with_label_values(&[&tenant, &model, "in"])
                .inc_by(n);
        }
        if let Some(n) = e.tokens_out {
            self.tokens
                .with_label_values(&[&tenant, &model, "out"])
                .inc_by(n);
        }
        self.duration
            .with_label_values(&[&tenant])
            .observe(e.latency_ms as f64 / 1000.0);
        if let Some(fb) = e.first_byte_ms {
            if e.decision == "allowed" {
                self.first_byte
                    .with_label_values(&[&tenant])
                    .observe(fb as f64 / 1000.0);
            }
        }
    }

    pub fn render(&self) -> String {
        tollgate_runtime::side_port::exposition(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(model: &str) -> AuditEvent {
        AuditEvent {
            at_ms: 0,
            request_id: "r".into(),
            key_id: Some("key_1".into()),
            tenant_id: Some("ten_1".into()),
            model: Some(model.into()),
            operation: "chat".into(),
            decision: "allowed".into(),
            reason: "ok".into(),
            status: 200,
            tokens_in: Some(5),
            tokens_out: Some(7),
            latency_ms: 120,
            first_byte_ms: Some(20),
            client_ip: None,
            prompt: None,
        }
    }

    #[test]
    fn events_become_request_token_and_latency_series() {
        let m = Metrics::new().unwrap();
        m.observe(&event("llama3"));
        m.observe(&event("llama3"));
        let text = m.render();
        assert!(
            text.contains(
                r#"gateway_requests_total{model="llama3",status="200",tenant="ten_1"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"gateway_tokens_total{direction="out",model="llama3",tenant="ten_1"} 14"#
            ),
            "{text}"
        );
        assert!(
            text.contains("gateway_request_duration_seconds_count{tenant=\"ten_1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("gateway_time_to_first_token_seconds_count{tenant=\"ten_1\"} 2"),
            "{text}"
        );
    }

    /// Every line of a text exposition is a comment or `name{labels} value`, with no
    /// control character inside.
    fn assert_valid_exposition(text: &str) {
        for line in text.lines() {
            assert!(
                !line.chars().any(|c| c.is_control()),
                "control character in {line:?}"
            );
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
            let name_end = series.find('{').unwrap_or(series.len());
            assert!(
                series[..name_end]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad name in {line:?}"
            );
        }
    }

    #[test]
    fn control_characters_and_long_model_names_do_not_break_the_exposition() {
        let m = Metrics::new().unwrap();
        let long = "m".repeat(10_000);
        for model in [
            "llama\0\n3",
            "evil\n# TYPE fake counter\nfake_total 1",
            "tab\tcr\r\u{7f}\u{85}nul\0",
            "quote\"back\\slash",
            "ünïcödé\u{1b}[31m",
            long.as_str(),
        ] {
            m.observe(&event(model));
        }
        let text = m.render();
        assert_valid_exposition(&text);
        assert!(text.contains(r#"model="llama??3""#), "{text}");
        assert!(!text.contains("\nfake_total"), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("fake_total")), "{text}");
        assert!(text.contains(r#"model="quote\"back\\slash""#), "{text}");
        assert!(text.contains(r#"model="ünïcödé?[31m""#), "{text}");
        let capped = format!(r#"model="{}""#, "m".repeat(MAX_LABEL_BYTES));
        assert!(text.contains(&capped), "{text}");
        assert!(!text.contains(&"m".repeat(MAX_LABEL_BYTES + 1)));
    }

    #[test]
    fn label_values_are_cut_at_a_character_boundary() {
        let v = label_value(&"é".repeat(100));
        assert_eq!(v.len(), MAX_LABEL_BYTES);
        assert_eq!(v, "é".repeat(MAX_LABEL_BYTES / 2));
        assert_eq!(label_value("a\u{0}b\nc"), "a?b?c");
        assert_eq!(label_value("llama3.1:8b"), "llama3.1:8b");
    }

    #[test]
    fn model_labels_are_capped() {
        let m = Metrics::new().unwrap();
        for i in 0..(MAX_MODELS + 50) {
            m.observe(&event(&format!("m{i}")));
        }
        let text = m.render();
        assert!(text.contains(r#"model="other""#));
        let series = text
            .lines()
            .filter(|l| l.starts_with("gateway_requests_total{"))
            .count();
        assert_eq!(series, MAX_MODELS + 1);
    }
}
