//! The oracle: what the mocks recorded (and what they made of it) against the key's policy,
//! and what the client got back against the error contract.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;
use tollgate_core::model_pattern;

use super::table::{self, Policy, Row, TOKEN_LIMIT, USD_LIMIT_UNITS};

/// What one request of a row got back.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// Why a row breaks the invariant. The label groups failing rows into causes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    /// (a) A request without credentials reached a model server.
    Unauthenticated,
    /// (a) The client's `tg_` key reached a model server.
    KeyLeaked,
    /// The routing header (`x-tollgate-backend`) reached a model server.
    RoutingHeaderLeaked,
    /// (b) The model the server read is outside the key's allowlist.
    ModelNotAllowed,
    /// (b) Routed mode (the filter knows the served models): a model its backend does not
    /// serve reached it.
    NotServed,
    /// (c) The operation the server performed is not allowed to the key.
    OperationNotAllowed(String),
    /// A runtime knob of a shared Ollama server arrived (not allowed by default).
    RuntimeKnob,
    /// (d) Admitted under a token/USD limit with nothing bounding the output.
    UnboundedOutput,
    /// (d)+(e) More tokens / USD than the limit plus one reservation.
    Overshoot,
    /// An error reply that is not Tollgate's JSON error with a request id: the server's
    /// own error body passed through.
    UpstreamErrorRaw,
    /// An error reply that is not Tollgate's JSON error with a request id, made by the
    /// gateway itself.
    GatewayErrorShape,
    /// A request reached a mock without the row's tag (the harness cannot attribute it).
    Untagged,
    /// The row could not be run (harness problem).
    NotRun,
}

impl Cause {
    pub fn label(&self) -> String {
        match self {
            Cause::Unauthenticated => "(a) unauthenticated request reached the model server".into(),
            Cause::KeyLeaked => "(a) the client's tg_ key reached the model server".into(),
            Cause::RoutingHeaderLeaked => "x-tollgate-backend reached the model server".into(),
            Cause::ModelNotAllowed => {
                "(b) model outside the key's allowlist reached the model server (as the server reads the body/path)".into()
            }
            Cause::NotServed => {
                "(b) routed: a model its backend does not serve reached it (the server answered 404)".into()
            }
            Cause::OperationNotAllowed(op) => {
                format!("(c) operation `{op}` (as the server interprets method+path) not allowed to the key reached the model server")
            }
            Cause::RuntimeKnob => {
                "runtime knob (keep_alive / options.num_ctx / load-time options) reached an Ollama server (default: drop or refuse)".into()
            }
            Cause::UnboundedOutput => {
                "(d) admitted under a token/USD limit with no output bound the server honours (it may generate without limit)".into()
            }
            Cause::Overshoot => {
                "(d)+(e) token/USD overshoot: what the server was asked to generate exceeds the limit plus one reservation".into()
            }
            Cause::UpstreamErrorRaw => {
                "error reply: the model server's own error body reached the client (no Tollgate JSON error with request_id)".into()
            }
            Cause::GatewayErrorShape => {
                "error reply from the gateway without Tollgate's JSON error {type,code,message,request_id}".into()
            }
            Cause::Untagged => "a request reached a mock without the client's tag".into(),
            Cause::NotRun => "row could not be run".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub cause: Cause,
    pub detail: String,
}

fn v(cause: Cause, detail: impl Into<String>) -> Violation {
    Violation {
        cause,
        detail: detail.into(),
    }
}

/// Tollgate's vocabulary for what the server did; `None` when it did nothing.
pub fn operation_class(api: &str, op: &str) -> Option<&'static str> {
    let class = match (api, op) {
        (_, "none") => return None,
        ("ollama", "chat" | "compat_chat") => "chat",
        ("ollama", "generate" | "compat_completions") => "completions",
        ("ollama", "embed" | "embeddings" | "compat_embeddings") => "embeddings",
        (
            "ollama",
            "health" | "version" | "tags" | "ps" | "show" | "compat_models" | "compat_model",
        ) => "models",
        ("openai", "chat") => "chat",
        ("openai", "completions") => "completions",
        ("openai", "embeddings") => "embeddings",
        ("openai", "models" | "model") => "models",
        ("openai", "speech" | "transcription" | "translation") => "audio",
        ("openai", "images") => "images",
        ("openai", "moderation") => "moderation",
        ("anthropic", "messages") => "chat",
        ("anthropic", "models" | "model") => "models",
        ("all", "chat" | "messages") => "chat",
        ("all", "generate" | "completions") => "completions",
        ("all", "embed" | "embeddings") => "embeddings",
        ("all", "tags" | "version" | "show" | "health" | "models") => "models",
        // Management (pull, push, create, copy, delete, blobs), stored completions, model
        // deletion, files, the Responses API, token counting, batches: `other`.
        _ => "other",
    };
    Some(class)
}

/// One recorded request as the oracle reads it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub it: Value,
}

impl Seen {
    pub fn from_json(r: &Value) -> Self {
        let headers = r["headers"]
            .as_object()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Seen {
            method: r["method"].as_str().unwrap_or_default().to_owned(),
            path: r["path"].as_str().unwrap_or_default().to_owned(),
            headers,
            it: r["interpreted"].clone(),
        }
    }

    fn s(&self, k: &str) -> &str {
        self.it[k].as_str().unwrap_or_default()
    }

    fn n(&self, k: &str) -> u64 {
        self.it[k].as_u64().unwrap_or(0)
    }

    pub fn status(&self) -> u16 {
        u16::try_from(self.n("status")).unwrap_or(0)
    }

    /// Ran: answered 200 (nothing is generated otherwise).
    pub fn ran(&self) -> bool {
        self.status() == 200
    }

    /// The output budget it was asked to honour over all choices; `None` = unbounded.
    pub fn budget(&self) -> Option<u64> {
        let per_choice = self.it["max_tokens"].as_u64()?;
        Some(per_choice.saturating_mul(self.n("n").max(1)))
    }

    pub fn generates(&self) -> bool {
        self.it["generates"].as_bool().unwrap_or(false)
    }

    /// In the metered unit (tokens, or $0.0001 at the model's price): what it used, and
    /// what it could use (`None`: unbounded).
    pub fn cost(&self, usd: bool) -> (u64, Option<u64>) {
        let model = self.it["model"].as_str();
        let price = |tin: u64, tout: u64| {
            if usd {
                table::usd_units(model, tin, tout)
            } else {
                tin.saturating_add(tout)
            }
        };
        let (tin, tout) = (self.n("tokens_in"), self.n("tokens_out"));
        let used = price(tin, tout);
        let could = if self.generates() {
            self.budget().map(|b| price(tin, b.max(tout)))
        } else {
            Some(used)
        };
        (used, could)
    }

    pub fn summary(&self) -> String {
        let opt = |k: &str| match &self.it[k] {
            Value::Null => "-".to_owned(),
            other => other.to_string(),
        };
        format!(
            "{} {} → {}.{} model={} stream={} max_tokens={} n={} in={} out={} keep_alive={} num_ctx={} load_options={} status={}",
            self.method,
            self.path,
            self.s("api"),
            self.s("operation"),
            opt("model"),
            opt("stream"),
            opt("max_tokens"),
            self.n("n"),
            self.n("tokens_in"),
            self.n("tokens_out"),
            opt("keep_alive"),
            opt("num_ctx"),
            opt("load_options"),
            self.status(),
        )
    }
}

/// The limit of a metered policy, in its unit, and whether that unit is USD.
fn limit(policy: Policy) -> Option<(u64, bool)> {
    match policy {
        Policy::Tpm | Policy::BudgetDay => Some((TOKEN_LIMIT, false)),
        Policy::UsdDay => Some((USD_LIMIT_UNITS, true)),
        _ => None,
    }
}

/// Every violation of one row: its recorded requests (in order) and its replies.
pub fn check(row: &Row, seen: &[Seen], replies: &[Reply]) -> Vec<Violation> {
    let mut out = Vec::new();
    let patterns = row
        .policy
        .allowlist()
        .map(|p| model_pattern::parse_list(p).unwrap_or_default());
    for s in seen {
        if row.policy == Policy::Anonymous {
            out.push(v(Cause::Unauthenticated, s.summary()));
        }
        if let Some((name, _)) = s.headers.iter().find(|(_, value)| value.contains("tg_")) {
            out.push(v(
                Cause::KeyLeaked,
                format!("header {name}: {}", s.summary()),
            ));
        }
        if let Some(value) = s.headers.get("x-tollgate-backend") {
            out.push(v(
                Cause::RoutingHeaderLeaked,
                format!("x-tollgate-backend: {value}: {}", s.summary()),
            ));
        }
        let class = operation_class(s.s("api"), s.s("operation"));
        if let (Some(_), Some(model), Some(patterns)) = (class, s.it["model"].as_str(), &patterns) {
            if !model_pattern::any_matches(patterns, model) {
                out.push(v(Cause::ModelNotAllowed, s.summary()));
            }
        }
        if row.stack.mock.is_none()
            && class.is_some()
            && s.status() == 404
            && s.it["model"].is_string()
        {
            out.push(v(Cause::NotServed, s.summary()));
        }
        if let Some(op) = class {
            if !row.policy.operations().contains(&op) {
                out.push(v(Cause::OperationNotAllowed(op.to_owned()), s.summary()));
            }
        }
        let load_options = s.it["load_options"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
        if s.s("api") == "ollama"
            && (!s.it["keep_alive"].is_null() || !s.it["num_ctx"].is_null() || load_options)
        {
            out.push(v(Cause::RuntimeKnob, s.summary()));
        }
    }
    if let Some((limit, usd)) = limit(row.policy) {
        // Sequential requests on a key nothing was counted on before: each admitted one
        // must fit what the ones before it used plus what it may use, within the limit
        // plus one reservation (an admitted reservation is at most the limit).
        let bound = 2 * limit;
        let mut spent = 0u64;
        let mut worst: Option<String> = None;
        for s in seen.iter().filter(|s| s.ran()) {
            let (used, could) = s.cost(usd);
            match could {
                None => {
                    out.push(v(Cause::UnboundedOutput, s.summary()));
                    break;
                }
                Some(c) if spent.saturating_add(c) > bound => {
                    worst = Some(format!(
                        "spent {spent} + this request's {c} > {bound} (limit {limit}{unit} + one reservation) at: {}",
                        s.summary(),
                        unit = if usd { " units of $0.0001" } else { " tokens" }
                    ));
                    break;
                }
                Some(_) => spent = spent.saturating_add(used),
            }
        }
        if let Some(w) = worst {
            out.push(v(Cause::Overshoot, w));
        }
    }
    for (i, r) in replies.iter().enumerate() {
        if r.status < 400 || row.method == "HEAD" {
            continue;
        }
        if !is_tollgate_error(&r.body) {
            let upstream = seen.iter().any(|s| s.status() == r.status);
            let cause = if upstream {
                Cause::UpstreamErrorRaw
            } else {
                Cause::GatewayErrorShape
            };
            out.push(v(
                cause,
                format!("reply #{}: {} {}", i + 1, r.status, snippet(&r.body)),
            ));
            break;
        }
    }
    out
}

/// `{"error":{"type","code","message","request_id"}}` with a non-empty request id.
pub fn is_tollgate_error(body: &str) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return false;
    };
    let e = &v["error"];
    let non_empty = |k: &str| e[k].as_str().is_some_and(|s| !s.is_empty());
    non_empty("type") && non_empty("code") && non_empty("message") && non_empty("request_id")
}

pub fn snippet(s: &str) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    match one_line.char_indices().nth(140) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

/// A failing row as printed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub row: Row,
    pub violations: Vec<Violation>,
    pub seen: Vec<Seen>,
    pub replies: Vec<Reply>,
}

impl Failure {
    pub fn render(&self) -> String {
        let mut s = format!("row {}: {}\n", self.row.id, self.row.describe());
        for violation in &self.violations {
            let _ = writeln!(
                s,
                "    ✗ {} — {}",
                violation.cause.label(),
                violation.detail
            );
        }
        let statuses: Vec<String> = self.replies.iter().map(|r| r.status.to_string()).collect();
        let _ = writeln!(s, "    client got: [{}]", statuses.join(", "));
        if self.seen.is_empty() {
            let _ = writeln!(s, "    mock recorded: nothing");
        }
        for seen in self.seen.iter().take(3) {
            let _ = writeln!(s, "    mock recorded: {}", seen.summary());
        }
        if self.seen.len() > 3 {
            let _ = writeln!(
                s,
                "    mock recorded: … {} requests in all",
                self.seen.len()
            );
        }
        s
    }
}

/// Failing rows grouped by cause and path, with the stacks, policies and variants each
/// group spans: the compact list to fix from.
pub fn group(failures: &[Failure]) -> String {
    #[derive(Default)]
    struct G {
        rows: usize,
        stacks: std::collections::BTreeSet<String>,
        policies: std::collections::BTreeSet<&'static str>,
        variants: std::collections::BTreeSet<String>,
    }
    let mut groups: BTreeMap<(String, String), G> = BTreeMap::new();
    for f in failures {
        let mut causes: Vec<&Cause> = f.violations.iter().map(|v| &v.cause).collect();
        causes.sort();
        causes.dedup();
        for cause in causes {
            let key = (
                cause.label(),
                format!(
                    "{} {}",
                    f.row.method,
                    f.row.target.replace(f.row.model, "{model}")
                ),
            );
            let g = groups.entry(key).or_default();
            g.rows += 1;
            g.stacks.insert(match f.row.stack.mock {
                Some(m) => format!("{}@{}", m.api(), f.row.stack.upstream.label()),
                None => "routed".into(),
            });
            g.policies.insert(f.row.policy.label());
            g.variants.insert(f.row.variant.label());
        }
    }
    let mut by_cause: BTreeMap<String, Vec<(String, G)>> = BTreeMap::new();
    for ((cause, path), g) in groups {
        by_cause.entry(cause).or_default().push((path, g));
    }
    let mut s = String::new();
    for (cause, paths) in by_cause {
        let total: usize = paths.iter().map(|(_, g)| g.rows).sum();
        let _ = writeln!(s, "== {cause}: {total} rows");
        for (path, g) in paths {
            let join = |set: Vec<String>| set.join(", ");
            let _ = writeln!(
                s,
                "   {path} ({} rows) mock@upstream: [{}]; keys: [{}]; bodies: [{}]",
                g.rows,
                join(g.stacks.into_iter().collect()),
                join(g.policies.into_iter().map(str::to_owned).collect()),
                join(g.variants.into_iter().collect()),
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_contract_needs_every_field_and_a_request_id() {
        assert!(is_tollgate_error(
            r#"{"error":{"type":"t","code":"c","message":"m","request_id":"r"}}"#
        ));
        assert!(!is_tollgate_error(
            r#"{"error":{"type":"t","code":"c","message":"m","request_id":""}}"#
        ));
        assert!(!is_tollgate_error(r#"{"error":"not found"}"#));
        assert!(!is_tollgate_error("404 page not found"));
    }

    #[test]
    fn operations_map_to_the_policy_vocabulary() {
        assert_eq!(operation_class("ollama", "chat"), Some("chat"));
        assert_eq!(operation_class("ollama", "pull"), Some("other"));
        assert_eq!(operation_class("openai", "delete_model"), Some("other"));
        assert_eq!(operation_class("openai", "list_stored"), Some("other"));
        assert_eq!(operation_class("anthropic", "none"), None);
    }
}
