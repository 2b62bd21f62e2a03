//! A throwaway `redis-server` on a free loopback port, stoppable, signalable and restartable
//! on the same port (to test outages), killed on drop; and a three-master Redis Cluster.

use crate::process::{Proc, TempDir};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Redis {
    pub port: u16,
    /// Its working directory (log, cluster `nodes.conf`).
    dir: PathBuf,
    /// Set when the server made its own directory, which goes with it.
    own_dir: Option<TempDir>,
    cluster: bool,
    proc: Option<Proc>,
}

impl Redis {
    /// A single node on a free port, in a temporary directory of its own.
    pub fn start() -> Result<Self, String> {
        let own = TempDir::new("redis");
        let mut r = Self::new(free_port(), own.path().to_path_buf(), false);
        r.own_dir = Some(own);
        r.start_server()?;
        Ok(r)
    }

    /// A single node on a free port, working in a new subdirectory of `dir`.
    pub fn start_in(dir: &Path) -> Result<Self, String> {
        Self::start_on(free_port(), dir, false)
    }

    /// A node on `port` (a cluster node when `cluster`), working in `dir/<port>`.
    pub fn start_on(port: u16, dir: &Path, cluster: bool) -> Result<Self, String> {
        let dir = dir.join(port.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut r = Self::new(port, dir, cluster);
        r.start_server()?;
        Ok(r)
    }

    fn new(port: u16, dir: PathBuf, cluster: bool) -> Self {
        Self {
            port,
            dir,
            own_dir: None,
            cluster,
            proc: None,
        }
    }

    /// Starts the server (again) on its port and directory; ready when it answers PING.
    pub fn start_server(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(&self.dir)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "5000"]);
        }
        let p = Proc::spawn("redis", cmd, &self.dir)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis_command(self.port, "PING").is_ok_and(|r| r.starts_with("+PONG")) {
            if Instant::now() > deadline {
                return Err(p.failure(&format!("did not answer PING on {}", self.port)));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.proc = Some(p);
        Ok(())
    }

    /// Kills the server (SIGKILL) and waits for it; the port is free afterwards.
    pub fn stop_server(&mut self) {
        if let Some(mut p) = self.proc.take() {
            // A stopped (SIGSTOP) process must be continued to die cleanly.
            if let Some(pid) = p.pid() {
                let _ = Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
            }
            p.kill();
        }
    }

    /// Stops and starts again on the same port and directory.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop_server();
        self.start_server()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// Sends a signal (`"-STOP"`, `"-CONT"`) with kill(1).
    pub fn signal(&self, sig: &str) -> Result<(), String> {
        let pid = self.pid().ok_or("redis-server is not running")?;
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Ok(())
        } else {
            Err(format!("kill {sig} {pid} failed"))
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop_server();
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    crate::process::free_port()
}

/// A free port whose cluster bus port (port + 10000) is free too.
pub fn free_cluster_port() -> Result<u16, String> {
    let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("bind: {e}"))?;
        if port < 55_000 && free(port + 10_000) {
            return Ok(port);
        }
    }
    Err("no free port pair for a cluster node".into())
}

/// Sends one inline command and returns the raw reply.
pub fn redis_command(port: u16, command: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(format!("{command}\r\n").as_bytes())?;
    let mut buf = [0u8; 8192];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Three masters, no replicas: all 16384 slots covered.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
    _dir: TempDir,
}

impl RedisCluster {
    pub fn start() -> Result<Self, String> {
        let dir = TempDir::new("redis-cluster");
        let mut nodes: Vec<Redis> = Vec::new();
        while nodes.len() < 3 {
            let port = free_cluster_port()?;
            if nodes.iter().any(|n| n.port == port) {
                continue;
            }
            nodes.push(Redis::start_on(port, dir.path(), true)?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .map_err(|e| format!("redis-cli: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cluster create: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        let until = Instant::now() + Duration::from_secs(15);
        for n in &nodes {
            while !redis_command(n.port, "CLUSTER INFO")
                .is_ok_and(|r| r.contains("cluster_state:ok"))
            {
                if Instant::now() > until {
                    return Err("cluster did not become ok".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(Self { nodes, _dir: dir })
    }

    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", addrs.join(","))
    }
}
