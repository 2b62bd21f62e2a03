//! The whole Tollgate stack on loopback: mock model server (or a given model server),
//! tollgate-authz on a fresh SQLite file, tollgate-ratelimit, and Envoy with the filter.

use crate::envoy_config::{self, EnvoyPorts};
use crate::paths;
use crate::process::{free_port, Proc};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const READY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Fixed Envoy listener/admin ports (for `make up`); free ports when `None`.
    pub listen_port: Option<u16>,
    pub admin_port: Option<u16>,
    pub authz_port: Option<u16>,
    pub ratelimit_port: Option<u16>,
    /// An existing model server (host, port); the mock is started when `None`.
    pub model: Option<(String, u16)>,
    pub mock_port: Option<u16>,
    /// State directory (SQLite file, rendered config, logs); a temp dir when `None`.
    pub dir: Option<PathBuf>,
    pub filter_config: String,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            listen_port: None,
            admin_port: None,
            authz_port: None,
            ratelimit_port: None,
            model: None,
            mock_port: None,
            dir: None,
            filter_config: "{}".into(),
        }
    }
}

#[derive(Debug)]
pub struct Stack {
    pub dir: PathBuf,
    pub database_url: String,
    pub envoy_port: u16,
    pub admin_port: u16,
    pub model_port: u16,
    pub mock: Option<Proc>,
    pub authz: Proc,
    pub ratelimit: Proc,
    pub envoy: Proc,
    temp: bool,
}

fn temp_dir() -> Result<PathBuf, String> {
    let base = std::env::temp_dir();
    for i in 0..1000u32 {
        let d = base.join(format!(
            "tollgate-e2e-{}-{}-{i}",
            std::process::id(),
            nanos()
        ));
        if std::fs::create_dir(&d).is_ok() {
            return Ok(d);
        }
    }
    Err("cannot create a temp dir".into())
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn port_of(addr: &str) -> Result<u16, String> {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("cannot read a port from {addr:?}"))
}

fn require(path: &std::path::Path, hint: &str) -> Result<(), String> {
    if path.exists() {
        Ok(())
    } else {
        Err(format!("{} is missing: {hint}", path.display()))
    }
}

impl Stack {
    pub fn start(opts: StackOptions) -> Result<Self, String> {
        let build_hint = "run `make build` first";
        for bin in [
            "tollgate-authz",
            "tollgate-ratelimit",
            "tollgate-admin",
            "mock-model-server",
        ] {
            require(&paths::binary(bin), build_hint)?;
        }
        require(&paths::filter_wasm(), build_hint)?;
        require(
            &paths::envoy(),
            "run `make deps` (installs Envoy into .venv)",
        )?;

        let (dir, temp) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
                (d.clone(), false)
            }
            None => (temp_dir()?, true),
        };
        let database_url = format!("sqlite://{}", dir.join("tollgate.db").display());

        let (mock, model) = match &opts.model {
            Some(m) => (None, m.clone()),
            None => {
                let mut cmd = Command::new(paths::binary("mock-model-server"));
                let listen = format!("127.0.0.1:{}", opts.mock_port.unwrap_or(0));
                cmd.args(["--listen", &listen]);
                let mut p = Proc::spawn("mock-model-server", cmd, &dir)?;
                let addr = p.wait_for_line("LISTENING ", READY)?;
                (Some(p), ("127.0.0.1".to_string(), port_of(&addr)?))
            }
        };

        let mut cmd = Command::new(paths::binary("tollgate-authz"));
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{}", opts.authz_port.unwrap_or(0)),
            "--database-url",
            &database_url,
        ]);
        let mut authz = Proc::spawn("tollgate-authz", cmd, &dir)?;
        let authz_port = port_of(&authz.wait_for_line("LISTENING ", READY)?)?;

        let mut cmd = Command::new(paths::binary("tollgate-ratelimit"));
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{}", opts.ratelimit_port.unwrap_or(0)),
        ]);
        let mut ratelimit = Proc::spawn("tollgate-ratelimit", cmd, &dir)?;
        let rls_port = port_of(&ratelimit.wait_for_line("LISTENING ", READY)?)?;

        let ports = EnvoyPorts {
            listen_addr: "127.0.0.1".into(),
            listen: opts.listen_port.unwrap_or_else(free_port),
            admin: opts.admin_port.unwrap_or_else(free_port),
            authz: ("127.0.0.1".into(), authz_port),
            ratelimit: ("127.0.0.1".into(), rls_port),
            model: model.clone(),
        };
        let template = std::fs::read_to_string(paths::envoy_template())
            .map_err(|e| format!("envoy template: {e}"))?;
        let wasm = paths::filter_wasm().display().to_string();
        let config = envoy_config::render(
            &template,
            &envoy_config::vars(&ports, &wasm, &opts.filter_config),
        )?;
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config).map_err(|e| format!("envoy config: {e}"))?;
        let mut cmd = Command::new(paths::envoy());
        cmd.arg("-c").arg(&config_path).args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "warning",
        ]);
        let mut envoy = Proc::spawn("envoy", cmd, &dir)?;
        wait_envoy_ready(&mut envoy, ports.admin, ports.listen)?;

        Ok(Self {
            dir,
            database_url,
            envoy_port: ports.listen,
            admin_port: ports.admin,
            model_port: model.1,
            mock,
            authz,
            ratelimit,
            envoy,
            temp,
        })
    }

    /// Runs `tollgate-admin` against this stack's key store; returns its stdout.
    pub fn admin(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(paths::binary("tollgate-admin"))
            .args(["--database-url", &self.database_url])
            .args(args)
            .output()
            .map_err(|e| format!("tollgate-admin: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tollgate-admin {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a tenant (if new) and a key; returns (key id, full key).
    pub fn create_key(&self, tenant: &str, rpm: Option<u32>) -> Result<(String, String), String> {
        // A tenant that exists already is fine; a real failure shows up in key create.
        let _ = self.admin(&["tenant", "create", tenant]);
        let rpm_s = rpm.map(|r| r.to_string());
        let mut args = vec![
            "--json", "key", "create", "--tenant", tenant, "--name", "e2e",
        ];
        if let Some(r) = &rpm_s {
            args.extend(["--rpm", r]);
        }
        let out = self.admin(&args)?;
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .map_err(|e| format!("key create output: {e}: {out}"))?;
        match (v["id"].as_str(), v["key"].as_str()) {
            (Some(id), Some(key)) => Ok((id.to_string(), key.to_string())),
            _ => Err(format!("key create output lacks id/key: {out}")),
        }
    }

    /// Requests the mock model server recorded, oldest first.
    pub fn mock_requests(&self) -> Result<Vec<serde_json::Value>, String> {
        let r = crate::http::get(self.model_port, "/__mock/requests", &[])?;
        match r.json() {
            serde_json::Value::Array(a) => Ok(a),
            other => Err(format!("mock requests: unexpected {other}")),
        }
    }

    pub fn clear_mock_requests(&self) -> Result<(), String> {
        crate::http::request(self.model_port, "DELETE", "/__mock/requests", &[], b"")?;
        Ok(())
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in [
            Some(&self.envoy),
            Some(&self.authz),
            Some(&self.ratelimit),
            self.mock.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            s.push_str(&format!("==== {} ====\n{}\n", p.name, p.log_text()));
        }
        s
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.envoy.kill();
        self.authz.kill();
        self.ratelimit.kill();
        if let Some(m) = self.mock.as_mut() {
            m.kill();
        }
        if self.temp && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn wait_envoy_ready(envoy: &mut Proc, admin: u16, listen: u16) -> Result<(), String> {
    let deadline = Instant::now() + READY;
    loop {
        let ready = crate::http::get(admin, "/ready", &[]).is_ok_and(|r| r.status == 200)
            && std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok();
        if ready {
            return Ok(());
        }
        if !envoy.alive() {
            return Err(envoy.failure("exited before it was ready"));
        }
        if Instant::now() > deadline {
            return Err(envoy.failure("was not ready in time"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
