//! tollgate-authz under attack and outage (issue 13): wrong secrets against a known key
//! prefix never lock out the valid key, random prefixes cannot exhaust argon2, an attacking
//! source is still throttled, a PostgreSQL outage is answered by authz itself at once and
//! counted, and `tollgate-admin … | head` exits quietly.

use envoy_types::ext_authz::v3::pb::HttpResponse;
use envoy_types::pb::envoy::config::core::v3::{address, Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context, AttributeContext, CheckRequest,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tollgate_e2e::http;
use tollgate_e2e::paths;
use tollgate_e2e::postgres::Postgres;
use tollgate_e2e::process::{temp_dir, Proc};
use tollgate_e2e::stack::{Stack, StackOptions};

fn start(opts: StackOptions) -> Stack {
    Stack::start(opts).unwrap_or_else(|e| panic!("stack did not start: {e}"))
}

/// A chat request through Envoy from `source` (an `x-forwarded-for` hop that authz believes
/// because the loopback peer and this host's addresses are trusted proxies).
fn chat_from(stack: &Stack, key: &str, source: Option<&str>) -> http::Response {
    let auth = format!("Bearer {key}");
    let mut h = vec![("authorization", auth.as_str())];
    if let Some(s) = source {
        h.push(("x-forwarded-for", s));
    }
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    http::post_json(stack.envoy_port, "/v1/chat/completions", &h, &body)
        .unwrap_or_else(|e| panic!("request failed: {e}"))
}

fn outcome(r: &http::Response) -> (u16, String) {
    (r.status, r.error_code())
}

/// A key with the same public prefix as `key` and a different secret.
fn guess_for(key: &str, n: usize) -> String {
    let prefix = tollgate_core::api_key::parse(key)
        .unwrap_or_else(|| panic!("not a Tollgate key: {key}"))
        .prefix;
    format!("tg_{prefix}_{n:048x}")
}

/// This host's own addresses: for a loopback peer Envoy appends its node address (not the
/// peer's) to x-forwarded-for, so on one machine both are trusted proxy hops.
fn trusted_proxies() -> String {
    let mut nets = vec!["127.0.0.0/8".to_string()];
    if let Ok(o) = Command::new("hostname").arg("-I").output() {
        nets.extend(
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
                .map(String::from),
        );
    }
    format!("trusted_proxies: [{}]\n", nets.join(", "))
}

/// One sample of a Prometheus text exposition (labels matched as written, in order).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn metrics(http_port: u16) -> String {
    http::get(http_port, "/metrics", &[])
        .unwrap_or_else(|e| panic!("metrics: {e}"))
        .text()
}

const ARGON2_RUNS: &str = "tollgate_authz_argon2_verifications_total";

#[test]
fn wrong_secrets_with_a_known_prefix_never_lock_out_the_valid_key() {
    let stack = start(StackOptions {
        authz_config: Some(format!("{}cache_ttl_seconds: 1\n", trusted_proxies())),
        ..Default::default()
    });
    let (_, key) = stack.create_key("acme", None).unwrap();
    let (other_id, _) = stack.create_key("acme", None).unwrap();
    assert_eq!(chat_from(&stack, &key, None).status, 200);

    // The attack of the issue, from the valid key's own address, past both the per-prefix
    // (10) and the per-address (30) failure limits.
    let mut seen = Vec::new();
    for n in 0..12 {
        seen.push(outcome(&chat_from(&stack, &guess_for(&key, n), None)));
    }
    for n in 0..25 {
        seen.push(outcome(&chat_from(&stack, &random_prefix_key(n), None)));
    }
    assert_eq!(seen[0], (401, "invalid_api_key".into()));
    assert_eq!(
        seen.last(),
        Some(&(429, "too_many_failed_attempts".into())),
        "the guessing address must still be throttled: {seen:?}"
    );

    // The valid key's cache entry ends (TTL 1 s) …
    std::thread::sleep(Duration::from_millis(1300));
    let r = chat_from(&stack, &key, None);
    assert_eq!(
        r.status,
        200,
        "locked out after a cache expiry: {}",
        r.text()
    );
    // … or the cache is cleared by a revoke of another key.
    stack.admin(&["key", "revoke", &other_id]).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let r = chat_from(&stack, &key, None);
    assert_eq!(r.status, 200, "locked out after a revoke: {}", r.text());

    // A key that was never used yet, attacked from elsewhere: its owner is not locked out.
    let (_, fresh) = stack.create_key("acme", None).unwrap();
    for n in 0..12 {
        chat_from(&stack, &guess_for(&fresh, n), Some("203.0.113.66"));
    }
    assert_eq!(
        outcome(&chat_from(
            &stack,
            &guess_for(&fresh, 99),
            Some("203.0.113.66")
        )),
        (429, "too_many_failed_attempts".into())
    );
    let r = chat_from(&stack, &fresh, Some("198.51.100.7"));
    assert_eq!(r.status, 200, "fresh key locked out: {}", r.text());
}

#[test]
fn an_attacking_source_is_throttled_before_hashing_while_other_sources_keep_their_keys() {
    let stack = start(StackOptions {
        authz_config: Some(trusted_proxies()),
        ..Default::default()
    });
    let (_, target) = stack.create_key("acme", None).unwrap();
    let (_, bystander) = stack.create_key("acme", None).unwrap();
    let attacker = Some("203.0.113.66");
    let codes: Vec<(u16, String)> = (0..11)
        .map(|n| outcome(&chat_from(&stack, &guess_for(&target, n), attacker)))
        .collect();
    assert!(
        codes[..10]
            .iter()
            .all(|c| *c == (401, "invalid_api_key".to_string())),
        "{codes:?}"
    );
    assert_eq!(codes[10], (429, "too_many_failed_attempts".into()));
    // Other prefixes from the same source: refused once the source has 30 failures.
    for n in 0..20 {
        chat_from(&stack, &random_prefix_key(n), attacker);
    }
    let http_port = stack.authz_http_ports[0];
    let runs_before = sample(&metrics(http_port), ARGON2_RUNS);
    for key in [
        guess_for(&bystander, 77),
        "tg_nonsense".to_string(),
        bystander.clone(),
    ] {
        assert_eq!(
            outcome(&chat_from(&stack, &key, attacker)),
            (429, "too_many_failed_attempts".into()),
            "the attacking source must stay throttled"
        );
    }
    assert_eq!(
        sample(&metrics(http_port), ARGON2_RUNS),
        runs_before,
        "a throttled source must not cost an argon2 verification"
    );
    // The real owners, from their own addresses, are not affected.
    for (key, source) in [(&target, "198.51.100.7"), (&bystander, "198.51.100.8")] {
        let r = chat_from(&stack, key, Some(source));
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

fn admin(url: &str, args: &[&str]) -> Value {
    let out = Command::new(paths::binary("tollgate-admin"))
        .args(["--database-url", url, "--json"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("tollgate-admin: {e}"));
    assert!(
        out.status.success(),
        "tollgate-admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn check_request(key: &str, peer: &str, request_id: &str) -> CheckRequest {
    let headers = HashMap::from([
        ("authorization".to_string(), format!("Bearer {key}")),
        ("x-request-id".to_string(), request_id.to_string()),
    ]);
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: peer.to_string(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    id: request_id.to_string(),
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// What one check answered: `(status, body)`, status 200 for an allow.
async fn check(
    client: &AuthorizationClient<tonic::transport::Channel>,
    key: &str,
    peer: &str,
    rid: &str,
) -> (u16, Value) {
    let r = client
        .clone()
        .check(check_request(key, peer, rid))
        .await
        .unwrap_or_else(|e| panic!("check failed: {e}"))
        .into_inner();
    match r.http_response {
        Some(HttpResponse::OkResponse(_)) => (200, Value::Null),
        Some(HttpResponse::DeniedResponse(d)) => (
            d.status.map_or(0, |s| u16::try_from(s.code).unwrap_or(0)),
            serde_json::from_str(&d.body).unwrap_or(Value::Null),
        ),
        _ => (0, Value::Null),
    }
}

fn random_prefix_key(n: u64) -> String {
    format!("tg_{:012x}_{:048x}", 0xf00d_0000_0000 + n, n)
}

#[test]
fn random_prefixes_cannot_exhaust_argon2() {
    let dir = temp_dir("airtight-flood");
    let url = format!("sqlite://{}", dir.join("keys.db").display());
    admin(&url, &["tenant", "create", "acme"]);
    let key = admin(
        &url,
        &["key", "create", "--tenant", "acme", "--name", "real"],
    )["key"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let other_id = admin(
        &url,
        &["key", "create", "--tenant", "acme", "--name", "other"],
    )["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (concurrency, queue) = (1, 3);
    let config = dir.join("authz.yaml");
    std::fs::write(
        &config,
        format!("argon2_concurrency: {concurrency}\nargon2_queue: {queue}\n"),
    )
    .unwrap();
    let mut cmd = Command::new(paths::binary("tollgate-authz"));
    cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--database-url", &url, "--config"])
        .arg(&config);
    let mut authz = Proc::spawn("tollgate-authz", cmd, &dir).unwrap();
    let http_port: u16 = authz
        .wait_for_line("HTTP ", Duration::from_secs(30))
        .unwrap()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    let grpc = authz
        .wait_for_line("LISTENING ", Duration::from_secs(30))
        .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let flood = 150u64;
    let (answers, valid) = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = AuthorizationClient::new(channel);
        assert_eq!(check(&client, &key, "198.51.100.7", "warm").await.0, 200);
        // A revoke of another key clears the verified-key cache.
        admin(&url, &["key", "revoke", &other_id]);
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Every guess from its own address: no per-address throttle can help.
        let mut guesses = Vec::new();
        for n in 0..flood {
            let c = client.clone();
            guesses.push(tokio::spawn(async move {
                let peer = format!("10.{}.{}.{}", n / 65536, (n / 256) % 256, n % 256);
                let rid = format!("flood-{n}");
                (
                    rid.clone(),
                    check(&c, &random_prefix_key(n), &peer, &rid).await,
                )
            }));
        }
        let mut real = Vec::new();
        for n in 0..5 {
            let c = client.clone();
            let key = key.clone();
            real.push(tokio::spawn(async move {
                check(&c, &key, "198.51.100.7", &format!("real-{n}")).await
            }));
        }
        let mut answers = Vec::new();
        for g in guesses {
            answers.push(g.await.unwrap());
        }
        let mut valid = Vec::new();
        for r in real {
            valid.push(r.await.unwrap());
        }
        (answers, valid)
    });
    let text = metrics(http_port);
    authz.kill();
    let _ = std::fs::remove_dir_all(&dir);

    for (status, body) in &valid {
        assert_eq!(
            *status, 200,
            "the valid key was refused during the flood: {body}"
        );
    }
    let mut verified = 0;
    let mut refused = 0;
    for (rid, (status, body)) in &answers {
        assert_eq!(body["error"]["request_id"], rid.as_str(), "{body}");
        match (*status, body["error"]["code"].as_str()) {
            (401, Some("invalid_api_key")) => verified += 1,
            (503, Some("authz_overloaded")) => refused += 1,
            other => panic!("unexpected answer to a random key: {other:?} {body}"),
        }
    }
    assert!(
        refused > 0,
        "a flood past the budget must be refused: {answers:?}"
    );
    // Only admitted checks ran argon2 (the unknown prefix's decoy verification), and never
    // more than the slots and the queue at once.
    // One more: the valid key's first check, before the flood.
    assert_eq!(
        sample(&text, ARGON2_RUNS),
        f64::from(verified + 1),
        "{text}"
    );
    let peak = sample(&text, "tollgate_authz_argon2_admitted_peak");
    assert!(
        peak >= 1.0 && peak <= f64::from(concurrency + queue),
        "peak {peak}\n{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"tollgate_authz_checks_total{code="authz_overloaded",result="deny"}"#
        ),
        f64::from(refused)
    );
}

/// Envoy's own ext_authz counters: `(denied by authz, failed or timed out in Envoy)`.
fn envoy_ext_authz_counts(stack: &Stack) -> (u64, u64) {
    let text = http::get(stack.admin_port, "/stats?filter=ext_authz", &[])
        .unwrap()
        .text();
    let sum = |suffix: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.split_once(": "))
            // The listener's counters (`http.<prefix>.`); `cluster.<route>.` repeats some.
            .filter(|(name, _)| name.starts_with("http.") && name.ends_with(suffix))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    };
    (sum("ext_authz.denied"), sum("ext_authz.error"))
}

#[test]
fn postgres_outage_is_answered_by_authz_at_once_and_every_refusal_is_counted() {
    let mut pg = Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL did not start: {e}"));
    let stack = start(StackOptions {
        database_url: Some(pg.url()),
        ..Default::default()
    });
    let (_, cached) = stack.create_key("acme", None).unwrap();
    let uncached: Vec<String> = (0..3)
        .map(|_| stack.create_key("acme", None).unwrap().1)
        .collect();
    assert_eq!(chat_from(&stack, &cached, None).status, 200);
    let (denied_before, errors_before) = envoy_ext_authz_counts(&stack);

    pg.stop_server();
    let mut refusals = 0;
    for round in 0..4 {
        for key in &uncached {
            let r = chat_from(&stack, key, None);
            assert_eq!(
                outcome(&r),
                (503, "authz_unavailable".into()),
                "round {round}: {}",
                r.text()
            );
            assert_eq!(
                r.json()["error"]["request_id"].as_str(),
                r.header("x-request-id"),
                "{}",
                r.text()
            );
            refusals += 1;
        }
        // Cached keys keep working through the outage.
        assert_eq!(chat_from(&stack, &cached, None).status, 200);
    }
    let (denied, errors) = envoy_ext_authz_counts(&stack);
    assert_eq!(
        errors - errors_before,
        0,
        "Envoy answered for authz (its ext_authz timeout), not authz itself"
    );
    assert_eq!(denied - denied_before, refusals);
    let text = metrics(stack.authz_http_ports[0]);
    assert_eq!(
        sample(
            &text,
            r#"tollgate_authz_checks_total{code="authz_unavailable",result="deny"}"#
        ),
        refusals as f64,
        "{text}"
    );

    pg.start_server().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = chat_from(&stack, &uncached[0], None);
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after PostgreSQL came back: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs tollgate-admin with stdout into a pipe that is closed after the first bytes; returns
/// (exit code, stderr).
fn admin_into_closed_pipe(url: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(paths::binary("tollgate-admin"))
        .args(["--database-url", url])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr).unwrap();
    }
    (child.wait().unwrap().code(), stderr)
}

fn audit_rows(url: &str, n: i64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = tollgate_authz::key_store::KeyStore::connect(url)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let now = tollgate_authz::time::unix_now_ms();
        let events: Vec<_> = (0..n)
            .map(|i| tollgate_authz::audit::AuditEvent {
                at_ms: now - i,
                request_id: format!("req-{i:08}-padding-to-make-the-listing-longer"),
                key_id: Some("key_0123456789abcdef".into()),
                tenant_id: Some("ten_0123456789abcdef".into()),
                model: Some("llama3.1:8b".into()),
                operation: "chat".into(),
                decision: "allowed".into(),
                reason: "ok".into(),
                status: 200,
                tokens_in: Some(12),
                tokens_out: Some(34),
                latency_ms: 56,
                first_byte_ms: Some(7),
                client_ip: Some("127.0.0.1".into()),
                prompt: None,
            })
            .collect();
        store.insert_audit(&events).await.unwrap();
    });
}

#[test]
fn admin_output_into_a_closed_pipe_exits_quietly_with_status_0() {
    let dir = temp_dir("airtight-pipe");
    let url = format!("sqlite://{}", dir.join("keys.db").display());
    // Far more than a pipe buffer (64 KiB), as a table and as one JSON line.
    audit_rows(&url, 5000);
    for args in [&["audit"][..], &["--json", "audit"][..]] {
        let (code, stderr) = admin_into_closed_pipe(&url, args);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
    }
    assert!(Path::new(&dir).exists());
    let _ = std::fs::remove_dir_all(&dir);
}
