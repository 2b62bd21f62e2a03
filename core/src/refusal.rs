//! Every code Tollgate refuses a request with, and the HTTP status that goes with it: one
//! list for tollgate-authz, the filter and tollgate-ratelimit, so a code is spelt once and
//! a denial is recognised by its variant, never by comparing strings.

use core::fmt;

use crate::error_body;

/// The `code` of Tollgate's JSON error (and of the `x-tollgate-error` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    // tollgate-authz: who is calling.
    MissingApiKey,
    InvalidApiKey,
    ExpiredApiKey,
    RevokedApiKey,
    TenantDisabled,
    IpNotAllowed,
    OperationNotAllowed,
    TooManyFailedAttempts,
    AuthzUnavailable,
    AuthzOverloaded,
    CredentialUnavailable,
    // The filter: what is asked for.
    EndpointBlocked,
    InvalidPath,
    NotFound,
    MethodNotAllowed,
    RequestTooLarge,
    InvalidJson,
    InvalidRequest,
    MissingModel,
    UnsupportedEndpoint,
    UnsupportedParameter,
    ModelNotAllowed,
    ModelNotFound,
    ModelsUnavailable,
    ModelNotPriced,
    UpstreamAuthFailed,
    // tollgate-ratelimit: how much.
    RateLimited,
    TokensExhausted,
    BudgetExceeded,
    TooManyConcurrent,
}

impl RefusalCode {
    /// Every code, for tests and documentation.
    pub const ALL: [RefusalCode; 30] = [
        Self::MissingApiKey,
        Self::InvalidApiKey,
        Self::ExpiredApiKey,
        Self::RevokedApiKey,
        Self::TenantDisabled,
        Self::IpNotAllowed,
        Self::OperationNotAllowed,
        Self::TooManyFailedAttempts,
        Self::AuthzUnavailable,
        Self::AuthzOverloaded,
        Self::CredentialUnavailable,
        Self::EndpointBlocked,
        Self::InvalidPath,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::RequestTooLarge,
        Self::InvalidJson,
        Self::InvalidRequest,
        Self::MissingModel,
        Self::UnsupportedEndpoint,
        Self::UnsupportedParameter,
        Self::ModelNotAllowed,
        Self::ModelNotFound,
        Self::ModelsUnavailable,
        Self::ModelNotPriced,
        Self::UpstreamAuthFailed,
        Self::RateLimited,
        Self::TokensExhausted,
        Self::BudgetExceeded,
        Self::TooManyConcurrent,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MissingApiKey => "missing_api_key",
            Self::InvalidApiKey => "invalid_api_key",
            Self::ExpiredApiKey => "expired_api_key",
            Self::RevokedApiKey => "revoked_api_key",
            Self::TenantDisabled => "tenant_disabled",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::OperationNotAllowed => "operation_not_allowed",
            Self::TooManyFailedAttempts => "too_many_failed_attempts",
            Self::AuthzUnavailable => "authz_unavailable",
            Self::AuthzOverloaded => "authz_overloaded",
            Self::CredentialUnavailable => "credential_unavailable",
            Self::EndpointBlocked => "endpoint_blocked",
            Self::InvalidPath => "invalid_path",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RequestTooLarge => "request_too_large",
            Self::InvalidJson => "invalid_json",
            Self::InvalidRequest => "invalid_request",
            Self::MissingModel => "missing_model",
            Self::UnsupportedEndpoint => "unsupported_endpoint",
            Self::UnsupportedParameter => "unsupported_parameter",
            Self::ModelNotAllowed => "model_not_allowed",
            Self::ModelNotFound => "model_not_found",
            Self::ModelsUnavailable => "models_unavailable",
            Self::ModelNotPriced => "model_not_priced",
            Self::UpstreamAuthFailed => "upstream_auth_failed",
            Self::RateLimited => "rate_limited",
            Self::TokensExhausted => "tokens_exhausted",
            Self::BudgetExceeded => "budget_exceeded",
            Self::TooManyConcurrent => "too_many_concurrent",
        }
    }

    /// The HTTP status the client sees with this code.
    pub const fn status(self) -> u16 {
        match self {
            Self::MissingApiKey
            | Self::InvalidApiKey
            | Self::ExpiredApiKey
            | Self::RevokedApiKey => 401,
            Self::TenantDisabled
            | Self::IpNotAllowed
            | Self::OperationNotAllowed
            | Self::EndpointBlocked
            | Self::ModelNotAllowed
            | Self::ModelNotPriced => 403,
            Self::InvalidPath
            | Self::InvalidJson
            | Self::InvalidRequest
            | Self::MissingModel
            | Self::UnsupportedParameter => 400,
            Self::NotFound | Self::UnsupportedEndpoint | Self::ModelNotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTooLarge => 413,
            Self::TooManyFailedAttempts
            | Self::RateLimited
            | Self::TokensExhausted
            | Self::BudgetExceeded
            | Self::TooManyConcurrent => 429,
            // The gateway's own credential was refused upstream: not the client's fault.
            Self::UpstreamAuthFailed => 502,
            Self::AuthzUnavailable
            | Self::AuthzOverloaded
            | Self::CredentialUnavailable
            | Self::ModelsUnavailable => 503,
        }
    }

    /// The code named by `s` (an `x-tollgate-error` header, a logged code).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Tollgate's JSON error for this code, with its status's `type`.
    pub fn render(self, message: &str, request_id: &str) -> String {
        error_body::render(self.status(), self.as_str(), message, request_id)
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal whose message is fixed. Messages never contain key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: &'static str,
}

impl Refusal {
    pub const fn new(code: RefusalCode, message: &'static str) -> Self {
        Self { code, message }
    }

    pub const fn status(self) -> u16 {
        self.code.status()
    }

    /// Tollgate's JSON error for this refusal.
    pub fn render(self, request_id: &str) -> String {
        self.code.render(self.message, request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_spelt_once_and_parses_back() {
        for (i, c) in RefusalCode::ALL.iter().enumerate() {
            assert_eq!(RefusalCode::parse(c.as_str()), Some(*c));
            assert!(RefusalCode::ALL[i + 1..]
                .iter()
                .all(|o| o.as_str() != c.as_str()));
        }
        assert_eq!(RefusalCode::parse("no_such_code"), None);
    }

    #[test]
    fn codes_keep_the_statuses_clients_already_see() {
        use RefusalCode::*;
        let expected = [
            (InvalidApiKey, "invalid_api_key", 401),
            (ModelNotAllowed, "model_not_allowed", 403),
            (OperationNotAllowed, "operation_not_allowed", 403),
            (MethodNotAllowed, "method_not_allowed", 405),
            (UnsupportedEndpoint, "unsupported_endpoint", 404),
            (RequestTooLarge, "request_too_large", 413),
            (TokensExhausted, "tokens_exhausted", 429),
            (BudgetExceeded, "budget_exceeded", 429),
            (TooManyConcurrent, "too_many_concurrent", 429),
            (UpstreamAuthFailed, "upstream_auth_failed", 502),
            (AuthzUnavailable, "authz_unavailable", 503),
            (AuthzOverloaded, "authz_overloaded", 503),
        ];
        for (code, text, status) in expected {
            assert_eq!((code.as_str(), code.status()), (text, status));
        }
    }

    #[test]
    fn a_refusal_renders_tollgates_error_body() {
        let r = Refusal::new(RefusalCode::ModelNotFound, "not here");
        let v: serde_json::Value = serde_json::from_str(&r.render("rid-7")).unwrap();
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["message"], "not here");
        assert_eq!(v["error"]["request_id"], "rid-7");
    }
}
