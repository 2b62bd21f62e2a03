//! authz-bench: ext_authz `Check` latency and server CPU per check, on a cache hit, a cache
//! miss of a key that verified before (a store lookup, no argon2) and a wrong secret (one
//! argon2id each), at several concurrencies. Starts its own tollgate-authz (pinned to CPU 1
//! with taskset when available) on a fresh SQLite store and prints a Markdown table.
//!
//! Run: `cargo build --release -p tollgate-authz && taskset -c 0 target/release/authz-bench`

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tollgate_authz::api_key;
use tollgate_authz::key_store::KeyStore;
use tollgate_e2e::proc_stat::{self, ticks_per_sec};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn cpu_ticks(pid: u32) -> Res<u64> {
    Ok(proc_stat::cpu_ticks(pid).ok_or("no /proc stat")?)
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(db: &str, config: &std::path::Path) -> Res<Server> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("tollgate-authz");
    let pinned = Command::new("taskset").arg("--version").output().is_ok();
    let mut cmd = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "1"]).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--database-url", db, "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    // It prints `HTTP <addr>` (the metrics port), then `LISTENING <addr>`.
    let mut reader = std::io::BufReader::new(out);
    let mut line = String::new();
    while !line.starts_with("LISTENING ") {
        line.clear();
        if std::io::BufRead::read_line(&mut reader, &mut line)? == 0 {
            return Err("tollgate-authz exited before it was listening".into());
        }
    }
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("unexpected start line {line:?}"))?;
    Ok(Server { child, port })
}

fn request(key: &str) -> CheckRequest {
    let mut headers = HashMap::new();
    headers.insert("authorization".to_string(), format!("Bearer {key}"));
    headers.insert("x-request-id".to_string(), "bench".to_string());
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
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

struct Row {
    case: &'static str,
    concurrency: usize,
    checks: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    cpu_us: f64,
}

/// gRPC codes of the check's answer.
const ALLOWED: i32 = 0;
const UNAUTHENTICATED: i32 = 16;

async fn run_case(
    server: &Server,
    key: &str,
    expect: i32,
    concurrency: usize,
    checks: usize,
    case: &'static str,
) -> Res<Row> {
    let url = format!("http://127.0.0.1:{}", server.port);
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    // Warm-up (fills the cache on the hit case).
    let mut warm = AuthorizationClient::new(channel.clone());
    for _ in 0..concurrency.min(8) {
        warm.check(request(key)).await?;
    }
    let per_task = checks / concurrency;
    let pid = server.child.id();
    let cpu0 = cpu_ticks(pid)?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = AuthorizationClient::new(channel.clone());
        let req = request(key);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                let r = client.check(req.clone()).await;
                lat.push(t.elapsed());
                if let Ok(r) = r {
                    let code = r.get_ref().status.as_ref().map(|s| s.code);
                    if code != Some(expect) {
                        return Err(format!("a check answered {code:?}, not {expect}"));
                    }
                } else {
                    return Err("a check failed".to_string());
                }
            }
            Ok(lat)
        }));
    }
    let mut all = Vec::with_capacity(checks);
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed();
    let cpu = cpu_ticks(pid)? - cpu0;
    all.sort();
    let n = all.len();
    Ok(Row {
        case,
        concurrency,
        checks: n,
        rate: n as f64 / elapsed.as_secs_f64(),
        p50: all[n / 2],
        p99: all[(n * 99 / 100).min(n - 1)],
        cpu_us: cpu as f64 * 1e6 / ticks_per_sec() as f64 / n as f64,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Res<()> {
    let dir = std::env::temp_dir().join(format!("authz-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = format!("sqlite://{}", dir.join("bench.db").display());
    let store = KeyStore::connect(&db).await?;
    store.migrate().await?;
    let t = store.create_tenant("bench", "").await?;
    let k = api_key::generate()?;
    store
        .insert_key(&t.id, "bench", "", &k.prefix, &k.hash, None)
        .await?;
    // Same prefix, another secret: never verifies, so every check runs argon2id.
    let parsed = tollgate_core::api_key::parse(&k.full_key).ok_or("bad generated key")?;
    let wrong = tollgate_core::api_key::format(parsed.prefix, &"0".repeat(parsed.secret.len()));
    // Throttles off, so each wrong secret is hashed.
    let hashing = "cache_ttl_seconds: 0\nmax_failures_per_ip: 4000000000\n\
                   max_failures_per_prefix: 4000000000\n";
    let smoke = std::env::var_os("TOLLGATE_BENCH_SMOKE").is_some();
    let mut rows = Vec::new();
    for (case, config_text, key, expect, counts) in [
        (
            "cache hit",
            "cache_ttl_seconds: 300\n",
            &k.full_key,
            ALLOWED,
            [(1usize, 20_000usize), (32, 40_000)],
        ),
        (
            "cache miss, key verified before",
            "cache_ttl_seconds: 0\n",
            &k.full_key,
            ALLOWED,
            [(1, 5_000), (32, 10_000)],
        ),
        (
            "wrong secret (argon2id)",
            hashing,
            &wrong,
            UNAUTHENTICATED,
            // Within the default queue (4 per slot) and its 1 s wait for a slot.
            [(1, 100), (4, 128)],
        ),
    ] {
        let config = dir.join(format!("authz-{}.yaml", rows.len()));
        std::fs::write(&config, config_text)?;
        let server = start_server(&db, &config)?;
        for (c, n) in counts {
            // `TOLLGATE_BENCH_SMOKE=1`: a few checks per row, only to prove every answer is
            // right (`make test` runs it); the figures mean nothing.
            let n = if smoke { n.min(4 * c) } else { n };
            let row = run_case(&server, key, expect, c, n, case).await?;
            eprintln!(
                "{case} C={c}: {:.0}/s p50 {:?} p99 {:?} cpu {:.1} µs",
                row.rate, row.p50, row.p99, row.cpu_us
            );
            rows.push(row);
        }
    }
    println!("| case | C | checks | checks/s | p50 | p99 | server CPU per check |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} µs | {:.0} µs | {:.1} µs |",
            r.case,
            r.concurrency,
            r.checks,
            r.rate,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.cpu_us
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
