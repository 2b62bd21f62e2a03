//! Owns what the filter does per request, written against a small [`Host`] trait so it runs
//! natively under a fake host in tests; the proxy-wasm glue implements the trait with hostcalls.

use tollgate_core::error_body;

use crate::config::Config;
use crate::path_guard::{decide, Decision, InvalidPath};

/// The host calls the filter logic needs. Reads return `None` when the value is missing or the
/// host refused the call: the logic decides what that means, never a panic.
pub trait Host {
    /// A request header's raw value (`:path`, …).
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// An Envoy attribute such as `["request", "id"]`.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Ends the stream with a locally generated response.
    fn send_local_reply(&mut self, status: u16, headers: &[(&str, &str)], body: &str);
}

/// What the host should do with the stream after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// The filter sent a local reply (or waits for something); do not forward.
    Pause,
}

pub const BLOCKED_MESSAGE: &str = "this endpoint is disabled on this gateway";

/// Request headers phase: block the model server's mutating endpoints, reject unreadable paths.
/// The HTTP method is not consulted: a blocked endpoint is blocked for every method.
pub fn on_request_headers(host: &mut impl Host, config: &Config) -> Action {
    // A request without a `:path` (plain CONNECT) has nothing to route on here; refuse it
    // rather than guess, since this gateway only serves HTTP APIs.
    let decision = match host.request_header(":path").map(String::from_utf8) {
        Some(Ok(path)) => decide(&path, &config.blocklist),
        Some(Err(_)) => Decision::Invalid(InvalidPath::NotUtf8),
        None => Decision::Invalid(InvalidPath::NotOriginForm),
    };
    match decision {
        Decision::Allow => Action::Continue,
        Decision::Block => {
            send_error(host, 403, "endpoint_blocked", BLOCKED_MESSAGE);
            Action::Pause
        }
        Decision::Invalid(why) => {
            send_error(host, 400, "invalid_path", &why.to_string());
            Action::Pause
        }
    }
}

/// Sends Tollgate's JSON error, echoing Envoy's request id in the body and `x-request-id`.
fn send_error(host: &mut impl Host, status: u16, code: &str, message: &str) {
    let request_id = host
        .property(&["request", "id"])
        .map(|id| String::from_utf8_lossy(&id).into_owned())
        .unwrap_or_default();
    let body = error_body::render(status, code, message, &request_id);
    // The error code header is what the audit log records as the reason.
    let mut headers = vec![
        ("content-type", "application/json"),
        (tollgate_core::metadata::HEADER_ERROR, code),
    ];
    if !request_id.is_empty() {
        headers.push(("x-request-id", request_id.as_str()));
    }
    host.send_local_reply(status, &headers, &body);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    struct FakeHost {
        headers: Vec<(String, Vec<u8>)>,
        request_id: Option<String>,
        reply: Option<Reply>,
    }

    impl FakeHost {
        fn request(method: &str, path: &str) -> Self {
            FakeHost {
                headers: vec![
                    (":method".into(), method.into()),
                    (":path".into(), path.into()),
                ],
                request_id: Some("rid-42".into()),
                reply: None,
            }
        }

        fn reply_json(&self) -> serde_json::Value {
            serde_json::from_str(&self.reply.as_ref().unwrap().body).unwrap()
        }

        fn reply_header(&self, name: &str) -> Option<&str> {
            self.reply
                .as_ref()
                .unwrap()
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    impl Host for FakeHost {
        fn request_header(&self, name: &str) -> Option<Vec<u8>> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        }

        fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
            match path {
                ["request", "id"] => self.request_id.clone().map(String::into_bytes),
                _ => None,
            }
        }

        fn send_local_reply(&mut self, status: u16, headers: &[(&str, &str)], body: &str) {
            assert!(self.reply.is_none(), "a second local reply was sent");
            let headers = headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
            self.reply = Some(Reply {
                status,
                headers,
                body: body.to_owned(),
            });
        }
    }

    #[test]
    fn blocked_endpoint_gets_403_json_with_request_id_and_pauses() {
        let mut host = FakeHost::request("POST", "/api/pull");
        let action = on_request_headers(&mut host, &Config::default());
        assert_eq!(action, Action::Pause);
        assert_eq!(host.reply.as_ref().unwrap().status, 403);
        assert_eq!(host.reply_header("content-type"), Some("application/json"));
        assert_eq!(host.reply_header("x-request-id"), Some("rid-42"));
        assert_eq!(
            host.reply_header("x-tollgate-error"),
            Some("endpoint_blocked")
        );
        let body = host.reply_json();
        assert_eq!(body["error"]["type"], "permission_error");
        assert_eq!(body["error"]["code"], "endpoint_blocked");
        assert_eq!(body["error"]["message"], BLOCKED_MESSAGE);
        assert_eq!(body["error"]["request_id"], "rid-42");
    }

    #[test]
    fn blocked_endpoint_is_blocked_for_every_method() {
        for method in [
            "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO",
        ] {
            let mut host = FakeHost::request(method, "/api/blobs/sha256:abc");
            assert_eq!(
                on_request_headers(&mut host, &Config::default()),
                Action::Pause
            );
            assert_eq!(host.reply.as_ref().unwrap().status, 403, "{method}");
        }
    }

    #[test]
    fn invalid_path_gets_400_invalid_path() {
        let mut host = FakeHost::request("POST", "/api/pull%00");
        assert_eq!(
            on_request_headers(&mut host, &Config::default()),
            Action::Pause
        );
        assert_eq!(host.reply.as_ref().unwrap().status, 400);
        let body = host.reply_json();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_path");
        assert_eq!(body["error"]["request_id"], "rid-42");
    }

    #[test]
    fn path_that_is_not_utf8_gets_400() {
        let mut host = FakeHost::request("GET", "/");
        host.headers[1].1 = b"/api/\xffpull".to_vec();
        assert_eq!(
            on_request_headers(&mut host, &Config::default()),
            Action::Pause
        );
        assert_eq!(host.reply.as_ref().unwrap().status, 400);
    }

    #[test]
    fn request_without_path_gets_400() {
        let mut host = FakeHost::request("CONNECT", "/");
        host.headers.truncate(1);
        assert_eq!(
            on_request_headers(&mut host, &Config::default()),
            Action::Pause
        );
        assert_eq!(host.reply.as_ref().unwrap().status, 400);
    }

    #[test]
    fn allowed_path_continues_without_reply() {
        let mut host = FakeHost::request("POST", "/v1/chat/completions");
        assert_eq!(
            on_request_headers(&mut host, &Config::default()),
            Action::Continue
        );
        assert!(host.reply.is_none());
    }

    #[test]
    fn missing_request_id_gives_empty_id_and_no_header() {
        let mut host = FakeHost::request("POST", "/api/delete");
        host.request_id = None;
        on_request_headers(&mut host, &Config::default());
        assert_eq!(host.reply_header("x-request-id"), None);
        assert_eq!(host.reply_json()["error"]["request_id"], "");
    }
}
