//! Owns the response side of an exchange: translated or counted chunk by chunk, model
//! listings collected and filtered to the caller's models, upstream errors of requests the
//! gateway passed through rewritten into Tollgate's shape.

use tollgate_core::model_pattern::ModelPattern;
use tollgate_core::refusal::RefusalCode;

use crate::admission::Reported;
use crate::host::{self, Host};
use crate::model_gate;
use crate::response_stream::{self, ResponseMeta, ResponseTranscoder};
use crate::translate::{upstream_error, ResponseKind, ResponsePlan};

/// Upstream error bodies are read up to this for their message; past it, a generic one.
const ERROR_BODY_MAX: usize = 64 * 1024;
/// Model listings are read up to this to be filtered; past it the listing is refused.
const LISTING_MAX: usize = 4 * 1024 * 1024;

/// What the response side was told to expect when the request was decided.
#[derive(Debug, Clone)]
pub enum Expect {
    /// Translated or counted per the plan; errors of untranslated responses rewritten.
    Plan(ResponsePlan),
    /// A model listing, filtered to the caller's models.
    Listing(ResponsePlan),
}

impl Expect {
    pub fn new(plan: ResponsePlan, listing: bool) -> Self {
        if listing {
            Expect::Listing(plan)
        } else {
            Expect::Plan(plan)
        }
    }
}

/// How the response of one exchange is handled.
pub enum Response {
    /// Forwarded untouched.
    Untouched,
    Transcode {
        transcoder: Box<ResponseTranscoder>,
        /// The stream broke: nothing half-translated follows.
        failed: bool,
        out: Vec<u8>,
    },
    /// A model listing, collected and filtered at the end.
    Listing {
        transcoder: Box<ResponseTranscoder>,
        collected: Vec<u8>,
        too_large: bool,
    },
    /// An upstream error of a request the gateway passed through: rewritten at the end.
    UpstreamError {
        status: u16,
        collected: Vec<u8>,
        request_id: String,
    },
}

impl Response {
    /// Decides from the response headers, and fixes them for what the body becomes.
    /// `request_id` is Envoy's, read with the request: Envoy does not give it to the
    /// response callbacks.
    pub fn start(host: &mut impl Host, expect: &Expect, request_id: &str) -> Self {
        let (plan, listing) = match expect {
            Expect::Plan(p) => (p, false),
            Expect::Listing(p) => (p, true),
        };
        let status = host::text(host.response_header(":status"))
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        // The gateway's own replies (a 429 from the rate limiter, …) pass through untouched.
        let from_upstream = host.property(&["response", "code_details"]).as_deref()
            == Some(b"via_upstream".as_slice());
        if !from_upstream || (plan.kind == ResponseKind::Opaque && !listing && status < 400) {
            return Response::Untouched;
        }
        let translated = !matches!(
            plan.kind,
            ResponseKind::Opaque
                | ResponseKind::OpenAiPassthrough
                | ResponseKind::OllamaPassthrough
                | ResponseKind::AnthropicPassthrough
        );
        let transcoder = || {
            let meta = ResponseMeta {
                request_id: request_id.to_owned(),
                created: host.now_secs(),
            };
            Box::new(ResponseTranscoder::new(
                plan,
                status,
                meta,
                response_stream::Limits::default(),
            ))
        };
        let response = if status >= 400 && !translated {
            Response::UpstreamError {
                status,
                collected: Vec::new(),
                request_id: request_id.to_owned(),
            }
        } else if listing && (200..300).contains(&status) {
            Response::Listing {
                transcoder: transcoder(),
                collected: Vec::new(),
                too_large: false,
            }
        } else {
            Response::Transcode {
                transcoder: transcoder(),
                failed: false,
                out: Vec::new(),
            }
        };
        let (rewrites, content_type) = match &response {
            Response::Untouched => (false, None),
            Response::Transcode { transcoder, .. } => {
                (transcoder.rewrites_body(), transcoder.content_type())
            }
            Response::Listing { .. } | Response::UpstreamError { .. } => {
                (true, Some("application/json"))
            }
        };
        if rewrites {
            host.set_response_header("content-length", None);
        }
        if let Some(ct) = content_type {
            host.set_response_header("content-type", Some(ct));
        }
        if let Response::UpstreamError { status, .. } = &response {
            // Never let a model server's auth failure read as the client's own key failing.
            if *status == 401 || *status == 403 {
                host.set_response_header(":status", Some("502"));
            }
        }
        response
    }

    /// One response body chunk: rewritten, counted or collected; at the end, flushed.
    /// `allowlist` is read only when a listing is filtered.
    pub fn on_body<H: Host>(
        &mut self,
        host: &mut H,
        size: usize,
        end_of_stream: bool,
        allowlist: impl FnOnce(&H) -> Vec<ModelPattern>,
    ) {
        if matches!(self, Response::Untouched) {
            return;
        }
        let chunk = if size > 0 {
            host.response_body(size).unwrap_or_default()
        } else {
            Vec::new()
        };
        match self {
            Response::Untouched => {}
            Response::Transcode {
                transcoder,
                failed,
                out,
            } => {
                out.clear();
                let replace = transcoder.rewrites_body();
                let mut result = transcoder.push_into(&chunk, out);
                if end_of_stream && result.is_ok() {
                    result = transcoder.finish_into(out);
                }
                if let Err(e) = result {
                    if !*failed {
                        host.log_warn(&format!("tollgate: response stream: {e}"));
                    }
                    *failed = true;
                    // Past a failure nothing half-translated reaches the client.
                    out.clear();
                }
                if replace {
                    host.set_response_body(size, out);
                }
            }
            Response::Listing {
                transcoder,
                collected,
                too_large,
            } => {
                if !*too_large {
                    let r = transcoder.push_into(&chunk, collected);
                    if r.is_err() || collected.len() > LISTING_MAX {
                        *too_large = true;
                        collected.clear();
                    }
                }
                let out = if end_of_stream {
                    if !*too_large && transcoder.finish_into(collected).is_err() {
                        *too_large = true;
                    }
                    if *too_large {
                        br#"{"object":"list","data":[]}"#.to_vec()
                    } else {
                        model_gate::filter_listing(collected, &allowlist(host))
                    }
                } else {
                    Vec::new()
                };
                host.set_response_body(size, &out);
            }
            Response::UpstreamError {
                status,
                collected,
                request_id,
            } => {
                if collected.len() < ERROR_BODY_MAX {
                    let room = ERROR_BODY_MAX - collected.len();
                    collected.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                let out = if end_of_stream {
                    if *status == 401 || *status == 403 {
                        RefusalCode::UpstreamAuthFailed.render(
                            "the model server refused the gateway's credentials",
                            request_id,
                        )
                    } else {
                        upstream_error::render(*status, Some(collected), request_id)
                    }
                } else {
                    String::new()
                };
                host.set_response_body(size, out.as_bytes());
            }
        }
    }

    /// What the model server reported, as far as the bill goes; nothing for responses
    /// that were not counted.
    pub fn reported(&self) -> Reported {
        match self {
            Response::Transcode { transcoder, .. } | Response::Listing { transcoder, .. } => {
                let u = transcoder.usage();
                Reported {
                    prompt: u.prompt,
                    completion: u.completion,
                    usage: transcoder.usage_reported(),
                    events: transcoder.stream_events(),
                }
            }
            Response::Untouched | Response::UpstreamError { .. } => Reported::default(),
        }
    }
}
