//! The ext_authz v3 gRPC service: turns a decision into Envoy's CheckResponse.

use crate::credentials::{self, Credentials};
use crate::decision::{Authorizer, Denial, Outcome, Request, CREDENTIAL_UNAVAILABLE};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::policy::Limits;
use envoy_types::ext_authz::v3::pb::{
    Address, Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc;
use std::collections::HashMap;
use std::sync::Arc;
use tollgate_core::metadata;
use tonic::{Response, Status};

/// gRPC codes Envoy reads from `CheckResponse.status`.
const GRPC_OK: i32 = 0;
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_UNAUTHENTICATED: i32 = 16;
const GRPC_UNAVAILABLE: i32 = 14;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;

#[derive(Debug, Clone)]
pub struct CheckService {
    authorizer: Arc<Authorizer>,
    credentials: Arc<Credentials>,
    metrics: Arc<Metrics>,
}

impl CheckService {
    pub fn new(
        authorizer: Arc<Authorizer>,
        credentials: Arc<Credentials>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            authorizer,
            credentials,
            metrics,
        }
    }
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.to_string(),
            ..Default::default()
        }),
        // Overwrite replaces any copy the client sent, so these cannot be spoofed.
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn limit_value(n: u64, unit: &str) -> Value {
    let mut limit = HashMap::new();
    limit.insert(
        "requests_per_unit".to_string(),
        Value {
            kind: Some(Kind::NumberValue(n as f64)),
        },
    );
    limit.insert("unit".to_string(), string_value(unit));
    Value {
        kind: Some(Kind::StructValue(Struct { fields: limit })),
    }
}

fn insert_limits(fields: &mut HashMap<String, Value>, l: &Limits, names: [&str; 6]) {
    let [rpm, tpm, day, month, usd_day, usd_month] = names;
    if let Some(n) = l.rpm {
        fields.insert(rpm.into(), limit_value(n.into(), "MINUTE"));
    }
    if let Some(n) = l.tpm {
        fields.insert(tpm.into(), limit_value(n.into(), "MINUTE"));
    }
    // Envoy reads requests_per_unit as a uint32: a larger stored budget (written past
    // tollgate-admin's check) is capped there, never wrapped to a small one.
    let cap = |n: u64| n.min(u64::from(u32::MAX));
    if let Some(n) = l.budget_day {
        fields.insert(day.into(), limit_value(cap(n), "DAY"));
    }
    if let Some(n) = l.budget_month {
        fields.insert(month.into(), limit_value(cap(n), "MONTH"));
    }
    if let Some(n) = l.budget_usd_day {
        fields.insert(usd_day.into(), limit_value(cap(n), "DAY"));
    }
    if let Some(n) = l.budget_usd_month {
        fields.insert(usd_month.into(), limit_value(cap(n), "MONTH"));
    }
}

/// Dynamic metadata for the filter and the rate limiter. Descriptor values must be
/// strings; limits must be the `{requests_per_unit, unit}` struct Envoy expects.
pub fn identity_metadata(id: &Identity) -> Struct {
    use metadata::*;
    let mut fields = HashMap::new();
    fields.insert(KEY_ID.to_string(), string_value(&id.key_id));
    fields.insert(TENANT_ID.to_string(), string_value(&id.tenant_id));
    fields.insert(MODELS.to_string(), string_value(&id.policy.models_text()));
    insert_limits(
        &mut fields,
        &id.policy.key_limits,
        [
            KEY_RPM,
            KEY_TPM,
            KEY_BUDGET_DAY,
            KEY_BUDGET_MONTH,
            KEY_BUDGET_USD_DAY,
            KEY_BUDGET_USD_MONTH,
        ],
    );
    insert_limits(
        &mut fields,
        &id.policy.tenant_limits,
        [
            TENANT_RPM,
            TENANT_TPM,
            TENANT_BUDGET_DAY,
            TENANT_BUDGET_MONTH,
            TENANT_BUDGET_USD_DAY,
            TENANT_BUDGET_USD_MONTH,
        ],
    );
    if id.log_prompts {
        fields.insert(PROMPT_LOG.into(), string_value("1"));
    }
    // The unit is required by Envoy's override shape and ignored for concurrency.
    if let Some(n) = id.policy.key_limits.max_concurrent {
        fields.insert(KEY_MAX_CONCURRENT.into(), limit_value(n.into(), "MINUTE"));
    }
    if let Some(n) = id.policy.tenant_limits.max_concurrent {
        fields.insert(
            TENANT_MAX_CONCURRENT.into(),
            limit_value(n.into(), "MINUTE"),
        );
    }
    if id.policy.key_limits.max_concurrent.is_some()
        || id.policy.tenant_limits.max_concurrent.is_some()
    {
        // Per check, so the slot is this request's whatever x-request-id the client sent.
        let nonce = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        fields.insert(LEASE_ID.into(), string_value(&nonce));
    }
    Struct { fields }
}

pub fn allow_response(
    id: &Identity,
    credential: Option<&credentials::Credential>,
) -> CheckResponse {
    let mut headers = vec![
        header(metadata::HEADER_TENANT, &id.tenant_id),
        header(metadata::HEADER_KEY_ID, &id.key_id),
    ];
    let mut headers_to_remove = vec!["authorization".to_string(), "x-api-key".to_string()];
    if let Some(c) = credential {
        // Envoy applies removals after additions: the credential's header must not be in
        // the removal list, and setting it overwrites whatever the client sent.
        headers_to_remove.retain(|h| *h != c.header);
        headers.push(header(&c.header, &c.value));
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: GRPC_OK,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove,
            ..Default::default()
        })),
        dynamic_metadata: Some(identity_metadata(id)),
    }
}

pub fn deny_response(denial: Denial, request_id: &str) -> CheckResponse {
    let status = denial.status();
    let code = match status {
        401 => GRPC_UNAUTHENTICATED,
        429 => GRPC_RESOURCE_EXHAUSTED,
        503 => GRPC_UNAVAILABLE,
        _ => GRPC_PERMISSION_DENIED,
    };
    let mut headers = vec![
        header("content-type", "application/json"),
        header("x-request-id", request_id),
    ];
    headers.push(header(metadata::HEADER_ERROR, denial.code.as_str()));
    if status == 401 {
        headers.push(header("www-authenticate", "Bearer"));
    }
    if status == 429 {
        headers.push(header("retry-after", "60"));
    }
    // A check that could not be made now (store down, argon2 budget spent) may well work
    // a moment later.
    if status == 503 {
        headers.push(header("retry-after", "1"));
    }
    CheckResponse {
        status: Some(rpc::Status {
            code,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers,
            body: denial.render(request_id),
        })),
        dynamic_metadata: None,
    }
}

fn peer_address(req: &CheckRequest) -> Option<&str> {
    let addr = req.attributes.as_ref()?.source.as_ref()?.address.as_ref()?;
    match addr.address.as_ref()? {
        Address::SocketAddress(s) => Some(s.address.as_str()),
        _ => None,
    }
}

impl CheckService {
    pub async fn decide(&self, req: &CheckRequest) -> CheckResponse {
        let empty = HashMap::new();
        let http = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let headers = http.map(|h| &h.headers).unwrap_or(&empty);
        let rid = headers
            .get("x-request-id")
            .cloned()
            .or_else(|| http.map(|h| h.id.clone()))
            .unwrap_or_default();
        let request = Request {
            headers,
            path: http.map(|h| h.path.as_str()).unwrap_or(""),
            peer: peer_address(req),
        };
        let wanted_credential = req
            .attributes
            .as_ref()
            .and_then(|a| a.context_extensions.get(credentials::CONTEXT_KEY))
            .filter(|n| !n.is_empty());
        match self.authorizer.authorize(request).await {
            Outcome::Allow(id) => {
                let credential = match wanted_credential {
                    Some(name) => match self.credentials.get(name) {
                        Some(c) => Some(c),
                        None => {
                            tracing::error!(credential = %name, "route names an unknown credential");
                            return deny_response(CREDENTIAL_UNAVAILABLE, &rid);
                        }
                    },
                    None => None,
                };
                tracing::debug!(request_id = %rid, key_id = %id.key_id, "allow");
                allow_response(&id, credential)
            }
            Outcome::Deny(d) => {
                tracing::info!(request_id = %rid, code = d.code.as_str(), status = d.status(), "deny");
                deny_response(d, &rid)
            }
        }
    }
}

#[tonic::async_trait]
impl Authorization for CheckService {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = std::time::Instant::now();
        let response = self.decide(request.get_ref()).await;
        let (result, code) = match &response.http_response {
            Some(HttpResponse::DeniedResponse(d)) => (
                "deny",
                d.headers
                    .iter()
                    .filter_map(|h| h.header.as_ref())
                    .find(|h| h.key == metadata::HEADER_ERROR)
                    .map(|h| h.value.as_str())
                    .unwrap_or("unknown"),
            ),
            _ => ("allow", "ok"),
        };
        self.metrics.checks.with_label_values(&[result, code]).inc();
        self.metrics
            .check_seconds
            .with_label_values(&[result])
            .observe(started.elapsed().as_secs_f64());
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{INVALID_KEY, STORE_UNAVAILABLE};
    use crate::policy::{effective, PolicyRow};

    fn identity() -> Identity {
        let tenant = PolicyRow {
            models: Some("llama3*,local/*".into()),
            limits: Limits {
                rpm: Some(100),
                tpm: Some(5000),
                budget_usd_month: Some(4_000_000),
                max_concurrent: Some(9),
                ..Default::default()
            },
            ..Default::default()
        };
        let key = PolicyRow {
            limits: Limits {
                rpm: Some(3),
                budget_day: Some(10_000),
                budget_usd_day: Some(125_000),
                max_concurrent: Some(2),
                ..Default::default()
            },
            ..Default::default()
        };
        Identity {
            key_id: "key_1".into(),
            tenant_id: "ten_1".into(),
            policy: effective(&tenant, Some(&key)),
            log_prompts: false,
        }
    }

    fn limit(v: &Value) -> (f64, String) {
        let Some(Kind::StructValue(s)) = &v.kind else {
            panic!("limit must be a struct: {v:?}")
        };
        let Some(Kind::NumberValue(n)) = s.fields["requests_per_unit"].kind else {
            panic!("requests_per_unit must be a number")
        };
        let Some(Kind::StringValue(u)) = &s.fields["unit"].kind else {
            panic!("unit must be a string")
        };
        (n, u.clone())
    }

    #[test]
    fn allow_carries_string_ids_models_and_limit_structs() {
        let r = allow_response(&identity(), None);
        assert_eq!(r.status.unwrap().code, GRPC_OK);
        let md = r.dynamic_metadata.unwrap().fields;
        assert_eq!(md["key_id"].kind, Some(Kind::StringValue("key_1".into())));
        assert_eq!(
            md["tenant_id"].kind,
            Some(Kind::StringValue("ten_1".into()))
        );
        assert_eq!(
            md["models"].kind,
            Some(Kind::StringValue("llama3*,local/*".into()))
        );
        assert_eq!(limit(&md["key_rpm"]), (3.0, "MINUTE".into()));
        assert_eq!(limit(&md["tenant_rpm"]), (100.0, "MINUTE".into()));
        assert_eq!(limit(&md["tenant_tpm"]), (5000.0, "MINUTE".into()));
        assert_eq!(limit(&md["key_budget_day"]), (10_000.0, "DAY".into()));
        assert_eq!(limit(&md["key_max_concurrent"]), (2.0, "MINUTE".into()));
        assert_eq!(limit(&md["tenant_max_concurrent"]), (9.0, "MINUTE".into()));
        // USD budgets in 1/10000 USD: $12.50 a day for the key, $400 a month for the tenant.
        assert_eq!(limit(&md["key_budget_usd_day"]), (125_000.0, "DAY".into()));
        assert_eq!(
            limit(&md["tenant_budget_usd_month"]),
            (4_000_000.0, "MONTH".into())
        );
        assert!(!md.contains_key("tenant_budget_usd_day"));
        assert!(!md.contains_key("key_budget_usd_month"));
        assert!(!md.contains_key("key_tpm"));
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("ok response expected")
        };
        assert!(ok.headers_to_remove.contains(&"authorization".to_string()));
        assert!(ok.headers_to_remove.contains(&"x-api-key".to_string()));
    }

    #[test]
    fn usd_budget_above_what_envoy_can_carry_is_capped_not_wrapped() {
        let mut id = identity();
        id.policy.key_limits.budget_usd_day = Some(u64::from(u32::MAX) + 10);
        let md = identity_metadata(&id).fields;
        assert_eq!(
            limit(&md["key_budget_usd_day"]),
            (f64::from(u32::MAX), "DAY".into())
        );
    }

    #[test]
    fn token_budget_above_what_envoy_can_carry_is_capped_not_wrapped() {
        // Envoy casts requests_per_unit to a uint32: 2^32 + 10 tokens would arrive as 10.
        let mut id = identity();
        id.policy.key_limits.budget_month = Some(u64::from(u32::MAX) + 10);
        id.policy.tenant_limits.budget_day = Some(u64::MAX);
        let md = identity_metadata(&id).fields;
        assert_eq!(
            limit(&md["key_budget_month"]),
            (f64::from(u32::MAX), "MONTH".into())
        );
        assert_eq!(
            limit(&md["tenant_budget_day"]),
            (f64::from(u32::MAX), "DAY".into())
        );
    }

    #[test]
    fn a_concurrency_limit_gets_a_fresh_lease_id_per_check() {
        let mut id = identity();
        id.policy.key_limits.max_concurrent = None;
        id.policy.tenant_limits.max_concurrent = None;
        assert!(!identity_metadata(&id).fields.contains_key("lease_id"));
        id.policy.tenant_limits.max_concurrent = Some(2);
        let nonce = |id: &Identity| match &identity_metadata(id).fields["lease_id"].kind {
            Some(Kind::StringValue(s)) => s.clone(),
            other => panic!("lease_id must be a string: {other:?}"),
        };
        let (a, b) = (nonce(&id), nonce(&id));
        assert_eq!(a.len(), 32);
        assert_ne!(a, b, "one slot per request, whatever its x-request-id");
    }

    #[test]
    fn credential_replaces_client_authorization() {
        let c = credentials::Credential {
            header: "authorization".into(),
            value: "Bearer sk-up".into(),
        };
        let r = allow_response(&identity(), Some(&c));
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("ok response expected")
        };
        assert!(!ok.headers_to_remove.contains(&"authorization".to_string()));
        assert!(ok.headers.iter().any(|h| h
            .header
            .as_ref()
            .is_some_and(|h| h.key == "authorization" && h.value == "Bearer sk-up")));
    }

    #[test]
    fn deny_is_json_with_request_id_and_status() {
        let r = deny_response(INVALID_KEY, "rid-9");
        assert_eq!(r.status.unwrap().code, GRPC_UNAUTHENTICATED);
        let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
            panic!("denied response expected")
        };
        assert_eq!(d.status.unwrap().code, 401);
        let v: serde_json::Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["request_id"], "rid-9");
        let r = deny_response(STORE_UNAVAILABLE, "rid-9");
        assert_eq!(r.status.unwrap().code, GRPC_UNAVAILABLE);
        let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
            panic!("denied response expected")
        };
        let retry = d
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == "retry-after");
        assert_eq!(retry.map(|h| h.value.as_str()), Some("1"));
    }
}
