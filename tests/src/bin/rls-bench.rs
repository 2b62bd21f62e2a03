//! rls-bench: `ShouldRateLimit` throughput, latency and server CPU per decision for the
//! memory and Redis backends at C=1 and C=64, and the server's RSS after 1 M decisions.
//! Starts its own `tollgate-ratelimit` (pinned to CPU 1 with taskset when available; this
//! client, and redis-server, on CPU 0) and its own redis-server, and prints Markdown.
//!
//! Run: `cargo build --release -p tollgate-ratelimit && target/release/rls-bench`
//! Options: `--decisions N` (per C=64 run; C=1 runs a tenth), `--rss-decisions N`,
//! `--redis-url URL` (use a running Redis instead of starting one), `--skip-rss`,
//! `--backends noop,memory,redis` (which rows to run), `--server PATH` (another RLS
//! binary taking `--listen`, measured in place of tollgate-ratelimit).
//!
//! The first row is a no-op RLS (this binary re-run with `--serve-noop`: the same tonic
//! server answering OK without looking at the request) pinned the same way: the floor
//! that gRPC, HTTP/2 and protobuf cost on the machine, so the other rows show what the
//! limiter itself adds.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use std::io::BufRead;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tollgate_e2e::proc_stat::{self, ticks_per_sec};
use tonic::transport::Channel;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MINUTE: i32 = 2;
const DAY: i32 = 4;

fn taskset_available() -> bool {
    Command::new("taskset")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2
}

/// `taskset -c <cpu> <program>` when pinning is possible, else the program alone.
fn pinned(cpu: &str, program: &std::path::Path) -> Command {
    if taskset_available() {
        let mut c = Command::new("taskset");
        c.args(["-c", cpu]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn proc_stat_ticks(pid: u32) -> Res<u64> {
    Ok(proc_stat::cpu_ticks(pid).ok_or("no /proc stat")?)
}

fn rss_kib(pid: u32) -> Res<u64> {
    Ok(proc_stat::rss_kib(pid).ok_or("no VmRSS")?)
}

fn free_port() -> Res<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Redis {
    _proc: Proc,
    url: String,
    dir: PathBuf,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_redis() -> Res<Redis> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("rls-bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let child = pinned("0", std::path::Path::new("/usr/bin/redis-server"))
        .current_dir(&dir)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()?;
    let proc = Proc(child);
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > until {
            return Err("redis-server did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Redis {
        _proc: proc,
        url: format!("redis://127.0.0.1:{port}"),
        dir,
    })
}

struct Server {
    proc: Proc,
    port: u16,
}

/// Which RLS process to measure.
#[derive(Clone, Copy)]
enum Target<'a> {
    Tollgate,
    Noop,
    /// Another RLS binary taking `--listen` and printing `LISTENING <addr>`.
    Other(&'a str),
}

fn start_server(target: Target<'_>, redis_url: Option<&str>) -> Res<Server> {
    let exe = std::env::current_exe()?;
    let bin = match target {
        Target::Tollgate => exe.with_file_name("tollgate-ratelimit"),
        Target::Noop => exe,
        Target::Other(path) => PathBuf::from(path),
    };
    let mut cmd = pinned("1", &bin);
    if matches!(target, Target::Noop) {
        cmd.arg("--serve-noop");
    }
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(url) = redis_url {
        cmd.args(["--redis-url", url]);
    }
    let mut child = cmd.spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let proc = Proc(child);
    let mut lines = std::io::BufReader::new(out).lines();
    let port = loop {
        let line = lines.next().ok_or("server exited before LISTENING")??;
        if let Some(addr) = line.strip_prefix("LISTENING ") {
            break addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or("bad LISTENING line")?;
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Ok(Server { proc, port })
}

fn entry(k: &str, v: String) -> Entry {
    Entry {
        key: k.into(),
        value: v,
    }
}

/// What Tollgate's Envoy sends: a per-key and a per-tenant descriptor, each with the
/// request id and a limit override from authz metadata.
fn request(
    key: usize,
    tenant: usize,
    key_limit: (u32, i32),
    tenant_limit: (u32, i32),
) -> RateLimitRequest {
    let d = |k: &str, v: String, (n, unit): (u32, i32)| RateLimitDescriptor {
        entries: vec![entry(k, v), entry("request_id", "bench-rid".into())],
        limit: Some(RateLimitOverride {
            requests_per_unit: n,
            unit,
        }),
        ..Default::default()
    };
    RateLimitRequest {
        domain: "tollgate".into(),
        descriptors: vec![
            d("key_id", format!("k{key}"), key_limit),
            d("tenant_id", format!("t{tenant}"), tenant_limit),
        ],
        hits_addend: 0,
    }
}

/// Runs `total` decisions over `concurrency` streams of one HTTP/2 connection (as Envoy
/// does), on `keys` distinct key ids. Returns per-decision latencies in µs.
async fn drive(
    channel: &Channel,
    concurrency: usize,
    total: usize,
    keys: usize,
    key_limit: (u32, i32),
    tenant_limit: (u32, i32),
) -> Res<Vec<u32>> {
    let per_task = total / concurrency;
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let mut client = RateLimitServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let n = t * per_task + i;
                let req = request(n % keys, n % 10, key_limit, tenant_limit);
                let start = Instant::now();
                let r = client.should_rate_limit(req).await?;
                lat.push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
                if r.get_ref().overall_code != 1 {
                    return Err("a decision was not OK".into());
                }
            }
            Res::Ok(lat)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

struct Row {
    backend: &'static str,
    concurrency: usize,
    decisions: usize,
    rate: f64,
    p50: u32,
    p99: u32,
    cpu_us: f64,
}

/// Limits large enough that the benchmark measures admitted decisions.
const ROOMY: (u32, i32) = (1_000_000_000, MINUTE);

async fn throughput(
    backend: &'static str,
    server: &Server,
    runs: &[(usize, usize)],
) -> Res<Vec<Row>> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", server.port))?
            .tcp_nodelay(true)
            .connect()
            .await?;
    drive(&channel, 8, 4_000, 1_000, ROOMY, ROOMY).await?; // warm-up
    let pid = server.proc.0.id();
    let mut rows = Vec::new();
    for &(concurrency, decisions) in runs {
        let cpu0 = proc_stat_ticks(pid)?;
        let start = Instant::now();
        let mut lat = drive(&channel, concurrency, decisions, 1_000, ROOMY, ROOMY).await?;
        let elapsed = start.elapsed();
        let cpu = proc_stat_ticks(pid)? - cpu0;
        lat.sort_unstable();
        let n = lat.len();
        let row = Row {
            backend,
            concurrency,
            decisions: n,
            rate: n as f64 / elapsed.as_secs_f64(),
            p50: lat[n / 2],
            p99: lat[(n * 99 / 100).min(n - 1)],
            cpu_us: cpu as f64 * 1e6 / ticks_per_sec() as f64 / n as f64,
        };
        eprintln!(
            "{backend} C={concurrency}: {:.0}/s p50 {} µs p99 {} µs cpu {:.1} µs/decision",
            row.rate, row.p50, row.p99, row.cpu_us
        );
        rows.push(row);
    }
    Ok(rows)
}

/// RSS of a fresh server before and after `decisions` decisions over 100 000 key ids whose
/// counters stay live (1 000/day: each hit keeps its counter for 86 s).
async fn rss(server: &Server, decisions: usize) -> Res<(u64, u64)> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", server.port))?
            .tcp_nodelay(true)
            .connect()
            .await?;
    drive(&channel, 4, 400, 100, ROOMY, ROOMY).await?;
    let pid = server.proc.0.id();
    let before = rss_kib(pid)?;
    drive(
        &channel,
        16,
        decisions,
        100_000,
        (1_000, DAY),
        (1_000_000_000, DAY),
    )
    .await?;
    Ok((before, rss_kib(pid)?))
}

/// The baseline: answers OK to everything, doing nothing else.
struct Noop;

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let ok = DescriptorStatus {
            code: Code::Ok as i32,
            ..Default::default()
        };
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: vec![ok; request.get_ref().descriptors.len()],
            ..Default::default()
        }))
    }
}

/// `--serve-noop --listen ADDR`: the baseline server, on the same runtime flavour and
/// server settings as tollgate-ratelimit.
fn serve_noop(args: &[String]) -> Res<()> {
    let listen = arg_value(args, "--listen").unwrap_or_else(|| "127.0.0.1:0".into());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(listen.as_str()).await?;
            println!("LISTENING {}", listener.local_addr()?);
            tonic::transport::Server::builder()
                .add_service(RateLimitServiceServer::new(Noop))
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                )
                .await?;
            Res::Ok(())
        })
}

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-noop") {
        return serve_noop(&args);
    }
    let decisions: usize = arg_value(&args, "--decisions").map_or(Ok(200_000), |v| v.parse())?;
    let rss_decisions: usize =
        arg_value(&args, "--rss-decisions").map_or(Ok(1_000_000), |v| v.parse())?;
    let skip_rss = args.iter().any(|a| a == "--skip-rss");
    // Before pinning: afterwards the process sees only its own CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinning = taskset_available();
    if pinning {
        // Threads inherit the affinity of the thread that creates them: pin before the
        // runtime exists.
        Command::new("taskset")
            .args(["-cp", "0", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let external = arg_value(&args, "--redis-url");
        let redis = match &external {
            Some(_) => None,
            None => Some(start_redis()?),
        };
        let redis_url = external
            .clone()
            .or_else(|| redis.as_ref().map(|r| r.url.clone()))
            .ok_or("no redis")?;
        let runs = [(1, decisions / 10), (64, decisions)];
        let mut rows = Vec::new();
        let mut rss_rows = Vec::new();
        let only = arg_value(&args, "--backends").unwrap_or_else(|| "noop,memory,redis".into());
        let wanted = |name: &str| only.split(',').any(|b| b.trim() == name);
        let other = arg_value(&args, "--server");
        let tollgate = other.as_deref().map_or(Target::Tollgate, Target::Other);
        if wanted("noop") {
            let server = start_server(Target::Noop, None)?;
            rows.extend(throughput("no-op RLS (floor)", &server, &runs).await?);
            drop(server);
        }
        let backends = [("memory", None), ("redis", Some(redis_url.as_str()))];
        for (backend, url) in backends.into_iter().filter(|(b, _)| wanted(b)) {
            let server = start_server(tollgate, url)?;
            rows.extend(throughput(backend, &server, &runs).await?);
            drop(server);
            if !skip_rss {
                let server = start_server(tollgate, url)?;
                let (before, after) = rss(&server, rss_decisions).await?;
                eprintln!("{backend}: RSS {before} KiB -> {after} KiB after {rss_decisions} decisions");
                rss_rows.push((backend, before, after));
            }
        }
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_default();
        println!(
            "Machine: {cpu}, {} CPUs; server {}; 2 descriptors per decision (key + tenant, each with a request id and a limit override), 1 000 key ids, one HTTP/2 connection.\n",
            cpus,
            if pinning { "pinned to CPU 1, client and redis-server on CPU 0" } else { "not pinned (no taskset)" }
        );
        println!("| backend | C | decisions | decisions/s | p50 | p99 | server CPU per decision |");
        println!("|---|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {} | {} | {:.0} | {} µs | {} µs | {:.1} µs |",
                r.backend, r.concurrency, r.decisions, r.rate, r.p50, r.p99, r.cpu_us
            );
        }
        if !rss_rows.is_empty() {
            println!("\n| backend | server RSS before | after {rss_decisions} decisions (100 000 live key counters) |");
            println!("|---|---|---|");
            for (backend, before, after) in rss_rows {
                println!("| {backend} | {:.1} MiB | {:.1} MiB |", before as f64 / 1024.0, after as f64 / 1024.0);
            }
        }
        Res::Ok(())
    })
}
