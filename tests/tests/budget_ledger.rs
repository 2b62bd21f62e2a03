//! Budget ledger: one contract on SQLite and on a real PostgreSQL (rows, counters,
//! idempotent replay, a cut last line), usage kept through a database outage and a crash,
//! drift against the counters, and the whole path through Envoy.

use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tollgate_e2e::http;
use tollgate_e2e::postgres::Postgres;
use tollgate_e2e::process::{free_port, Proc};
use tollgate_e2e::stack::{Stack, StackOptions};
use tollgate_ratelimit::counter_store::{redis_keys, CounterStore, Hit, HitMode, MemoryStore};
use tollgate_ratelimit::ledger::{self, CounterRef, Ledger, LedgerDb, Record};
use tollgate_ratelimit::limit_policy::{Limit, Unit};

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "tollgate-ledger-{tag}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const BUDGET: Limit = Limit {
    requests_per_unit: 100_000,
    unit: Unit::Day,
};

fn counter(subject: &str) -> CounterRef {
    CounterRef {
        key: redis_keys::counter_key(
            "tollgate",
            &[("key_id", subject), ("tollgate_phase", "tokens")],
            &BUDGET,
        ),
        subject_kind: "key_id".into(),
        subject_id: subject.into(),
        requests_per_unit: BUDGET.requests_per_unit,
        unit: "day".into(),
        usd: false,
    }
}

fn record(i: u64, key: &str, tokens: u64) -> Record {
    Record {
        request_id: format!("rid-{key}-{i}"),
        key_id: key.into(),
        tenant_id: "t1".into(),
        tokens,
        cost_usd: 0,
        at_us: ledger::unix_micros(),
        counters: vec![counter(key)],
    }
}

async fn total(db: &LedgerDb, kind: &str, id: &str) -> (usize, u64) {
    let rows = db.usage(kind, id, 0).await.unwrap();
    (rows.len(), rows.iter().map(|r| r.tokens).sum())
}

async fn contract(url: &str, dir: &Path) {
    let db = LedgerDb::connect(url).await.unwrap();
    let buffer = dir.join("buffer");
    let ledger = Ledger::open(&buffer, db.clone()).await.unwrap();
    for i in 0..25 {
        ledger.record(record(i, "k1", 10 + i)).await.unwrap();
    }
    ledger.record(record(0, "k2", 7)).await.unwrap();
    ledger.flush().await.unwrap();
    assert_eq!(db.row_count().await.unwrap(), 26);
    let expected: u64 = (0..25).map(|i| 10 + i).sum();
    assert_eq!(total(&db, "key_id", "k1").await, (25, expected));
    assert_eq!(total(&db, "tenant_id", "t1").await, (26, expected + 7));
    let rows = db.usage("key_id", "k2", 0).await.unwrap();
    assert_eq!(rows[0].request_id, "rid-k2-0");
    assert_eq!(rows[0].source, ledger.source());
    let counters = db.counters().await.unwrap();
    assert_eq!(counters.len(), 2);
    assert_eq!(counters[0].counter_key, counter("k1").key);
    assert_eq!(counters[0].requests_per_unit, 100_000);

    // A restart replays nothing twice and numbers new rows after the old ones.
    ledger.shutdown().await.unwrap();
    let source = ledger.source().to_string();
    drop(ledger);
    let ledger = Ledger::open(&buffer, db.clone()).await.unwrap();
    assert_eq!(ledger.source(), source, "a buffer keeps its id");
    ledger.record(record(99, "k1", 1)).await.unwrap();
    ledger.flush().await.unwrap();
    assert_eq!(db.row_count().await.unwrap(), 27);

    // A crash after the database committed but before the checkpoint was written: the
    // whole buffer is inserted again, and nothing is doubled.
    ledger.shutdown().await.unwrap();
    drop(ledger);
    std::fs::write(buffer.join("checkpoint"), "0 0").unwrap();
    // And a crash in the middle of an append: a cut last line (never acknowledged).
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(buffer.join("buffer.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut f, br#"{"seq":1000,"at_us":1,"req"#).unwrap();
    drop(f);
    let ledger = Ledger::open(&buffer, db.clone()).await.unwrap();
    ledger.flush().await.unwrap();
    assert_eq!(db.row_count().await.unwrap(), 27);
    ledger.record(record(100, "k1", 1)).await.unwrap();
    ledger.flush().await.unwrap();
    assert_eq!(db.row_count().await.unwrap(), 28);
    ledger.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ledger_meets_the_contract() {
    let dir = temp_dir("sqlite");
    let url = format!("sqlite://{}", dir.join("ledger.db").display());
    contract(&url, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ledger_meets_the_contract() {
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("postgres did not start: {e}"));
    let dir = temp_dir("pg");
    contract(&pg.url(), &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn usage_recorded_during_a_database_outage_survives_a_crash() {
    let mut pg = Postgres::start().unwrap_or_else(|e| panic!("postgres did not start: {e}"));
    let dir = temp_dir("outage");
    let buffer = dir.join("buffer");
    let url = pg.url();
    // First life: the database goes away, usage is still acknowledged (it is in the
    // buffer), then the process dies without a shutdown.
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let db = LedgerDb::connect(&url).await.unwrap();
            let ledger = Ledger::open(&buffer, db).await.unwrap();
            ledger.record(record(0, "k1", 5)).await.unwrap();
            ledger.flush().await.unwrap();
        });
        pg.stop_server();
        rt.block_on(async {
            // Reopened as after a restart while the database is down: it still buffers.
            let db = LedgerDb::connect(&url).await;
            assert!(db.is_err(), "the database is down");
        });
        // The writer of a ledger opened before the outage keeps taking usage.
        rt.block_on(async {
            pg.start_server().unwrap();
            let db = LedgerDb::connect(&url).await.unwrap();
            let ledger = Ledger::open(&buffer, db).await.unwrap();
            pg.stop_server();
            for i in 1..=10 {
                ledger.record(record(i, "k1", 5)).await.unwrap();
            }
            assert!(
                ledger.flush().await.is_err(),
                "nothing can reach the database"
            );
        });
        // Dropping the runtime kills the writer mid-flight: a crash.
        rt.shutdown_background();
    }
    pg.start_server().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let db = LedgerDb::connect(&url).await.unwrap();
        let ledger = Ledger::open(&buffer, db.clone()).await.unwrap();
        ledger.flush().await.unwrap();
        assert_eq!(
            total(&db, "key_id", "k1").await,
            (11, 55),
            "usage lost or doubled"
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_reports_no_drift_for_matching_counters_and_the_loss_of_a_counter() {
    let dir = temp_dir("drift");
    let url = format!("sqlite://{}", dir.join("ledger.db").display());
    let db = LedgerDb::connect(&url).await.unwrap();
    let ledger = Ledger::open(&dir.join("buffer"), db.clone()).await.unwrap();
    let store = MemoryStore::new();
    // Three streams of k1, debited to its daily budget as tollgate-ratelimit does.
    for (i, tokens) in [120u64, 300, 45].into_iter().enumerate() {
        let c = counter("k1");
        let hit = Hit {
            key: c.key.clone(),
            limit: BUDGET,
            hits: tokens,
            mode: HitMode::Debit,
        };
        store.hit_batch(&[hit]).await.unwrap();
        ledger.record(record(i as u64, "k1", tokens)).await.unwrap();
    }
    ledger.flush().await.unwrap();
    let report = ledger::reconcile(&store, &db, ledger::unix_micros())
        .await
        .unwrap();
    assert_eq!(report.len(), 1, "{report:?}");
    let d = &report[0];
    assert_eq!(
        (d.subject_kind.as_str(), d.subject_id.as_str()),
        ("key_id", "k1")
    );
    assert!(d.counter_tokens.abs_diff(465) <= 1, "{d:?}");
    assert!(d.ledger_tokens.abs_diff(465) <= 1, "{d:?}");
    assert!(d.drift.abs() <= 1, "{d:?}");
    // The counters are lost (an in-memory store restarted, Redis flushed): the ledger
    // still has the usage, and the drift says how much the counters forgot.
    let fresh = MemoryStore::new();
    let report = ledger::reconcile(&fresh, &db, ledger::unix_micros())
        .await
        .unwrap();
    assert_eq!(report[0].counter_tokens, 0);
    assert!(report[0].drift.abs_diff(-465) <= 1, "{:?}", report[0]);
    ledger.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A streamed chat of 10 completion and 2 prompt tokens.
fn chat(port: u16, key: &str) -> http::Response {
    let auth = format!("Bearer {key}");
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 20,
                      "messages": [{"role": "user", "content": "two words"}]});
    let r = http::post_json(
        port,
        "/v1/chat/completions",
        &[("authorization", &auth), ("x-mock-chunks", "10")],
        &body,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

fn wait_rows(rt: &tokio::runtime::Runtime, db: &LedgerDb, key_id: &str, n: usize) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (rows, tokens) = rt.block_on(total(db, "key_id", key_id));
        if rows >= n {
            assert_eq!(rows, n, "rows doubled");
            return tokens;
        }
        assert!(Instant::now() < deadline, "{rows} of {n} ledger rows");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Restarts tollgate-ratelimit with `args` on its old ports (Envoy's cluster points there).
fn restart_ratelimit(stack: &mut Stack, port: u16, args: &[String]) {
    stack.ratelimit.kill();
    let mut cmd = std::process::Command::new(tollgate_e2e::paths::binary("tollgate-ratelimit"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", &format!("127.0.0.1:{}", port + 10)])
        .args(args);
    stack.ratelimit = Proc::spawn("tollgate-ratelimit-2", cmd, &stack.dir).unwrap();
    stack
        .ratelimit
        .wait_for_line("LISTENING ", Duration::from_secs(30))
        .unwrap();
}

#[test]
fn streams_land_in_the_postgres_ledger_through_an_outage_and_a_ratelimit_crash() {
    let mut pg = Postgres::start().unwrap_or_else(|e| panic!("postgres did not start: {e}"));
    let dir = temp_dir("e2e");
    let rls_port = free_port();
    let args = vec![
        "--ledger-url".to_string(),
        pg.url(),
        "--ledger-buffer".to_string(),
        dir.join("buffer").display().to_string(),
    ];
    let mut stack = Stack::start(StackOptions {
        ratelimit_port: Some(rls_port),
        ratelimit_args: args.clone(),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    let (key_id, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&["policy", "set", "--key", &key_id, "--budget-day", "100000"])
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(LedgerDb::connect(&pg.url())).unwrap();

    let mut request_ids = Vec::new();
    for _ in 0..3 {
        let r = chat(stack.envoy_port, &key);
        request_ids.push(r.header("x-request-id").unwrap().to_string());
    }
    assert_eq!(
        wait_rows(&rt, &db, &key_id, 3),
        36,
        "3 streams of 12 tokens"
    );
    let rows = rt.block_on(db.usage("key_id", &key_id, 0)).unwrap();
    let mut got: Vec<String> = rows.iter().map(|r| r.request_id.clone()).collect();
    got.sort();
    request_ids.sort();
    assert_eq!(got, request_ids);
    assert!(rows
        .iter()
        .all(|r| r.tokens == 12 && !r.tenant_id.is_empty()));
    // The daily budget counter matches the ledger.
    let drift = http::get(stack.ratelimit_http_port, "/ledger/drift", &[]).unwrap();
    assert_eq!(drift.status, 200, "{}", drift.text());
    let report = drift.json();
    let mine = report
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["subject_id"] == key_id.as_str())
        .unwrap_or_else(|| panic!("{report}"))
        .clone();
    assert_eq!(mine["counter_tokens"], 36, "{mine}");
    assert!(mine["drift"].as_i64().unwrap().abs() <= 1, "{mine}");

    // The database goes away: streams still pass (usage is buffered), then the rate
    // limiter is killed before it could write them, and comes back with the database.
    pg.stop_server();
    for _ in 0..4 {
        chat(stack.envoy_port, &key);
    }
    std::thread::sleep(Duration::from_millis(500));
    stack.ratelimit.kill();
    pg.start_server().unwrap();
    restart_ratelimit(&mut stack, rls_port, &args);
    let db = rt.block_on(LedgerDb::connect(&pg.url())).unwrap();
    assert_eq!(
        wait_rows(&rt, &db, &key_id, 7),
        84,
        "usage lost across the crash"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn reconcile_cli(redis: &str, ledger: &str, max_drift: u64) -> (bool, Vec<serde_json::Value>) {
    let out = std::process::Command::new(tollgate_e2e::paths::binary("tollgate-ratelimit"))
        .args(["--redis-url", redis, "--ledger-url", ledger])
        .args(["reconcile", "--max-drift", &max_drift.to_string()])
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (out.status.success(), lines)
}

#[test]
fn reconcile_command_finds_redis_counters_that_lost_what_the_ledger_recorded() {
    let redis = tollgate_e2e::redis::Redis::start().unwrap_or_else(|e| panic!("redis: {e}"));
    let dir = temp_dir("reconcile");
    let ledger_url = format!("sqlite://{}", dir.join("ledger.db").display());
    let stack = Stack::start(StackOptions {
        ratelimit_args: vec![
            "--redis-url".into(),
            redis.url(),
            "--ledger-url".into(),
            ledger_url.clone(),
            "--ledger-buffer".into(),
            dir.join("buffer").display().to_string(),
        ],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    let (key_id, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&[
            "policy",
            "set",
            "--key",
            &key_id,
            "--budget-month",
            "1000000",
        ])
        .unwrap();
    for _ in 0..2 {
        chat(stack.envoy_port, &key);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(LedgerDb::connect(&ledger_url)).unwrap();
    assert_eq!(wait_rows(&rt, &db, &key_id, 2), 24);
    let (ok, report) = reconcile_cli(&redis.url(), &ledger_url, 1);
    assert!(ok, "{report:?}");
    assert_eq!(report.len(), 1, "{report:?}");
    assert_eq!(report[0]["unit"], "month");
    assert_eq!(report[0]["counter_tokens"], 24, "{report:?}");
    assert_eq!(report[0]["ledger_tokens"], 24, "{report:?}");
    // Redis loses its data (a failover without replication, a FLUSHALL): the counters
    // forgot 24 tokens the ledger still has; the command says so and fails.
    let mut flush = std::process::Command::new("redis-cli");
    flush.args(["-p", &redis.port.to_string(), "FLUSHALL"]);
    assert!(flush.output().unwrap().status.success());
    let (ok, report) = reconcile_cli(&redis.url(), &ledger_url, 1);
    assert!(!ok, "a drift of 24 passed a bound of 1: {report:?}");
    assert_eq!(report[0]["drift"], -24, "{report:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_flushes_the_ledger_before_the_rate_limiter_exits() {
    let dir = temp_dir("sigterm");
    let ledger_url = format!("sqlite://{}", dir.join("ledger.db").display());
    let mut stack = Stack::start(StackOptions {
        ratelimit_args: vec![
            "--ledger-url".into(),
            ledger_url.clone(),
            "--ledger-buffer".into(),
            dir.join("buffer").display().to_string(),
        ],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    let (key_id, key) = stack.create_key("acme", None).unwrap();
    chat(stack.envoy_port, &key);
    let pid = stack.ratelimit.pid().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(300));
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.ratelimit.alive() {
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        stack.ratelimit.log_text().contains("ledger flushed"),
        "{}",
        stack.ratelimit.log_text()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(LedgerDb::connect(&ledger_url)).unwrap();
    assert_eq!(rt.block_on(total(&db, "key_id", &key_id)), (1, 12));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_rate_limiter_on_the_same_ledger_buffer_is_refused() {
    let dir = temp_dir("shared");
    let ledger = format!("sqlite://{}", dir.join("ledger.db").display());
    let buffer = dir.join("buffer").display().to_string();
    let start = |name: &str| {
        let mut cmd = std::process::Command::new(tollgate_e2e::paths::binary("tollgate-ratelimit"));
        cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(["--ledger-url", &ledger, "--ledger-buffer", &buffer]);
        Proc::spawn(name, cmd, &dir).unwrap()
    };
    let mut first = start("first");
    first
        .wait_for_line("LISTENING ", Duration::from_secs(30))
        .unwrap();
    // A replica scaled onto the same volume would number its records like the first one
    // and the database would drop half of them: it must not start.
    let mut second = start("second");
    let deadline = Instant::now() + Duration::from_secs(20);
    while second.alive() {
        assert!(Instant::now() < deadline, "the second writer kept running");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = second.log_text();
    assert!(
        log.contains("in use by another tollgate-ratelimit"),
        "{log}"
    );
    assert!(first.alive(), "the first one keeps its buffer");
    // Once the first is gone (a crash leaves no stale lock), a new one takes the buffer.
    first.kill();
    let mut third = start("third");
    third
        .wait_for_line("LISTENING ", Duration::from_secs(30))
        .unwrap();
    third.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
