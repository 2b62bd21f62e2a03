//! tollgate-authz: Envoy ext_authz v3 gRPC server.

use clap::Parser;
use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate_authz::admin_http::{self, Readiness};
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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tollgate_authz::logging::init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Ready while the key store answers; the gRPC health service says the same, so Envoy's
/// health checks and Kubernetes probes agree.
async fn readiness_loop(
    store: KeyStore,
    ready: Arc<Readiness>,
    health: tonic_health::server::HealthReporter,
) {
    loop {
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(1), store.ping()).await,
            Ok(Ok(()))
        );
        if ok != ready.get() {
            tracing::info!(ready = ok, "readiness changed");
        }
        ready.set(ok);
        let status = if ok {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health
            .set_service_status("envoy.service.auth.v3.Authorization", status)
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
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
    let sink = writer::start(store.clone(), metrics.clone(), config.audit_queue_capacity);
    tokio::spawn(writer::purge_loop(
        store.clone(),
        Duration::from_secs(u64::from(config.audit_retention_days) * 86_400),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    let ready = Arc::new(Readiness::default());
    tokio::spawn(readiness_loop(store.clone(), ready.clone(), health));

    let http = TcpListener::bind(args.http_listen).await?;
    println!("HTTP {}", http.local_addr()?);
    tokio::spawn(admin_http::serve(http, metrics.clone(), ready));

    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    println!("LISTENING {addr}");
    tracing::info!(%addr, postgres = store.is_postgres(), "tollgate-authz serving ext_authz v3 and access logs");
    let service = CheckService::new(authorizer, credentials, metrics.clone());
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(AuthorizationServer::new(service))
        .add_service(AccessLogServiceServer::new(AlsService::new(sink, metrics)))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}
