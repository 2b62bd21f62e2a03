//! tollgate-ratelimit: Envoy RLS v3 gRPC server. Wires flags to components only.

use clap::{Parser, Subcommand};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate_ratelimit::config_watch::{ConfigSource, ConfigWatcher, SharedConfig};
use tollgate_ratelimit::counter_store::{
    AnyStore, MemoryStore, RedisStore, RedisTarget, StoreError,
};
use tollgate_ratelimit::descriptor_config::Config;
use tollgate_ratelimit::ledger::{self, Ledger, LedgerDb};
use tollgate_ratelimit::rls_service::RlsService;
use tollgate_ratelimit::startup_gate::StartupGate;

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

    /// Budget ledger database (`sqlite:…` or `postgres://…`): every stream's real usage is
    /// recorded there. No ledger when absent.
    #[arg(long, env = "TOLLGATE_LEDGER_URL")]
    ledger_url: Option<String>,

    /// The ledger's durable local buffer (a directory): usage is fsync'd here before it is
    /// batched into the database, and replayed from here after a crash or an outage.
    #[arg(
        long,
        env = "TOLLGATE_LEDGER_BUFFER",
        default_value = "tollgate-ledger"
    )]
    ledger_buffer: PathBuf,

    #[command(subcommand)]
    command: Option<Cmd>,

    /// Plain-HTTP address for /metrics, /healthz and /readyz (printed as `HTTP <addr>`).
    #[arg(
        long,
        env = "TOLLGATE_RATELIMIT_HTTP_LISTEN",
        default_value = "127.0.0.1:10012"
    )]
    http_listen: SocketAddr,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Compares the Redis budget counters with the ledger and prints one JSON line per
    /// counter (`counter_tokens`, `ledger_tokens`, `drift`); with --max-drift, exits 1 when
    /// any |drift| is larger. In-memory counters: `GET /ledger/drift` on the running service.
    Reconcile {
        #[arg(long)]
        max_drift: Option<u64>,
    },
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

/// A URL the Redis client refuses is a configuration error: fatal before anything is bound
/// (`connect_redis` would say the same, but only after the ports are up).
fn check_redis_url(url: &str) -> Result<(), StoreError> {
    let nodes = match RedisTarget::parse(url)? {
        RedisTarget::Single(node) => vec![node],
        RedisTarget::Cluster(nodes) => nodes,
    };
    for node in nodes {
        redis::Client::open(node.as_str()).map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
    }
    Ok(())
}

/// Connects to Redis, retrying every second while it is unreachable: until then every
/// decision is UNAVAILABLE (Envoy denies) and the service is not ready. A malformed URL is
/// fatal.
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
        // gRPC health first: whoever sees /readyz 200 also sees SERVING.
        set_health(&health, ok).await;
        metrics.set_ready(ok);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `reconcile`: one JSON line per budget counter; `Err` when drift is over the bound.
async fn reconcile(args: &Args, max_drift: Option<u64>) -> Result<(), Box<dyn std::error::Error>> {
    let (Some(redis_url), Some(ledger_url)) = (&args.redis_url, &args.ledger_url) else {
        return Err(
            "reconcile needs --redis-url and --ledger-url (in-memory counters: \
                    GET /ledger/drift on the running service)"
                .into(),
        );
    };
    let timeout = Duration::from_millis(args.redis_timeout_ms.max(1));
    let store = RedisStore::connect(redis_url, timeout).await?;
    let db = LedgerDb::connect(ledger_url).await?;
    let report = ledger::reconcile(&store, &db, ledger::unix_micros()).await?;
    let mut over = 0;
    for d in &report {
        println!("{}", serde_json::to_string(d)?);
        if max_drift.is_some_and(|m| d.drift.unsigned_abs() > m) {
            over += 1;
        }
    }
    if over > 0 {
        return Err(
            format!("{over} budget counter(s) drift from the ledger beyond the bound").into(),
        );
    }
    Ok(())
}

/// SIGINT or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Connects to the ledger database, retrying every second while it is unreachable (usage is
/// only written once it is open, so nothing is lost by waiting). A malformed URL is fatal.
async fn connect_ledger(url: &str) -> Result<LedgerDb, ledger::LedgerError> {
    loop {
        match LedgerDb::connect(url).await {
            Ok(db) => return Ok(db),
            Err(ledger::LedgerError::Sql(e)) if !matches!(e, sqlx::Error::Configuration(_)) => {
                tracing::warn!(error = %e, "ledger database unreachable at start-up; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What the service decides with, once connected.
struct Backends {
    store: Arc<AnyStore>,
    backend: &'static str,
    ledger: Option<Arc<Ledger>>,
}

/// Counter store, then ledger: waits for each while it is unreachable.
async fn connect_backends(args: &Args) -> Result<Backends, Box<dyn std::error::Error>> {
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
    let ledger = match &args.ledger_url {
        Some(url) => {
            let db = connect_ledger(url).await?;
            let ledger = Ledger::open(&args.ledger_buffer, db).await?;
            tracing::info!(buffer = %args.ledger_buffer.display(), source = ledger.source(), "budget ledger on");
            Some(Arc::new(ledger))
        }
        None => None,
    };
    Ok(Backends {
        store: Arc::new(store),
        backend,
        ledger,
    })
}

/// `GET /ledger/drift`: 503 until the store and the ledger are connected.
fn drift_report(
    connected: Arc<OnceLock<(Arc<AnyStore>, Arc<Ledger>)>>,
) -> tollgate_ratelimit::metrics::DriftReport {
    Arc::new(move || {
        let connected = Arc::clone(&connected);
        Box::pin(async move {
            let (store, ledger) = connected
                .get()
                .ok_or("starting: counter store or ledger not connected yet")?;
            let report = ledger::reconcile(&**store, ledger.db(), ledger::unix_micros())
                .await
                .map_err(|e| e.to_string())?;
            serde_json::to_string(&report).map_err(|e| e.to_string())
        })
    })
}

async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health
        .set_service_status("envoy.service.ratelimit.v3.RateLimitService", status)
        .await;
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(Cmd::Reconcile { max_drift }) = &args.command {
        return reconcile(&args, *max_drift).await;
    }
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
    if let Some(url) = &args.redis_url {
        check_redis_url(url)?;
    }

    // Both ports are bound before the counter store is awaited: /healthz answers (a Redis
    // outage at start-up is not a dead process), /readyz and grpc.health.v1 say not ready,
    // and every ShouldRateLimit is UNAVAILABLE until the store answers (fail closed).
    let metrics = Arc::new(tollgate_ratelimit::metrics::Metrics::new()?);
    let connected = Arc::new(OnceLock::new());
    let drift = args
        .ledger_url
        .as_ref()
        .map(|_| drift_report(Arc::clone(&connected)));
    let http = TcpListener::bind(args.http_listen).await?;
    println!("HTTP {}", http.local_addr()?);
    tokio::spawn(tollgate_ratelimit::metrics::serve(
        http,
        Arc::clone(&metrics),
        drift,
    ));

    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, false).await;
    let gate = StartupGate::new(Some(Arc::clone(&metrics)));
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(RateLimitServiceServer::new(gate.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown_signal(),
            ),
    );

    let backends = tokio::select! {
        b = connect_backends(&args) => b?,
        // SIGTERM while waiting for the store: nothing was admitted, nothing to flush.
        served = &mut server => return Ok(served??),
    };
    let Backends {
        store,
        backend,
        ledger,
    } = backends;
    let mut service = RlsService::new(Arc::clone(&store), shared)
        .with_metrics(Arc::clone(&metrics))
        .with_lease_ttl(Duration::from_millis(args.lease_ttl_ms.max(1)));
    if let Some(l) = &ledger {
        service = service.with_ledger(Arc::clone(l));
        let _ = connected.set((Arc::clone(&store), Arc::clone(l)));
    }
    gate.open(service);
    // Ready (HTTP and gRPC health) from the first store check that succeeds.
    tokio::spawn(readiness_loop(store, Arc::clone(&metrics), health));
    println!("LISTENING {addr}");
    tracing::info!(%addr, counters = backend, "tollgate-ratelimit serving RLS v3");

    let served = server.await;
    // In-flight calls are answered; what the ledger buffered goes to the database now (what
    // cannot, stays in the buffer for the next start).
    if let Some(l) = &ledger {
        match l.shutdown().await {
            Ok(()) => tracing::info!("ledger flushed"),
            Err(e) => tracing::warn!(error = %e, "ledger not flushed; kept in the buffer"),
        }
    }
    Ok(served??)
}
