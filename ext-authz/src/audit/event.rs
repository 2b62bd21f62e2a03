//! An audit event and its extraction from Envoy's `HTTPAccessLogEntry`.

use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::google::protobuf::{value::Kind, Any, BytesValue, Duration as PbDuration};
use prost::Message;
use tollgate_core::metadata;
use tollgate_core::operation::Operation;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub at_ms: i64,
    pub request_id: String,
    pub key_id: Option<String>,
    pub tenant_id: Option<String>,
    pub model: Option<String>,
    pub operation: String,
    /// `allowed` when the model server answered, `denied` when the gateway did.
    pub decision: String,
    /// `ok`, a Tollgate error code (`invalid_api_key`, `rate_limited`, …) or Envoy's
    /// response code details for its own replies.
    pub reason: String,
    pub status: u32,
    pub tokens_in: Option<u64>,
    pub tokens_out: Option<u64>,
    pub latency_ms: i64,
    /// From the first downstream byte to the first byte of the response to the client.
    pub first_byte_ms: Option<i64>,
    pub client_ip: Option<String>,
    /// The request body, only for tenants that opted in to prompt logging; written to the
    /// separate prompt log, never to the audit row.
    pub prompt: Option<String>,
}

fn millis(d: &Option<PbDuration>) -> Option<i64> {
    d.as_ref()
        .map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000)
}

/// Filter-state values set by the wasm filter arrive as `BytesValue` in an `Any`.
fn filter_state_text(
    objects: &std::collections::HashMap<String, Any>,
    key: &str,
) -> Option<String> {
    let any = objects.get(&format!("wasm.{key}"))?;
    let bytes = BytesValue::decode(any.value.as_slice()).ok()?.value;
    let text = String::from_utf8(bytes).ok()?;
    (!text.is_empty()).then_some(text)
}

/// Values longer than this are cut: audit rows stay small whatever a client sends.
const MAX_FIELD: usize = 256;

fn clip(s: String) -> String {
    if s.len() <= MAX_FIELD {
        return s;
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl AuditEvent {
    pub fn from_entry(e: &HttpAccessLogEntry) -> Self {
        let common = e.common_properties.clone().unwrap_or_default();
        let request = e.request.clone().unwrap_or_default();
        let response = e.response.clone().unwrap_or_default();
        let authz = common
            .metadata
            .as_ref()
            .and_then(|m| m.filter_metadata.get(metadata::AUTHZ_NAMESPACE));
        let authz_str = |k: &str| -> Option<String> {
            match authz?.fields.get(k)?.kind.as_ref()? {
                Kind::StringValue(s) => Some(clip(s.clone())),
                _ => None,
            }
        };
        let status = response.response_code.map(|c| c.value).unwrap_or(0);
        let via_upstream = response.response_code_details == "via_upstream";
        let reason = if via_upstream && status < 400 {
            "ok".to_string()
        } else {
            response
                .response_headers
                .get(metadata::HEADER_ERROR)
                .cloned()
                .unwrap_or_else(|| response.response_code_details.clone())
        };
        let at_ms = common
            .start_time
            .as_ref()
            .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
            .unwrap_or(0);
        let client_ip = common
            .downstream_remote_address
            .as_ref()
            .and_then(|a| a.address.as_ref())
            .and_then(|a| match a {
                Address::SocketAddress(s) => Some(s.address.clone()),
                _ => None,
            });
        let path = if request.original_path.is_empty() {
            &request.path
        } else {
            &request.original_path
        };
        let fs = &common.filter_state_objects;
        AuditEvent {
            at_ms,
            request_id: clip(request.request_id.clone()),
            key_id: authz_str(metadata::KEY_ID),
            tenant_id: authz_str(metadata::TENANT_ID),
            model: filter_state_text(fs, metadata::FILTER_STATE_MODEL).map(clip),
            operation: Operation::of_path(path).as_str().to_string(),
            decision: if via_upstream { "allowed" } else { "denied" }.to_string(),
            reason: clip(reason),
            status,
            tokens_in: filter_state_text(fs, metadata::FILTER_STATE_TOKENS_IN)
                .and_then(|t| t.parse().ok()),
            tokens_out: filter_state_text(fs, metadata::FILTER_STATE_TOKENS_OUT)
                .and_then(|t| t.parse().ok()),
            latency_ms: millis(&common.duration)
                .or_else(|| millis(&common.time_to_last_downstream_tx_byte))
                .unwrap_or(0),
            first_byte_ms: millis(&common.time_to_first_downstream_tx_byte),
            client_ip,
            prompt: filter_state_text(fs, metadata::FILTER_STATE_PROMPT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{Metadata, SocketAddress};
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpRequestProperties, HttpResponseProperties,
    };
    use envoy_types::pb::google::protobuf::{Struct, Timestamp, UInt32Value, Value};
    use std::collections::HashMap;

    fn bytes_any(s: &str) -> Any {
        Any {
            type_url: "type.googleapis.com/google.protobuf.BytesValue".into(),
            value: BytesValue {
                value: s.as_bytes().to_vec(),
            }
            .encode_to_vec(),
        }
    }

    fn entry(status: u32, details: &str, error: Option<&str>) -> HttpAccessLogEntry {
        let mut fields = HashMap::new();
        fields.insert(
            "key_id".to_string(),
            Value {
                kind: Some(Kind::StringValue("key_1".into())),
            },
        );
        fields.insert(
            "tenant_id".to_string(),
            Value {
                kind: Some(Kind::StringValue("ten_1".into())),
            },
        );
        let mut md = HashMap::new();
        md.insert(metadata::AUTHZ_NAMESPACE.to_string(), Struct { fields });
        let mut fs = HashMap::new();
        fs.insert("wasm.tollgate_model".to_string(), bytes_any("llama3.1:8b"));
        fs.insert("wasm.tollgate_tokens_in".to_string(), bytes_any("12"));
        fs.insert("wasm.tollgate_tokens_out".to_string(), bytes_any("34"));
        let mut headers = HashMap::new();
        if let Some(e) = error {
            headers.insert("x-tollgate-error".to_string(), e.to_string());
        }
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                start_time: Some(Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5_000_000,
                }),
                duration: Some(PbDuration {
                    seconds: 1,
                    nanos: 250_000_000,
                }),
                time_to_first_downstream_tx_byte: Some(PbDuration {
                    seconds: 0,
                    nanos: 40_000_000,
                }),
                metadata: Some(Metadata {
                    filter_metadata: md,
                    ..Default::default()
                }),
                filter_state_objects: fs,
                downstream_remote_address: Some(
                    envoy_types::pb::envoy::config::core::v3::Address {
                        address: Some(Address::SocketAddress(SocketAddress {
                            address: "10.1.2.3".into(),
                            ..Default::default()
                        })),
                    },
                ),
                ..Default::default()
            }),
            request: Some(HttpRequestProperties {
                path: "/v1/chat/completions".into(),
                request_id: "rid-1".into(),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(UInt32Value { value: status }),
                response_code_details: details.into(),
                response_headers: headers,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn upstream_answer_is_an_allowed_event_with_identity_model_tokens_and_times() {
        let ev = AuditEvent::from_entry(&entry(200, "via_upstream", None));
        assert_eq!(ev.at_ms, 1_700_000_000_005);
        assert_eq!(ev.request_id, "rid-1");
        assert_eq!(ev.key_id.as_deref(), Some("key_1"));
        assert_eq!(ev.tenant_id.as_deref(), Some("ten_1"));
        assert_eq!(ev.model.as_deref(), Some("llama3.1:8b"));
        assert_eq!(ev.operation, "chat");
        assert_eq!(
            (ev.decision.as_str(), ev.reason.as_str()),
            ("allowed", "ok")
        );
        assert_eq!((ev.tokens_in, ev.tokens_out), (Some(12), Some(34)));
        assert_eq!((ev.latency_ms, ev.first_byte_ms), (1250, Some(40)));
        assert_eq!(ev.client_ip.as_deref(), Some("10.1.2.3"));
    }

    #[test]
    fn gateway_refusal_is_denied_with_the_tollgate_error_code() {
        let ev = AuditEvent::from_entry(&entry(429, "request_rate_limited", Some("rate_limited")));
        assert_eq!(
            (ev.decision.as_str(), ev.reason.as_str(), ev.status),
            ("denied", "rate_limited", 429)
        );
        let ev =
            AuditEvent::from_entry(&entry(503, "upstream_reset_before_response_started", None));
        assert_eq!(ev.reason, "upstream_reset_before_response_started");
    }

    #[test]
    fn empty_entry_does_not_panic_and_long_values_are_clipped() {
        let ev = AuditEvent::from_entry(&HttpAccessLogEntry::default());
        assert_eq!(ev.decision, "denied");
        assert_eq!(ev.operation, "other");
        let mut e = entry(401, "ext_authz_denied", Some(&"é".repeat(400)));
        e.request.as_mut().unwrap().request_id = "x".repeat(1000);
        let ev = AuditEvent::from_entry(&e);
        assert!(ev.reason.len() <= MAX_FIELD && ev.request_id.len() <= MAX_FIELD);
    }
}
