//! A throwaway redis-server on a free loopback port, stoppable and restartable on the same
//! port (to test outages), killed on drop.

use crate::process::{free_port, Proc};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Redis {
    pub fn start() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-redis-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut r = Self {
            port: free_port(),
            dir,
            proc: None,
        };
        r.start_server()?;
        Ok(r)
    }

    pub fn start_server(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        let p = Proc::spawn("redis", cmd, &self.dir)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err(p.failure("did not listen"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc = Some(p);
        Ok(())
    }

    pub fn stop_server(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
