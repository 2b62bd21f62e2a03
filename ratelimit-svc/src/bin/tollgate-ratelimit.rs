//! tollgate-ratelimit: Envoy RLS v3 gRPC server.

use clap::Parser;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tollgate_ratelimit::counter_store::MemoryStore;
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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    println!("LISTENING {addr}");
    tracing::info!(%addr, "tollgate-ratelimit serving RLS v3 (in-memory counters)");
    let service = RlsService::new(Arc::new(MemoryStore::new()));
    tonic::transport::Server::builder()
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
