//! Every benchmark binary, run in its smoke mode (a few requests per row, every answer
//! checked, no figure asserted), so a bench that no longer runs turns CI red. The figures in
//! docs/BENCHMARKS.md come from full release runs (commands there).

use std::process::Command;
use tollgate_e2e::paths;

/// Runs a bench binary with `args` in smoke mode; returns its stdout (the tables).
fn smoke(name: &str, args: &[&str]) -> String {
    let out = Command::new(paths::binary(name))
        .args(args)
        .env("TOLLGATE_BENCH_SMOKE", "1")
        .output()
        .unwrap_or_else(|e| panic!("{name} did not start: {e} (run `make build`)"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The data rows of the markdown table whose header starts with `header`.
fn rows<'a>(tables: &'a str, header: &str) -> Vec<&'a str> {
    tables
        .lines()
        .skip_while(|l| !l.starts_with(header))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect()
}

#[test]
fn gateway_bench_runs_every_variant_and_load() {
    let out = smoke("gateway-bench", &[]);
    // Five Envoys × six loads, every answer a 200 (the bench fails on any other).
    assert_eq!(rows(&out, "| load |").len(), 30, "{out}");
    assert_eq!(rows(&out, "| Envoy | heap").len(), 5, "{out}");
}

#[test]
fn authz_bench_runs_every_case() {
    let out = smoke("authz-bench", &[]);
    // Cache hit, proven-key miss and wrong secret, at two concurrencies each; every check
    // answered as expected (the bench fails otherwise).
    assert_eq!(rows(&out, "| case |").len(), 6, "{out}");
}

#[test]
fn rls_bench_runs_every_backend() {
    let out = smoke(
        "rls-bench",
        &["--decisions", "640", "--rss-decisions", "400"],
    );
    // No-op floor, memory and Redis at C=1 and C=64; every decision OK.
    assert_eq!(rows(&out, "| backend | C |").len(), 6, "{out}");
    assert_eq!(rows(&out, "| backend | server RSS").len(), 2, "{out}");
}
