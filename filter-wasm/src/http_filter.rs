//! Owns what the filter does per request, written against a small [`Host`] trait so it runs
//! natively under a fake host in tests; the proxy-wasm glue implements the trait with hostcalls.
//!
//! Request: block management endpoints on the normalised path; plan the translation from the
//! path; read the JSON body once (capped), translate it, check the model against the key's
//! allowlist (from tollgate-authz's metadata) and the served set, rewrite path and body.
//! Response: translate or count chunk by chunk without holding complete lines back, filter
//! model listings to the caller's models, turn upstream errors into Tollgate's error shape.
//! Log: publish the counted tokens and the model as filter state for the rate limiter's
//! stream-done debit and the access log.

use tollgate_core::usd::Price;
use tollgate_core::{error_body, metadata};

use crate::config::Config;
use crate::discovery::Served;
use crate::model_gate;
use crate::path_guard::{decide, Decision, InvalidPath};
use crate::request_head::{self, RequestHead, COUNT_MAX};
use crate::routing::{self, Routing};
use crate::transcoder::{self, ResponseMeta, ResponseTranscoder};
use crate::translate::{
    plan_request, upstream_error, RequestError, RequestPlan, ResponseKind, ResponsePlan, Upstream,
};

/// The host calls the filter logic needs. Reads return `None` when the value is missing or the
/// host refused the call: the logic decides what that means, never a panic.
pub trait Host {
    /// A request header's raw value (`:path`, …).
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// Sets (or with `None` removes) a request header. Only while request headers are held.
    fn set_request_header(&mut self, name: &str, value: Option<&str>);
    /// An Envoy attribute such as `["request", "id"]`.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Sets filter state `wasm.<name>`.
    fn set_property(&mut self, name: &str, value: &str);
    /// Ends the stream with a locally generated response.
    fn send_local_reply(&mut self, status: u16, headers: &[(&str, &str)], body: &str);
    /// The buffered request body, bytes `0..size`.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replaces the buffered request body (`size` bytes) with `body`.
    fn set_request_body(&mut self, size: usize, body: &[u8]);
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    fn set_response_header(&mut self, name: &str, value: Option<&str>);
    /// The current response body chunk (`size` bytes).
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replaces the current response body chunk with `body`.
    fn set_response_body(&mut self, size: usize, body: &[u8]);
    /// Unix seconds.
    fn now_secs(&self) -> u64;
    fn log_warn(&self, message: &str);
}

/// What the host should do with the stream after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// The filter sent a local reply, or waits for more body; do not forward yet.
    Pause,
}

pub const BLOCKED_MESSAGE: &str = "this endpoint is disabled on this gateway";
/// Upstream error bodies are read up to this for their message; past it, a generic one.
const ERROR_BODY_MAX: usize = 64 * 1024;
/// An opted-in tenant's request body is logged up to this.
const PROMPT_LOG_MAX: usize = 16 * 1024;
/// Model listings are read up to this to be filtered; past it the listing is refused.
const LISTING_MAX: usize = 4 * 1024 * 1024;

/// Events of a stream that carry no generated token (role, block starts and stops, finish,
/// usage, `[DONE]`, Anthropic's pings): a cut stream is charged for its events beyond these.
const STREAM_EVENTS_WITHOUT_TOKENS: u64 = 16;

/// How the response of one request is handled.
enum Response {
    /// Forwarded untouched.
    Untouched,
    Transcode(Box<ResponseTranscoder>),
    /// A model listing, collected and filtered to the caller's models at the end.
    Listing {
        transcoder: Box<ResponseTranscoder>,
        collected: Vec<u8>,
        too_large: bool,
    },
    /// An upstream error of a request the gateway passed through: rewritten at the end.
    UpstreamError {
        status: u16,
        collected: Vec<u8>,
    },
}

/// Per-request state.
pub struct Stream {
    plan: Option<RequestPlan>,
    response_plan: Option<ResponsePlan>,
    listing: bool,
    response: Response,
    out: Vec<u8>,
    received: usize,
    failed: bool,
    /// Tokens reserved at admission; `Some` only for requests that name a model.
    reserved: Option<u64>,
    /// The model's price and the cost reserved at admission (usd units); `Some` only for
    /// requests whose model has a price.
    cost_reserved: Option<(Price, u64)>,
    /// The request path, kept while a routed request's body is read.
    routed_path: Option<String>,
    /// Headers were held for a body whose end has not been seen yet.
    awaiting_body: bool,
    /// An `/api/show` whose body's model is checked before it is forwarded.
    details: bool,
}

/// How the model of a request was already checked when the request is finished.
enum Gate<'a> {
    /// One model server: allowlist and its served set are checked on the translated model.
    Single(Option<&'a crate::discovery::ModelSet>),
    /// Routed: checked against the routing table; the model after alias resolution, and
    /// whether the body passed on is the client's with the model renamed.
    Routed { target: &'a str, renamed: bool },
}

impl Default for Stream {
    fn default() -> Self {
        Stream {
            plan: None,
            response_plan: None,
            listing: false,
            response: Response::Untouched,
            out: Vec::new(),
            received: 0,
            failed: false,
            reserved: None,
            cost_reserved: None,
            routed_path: None,
            awaiting_body: false,
            details: false,
        }
    }
}

fn header_text(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.and_then(|b| String::from_utf8(b).ok())
}

/// A value tollgate-authz put in the dynamic metadata for this request.
fn authz_metadata(host: &impl Host, key: &str) -> Option<Vec<u8>> {
    host.property(&[
        "metadata",
        "filter_metadata",
        metadata::AUTHZ_NAMESPACE,
        key,
    ])
}

/// Whether tollgate-authz gave the key or its tenant a USD budget.
fn has_usd_budget(host: &impl Host) -> bool {
    metadata::USD_BUDGETS
        .iter()
        .any(|name| authz_metadata(host, name).is_some())
}

/// The key's model allowlist; missing metadata allows nothing.
fn key_allowlist(host: &impl Host) -> Vec<tollgate_core::model_pattern::ModelPattern> {
    model_gate::allowlist(header_text(authz_metadata(host, metadata::MODELS)).as_deref())
}

/// Whether the caller may only use endpoints the filter reads and counts: a model allowlist
/// other than `*`, or any token or USD limit. Read only for paths the filter cannot check,
/// so the hot path pays nothing for it.
fn caller_is_restricted(host: &impl Host) -> bool {
    let every_model = header_text(authz_metadata(host, metadata::MODELS))
        .is_some_and(|m| m.split(',').any(|p| p.trim() == "*"));
    !every_model
        || metadata::TOKEN_LIMITS
            .iter()
            .chain(metadata::USD_BUDGETS.iter())
            .any(|name| authz_metadata(host, name).is_some())
}

/// Methods the endpoints the filter reads take; `None` for paths it does not read, where
/// the caller's policy decides. A hosted provider acts on other methods of the same paths
/// (`DELETE /v1/models/{id}` deletes a fine-tune, `GET /v1/chat/completions` lists stored
/// completions) with the gateway's credential, so they are refused.
fn methods_for(path: &str, reads_body: bool) -> Option<&'static [&'static str]> {
    const POST: &[&str] = &["POST"];
    const READ: &[&str] = &["GET", "HEAD"];
    if reads_body || is_model_details(path) {
        Some(POST)
    } else if is_listing(path)
        || is_running_listing(path)
        || bare_path(path) == "/api/version"
        || retrieved_model(path).is_some()
    {
        Some(READ)
    } else {
        None
    }
}

fn request_id(host: &impl Host) -> String {
    host.property(&["request", "id"])
        .map(|id| String::from_utf8_lossy(&id).into_owned())
        .unwrap_or_default()
}

/// Sends Tollgate's JSON error, echoing Envoy's request id in the body and `x-request-id`.
fn send_error(host: &mut impl Host, status: u16, code: &str, message: &str) {
    let request_id = request_id(host);
    let body = error_body::render(status, code, message, &request_id);
    // The error code header is what the audit log records as the reason.
    let mut headers = vec![
        ("content-type", "application/json"),
        (metadata::HEADER_ERROR, code),
    ];
    if !request_id.is_empty() {
        headers.push(("x-request-id", request_id.as_str()));
    }
    host.send_local_reply(status, &headers, &body);
}

fn bare_path(path: &str) -> &str {
    path.split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
}

fn is_listing(path: &str) -> bool {
    matches!(bare_path(path), "/v1/models" | "/api/tags")
}

/// Ollama's list of loaded models: the same shape as `/api/tags`, filtered the same way.
fn is_running_listing(path: &str) -> bool {
    bare_path(path) == "/api/ps"
}

/// Ollama's model details (Modelfile, system prompt, template): its body names the model.
fn is_model_details(path: &str) -> bool {
    bare_path(path) == "/api/show"
}

/// The model a `GET /v1/models/{id}` asks about, percent-decoded as servers route on it;
/// `Some(None)` when it does not decode.
fn retrieved_model(path: &str) -> Option<Option<String>> {
    let id = bare_path(path).strip_prefix("/v1/models/")?;
    let mut out = Vec::with_capacity(id.len());
    let mut bytes = id.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex = [bytes.next(), bytes.next()];
        let digit = |d: Option<u8>| char::from(d?).to_digit(16);
        match (digit(hex[0]), digit(hex[1])) {
            (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
            _ => return Some(None),
        }
    }
    // A dot segment would let a server that resolves it reach another model than the one
    // checked (`qwen2%2F..%2Fllama3`); no model id needs one.
    let id = String::from_utf8(out)
        .ok()
        .filter(|id| !id.split('/').any(|seg| seg == "." || seg == ".."));
    Some(id)
}

impl Stream {
    /// Request headers: block, plan, and hold the headers while the body is read.
    pub fn on_request_headers(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        end_of_stream: bool,
        served: &Served,
    ) -> Action {
        // A request without a `:path` (plain CONNECT) has nothing to route on here; refuse it
        // rather than guess, since this gateway only serves HTTP APIs.
        let path = match host.request_header(":path").map(String::from_utf8) {
            Some(Ok(path)) => path,
            Some(Err(_)) => return self.refuse_path(host, InvalidPath::NotUtf8),
            None => return self.refuse_path(host, InvalidPath::NotOriginForm),
        };
        match decide(&path, &config.blocklist) {
            Decision::Allow => {}
            Decision::Block => {
                send_error(host, 403, "endpoint_blocked", BLOCKED_MESSAGE);
                return Action::Pause;
            }
            Decision::Invalid(why) => return self.refuse_path(host, why),
        }
        // Envoy strips a client's copy at the edge; removing it here too means a config
        // without that edge rule still never lets the client pick a backend.
        host.set_request_header(metadata::HEADER_BACKEND, None);
        // Under routing the backend's API is only known from the model, so a path's body is
        // read when any API reads it.
        let plan = match &config.routing {
            Some(_) => None,
            None => {
                let route = header_text(host.property(&["xds", "route_name"]));
                match plan_request(config.upstream_for(route.as_deref()), &path) {
                    Ok(p) => Some(p),
                    Err(e) => return self.fail_request(host, &e),
                }
            }
        };
        let reads_body = match &plan {
            Some(p) => p.reads_body,
            None => [Upstream::OpenAi, Upstream::Ollama, Upstream::Anthropic]
                .into_iter()
                .any(|u| plan_request(u, &path).is_ok_and(|p| p.reads_body)),
        };
        if let Some(refused) = self.check_method(host, &path, reads_body) {
            return refused;
        }
        // Details of one model: only of a model the key may use, else as if it did not exist.
        if let Some(id) = retrieved_model(&path) {
            let Some(id) = id else {
                return self.refuse_path(host, InvalidPath::BadPercentEscape);
            };
            let allow = key_allowlist(host);
            let usable = match &config.routing {
                Some(routing) => routing.check(&id, &allow, served).is_ok(),
                None => {
                    let on = config.discovery.is_some();
                    model_gate::check(&id, &allow, served.single(), on).is_ok()
                }
            };
            if !usable {
                let r = model_gate::MODEL_NOT_FOUND;
                send_error(host, r.status, r.code, r.message);
                return Action::Pause;
            }
            if config.routing.is_some() {
                // The default backend may not be the one serving it: answered here.
                let body = model_body(&id, host.now_secs());
                host.send_local_reply(200, &[("content-type", "application/json")], &body);
                return Action::Pause;
            }
        }
        if is_model_details(&path) {
            self.details = true;
            // Not counted; kept so an upstream error is rewritten like any other.
            self.response_plan = Some(ResponsePlan::new(ResponseKind::Opaque));
            if end_of_stream {
                return self.finish_details(host, config, &[], None, served);
            }
            self.awaiting_body = true;
            return Action::Pause;
        }
        let Some(plan) = plan else {
            let Some(routing) = &config.routing else {
                return Action::Continue;
            };
            if !reads_body {
                return self.routed_headers(host, config, routing, path, served);
            }
            // Held until the body names the model, which picks the backend.
            host.set_request_header("accept-encoding", None);
            self.routed_path = Some(path);
            if end_of_stream {
                return self.finish_routed(host, config, routing, &[], None, served);
            }
            self.awaiting_body = true;
            return Action::Pause;
        };
        if plan.is_opaque() && !self.may_pass_unread(host, &path) {
            return Action::Pause;
        }
        self.listing = is_listing(&path) || is_running_listing(&path);
        let counts = plan.reads_body;
        if counts || self.listing {
            // The response is parsed: it must arrive uncompressed.
            host.set_request_header("accept-encoding", None);
        }
        if plan.reads_body && !end_of_stream {
            self.plan = Some(plan);
            self.awaiting_body = true;
            return Action::Pause;
        }
        // No body to read (model listings, opaque paths, or a body-less request).
        self.plan = Some(plan);
        self.finish_request(host, config, &[], None, Gate::Single(served.single()), None)
    }

    /// Refuses a method the path's endpoint does not take (405).
    fn check_method(
        &mut self,
        host: &mut impl Host,
        path: &str,
        reads_body: bool,
    ) -> Option<Action> {
        let allowed = methods_for(path, reads_body)?;
        let method = header_text(host.request_header(":method")).unwrap_or_default();
        if allowed.contains(&method.as_str()) {
            return None;
        }
        let message = format!(
            "{} does not take this method; use {}",
            bare_path(path),
            allowed.join(" or ")
        );
        Some(self.fail(host, 405, "method_not_allowed", &message))
    }

    /// A path the filter does not read passes only for a caller without a model allowlist,
    /// token or USD limits: for anyone else it would reach the model server unchecked and
    /// uncounted. Sends the refusal and returns `false` otherwise.
    fn may_pass_unread(&mut self, host: &mut impl Host, path: &str) -> bool {
        if methods_for(path, false).is_some() || !caller_is_restricted(host) {
            return true;
        }
        self.fail(
            host,
            403,
            "operation_not_allowed",
            "this endpoint is not checked or metered by the gateway, and this key has a \
             model allowlist or token limits",
        );
        false
    }

    /// Request headers under routing of a path without a body to read: answer listings from
    /// discovery, send the rest to the default backend.
    fn routed_headers(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        routing: &Routing,
        path: String,
        served: &Served,
    ) -> Action {
        if is_listing(&path) {
            let names = routing.visible_models(&key_allowlist(host), served);
            let body = listing_body(&path, &names, host.now_secs());
            host.send_local_reply(200, &[("content-type", "application/json")], &body);
            return Action::Pause;
        }
        let Some(backend) = routing.default_backend.as_deref() else {
            send_error(
                host,
                routing::NO_ROUTE.status,
                routing::NO_ROUTE.code,
                routing::NO_ROUTE.message,
            );
            return Action::Pause;
        };
        let upstream = routing
            .backends
            .get(backend)
            .map_or(Upstream::OpenAi, |b| b.upstream);
        match plan_request(upstream, &path) {
            Ok(plan) => {
                if plan.is_opaque() && !self.may_pass_unread(host, &path) {
                    return Action::Pause;
                }
                host.set_request_header(metadata::HEADER_BACKEND, Some(backend));
                if is_running_listing(&path) {
                    // Filtered to the caller's models like any listing.
                    host.set_request_header("accept-encoding", None);
                    self.listing = true;
                }
                // Kept for listings and to turn upstream errors into Tollgate's shape.
                self.response_plan = plan
                    .translate_body(&[], &config.request_options)
                    .ok()
                    .map(|t| t.response);
                self.plan = Some(plan);
                Action::Continue
            }
            Err(e) => {
                send_error(host, e.status(), e.code(), &e.to_string());
                Action::Pause
            }
        }
    }

    /// A routed request's body: resolve the model to a backend, check it, name the backend
    /// for Envoy's routes, and translate for that backend's API.
    fn finish_routed(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        routing: &Routing,
        body: &[u8],
        body_size: Option<usize>,
        served: &Served,
    ) -> Action {
        let path = self.routed_path.take().unwrap_or_default();
        let head = match RequestHead::parse(body) {
            Ok(h) => h,
            Err(e) => return self.fail_request(host, &e),
        };
        let model = match head.model() {
            Ok(m) => m,
            Err(e) => return self.fail_request(host, &e),
        };
        let resolved = match routing.check(model, &key_allowlist(host), served) {
            Ok(r) => r,
            Err(r) => return self.fail(host, r.status, r.code, r.message),
        };
        let plan = match plan_request(resolved.upstream, &path) {
            // A native API the backend does not speak (Ollama's `/api/chat` to an OpenAI
            // backend) would only reach the model server as an opaque, uncounted request.
            Ok(p) if !p.reads_body || foreign_native(&path, resolved.upstream) => {
                let e = RequestError::UnsupportedEndpoint {
                    path: path.split(['?', '#']).next().unwrap_or("").to_owned(),
                    upstream: resolved.upstream,
                };
                return self.fail_request(host, &e);
            }
            Ok(p) => p,
            Err(e) => return self.fail_request(host, &e),
        };
        host.set_request_header(metadata::HEADER_BACKEND, Some(resolved.backend));
        self.plan = Some(plan);
        if resolved.upstream_model == model {
            let gate = Gate::Routed {
                target: resolved.target,
                renamed: false,
            };
            return self.finish_request(host, config, body, body_size, gate, Some(&head));
        }
        let Some(renamed) = request_head::with_model(body, resolved.upstream_model) else {
            return self.fail(
                host,
                400,
                "invalid_request",
                "the body must be a JSON object",
            );
        };
        let gate = Gate::Routed {
            target: resolved.target,
            renamed: true,
        };
        self.finish_request(host, config, &renamed, body_size, gate, Some(&head))
    }

    fn fail_request(&mut self, host: &mut impl Host, e: &RequestError) -> Action {
        self.fail(host, e.status(), e.code(), &e.to_string())
    }

    fn fail(&mut self, host: &mut impl Host, status: u16, code: &str, message: &str) -> Action {
        self.failed = true;
        send_error(host, status, code, message);
        Action::Pause
    }

    fn refuse_path(&mut self, host: &mut impl Host, why: InvalidPath) -> Action {
        send_error(host, 400, "invalid_path", &why.to_string());
        Action::Pause
    }

    /// Request body: wait for all of it (capped), then check and translate it as the
    /// headers phase planned (`/api/show`, a routed request, or one model server).
    pub fn on_request_body(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        size: usize,
        end_of_stream: bool,
        served: &Served,
    ) -> Action {
        if self.failed {
            return Action::Pause;
        }
        if end_of_stream {
            self.awaiting_body = false;
        }
        let routing = config
            .routing
            .as_ref()
            .filter(|_| self.routed_path.is_some());
        let reads =
            self.details || routing.is_some() || self.plan.as_ref().is_some_and(|p| p.reads_body);
        if !reads {
            return Action::Continue;
        }
        self.received = size;
        if size > config.max_body_bytes {
            return self.fail(
                host,
                413,
                "request_too_large",
                "the request body is too large",
            );
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host.request_body(size).unwrap_or_default();
        if self.details {
            return self.finish_details(host, config, &body, Some(size), served);
        }
        if let Some(routing) = routing {
            return self.finish_routed(host, config, routing, &body, Some(size), served);
        }
        self.finish_request(
            host,
            config,
            &body,
            Some(size),
            Gate::Single(served.single()),
            None,
        )
    }

    /// An `/api/show` body: forwarded only for a model the key may use; under routing, to
    /// the backend serving it, under its upstream name.
    fn finish_details(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        body: &[u8],
        body_size: Option<usize>,
        served: &Served,
    ) -> Action {
        #[derive(serde::Deserialize)]
        struct Show {
            model: Option<String>,
            // Ollama's older name for it, read when `model` is empty.
            name: Option<String>,
        }
        let show = RequestHead::parse(body).and_then(|_| {
            serde_json::from_slice::<Show>(body).map_err(crate::translate::body_error)
        });
        let show = match show {
            Ok(s) => s,
            Err(e) => return self.fail_request(host, &e),
        };
        let named = |m: &Option<String>| m.as_deref().filter(|m| !m.is_empty()).map(str::to_owned);
        if let (Some(model), Some(name)) = (named(&show.model), named(&show.name)) {
            if model != name {
                // Which one the server reads is its choice; the one checked must be it.
                let e = RequestError::InvalidRequest("model and name differ".to_owned());
                return self.fail_request(host, &e);
            }
        }
        let Some(model) = [show.model, show.name]
            .into_iter()
            .flatten()
            .find(|m| !m.is_empty())
        else {
            let e = RequestError::MissingModel;
            return self.fail_request(host, &e);
        };
        let allow = key_allowlist(host);
        let Some(routing) = &config.routing else {
            let on = config.discovery.is_some();
            if let Err(r) = model_gate::check(&model, &allow, served.single(), on) {
                return self.fail(host, r.status, r.code, r.message);
            }
            return Action::Continue;
        };
        let resolved = match routing.check(&model, &allow, served) {
            Ok(r) if r.upstream == Upstream::Ollama => r,
            Ok(r) => {
                let e = RequestError::UnsupportedEndpoint {
                    path: "/api/show".to_owned(),
                    upstream: r.upstream,
                };
                return self.fail_request(host, &e);
            }
            Err(r) => return self.fail(host, r.status, r.code, r.message),
        };
        if resolved.upstream_model != model {
            let Some(new) = request_head::with_model(body, resolved.upstream_model) else {
                return self.fail(
                    host,
                    400,
                    "invalid_request",
                    "the body must be a JSON object",
                );
            };
            if let Some(size) = body_size {
                host.set_request_body(size, &new);
                host.set_request_header("content-length", Some(&new.len().to_string()));
            }
        }
        host.set_request_header(metadata::HEADER_BACKEND, Some(resolved.backend));
        Action::Continue
    }

    /// Request trailers end the body instead of a last data frame (HTTP/2, chunked HTTP/1.1):
    /// the body is complete, so it is decided on now. Letting the trailers continue the
    /// stream undecided would forward the body with no model check and no reservation.
    pub fn on_request_trailers(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        served: &Served,
    ) -> Action {
        if self.failed {
            return Action::Pause;
        }
        if !self.awaiting_body {
            return Action::Continue;
        }
        self.on_request_body(host, config, self.received, true, served)
    }

    /// Translates, checks the model, rewrites the request, remembers the response plan.
    fn finish_request(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        body: &[u8],
        body_size: Option<usize>,
        gate: Gate<'_>,
        head: Option<&RequestHead>,
    ) -> Action {
        let Some(reads_body) = self.plan.as_ref().map(|p| p.reads_body) else {
            return Action::Continue;
        };
        // A routed body was read when its model was.
        let parsed;
        let head = match head {
            Some(h) => Some(h),
            None if reads_body => match RequestHead::parse(body) {
                Ok(h) => {
                    parsed = h;
                    Some(&parsed)
                }
                Err(e) => return self.fail_request(host, &e),
            },
            None => None,
        };
        let mut rewritten = matches!(gate, Gate::Routed { renamed: true, .. });
        // Options that change how a shared Ollama loads and keeps a model act for everyone
        // on it: dropped unless the configuration allows them.
        let stripped;
        let body = if head.is_some_and(|h| h.runtime_options) && !config.allow_runtime_options {
            let Some(b) = request_head::without_runtime_options(body) else {
                let e = RequestError::InvalidRequest("the body must be a JSON object".into());
                return self.fail_request(host, &e);
            };
            stripped = b;
            rewritten = true;
            &stripped[..]
        } else {
            body
        };
        let Some(plan) = &self.plan else {
            return Action::Continue;
        };
        let default_completion = plan
            .implied_completion(&config.request_options)
            .unwrap_or(config.default_reservation_tokens);
        let translated = match plan.translate_body(body, &config.request_options) {
            Ok(t) => t,
            Err(e) => return self.fail_request(host, &e),
        };
        if let (Some(model), Some(head)) = (translated.model(), head) {
            let model = match gate {
                Gate::Single(served) => {
                    let allow = key_allowlist(host);
                    let on = config.discovery.is_some();
                    if let Err(r) = model_gate::check(model, &allow, served, on) {
                        return self.fail(host, r.status, r.code, r.message);
                    }
                    model
                }
                Gate::Routed { target, .. } => target,
            };
            let price = config.prices.as_ref().and_then(|p| p.price_for(model));
            if price.is_none() && has_usd_budget(host) {
                // Its cost could not be counted: admitting it would spend the budget unseen.
                return self.fail(
                    host,
                    403,
                    "model_not_priced",
                    "this model has no price on this gateway and the key has a USD budget",
                );
            }
            host.set_property(metadata::FILTER_STATE_MODEL, model);
            let opted_in =
                authz_metadata(host, metadata::PROMPT_LOG).as_deref() == Some(b"1".as_slice());
            if opted_in && !body.is_empty() {
                let end = body.len().min(PROMPT_LOG_MAX);
                host.set_property(
                    metadata::FILTER_STATE_PROMPT,
                    &String::from_utf8_lossy(&body[..end]),
                );
            }
            let (prompt, completion) = head.reservation_parts(body, default_completion);
            // Envoy drops a count it cannot carry, admitting the request unmetered.
            let reserve = completion.saturating_add(prompt).min(COUNT_MAX);
            host.set_property(metadata::FILTER_STATE_RESERVATION, &reserve.to_string());
            self.reserved = Some(reserve);
            if let Some(price) = price {
                let cost = price.cost(prompt, completion).min(COUNT_MAX);
                host.set_property(metadata::FILTER_STATE_COST_RESERVATION, &cost.to_string());
                self.cost_reserved = Some((price, cost));
            }
        }
        if let Some(path) = &translated.path {
            host.set_request_header(":path", Some(path));
        }
        for (name, value) in translated.headers {
            host.set_request_header(name, Some(value));
        }
        // A body renamed or stripped here goes on even where the translation kept it as is.
        let new = translated.body.as_deref().or(rewritten.then_some(body));
        if let (Some(new), Some(size)) = (new, body_size) {
            host.set_request_body(size, new);
            host.set_request_header("content-length", Some(&new.len().to_string()));
        }
        // Kept for every request, opaque ones too: an upstream error is never passed raw.
        self.response_plan = Some(translated.response);
        Action::Continue
    }

    /// Response headers: decide how the body is handled and fix the headers for it.
    pub fn on_response_headers(&mut self, host: &mut impl Host) -> Action {
        let Some(plan) = &self.response_plan else {
            return Action::Continue;
        };
        let status = header_text(host.response_header(":status"))
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        // The gateway's own replies (a 429 from the rate limiter, …) pass through untouched.
        let from_upstream = host.property(&["response", "code_details"]).as_deref()
            == Some(b"via_upstream".as_slice());
        if !from_upstream {
            return Action::Continue;
        }
        if plan.kind == ResponseKind::Opaque && !self.listing && status < 400 {
            return Action::Continue;
        }
        let meta = ResponseMeta {
            request_id: request_id(host),
            created: host.now_secs(),
        };
        let transcoder = ResponseTranscoder::new(plan, status, meta, transcoder::Limits::default());
        let translated = !matches!(
            plan.kind,
            ResponseKind::Opaque
                | ResponseKind::OpenAiPassthrough
                | ResponseKind::OllamaPassthrough
                | ResponseKind::AnthropicPassthrough
        );
        self.response = if status >= 400 && !translated {
            Response::UpstreamError {
                status,
                collected: Vec::new(),
            }
        } else if self.listing && (200..300).contains(&status) {
            Response::Listing {
                transcoder: Box::new(transcoder),
                collected: Vec::new(),
                too_large: false,
            }
        } else {
            Response::Transcode(Box::new(transcoder))
        };
        let rewrites = match &self.response {
            Response::Untouched => false,
            Response::Transcode(t) => t.rewrites_body(),
            Response::Listing { .. } | Response::UpstreamError { .. } => true,
        };
        if rewrites {
            host.set_response_header("content-length", None);
        }
        let content_type = match &self.response {
            Response::Transcode(t) => t.content_type(),
            Response::Listing { .. } | Response::UpstreamError { .. } => Some("application/json"),
            Response::Untouched => None,
        };
        if let Some(ct) = content_type {
            host.set_response_header("content-type", Some(ct));
        }
        if let Response::UpstreamError { status, .. } = &self.response {
            // Never let a model server's auth failure read as the client's own key failing.
            if *status == 401 || *status == 403 {
                host.set_response_header(":status", Some("502"));
            }
        }
        Action::Continue
    }

    /// Response body: rewrite or count this chunk; at the end, flush.
    pub fn on_response_body(
        &mut self,
        host: &mut impl Host,
        size: usize,
        end_of_stream: bool,
    ) -> Action {
        let chunk = if size > 0 {
            host.response_body(size).unwrap_or_default()
        } else {
            Vec::new()
        };
        self.out.clear();
        let mut replace = true;
        match &mut self.response {
            Response::Untouched => return Action::Continue,
            Response::Transcode(t) => {
                replace = t.rewrites_body();
                let mut result = t.push_into(&chunk, &mut self.out);
                if end_of_stream && result.is_ok() {
                    result = t.finish_into(&mut self.out);
                }
                if let Err(e) = result {
                    if !self.failed {
                        host.log_warn(&format!("tollgate: response stream: {e}"));
                    }
                    self.failed = true;
                    // Past a failure nothing half-translated reaches the client.
                    if replace {
                        self.out.clear();
                    } else {
                        return Action::Continue;
                    }
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
                if end_of_stream {
                    if !*too_large && transcoder.finish_into(collected).is_err() {
                        *too_large = true;
                    }
                    let allow = key_allowlist(host);
                    self.out = if *too_large {
                        br#"{"object":"list","data":[]}"#.to_vec()
                    } else {
                        model_gate::filter_listing(collected, &allow)
                    };
                }
            }
            Response::UpstreamError { status, collected } => {
                if collected.len() < ERROR_BODY_MAX {
                    let room = ERROR_BODY_MAX - collected.len();
                    collected.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                if end_of_stream {
                    let rid = request_id(host);
                    let status = *status;
                    let body = if status == 401 || status == 403 {
                        error_body::render(
                            502,
                            "upstream_auth_failed",
                            "the model server refused the gateway's credentials",
                            &rid,
                        )
                    } else {
                        upstream_error::render(status, Some(collected), &rid)
                    };
                    self.out = body.into_bytes();
                }
            }
        }
        if replace {
            host.set_response_body(size, &self.out);
        }
        Action::Continue
    }

    /// Stream done (also on client abort): publish the counted tokens, and how they differ
    /// from the reservation the rate limiter admitted against, for its stream-done debit.
    pub fn on_log(&mut self, host: &mut impl Host, _config: &Config) {
        let Some(reserved) = self.reserved else {
            return;
        };
        let details = host
            .property(&["response", "code_details"])
            .unwrap_or_default();
        let (used, cost) = match details.as_slice() {
            b"via_upstream" => {
                let (prompt, completion, reported, events) = match &self.response {
                    Response::Transcode(t) | Response::Listing { transcoder: t, .. } => {
                        let u = t.usage();
                        (
                            u.prompt,
                            u.completion,
                            t.usage_reported(),
                            t.stream_events(),
                        )
                    }
                    _ => (0, 0, false, 0),
                };
                host.set_property(metadata::FILTER_STATE_TOKENS_IN, &prompt.to_string());
                host.set_property(metadata::FILTER_STATE_TOKENS_OUT, &completion.to_string());
                // Nothing reported (aborted stream, upstream without usage): the reservation
                // stands, so an unreported response is never free; and a stream cut after
                // more events than that went by costs at least one token per event.
                if reported {
                    let cost = self.cost_reserved.map(|(p, _)| p.cost(prompt, completion));
                    (prompt.saturating_add(completion), cost)
                } else {
                    let streamed = events.saturating_sub(STREAM_EVENTS_WITHOUT_TOKENS);
                    let cost = self.cost_reserved.map(|(p, c)| c.max(p.cost(0, streamed)));
                    (reserved.max(streamed), cost)
                }
            }
            // The rate limiter refused or failed: nothing was reserved.
            b"request_rate_limited" | b"rate_limiter_error" => return,
            // Admitted, then the request never reached a model server: no tokens were used.
            d if never_reached_the_model(d) => (0, self.cost_reserved.map(|_| 0)),
            // Admitted and sent, then no answer reached the client (it hung up, a timeout,
            // a reset): the server may have generated it all, so the reservation stands.
            _ => (reserved, self.cost_reserved.map(|(_, c)| c)),
        };
        // What a model server reports is clamped like the reservation: Envoy drops a count
        // it cannot carry, and the debit would be lost.
        let used = used.min(COUNT_MAX);
        let cost = cost.map(|c| c.min(COUNT_MAX));
        host.set_property(metadata::FILTER_STATE_TOKENS, &used.to_string());
        host.set_property(
            metadata::FILTER_STATE_TOKENS_EXTRA,
            &used.saturating_sub(reserved).to_string(),
        );
        host.set_property(
            metadata::FILTER_STATE_TOKENS_REFUND,
            &reserved.saturating_sub(used).to_string(),
        );
        if let (Some((_, reserved)), Some(cost)) = (self.cost_reserved, cost) {
            host.set_property(metadata::FILTER_STATE_COST, &cost.to_string());
            host.set_property(
                metadata::FILTER_STATE_COST_EXTRA,
                &cost.saturating_sub(reserved).to_string(),
            );
            host.set_property(
                metadata::FILTER_STATE_COST_REFUND,
                &reserved.saturating_sub(cost).to_string(),
            );
        }
    }
}

/// Ollama's native model endpoints to a backend of another API: counted in front of one
/// model server of any declared API (Ollama serves both behind `{}`), but a routed backend
/// declares its API, and this one does not speak it.
fn foreign_native(path: &str, upstream: Upstream) -> bool {
    upstream != Upstream::Ollama && crate::translate::is_ollama_native(path)
}

/// Envoy's response code details of a request that ended before any model server got it
/// (connection refused or timed out, no healthy host, circuit breaker).
fn never_reached_the_model(details: &[u8]) -> bool {
    let details = String::from_utf8_lossy(details);
    matches!(
        details.as_ref(),
        "no_healthy_upstream" | "cluster_not_found" | "route_not_found" | "direct_response"
    ) || details.contains("connection_failure")
        || details.contains("{overflow}")
        || details.contains("refused_stream")
}

/// Request-headers phase as a free function (kept for callers that only block).
pub fn on_request_headers(host: &mut impl Host, config: &Config) -> Action {
    Stream::default().on_request_headers(host, config, true, &Served::default())
}

/// One model in OpenAI's shape (`GET /v1/models/{id}`).
fn model_body(id: &str, now: u64) -> String {
    serde_json::json!({"id": id, "object": "model", "created": now, "owned_by": "tollgate"})
        .to_string()
}

/// A model listing in the shape the client asked for: Ollama's `/api/tags` or OpenAI's list.
fn listing_body(path: &str, names: &[String], now: u64) -> String {
    let bare = path.split(['?', '#']).next().unwrap_or("");
    let v = if bare.trim_end_matches('/') == "/api/tags" {
        let models: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({"name": n, "model": n}))
            .collect();
        serde_json::json!({ "models": models })
    } else {
        let data: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({"id": n, "object": "model", "created": now, "owned_by": "tollgate"}))
            .collect();
        serde_json::json!({"object": "list", "data": data})
    };
    v.to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::discovery::ModelSet;
    use std::collections::HashMap;

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    #[derive(Default)]
    struct FakeHost {
        headers: Vec<(String, Vec<u8>)>,
        request_id: Option<String>,
        reply: Option<Reply>,
        properties: HashMap<String, Vec<u8>>,
        state: HashMap<String, String>,
        request_body: Vec<u8>,
        response_headers: Vec<(String, String)>,
        response_chunk: Vec<u8>,
    }

    impl FakeHost {
        fn request(method: &str, path: &str) -> Self {
            FakeHost {
                headers: vec![
                    (":method".into(), method.into()),
                    (":path".into(), path.into()),
                ],
                request_id: Some("rid-42".into()),
                ..Default::default()
            }
        }

        fn with_models(mut self, models: &str) -> Self {
            self.properties.insert(
                "metadata/filter_metadata/envoy.filters.http.ext_authz/models".into(),
                models.as_bytes().to_vec(),
            );
            self
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

        fn header(&self, name: &str) -> Option<String> {
            self.request_header(name)
                .map(|v| String::from_utf8(v).unwrap())
        }

        fn response_header_value(&self, name: &str) -> Option<&str> {
            self.response_headers
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

        fn set_request_header(&mut self, name: &str, value: Option<&str>) {
            self.headers.retain(|(n, _)| n != name);
            if let Some(v) = value {
                self.headers.push((name.into(), v.as_bytes().to_vec()));
            }
        }

        fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
            match path {
                ["request", "id"] => self.request_id.clone().map(String::into_bytes),
                _ => self.properties.get(&path.join("/")).cloned(),
            }
        }

        fn set_property(&mut self, name: &str, value: &str) {
            self.state.insert(name.into(), value.into());
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

        fn request_body(&self, size: usize) -> Option<Vec<u8>> {
            Some(self.request_body[..size.min(self.request_body.len())].to_vec())
        }

        fn set_request_body(&mut self, _size: usize, body: &[u8]) {
            self.request_body = body.to_vec();
        }

        fn response_header(&self, name: &str) -> Option<Vec<u8>> {
            self.response_header_value(name)
                .map(|v| v.as_bytes().to_vec())
        }

        fn set_response_header(&mut self, name: &str, value: Option<&str>) {
            self.response_headers.retain(|(n, _)| n != name);
            if let Some(v) = value {
                self.response_headers.push((name.into(), v.into()));
            }
        }

        fn response_body(&self, _size: usize) -> Option<Vec<u8>> {
            Some(self.response_chunk.clone())
        }

        fn set_response_body(&mut self, _size: usize, body: &[u8]) {
            self.response_chunk = body.to_vec();
        }

        fn now_secs(&self) -> u64 {
            1_700_000_000
        }

        fn log_warn(&self, _message: &str) {}
    }

    fn ollama() -> Config {
        Config::from_json(br#"{"upstream":"ollama"}"#).unwrap()
    }

    /// Runs a request with a JSON body through the request callbacks.
    fn send(
        host: &mut FakeHost,
        config: &Config,
        body: &str,
        served: Option<&ModelSet>,
    ) -> (Stream, Action) {
        let mut known = Served::default();
        if let Some(set) = served {
            known.insert(Served::SINGLE, set.clone());
        }
        let mut s = Stream::default();
        host.request_body = body.as_bytes().to_vec();
        assert_eq!(
            s.on_request_headers(host, config, false, &known),
            Action::Pause
        );
        let action = s.on_request_body(host, config, body.len(), true, &known);
        (s, action)
    }

    /// Feeds response chunks; returns what the client got.
    fn respond(
        host: &mut FakeHost,
        s: &mut Stream,
        status: &str,
        chunks: &[&[u8]],
        via_upstream: bool,
    ) -> Vec<u8> {
        host.response_headers = vec![
            (":status".into(), status.into()),
            ("content-length".into(), "1".into()),
        ];
        if via_upstream {
            host.properties
                .insert("response/code_details".into(), b"via_upstream".to_vec());
        }
        s.on_response_headers(host);
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            host.response_chunk = c.to_vec();
            s.on_response_body(host, c.len(), i + 1 == chunks.len());
            out.extend_from_slice(&host.response_chunk);
        }
        out
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
    fn missing_request_id_gives_empty_id_and_no_header() {
        let mut host = FakeHost::request("POST", "/api/delete");
        host.request_id = None;
        on_request_headers(&mut host, &Config::default());
        assert_eq!(host.reply_header("x-request-id"), None);
        assert_eq!(host.reply_json()["error"]["request_id"], "");
    }

    #[test]
    fn openai_chat_to_ollama_is_rewritten_and_the_model_recorded() {
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("llama3*");
        host.headers
            .push(("accept-encoding".into(), b"gzip".to_vec()));
        let body =
            r#"{"model":"llama3.1:8b","messages":[{"role":"user","content":"hi"}],"max_tokens":7}"#;
        let (_, action) = send(&mut host, &ollama(), body, None);
        assert_eq!(action, Action::Continue);
        assert!(host.reply.is_none());
        assert_eq!(host.header(":path").as_deref(), Some("/api/chat"));
        assert_eq!(
            host.header("accept-encoding"),
            None,
            "the response must come uncompressed"
        );
        let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(sent["options"]["num_predict"], 7);
        assert_eq!(sent["stream"], false);
        assert_eq!(
            host.header("content-length"),
            Some(host.request_body.len().to_string())
        );
        assert_eq!(
            host.state.get("tollgate_model").map(String::as_str),
            Some("llama3.1:8b")
        );
    }

    #[test]
    fn model_outside_the_allowlist_or_the_served_set_is_refused() {
        let body = r#"{"model":"qwen2:0.5b","messages":[{"role":"user","content":"hi"}]}"#;
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("llama3*");
        send(&mut host, &ollama(), body, None);
        assert_eq!(host.reply.as_ref().unwrap().status, 403);
        assert_eq!(host.reply_json()["error"]["code"], "model_not_allowed");

        let mut host = FakeHost::request("POST", "/v1/chat/completions");
        send(&mut host, &ollama(), body, None);
        assert_eq!(
            host.reply_json()["error"]["code"],
            "model_not_allowed",
            "no metadata allows nothing"
        );

        let discovering = Config::from_json(
            br#"{"upstream":"ollama","discovery":{"cluster":"model","path":"/api/tags"}}"#,
        )
        .unwrap();
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        send(&mut host, &discovering, body, None);
        assert_eq!(
            host.reply.as_ref().unwrap().status,
            503,
            "unknown served set fails closed"
        );
        let served = ModelSet::from_names(["llama3.1:8b"]);
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        send(&mut host, &discovering, body, Some(&served));
        assert_eq!(host.reply.as_ref().unwrap().status, 404);
        assert_eq!(host.reply_json()["error"]["code"], "model_not_found");
    }

    #[test]
    fn malformed_and_oversized_bodies_get_4xx() {
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        send(&mut host, &ollama(), "{not json", None);
        assert_eq!(host.reply.as_ref().unwrap().status, 400);
        assert_eq!(host.reply_json()["error"]["code"], "invalid_json");

        let small = Config::from_json(br#"{"upstream":"ollama","max_body_bytes":16}"#).unwrap();
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let mut s = Stream::default();
        assert_eq!(
            s.on_request_headers(&mut host, &small, false, &Served::default()),
            Action::Pause
        );
        assert_eq!(
            s.on_request_body(&mut host, &small, 17, false, &Served::default()),
            Action::Pause
        );
        assert_eq!(host.reply.as_ref().unwrap().status, 413);
    }

    #[test]
    fn ollama_stream_becomes_openai_sse_and_tokens_are_published_at_log() {
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let body =
            r#"{"model":"llama3.1:8b","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let (mut s, _) = send(&mut host, &ollama(), body, None);
        let lines: [&[u8]; 3] = [
            br#"{"model":"llama3.1:8b","created_at":"2024-07-23T10:00:00Z","message":{"role":"assistant","content":"Hel"},"done":false}"#,
            b"\n{\"model\":\"llama3.1:8b\",\"created_at\":\"2024-07-23T10:00:00Z\",\"message\":{\"role\":\"assistant\",\"content\":\"lo\"},\"done\":false}\n",
            br#"{"model":"llama3.1:8b","created_at":"2024-07-23T10:00:01Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":3,"eval_count":2}
"#,
        ];
        let out = String::from_utf8(respond(&mut host, &mut s, "200", &lines, true)).unwrap();
        assert_eq!(
            host.response_header_value("content-type"),
            Some("text/event-stream")
        );
        assert_eq!(host.response_header_value("content-length"), None);
        assert!(
            out.contains(r#""content":"Hel""#) && out.contains(r#""content":"lo""#),
            "{out}"
        );
        assert!(out.trim_end().ends_with("data: [DONE]"), "{out}");
        s.on_log(&mut host, &ollama());
        assert_eq!(
            host.state.get("tollgate_tokens_in").map(String::as_str),
            Some("3")
        );
        assert_eq!(
            host.state.get("tollgate_tokens_out").map(String::as_str),
            Some("2")
        );
        assert_eq!(
            host.state.get("tollgate_tokens").map(String::as_str),
            Some("5")
        );
    }

    #[test]
    fn unreported_usage_debits_the_reservation_and_local_replies_debit_nothing() {
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
        let (mut s, _) = send(&mut host, &Config::default(), body, None);
        respond(&mut host, &mut s, "200", &[br#"{"choices":[]}"#], true);
        s.on_log(&mut host, &Config::default());
        let reserved = host.state["tollgate_req"].clone();
        assert_eq!(host.state.get("tollgate_tokens"), Some(&reserved));
        assert_eq!(host.state["tollgate_tokens_refund"], "0");

        // Admitted, then the upstream failed: the whole reservation comes back.
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (mut s, _) = send(&mut host, &Config::default(), body, None);
        host.properties.insert(
            "response/code_details".into(),
            b"upstream_reset_before_response_started{connection_failure}".to_vec(),
        );
        s.on_log(&mut host, &Config::default());
        assert_eq!(host.state["tollgate_tokens"], "0");
        assert_eq!(
            host.state["tollgate_tokens_refund"],
            host.state["tollgate_req"]
        );

        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (mut s, _) = send(&mut host, &Config::default(), body, None);
        let out = respond(
            &mut host,
            &mut s,
            "429",
            &[br#"{"error":{"code":"rate_limited"}}"#],
            false,
        );
        assert_eq!(
            out, br#"{"error":{"code":"rate_limited"}}"#,
            "the gateway's own 429 is untouched"
        );
        host.properties.insert(
            "response/code_details".into(),
            b"request_rate_limited".to_vec(),
        );
        s.on_log(&mut host, &Config::default());
        assert!(
            !host.state.contains_key("tollgate_tokens"),
            "a refused request reserved nothing"
        );
        assert!(!host.state.contains_key("tollgate_tokens_refund"));
    }

    /// Ollama upstream with llama3* at $1 in / $3 out per million tokens, $2 / $4 by default.
    fn priced(default: bool) -> Config {
        let default = if default {
            r#","default":{"input_usd_per_mtok":2,"output_usd_per_mtok":4}"#
        } else {
            ""
        };
        Config::from_json(
            format!(
                r#"{{"upstream":"ollama","prices":{{"models":[{{"match":"llama3*",
                    "input_usd_per_mtok":1,"output_usd_per_mtok":3}}]{default}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn with_usd_budget(mut host: FakeHost) -> FakeHost {
        host.properties.insert(
            "metadata/filter_metadata/envoy.filters.http.ext_authz/tenant_budget_usd_month".into(),
            b"struct".to_vec(),
        );
        host
    }

    fn headers_only(host: &mut FakeHost, config: &Config) -> Action {
        Stream::default().on_request_headers(host, config, true, &Served::default())
    }

    fn with_metadata(mut host: FakeHost, name: &str) -> FakeHost {
        host.properties.insert(
            format!("metadata/filter_metadata/envoy.filters.http.ext_authz/{name}"),
            b"struct".to_vec(),
        );
        host
    }

    #[test]
    fn ollama_native_chat_is_checked_and_reserved_under_the_default_openai_config() {
        let config = Config::default();
        for path in [
            "/api/chat",
            "/api/generate",
            "/api/embed",
            "/api/embeddings/",
        ] {
            let body = r#"{"model":"llama3.1:8b","max_tokens":5}"#;
            let mut host = FakeHost::request("POST", path).with_models("qwen2*");
            let (_, action) = send(&mut host, &config, body, None);
            assert_eq!(action, Action::Pause, "{path}");
            assert_eq!(host.reply.as_ref().unwrap().status, 403, "{path}");
            assert_eq!(host.reply_json()["error"]["code"], "model_not_allowed");
            let mut host = FakeHost::request("POST", path).with_models("llama3*");
            let body = r#"{"model":"llama3.1:8b","options":{"num_predict":7}}"#;
            let (_, action) = send(&mut host, &config, body, None);
            assert_eq!(action, Action::Continue, "{path}");
            let reserved: u64 = host.state["tollgate_req"].parse().unwrap();
            assert!(reserved >= 7, "{path}: {reserved}");
            assert_eq!(host.state["tollgate_model"], "llama3.1:8b");
        }
    }

    #[test]
    fn methods_an_upstream_acts_on_beside_the_read_one_are_405() {
        let config = Config::default();
        for (method, path) in [
            ("GET", "/v1/chat/completions"),
            ("DELETE", "/v1/chat/completions"),
            ("PUT", "/api/chat"),
            ("DELETE", "/v1/models/ft:gpt-4o-mini:org"),
            ("POST", "/v1/models"),
            ("DELETE", "/api/tags"),
            ("GET", "/api/show"),
            ("POST", "/api/version"),
        ] {
            let mut host = FakeHost::request(method, path).with_models("*");
            assert_eq!(
                headers_only(&mut host, &config),
                Action::Pause,
                "{method} {path}"
            );
            assert_eq!(host.reply.as_ref().unwrap().status, 405, "{method} {path}");
            assert_eq!(host.reply_json()["error"]["code"], "method_not_allowed");
            assert_eq!(host.reply_json()["error"]["request_id"], "rid-42");
        }
        let mut host = FakeHost::request("GET", "/v1/models").with_models("*");
        assert_eq!(headers_only(&mut host, &config), Action::Continue);
    }

    #[test]
    fn paths_the_filter_cannot_read_are_refused_to_restricted_callers_only() {
        let config = Config::default();
        for path in [
            "/v1/responses",
            "/v1/files",
            "/v1/audio/speech",
            "/",
            "/v1/chat/completions/x",
        ] {
            for host in [
                FakeHost::request("POST", path).with_models("llama3*"),
                with_metadata(FakeHost::request("POST", path).with_models("*"), "key_tpm"),
                with_metadata(
                    FakeHost::request("POST", path).with_models("*"),
                    "tenant_budget_usd_day",
                ),
                FakeHost::request("POST", path),
            ] {
                let mut host = host;
                assert_eq!(headers_only(&mut host, &config), Action::Pause, "{path}");
                assert_eq!(host.reply.as_ref().unwrap().status, 403, "{path}");
                assert_eq!(host.reply_json()["error"]["code"], "operation_not_allowed");
            }
            let mut host = FakeHost::request("POST", path).with_models("*, llama3*");
            assert_eq!(headers_only(&mut host, &config), Action::Continue, "{path}");
        }
        // Read-only endpoints the filter answers or filters stay open to everyone.
        let mut host = FakeHost::request("GET", "/api/version").with_models("llama3*");
        assert_eq!(headers_only(&mut host, &config), Action::Continue);
    }

    #[test]
    fn a_clients_backend_header_is_dropped_in_single_upstream_mode() {
        let mut host = FakeHost::request("GET", "/v1/models").with_models("*");
        host.headers
            .push((metadata::HEADER_BACKEND.into(), b"hosted".to_vec()));
        headers_only(&mut host, &Config::default());
        assert_eq!(host.header(metadata::HEADER_BACKEND), None);
    }

    #[test]
    fn ollama_runtime_options_are_dropped_unless_allowed() {
        let body = r#"{"model":"llama3.1:8b","keep_alive":-1,"options":{"num_ctx":262144,"temperature":0}}"#;
        let mut host = FakeHost::request("POST", "/api/chat").with_models("*");
        let config = Config::from_json(br#"{"upstream":"ollama"}"#).unwrap();
        let (_, action) = send(&mut host, &config, body, None);
        assert_eq!(action, Action::Continue);
        let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(
            sent,
            serde_json::json!({"model":"llama3.1:8b","options":{"temperature":0}})
        );
        assert_eq!(
            host.header("content-length").unwrap(),
            host.request_body.len().to_string()
        );
        let config =
            Config::from_json(br#"{"upstream":"ollama","allow_runtime_options":true}"#).unwrap();
        let mut host = FakeHost::request("POST", "/api/chat").with_models("*");
        send(&mut host, &config, body, None);
        assert_eq!(host.request_body, body.as_bytes());
    }

    #[test]
    fn huge_max_tokens_reserve_the_largest_count_envoy_carries() {
        let config = Config::default();
        for n in ["2147483648", "4294967296", "9223372036854775807"] {
            let body = format!(r#"{{"model":"m","max_tokens":{n},"n":8,"messages":[]}}"#);
            let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
            let (_, action) = send(&mut host, &config, &body, None);
            assert_eq!(action, Action::Continue, "{n}");
            assert_eq!(host.state["tollgate_req"], COUNT_MAX.to_string(), "{n}");
        }
        for n in ["1e11", "-1", "1.5", "\"100\""] {
            let body = format!(r#"{{"model":"m","max_tokens":{n},"messages":[]}}"#);
            let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
            let (_, action) = send(&mut host, &config, &body, None);
            assert_eq!(action, Action::Pause, "{n}");
            assert_eq!(host.reply.as_ref().unwrap().status, 400, "{n}");
            assert!(!host.state.contains_key("tollgate_req"));
        }
    }

    #[test]
    fn an_upstream_error_on_a_path_the_filter_does_not_read_is_rewritten() {
        let config = Config::default();
        let mut host = FakeHost::request("GET", "/v1/models/llama3.1:8b").with_models("*");
        let mut s = Stream::default();
        assert_eq!(
            s.on_request_headers(&mut host, &config, true, &Served::default()),
            Action::Continue
        );
        let out = respond(
            &mut host,
            &mut s,
            "404",
            &[br#"{"error":"not found"}"#],
            true,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["request_id"], "rid-42");
        // A success passes untouched.
        let mut host = FakeHost::request("GET", "/v1/models/llama3.1:8b").with_models("*");
        let mut s = Stream::default();
        s.on_request_headers(&mut host, &config, true, &Served::default());
        let out = respond(&mut host, &mut s, "200", &[br#"{"id":"x"}"#], true);
        assert_eq!(out, br#"{"id":"x"}"#);
    }

    #[test]
    fn a_translation_to_anthropic_reserves_the_max_tokens_it_writes() {
        let config =
            Config::from_json(br#"{"upstream":"anthropic","anthropic_max_tokens":5000}"#).unwrap();
        let body = r#"{"model":"claude-x","messages":[{"role":"user","content":"hi"}]}"#;
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (_, action) = send(&mut host, &config, body, None);
        assert_eq!(action, Action::Continue);
        let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(sent["max_tokens"], 5000);
        let reserved: u64 = host.state["tollgate_req"].parse().unwrap();
        assert!((5000..5100).contains(&reserved), "{reserved}");
    }

    #[test]
    fn an_upstream_error_to_a_model_details_request_is_rewritten() {
        let config = Config::from_json(br#"{"upstream":"ollama"}"#).unwrap();
        let mut host = FakeHost::request("POST", "/api/show").with_models("*");
        let (mut s, action) = send(&mut host, &config, r#"{"model":"llama3.1:8b"}"#, None);
        assert_eq!(action, Action::Continue);
        let raw = br#"{"error":"model 'llama3.1:8b' not found at /srv/ollama/models"}"#;
        let out = respond(&mut host, &mut s, "500", &[raw], true);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["code"], "upstream_error");
        assert_eq!(v["error"]["request_id"], "rid-42");
        assert!(!String::from_utf8_lossy(&out).contains("/srv"));
    }

    #[test]
    fn priced_model_reserves_cost_and_settles_it_from_the_reported_usage() {
        let config = priced(false);
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        // A prompt estimate of 100 tokens (300 letters and the JSON around them), plus
        // 1 000 000 completion tokens.
        let body = format!(
            r#"{{"model":"llama3.1:8b","stream":true,"max_tokens":1000000,"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(300)
        );
        assert_eq!(request_head::prompt_estimate(body.as_bytes()), 100);
        let (mut s, _) = send(&mut host, &config, &body, None);
        // 100 × 10 000 + 1 000 000 × 30 000 micro-units: 30 001 units.
        assert_eq!(host.state["tollgate_cost_req"], "30001");
        let lines: [&[u8]; 1] = [
            br#"{"model":"llama3.1:8b","created_at":"2024-07-23T10:00:01Z","message":{"role":"assistant","content":"hi"},"done":true,"prompt_eval_count":3,"eval_count":2}
"#,
        ];
        respond(&mut host, &mut s, "200", &lines, true);
        s.on_log(&mut host, &config);
        // 3 × 10 000 + 2 × 30 000 = 90 000 micro-units: rounded up to 1 unit, never free.
        assert_eq!(host.state["tollgate_cost"], "1");
        assert_eq!(host.state["tollgate_cost_extra"], "0");
        assert_eq!(host.state["tollgate_cost_refund"], "30000");
        assert_eq!(host.state["tollgate_tokens"], "5");
    }

    #[test]
    fn unreported_usage_costs_the_reserved_amount_and_a_failed_upstream_nothing() {
        let config = priced(false);
        let body = r#"{"model":"llama3.1:8b","max_tokens":10,"messages":[]}"#;
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (mut s, _) = send(&mut host, &config, body, None);
        let reserved = host.state["tollgate_cost_req"].clone();
        respond(&mut host, &mut s, "200", &[b"{}"], true);
        s.on_log(&mut host, &config);
        assert_eq!(host.state["tollgate_cost"], reserved);
        assert_eq!(host.state["tollgate_cost_refund"], "0");

        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (mut s, _) = send(&mut host, &config, body, None);
        host.properties.insert(
            "response/code_details".into(),
            b"upstream_reset_before_response_started{connection_failure}".to_vec(),
        );
        s.on_log(&mut host, &config);
        assert_eq!(host.state["tollgate_cost"], "0");
        assert_eq!(host.state["tollgate_cost_refund"], reserved);
    }

    #[test]
    fn unpriced_model_is_refused_only_under_a_usd_budget_and_a_default_prices_it() {
        let body = r#"{"model":"qwen2:0.5b","messages":[]}"#;
        // No USD budget: passes, with no cost state (no USD counter to feed).
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        send(&mut host, &priced(false), body, None);
        assert!(host.reply.is_none());
        assert!(!host.state.contains_key("tollgate_cost_req"));
        // A USD budget and no price: refused before the upstream, fail closed.
        for config in [priced(false), ollama()] {
            let mut host =
                with_usd_budget(FakeHost::request("POST", "/v1/chat/completions").with_models("*"));
            let (_, action) = send(&mut host, &config, body, None);
            assert_eq!(action, Action::Pause);
            assert_eq!(host.reply.as_ref().unwrap().status, 403);
            assert_eq!(host.reply_json()["error"]["code"], "model_not_priced");
            assert_eq!(
                host.reply_header("x-tollgate-error"),
                Some("model_not_priced")
            );
        }
        // The default price covers it: 1024 default completion tokens at $4 = 4096 + the
        // prompt estimate at $2, rounded up.
        let mut host =
            with_usd_budget(FakeHost::request("POST", "/v1/chat/completions").with_models("*"));
        send(&mut host, &priced(true), body, None);
        assert!(host.reply.is_none());
        let prompt = body.len() as u64 / 4;
        let want = (1024 * 40_000 + prompt * 20_000).div_ceil(1_000_000);
        assert_eq!(host.state["tollgate_cost_req"], want.to_string());
    }

    #[test]
    fn upstream_errors_are_sanitised_and_auth_failures_become_502() {
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (mut s, _) = send(&mut host, &Config::default(), body, None);
        let out = respond(
            &mut host,
            &mut s,
            "500",
            &[b"Traceback at /srv/internal/host-7: boom"],
            true,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["request_id"], "rid-42");
        assert!(
            !String::from_utf8_lossy(&out).contains("/srv/internal"),
            "upstream internals leaked"
        );

        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (mut s, _) = send(&mut host, &Config::default(), body, None);
        let out = respond(
            &mut host,
            &mut s,
            "401",
            &[br#"{"error":{"message":"Incorrect API key provided: sk-abc***"}}"#],
            true,
        );
        assert_eq!(host.response_header_value(":status"), Some("502"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["code"], "upstream_auth_failed");
        assert!(!String::from_utf8_lossy(&out).contains("sk-abc"));
    }

    #[test]
    fn model_listings_are_filtered_to_the_callers_models() {
        let mut host = FakeHost::request("GET", "/v1/models").with_models("llama3*");
        let mut s = Stream::default();
        assert_eq!(
            s.on_request_headers(&mut host, &ollama(), true, &Served::default()),
            Action::Continue
        );
        assert_eq!(host.header(":path").as_deref(), Some("/api/tags"));
        let tags: &[u8] = br#"{"models":[{"name":"llama3.1:8b","model":"llama3.1:8b","modified_at":"2024-07-23T10:00:00Z","size":1,"digest":"a","details":{}},{"name":"qwen2:0.5b","model":"qwen2:0.5b","modified_at":"2024-07-23T10:00:00Z","size":1,"digest":"b","details":{}}]}"#;
        let out = respond(&mut host, &mut s, "200", &[&tags[..40], &tags[40..]], true);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["llama3.1:8b"]);
    }

    fn routed() -> Config {
        Config::from_json(
            br#"{"routing":{"backends":{
                   "local":{"upstream":"ollama","cluster":"ollama_pool"},
                   "hosted":{"upstream":"openai","cluster":"hosted","discovery":false}},
                 "models":[{"match":"llama3*","backend":"local"},
                           {"match":"gpt-4o-mini","backend":"hosted","upstream_model":"gpt-4o-mini-2024-07-18"}],
                 "aliases":{"chat-default":"llama3.1:8b","chat-hosted":"gpt-4o-mini"},
                 "default_backend":"local"}}"#,
        )
        .unwrap()
    }

    fn local_served() -> Served {
        let mut s = Served::default();
        s.insert(
            "local",
            ModelSet::from_names(["llama3.1:8b", "llama3.2:1b"]),
        );
        s
    }

    fn send_routed(host: &mut FakeHost, body: &str) -> Action {
        let config = routed();
        let served = local_served();
        let mut s = Stream::default();
        host.request_body = body.as_bytes().to_vec();
        assert_eq!(
            s.on_request_headers(host, &config, false, &served),
            Action::Pause
        );
        s.on_request_body(host, &config, body.len(), true, &served)
    }

    #[test]
    fn routed_alias_names_the_backend_translates_for_it_and_drops_a_spoofed_header() {
        let mut host =
            FakeHost::request("POST", "/v1/chat/completions").with_models("chat-*,llama3*");
        host.headers
            .push(("x-tollgate-backend".into(), b"hosted".to_vec()));
        let body = r#"{"model":"chat-default","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(send_routed(&mut host, body), Action::Continue);
        assert!(host.reply.is_none());
        assert_eq!(host.header("x-tollgate-backend").as_deref(), Some("local"));
        assert_eq!(host.header(":path").as_deref(), Some("/api/chat"));
        let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(sent["model"], "llama3.1:8b");
        assert_eq!(host.state["tollgate_model"], "llama3.1:8b");

        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let body = r#"{"model":"chat-hosted","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(send_routed(&mut host, body), Action::Continue);
        assert_eq!(host.header("x-tollgate-backend").as_deref(), Some("hosted"));
        assert_eq!(
            host.header(":path").as_deref(),
            Some("/v1/chat/completions"),
            "an OpenAI upstream keeps the path"
        );
        let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(sent["model"], "gpt-4o-mini-2024-07-18");
        assert_eq!(
            host.header("content-length"),
            Some(host.request_body.len().to_string())
        );
    }

    #[test]
    fn routed_refusals_name_no_backend() {
        let cases = [
            (
                "chat-*",
                r#"{"model":"chat-default","messages":[]}"#,
                403,
                "model_not_allowed",
            ),
            (
                "*",
                r#"{"model":"mistral","messages":[]}"#,
                404,
                "model_not_found",
            ),
            (
                "*",
                r#"{"model":"llama3.3:70b","messages":[]}"#,
                404,
                "model_not_found",
            ),
            ("*", r#"{"messages":[]}"#, 400, "missing_model"),
            ("*", "{oops", 400, "invalid_json"),
            (
                "*",
                r#"{"model":"chat-hosted","prompt":"x","path":"/api/generate"}"#,
                404,
                "unsupported_endpoint",
            ),
        ];
        for (allow, body, status, code) in cases {
            let path = if body.contains("/api/generate") {
                "/api/generate"
            } else {
                "/v1/chat/completions"
            };
            let mut host = FakeHost::request("POST", path).with_models(allow);
            host.headers
                .push(("x-tollgate-backend".into(), b"hosted".to_vec()));
            assert_eq!(send_routed(&mut host, body), Action::Pause, "{body}");
            assert_eq!(host.reply.as_ref().unwrap().status, status, "{body}");
            assert_eq!(host.reply_json()["error"]["code"], code, "{body}");
            assert_eq!(host.header("x-tollgate-backend"), None, "{body}");
        }
    }

    #[test]
    fn routed_listing_is_answered_from_discovery_and_the_allowlist() {
        for (path, field, key) in [
            ("/v1/models", "data", "id"),
            ("/api/tags", "models", "name"),
        ] {
            let mut host = FakeHost::request("GET", path).with_models("chat-default,llama3*");
            let mut s = Stream::default();
            let action = s.on_request_headers(&mut host, &routed(), true, &local_served());
            assert_eq!(action, Action::Pause);
            let reply = host.reply.as_ref().unwrap();
            assert_eq!(reply.status, 200);
            let v = host.reply_json();
            let names: Vec<&str> = v[field]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m[key].as_str().unwrap())
                .collect();
            assert_eq!(
                names,
                ["chat-default", "llama3.1:8b", "llama3.2:1b"],
                "{path}"
            );
        }
    }

    #[test]
    fn routed_requests_without_a_model_go_to_the_default_backend_or_get_404() {
        let mut host = FakeHost::request("GET", "/api/version").with_models("*");
        let mut s = Stream::default();
        let action = s.on_request_headers(&mut host, &routed(), true, &local_served());
        assert_eq!(action, Action::Continue);
        assert_eq!(host.header("x-tollgate-backend").as_deref(), Some("local"));

        let config = Config::from_json(
            br#"{"routing":{"backends":{"a":{"upstream":"ollama","cluster":"a"}}}}"#,
        )
        .unwrap();
        let mut host = FakeHost::request("GET", "/api/version").with_models("*");
        let action =
            Stream::default().on_request_headers(&mut host, &config, true, &Served::default());
        assert_eq!(action, Action::Pause);
        assert_eq!(host.reply.as_ref().unwrap().status, 404);
    }

    #[test]
    fn keys_differing_only_in_case_are_refused_before_the_upstream() {
        // Go's encoding/json (Ollama, also its OpenAI-compatible API) matches keys ignoring
        // case and keeps the last one: it would run the second model, or stream unlike planned.
        for (path, body) in [
            (
                "/api/chat",
                r#"{"model":"qwen2:0.5b","Model":"llama3.1:8b","messages":[]}"#,
            ),
            (
                "/api/chat",
                r#"{"model":"qwen2:0.5b","MODEL":"llama3.1:8b","messages":[]}"#,
            ),
            (
                "/api/chat",
                r#"{"model":"qwen2:0.5b","mod\u0045l":"llama3.1:8b"}"#,
            ),
            (
                "/api/generate",
                r#"{"model":"qwen2:0.5b","stream":false,"Stream":true}"#,
            ),
            (
                "/api/generate",
                r#"{"model":"qwen2:0.5b","options":{"num_predict":1,"Num_Predict":-1}}"#,
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"qwen2:0.5b","Model":"llama3.1:8b","messages":[]}"#,
            ),
        ] {
            let mut host = FakeHost::request("POST", path).with_models("qwen2*");
            let (_, action) = send(&mut host, &ollama(), body, None);
            assert_eq!(action, Action::Pause, "{body}");
            assert_eq!(host.reply.as_ref().unwrap().status, 400, "{body}");
            assert_eq!(
                host.reply_json()["error"]["code"],
                "invalid_request",
                "{body}"
            );
        }
        // Look-alike keys deeper down (a tool schema's properties) are the client's business.
        let body = r#"{"model":"qwen2:0.5b","messages":[],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"Name":{},"name":{}}}}}]}"#;
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("qwen2*");
        let (_, action) = send(&mut host, &ollama(), body, None);
        assert_eq!(action, Action::Continue);
        assert!(host.reply.is_none());
    }

    #[test]
    fn routed_keys_differing_only_in_case_are_refused() {
        let mut host = FakeHost::request("POST", "/api/chat").with_models("llama3*");
        let body = r#"{"model":"llama3.1:8b","Model":"qwen2:0.5b","messages":[]}"#;
        assert_eq!(send_routed(&mut host, body), Action::Pause);
        assert_eq!(host.reply.as_ref().unwrap().status, 400);
        assert_eq!(host.header("x-tollgate-backend"), None);
    }

    #[test]
    fn a_body_ended_by_trailers_is_checked_and_reserved_like_any_other() {
        let allowed = r#"{"model":"qwen2:0.5b","max_tokens":7,"messages":[]}"#;
        let denied = r#"{"model":"llama3.1:8b","messages":[]}"#;
        for (config, served) in [
            (Config::default(), Served::default()),
            (routed(), local_served()),
        ] {
            for (body, want) in [(allowed, None), (denied, Some(403))] {
                let mut host =
                    FakeHost::request("POST", "/v1/chat/completions").with_models("qwen2*");
                host.request_body = body.as_bytes().to_vec();
                let mut s = Stream::default();
                assert_eq!(
                    s.on_request_headers(&mut host, &config, false, &served),
                    Action::Pause
                );
                assert_eq!(
                    s.on_request_body(&mut host, &config, body.len(), false, &served),
                    Action::Pause
                );
                let action = s.on_request_trailers(&mut host, &config, &served);
                match want {
                    Some(status) => {
                        assert_eq!(action, Action::Pause, "{body}");
                        assert_eq!(host.reply.as_ref().unwrap().status, status, "{body}");
                    }
                    None if config.routing.is_some() => {
                        // qwen2 has no route in the routing table: refused, never forwarded.
                        assert_eq!(action, Action::Pause, "{body}");
                        assert_eq!(host.reply.as_ref().unwrap().status, 404, "{body}");
                    }
                    None => {
                        assert_eq!(action, Action::Continue, "{body}");
                        assert!(host.reply.is_none());
                        assert!(host.state.contains_key("tollgate_req"), "no reservation");
                    }
                }
            }
        }
        // Trailers after a finished body, or on a request without one, change nothing.
        let mut host = FakeHost::request("GET", "/api/version").with_models("*");
        let mut s = Stream::default();
        s.on_request_headers(&mut host, &Config::default(), false, &Served::default());
        assert_eq!(
            s.on_request_trailers(&mut host, &Config::default(), &Served::default()),
            Action::Continue
        );
    }

    #[test]
    fn model_details_and_running_models_are_limited_to_the_callers_models() {
        let show = |config: &Config, served: &Served, body: &str| {
            let mut host = FakeHost::request("POST", "/api/show").with_models("qwen2*,chat-*");
            host.request_body = body.as_bytes().to_vec();
            let mut s = Stream::default();
            assert_eq!(
                s.on_request_headers(&mut host, config, false, served),
                Action::Pause
            );
            let action = s.on_request_body(&mut host, config, body.len(), true, served);
            (host, action)
        };
        let none = Served::default();
        for body in [r#"{"model":"llama3.1:8b"}"#, r#"{"name":"llama3.1:8b"}"#] {
            let (host, action) = show(&ollama(), &none, body);
            assert_eq!(action, Action::Pause, "{body}");
            assert_eq!(host.reply.as_ref().unwrap().status, 403, "{body}");
        }
        let (host, action) = show(&ollama(), &none, r#"{"model":"qwen2:0.5b"}"#);
        assert_eq!(action, Action::Continue);
        assert!(host.reply.is_none());
        let (host, _) = show(&ollama(), &none, "{}");
        assert_eq!(host.reply_json()["error"]["code"], "missing_model");

        // Routed: to the backend serving it, under its upstream name; never to the default.
        let mut served = local_served();
        served.insert("local", ModelSet::from_names(["llama3.1:8b", "qwen2:0.5b"]));
        let routed = Config::from_json(
            br#"{"routing":{"backends":{
                   "local":{"upstream":"ollama","cluster":"ollama_pool"},
                   "hosted":{"upstream":"openai","cluster":"hosted","discovery":false}},
                 "models":[{"match":"qwen2*","backend":"local"},{"match":"llama3*","backend":"local"},
                           {"match":"gpt-4o-mini","backend":"hosted"}],
                 "aliases":{"chat-small":"qwen2:0.5b","chat-hosted":"gpt-4o-mini"},
                 "default_backend":"local"}}"#,
        )
        .unwrap();
        let (host, action) = show(&routed, &served, r#"{"model":"chat-small"}"#);
        assert_eq!(action, Action::Continue);
        assert_eq!(host.header("x-tollgate-backend").as_deref(), Some("local"));
        let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(sent["model"], "qwen2:0.5b");
        let (host, _) = show(&routed, &served, r#"{"model":"llama3.1:8b"}"#);
        assert_eq!(host.reply.as_ref().unwrap().status, 403);
        assert_eq!(host.header("x-tollgate-backend"), None);

        // One model's entry: 404 for a model the key may not use, as for an unknown one.
        for (config, served) in [(ollama(), &none), (routed, &served)] {
            for (path, status) in [
                ("/v1/models/llama3.1%3A8b", Some(404)),
                ("/v1/models/qwen2%2F..%2Fllama3.1:8b", Some(400)),
                ("/v1/models/qwen2%zz", Some(400)),
                ("/v1/models/llama3.1:8b", Some(404)),
                ("/v1/models/qwen2:0.5b", None),
            ] {
                let mut host = FakeHost::request("GET", path).with_models("qwen2*");
                let mut s = Stream::default();
                let action = s.on_request_headers(&mut host, &config, true, served);
                let got = host.reply.as_ref().map(|r| r.status);
                match (status, config.routing.is_some()) {
                    (Some(want), _) => assert_eq!((action, got), (Action::Pause, Some(want))),
                    (None, true) => {
                        assert_eq!((action, got), (Action::Pause, Some(200)));
                        assert_eq!(host.reply_json()["id"], "qwen2:0.5b");
                    }
                    (None, false) => assert_eq!((action, got), (Action::Continue, None), "{path}"),
                }
            }

            // Running models: filtered like a listing.
            let mut host = FakeHost::request("GET", "/api/ps").with_models("qwen2*");
            let mut s = Stream::default();
            assert_eq!(
                s.on_request_headers(&mut host, &config, true, served),
                Action::Continue
            );
            let ps: &[u8] = br#"{"models":[{"name":"llama3.1:8b","model":"llama3.1:8b"},{"name":"qwen2:0.5b","model":"qwen2:0.5b"}]}"#;
            let out = respond(&mut host, &mut s, "200", &[&ps[..30], &ps[30..]], true);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["models"].as_array().unwrap().len(), 1, "{v}");
            assert_eq!(v["models"][0]["name"], "qwen2:0.5b");
        }
    }

    #[test]
    fn an_anthropic_stream_cut_before_its_final_usage_costs_the_reservation() {
        // message_start carries input tokens and an output count of 1; only message_delta
        // says what was generated. A client that hangs up in between must not get the rest
        // of the reservation refunded.
        let config = Config::from_json(br#"{"upstream":"anthropic"}"#).unwrap();
        let events: &[&[u8]] = &[
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-x\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
            b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a long answer\"}}\n\n",
        ];
        for (path, body) in [
            (
                "/v1/chat/completions",
                r#"{"model":"claude-x","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
            (
                "/v1/messages",
                r#"{"model":"claude-x","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
        ] {
            let mut host = FakeHost::request("POST", path).with_models("*");
            let (mut s, _) = send(&mut host, &config, body, None);
            let reserved = host.state["tollgate_req"].clone();
            host.response_headers = vec![
                (":status".into(), "200".into()),
                ("content-type".into(), "text/event-stream".into()),
            ];
            host.properties
                .insert("response/code_details".into(), b"via_upstream".to_vec());
            s.on_response_headers(&mut host);
            for e in events {
                host.response_chunk = e.to_vec();
                s.on_response_body(&mut host, e.len(), false);
            }
            s.on_log(&mut host, &config);
            assert_eq!(host.state["tollgate_tokens"], reserved, "{path}");
            assert_eq!(host.state["tollgate_tokens_refund"], "0", "{path}");
        }
    }

    #[test]
    fn a_stream_cut_before_its_usage_costs_at_least_what_went_by() {
        // No max_tokens: the reservation is the default; the client hangs up after many
        // chunks, before the usage chunk. It pays for the chunks it got, not the default.
        let config = Config::from_json(br#"{"default_reservation_tokens":10}"#).unwrap();
        let body = r#"{"model":"m","stream":true,"messages":[]}"#;
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (mut s, _) = send(&mut host, &config, body, None);
        let reserved: u64 = host.state["tollgate_req"].parse().unwrap();
        host.response_headers = vec![(":status".into(), "200".into())];
        host.properties
            .insert("response/code_details".into(), b"via_upstream".to_vec());
        s.on_response_headers(&mut host);
        let chunk = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n";
        for _ in 0..500 {
            host.response_chunk = chunk.to_vec();
            s.on_response_body(&mut host, chunk.len(), false);
        }
        s.on_log(&mut host, &config);
        let used: u64 = host.state["tollgate_tokens"].parse().unwrap();
        assert!(
            used >= 500 - STREAM_EVENTS_WITHOUT_TOKENS && used > reserved,
            "{used}"
        );
        assert_eq!(host.state["tollgate_tokens_refund"], "0");
        assert_eq!(
            host.state["tollgate_tokens_extra"],
            (used - reserved).to_string()
        );

        // A short cut stream still costs its reservation.
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (mut s, _) = send(&mut host, &config, body, None);
        host.response_headers = vec![(":status".into(), "200".into())];
        host.properties
            .insert("response/code_details".into(), b"via_upstream".to_vec());
        s.on_response_headers(&mut host);
        host.response_chunk = chunk.to_vec();
        s.on_response_body(&mut host, chunk.len(), false);
        s.on_log(&mut host, &config);
        assert_eq!(host.state["tollgate_tokens"], host.state["tollgate_req"]);
    }

    #[test]
    fn a_client_that_hangs_up_before_the_answer_keeps_its_reservation_spent() {
        // The model server works on a non-streamed request until it answers; a client that
        // disconnects just before must not get the whole reservation back (free generation
        // on a hosted provider's bill). Only failures before the server got the request
        // refund it.
        let config = priced(false);
        let body = r#"{"model":"llama3.1:8b","max_tokens":4000,"messages":[]}"#;
        for (details, charged) in [
            ("downstream_remote_disconnect", true),
            ("upstream_response_timeout", true),
            ("upstream_reset_before_response_started{remote_reset}", true),
            (
                "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
                false,
            ),
            ("no_healthy_upstream", false),
            ("upstream_reset_before_response_started{overflow}", false),
        ] {
            let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
            let (mut s, _) = send(&mut host, &config, body, None);
            host.properties
                .insert("response/code_details".into(), details.as_bytes().to_vec());
            s.on_log(&mut host, &config);
            let (reserved, cost) = (&host.state["tollgate_req"], &host.state["tollgate_cost_req"]);
            if charged {
                assert_eq!(&host.state["tollgate_tokens"], reserved, "{details}");
                assert_eq!(&host.state["tollgate_cost"], cost, "{details}");
                assert_eq!(host.state["tollgate_tokens_refund"], "0", "{details}");
            } else {
                assert_eq!(host.state["tollgate_tokens"], "0", "{details}");
                assert_eq!(host.state["tollgate_cost"], "0", "{details}");
            }
        }
    }
}
