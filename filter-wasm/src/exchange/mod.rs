//! Owns one request/response exchange through the filter, as a state machine written against
//! the [`Host`] trait so it runs natively under a fake host in tests; the proxy-wasm contexts
//! drive it with hostcalls.
//!
//! Request: block management endpoints on the normalised path; refuse methods an endpoint
//! does not take and paths the filter cannot read for restricted callers; read the JSON body
//! once (capped), check the model against the caller's grant and the served set, reserve,
//! translate, rewrite path and body. Response (`response`): translate or count chunk by chunk
//! without holding complete lines back, filter model listings, turn upstream errors into
//! Tollgate's shape. Log: settle the reservation (`crate::admission`) as filter state for the
//! rate limiter's stream-done debit and the access log.

mod response;
#[cfg(test)]
mod tests;

use crate::admission::{self, Admission, Outcome};
use crate::config::Config;
use crate::discovery::{ModelSet, Served};
use crate::endpoint;
use crate::grant::Grant;
use crate::host::{self, Action, Host};
use crate::model_gate;
use crate::path_guard::{decide, Decision, InvalidPath};
use crate::replies::{self, send_error, BLOCKED_MESSAGE};
use crate::request_head::{self, RequestHead};
use crate::routing::{self, Routing};
use crate::translate::{
    self, plan_request, RequestError, RequestPlan, ResponseKind, ResponsePlan, Upstream,
};
use tollgate_core::metadata;
use tollgate_core::refusal::{Refusal, RefusalCode};

use response::Response;

/// An opted-in tenant's request body is logged up to this.
const PROMPT_LOG_MAX: usize = 16 * 1024;

/// Where the exchange stands.
enum Phase {
    /// Request headers not decided yet.
    Start,
    /// Headers held while the body is read; decided at its end (or at the trailers).
    ReadingBody { received: usize, then: BodyUse },
    /// Passed on to the rate limiter and the model server.
    Forwarded,
    /// Answered with a local reply: later callbacks change nothing.
    Refused,
}

/// What a held body is read for.
enum BodyUse {
    /// `/api/show`: the model it names is checked, and under routing picks the backend.
    Details,
    /// Routed: the model picks the backend, whose API decides the translation.
    Routed { path: String },
    /// One model server: checked and translated as planned from the path.
    Single(RequestPlan),
}

/// How the model of a body was decided.
enum Gate<'a> {
    /// One model server: allowlist and its served set are checked on the translated model.
    Single(Option<&'a ModelSet>),
    /// Routed: checked against the routing table; the model after alias resolution, and
    /// whether the body passed on is the client's with the model renamed.
    Routed { target: &'a str, renamed: bool },
}

/// One request/response exchange.
pub struct Exchange {
    phase: Phase,
    grant: Grant,
    /// Envoy's `x-request-id`, read with the request headers: the response callbacks
    /// cannot read it, and every error body carries it.
    request_id: String,
    /// What the response side expects; `None` for responses passed on untouched.
    expect: Option<response::Expect>,
    response: Response,
    admission: Option<Admission>,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            phase: Phase::Start,
            grant: Grant::default(),
            request_id: String::new(),
            expect: None,
            response: Response::Untouched,
            admission: None,
        }
    }
}

impl Exchange {
    /// Request headers: block, decide what the path is, and hold the headers while a body
    /// is read.
    pub fn on_request_headers(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        end_of_stream: bool,
        served: &Served,
    ) -> Action {
        self.request_id = replies::request_id(host);
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
                return self.fail(host, RefusalCode::EndpointBlocked, BLOCKED_MESSAGE)
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
                let route = host::text(host.property(&["xds", "route_name"]));
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
        if let Some(allowed) = endpoint::methods(&path, reads_body) {
            let method = host::text(host.request_header(":method")).unwrap_or_default();
            if !allowed.contains(&method.as_str()) {
                let message = format!(
                    "{} does not take this method; use {}",
                    endpoint::bare(&path),
                    allowed.join(" or ")
                );
                return self.fail(host, RefusalCode::MethodNotAllowed, &message);
            }
        }
        if let Some(id) = endpoint::retrieved_model(&path) {
            if let Some(action) = self.retrieve(host, config, id, served) {
                return action;
            }
        }
        if endpoint::is_model_details(&path) {
            // Not counted; kept so an upstream error is rewritten like any other.
            self.expect = Some(response::Expect::Plan(ResponsePlan::new(
                ResponseKind::Opaque,
            )));
            return self.hold_body(host, config, BodyUse::Details, end_of_stream, served);
        }
        let Some(plan) = plan else {
            let Some(routing) = &config.routing else {
                return self.forward();
            };
            if !reads_body {
                return self.routed_without_body(host, config, routing, &path, served);
            }
            // The response is parsed: it must arrive uncompressed.
            host.set_request_header("accept-encoding", None);
            return self.hold_body(
                host,
                config,
                BodyUse::Routed { path },
                end_of_stream,
                served,
            );
        };
        if plan.is_opaque() && !self.may_pass_unread(host, &path) {
            return Action::Pause;
        }
        let listing = endpoint::is_listing(&path) || endpoint::is_running_listing(&path);
        if plan.reads_body || listing {
            // The response is parsed: it must arrive uncompressed.
            host.set_request_header("accept-encoding", None);
        }
        if plan.reads_body {
            return self.hold_body(host, config, BodyUse::Single(plan), end_of_stream, served);
        }
        // No body to read: listings and paths the filter does not read.
        let response = match plan.translate_body(&[], &config.request_options) {
            Ok(t) => t.response,
            Err(e) => return self.fail_request(host, &e),
        };
        if let Some(path) = &plan.path {
            host.set_request_header(":path", Some(path));
        }
        for (name, value) in plan.headers {
            host.set_request_header(name, Some(value));
        }
        self.expect = Some(response::Expect::new(response, listing));
        self.forward()
    }

    /// `GET /v1/models/{id}`: only of a model the caller may use, else as if it did not
    /// exist; under routing answered here (the default backend may not serve it).
    fn retrieve(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        id: Option<String>,
        served: &Served,
    ) -> Option<Action> {
        let Some(id) = id else {
            return Some(self.refuse_path(host, InvalidPath::BadPercentEscape));
        };
        let allow = self.grant.allowlist(host);
        let usable = match &config.routing {
            Some(routing) => routing.check(&id, allow, served).is_ok(),
            None => {
                let on = config.discovery.is_some();
                model_gate::check(&id, allow, served.single(), on).is_ok()
            }
        };
        if !usable {
            return Some(self.refuse(host, model_gate::MODEL_NOT_FOUND));
        }
        if config.routing.is_some() {
            replies::send_json(host, &replies::model_body(&id, host.now_secs()));
            self.phase = Phase::Refused;
            return Some(Action::Pause);
        }
        None
    }

    /// Holds the headers until the body's end; a request without one is decided now.
    fn hold_body(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        then: BodyUse,
        end_of_stream: bool,
        served: &Served,
    ) -> Action {
        if end_of_stream {
            return self.decide_body(host, config, then, &[], None, served);
        }
        self.phase = Phase::ReadingBody { received: 0, then };
        Action::Pause
    }

    /// Under routing, a path without a body to read: listings are answered from discovery,
    /// the rest goes to the default backend.
    fn routed_without_body(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        routing: &Routing,
        path: &str,
        served: &Served,
    ) -> Action {
        if endpoint::is_listing(path) {
            let names = routing.visible_models(self.grant.allowlist(host), served);
            replies::send_json(host, &replies::listing_body(path, &names, host.now_secs()));
            self.phase = Phase::Refused;
            return Action::Pause;
        }
        let Some(backend) = routing.default_backend.as_deref() else {
            return self.refuse(host, routing::NO_ROUTE);
        };
        let upstream = routing
            .backends
            .get(backend)
            .map_or(Upstream::OpenAi, |b| b.upstream);
        let plan = match plan_request(upstream, path) {
            Ok(plan) => plan,
            Err(e) => return self.fail_request(host, &e),
        };
        if plan.is_opaque() && !self.may_pass_unread(host, path) {
            return Action::Pause;
        }
        host.set_request_header(metadata::HEADER_BACKEND, Some(backend));
        let listing = endpoint::is_running_listing(path);
        if listing {
            // Filtered to the caller's models like any listing.
            host.set_request_header("accept-encoding", None);
        }
        // Kept for listings and to turn upstream errors into Tollgate's shape.
        let response = plan
            .translate_body(&[], &config.request_options)
            .map(|t| t.response)
            .unwrap_or_else(|_| ResponsePlan::new(ResponseKind::Opaque));
        self.expect = Some(response::Expect::new(response, listing));
        self.forward()
    }

    /// A path the filter does not read passes only for a caller without a model allowlist,
    /// token or USD limits: for anyone else it would reach the model server unchecked and
    /// uncounted. Sends the refusal and returns `false` otherwise.
    fn may_pass_unread(&mut self, host: &mut impl Host, path: &str) -> bool {
        if endpoint::methods(path, false).is_some() || !self.grant.is_restricted(host) {
            return true;
        }
        self.fail(
            host,
            RefusalCode::OperationNotAllowed,
            "this endpoint is not checked or metered by the gateway, and this key has a \
             model allowlist or token limits",
        );
        false
    }

    /// Request body: wait for all of it (capped), then decide it as the headers planned.
    pub fn on_request_body(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        size: usize,
        end_of_stream: bool,
        served: &Served,
    ) -> Action {
        let Phase::ReadingBody { received, .. } = &mut self.phase else {
            return match self.phase {
                Phase::Refused => Action::Pause,
                _ => Action::Continue,
            };
        };
        *received = size;
        if size > config.max_body_bytes {
            return self.fail(
                host,
                RefusalCode::RequestTooLarge,
                "the request body is too large",
            );
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let Phase::ReadingBody { then, .. } = std::mem::replace(&mut self.phase, Phase::Start)
        else {
            return Action::Continue;
        };
        let body = host.request_body(size).unwrap_or_default();
        self.decide_body(host, config, then, &body, Some(size), served)
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
        match self.phase {
            Phase::ReadingBody { received, .. } => {
                self.on_request_body(host, config, received, true, served)
            }
            Phase::Refused => Action::Pause,
            Phase::Start | Phase::Forwarded => Action::Continue,
        }
    }

    fn decide_body(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        then: BodyUse,
        body: &[u8],
        body_size: Option<usize>,
        served: &Served,
    ) -> Action {
        match then {
            BodyUse::Details => self.decide_details(host, config, body, body_size, served),
            BodyUse::Routed { path } => match &config.routing {
                Some(routing) => {
                    self.decide_routed(host, config, routing, &path, body, body_size, served)
                }
                None => self.forward(),
            },
            BodyUse::Single(plan) => {
                let gate = Gate::Single(served.single());
                self.decide_model_call(host, config, &plan, body, body_size, gate, None)
            }
        }
    }

    /// An `/api/show` body: forwarded only for a model the caller may use; under routing, to
    /// the backend serving it, under its upstream name.
    fn decide_details(
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
        let show = RequestHead::parse(body)
            .and_then(|_| serde_json::from_slice::<Show>(body).map_err(translate::body_error));
        let show = match show {
            Ok(s) => s,
            Err(e) => return self.fail_request(host, &e),
        };
        let named = |m: &Option<String>| m.as_deref().filter(|m| !m.is_empty()).map(str::to_owned);
        let model = match (named(&show.model), named(&show.name)) {
            // Which one the server reads is its choice; the one checked must be it.
            (Some(m), Some(n)) if m != n => {
                let e = RequestError::InvalidRequest("model and name differ".to_owned());
                return self.fail_request(host, &e);
            }
            (Some(m), _) | (None, Some(m)) => m,
            (None, None) => return self.fail_request(host, &RequestError::MissingModel),
        };
        let allow = self.grant.allowlist(host);
        let Some(routing) = &config.routing else {
            let on = config.discovery.is_some();
            if let Err(r) = model_gate::check(&model, allow, served.single(), on) {
                return self.refuse(host, r);
            }
            return self.forward();
        };
        let resolved = match routing.check(&model, allow, served) {
            Ok(r) if r.upstream == Upstream::Ollama => r,
            Ok(r) => {
                let e = RequestError::UnsupportedEndpoint {
                    path: "/api/show".to_owned(),
                    upstream: r.upstream,
                };
                return self.fail_request(host, &e);
            }
            Err(r) => return self.refuse(host, r),
        };
        if resolved.upstream_model != model {
            let Some(new) = request_head::with_model(body, resolved.upstream_model) else {
                return self.fail_request(host, &not_an_object());
            };
            if let Some(size) = body_size {
                host.set_request_body(size, &new);
                host.set_request_header("content-length", Some(&new.len().to_string()));
            }
        }
        host.set_request_header(metadata::HEADER_BACKEND, Some(resolved.backend));
        self.forward()
    }

    /// A routed body: resolve the model to a backend, check it, name the backend for Envoy's
    /// routes, and translate for that backend's API.
    #[allow(clippy::too_many_arguments)]
    fn decide_routed(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        routing: &Routing,
        path: &str,
        body: &[u8],
        body_size: Option<usize>,
        served: &Served,
    ) -> Action {
        let head = match RequestHead::parse(body) {
            Ok(h) => h,
            Err(e) => return self.fail_request(host, &e),
        };
        let model = match head.model() {
            Ok(m) => m,
            Err(e) => return self.fail_request(host, &e),
        };
        let resolved = match routing.check(model, self.grant.allowlist(host), served) {
            Ok(r) => r,
            Err(r) => return self.refuse(host, r),
        };
        let plan = match plan_request(resolved.upstream, path) {
            // A native API the backend does not speak (Ollama's `/api/chat` to an OpenAI
            // backend) would only reach the model server as an opaque, uncounted request.
            Ok(p) if !p.reads_body || foreign_native(path, resolved.upstream) => {
                let e = RequestError::UnsupportedEndpoint {
                    path: endpoint::bare(path).to_owned(),
                    upstream: resolved.upstream,
                };
                return self.fail_request(host, &e);
            }
            Ok(p) => p,
            Err(e) => return self.fail_request(host, &e),
        };
        host.set_request_header(metadata::HEADER_BACKEND, Some(resolved.backend));
        if resolved.upstream_model == model {
            let gate = Gate::Routed {
                target: resolved.target,
                renamed: false,
            };
            return self.decide_model_call(host, config, &plan, body, body_size, gate, Some(&head));
        }
        let Some(renamed) = request_head::with_model(body, resolved.upstream_model) else {
            return self.fail_request(host, &not_an_object());
        };
        let gate = Gate::Routed {
            target: resolved.target,
            renamed: true,
        };
        let mut head = head.clone();
        head.model = Some(resolved.upstream_model.to_owned());
        self.decide_model_call(host, config, &plan, &renamed, body_size, gate, Some(&head))
    }

    /// A model call's body: read its head, check the model, reserve, translate, rewrite.
    #[allow(clippy::too_many_arguments)]
    fn decide_model_call(
        &mut self,
        host: &mut impl Host,
        config: &Config,
        plan: &RequestPlan,
        body: &[u8],
        body_size: Option<usize>,
        gate: Gate<'_>,
        head: Option<&RequestHead>,
    ) -> Action {
        // A routed body was read when its model was.
        let parsed;
        let head = match head {
            Some(h) => h,
            None => match RequestHead::parse(body) {
                Ok(h) => {
                    parsed = h;
                    &parsed
                }
                Err(e) => return self.fail_request(host, &e),
            },
        };
        let mut rewritten = matches!(gate, Gate::Routed { renamed: true, .. });
        // Options that change how a shared Ollama loads and keeps a model act for everyone
        // on it: dropped unless the configuration allows them.
        let stripped;
        let body = if head.runtime_options && !config.allow_runtime_options {
            let Some(b) = request_head::without_runtime_options(body) else {
                return self.fail_request(host, &not_an_object());
            };
            stripped = b;
            rewritten = true;
            &stripped[..]
        } else {
            body
        };
        // Unbounded output (no bound, or Ollama's -1/-2) runs until the context is full: for
        // a caller with token or USD limits the reservation is written into the body as its
        // bound, so one request cannot overshoot by more than it reserved.
        let bounded;
        let body = match plan.output_bound_field() {
            Some(field) if !head.bounds_output() && self.grant.is_metered(host) => {
                let n = config.default_reservation_tokens;
                let Some(b) = request_head::with_output_bound(body, field, n) else {
                    return self.fail_request(host, &not_an_object());
                };
                bounded = b;
                rewritten = true;
                &bounded[..]
            }
            _ => body,
        };
        let translated = match plan.translate_with_head(body, head, &config.request_options) {
            Ok(t) => t,
            Err(e) => return self.fail_request(host, &e),
        };
        let Some(model) = translated.model() else {
            return self.fail_request(host, &RequestError::MissingModel);
        };
        let model = match gate {
            Gate::Single(served) => {
                let on = config.discovery.is_some();
                if let Err(r) = model_gate::check(model, self.grant.allowlist(host), served, on) {
                    return self.refuse(host, r);
                }
                model
            }
            Gate::Routed { target, .. } => target,
        };
        let price = config.prices.as_ref().and_then(|p| p.price_for(model));
        if price.is_none() && self.grant.has_usd_budget(host) {
            // Its cost could not be counted: admitting it would spend the budget unseen.
            return self.fail(
                host,
                RefusalCode::ModelNotPriced,
                "this model has no price on this gateway and the key has a USD budget",
            );
        }
        host.set_property(metadata::FILTER_STATE_MODEL, model);
        if self.grant.logs_prompts(host) && !body.is_empty() {
            let end = body.len().min(PROMPT_LOG_MAX);
            host.set_property(
                metadata::FILTER_STATE_PROMPT,
                &String::from_utf8_lossy(&body[..end]),
            );
        }
        let default_completion = plan
            .implied_completion(&config.request_options)
            .unwrap_or(config.default_reservation_tokens);
        let (prompt, completion) = head.reservation_parts(body, default_completion);
        let admission = Admission::new(prompt, completion, price);
        for (name, value) in admission.filter_state() {
            host.set_property(name, &value);
        }
        self.admission = Some(admission);
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
        self.expect = Some(response::Expect::Plan(translated.response));
        self.forward()
    }

    fn forward(&mut self) -> Action {
        self.phase = Phase::Forwarded;
        Action::Continue
    }

    fn fail_request(&mut self, host: &mut impl Host, e: &RequestError) -> Action {
        self.fail(host, e.code(), &e.to_string())
    }

    fn refuse(&mut self, host: &mut impl Host, r: Refusal) -> Action {
        self.fail(host, r.code, r.message)
    }

    fn fail(&mut self, host: &mut impl Host, code: RefusalCode, message: &str) -> Action {
        self.phase = Phase::Refused;
        send_error(host, &self.request_id, code, message);
        Action::Pause
    }

    fn refuse_path(&mut self, host: &mut impl Host, why: InvalidPath) -> Action {
        self.fail(host, RefusalCode::InvalidPath, &why.to_string())
    }

    /// Response headers: decide how the body is handled and fix the headers for it.
    pub fn on_response_headers(&mut self, host: &mut impl Host) -> Action {
        if let Some(expect) = &self.expect {
            self.response = Response::start(host, expect, &self.request_id);
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
        let grant = &self.grant;
        self.response
            .on_body(host, size, end_of_stream, |h| grant.allowlist(h).to_vec());
        Action::Continue
    }

    /// Stream done (also on client abort): settle the reservation and publish the debit as
    /// filter state for the rate limiter's stream-done call and the access log.
    pub fn on_log(&mut self, host: &mut impl Host) {
        let Some(admission) = &self.admission else {
            return;
        };
        let details = host
            .property(&["response", "code_details"])
            .unwrap_or_default();
        let outcome = Outcome::from_details(&details, || self.response.reported());
        let Some(settlement) = admission::settle(admission, outcome) else {
            return;
        };
        for (name, value) in settlement.filter_state(admission) {
            host.set_property(name, &value);
        }
    }
}

fn not_an_object() -> RequestError {
    RequestError::InvalidRequest("the body must be a JSON object".to_owned())
}

/// Ollama's native model endpoints to a backend of another API: counted in front of one
/// model server of any declared API (Ollama serves both behind `{}`), but a routed backend
/// declares its API, and this one does not speak it.
fn foreign_native(path: &str, upstream: Upstream) -> bool {
    upstream != Upstream::Ollama && translate::is_ollama_native(path)
}
