//! Log set-up: `RUST_LOG` filters (default `info`), `TOLLGATE_LOG_FORMAT=json` switches to
//! one JSON object per line for log shippers. Logs go to stderr; stdout carries only the
//! `HTTP <addr>` and `LISTENING <addr>` lines that launchers wait for. Nothing logged
//! carries key material: keys appear only as key ids and prefixes.

/// Installs the global subscriber. A second call keeps the first subscriber.
pub fn init() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init`: an already installed subscriber is not worth a panic.
    let _ = if json_requested(std::env::var("TOLLGATE_LOG_FORMAT").ok().as_deref()) {
        builder.json().with_current_span(false).try_init()
    } else {
        builder.try_init()
    };
}

/// The exit status of a service's `main`: the error that stopped it is logged (the log is
/// where operators look), then the process fails.
pub fn exit_code(result: Result<(), Box<dyn std::error::Error>>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn json_requested(format: Option<&str>) -> bool {
    format.is_some_and(|v| v.eq_ignore_ascii_case("json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_in_any_case_switches_to_json_lines() {
        assert!(json_requested(Some("json")));
        assert!(json_requested(Some("JSON")));
        assert!(!json_requested(Some("text")));
        assert!(!json_requested(Some("")));
        assert!(!json_requested(None));
    }
}
