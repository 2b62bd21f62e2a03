//! Mock model server for end-to-end tests and `make up`: speaks the Ollama, OpenAI and
//! Anthropic wire formats with deterministic replies, and records every request it receives
//! (with what it made of it: `interpreted`) so tests can assert what the gateway let through.
//! `--api all` (the default) answers every API in one process; `--api ollama|openai|anthropic`
//! plays one kind of server faithfully (see `kind_*`).

mod anthropic;
mod catalog;
mod decode;
mod embedding;
mod kind;
mod kind_anthropic;
mod kind_ollama;
mod kind_openai;
mod ollama;
mod openai;
mod record;
mod reply;
mod request;
mod responses;
mod router;
mod stream_body;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::catalog::Catalog;
use crate::router::{Api, State};

/// Deterministic Ollama / OpenAI / Anthropic stand-in that records what it receives.
#[derive(Debug, Parser)]
#[command(name = "mock-model-server")]
struct Cli {
    /// Address to listen on; port 0 picks a free port. The bound address is printed on
    /// stdout as `LISTENING <addr>`.
    #[arg(long, env = "MOCK_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// Comma-separated models this server knows; any other model gets the provider's 404.
    #[arg(
        long,
        env = "MOCK_MODELS",
        value_delimiter = ',',
        default_values = ["llama3.1:8b", "qwen2:0.5b", "gpt-4o-mini"]
    )]
    models: Vec<String>,

    /// Which server to play: `all` answers every API in one process; `ollama`, `openai`
    /// and `anthropic` behave like that kind only (its routes, its JSON decoder, its
    /// errors), so a request reaching the wrong kind shows as that kind's 404.
    #[arg(long, env = "MOCK_API", value_enum, default_value = "all")]
    api: Api,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    let state = Arc::new(State::new(Catalog::new(cli.models), cli.api));

    let listener = TcpListener::bind(cli.listen).await?;
    announce(listener.local_addr()?)?;

    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Typically EMFILE under load: back off instead of spinning, keep serving.
                eprintln!("mock-model-server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Real model servers (Ollama is Go, which sets it by default) write each chunk at
        // once; with Nagle on, chunks would wait for the gateway's delayed ACKs.
        if let Err(e) = stream.set_nodelay(true) {
            eprintln!("mock-model-server: TCP_NODELAY: {e}");
        }
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| router::handle(req, Arc::clone(&state)));
            let served = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                eprintln!("mock-model-server: connection ended with error: {e}");
            }
        });
    }
}

/// The harness reads this exact line to learn the port, so it is the only thing written to
/// stdout and it is flushed at once (stdout is a pipe there, hence block-buffered).
fn announce(addr: SocketAddr) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "LISTENING {addr}")?;
    stdout.flush()
}
