//! The one error shape every Tollgate component returns:
//! `{"error":{"type","code","message","request_id"}}`, OpenAI-style.

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub code: &'a str,
    pub message: &'a str,
    pub request_id: &'a str,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

/// The `type` field for an HTTP status, following OpenAI's error types.
pub fn error_type_for_status(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "service_unavailable",
        s if s >= 500 => "upstream_error",
        _ => "invalid_request_error",
    }
}

/// Serialises an error body. `request_id` may be empty when the caller has none.
pub fn render(status: u16, code: &str, message: &str, request_id: &str) -> String {
    let body = ErrorBody {
        error: ErrorDetail {
            kind: error_type_for_status(status),
            code,
            message,
            request_id,
        },
    };
    // Serialising a struct of strings cannot fail; the fallback keeps the shape anyway.
    serde_json::to_string(&body).unwrap_or_else(|_| {
        format!(
            r#"{{"error":{{"type":"internal_error","code":"{}","message":"","request_id":""}}}}"#,
            status
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openai_shape_with_request_id() {
        let s = render(401, "invalid_api_key", "bad \"key\"", "rid-1");
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["message"], "bad \"key\"");
        assert_eq!(v["error"]["request_id"], "rid-1");
    }

    #[test]
    fn status_maps_to_type() {
        assert_eq!(error_type_for_status(403), "permission_error");
        assert_eq!(error_type_for_status(429), "rate_limit_error");
        assert_eq!(error_type_for_status(502), "upstream_error");
        assert_eq!(error_type_for_status(503), "service_unavailable");
    }
}
