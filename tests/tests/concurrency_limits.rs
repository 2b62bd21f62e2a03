//! Concurrency and shared limits end to end: real Envoy, the filter, tollgate-authz's
//! per-key metadata and tollgate-ratelimit's leases (in memory and on Redis), with slow
//! streams from the mock model server holding requests open.

use serde_json::json;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tollgate_e2e::http;
use tollgate_e2e::process::Proc;
use tollgate_e2e::redis::Redis;
use tollgate_e2e::stack::{Stack, StackOptions};

fn start(opts: StackOptions) -> Stack {
    Stack::start(opts).unwrap_or_else(|e| panic!("stack did not start: {e}"))
}

/// A streamed chat of `chunks` completion tokens, `delay_ms` apart, asking for at most
/// `max_tokens`.
fn chat(port: u16, key: &str, chunks: u32, delay_ms: u64, max_tokens: u32) -> http::Response {
    try_chat(port, key, chunks, delay_ms, max_tokens).unwrap_or_else(|e| panic!("chat: {e}"))
}

fn try_chat(
    port: u16,
    key: &str,
    chunks: u32,
    delay_ms: u64,
    max_tokens: u32,
) -> Result<http::Response, String> {
    let auth = format!("Bearer {key}");
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": "two words"}]});
    http::post_json(
        port,
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("x-mock-chunks", &chunks.to_string()),
            ("x-mock-chunk-delay-ms", &delay_ms.to_string()),
        ],
        &body,
    )
}

/// The same chat on its own thread, so it stays open while the test goes on.
fn chat_in_background(
    port: u16,
    key: &str,
    chunks: u32,
    delay_ms: u64,
) -> JoinHandle<http::Response> {
    let key = key.to_string();
    std::thread::spawn(move || chat(port, &key, chunks, delay_ms, 20))
}

fn code(r: &http::Response) -> String {
    r.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn streamed_chats(stack: &Stack) -> usize {
    stack
        .mock_requests()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .count()
}

/// Waits until the model server has received `n` chats (they are then in flight).
fn wait_for_chats(stack: &Stack, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while streamed_chats(stack) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} chats reached the model server:\n{}",
            streamed_chats(stack),
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_streamed(r: &http::Response) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("data: [DONE]"), "{}", r.text());
}

fn assert_too_many_concurrent(r: &http::Response) {
    assert_eq!(
        (r.status, code(r)),
        (429, "too_many_concurrent".to_string()),
        "{}",
        r.text()
    );
    assert_eq!(r.header("x-tollgate-error"), Some("too_many_concurrent"));
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        r.json()["error"]["request_id"],
        r.header("x-request-id").unwrap()
    );
}

/// A key of tenant `acme` with at most `max` concurrent requests.
fn key_with_max_concurrent(stack: &Stack, max: u32) -> String {
    let (id, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&[
            "policy",
            "set",
            "--key",
            &id,
            "--max-concurrent",
            &max.to_string(),
        ])
        .unwrap();
    key
}

#[test]
fn max_concurrent_refuses_the_extra_stream_and_frees_a_slot_when_a_stream_ends() {
    let stack = start(StackOptions::default());
    let key = key_with_max_concurrent(&stack, 2);
    let port = stack.envoy_port;
    // Two streams hold both slots: a short one (~1 s) and a long one (~4 s).
    let short = chat_in_background(port, &key, 4, 250);
    let long = chat_in_background(port, &key, 16, 250);
    wait_for_chats(&stack, 2);
    let refused = chat(port, &key, 1, 0, 20);
    assert_too_many_concurrent(&refused);
    // The refused request's release (Envoy sends it at stream end) frees nothing.
    std::thread::sleep(Duration::from_millis(200));
    assert_too_many_concurrent(&chat(port, &key, 1, 0, 20));
    assert_eq!(
        streamed_chats(&stack),
        2,
        "a refused request reached the model server"
    );

    // The short stream ends: its slot is free while the long one still runs.
    assert_streamed(&short.join().unwrap());
    std::thread::sleep(Duration::from_millis(200));
    assert_streamed(&chat(port, &key, 1, 0, 20));
    // The long one still holds a slot; two more at once get one slot only.
    let a = chat_in_background(port, &key, 4, 250);
    wait_for_chats(&stack, 4);
    assert_too_many_concurrent(&chat(port, &key, 1, 0, 20));
    assert_streamed(&a.join().unwrap());
    assert_streamed(&long.join().unwrap());
    // Everything ended: both slots are free again.
    std::thread::sleep(Duration::from_millis(200));
    let b = chat_in_background(port, &key, 4, 250);
    let c = chat_in_background(port, &key, 4, 250);
    assert_streamed(&b.join().unwrap());
    assert_streamed(&c.join().unwrap());

    // Another key of the same tenant has its own slots (and no limit at all here).
    let (_, other) = stack.create_key("acme", None).unwrap();
    let held: Vec<_> = (0..3)
        .map(|_| chat_in_background(port, &other, 4, 250))
        .collect();
    for h in held {
        assert_streamed(&h.join().unwrap());
    }
}

/// Kills Envoy (no stream-done call can follow) and starts it again on the same
/// configuration and ports.
fn crash_and_restart_envoy(stack: &mut Stack) {
    stack.envoy.kill();
    let mut cmd = Command::new(tollgate_e2e::paths::envoy());
    cmd.arg("-c").arg(stack.dir.join("envoy.yaml")).args([
        "--disable-hot-restart",
        "-l",
        "warning",
        "--concurrency",
        "1",
    ]);
    stack.envoy = Proc::spawn("envoy-restarted", cmd, &stack.dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http::get(stack.admin_port, "/ready", &[]).is_ok_and(|r| r.status == 200)
            && std::net::TcpStream::connect(("127.0.0.1", stack.envoy_port)).is_ok();
        if ready {
            return;
        }
        assert!(stack.envoy.alive(), "{}", stack.envoy.failure("exited"));
        assert!(
            Instant::now() < deadline,
            "{}",
            stack.envoy.failure("not ready")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stream_cut_by_an_envoy_crash_frees_its_slot_when_the_lease_expires() {
    let redis = Redis::start().unwrap_or_else(|e| panic!("redis did not start: {e}"));
    let ttl = Duration::from_secs(3);
    let mut stack = start(StackOptions {
        ratelimit_args: vec![
            "--redis-url".into(),
            redis.url(),
            "--lease-ttl-ms".into(),
            ttl.as_millis().to_string(),
        ],
        ..Default::default()
    });
    let key = key_with_max_concurrent(&stack, 1);
    let port = stack.envoy_port;
    let cut = {
        let key = key.clone();
        std::thread::spawn(move || try_chat(port, &key, 40, 250, 20))
    };
    wait_for_chats(&stack, 1);
    let held_at = Instant::now();
    assert_too_many_concurrent(&chat(port, &key, 1, 0, 20));
    crash_and_restart_envoy(&mut stack);
    if let Ok(r) = cut.join().unwrap() {
        assert!(!r.text().contains("data: [DONE]"), "the stream was not cut");
    }
    // No release came: the slot stays held until the lease expires, then frees itself.
    assert_too_many_concurrent(&chat(port, &key, 1, 0, 20));
    let deadline = held_at + ttl + Duration::from_secs(5);
    loop {
        let r = chat(port, &key, 1, 0, 20);
        if r.status == 200 {
            assert!(
                held_at.elapsed() >= ttl - Duration::from_millis(500),
                "freed after {:?}, before the lease expired",
                held_at.elapsed()
            );
            break;
        }
        assert_too_many_concurrent(&r);
        assert!(
            Instant::now() < deadline,
            "the crashed stream's slot never came back"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn remaining_tokens(r: &http::Response) -> i64 {
    r.header("x-ratelimit-remaining-tokens")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no x-ratelimit-remaining-tokens: {:?}", r.headers))
}

/// A key of tenant `acme` with `tpm` tokens per minute.
fn key_with_tpm(stack: &Stack, tpm: u32) -> String {
    let (id, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&["policy", "set", "--key", &id, "--tpm", &tpm.to_string()])
        .unwrap();
    key
}

#[test]
fn fifty_concurrent_streams_against_a_small_tpm_admit_only_the_reservations_that_fit() {
    const TPM: i64 = 300;
    // Tokens flow back at TPM per minute: 5 per second.
    const REFILL_PER_SEC: f64 = TPM as f64 / 60.0;
    // Each stream really uses 12 tokens (10 chunks, 2 prompt tokens).
    const USED: i64 = 12;
    let redis = Redis::start().unwrap_or_else(|e| panic!("redis did not start: {e}"));
    let stack = start(StackOptions {
        ratelimit_args: vec!["--redis-url".into(), redis.url()],
        ..Default::default()
    });
    let port = stack.envoy_port;
    // The reservation of one such request, measured on a key of its own.
    let probe = chat(port, &key_with_tpm(&stack, TPM as u32), 10, 0, 20);
    assert_streamed(&probe);
    let reservation = TPM - remaining_tokens(&probe);
    assert!(
        reservation > USED && reservation * 3 < TPM,
        "reservation {reservation}"
    );
    stack.clear_mock_requests().unwrap();

    let key = key_with_tpm(&stack, TPM as u32);
    // One key check first (it reserves no tokens), so that the burst finds the key in
    // tollgate-authz's cache instead of verifying its hash 50 times at once.
    let auth = format!("Bearer {key}");
    let models = http::get(port, "/v1/models", &[("authorization", &auth)]).unwrap();
    assert_eq!(models.status, 200, "{}", models.text());
    let started = Instant::now();
    let go = std::sync::Arc::new(std::sync::Barrier::new(50));
    let streams: Vec<_> = (0..50)
        .map(|_| {
            let (key, go) = (key.clone(), std::sync::Arc::clone(&go));
            // ~2 s each: every admitted stream is still in flight when the last is decided.
            std::thread::spawn(move || {
                go.wait();
                chat(port, &key, 10, 200, 20)
            })
        })
        .collect();
    let results: Vec<http::Response> = streams.into_iter().map(|t| t.join().unwrap()).collect();
    let burst = started.elapsed().as_secs_f64();
    let admitted = results.iter().filter(|r| r.status == 200).count() as i64;
    for r in results.iter().filter(|r| r.status != 200) {
        assert_eq!(
            (r.status, code(r)),
            (429, "tokens_exhausted".to_string()),
            "{}",
            r.text()
        );
    }
    for r in results.iter().filter(|r| r.status == 200) {
        assert_streamed(r);
    }
    // Admission charges each stream's whole reservation, so the streams in flight together
    // hold at most the limit (plus what flowed back during the burst): no stream is admitted
    // on tokens another in-flight stream has reserved.
    let fits = TPM / reservation;
    let fits_with_refill = (TPM as f64 + burst * REFILL_PER_SEC) as i64 / reservation;
    assert!(
        (fits..=fits_with_refill).contains(&admitted),
        "admitted {admitted} streams of {reservation} reserved tokens under {TPM} TPM \
         (fits {fits}, {fits_with_refill} with the refill of {burst:.1}s)"
    );
    assert_eq!(
        streamed_chats(&stack),
        admitted as usize,
        "a refused stream reached the model server"
    );

    // At stream end every reservation was reconciled with the real count: the counter now
    // holds admitted × 12 tokens, not admitted × the reservation.
    std::thread::sleep(Duration::from_millis(300));
    let after = chat(port, &key, 10, 0, 20);
    assert_streamed(&after);
    let elapsed = started.elapsed().as_secs_f64();
    let counted = TPM - reservation - remaining_tokens(&after);
    let flowed_back = (elapsed * REFILL_PER_SEC).ceil() as i64 + 1;
    assert!(
        (admitted * USED - flowed_back..=admitted * USED).contains(&counted),
        "the counter holds {counted} tokens for {admitted} streams of {USED} \
         (up to {flowed_back} flowed back in {elapsed:.1}s)"
    );
}

#[test]
fn keys_of_one_tenant_share_the_tenant_rpm() {
    let stack = start(StackOptions::default());
    let (_, k1) = stack.create_key("acme", None).unwrap();
    let (_, k2) = stack.create_key("acme", None).unwrap();
    let (_, other) = stack.create_key("globex", None).unwrap();
    stack
        .admin(&["policy", "set", "--tenant", "acme", "--rpm", "5"])
        .unwrap();
    let port = stack.envoy_port;
    // Alternating keys: five requests between them, then both are refused.
    let mut admitted = 0;
    for i in 0..10 {
        let key = if i % 2 == 0 { &k1 } else { &k2 };
        let r = chat(port, key, 1, 0, 20);
        match r.status {
            200 => admitted += 1,
            _ => assert_eq!(
                (r.status, code(&r)),
                (429, "rate_limited".to_string()),
                "{}",
                r.text()
            ),
        }
    }
    assert_eq!(admitted, 5, "the tenant's 5 RPM across two keys");
    for key in [&k1, &k2] {
        let r = chat(port, key, 1, 0, 20);
        assert_eq!((r.status, code(&r)), (429, "rate_limited".to_string()));
        assert!(r.header("retry-after").is_some());
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("5"));
    }
    assert_eq!(streamed_chats(&stack), 5);
    // Another tenant's key is not limited by acme's RPM.
    for _ in 0..7 {
        assert_streamed(&chat(port, &other, 1, 0, 20));
    }
}

#[test]
fn keys_of_one_tenant_share_the_tenant_max_concurrent() {
    let stack = start(StackOptions::default());
    let (_, a) = stack.create_key("acme", None).unwrap();
    let (_, b) = stack.create_key("acme", None).unwrap();
    let (_, other) = stack.create_key("globex", None).unwrap();
    stack
        .admin(&["policy", "set", "--tenant", "acme", "--max-concurrent", "1"])
        .unwrap();
    let port = stack.envoy_port;
    let held = chat_in_background(port, &a, 8, 250);
    wait_for_chats(&stack, 1);
    // The tenant's one slot is taken: its other key and the same key are refused.
    assert_too_many_concurrent(&chat(port, &b, 1, 0, 20));
    assert_too_many_concurrent(&chat(port, &a, 1, 0, 20));
    // Another tenant is not affected.
    assert_streamed(&chat(port, &other, 1, 0, 20));
    assert_eq!(
        streamed_chats(&stack),
        2,
        "a refused request reached the model server"
    );
    // The stream ends: the tenant's slot is free again, for either key, and nothing leaked
    // from the refused requests (their key-level leases were released at their stream end).
    assert_streamed(&held.join().unwrap());
    std::thread::sleep(Duration::from_millis(200));
    assert_streamed(&chat(port, &b, 1, 0, 20));
    assert_streamed(&chat(port, &a, 1, 0, 20));
}
