//! tollgate-ratelimit: Envoy RLS v3 gRPC server. Wires flags to components only.

use clap::Parser;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate_ratelimit::config_watch::{ConfigSource, ConfigWatcher, SharedConfig};
use tollgate_ratelimit::counter_store::{AnyStore, MemoryStore, RedisStore, StoreError};
use tollgate_ratelimit::descriptor_config::Config;
use tollgate_ratelimit::rls_service::RlsService;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-ratelimit",
    about = "Tollgate's Envoy rate limit (RLS v3) service"
)]
struct Args {
    /// Address to serve gRPC on (port 0 picks a free port, printed at start).
    #[arg(
        long,
        env = "TOLLGATE_RATELIMIT_LISTEN",
        default_value = "127.0.0.1:10002"
    )]
    listen: SocketAddr,

    /// Descriptor limits in envoyproxy/ratelimit's YAML format: one file (several domains
    /// as `---` documents) or a directory of `*.yaml`/`*.yml` files, one domain each.
    /// Reloaded on change. Without it only Envoy's per-descriptor limit overrides apply.
    #[arg(long, env = "TOLLGATE_RATELIMIT_CONFIG")]
    config: Option<PathBuf>,

    /// How often to check the configuration for changes, in milliseconds.
    #[arg(long, env = "TOLLGATE_RATELIMIT_RELOAD_MS", default_value_t = 1000)]
    reload_ms: u64,

    /// Counters in Redis: `redis://host:port` (one node) or
    /// `redis+cluster://host:port,host:port,…` (Redis Cluster). In memory when absent.
    #[arg(long, env = "TOLLGATE_REDIS_URL")]
    redis_url: Option<String>,

    /// Bound on every Redis call, in milliseconds; beyond it the decision is UNAVAILABLE.
    #[arg(long, env = "TOLLGATE_REDIS_TIMEOUT_MS", default_value_t = 500)]
    redis_timeout_ms: u64,

    /// `casual` (default: in-memory counters allowed) or `foundation`, which refuses to
    /// start without Redis: in-memory counters are per process, so replicas would each
    /// grant the full limit.
    #[arg(long, env = "TOLLGATE_PROFILE", default_value = "casual")]
    profile: String,

    /// How long a concurrency slot (`tollgate_phase=lease`) is held when its release never
    /// comes (Envoy crashed, the admission call was cancelled), in milliseconds. Keep it
    /// longer than any stream can last (route timeout, stream idle timeout: 300 s).
    #[arg(
        long,
        env = "TOLLGATE_RATELIMIT_LEASE_TTL_MS",
        default_value_t = 600_000
    )]
    lease_ttl_ms: u64,

    /// Plain-HTTP address for /metrics, /healthz and /readyz (printed as `HTTP <addr>`).
    #[arg(
        long,
        env = "TOLLGATE_RATELIMIT_HTTP_LISTEN",
        default_value = "127.0.0.1:10012"
    )]
    http_listen: SocketAddr,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::process::ExitCode {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Same switch as tollgate-authz: one JSON object per line for log shippers.
    if std::env::var("TOLLGATE_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Connects to Redis, retrying every second while it is unreachable: the service starts
/// serving only with working counters (Envoy denies until then). A malformed URL is fatal.
async fn connect_redis(url: &str, timeout: Duration) -> Result<RedisStore, StoreError> {
    loop {
        match RedisStore::connect(url, timeout).await {
            Ok(store) => return Ok(store),
            Err(e @ StoreError::InvalidUrl(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "redis unreachable at start-up; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Ready while the counter store answers (Redis reachable; memory always): /readyz and the
/// gRPC health service say the same.
async fn readiness_loop(
    store: Arc<AnyStore>,
    metrics: Arc<tollgate_ratelimit::metrics::Metrics>,
    health: tonic_health::server::HealthReporter,
) {
    use tollgate_ratelimit::counter_store::CounterStore;
    loop {
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(1), store.expires_in("tg:{readiness}")).await,
            Ok(Ok(_))
        );
        if ok != metrics.ready() {
            tracing::info!(ready = ok, "readiness changed");
        }
        metrics.set_ready(ok);
        let status = if ok {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health
            .set_service_status("envoy.service.ratelimit.v3.RateLimitService", status)
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    match (args.profile.as_str(), &args.redis_url) {
        ("casual", _) | ("foundation", Some(_)) => {}
        ("foundation", None) => {
            return Err(
                "foundation profile refuses to start: counters must be in Redis (--redis-url)"
                    .into(),
            )
        }
        (other, _) => return Err(format!("unknown profile {other:?}: casual or foundation").into()),
    }
    // A bad configuration at start-up refuses to start.
    let (shared, _watcher) = match &args.config {
        Some(path) => {
            let source = ConfigSource::new(path);
            let (config, snapshot) = source.load()?;
            tracing::info!(path = %path.display(), domains = ?config.domain_names(), "rate limit config loaded");
            let shared = Arc::new(SharedConfig::new(config));
            let every = Duration::from_millis(args.reload_ms.max(10));
            let watcher = ConfigWatcher::spawn(source, Arc::clone(&shared), snapshot, every)?;
            (shared, Some(watcher))
        }
        None => (Arc::new(SharedConfig::new(Config::default())), None),
    };
    let (store, backend) = match &args.redis_url {
        Some(url) => {
            let timeout = Duration::from_millis(args.redis_timeout_ms.max(1));
            let redis = connect_redis(url, timeout).await?;
            let backend = if redis.is_cluster() {
                "redis cluster"
            } else {
                "redis"
            };
            (AnyStore::Redis(redis), backend)
        }
        None => (AnyStore::Memory(MemoryStore::new()), "in-memory"),
    };

    let store = Arc::new(store);
    let metrics = Arc::new(tollgate_ratelimit::metrics::Metrics::new()?);
    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(readiness_loop(
        Arc::clone(&store),
        Arc::clone(&metrics),
        health,
    ));
    let http = TcpListener::bind(args.http_listen).await?;
    println!("HTTP {}", http.local_addr()?);
    tokio::spawn(tollgate_ratelimit::metrics::serve(
        http,
        Arc::clone(&metrics),
    ));

    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    println!("LISTENING {addr}");
    tracing::info!(%addr, counters = backend, "tollgate-ratelimit serving RLS v3");
    let service = RlsService::new(store, shared)
        .with_metrics(metrics)
        .with_lease_ttl(Duration::from_millis(args.lease_ttl_ms.max(1)));
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(RateLimitServiceServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}
