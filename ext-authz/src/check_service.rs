//! The ext_authz v3 gRPC service: turns a decision into Envoy's CheckResponse.

use crate::decision::{Authorizer, Denial, Identity, Outcome};
use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc;
use std::collections::HashMap;
use tollgate_core::{error_body, metadata};
use tonic::{Request, Response, Status};

/// gRPC codes Envoy reads from `CheckResponse.status`.
const GRPC_OK: i32 = 0;
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_UNAUTHENTICATED: i32 = 16;
const GRPC_UNAVAILABLE: i32 = 14;

#[derive(Debug, Clone)]
pub struct CheckService {
    authorizer: Authorizer,
}

impl CheckService {
    pub fn new(authorizer: Authorizer) -> Self {
        Self { authorizer }
    }
}

fn header(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.to_string(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// Dynamic metadata for the filter and the rate limiter. Descriptor values must be
/// strings; the RPM override must be the `{requests_per_unit, unit}` struct Envoy expects.
pub fn identity_metadata(id: &Identity) -> Struct {
    let mut fields = HashMap::new();
    fields.insert(metadata::KEY_ID.to_string(), string_value(&id.key_id));
    fields.insert(metadata::TENANT_ID.to_string(), string_value(&id.tenant_id));
    if let Some(rpm) = id.rpm {
        let mut limit = HashMap::new();
        limit.insert(
            "requests_per_unit".to_string(),
            Value {
                kind: Some(Kind::NumberValue(f64::from(rpm))),
            },
        );
        limit.insert("unit".to_string(), string_value("MINUTE"));
        fields.insert(
            metadata::RPM_OVERRIDE.to_string(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields: limit })),
            },
        );
    }
    Struct { fields }
}

pub fn allow_response(id: &Identity) -> CheckResponse {
    use HeaderAppendAction::OverwriteIfExistsOrAdd as Overwrite;
    CheckResponse {
        status: Some(rpc::Status {
            code: GRPC_OK,
            ..Default::default()
        }),
        // Overwrite replaces any copy the client sent, so these cannot be spoofed.
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![
                header(metadata::HEADER_TENANT, &id.tenant_id, Overwrite),
                header(metadata::HEADER_KEY_ID, &id.key_id, Overwrite),
            ],
            headers_to_remove: vec!["authorization".into(), "x-api-key".into()],
            ..Default::default()
        })),
        dynamic_metadata: Some(identity_metadata(id)),
    }
}

pub fn deny_response(denial: Denial, request_id: &str) -> CheckResponse {
    use HeaderAppendAction::OverwriteIfExistsOrAdd as Overwrite;
    let code = match denial.status {
        401 => GRPC_UNAUTHENTICATED,
        503 => GRPC_UNAVAILABLE,
        _ => GRPC_PERMISSION_DENIED,
    };
    let mut headers = vec![
        header("content-type", "application/json", Overwrite),
        header("x-request-id", request_id, Overwrite),
    ];
    if denial.status == 401 {
        headers.push(header("www-authenticate", "Bearer", Overwrite));
    }
    CheckResponse {
        status: Some(rpc::Status {
            code,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(denial.status),
            }),
            headers,
            body: error_body::render(denial.status, denial.code, denial.message, request_id),
        })),
        dynamic_metadata: None,
    }
}

fn request_id(req: &CheckRequest) -> String {
    let http = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    http.and_then(|h| h.headers.get("x-request-id").cloned())
        .or_else(|| http.map(|h| h.id.clone()))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl Authorization for CheckService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let req = request.into_inner();
        let rid = request_id(&req);
        let empty = HashMap::new();
        let headers = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map(|h| &h.headers)
            .unwrap_or(&empty);
        let response = match self.authorizer.authorize(headers).await {
            Outcome::Allow(id) => {
                tracing::debug!(request_id = %rid, key_id = %id.key_id, "allow");
                allow_response(&id)
            }
            Outcome::Deny(d) => {
                tracing::info!(request_id = %rid, code = d.code, status = d.status, "deny");
                deny_response(d, &rid)
            }
        };
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{INVALID_KEY, STORE_UNAVAILABLE};

    #[test]
    fn allow_carries_string_metadata_and_rpm_struct() {
        let id = Identity {
            key_id: "key_1".into(),
            tenant_id: "ten_1".into(),
            rpm: Some(3),
        };
        let r = allow_response(&id);
        assert_eq!(r.status.unwrap().code, GRPC_OK);
        let md = r.dynamic_metadata.unwrap().fields;
        assert_eq!(md["key_id"].kind, Some(Kind::StringValue("key_1".into())));
        assert_eq!(
            md["tenant_id"].kind,
            Some(Kind::StringValue("ten_1".into()))
        );
        let Some(Kind::StructValue(limit)) = &md["rpm_override"].kind else {
            panic!("rpm_override must be a struct")
        };
        assert_eq!(
            limit.fields["requests_per_unit"].kind,
            Some(Kind::NumberValue(3.0))
        );
        assert_eq!(
            limit.fields["unit"].kind,
            Some(Kind::StringValue("MINUTE".into()))
        );
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("ok response expected")
        };
        assert!(ok.headers_to_remove.contains(&"authorization".to_string()));
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
    }
}
