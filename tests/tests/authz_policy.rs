//! tollgate-authz through real Envoy: expiry, revocation across replicas, rotation, IP
//! allowlists behind a trusted proxy, operation allowlists, provider credentials, failure
//! throttling, static keys, and no key secret in any log or stored row.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tollgate_e2e::http;
use tollgate_e2e::postgres::Postgres;
use tollgate_e2e::stack::{Stack, StackOptions};

fn start(opts: StackOptions) -> Stack {
    Stack::start(opts).unwrap_or_else(|e| panic!("stack did not start: {e}"))
}

fn chat(stack: &Stack, key: &str, extra: &[(&str, &str)]) -> http::Response {
    let auth = format!("Bearer {key}");
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(extra);
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    http::post_json(stack.envoy_port, "/v1/chat/completions", &h, &body).unwrap()
}

fn code(r: &http::Response) -> String {
    r.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn admin_json(stack: &Stack, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = stack.admin(&a).unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn secret_of(key: &str) -> String {
    tollgate_core::api_key::parse(key)
        .unwrap()
        .secret
        .to_string()
}

#[test]
fn expired_key_is_denied_and_rotation_keeps_the_old_key_for_its_grace_only() {
    let stack = start(StackOptions::default());
    stack.admin(&["tenant", "create", "acme"]).unwrap();
    let short = admin_json(
        &stack,
        &[
            "key",
            "create",
            "--tenant",
            "acme",
            "--name",
            "short",
            "--expires-in",
            "1",
        ],
    );
    let short_key = short["key"].as_str().unwrap();
    assert_eq!(chat(&stack, short_key, &[]).status, 200);
    std::thread::sleep(Duration::from_millis(2100));
    let r = chat(&stack, short_key, &[]);
    assert_eq!(
        (r.status, code(&r)),
        (401, "expired_api_key".into()),
        "{}",
        r.text()
    );

    let old = admin_json(
        &stack,
        &[
            "key", "create", "--tenant", "acme", "--name", "svc", "--rpm", "50",
        ],
    );
    let old_key = old["key"].as_str().unwrap();
    assert_eq!(chat(&stack, old_key, &[]).status, 200);
    let new = admin_json(
        &stack,
        &["key", "rotate", old["id"].as_str().unwrap(), "--grace", "2"],
    );
    let new_key = new["key"].as_str().unwrap();
    assert_ne!(new_key, old_key);
    assert_eq!(new["name"], "svc");
    let r = chat(&stack, new_key, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    // The rotated key inherits the key policy (rpm 50).
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("50"));
    assert_eq!(
        chat(&stack, old_key, &[]).status,
        200,
        "old key must work during its grace"
    );
    std::thread::sleep(Duration::from_millis(3100));
    let r = chat(&stack, old_key, &[]);
    assert_eq!(
        (r.status, code(&r)),
        (401, "expired_api_key".into()),
        "{}",
        r.text()
    );
    assert_eq!(chat(&stack, new_key, &[]).status, 200);
}

#[test]
fn revocation_reaches_two_authz_replicas_behind_envoy_within_one_second() {
    let pg = Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL did not start: {e}"));
    let stack = start(StackOptions {
        database_url: Some(pg.url()),
        authz_replicas: 2,
        ..Default::default()
    });
    let (key_id, key) = stack.create_key("acme", None).unwrap();
    // Warm both replicas' caches (Envoy round-robins over them).
    for _ in 0..6 {
        assert_eq!(chat(&stack, &key, &[]).status, 200);
    }
    let before = Instant::now();
    stack.admin(&["key", "revoke", &key_id]).unwrap();
    let revoked = Instant::now();
    // Denied from the first moment on: the latency is until every replica refuses.
    let mut last_allowed: Option<Duration> = None;
    while revoked.elapsed() < Duration::from_millis(1500) {
        let r = chat(&stack, &key, &[]);
        match r.status {
            200 => last_allowed = Some(revoked.elapsed()),
            401 => assert_eq!(code(&r), "revoked_api_key"),
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    let latency = last_allowed.unwrap_or(Duration::ZERO);
    println!(
        "revocation: CLI took {:?}; last request allowed {:?} after it returned",
        revoked - before,
        latency
    );
    assert!(
        latency < Duration::from_secs(1),
        "a replica allowed a revoked key after {latency:?}"
    );
}

/// This host's own addresses. For a loopback peer Envoy appends its node address (not the
/// peer's) to x-forwarded-for, so on one machine both are the trusted proxy hops.
fn host_addresses() -> Vec<String> {
    let out = std::process::Command::new("hostname").arg("-I").output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
            .map(String::from)
            .collect()
    })
    .unwrap_or_default()
}

#[test]
fn ip_allowlist_believes_x_forwarded_for_only_from_trusted_proxies() {
    let mut proxies = vec!["127.0.0.0/8".to_string()];
    proxies.extend(host_addresses());
    for trusted in [false, true] {
        let config = if trusted {
            format!("trusted_proxies: [{}]\n", proxies.join(", "))
        } else {
            String::new()
        };
        let stack = start(StackOptions {
            authz_config: Some(config),
            ..Default::default()
        });
        let (_, key) = stack.create_key("acme", None).unwrap();
        stack
            .admin(&["policy", "set", "--tenant", "acme", "--ips", "10.1.2.0/24"])
            .unwrap();
        let from_office = chat(&stack, &key, &[("x-forwarded-for", "10.1.2.3")]);
        let from_elsewhere = chat(&stack, &key, &[("x-forwarded-for", "10.9.9.9")]);
        let spoof_left = chat(&stack, &key, &[("x-forwarded-for", "10.1.2.3, 10.9.9.9")]);
        assert_eq!(
            (from_elsewhere.status, code(&from_elsewhere)),
            (403, "ip_not_allowed".into())
        );
        assert_eq!(
            (spoof_left.status, code(&spoof_left)),
            (403, "ip_not_allowed".into())
        );
        if trusted {
            assert_eq!(
                from_office.status,
                200,
                "{}\n{}",
                from_office.text(),
                stack.logs()
            );
        } else {
            // The peer (127.0.0.1) is the client: a forwarded-for header is not believed.
            assert_eq!(
                (from_office.status, code(&from_office)),
                (403, "ip_not_allowed".into())
            );
        }
    }
}

#[test]
fn operation_and_tenant_policies_are_enforced() {
    let stack = start(StackOptions::default());
    let (_, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&["policy", "set", "--tenant", "acme", "--operations", "chat"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(chat(&stack, &key, &[]).status, 200);
    let auth = format!("Bearer {key}");
    let r = http::post_json(
        stack.envoy_port,
        "/v1/embeddings",
        &[("authorization", &auth)],
        &json!({"model": "x", "input": "hi"}),
    )
    .unwrap();
    assert_eq!(
        (r.status, code(&r)),
        (403, "operation_not_allowed".into()),
        "{}",
        r.text()
    );
    assert_eq!(
        r.json()["error"]["request_id"],
        r.header("x-request-id").unwrap()
    );
    let shown = admin_json(&stack, &["policy", "show", "--tenant", "acme"]);
    assert_eq!(shown["policy"]["operations"], "chat");
    stack.admin(&["tenant", "disable", "acme"]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let r = chat(&stack, &key, &[]);
    assert_eq!((r.status, code(&r)), (403, "tenant_disabled".into()));
    stack.admin(&["tenant", "enable", "acme"]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(chat(&stack, &key, &[]).status, 200);
    assert!(
        stack
            .mock_requests()
            .unwrap()
            .iter()
            .all(|r| r["path"] == "/v1/chat/completions"),
        "a denied request reached the model server"
    );
}

#[test]
fn provider_credential_is_injected_and_client_credentials_never_reach_the_upstream() {
    let stack = start(StackOptions {
        authz_config: Some("credentials:\n  upstream: {header: authorization, env: TG_E2E_UPSTREAM_KEY, format: 'Bearer {}'}\n".into()),
        authz_env: vec![("TG_E2E_UPSTREAM_KEY".into(), "sk-upstream-e2e-123".into())],
        model_credential: "upstream".into(),
        ..Default::default()
    });
    let (key_id, key) = stack.create_key("acme", None).unwrap();
    let spoof = [
        ("x-tollgate-tenant", "ten_evil"),
        ("x-tollgate-key-id", "key_evil"),
        ("x-api-key", key.as_str()),
    ];
    let r = chat(&stack, &key, &spoof);
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = stack.mock_requests().unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let h = &seen[0]["headers"];
    assert_eq!(h["authorization"], "Bearer sk-upstream-e2e-123");
    assert!(
        h.get("x-api-key").is_none(),
        "client x-api-key reached the upstream"
    );
    assert_eq!(h["x-tollgate-key-id"], key_id.as_str());
    assert!(h["x-tollgate-tenant"].as_str().unwrap().starts_with("ten_"));
    assert!(
        !seen[0].to_string().contains(&secret_of(&key)),
        "client key reached the upstream"
    );
}

#[test]
fn repeated_failures_from_one_address_are_throttled_before_hashing() {
    let stack = start(StackOptions {
        authz_config: Some("max_failures_per_ip: 5\nmax_failures_per_prefix: 3\n".into()),
        ..Default::default()
    });
    let (_, key) = stack.create_key("acme", None).unwrap();
    // Guessing secrets for one real prefix: blocked after 3 for that prefix.
    let prefix = tollgate_core::api_key::parse(&key)
        .unwrap()
        .prefix
        .to_string();
    let guess = format!("tg_{prefix}_{}", "0".repeat(48));
    let codes: Vec<String> = (0..4).map(|_| code(&chat(&stack, &guess, &[]))).collect();
    assert_eq!(
        codes,
        [
            "invalid_api_key",
            "invalid_api_key",
            "invalid_api_key",
            "too_many_failed_attempts"
        ]
    );
    // More garbage from the same address: the address is blocked, even for a valid key.
    for _ in 0..2 {
        chat(&stack, "tg_zzz", &[]);
    }
    let r = chat(&stack, &key, &[]);
    assert_eq!(
        (r.status, code(&r)),
        (429, "too_many_failed_attempts".into()),
        "{}",
        r.text()
    );
    assert!(r.header("retry-after").is_some());
}

#[test]
fn static_keys_from_the_environment_work_and_no_secret_is_logged_or_stored() {
    let static_key = "casual-static-key-0123456789abcdef-xyz";
    let stack = start(StackOptions {
        authz_config: Some(
            "static_keys:\n  - {name: casual, tenant: default, env: TG_E2E_STATIC_KEY, rpm: 2}\n"
                .into(),
        ),
        authz_env: vec![("TG_E2E_STATIC_KEY".into(), static_key.into())],
        ..Default::default()
    });
    let r = chat(&stack, static_key, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
    let seen = stack.mock_requests().unwrap();
    assert_eq!(seen[0]["headers"]["x-tollgate-key-id"], "static:casual");

    // Exercise every key path, then look for secrets everywhere.
    let (key_id, key) = stack.create_key("acme", None).unwrap();
    assert_eq!(chat(&stack, &key, &[]).status, 200);
    let mut wrong = key.clone();
    wrong.replace_range(key.len() - 4.., "ffff");
    assert_eq!(chat(&stack, &wrong, &[]).status, 401);
    let listed =
        stack.admin(&["key", "list"]).unwrap() + &stack.admin(&["--json", "key", "list"]).unwrap();
    stack.admin(&["key", "revoke", &key_id]).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(chat(&stack, &key, &[]).status, 401);
    let mut haystack = stack.logs() + &listed;
    for f in ["tollgate.db", "tollgate.db-wal"] {
        if let Ok(bytes) = std::fs::read(stack.dir.join(f)) {
            haystack.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    for secret in [secret_of(&key), secret_of(&wrong), static_key.to_string()] {
        assert!(
            !haystack.contains(&secret),
            "a key secret appears in a log, a listing or the database"
        );
    }
    assert!(
        haystack.contains(&key_id),
        "the haystack must include what was logged and stored"
    );
}

#[test]
fn openai_and_anthropic_sdks_authenticate_and_see_revocation_as_401() {
    let stack = start(StackOptions::default());
    let (_, key) = stack.create_key("acme", None).unwrap();
    let (revoked_id, revoked) = stack.create_key("acme", None).unwrap();
    stack.admin(&["key", "revoke", &revoked_id]).unwrap();
    let out = std::process::Command::new(tollgate_e2e::paths::python())
        .arg(tollgate_e2e::paths::workspace_root().join("tests/clients/sdk_auth.py"))
        .env(
            "TOLLGATE_URL",
            format!("http://127.0.0.1:{}", stack.envoy_port),
        )
        .env("TOLLGATE_KEY", &key)
        .env("TOLLGATE_REVOKED_KEY", &revoked)
        .env("TOLLGATE_MODEL", "gpt-4o-mini")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(
        v["openai_valid"]["content"], "Hello from the Tollgate mock",
        "{v}"
    );
    assert_eq!(v["openai_revoked"]["status"], 401, "{v}");
    assert_eq!(v["openai_revoked"]["type"], "AuthenticationError");
    // The SDK surfaces Tollgate's error object as the body.
    assert_eq!(
        v["openai_revoked"]["body"]["code"], "revoked_api_key",
        "{v}"
    );
    assert_eq!(v["anthropic_valid"]["ok"], true, "{v}");
    assert_eq!(v["anthropic_valid"]["text"], "Hello from the Tollgate mock");
    let seen = stack.mock_requests().unwrap();
    let messages = seen
        .iter()
        .find(|r| r["path"] == "/v1/messages")
        .expect("anthropic request");
    assert!(
        messages["headers"].get("x-api-key").is_none(),
        "client key reached the upstream"
    );
}

#[test]
fn foundation_profile_refuses_unsafe_settings_and_starts_on_safe_ones() {
    let run = |args: &[&str], config: &str| {
        let dir =
            std::env::temp_dir().join(format!("tg-profile-{}-{}", std::process::id(), args.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("authz.yaml");
        std::fs::write(&cfg, config).unwrap();
        let mut child = std::process::Command::new(tollgate_e2e::paths::binary("tollgate-authz"))
            .args([
                "--profile",
                "foundation",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&cfg)
            .args(args)
            .env("TG_PROFILE_KEY", "k".repeat(40))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A refusal exits at once; a start prints LISTENING and keeps running.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                return (
                    Some(status.code().unwrap_or(-1)),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                return (None, String::from_utf8_lossy(&out.stdout).into_owned());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (code, err) = run(&["--database-url", "sqlite:///tmp/tg-profile.db"], "");
    assert_eq!(code, Some(1));
    assert!(err.contains("must be PostgreSQL"), "{err}");
    let pg = Postgres::start().unwrap();
    let (code, err) = run(
        &["--database-url", &pg.url()],
        "static_keys:\n  - {name: k, tenant: t, env: TG_PROFILE_KEY}\n",
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("static keys are not allowed"), "{err}");
    let (code, err) = run(
        &["--database-url", &pg.url()],
        "require_database_tls: true\n",
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("sslmode"), "{err}");
    let (code, out) = run(&["--database-url", &pg.url()], "");
    assert_eq!(code, None, "a safe foundation config must keep running");
    assert!(out.contains("LISTENING"), "{out}");
}
