//! Log set-up: `RUST_LOG` filters (default `info`), `TOLLGATE_LOG_FORMAT=json` switches to
//! one JSON object per line for log shippers. Nothing logged carries key material: keys
//! appear only as key ids and prefixes.

pub fn init() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let json = std::env::var("TOLLGATE_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(false).init();
    } else {
        builder.init();
    }
}
