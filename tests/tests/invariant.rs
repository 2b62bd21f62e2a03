//! The enforcement invariant, checked on every path, server kind, mode and policy.
//!
//! **Invariant.** Whatever reaches a model server (the mock's request recorder is the
//! oracle, with what the server itself made of each request) was
//! - (a) authenticated, and the client's Tollgate key removed: no header carrying the
//!   `tg_` key (`authorization`, `x-api-key`, any other) reaches it;
//! - (b) for its model — as the upstream itself reads the body (Go's `encoding/json` for
//!   Ollama: case-insensitive keys with Unicode folding, the last duplicate winning;
//!   Python/pydantic lax for hosted providers: `1e5` and `"100"` as ints) or the path
//!   (`/v1/models/{id}`) — allowed by the key's allowlist and served;
//! - (c) for its operation — as the upstream interprets method + path (`GET` and
//!   `DELETE` of a generation path are stored-completion and model management calls to a
//!   hosted provider; Ollama's management endpoints; a trailing slash redirects) —
//!   allowed by the key's policy;
//! - (d) reserved against every token/USD limit of the key: the output budget the server
//!   honours (`max_completion_tokens`, else `max_tokens`, × `n` or `best_of`; Ollama's
//!   `options.num_predict`, unbounded when absent, 0 or negative) is bounded and covered;
//! - (e) debited when it ended;
//!
//! and Ollama runtime knobs that change a shared server for everyone (`keep_alive`,
//! `options.num_ctx`) never reach an Ollama server unless the filter configuration allows
//! them (the default here: dropped or refused).
//!
//! Whatever could not be checked was refused with a 4xx/5xx JSON error
//! `{"error":{"type","code","message","request_id"}}` with a non-empty request id, and never
//! reached the mock; no error body of a model server reaches the client unchanged.
//!
//! **Table** (`tollgate_e2e::invariant::table`): mock kind (ollama, openai, anthropic:
//! `mock-model-server --api`) × the filter's upstream kind (`{}` = openai, `ollama`,
//! `anthropic`), plus the routed example (two Ollama-kind backends and an OpenAI-kind one)
//! × every path each kind serves with every method an upstream acts on, and disguises ×
//! key policy (none, anonymous, model allowlist denied / allowed / with every operation,
//! embeddings only, TPM, day token budget, day USD budget) × body variants (plain,
//! streamed, case-variant and Unicode-folded keys, duplicate keys, number spellings,
//! output multipliers, runtime knobs). Each stack starts once; each policy has its own
//! key; each token/USD row a key nothing was counted on (fresh, or used only by rows that
//! were refused before any counting).
//!
//! **Oracle** (`tollgate_e2e::invariant::oracle`): per row, every recorded request
//! satisfies (a)–(c) for the row's key; under a token/USD limit of T the row's request is
//! sent up to 8 times (sequentially) and each admitted request's possible cost (prompt +
//! budget, or what it generated when more) plus what the admitted requests before it used
//! stays within T + one reservation (an admitted reservation is at most T, so 2T); every
//! error reply has Tollgate's shape. A failing stack lists every failing row, grouped by
//! cause first.

use tollgate_e2e::invariant::oracle::Cause;
use tollgate_e2e::invariant::run::{run, run_stack, RunOptions};
use tollgate_e2e::invariant::table::{
    self, MockKind, Policy, Row, StackKind, Upstream, Variant, PATHS,
};

fn check(kind: StackKind) {
    let report = run_stack(kind).unwrap_or_else(|e| panic!("stack [{kind}] did not run: {e}"));
    let text = report.render();
    // The summary line (table size, time) always; the failing rows in the panic message.
    println!("{}", text.lines().next().unwrap_or_default());
    let file = tollgate_e2e::paths::workspace_root()
        .join("target")
        .join(format!(
            "invariant-{}-{}.txt",
            kind.mock.map_or("routed", MockKind::api),
            match kind.upstream {
                Upstream::OpenAi => "default",
                other => other.label(),
            }
        ));
    let _ = std::fs::write(&file, &text);
    // Every row, passing or not: what the client got and what the server made of it.
    let _ = std::fs::write(file.with_extension("all.txt"), &report.dump);
    assert!(
        report.failures.is_empty(),
        "{} of {} rows break the invariant (report also in {}):\n{text}",
        report.failures.len(),
        report.rows,
        file.display()
    );
}

#[test]
fn the_table_spans_every_dimension() {
    let stacks = table::stacks();
    let per_stack: Vec<(String, usize)> = stacks
        .iter()
        .map(|s| (s.to_string(), table::rows(*s).len()))
        .collect();
    let total: usize = per_stack.iter().map(|(_, n)| n).sum();
    let mut variants = std::collections::BTreeSet::new();
    for s in &stacks {
        for r in table::rows(*s) {
            variants.insert(r.variant.label());
        }
    }
    let methods: std::collections::BTreeSet<&str> = PATHS.iter().map(|p| p.method).collect();
    println!(
        "invariant table: {} stacks (3 mock kinds × 3 upstream kinds single + 1 routed) × {} method+paths ({} methods) × {} policies × {} body variants (crossed per path tier) = {} rows",
        stacks.len(),
        PATHS.len(),
        methods.len(),
        Policy::ALL.len(),
        variants.len(),
        total
    );
    for (s, n) in &per_stack {
        println!("  [{s}]: {n} rows");
    }
    let all: Vec<Row> = stacks.iter().flat_map(|s| table::rows(*s)).collect();
    for policy in Policy::ALL {
        let n = all.iter().filter(|r| r.policy == policy).count();
        println!("  key {}: {n} rows", policy.label());
    }
    for method in &methods {
        let n = all.iter().filter(|r| r.method == *method).count();
        println!("  method {method}: {n} rows");
    }
    assert_eq!(stacks.len(), 10);
    assert!(methods.len() >= 5, "{methods:?}");
    assert!(variants.len() >= 20, "{variants:?}");
    // Every policy is crossed with every generation path on every stack.
    for s in &stacks {
        let rows = table::rows(*s);
        for policy in Policy::ALL {
            for target in ["/api/chat", "/v1/chat/completions", "/v1/messages"] {
                assert!(
                    rows.iter()
                        .any(|r| r.policy == policy && r.target == target),
                    "[{s}] {policy:?} {target}"
                );
            }
        }
    }
}

/// The oracle's own test: with the filter and the rate limiter taken out of Envoy (only
/// ext_authz left), the rows that only they enforce must fail, each for its own cause.
#[test]
fn the_oracle_flags_a_gateway_without_the_filter_and_the_rate_limiter() {
    fn keep(r: &Row) -> bool {
        matches!(
            r.policy,
            Policy::AllowlistDenied | Policy::Tpm | Policy::NoPolicy
        ) && matches!(r.target.as_str(), "/api/chat" | "/v1/chat/completions")
            && r.method == "POST"
    }
    let kind = StackKind::single(MockKind::Ollama, Upstream::Ollama);
    let opts = RunOptions {
        envoy_http_filters: Some(vec!["envoy.filters.http.ext_authz"]),
        only: Some(keep),
    };
    let report = run(kind, &opts).unwrap_or_else(|e| panic!("stack [{kind}] did not run: {e}"));
    let text = report.render();
    println!("{text}");
    let flagged = |policy: Policy, target: &str, variant: Variant, cause: &Cause| {
        report.failures.iter().any(|f| {
            f.row.policy == policy
                && f.row.target == target
                && f.row.variant == variant
                && f.violations.iter().any(|v| &v.cause == cause)
        })
    };
    let expected = [
        (
            Policy::AllowlistDenied,
            "/api/chat",
            Variant::Plain,
            Cause::ModelNotAllowed,
        ),
        (
            Policy::AllowlistDenied,
            "/v1/chat/completions",
            Variant::ModelCase("Model"),
            Cause::ModelNotAllowed,
        ),
        (Policy::Tpm, "/api/chat", Variant::Plain, Cause::Overshoot),
        (
            Policy::Tpm,
            "/v1/chat/completions",
            Variant::Multiplier,
            Cause::Overshoot,
        ),
        (
            Policy::Tpm,
            "/api/chat",
            Variant::BudgetAbsent,
            Cause::UnboundedOutput,
        ),
        (
            Policy::NoPolicy,
            "/api/chat",
            Variant::KeepAlive,
            Cause::RuntimeKnob,
        ),
    ];
    for (policy, target, variant, cause) in &expected {
        assert!(
            flagged(*policy, target, *variant, cause),
            "not flagged: {policy:?} {target} {variant:?} {cause:?}\n{text}"
        );
    }
    // Rows that keep the invariant without the filter are not flagged.
    assert!(
        !report
            .failures
            .iter()
            .any(|f| f.row.policy == Policy::NoPolicy && f.row.variant == Variant::Plain),
        "{text}"
    );
}

#[test]
fn ollama_mock_behind_default_openai_upstream() {
    check(StackKind::single(MockKind::Ollama, Upstream::OpenAi));
}

#[test]
fn ollama_mock_behind_ollama_upstream() {
    check(StackKind::single(MockKind::Ollama, Upstream::Ollama));
}

#[test]
fn ollama_mock_behind_anthropic_upstream() {
    check(StackKind::single(MockKind::Ollama, Upstream::Anthropic));
}

#[test]
fn openai_mock_behind_default_openai_upstream() {
    check(StackKind::single(MockKind::OpenAi, Upstream::OpenAi));
}

#[test]
fn openai_mock_behind_ollama_upstream() {
    check(StackKind::single(MockKind::OpenAi, Upstream::Ollama));
}

#[test]
fn openai_mock_behind_anthropic_upstream() {
    check(StackKind::single(MockKind::OpenAi, Upstream::Anthropic));
}

#[test]
fn anthropic_mock_behind_default_openai_upstream() {
    check(StackKind::single(MockKind::Anthropic, Upstream::OpenAi));
}

#[test]
fn anthropic_mock_behind_ollama_upstream() {
    check(StackKind::single(MockKind::Anthropic, Upstream::Ollama));
}

#[test]
fn anthropic_mock_behind_anthropic_upstream() {
    check(StackKind::single(MockKind::Anthropic, Upstream::Anthropic));
}

#[test]
fn routed_ollama_and_openai_backends() {
    check(StackKind::routed());
}
