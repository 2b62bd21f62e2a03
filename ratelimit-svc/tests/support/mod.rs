//! Test processes: a throwaway `redis-server` and a three-master Redis Cluster on free
//! loopback ports in a temporary directory, killed by PID when dropped (also when a test
//! fails).

#![allow(dead_code)] // each test binary uses a different part

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tollgate-rl-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A free port whose cluster bus port (port + 10000) is free too.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind");
        if port < 55_000 && port_free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair");
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

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    cluster: bool,
}

impl RedisServer {
    pub fn start(dir: &Path) -> Self {
        Self::start_on(free_port(), dir, false)
    }

    pub fn start_on(port: u16, dir: &Path, cluster: bool) -> Self {
        let dir = dir.join(port.to_string());
        std::fs::create_dir_all(&dir).expect("redis dir");
        let log = std::fs::File::create(dir.join("log")).expect("log file");
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(&dir)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        if cluster {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "5000"]);
        }
        let child = cmd
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        let server = Self {
            child: Some(child),
            port,
            dir,
            cluster,
        };
        let until = Instant::now() + Duration::from_secs(10);
        while !redis_command(port, "PING").is_ok_and(|r| r.starts_with("+PONG")) {
            assert!(
                Instant::now() < until,
                "redis-server on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and directory.
    pub fn restart(&mut self) {
        self.stop();
        let parent = self.dir.parent().expect("parent").to_path_buf();
        *self = Self::start_on(self.port, &parent, self.cluster);
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped (SIGSTOP) process must be continued to die cleanly.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.stop();
    }
}

/// Three masters, no replicas: all 16384 slots covered.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    _dir: TempDir,
}

impl RedisCluster {
    pub fn start() -> Self {
        let dir = TempDir::new("cluster");
        let mut nodes: Vec<RedisServer> = Vec::new();
        while nodes.len() < 3 {
            let port = free_port();
            if nodes.iter().any(|n| n.port == port) {
                continue;
            }
            nodes.push(RedisServer::start_on(port, &dir.0, true));
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
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let until = Instant::now() + Duration::from_secs(15);
        for n in &nodes {
            while !redis_command(n.port, "CLUSTER INFO")
                .is_ok_and(|r| r.contains("cluster_state:ok"))
            {
                assert!(Instant::now() < until, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Self { nodes, _dir: dir }
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
