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
use tollgate_runtime::accept::Incoming;
use tollgate_runtime::readiness::Readiness;
use tollgate_runtime::shutdown::{self, Grace, Served, Shutdown};
use tollgate_runtime::side_port::{Reply, Route, SidePort, StatusCode};

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

    #[command(flatten)]
    grace: Grace,
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
    tollgate_runtime::logging::init();
    tollgate_runtime::logging::exit_code(run(Args::parse()).await)
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

/// Ready while the counter store answers (Redis reachable; memory always).
async fn store_answers(store: Arc<AnyStore>) -> bool {
    use tollgate_ratelimit::counter_store::CounterStore;
    store.expires_in("tg:{readiness}").await.is_ok()
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
fn drift_route(connected: Arc<OnceLock<(Arc<AnyStore>, Arc<Ledger>)>>) -> Route {
    Arc::new(move || {
        let connected = Arc::clone(&connected);
        Box::pin(async move {
            let unavailable =
                |e: String| Reply::text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"));
            let Some((store, ledger)) = connected.get() else {
                return unavailable("starting: counter store or ledger not connected yet".into());
            };
            match ledger::reconcile(&**store, ledger.db(), ledger::unix_micros()).await {
                Ok(report) => match serde_json::to_string(&report) {
                    Ok(json) => Reply::json(json),
                    Err(e) => unavailable(e.to_string()),
                },
                Err(e) => unavailable(e.to_string()),
            }
        })
    })
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(Cmd::Reconcile { max_drift }) = &args.command {
        return reconcile(&args, *max_drift).await;
    }
    // Caught from here on: a SIGTERM while starting stops the service cleanly too.
    let shutdown = Shutdown::on_signals()?;
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
    let readiness = Readiness::new(&["envoy.service.ratelimit.v3.RateLimitService"]).await;
    let connected = Arc::new(OnceLock::new());
    let mut side = SidePort::new(
        {
            let metrics = Arc::clone(&metrics);
            move || metrics.render()
        },
        readiness.clone(),
    );
    if args.ledger_url.is_some() {
        side = side.with_route("/ledger/drift", drift_route(Arc::clone(&connected)));
    }
    let http = TcpListener::bind(args.http_listen).await?;
    println!("HTTP {}", http.local_addr()?);
    tokio::spawn(side.serve(http));

    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let gate = StartupGate::new(Some(Arc::clone(&metrics)));
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(readiness.grpc_health())
            .add_service(RateLimitServiceServer::new(gate.clone()))
            .serve_with_incoming_shutdown(Incoming::new(listener), shutdown.triggered()),
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
    tokio::spawn(
        readiness
            .clone()
            .follow(move || store_answers(Arc::clone(&store))),
    );
    println!("LISTENING {addr}");
    tracing::info!(%addr, counters = backend, "tollgate-ratelimit serving RLS v3");

    // Drain: not ready, no new connections, in-flight calls answered; then what the ledger
    // buffered goes to the database (what cannot, stays in the buffer for the next start).
    let served = match shutdown::serve_until_drained(
        server,
        &shutdown,
        &readiness,
        args.grace.calls(),
    )
    .await
    {
        Served::Early(served) => return Ok(served??),
        Served::Drained(served) => served,
    };
    if let Some(l) = &ledger {
        match shutdown::within("ledger flush", args.grace.queue(), l.shutdown()).await {
            Some(Ok(())) => tracing::info!("ledger flushed"),
            Some(Err(e)) => tracing::warn!(error = %e, "ledger not flushed; kept in the buffer"),
            None => tracing::warn!("ledger not fully flushed; the rest is kept in the buffer"),
        }
    }
    // An error of the server's own is reported after the ledger is flushed.
    if let Some(served) = served {
        served??;
    }
    Ok(())
}
