//! Token limits end to end: real Envoy, the filter counting streamed usage, tollgate-ratelimit
//! admitting against reservations and reconciling at stream end, in memory and on Redis
//! (with an outage in the middle).

use serde_json::json;
use std::time::{Duration, Instant};
use tollgate_e2e::http;
use tollgate_e2e::redis::Redis;
use tollgate_e2e::stack::{Stack, StackOptions};

fn start(opts: StackOptions) -> Stack {
    Stack::start(opts).unwrap_or_else(|e| panic!("stack did not start: {e}"))
}

/// A streamed chat of 10 completion tokens (the mock's chunks) and 2 prompt tokens, asking
/// for at most 20: the filter reserves 20 plus the prompt estimate.
fn stream(stack: &Stack, key: &str) -> http::Response {
    let auth = format!("Bearer {key}");
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 20,
                      "messages": [{"role": "user", "content": "two words"}]});
    http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &auth), ("x-mock-chunks", "10")],
        &body,
    )
    .unwrap()
}

fn code(r: &http::Response) -> String {
    r.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Streams until refused; returns how many were admitted and the refusal.
fn until_refused(stack: &Stack, key: &str, max: usize) -> (usize, http::Response) {
    for i in 0..max {
        let r = stream(stack, key);
        if r.status != 200 {
            return (i, r);
        }
        assert!(r.text().contains("data: [DONE]"), "{}", r.text());
        // The stream-done debit is a separate call after the response: let it land.
        std::thread::sleep(Duration::from_millis(150));
    }
    panic!("never refused after {max} requests:\n{}", stack.logs());
}

fn streamed_chats(stack: &Stack) -> usize {
    stack
        .mock_requests()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .count()
}

#[test]
fn tpm_counts_real_streamed_usage_and_refunds_unused_reservations() {
    let stack = start(StackOptions::default());
    let (_, key) = stack.create_key("acme", None).unwrap();
    let keys = stack.admin(&["--json", "key", "list"]).unwrap();
    let key_id = serde_json::from_str::<serde_json::Value>(&keys).unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    stack
        .admin(&["policy", "set", "--key", &key_id, "--tpm", "100"])
        .unwrap();
    let r = stream(&stack, &key);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("100"));
    // Each stream really uses 12 tokens; its reservation (max_tokens 20 + ~bytes/4 of prompt,
    // about 47) is admitted, then refunded down to 12 at stream end. Without refunds only
    // 2 streams would fit in 100; with them, streams fit while 12 each plus one reservation
    // stays under 100.
    std::thread::sleep(Duration::from_millis(150));
    let (admitted, refused) = until_refused(&stack, &key, 20);
    let total = admitted + 1;
    assert!(
        total > 2,
        "unused reservations were not refunded: {total} admitted"
    );
    assert!(
        total * 12 <= 100,
        "admitted {total} streams of 12 tokens under 100 TPM"
    );
    assert_eq!(refused.status, 429);
    assert_eq!(code(&refused), "tokens_exhausted", "{}", refused.text());
    assert!(refused.header("retry-after").is_some());
    assert_eq!(
        refused.json()["error"]["request_id"],
        refused.header("x-request-id").unwrap()
    );
    assert_eq!(
        streamed_chats(&stack),
        total,
        "the refused request reached the model server"
    );
}

#[test]
fn daily_token_budget_is_exhausted_and_reported_as_such() {
    let stack = start(StackOptions::default());
    let (_, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&["policy", "set", "--tenant", "acme", "--budget-day", "60"])
        .unwrap();
    // Streams (reserved ~47, used 12) fit while used tokens plus one reservation stay
    // within the budget: two here.
    let (admitted, refused) = until_refused(&stack, &key, 10);
    assert!(
        admitted >= 1 && admitted * 12 <= 60,
        "admitted {admitted} under a 60-token budget"
    );
    assert_eq!(
        (refused.status, code(&refused)),
        (429, "budget_exceeded".to_string()),
        "{}",
        refused.text()
    );
}

#[test]
fn tpm_on_redis_fails_closed_while_redis_is_down_and_recovers() {
    let mut redis = Redis::start().unwrap_or_else(|e| panic!("redis did not start: {e}"));
    let stack = start(StackOptions {
        ratelimit_args: vec![
            "--redis-url".into(),
            redis.url(),
            "--redis-timeout-ms".into(),
            "300".into(),
        ],
        ..Default::default()
    });
    let (_, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&[
            "policy", "set", "--tenant", "acme", "--tpm", "100", "--rpm", "1000",
        ])
        .unwrap();
    let r = stream(&stack, &key);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), stack.logs());
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("100"));
    std::thread::sleep(Duration::from_millis(150));
    let before = streamed_chats(&stack);
    let readyz = |want: u16| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = http::get(stack.ratelimit_http_port, "/readyz", &[])
                .map(|r| r.status)
                .unwrap_or(0);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ratelimit /readyz stayed {got}, wanted {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    readyz(200);
    redis.stop_server();
    readyz(503);
    for _ in 0..5 {
        let r = stream(&stack, &key);
        assert_eq!(
            (r.status, code(&r)),
            (503, "ratelimit_unavailable".to_string()),
            "{}",
            r.text()
        );
    }
    assert_eq!(
        streamed_chats(&stack),
        before,
        "a request passed while Redis was down"
    );
    redis.start_server().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = stream(&stack, &key);
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after Redis came back: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    readyz(200);
    let m = http::get(stack.ratelimit_http_port, "/metrics", &[])
        .unwrap()
        .text();
    let count = |result: &str| -> f64 {
        m.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "tollgate_ratelimit_decisions_total{{result=\"{result}\"}} "
                ))?
                .parse()
                .ok()
            })
            .unwrap_or(0.0)
    };
    assert!(count("unavailable") >= 5.0, "{m}");
    assert!(count("ok") >= 2.0, "{m}");
}

#[test]
fn ratelimit_foundation_profile_refuses_in_memory_counters() {
    let out = std::process::Command::new(tollgate_e2e::paths::binary("tollgate-ratelimit"))
        .args(["--profile", "foundation", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("counters must be in Redis"), "{err}");
}
