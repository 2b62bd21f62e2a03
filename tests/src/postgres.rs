//! A throwaway PostgreSQL server on a free loopback port, in a temp dir, stopped on drop.
//! initdb refuses to run as root, so as root the server runs as the `postgres` user.
//! `start_tls` makes one that accepts only TLS connections, with certificates made by the
//! openssl CLI.

use crate::process::free_port;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug)]
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
    running: bool,
    tls: bool,
}

fn bin_dir() -> Result<PathBuf, String> {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(base)
        .map_err(|e| {
            format!(
                "PostgreSQL is not installed ({}: {e}); apt-get install postgresql",
                base.display()
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| "no PostgreSQL version under /usr/lib/postgresql".into())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Postgres {
    pub fn start() -> Result<Self, String> {
        Self::start_with(false)
    }

    /// A server with `ssl=on` whose pg_hba.conf only has `hostssl` lines: a client that
    /// does not speak TLS cannot connect at all. Its certificate (for `127.0.0.1` and
    /// `localhost`) is signed by a throwaway CA, `ca_cert()`.
    pub fn start_tls() -> Result<Self, String> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Result<Self, String> {
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "tollgate-pg-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir))?;
        }
        let mut pg = Self {
            dir,
            bin,
            port: free_port(),
            as_postgres,
            running: false,
            tls,
        };
        let data = pg.dir.join("data");
        run(pg.command("initdb").arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "tollgate",
            "--no-sync",
        ]))?;
        if tls {
            pg.make_certificate()?;
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .map_err(|e| format!("pg_hba.conf: {e}"))?;
        }
        pg.start_server()?;
        Ok(pg)
    }

    /// The CA that signed the server's certificate (`sslrootcert` for verify-ca/full).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A throwaway CA, and server.crt (for 127.0.0.1 and localhost) and server.key signed by
    /// it in the data directory; the key readable by the server only, or PostgreSQL
    /// refuses it. (Certificate checkers refuse a CA certificate as the server's own.)
    fn make_certificate(&self) -> Result<(), String> {
        let data = self.dir.join("data");
        let (ca_key, key, csr, ext) = (
            self.dir.join("ca.key"),
            data.join("server.key"),
            self.dir.join("server.csr"),
            self.dir.join("server.ext"),
        );
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let openssl = |cmd: &mut Command| {
            run(cmd).map_err(|e| format!("openssl could not make the test certificates: {e}"))
        };
        openssl(
            Command::new("openssl")
                .args(["req", "-x509"])
                .args(ec)
                .args(["-days", "1", "-subj", "/CN=tollgate test CA", "-keyout"])
                .arg(&ca_key)
                .arg("-out")
                .arg(self.ca_cert()),
        )?;
        openssl(
            Command::new("openssl")
                .arg("req")
                .args(ec)
                .args(["-subj", "/CN=localhost", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&csr),
        )?;
        std::fs::write(
            &ext,
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .map_err(|e| format!("{}: {e}", ext.display()))?;
        openssl(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "1", "-set_serial", "1", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(self.ca_cert())
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(data.join("server.crt")),
        )?;
        if self.as_postgres {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(&key)
                .arg(data.join("server.crt")))?;
        }
        run(Command::new("chmod").arg("600").arg(&key))
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    /// Starts (or restarts) the server on the same port and data.
    pub fn start_server(&mut self) -> Result<(), String> {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        if self.tls {
            // Relative to the data directory.
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "start", "-o", &opts]))
        .map_err(|e| {
            format!(
                "{e}\n{}",
                std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            )
        })?;
        self.running = true;
        Ok(())
    }

    pub fn stop_server(&mut self) {
        if self.running {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "-w", "stop"])
                .output();
            self.running = false;
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://tollgate@127.0.0.1:{}/postgres", self.port)
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
