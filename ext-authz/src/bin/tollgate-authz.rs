//! tollgate-authz: Envoy ext_authz v3 gRPC server.

use clap::Parser;
use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tollgate_authz::check_service::CheckService;
use tollgate_authz::decision::Authorizer;
use tollgate_authz::key_store::SqliteKeyStore;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-authz",
    about = "Tollgate's Envoy ext_authz v3 service"
)]
struct Args {
    /// Address to serve gRPC on (port 0 picks a free port, printed at start).
    #[arg(long, env = "TOLLGATE_AUTHZ_LISTEN", default_value = "127.0.0.1:10001")]
    listen: SocketAddr,
    /// Key store URL, e.g. sqlite://.tollgate/tollgate.db
    #[arg(
        long,
        env = "TOLLGATE_DATABASE_URL",
        default_value = "sqlite://.tollgate/tollgate.db"
    )]
    database_url: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let store = SqliteKeyStore::connect(&args.database_url).await?;
    store.migrate().await?;
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    println!("LISTENING {addr}");
    tracing::info!(%addr, "tollgate-authz serving ext_authz v3");
    let service = CheckService::new(Authorizer::new(store));
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}
