//! The service runtime both binaries share (`tollgate-runtime`), end to end: SIGTERM drains
//! tollgate-authz without losing the audit events it had queued, readiness turns off for the
//! drain while liveness stays on, and both services' `/metrics` declare the Prometheus text
//! format (Prometheus 3 refuses a scrape without a Content-Type).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};
use tollgate_e2e::http;
use tollgate_e2e::process::Proc;
use tollgate_e2e::stack::{Stack, StackOptions};

const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn start() -> Stack {
    Stack::start(StackOptions::default()).unwrap_or_else(|e| panic!("stack did not start: {e}"))
}

/// One allowed chat request; returns its request id.
fn chat(stack: &Stack, key: &str) -> String {
    let auth = format!("Bearer {key}");
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", auth.as_str())],
        &body,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), stack.logs());
    r.header("x-request-id").unwrap().to_string()
}

/// Request ids of the audit rows in the database.
fn audited(stack: &Stack) -> Vec<String> {
    let out = stack.admin(&["--json", "audit", "--since", "1h"]).unwrap();
    match serde_json::from_str(out.trim()) {
        Ok(Value::Array(rows)) => rows
            .iter()
            .filter_map(|r| r["request_id"].as_str().map(String::from))
            .collect(),
        other => panic!("audit export is not a JSON array: {other:?}"),
    }
}

/// Requests tollgate-authz has seen in Envoy's access log (all `gateway_requests_total`).
fn logged_requests(http_port: u16) -> f64 {
    http::get(http_port, "/metrics", &[])
        .map(|r| r.text())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("gateway_requests_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_until(what: &str, stack: &Stack, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}\n{}", stack.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Holds SQLite's write lock on a database (another writer, e.g. the admin CLI, mid
/// transaction): tollgate-authz's audit inserts wait, so its events stay queued.
struct WriteLock {
    child: Child,
    stdin: ChildStdin,
}

impl WriteLock {
    fn take(db: &str) -> Self {
        let mut child = Command::new("sqlite3")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sqlite3 (the SQLite shell) is needed to hold a write lock");
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        stdin
            .write_all(b".timeout 10000\nBEGIN IMMEDIATE;\nSELECT 'locked';\n")
            .unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "locked");
        Self { child, stdin }
    }

    fn release(mut self) {
        self.stdin.write_all(b"ROLLBACK;\n.quit\n").unwrap();
        self.stdin.flush().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success());
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sigterm(p: &Proc) {
    let pid = p.pid().expect("process running");
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sigterm_drains_tollgate_authz_and_writes_the_audit_events_it_had_queued() {
    let mut stack = start();
    let db = stack
        .database_url
        .strip_prefix("sqlite://")
        .expect("the stack's key store is SQLite")
        .to_string();
    let http_port = stack.authz_http_ports[0];
    let (_, key) = stack.create_key("acme", Some(100)).unwrap();

    // A first request verifies the key (cached from then on, so the next ones need no
    // database write) and is audited as usual.
    let first = chat(&stack, &key);
    wait_until("the first request is audited", &stack, || {
        audited(&stack).contains(&first)
    });

    let lock = WriteLock::take(&db);
    let queued: Vec<String> = (0..3).map(|_| chat(&stack, &key)).collect();
    wait_until(
        "tollgate-authz receives the access log entries",
        &stack,
        || logged_requests(http_port) >= 4.0,
    );
    let rows = audited(&stack);
    assert!(
        queued.iter().all(|id| !rows.contains(id)),
        "the events must still be queued, not written: {rows:?}"
    );

    sigterm(&stack.authz[0]);
    // Draining: no longer ready, still alive.
    wait_until("/readyz turns 503 on SIGTERM", &stack, || {
        http::get(http_port, "/readyz", &[]).is_ok_and(|r| r.status == 503)
    });
    assert_eq!(http::get(http_port, "/healthz", &[]).unwrap().status, 200);
    assert!(stack.authz[0].alive(), "{}", stack.logs());

    lock.release();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.authz[0].alive() {
        assert!(
            Instant::now() < deadline,
            "tollgate-authz did not exit after SIGTERM\n{}",
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = stack.authz[0].log_text();
    assert!(log.contains("shutting down: draining"), "{log}");
    assert!(log.contains("draining: not ready"), "{log}");
    assert!(log.contains("audit queue written"), "{log}");

    let rows = audited(&stack);
    for id in queued.iter().chain([&first]) {
        assert!(
            rows.contains(id),
            "request {id} lost its audit row: {rows:?}"
        );
    }
    assert_eq!(rows.len(), 4, "{rows:?}");
}

#[test]
fn sigterm_stops_tollgate_ratelimit_cleanly_not_ready_first() {
    let mut stack = start();
    let port = stack.ratelimit_http_port;
    wait_until("tollgate-ratelimit is ready", &stack, || {
        http::get(port, "/readyz", &[]).is_ok_and(|r| r.status == 200)
    });
    sigterm(&stack.ratelimit);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.ratelimit.alive() {
        assert!(
            Instant::now() < deadline,
            "tollgate-ratelimit did not exit after SIGTERM\n{}",
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = stack.ratelimit.log_text();
    assert!(log.contains("shutting down: draining"), "{log}");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("draining: not ready"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn metrics_of_both_services_declare_the_prometheus_text_format() {
    let stack = start();
    for (service, port) in [
        ("tollgate-authz", stack.authz_http_ports[0]),
        ("tollgate-ratelimit", stack.ratelimit_http_port),
    ] {
        let r = http::get(port, "/metrics", &[]).unwrap();
        assert_eq!(r.status, 200, "{service}");
        assert_eq!(
            r.header("content-type"),
            Some(METRICS_CONTENT_TYPE),
            "{service}: {:?}",
            r.headers
        );
    }
}
