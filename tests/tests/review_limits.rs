//! Limits as an attacker and a new user see them, through real Envoy: budgets that must
//! arrive as set, and requests that must not run outside the key's token accounting.

use serde_json::json;
use tollgate_e2e::http;
use tollgate_e2e::stack::{Stack, StackOptions};

fn start() -> Stack {
    Stack::start(StackOptions::default()).unwrap_or_else(|e| panic!("stack did not start: {e}"))
}

fn chat(stack: &Stack, key: &str) -> http::Response {
    let auth = format!("Bearer {key}");
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 20,
                      "messages": [{"role": "user", "content": "hi"}]});
    http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        &body,
    )
    .unwrap()
}

#[test]
fn token_budgets_envoy_cannot_carry_are_refused_and_the_largest_one_admits() {
    let stack = start();
    let (id, key) = stack.create_key("acme", None).unwrap();
    // Envoy casts the limit to a uint32: 2^32 + 10 tokens would arrive as a 10-token
    // budget (every request refused); 0 would refuse everything too.
    let wraps = (u64::from(u32::MAX) + 10).to_string();
    for (flag, value) in [
        ("--budget-month", wraps.as_str()),
        ("--budget-day", wraps.as_str()),
        ("--budget-day", "0"),
        ("--budget-month", "0"),
    ] {
        let r = stack.admin(&["policy", "set", "--key", &id, flag, value]);
        assert!(r.is_err(), "{flag} {value} was stored: {r:?}");
    }
    let largest = u32::MAX.to_string();
    stack
        .admin(&["policy", "set", "--key", &id, "--budget-month", &largest])
        .unwrap();
    let r = chat(&stack, &key);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn endpoints_whose_usage_is_not_counted_are_refused_under_token_and_usd_limits() {
    let stack = start();
    let (id, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&[
            "policy",
            "set",
            "--key",
            &id,
            "--operations",
            "*",
            "--tpm",
            "1000",
        ])
        .unwrap();
    let auth = format!("Bearer {key}");
    // The filter passes these through without a reservation: Envoy drops the token
    // descriptors, so they would run outside the TPM and every budget.
    for path in [
        "/v1/responses",
        "/v1/images/generations",
        "/v1/audio/speech",
    ] {
        let body = json!({"model": "gpt-4o-mini", "input": "hi"});
        let r =
            http::post_json(stack.envoy_port, path, &[("authorization", &auth)], &body).unwrap();
        assert_eq!(
            (r.status, r.error_code()),
            (403, "operation_not_allowed".to_string()),
            "{path}: {}",
            r.text()
        );
    }
    assert!(
        stack.mock_requests().unwrap().is_empty(),
        "an uncounted request reached the model server"
    );
    assert_eq!(chat(&stack, &key).status, 200);
    // Without token or USD limits the policy's operations decide alone.
    stack
        .admin(&["policy", "set", "--key", &id, "--unset", "tpm"])
        .unwrap();
    // (the policy change reaches the key cache within the event poll)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let r = loop {
        let r = http::post_json(
            stack.envoy_port,
            "/v1/responses",
            &[("authorization", &auth)],
            &json!({"model": "gpt-4o-mini", "input": "hi"}),
        )
        .unwrap();
        if r.status != 403 || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_ne!(r.status, 403, "{}", r.text());
}

#[test]
fn huge_expiry_and_grace_are_far_future_not_a_crash_or_a_dead_key() {
    let stack = start();
    let (id, old) = stack.create_key("acme", None).unwrap();
    let max = i64::MAX.to_string();
    let out = stack
        .admin(&[
            "--json",
            "key",
            "create",
            "--tenant",
            "acme",
            "--name",
            "far",
            "--expires-in",
            &max,
        ])
        .unwrap();
    let far: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(chat(&stack, far["key"].as_str().unwrap()).status, 200);
    // A rotation that panicked after issuing the new key left the old one unrotated.
    let grace = format!("--grace={max}");
    let out = stack
        .admin(&["--json", "key", "rotate", &id, &grace])
        .unwrap();
    let new: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(chat(&stack, new["key"].as_str().unwrap()).status, 200);
    assert_eq!(chat(&stack, &old).status, 200, "the grace is not over");
    let keys: serde_json::Value =
        serde_json::from_str(&stack.admin(&["--json", "key", "list"]).unwrap()).unwrap();
    let old_row = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap();
    assert_eq!(old_row["rotated_to"], new["id"], "{keys}");
}

#[test]
fn max_tokens_beyond_the_whole_tpm_is_refused_without_a_retry_that_cannot_help() {
    let stack = start();
    let (id, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&["policy", "set", "--key", &id, "--tpm", "100"])
        .unwrap();
    let auth = format!("Bearer {key}");
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 5000,
                      "messages": [{"role": "user", "content": "hi"}]});
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        &body,
    )
    .unwrap();
    assert_eq!(
        (r.status, r.error_code()),
        (429, "tokens_exhausted".to_string())
    );
    // A client (OpenAI's SDKs do) would wait and retry forever.
    assert_eq!(r.header("retry-after"), None, "{:?}", r.headers);
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("max_tokens"), "{message}");
    assert_eq!(
        chat(&stack, &key).status,
        200,
        "a request that fits still runs"
    );
}

/// The local template with Envoy keeping the client's `x-request-id` (operators turn this on
/// to correlate traces with their clients'; Envoy also keeps it from "internal" addresses).
fn preserving_request_ids(config: &str) -> Result<String, String> {
    let from = "use_remote_address: true\n";
    if !config.contains(from) {
        return Err("no use_remote_address in the rendered config".into());
    }
    Ok(config.replacen(
        from,
        "use_remote_address: true\n          preserve_external_request_id: true\n",
        1,
    ))
}

#[test]
fn a_reused_request_id_cannot_free_another_streams_slot() {
    let stack = Stack::start(StackOptions {
        envoy_transform: Some(preserving_request_ids),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    let (id, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&["policy", "set", "--key", &id, "--max-concurrent", "1"])
        .unwrap();
    let port = stack.envoy_port;
    let slow = |key: String| {
        std::thread::spawn(move || {
            let auth = format!("Bearer {key}");
            let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 20,
                              "messages": [{"role": "user", "content": "hi"}]});
            http::post_json(
                port,
                "/v1/chat/completions",
                &[
                    ("authorization", &auth),
                    ("x-request-id", "same-id"),
                    ("x-mock-chunks", "10"),
                    ("x-mock-chunk-delay-ms", "150"),
                ],
                &body,
            )
            .unwrap()
        })
    };
    let first = slow(key.clone());
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The same id again: refused (the one slot is taken), and the refused request's release
    // must not free the first stream's slot.
    let auth = format!("Bearer {key}");
    let same = |rid: &str| {
        http::post_json(
            port,
            "/v1/chat/completions",
            &[("authorization", &auth), ("x-request-id", rid)],
            &json!({"model": "gpt-4o-mini", "max_tokens": 20,
                    "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap()
    };
    let r = same("same-id");
    assert_eq!(r.status, 429, "{}", r.text());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let r = same("same-id");
    assert_eq!(
        (r.status, r.error_code()),
        (429, "too_many_concurrent".to_string()),
        "a second stream ran beside the first: {}",
        r.text()
    );
    assert_eq!(first.join().unwrap().status, 200);
}
