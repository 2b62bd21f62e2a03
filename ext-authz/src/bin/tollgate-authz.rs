//! tollgate-authz: Envoy ext_authz v3 gRPC server.

use clap::Parser;
use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate_authz::audit::{als_service::AlsService, writer};
use tollgate_authz::authz_config::FileConfig;
use tollgate_authz::check_service::CheckService;
use tollgate_authz::credentials::Credentials;
use tollgate_authz::decision::{Authorizer, AuthorizerSettings, Safeguards};
use tollgate_authz::key_cache::KeyCache;
use tollgate_authz::key_events;
use tollgate_authz::key_store::KeyStore;
use tollgate_authz::metrics::Metrics;
use tollgate_authz::static_keys::StaticKeys;
use tollgate_runtime::accept::Incoming;
use tollgate_runtime::readiness::Readiness;
use tollgate_runtime::shutdown::{self, Grace, Served, Shutdown};
use tollgate_runtime::side_port::SidePort;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-authz",
    about = "Tollgate's Envoy ext_authz v3 service"
)]
struct Args {
    /// Address to serve gRPC on (port 0 picks a free port, printed at start).
    #[arg(long, env = "TOLLGATE_AUTHZ_LISTEN", default_value = "127.0.0.1:10001")]
    listen: SocketAddr,
    /// Key store URL: sqlite://path or postgres://…
    #[arg(
        long,
        env = "TOLLGATE_DATABASE_URL",
        default_value = "sqlite://.tollgate/tollgate.db"
    )]
    database_url: String,
    /// YAML configuration (trusted proxies, cache, throttling, credentials, static keys).
    #[arg(long, env = "TOLLGATE_AUTHZ_CONFIG")]
    config: Option<PathBuf>,
    /// `casual` (default; SQLite and static keys allowed) or `foundation` (refuses unsafe
    /// settings: PostgreSQL required, no static keys, database TLS when configured).
    #[arg(long, env = "TOLLGATE_PROFILE", value_enum, default_value = "casual")]
    profile: tollgate_authz::profile::Profile,
    /// Plain-HTTP address for /metrics, /healthz and /readyz (printed as `HTTP <addr>`).
    #[arg(
        long,
        env = "TOLLGATE_AUTHZ_HTTP_LISTEN",
        default_value = "127.0.0.1:10011"
    )]
    http_listen: SocketAddr,
    #[command(flatten)]
    grace: Grace,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tollgate_runtime::logging::init();
    tollgate_runtime::logging::exit_code(run(Args::parse()).await)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Caught from here on: a SIGTERM while starting stops the service cleanly too.
    let shutdown = Shutdown::on_signals()?;
    let config = match &args.config {
        Some(path) => FileConfig::parse(
            &std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
        )?,
        None => FileConfig::default(),
    };
    tollgate_authz::profile::check(args.profile, &args.database_url, &config)?;
    let credentials = Arc::new(Credentials::from_config(&config.credentials, env)?);
    let static_keys = StaticKeys::from_config(&config.static_keys, env)?;
    let store = KeyStore::connect(&args.database_url).await?;
    store.migrate().await?;
    let cache = Arc::new(KeyCache::new(
        Duration::from_secs(config.cache_ttl_seconds),
        config.cache_max_entries,
    ));
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let argon2_slots = config.argon2_slots(cores);
    let defaults = Safeguards::for_slots(argon2_slots);
    let authorizer = Arc::new(
        Authorizer::new(
            store.clone(),
            cache.clone(),
            static_keys,
            AuthorizerSettings {
                trusted_proxies: config.trusted_proxy_nets()?,
                failure_window: Duration::from_secs(config.failure_window_seconds),
                max_failures_per_ip: config.max_failures_per_ip,
                max_failures_per_prefix: config.max_failures_per_prefix,
                argon2_slots,
            },
        )
        .with_safeguards(Safeguards {
            argon2_queue: config.argon2_queue.unwrap_or(defaults.argon2_queue),
            store_timeout: Duration::from_millis(config.store_timeout_ms),
            verified_keys: config.cache_max_entries,
            ..defaults
        }),
    );
    tokio::spawn(key_events::follow(
        store.clone(),
        cache,
        Duration::from_millis(config.event_poll_ms),
    ));
    let metrics = Arc::new(Metrics::new()?);
    authorizer.argon2().attach(metrics.argon2.clone());
    // The queue closes only after the open calls are served (`close_audit`), so the access
    // log entries Envoy sends during the drain are still written.
    let close_audit = Shutdown::new();
    let (sink, audit_writer) = writer::start(
        store.clone(),
        metrics.clone(),
        config.audit_queue_capacity,
        close_audit.triggered(),
    );
    tokio::spawn(writer::purge_loop(
        store.clone(),
        Duration::from_secs(u64::from(config.audit_retention_days) * 86_400),
    ));

    // Ready while the key store answers.
    let readiness = Readiness::new(&["envoy.service.auth.v3.Authorization"]).await;
    tokio::spawn(readiness.clone().follow({
        let store = store.clone();
        move || {
            let store = store.clone();
            async move { store.ping().await.is_ok() }
        }
    }));

    let http = TcpListener::bind(args.http_listen).await?;
    println!("HTTP {}", http.local_addr()?);
    let side = SidePort::new(
        {
            let metrics = metrics.clone();
            move || metrics.render()
        },
        readiness.clone(),
    );
    tokio::spawn(side.serve(http));

    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    println!("LISTENING {addr}");
    tracing::info!(%addr, postgres = store.is_postgres(), "tollgate-authz serving ext_authz v3 and access logs");
    let service = CheckService::new(authorizer, credentials, metrics.clone());
    let server = tonic::transport::Server::builder()
        .add_service(readiness.grpc_health())
        .add_service(AuthorizationServer::new(service))
        .add_service(AccessLogServiceServer::new(AlsService::new(sink, metrics)))
        .serve_with_incoming_shutdown(Incoming::new(listener), shutdown.triggered());
    // Drain: not ready (Envoy's health checks and Kubernetes move traffic away), no new
    // connections, open calls (and Envoy's access-log stream) served for the calls' share,
    // then the queued audit events written.
    let served = match shutdown::serve_until_drained(
        std::pin::pin!(server),
        &shutdown,
        &readiness,
        args.grace.calls(),
    )
    .await
    {
        Served::Early(served) => return Ok(served?),
        Served::Drained(served) => served,
    };
    close_audit.trigger();
    match shutdown::within("audit queue", args.grace.queue(), audit_writer).await {
        Some(_) => tracing::info!("audit queue written"),
        None => tracing::warn!("audit events still queued were not written"),
    }
    // An error of the server's own is reported after the queue is written.
    if let Some(served) = served {
        served?;
    }
    Ok(())
}
