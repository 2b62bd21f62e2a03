//! TLS to PostgreSQL: a real server that accepts only TLS connections (a throwaway CA and
//! server certificate made with the openssl CLI), reached by the key store, tollgate-authz and
//! tollgate-admin with `sslmode=require` / `verify-full`; and the foundation profile
//! refusing a plaintext URL when `require_database_tls` is set.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tollgate_authz::key_store::KeyStore;
use tollgate_e2e::http;
use tollgate_e2e::paths;
use tollgate_e2e::postgres::Postgres;
use tollgate_e2e::process::Proc;

fn tls_server() -> Postgres {
    Postgres::start_tls().unwrap_or_else(|e| panic!("PostgreSQL with TLS did not start: {e}"))
}

/// `verify-full` against the test CA.
fn verify_full_url(pg: &Postgres) -> String {
    format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        pg.ca_cert().display()
    )
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-pgtls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_store_reaches_a_tls_only_postgres_with_sslmode_require_and_verify_full() {
    let pg = tls_server();
    // The server refuses plaintext, so the connections below can only be TLS.
    let plain = KeyStore::connect(&format!("{}?sslmode=disable", pg.url())).await;
    assert!(
        plain.is_err(),
        "a TLS-only server accepted a plaintext connection"
    );

    let store = KeyStore::connect(&format!("{}?sslmode=require", pg.url()))
        .await
        .unwrap_or_else(|e| panic!("sslmode=require: {e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    store
        .create_tenant("acme", "")
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let verified = KeyStore::connect(&verify_full_url(&pg))
        .await
        .unwrap_or_else(|e| panic!("sslmode=verify-full with the test CA: {e}"));
    let tenant = verified
        .tenant_by_name("acme")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tenant.map(|t| t.name).as_deref(), Some("acme"));

    // Verification is real: the test CA is in no built-in root store.
    let unverifiable = KeyStore::connect(&format!("{}?sslmode=verify-full", pg.url())).await;
    assert!(
        unverifiable.is_err(),
        "verify-full accepted a certificate from an unknown CA"
    );
}

/// tollgate-authz with the foundation profile, `require_database_tls: true` and `url`.
fn authz(url: &str, dir: &Path, name: &str) -> Proc {
    let config = dir.join("authz.yaml");
    std::fs::write(&config, "require_database_tls: true\n").unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(paths::binary("tollgate-authz"));
    cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--profile", "foundation", "--database-url", url])
        .arg("--config")
        .arg(&config);
    Proc::spawn(name, cmd, dir).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn foundation_authz_runs_over_tls_and_refuses_a_plaintext_url() {
    let pg = tls_server();
    let dir = temp_dir("authz");

    // sslmode=disable: refused before any connection is tried.
    let mut refused = authz(&format!("{}?sslmode=disable", pg.url()), &dir, "plain");
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused.alive() {
        assert!(
            Instant::now() < deadline,
            "{}",
            refused.failure("kept running")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = refused.log_text();
    assert!(
        log.contains("foundation profile refuses to start") && log.contains("sslmode"),
        "{log}"
    );

    // verify-full: it starts, migrates over TLS and is ready (its store answers).
    let mut served = authz(&verify_full_url(&pg), &dir, "tls");
    let addr = served
        .wait_for_line("HTTP ", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    served
        .wait_for_line("LISTENING ", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("HTTP {addr}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = http::get(port, "/readyz", &[]).map(|r| r.status);
        if status == Ok(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz {status:?}: {}",
            served.failure("is not ready")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The admin CLI takes the same URL.
    let out = Command::new(paths::binary("tollgate-admin"))
        .args([
            "--database-url",
            &verify_full_url(&pg),
            "tenant",
            "create",
            "tls-tenant",
        ])
        .output()
        .unwrap_or_else(|e| panic!("tollgate-admin: {e}"));
    assert!(
        out.status.success(),
        "tollgate-admin over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    served.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
