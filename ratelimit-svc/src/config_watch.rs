//! Where the descriptor configuration comes from (`--config`: one YAML file, or a
//! directory whose `*.yaml`/`*.yml` files are each read) and how an edited file replaces
//! it while requests are being served.
//!
//! Reload: a background thread reads the files every interval (1 s by default) and
//! compares their contents with what it saw last. Contents rather than mtimes, because
//! two edits within one mtime tick, or a Kubernetes ConfigMap's symlink swap, must not be
//! missed, and the files are small. A changed set is parsed and validated in full; only a
//! valid one is swapped in, otherwise the error is logged once and the old one stays.
//!
//! Hot path: [`SharedConfig::current`] takes a `std::sync::RwLock` read lock just long
//! enough to clone an `Arc` (tens of ns; readers do not block each other, and the only
//! writer is a reload, once per change). A request keeps the `Arc` it started with, so a
//! reload never changes a decision half-way and never drops a request.

use crate::descriptor_config::{Config, ConfigError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// The configuration in force.
#[derive(Debug, Default)]
pub struct SharedConfig {
    current: RwLock<Arc<Config>>,
}

impl SharedConfig {
    pub fn new(config: Config) -> Self {
        Self {
            current: RwLock::new(Arc::new(config)),
        }
    }

    pub fn current(&self) -> Arc<Config> {
        // A poisoned lock still holds a complete Arc (the writer only assigns it).
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn replace(&self, config: Config) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }
}

/// File contents as read: `(path, text)`, sorted by path.
pub type Snapshot = Vec<(String, String)>;

#[derive(Debug, Clone)]
pub struct ConfigSource {
    path: PathBuf,
}

fn io_error(path: &Path, source: std::io::Error) -> ConfigError {
    ConfigError::Io {
        file: path.display().to_string(),
        source,
    }
}

impl ConfigSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file, or every `*.yaml`/`*.yml` file of the directory (not recursive;
    /// names starting with `.` are skipped, like a ConfigMap's `..data`).
    pub fn read(&self) -> Result<Snapshot, ConfigError> {
        let meta = std::fs::metadata(&self.path).map_err(|e| io_error(&self.path, e))?;
        let mut files = Vec::new();
        if meta.is_dir() {
            let entries = std::fs::read_dir(&self.path).map_err(|e| io_error(&self.path, e))?;
            for entry in entries {
                let path = entry.map_err(|e| io_error(&self.path, e))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
                if yaml && !name.starts_with('.') && path.is_file() {
                    files.push(path);
                }
            }
            files.sort();
        } else {
            files.push(self.path.clone());
        }
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).map_err(|e| io_error(&p, e))?;
                Ok((p.display().to_string(), text))
            })
            .collect()
    }

    /// Reads and parses: what start-up does (an error refuses to start).
    pub fn load(&self) -> Result<(Config, Snapshot), ConfigError> {
        let snapshot = self.read()?;
        Ok((Config::parse(&snapshot)?, snapshot))
    }
}

/// Polls a [`ConfigSource`] and swaps valid changes into a [`SharedConfig`]. Stops (and
/// joins its thread) when dropped.
#[derive(Debug)]
pub struct ConfigWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConfigWatcher {
    /// `loaded` is the snapshot the current configuration was built from.
    pub fn spawn(
        source: ConfigSource,
        shared: Arc<SharedConfig>,
        loaded: Snapshot,
        every: Duration,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        // A plain thread: file reads block, and this keeps them off the request runtime.
        let thread = std::thread::Builder::new()
            .name("tollgate-config-watch".into())
            .spawn(move || {
                let mut seen = Seen::Contents(loaded);
                while !stopping.load(Ordering::Acquire) {
                    std::thread::park_timeout(every);
                    if stopping.load(Ordering::Acquire) {
                        break;
                    }
                    seen = poll(&source, &shared, seen);
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// What the last poll saw: the files' contents (valid or not), or why they could not be
/// read.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Contents(Snapshot),
    Unreadable(String),
}

/// One poll: returns what was seen, so an unchanged broken file is reported only once.
fn poll(source: &ConfigSource, shared: &SharedConfig, seen: Seen) -> Seen {
    let snapshot = match source.read() {
        Ok(s) => s,
        Err(e) => {
            let e = e.to_string();
            if !matches!(&seen, Seen::Unreadable(last) if *last == e) {
                tracing::error!(error = %e, "rate limit config unreadable; keeping the current one");
            }
            return Seen::Unreadable(e);
        }
    };
    if matches!(&seen, Seen::Contents(last) if *last == snapshot) {
        return Seen::Contents(snapshot);
    }
    match Config::parse(&snapshot) {
        Ok(config) => {
            tracing::info!(
                path = %source.path().display(),
                domains = ?config.domain_names(),
                "rate limit config reloaded"
            );
            shared.replace(config);
        }
        Err(e) => {
            tracing::error!(error = %e, "invalid rate limit config; keeping the current one");
        }
    }
    // Remember the contents even when invalid: they are reported once, not every poll.
    Seen::Contents(snapshot)
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit_policy::{Limit, Unit};
    use std::time::Instant;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p = std::env::temp_dir()
                .join(format!("tollgate-rl-{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn yaml(rpm: u32) -> String {
        format!(
            "domain: tollgate\ndescriptors:\n  - key: key_id\n    rate_limit: {{unit: minute, requests_per_unit: {rpm}}}\n"
        )
    }

    fn rpm(shared: &SharedConfig) -> Option<u32> {
        shared
            .current()
            .find("tollgate", &[("key_id", "k1")])
            .and_then(|r| r.limit)
            .map(|l: Limit| l.requests_per_unit)
    }

    fn wait_for(shared: &SharedConfig, want: Option<u32>) -> bool {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if rpm(shared) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn edited_file_is_reloaded_and_a_broken_edit_keeps_the_old_config() {
        let dir = TempDir::new("reload");
        let file = dir.0.join("limits.yaml");
        std::fs::write(&file, yaml(10)).unwrap();
        let source = ConfigSource::new(&file);
        let (config, snapshot) = source.load().unwrap();
        let shared = Arc::new(SharedConfig::new(config));
        assert_eq!(rpm(&shared), Some(10));
        let every = Duration::from_millis(20);
        let _watch = ConfigWatcher::spawn(source, Arc::clone(&shared), snapshot, every).unwrap();

        std::fs::write(&file, yaml(20)).unwrap();
        assert!(wait_for(&shared, Some(20)), "got {:?}", rpm(&shared));

        std::fs::write(
            &file,
            "domain: tollgate\ndescriptors: [{key: key_id, rate_limit: {unit: lightyear}}]\n",
        )
        .unwrap();
        std::thread::sleep(every * 10);
        assert_eq!(
            rpm(&shared),
            Some(20),
            "a broken edit must keep the old config"
        );

        // The watcher is still alive and takes the next valid edit.
        std::fs::write(&file, yaml(30)).unwrap();
        assert!(wait_for(&shared, Some(30)), "got {:?}", rpm(&shared));

        // A deleted file keeps the config too.
        std::fs::remove_file(&file).unwrap();
        std::thread::sleep(every * 5);
        assert_eq!(rpm(&shared), Some(30));
    }

    #[test]
    fn a_directory_loads_every_yaml_file_and_skips_others() {
        let dir = TempDir::new("dir");
        std::fs::write(dir.0.join("a.yaml"), yaml(5)).unwrap();
        std::fs::write(dir.0.join("b.yml"), "domain: other\n").unwrap();
        std::fs::write(dir.0.join("notes.txt"), "not yaml: [").unwrap();
        std::fs::write(dir.0.join(".hidden.yaml"), "not yaml: [").unwrap();
        let (config, snapshot) = ConfigSource::new(&dir.0).load().unwrap();
        assert_eq!(config.domain_names(), vec!["other", "tollgate"]);
        assert_eq!(snapshot.len(), 2);
        let limit = config.find("tollgate", &[("key_id", "x")]).unwrap().limit;
        assert_eq!(
            limit,
            Some(Limit {
                requests_per_unit: 5,
                unit: Unit::Minute
            })
        );
        // The same domain in two files is refused.
        std::fs::write(dir.0.join("c.yaml"), yaml(6)).unwrap();
        let err = ConfigSource::new(&dir.0).load().unwrap_err().to_string();
        assert!(err.contains("duplicate domain 'tollgate'"), "{err}");
    }

    #[test]
    fn a_missing_or_broken_file_refuses_to_load() {
        let dir = TempDir::new("bad");
        assert!(ConfigSource::new(dir.0.join("nope.yaml")).load().is_err());
        let file = dir.0.join("bad.yaml");
        std::fs::write(
            &file,
            "domain: d\ndescriptors: [{key: k, rate_limit: {unit: minute}}]\nextra: 1\n",
        )
        .unwrap();
        let err = ConfigSource::new(&file).load().unwrap_err().to_string();
        assert!(
            err.contains("bad.yaml") && err.contains("unknown field"),
            "{err}"
        );
    }
}
