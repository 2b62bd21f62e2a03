//! `make up` (and `render-compose` / `render-routing`, which write envoy/envoy.compose.yaml and
//! envoy/examples/routing.yaml): the whole stack on fixed local ports, a first key printed, foreground until
//! Ctrl-C or `make down` (SIGTERM), which stop every process it started.

use std::path::PathBuf;
use std::time::Duration;
use tollgate_e2e::http;
use tollgate_e2e::stack::{Stack, StackOptions};

const LISTEN: u16 = 10000;
const ADMIN: u16 = 9901;
const AUTHZ: u16 = 10001;
const RATELIMIT: u16 = 10002;
const MOCK: u16 = 10003;

/// The Ollama to use: `OLLAMA_URL` (default http://127.0.0.1:11434) when it answers.
fn ollama() -> Option<((String, u16), String)> {
    let url = std::env::var("OLLAMA_URL").unwrap_or_else(|_| "http://127.0.0.1:11434".into());
    let hostport = url.strip_prefix("http://")?.trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let ip = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    let ip: std::net::IpAddr = ip.parse().ok()?;
    let addr = std::net::SocketAddr::new(ip, port);
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    let tags = http::get(port, "/api/tags", &[])
        .ok()
        .filter(|r| r.status == 200)?;
    let model = tags.json()["models"][0]["name"].as_str()?.to_string();
    Some(((ip.to_string(), port), model))
}

fn print_rendered(rendered: Result<String, String>) -> std::process::ExitCode {
    match rendered {
        Ok(yaml) => {
            print!("{yaml}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> std::process::ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("up") => match up() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("make up failed: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Some("render-compose") => print_rendered(tollgate_e2e::envoy_config::render_compose()),
        Some("render-routing") => print_rendered(tollgate_e2e::routing_config::render_example()),
        _ => {
            eprintln!("usage: tollgate-dev up | render-compose | render-routing");
            std::process::ExitCode::from(2)
        }
    }
}

fn up() -> Result<(), String> {
    let started = std::time::Instant::now();
    let dir = PathBuf::from(".tollgate");
    let (model, model_name, source) = match ollama() {
        Some((m, name)) => (Some(m), name, "Ollama"),
        None => (
            None,
            "llama3.1:8b".to_string(),
            "the bundled mock model server",
        ),
    };
    let stack = Stack::start(StackOptions {
        listen_port: Some(LISTEN),
        admin_port: Some(ADMIN),
        authz_port: Some(AUTHZ),
        ratelimit_port: Some(RATELIMIT),
        mock_port: Some(MOCK),
        model,
        dir: Some(dir.clone()),
        ..Default::default()
    })?;
    let pids: Vec<String> = [&stack.envoy, &stack.ratelimit]
        .into_iter()
        .chain(stack.authz.iter())
        .chain(stack.mock.iter())
        .filter_map(|p| p.pid())
        .map(|p| p.to_string())
        .collect();
    std::fs::write(dir.join("children.pids"), pids.join("\n")).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("up.pid"), std::process::id().to_string())
        .map_err(|e| e.to_string())?;
    let (_, key) = stack.create_key("default", None)?;
    println!(
        "Tollgate is up on http://127.0.0.1:{LISTEN} in front of {source}; first key after {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    println!(
        "Logs and the key store are in {}/. Ctrl-C (or `make down`) stops everything.",
        dir.display()
    );
    println!();
    println!("TOLLGATE_API_KEY={key}");
    println!();
    println!("Try it:");
    println!("  export TOLLGATE_API_KEY={key}");
    println!(
        "  curl http://127.0.0.1:{LISTEN}/v1/chat/completions -H \"Authorization: Bearer $TOLLGATE_API_KEY\" \
-H 'content-type: application/json' -d '{{\"model\":\"{model_name}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'"
    );
    println!();
    println!("  .venv/bin/python - <<'PY'");
    println!("import os");
    println!("from openai import OpenAI");
    println!("client = OpenAI(base_url=\"http://127.0.0.1:{LISTEN}/v1\", api_key=os.environ[\"TOLLGATE_API_KEY\"])");
    println!("r = client.chat.completions.create(model=\"{model_name}\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}])");
    println!("print(r.choices[0].message.content)");
    println!("PY");
    wait_for_stop()?;
    println!("stopping");
    let _ = std::fs::remove_file(dir.join("up.pid"));
    let _ = std::fs::remove_file(dir.join("children.pids"));
    drop(stack);
    Ok(())
}

fn wait_for_stop() -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}
