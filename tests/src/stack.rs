//! The whole Tollgate stack on loopback: mock model server (or a given model server),
//! tollgate-authz on a fresh SQLite file, tollgate-ratelimit, and Envoy with the filter.

use crate::envoy_config::{self, EnvoyPorts};
use crate::paths;
use crate::process::{free_port, Proc};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const READY: Duration = Duration::from_secs(30);

/// Rewrites a rendered Envoy config.
pub type ConfigTransform = fn(&str) -> Result<String, String>;

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
    /// Key store URL; a SQLite file in the state directory when `None`.
    pub database_url: Option<String>,
    /// How many tollgate-authz replicas Envoy balances over.
    pub authz_replicas: usize,
    /// tollgate-authz YAML configuration, written to `authz.yaml`.
    pub authz_config: Option<String>,
    /// Extra environment for tollgate-authz (e.g. provider credentials).
    pub authz_env: Vec<(String, String)>,
    /// Credential name the model route asks tollgate-authz to inject.
    pub model_credential: String,
    /// Keep only these HTTP filters in Envoy (benchmarks); all when `None`.
    pub envoy_http_filters: Option<Vec<&'static str>>,
    /// Pin Envoy to CPU 1 and everything else to CPU 0 (benchmarks), when taskset exists.
    pub pin_cpus: bool,
    /// Envoy worker threads.
    pub envoy_concurrency: u32,
    /// Models the mock serves (comma-separated); its default list when `None`.
    pub mock_models: Option<String>,
    /// Which server the mock plays (`--api`: `all`, `ollama`, `openai`, `anthropic`);
    /// `all` (every API in one process) when `None`.
    pub mock_api: Option<String>,
    /// Extra arguments for tollgate-ratelimit (e.g. `--redis-url`).
    pub ratelimit_args: Vec<String>,
    /// Serve the model-routing example (several backends) instead of one model server.
    pub routing: Option<crate::routing_config::RoutingSpec>,
    /// Extra environment for Envoy (e.g. a hosted provider's key for the routing example).
    pub envoy_env: Vec<(String, String)>,
    /// A last rewrite of the rendered Envoy config (benchmark variants).
    pub envoy_transform: Option<ConfigTransform>,
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
            database_url: None,
            authz_replicas: 1,
            authz_config: None,
            authz_env: Vec::new(),
            model_credential: String::new(),
            envoy_http_filters: None,
            pin_cpus: false,
            envoy_concurrency: 1,
            mock_models: None,
            mock_api: None,
            ratelimit_args: Vec::new(),
            routing: None,
            envoy_env: Vec::new(),
            envoy_transform: None,
        }
    }
}

/// Starts a mock model server of kind `api` (`all`, `ollama`, `openai`, `anthropic`) on a
/// free loopback port, serving `models` (its default list when `None`), with its log in
/// `dir`; returns it with its port.
pub fn start_mock(
    dir: &std::path::Path,
    name: &str,
    api: &str,
    models: Option<&str>,
) -> Result<(Proc, u16), String> {
    let mut cmd = Command::new(paths::binary("mock-model-server"));
    cmd.args(["--listen", "127.0.0.1:0", "--api", api]);
    if let Some(m) = models {
        cmd.args(["--models", m]);
    }
    let mut p = Proc::spawn(name, cmd, dir)?;
    let addr = p.wait_for_line("LISTENING ", READY)?;
    let port = port_of(&addr)?;
    Ok((p, port))
}

/// `cmd` wrapped in `taskset -c <cpu>` when pinning is asked for and taskset exists.
fn pinned(program: &std::path::Path, cpu: Option<u32>) -> Command {
    let taskset = std::path::Path::new("/usr/bin/taskset");
    match cpu {
        Some(c) if taskset.exists() => {
            let mut cmd = Command::new(taskset);
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        _ => Command::new(program),
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
    pub authz: Vec<Proc>,
    /// tollgate-authz's /metrics, /healthz, /readyz port, per replica.
    pub authz_http_ports: Vec<u16>,
    /// tollgate-ratelimit's /metrics, /healthz, /readyz port.
    pub ratelimit_http_port: u16,
    pub ratelimit: Proc,
    pub envoy: Proc,
    temp: bool,
}

fn temp_dir() -> Result<PathBuf, String> {
    let d = crate::process::temp_dir("e2e");
    if d.is_dir() {
        Ok(d)
    } else {
        Err(format!("cannot create a temp dir {}", d.display()))
    }
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

        let side_cpu = opts.pin_cpus.then_some(0);
        let (dir, temp) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
                (d.clone(), false)
            }
            None => (temp_dir()?, true),
        };
        let database_url = opts
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", dir.join("tollgate.db").display()));

        let (mock, model) = match &opts.model {
            Some(m) => (None, m.clone()),
            None => {
                let mut cmd = pinned(&paths::binary("mock-model-server"), side_cpu);
                let listen = format!("127.0.0.1:{}", opts.mock_port.unwrap_or(0));
                cmd.args(["--listen", &listen]);
                if let Some(models) = &opts.mock_models {
                    cmd.args(["--models", models]);
                }
                if let Some(api) = &opts.mock_api {
                    cmd.args(["--api", api]);
                }
                let mut p = Proc::spawn("mock-model-server", cmd, &dir)?;
                let addr = p.wait_for_line("LISTENING ", READY)?;
                (Some(p), ("127.0.0.1".to_string(), port_of(&addr)?))
            }
        };

        let authz_config = match &opts.authz_config {
            Some(text) => {
                let p = dir.join("authz.yaml");
                std::fs::write(&p, text).map_err(|e| format!("authz config: {e}"))?;
                Some(p)
            }
            None => None,
        };
        let mut authz = Vec::new();
        let mut authz_ports = Vec::new();
        let mut authz_http_ports = Vec::new();
        for i in 0..opts.authz_replicas.max(1) {
            let mut cmd = pinned(&paths::binary("tollgate-authz"), side_cpu);
            let port = if i == 0 {
                opts.authz_port.unwrap_or(0)
            } else {
                0
            };
            // `make up` pins the HTTP side port next to the gRPC one; tests take free ports.
            let http_port = match (i, opts.authz_port) {
                (0, Some(p)) => p + 10,
                _ => 0,
            };
            cmd.args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--http-listen",
                &format!("127.0.0.1:{http_port}"),
                "--database-url",
                &database_url,
            ]);
            if let Some(p) = &authz_config {
                cmd.arg("--config").arg(p);
            }
            cmd.envs(opts.authz_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let name = if i == 0 {
                "tollgate-authz".to_string()
            } else {
                format!("tollgate-authz-{i}")
            };
            let mut p = Proc::spawn(&name, cmd, &dir)?;
            authz_http_ports.push(port_of(&p.wait_for_line("HTTP ", READY)?)?);
            authz_ports.push((
                "127.0.0.1".to_string(),
                port_of(&p.wait_for_line("LISTENING ", READY)?)?,
            ));
            authz.push(p);
        }

        let mut cmd = pinned(&paths::binary("tollgate-ratelimit"), side_cpu);
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{}", opts.ratelimit_port.unwrap_or(0)),
        ]);
        cmd.args([
            "--http-listen",
            &format!("127.0.0.1:{}", opts.ratelimit_port.map_or(0, |p| p + 10)),
        ]);
        cmd.args(&opts.ratelimit_args);
        let mut ratelimit = Proc::spawn("tollgate-ratelimit", cmd, &dir)?;
        let ratelimit_http_port = port_of(&ratelimit.wait_for_line("HTTP ", READY)?)?;
        let rls_port = port_of(&ratelimit.wait_for_line("LISTENING ", READY)?)?;

        let ports = EnvoyPorts {
            listen_addr: "127.0.0.1".into(),
            listen: opts.listen_port.unwrap_or_else(free_port),
            admin: opts.admin_port.unwrap_or_else(free_port),
            authz: authz_ports,
            ratelimit: ("127.0.0.1".into(), rls_port),
            model: model.clone(),
            model_credential: opts.model_credential.clone(),
        };
        let template = std::fs::read_to_string(paths::envoy_template())
            .map_err(|e| format!("envoy template: {e}"))?;
        let wasm = paths::filter_wasm().display().to_string();
        let mut config = envoy_config::render(
            &template,
            &envoy_config::vars(&ports, &wasm, &opts.filter_config),
        )?;
        if let Some(spec) = &opts.routing {
            config = crate::routing_config::apply(&config, spec)?;
        }
        if let Some(keep) = &opts.envoy_http_filters {
            config = envoy_config::keep_http_filters(&config, keep)?;
        }
        if let Some(transform) = opts.envoy_transform {
            config = transform(&config)?;
        }
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config).map_err(|e| format!("envoy config: {e}"))?;
        let mut cmd = pinned(&paths::envoy(), opts.pin_cpus.then_some(1));
        cmd.arg("-c")
            .arg(&config_path)
            .args(["--disable-hot-restart", "-l"])
            .arg(std::env::var("TOLLGATE_ENVOY_LOG").unwrap_or_else(|_| "warning".into()))
            .arg("--concurrency")
            .arg(opts.envoy_concurrency.to_string());
        cmd.envs(opts.envoy_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
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
            authz_http_ports,
            ratelimit_http_port,
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

    pub fn kill_authz(&mut self) {
        for a in &mut self.authz {
            a.kill();
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
        let procs = [&self.envoy, &self.ratelimit]
            .into_iter()
            .chain(self.authz.iter())
            .chain(self.mock.iter());
        for p in procs {
            s.push_str(&format!("==== {} ====\n{}\n", p.name, p.log_text()));
        }
        s
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.envoy.kill();
        for a in &mut self.authz {
            a.kill();
        }
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
