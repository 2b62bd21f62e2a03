//! gateway-bench: what Tollgate adds to Envoy, measured against bare Envoy in the same run.
//! Five Envoys in turn over the same mock model server: bare (router only), the side calls
//! only (ext_authz + ratelimit), Tollgate without the stream-done RLS call (the filter's own
//! cost), full Tollgate (ext_authz + wasm filter + ratelimit), and full Tollgate with the
//! model-routing example (docs/CONFIGURATION.md), the model routed by the filter. Envoy is pinned to CPU 1, everything else (this load generator
//! and the mock included, when run under `taskset -c 0`) to CPU 0.
//!
//! Run: `make build && taskset -c 0 target/debug/gateway-bench` (services are started from
//! target/$TOLLGATE_BUILD_PROFILE; use TOLLGATE_BUILD_PROFILE=release after `cargo build --release`).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tollgate_e2e::http;
use tollgate_e2e::paths;
use tollgate_e2e::process::Proc;
use tollgate_e2e::routing_config::RoutingSpec;
use tollgate_e2e::stack::{Stack, StackOptions};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Clone, Copy)]
struct Load {
    stream: bool,
    chunks: u32,
    /// Milliseconds between streamed chunks (0 = as fast as the mock writes).
    delay_ms: u32,
    concurrency: usize,
    requests: usize,
}

struct Sample {
    total: Duration,
    first_byte: Duration,
}

#[derive(Clone)]
struct Stats {
    p50: Duration,
    p99: Duration,
    ttfb_p50: Duration,
    ttfb_p99: Duration,
    envoy_cpu_us: f64,
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn cpu_ticks(pid: u32) -> u64 {
    tollgate_e2e::proc_stat::cpu_ticks(pid).unwrap_or(0)
}

async fn worker(port: u16, key: String, load: Load, n: usize) -> Res<Vec<Sample>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": load.stream,
        "messages": [{"role": "user", "content": "benchmark the gateway please"}],
    })
    .to_string();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let req = hyper::Request::post("/v1/chat/completions")
            .header("host", "bench")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .header("x-mock-chunks", load.chunks.to_string())
            .header("x-mock-chunk-delay-ms", load.delay_ms.to_string())
            .body(Full::new(Bytes::from(body.clone())))?;
        let start = Instant::now();
        let resp = sender.send_request(req).await?;
        if resp.status() != 200 {
            return Err(format!("status {}", resp.status()).into());
        }
        let mut body = resp.into_body();
        let mut first = None;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            if first.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                first = Some(start.elapsed());
            }
        }
        let total = start.elapsed();
        out.push(Sample {
            total,
            first_byte: first.unwrap_or(total),
        });
    }
    Ok(out)
}

async fn run_load(stack: &Stack, key: &str, load: Load) -> Res<Stats> {
    // Warm-up: connections, caches, JIT.
    worker(
        stack.envoy_port,
        key.to_string(),
        load,
        50.min(load.requests),
    )
    .await?;
    let pid = stack.envoy.pid().ok_or("envoy has no pid")?;
    let cpu0 = cpu_ticks(pid);
    let per = load.requests / load.concurrency;
    let mut tasks = Vec::new();
    for _ in 0..load.concurrency {
        tasks.push(tokio::spawn(worker(
            stack.envoy_port,
            key.to_string(),
            load,
            per,
        )));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(
            t.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?,
        );
    }
    let cpu = cpu_ticks(pid) - cpu0;
    let mut total: Vec<Duration> = all.iter().map(|s| s.total).collect();
    let mut first: Vec<Duration> = all.iter().map(|s| s.first_byte).collect();
    total.sort();
    first.sort();
    Ok(Stats {
        p50: pct(&total, 50),
        p99: pct(&total, 99),
        ttfb_p50: pct(&first, 50),
        ttfb_p99: pct(&first, 99),
        // 100 ticks per second on Linux.
        envoy_cpu_us: cpu as f64 * 10_000.0 / all.len() as f64,
    })
}

/// Envoy's heap per open stream: streams held open by a slow mock, heap read from admin.
async fn memory_per_stream(stack: &Stack, key: &str, streams: usize) -> Res<f64> {
    let allocated = || -> Res<f64> {
        let r = http::get(stack.admin_port, "/memory", &[])?;
        Ok(r.json()["allocated"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or("no allocated")?)
    };
    let before = allocated()?;
    let mut held = Vec::new();
    for _ in 0..streams {
        let tcp = TcpStream::connect(("127.0.0.1", stack.envoy_port)).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hold"}]}"#;
        let req = hyper::Request::post("/v1/chat/completions")
            .header("host", "bench")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .header("x-mock-chunks", "3")
            .header("x-mock-chunk-delay-ms", "4000")
            .body(Full::new(Bytes::from(body)))?;
        let resp = sender.send_request(req).await?;
        held.push((sender, resp));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = allocated()?;
    drop(held);
    Ok((during - before) / streams as f64)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The mock model server every variant uses (inherits this process's CPU pinning).
fn start_mock(dir: &std::path::Path) -> Res<(Proc, u16)> {
    let mut cmd = std::process::Command::new(paths::binary("mock-model-server"));
    cmd.args(["--listen", "127.0.0.1:0"]);
    let mut p = Proc::spawn("mock-model-server", cmd, dir)?;
    let addr = p.wait_for_line("LISTENING ", Duration::from_secs(20))?;
    let port = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .ok_or("mock port")?;
    Ok((p, port))
}

/// Every backend of the routing example on the one mock: the routing decision and Envoy's
/// route match are measured, not a different upstream.
fn routing_spec(mock: u16) -> RoutingSpec {
    let host = ("127.0.0.1".to_string(), mock);
    RoutingSpec {
        ollama_a: host.clone(),
        ollama_b: host.clone(),
        hosted: host,
        hosted_tls: false,
        hosted_key_env: "TOLLGATE_BENCH_HOSTED_KEY".into(),
        health_interval_ms: 5000,
        discovery_interval_ms: 10_000,
    }
}

/// Model requests fail closed (503) until the filter has discovered the backends' models.
async fn wait_discovered(stack: &Stack, key: &str) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let auth = format!("Bearer {key}");
    loop {
        let r = http::post_json(
            stack.envoy_port,
            "/v1/chat/completions",
            &[("authorization", &auth)],
            &serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}),
        )?;
        if r.status == 200 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("routing never became ready: {} {}", r.status, r.text()).into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Res<()> {
    let dir = std::env::temp_dir().join(format!("tollgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (mut mock, mock_port) = start_mock(&dir)?;
    type Transform = Option<tollgate_e2e::stack::ConfigTransform>;
    let no_debit: Transform = Some(tollgate_e2e::envoy_config::without_stream_done_calls);
    let variants: [(&str, Option<Vec<&'static str>>, bool, Transform); 5] = [
        ("bare Envoy", Some(vec![]), false, None),
        (
            "ext_authz + ratelimit",
            Some(vec![
                "envoy.filters.http.ext_authz",
                "envoy.filters.http.ratelimit",
            ]),
            false,
            None,
        ),
        (
            "Tollgate without the stream-done call",
            None,
            false,
            no_debit,
        ),
        ("Tollgate (authz + filter + ratelimit)", None, false, None),
        ("Tollgate, model routing", None, true, None),
    ];
    let loads = [
        (
            "non-streaming",
            Load {
                stream: false,
                chunks: 5,
                delay_ms: 0,
                concurrency: 1,
                requests: 2000,
            },
        ),
        (
            "non-streaming",
            Load {
                stream: false,
                chunks: 5,
                delay_ms: 0,
                concurrency: 32,
                requests: 8000,
            },
        ),
        (
            "streaming 200 chunks",
            Load {
                stream: true,
                chunks: 200,
                delay_ms: 0,
                concurrency: 1,
                requests: 500,
            },
        ),
        (
            "streaming 200 chunks 1 ms apart",
            Load {
                stream: true,
                chunks: 200,
                delay_ms: 1,
                concurrency: 1,
                requests: 100,
            },
        ),
        (
            "streaming 200 chunks",
            Load {
                stream: true,
                chunks: 200,
                delay_ms: 0,
                concurrency: 32,
                requests: 2000,
            },
        ),
        (
            "streaming 200 chunks 1 ms apart",
            Load {
                stream: true,
                chunks: 200,
                delay_ms: 1,
                concurrency: 32,
                requests: 640,
            },
        ),
    ];
    // `TOLLGATE_BENCH_SMOKE=1`: a few requests per row, only to prove every answer is right
    // (`make test` runs it so a broken bench turns CI red); the figures mean nothing.
    let smoke = std::env::var_os("TOLLGATE_BENCH_SMOKE").is_some();
    let loads = loads.map(|(label, mut load)| {
        if smoke {
            load.requests = load.requests.min(2 * load.concurrency.max(2));
        }
        (label, load)
    });
    let held_streams = if smoke { 4 } else { 100 };
    let mut results: Vec<(String, Vec<Stats>, f64)> = Vec::new();
    // `GATEWAY_BENCH_VARIANTS=2,3` / `GATEWAY_BENCH_LOADS=0,1`: a subset, e.g. to profile.
    let picked = |var: &str, i: usize| {
        std::env::var(var).map_or(true, |v| v.split(',').any(|x| x.trim() == i.to_string()))
    };
    let loads: Vec<(&str, Load)> = loads
        .into_iter()
        .enumerate()
        .filter(|(i, _)| picked("GATEWAY_BENCH_LOADS", *i))
        .map(|(_, l)| l)
        .collect();
    let variants: Vec<_> = variants
        .into_iter()
        .enumerate()
        .filter(|(i, _)| picked("GATEWAY_BENCH_VARIANTS", *i))
        .map(|(_, v)| v)
        .collect();
    for (name, filters, routed, transform) in variants {
        let spec = routing_spec(mock_port);
        let stack = Stack::start(StackOptions {
            envoy_http_filters: filters,
            pin_cpus: true,
            model: Some(("127.0.0.1".into(), mock_port)),
            filter_config: if routed {
                spec.filter_config()
            } else {
                "{}".into()
            },
            routing: routed.then_some(spec),
            envoy_env: vec![("TOLLGATE_BENCH_HOSTED_KEY".into(), "sk-bench".into())],
            envoy_transform: transform,
            ..Default::default()
        })?;
        let (_, key) = stack.create_key("bench", None)?;
        if routed {
            wait_discovered(&stack, &key).await?;
        }
        let mut stats = Vec::new();
        for &(label, load) in &loads {
            let s = run_load(&stack, &key, load).await?;
            eprintln!(
                "{name} / {label} C={}: p50 {:.0} µs p99 {:.0} µs ttfb p50 {:.0} µs, envoy cpu {:.1} µs/req",
                load.concurrency, us(s.p50), us(s.p99), us(s.ttfb_p50), s.envoy_cpu_us
            );
            stats.push(s);
        }
        let mem = memory_per_stream(&stack, &key, held_streams).await?;
        eprintln!("{name}: {mem:.0} bytes of Envoy heap per open stream");
        results.push((name.to_string(), stats, mem));
    }
    println!("| load | C | Envoy | p50 | p99 | TTFB p50 | TTFB p99 | Envoy CPU / request |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, (label, load)) in loads.iter().enumerate() {
        for (name, stats, _) in &results {
            let s = &stats[i];
            println!(
                "| {label} | {} | {name} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.1} µs |",
                load.concurrency,
                us(s.p50),
                us(s.p99),
                us(s.ttfb_p50),
                us(s.ttfb_p99),
                s.envoy_cpu_us
            );
        }
    }
    println!();
    println!("| Envoy | heap per open stream |");
    println!("|---|---|");
    for (name, _, mem) in &results {
        println!("| {name} | {:.1} KiB |", mem / 1024.0);
    }
    mock.kill();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
