//! Metrics, audit and health end to end: requests through real Envoy become exact metric
//! increments and audit rows (via Envoy's gRPC access log), without any content or key
//! material; readiness follows the key store.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tollgate_e2e::http;
use tollgate_e2e::postgres::Postgres;
use tollgate_e2e::stack::{Stack, StackOptions};

const PROMPT_MARKER: &str = "PROMPT-MARKER-7f3a9c-never-stored";

fn start(opts: StackOptions) -> Stack {
    Stack::start(opts).unwrap_or_else(|e| panic!("stack did not start: {e}"))
}

fn chat(stack: &Stack, key: Option<&str>) -> http::Response {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let body =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT_MARKER}]});
    http::post_json(stack.envoy_port, "/v1/chat/completions", &headers, &body).unwrap()
}

fn metrics(stack: &Stack) -> String {
    http::get(stack.authz_http_ports[0], "/metrics", &[])
        .unwrap()
        .text()
}

/// The value of one series, by its exact rendering (labels in alphabetical order).
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)?
                .strip_prefix(' ')?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn audit(stack: &Stack) -> Vec<Value> {
    let out = stack.admin(&["--json", "audit", "--since", "1h"]).unwrap();
    match serde_json::from_str(out.trim()) {
        Ok(Value::Array(a)) => a,
        other => panic!("audit export is not a JSON array: {other:?}"),
    }
}

#[test]
fn allowed_and_denied_requests_become_exact_metrics_and_audit_rows_without_content() {
    let stack = start(StackOptions::default());
    let (key_id, key) = stack.create_key("acme", Some(3)).unwrap();
    let tenant = stack.admin(&["--json", "tenant", "list"]).unwrap();
    let tenant_id = serde_json::from_str::<Value>(&tenant).unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = metrics(&stack);
    assert_eq!(
        series(
            &before,
            "tollgate_authz_checks_total{code=\"ok\",result=\"allow\"}"
        ),
        0.0
    );

    let mut rids = Vec::new();
    for _ in 0..3 {
        let r = chat(&stack, Some(&key));
        assert_eq!(r.status, 200, "{}", r.text());
        rids.push(r.header("x-request-id").unwrap().to_string());
    }
    let limited = chat(&stack, Some(&key));
    assert_eq!(limited.status, 429);
    for _ in 0..2 {
        assert_eq!(chat(&stack, None).status, 401);
    }

    // The access log is flushed every 0.2 s and written in batches.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let rows = audit(&stack);
        if rows.len() >= 6 || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(rows.len(), 6, "{rows:#?}\n{}", stack.logs());
    let count = |decision: &str, reason: &str, status: u64| {
        rows.iter()
            .filter(|r| r["decision"] == decision && r["reason"] == reason && r["status"] == status)
            .count()
    };
    assert_eq!(count("allowed", "ok", 200), 3, "{rows:#?}");
    assert_eq!(count("denied", "rate_limited", 429), 1, "{rows:#?}");
    assert_eq!(count("denied", "missing_api_key", 401), 2, "{rows:#?}");
    for r in rows.iter().filter(|r| r["status"] == 200) {
        assert_eq!(r["key_id"], key_id.as_str());
        assert_eq!(r["tenant_id"], tenant_id.as_str());
        assert_eq!(r["operation"], "chat");
        assert_eq!(r["model"], "gpt-4o-mini");
        assert_eq!(
            (r["tokens_in"].as_u64(), r["tokens_out"].as_u64()),
            (Some(1), Some(5)),
            "{r}"
        );
        assert_eq!(r["client_ip"], "127.0.0.1");
        assert!(
            rids.contains(&r["request_id"].as_str().unwrap().to_string()),
            "{r}"
        );
    }
    let limited_row = rows.iter().find(|r| r["status"] == 429).unwrap();
    assert_eq!(
        limited_row["request_id"],
        limited.header("x-request-id").unwrap()
    );
    assert_eq!(limited_row["key_id"], key_id.as_str());

    let after = metrics(&stack);
    let t = &tenant_id;
    assert_eq!(
        series(
            &after,
            &format!(
                "gateway_requests_total{{model=\"gpt-4o-mini\",status=\"200\",tenant=\"{t}\"}}"
            )
        ),
        3.0,
        "{after}"
    );
    assert_eq!(
        series(
            &after,
            &format!(
                "gateway_requests_total{{model=\"gpt-4o-mini\",status=\"429\",tenant=\"{t}\"}}"
            )
        ),
        1.0
    );
    // The mock reports 1 prompt token (one word) and 5 completion tokens per request.
    let tokens = |dir: &str| {
        series(
            &after,
            &format!(
                "gateway_tokens_total{{direction=\"{dir}\",model=\"gpt-4o-mini\",tenant=\"{t}\"}}"
            ),
        )
    };
    assert_eq!((tokens("in"), tokens("out")), (3.0, 15.0), "{after}");
    assert_eq!(
        series(
            &after,
            "gateway_requests_total{model=\"none\",status=\"401\",tenant=\"none\"}"
        ),
        2.0
    );
    assert_eq!(
        series(
            &after,
            "tollgate_authz_checks_total{code=\"ok\",result=\"allow\"}"
        ),
        4.0
    );
    assert_eq!(
        series(
            &after,
            "tollgate_authz_checks_total{code=\"missing_api_key\",result=\"deny\"}"
        ),
        2.0
    );
    assert_eq!(
        series(&after, "tollgate_audit_events_total{result=\"written\"}"),
        6.0
    );
    assert_eq!(
        series(&after, "tollgate_audit_events_total{result=\"dropped\"}"),
        0.0
    );
    assert_eq!(
        series(
            &after,
            &format!("gateway_request_duration_seconds_count{{tenant=\"{t}\"}}")
        ),
        4.0
    );

    // Neither the prompt nor the key secret is in any audit row, log, or the database.
    let secret = tollgate_core::api_key::parse(&key)
        .unwrap()
        .secret
        .to_string();
    let mut haystack = serde_json::to_string(&rows).unwrap() + &stack.logs() + &after;
    for f in ["tollgate.db", "tollgate.db-wal"] {
        if let Ok(b) = std::fs::read(stack.dir.join(f)) {
            haystack.push_str(&String::from_utf8_lossy(&b));
        }
    }
    assert!(
        !haystack.contains(PROMPT_MARKER),
        "the prompt was stored or logged"
    );
    assert!(
        !haystack.contains(&secret),
        "a key secret was stored or logged"
    );
    // The table form works too.
    let table = stack
        .admin(&["audit", "--since", "1h", "--tenant", "acme"])
        .unwrap();
    assert_eq!(table.lines().count(), 1 + 4, "{table}");
}

#[test]
fn readiness_follows_the_key_store_and_recovers() {
    let mut pg = Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL did not start: {e}"));
    let stack = start(StackOptions {
        database_url: Some(pg.url()),
        ..Default::default()
    });
    let port = stack.authz_http_ports[0];
    let wait_for = |want: u16| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = http::get(port, "/readyz", &[])
                .map(|r| r.status)
                .unwrap_or(0);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz stayed {got}, wanted {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(200);
    pg.stop_server();
    wait_for(503);
    assert_eq!(
        http::get(port, "/healthz", &[]).unwrap().status,
        200,
        "liveness must not follow the store"
    );
    pg.start_server().unwrap();
    wait_for(200);
}

#[test]
fn prompt_logging_is_opt_in_per_tenant_and_kept_apart_from_audit() {
    let stack = start(StackOptions::default());
    let (_, logged_key) = stack.create_key("logged", None).unwrap();
    let (_, quiet_key) = stack.create_key("quiet", None).unwrap();
    stack
        .admin(&["tenant", "prompt-log", "logged", "--days", "7"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(chat(&stack, Some(&logged_key)).status, 200);
    assert_eq!(chat(&stack, Some(&quiet_key)).status, 200);
    let export = |tenant: &str| -> Vec<Value> {
        let out = stack
            .admin(&["--json", "prompts", "--tenant", tenant, "--since", "1h"])
            .unwrap();
        serde_json::from_str(out.trim()).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut logged = export("logged");
    while logged.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        logged = export("logged");
    }
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(logged[0]["body"].as_str().unwrap().contains(PROMPT_MARKER));
    assert_eq!(logged[0]["model"], "gpt-4o-mini");
    // The other tenant's prompt is nowhere, and audit rows hold no content for either.
    audit(&stack);
    assert!(export("quiet").is_empty());
    let rows = serde_json::to_string(&audit(&stack)).unwrap();
    assert!(!rows.contains(PROMPT_MARKER), "content in the audit log");
    // Turning it off purges what was kept.
    stack
        .admin(&["tenant", "prompt-log", "logged", "--days", "0"])
        .unwrap();
    assert!(export("logged").is_empty());
}
