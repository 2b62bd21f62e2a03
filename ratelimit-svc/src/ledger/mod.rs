//! Durable budget ledger: the real token usage of every stream (the stream-done
//! `tollgate_phase=usage` descriptor) is appended to a local buffer file and fsync'd before
//! the call is answered, then batched into SQL (SQLite or PostgreSQL). What the buffer holds
//! beyond the SQL checkpoint is inserted again at start-up, after an SQL outage and on
//! shutdown; inserts are idempotent, so a crash or restart loses nothing and doubles nothing.
//!
//! One writer task owns the buffer and the SQL connection; request handlers only send it a
//! message (no lock on the request path), and only stream-done calls do.
//!
//! Buffer directory: `source` (this buffer's id, the rows' `source`), `buffer.jsonl` (one
//! JSON line per usage, with a sequence number), `checkpoint` (`<bytes in SQL> <last seq>`).

mod reconcile;
mod sql;

pub use self::reconcile::{reconcile, Drift};
pub use self::sql::{CounterRow, LedgerDb, UsageRow};

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// Rows per SQL transaction.
const SQL_BATCH: usize = 500;
/// Records appended (and fsync'd) together.
const APPEND_BATCH: usize = 1024;
/// The buffer is emptied once everything in it is in SQL and it is at least this large.
const COMPACT_AT: u64 = 8 << 20;
/// After an SQL error, the next attempt waits this long (records are still buffered).
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger buffer: {0}")]
    Io(#[from] std::io::Error),
    #[error("ledger database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("ledger migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    InvalidUrl(String),
    #[error("ledger: {0}")]
    Failed(String),
    #[error("ledger writer stopped")]
    Closed,
}

/// A budget counter (day or longer) that a stream was charged to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRef {
    /// The key in the counter store (`redis_keys::counter_key`).
    pub key: String,
    /// `key_id` or `tenant_id`.
    pub subject_kind: String,
    pub subject_id: String,
    pub requests_per_unit: u32,
    /// `day`, `week`, `month` or `year`.
    pub unit: String,
    /// A USD counter (`tollgate_unit=usd`): it counts cost in 1/10000 USD, not tokens.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub usd: bool,
}

/// The real usage of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub request_id: String,
    pub key_id: String,
    pub tenant_id: String,
    pub tokens: u64,
    /// The stream's cost in 1/10000 USD (0 when its model has no price).
    pub cost_usd: u64,
    /// Unix time in microseconds (the rate limiter's clock).
    pub at_us: u64,
    pub counters: Vec<CounterRef>,
}

/// A record as buffered: with its sequence number in this buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Line {
    pub seq: u64,
    pub at_us: u64,
    pub request_id: String,
    pub key_id: String,
    pub tenant_id: String,
    pub tokens: u64,
    /// Absent in lines written before costs were recorded.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cost_usd: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counters: Vec<CounterRef>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

type Ack = oneshot::Sender<Result<(), String>>;

enum Msg {
    Record(Record, Ack),
    Flush(Ack),
    Shutdown(Ack),
    /// From the flusher: empty the buffer if it is still `at` bytes long.
    Compact {
        at: u64,
        seq: u64,
        done: oneshot::Sender<bool>,
    },
}

/// The handle request handlers use; cheap to share (`Arc`).
#[derive(Debug)]
pub struct Ledger {
    tx: mpsc::Sender<Msg>,
    source: String,
    db: LedgerDb,
}

impl Ledger {
    /// Opens (or creates) the buffer in `dir`, starts the writer, and begins inserting
    /// whatever an earlier run left unflushed.
    pub async fn open(dir: &Path, db: LedgerDb) -> Result<Self, LedgerError> {
        let dir = dir.to_path_buf();
        let opened = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || open_buffer(&dir)
        })
        .await
        .map_err(|e| LedgerError::Failed(e.to_string()))??;
        let (tx, rx) = mpsc::channel(65_536);
        let (len_tx, len_rx) = watch::channel(opened.len);
        let (flush_tx, flush_rx) = mpsc::unbounded_channel();
        let writer = Writer {
            _lock: opened.lock,
            dir: dir.clone(),
            file: Arc::new(opened.file),
            len: opened.len,
            next_seq: opened.next_seq,
            len_tx,
            flush_tx,
        };
        let flusher = Flusher {
            dir,
            source: opened.source.clone(),
            db: db.clone(),
            flushed: opened.flushed,
            flushed_seq: opened.flushed_seq,
            len_rx,
            writer: tx.downgrade(),
            retry_at: None,
            last_error_log: None,
        };
        tokio::spawn(writer.run(rx));
        tokio::spawn(flusher.run(flush_rx));
        Ok(Self {
            tx,
            source: opened.source,
            db,
        })
    }

    /// This buffer's id (the rows' `source`).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn db(&self) -> &LedgerDb {
        &self.db
    }

    async fn ask(&self, make: impl FnOnce(Ack) -> Msg) -> Result<(), LedgerError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(make(ack))
            .await
            .map_err(|_| LedgerError::Closed)?;
        done.await
            .map_err(|_| LedgerError::Closed)?
            .map_err(LedgerError::Failed)
    }

    /// Returns once the record is fsync'd in the local buffer (SQL follows).
    pub async fn record(&self, record: Record) -> Result<(), LedgerError> {
        self.ask(|ack| Msg::Record(record, ack)).await
    }

    /// Returns once everything recorded so far is in SQL.
    pub async fn flush(&self) -> Result<(), LedgerError> {
        self.ask(Msg::Flush).await
    }

    /// Flushes to SQL and stops the writer (at service shutdown).
    pub async fn shutdown(&self) -> Result<(), LedgerError> {
        self.ask(Msg::Shutdown).await
    }
}

/// Appends and fsyncs; never waits on SQL, so a slow or unreachable database cannot hold
/// usage in memory where a crash would lose it.
struct Writer {
    /// Keeps the buffer directory locked while this writer runs.
    _lock: File,
    dir: PathBuf,
    file: Arc<File>,
    /// Bytes of the buffer file.
    len: u64,
    next_seq: u64,
    len_tx: watch::Sender<u64>,
    flush_tx: mpsc::UnboundedSender<Ack>,
}

/// Moves the buffer into SQL, from the checkpoint on.
struct Flusher {
    dir: PathBuf,
    source: String,
    db: LedgerDb,
    /// Bytes of the buffer already in SQL.
    flushed: u64,
    flushed_seq: u64,
    len_rx: watch::Receiver<u64>,
    /// To ask the writer to empty a fully flushed buffer.
    writer: mpsc::WeakSender<Msg>,
    retry_at: Option<Instant>,
    last_error_log: Option<Instant>,
}

fn read_checkpoint(path: &Path) -> (u64, u64) {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(str::parse::<u64>);
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
        .unwrap_or((0, 0))
}

fn write_checkpoint(dir: &Path, flushed: u64, seq: u64) -> std::io::Result<()> {
    let tmp = dir.join("checkpoint.tmp");
    let mut f = File::create(&tmp)?;
    write!(f, "{flushed} {seq}")?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join("checkpoint"))?;
    fsync_dir(dir)
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What `open` finds on disk.
struct Opened {
    source: String,
    /// Held (locked) while the process runs: one buffer, one writer.
    lock: File,
    file: File,
    len: u64,
    flushed: u64,
    flushed_seq: u64,
    next_seq: u64,
}

/// Takes the buffer directory for this process. Two writers on one buffer would number
/// their records alike and the database would keep only one of each pair, so a second
/// process (a scaled replica on a shared volume) is refused rather than let lose usage.
/// A POSIX record lock: the kernel drops it when the process dies (no stale lock after a
/// crash), and it is per process, so reopening the buffer in the same process (tests that
/// simulate a restart) is not refused.
fn lock_dir(dir: &Path) -> Result<File, LedgerError> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    match rustix::fs::fcntl_lock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(lock),
        Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::ACCESS => {
            Err(LedgerError::Failed(format!(
                "buffer directory {} is in use by another tollgate-ratelimit; each replica \
                 needs its own --ledger-buffer",
                dir.display()
            )))
        }
        Err(e) => Err(LedgerError::Io(e.into())),
    }
}

fn open_buffer(dir: &Path) -> Result<Opened, LedgerError> {
    std::fs::create_dir_all(dir)?;
    let lock = lock_dir(dir)?;
    let source_path = dir.join("source");
    let source = match std::fs::read_to_string(&source_path) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            // The rows' `source`: two buffers with one id would see each other's rows as
            // duplicates, so it comes from the OS generator, with no fallback.
            let id = tollgate_runtime::ids::random_hex64()
                .map_err(|e| LedgerError::Failed(e.to_string()))?;
            let tmp = dir.join("source.tmp");
            let mut f = File::create(&tmp)?;
            f.write_all(id.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &source_path)?;
            fsync_dir(dir)?;
            id
        }
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(dir.join("buffer.jsonl"))?;
    // A line cut by a crash was never acknowledged: drop it.
    let (len, last_seq) = repair_tail(&file)?;
    let (mut flushed, flushed_seq) = read_checkpoint(&dir.join("checkpoint"));
    if flushed > len {
        // The buffer was emptied after its last flush, before the checkpoint said so.
        flushed = 0;
    }
    Ok(Opened {
        source,
        lock,
        file,
        len,
        flushed,
        flushed_seq,
        next_seq: last_seq.max(flushed_seq) + 1,
    })
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(m) = rx.recv().await {
            let mut batch = vec![m];
            while batch.len() < APPEND_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            if self.handle(batch).await {
                return;
            }
        }
    }

    /// Appends the batch's records and acknowledges them; hands flush requests to the
    /// flusher. Returns whether to stop.
    async fn handle(&mut self, batch: Vec<Msg>) -> bool {
        let mut lines = Vec::new();
        let mut acks = Vec::new();
        let mut after = Vec::new();
        let mut stop = false;
        for m in batch {
            match m {
                Msg::Record(r, ack) => {
                    lines.push(Line {
                        seq: self.next_seq,
                        at_us: r.at_us,
                        request_id: r.request_id,
                        key_id: r.key_id,
                        tenant_id: r.tenant_id,
                        tokens: r.tokens,
                        cost_usd: r.cost_usd,
                        counters: r.counters,
                    });
                    self.next_seq += 1;
                    acks.push(ack);
                }
                Msg::Flush(ack) => after.push(ack),
                Msg::Shutdown(ack) => {
                    after.push(ack);
                    stop = true;
                }
                Msg::Compact { at, seq, done } => {
                    let _ = done.send(self.compact(at, seq));
                }
            }
        }
        if !lines.is_empty() {
            let appended = self.append(&lines).await.map_err(|e| e.to_string());
            for ack in acks {
                let _ = ack.send(appended.clone());
            }
            let _ = self.len_tx.send(self.len);
        }
        // Answered by the flusher once what was appended so far is in SQL.
        for ack in after {
            let _ = self.flush_tx.send(ack);
        }
        stop
    }

    async fn append(&mut self, lines: &[Line]) -> Result<(), LedgerError> {
        let mut bytes = Vec::with_capacity(lines.len() * 160);
        for l in lines {
            serde_json::to_writer(&mut bytes, l).map_err(|e| LedgerError::Failed(e.to_string()))?;
            bytes.push(b'\n');
        }
        let file = Arc::clone(&self.file);
        let before = self.len;
        let n = bytes.len() as u64;
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let written = (&*file).write_all(&bytes).and_then(|()| file.sync_data());
            if written.is_err() {
                // Leave no partial line behind for the next append to follow.
                let _ = file.set_len(before);
            }
            written
        })
        .await
        .map_err(|e| LedgerError::Failed(e.to_string()))?;
        result?;
        self.len += n;
        Ok(())
    }

    /// Empties the buffer if nothing was appended since the flusher saw it all in SQL. The
    /// checkpoint is reset first: a crash in between replays the buffer (idempotently)
    /// rather than skipping what comes next.
    fn compact(&mut self, at: u64, seq: u64) -> bool {
        if self.len != at {
            return false;
        }
        let emptied = write_checkpoint(&self.dir, 0, seq).and_then(|()| self.file.set_len(0));
        match emptied {
            Ok(()) => {
                self.len = 0;
                let _ = self.len_tx.send(0);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "ledger: cannot empty the buffer");
                false
            }
        }
    }
}

impl Flusher {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Ack>) {
        let _ = self.flush_sql().await;
        let mut tick = tokio::time::interval(RETRY_AFTER);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                req = requests.recv() => {
                    let Some(ack) = req else {
                        // The writer stopped: one last attempt.
                        let _ = self.flush_sql().await;
                        return;
                    };
                    let r = self.flush_sql().await.map_err(|e| e.to_string());
                    let _ = ack.send(r);
                }
                changed = self.len_rx.changed() => {
                    let due = self.retry_at.is_none_or(|at| Instant::now() >= at);
                    if changed.is_ok() && due {
                        let _ = self.flush_sql().await;
                    }
                }
                _ = tick.tick() => {
                    if self.flushed < *self.len_rx.borrow() {
                        let _ = self.flush_sql().await;
                    }
                }
            }
        }
    }

    fn log_error(&mut self, e: &LedgerError) {
        if self
            .last_error_log
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            self.last_error_log = Some(Instant::now());
            tracing::warn!(error = %e, "ledger: cannot write to the database; usage stays buffered");
        }
    }

    /// Inserts everything past the checkpoint, batch by batch, advancing it after each.
    async fn flush_sql(&mut self) -> Result<(), LedgerError> {
        loop {
            let len = *self.len_rx.borrow();
            if self.flushed >= len {
                break;
            }
            let path = self.dir.join("buffer.jsonl");
            let from = self.flushed;
            let (lines, bytes) =
                tokio::task::spawn_blocking(move || read_lines(&path, from, len, SQL_BATCH))
                    .await
                    .map_err(|e| LedgerError::Failed(e.to_string()))??;
            if bytes == 0 {
                break;
            }
            if let Err(e) = self.db.insert(&self.source, &lines).await {
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
                self.log_error(&e);
                return Err(e);
            }
            self.flushed += bytes;
            if let Some(last) = lines.last() {
                self.flushed_seq = self.flushed_seq.max(last.seq);
            }
            write_checkpoint(&self.dir, self.flushed, self.flushed_seq)?;
        }
        if self.retry_at.take().is_some() {
            tracing::info!("ledger: database reachable again; buffered usage written");
        }
        if self.flushed == *self.len_rx.borrow() && self.flushed >= COMPACT_AT {
            if let Some(writer) = self.writer.upgrade() {
                let (done, compacted) = oneshot::channel();
                let msg = Msg::Compact {
                    at: self.flushed,
                    seq: self.flushed_seq,
                    done,
                };
                if writer.send(msg).await.is_ok() && compacted.await.unwrap_or(false) {
                    self.flushed = 0;
                }
            }
        }
        Ok(())
    }
}

/// Truncates a partial last line; returns the file's length and its last sequence number.
fn repair_tail(file: &File) -> Result<(u64, u64), LedgerError> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok((0, 0));
    }
    // Lines are small: the last complete one is within the last 64 KiB.
    let start = len.saturating_sub(64 << 10);
    let mut tail = Vec::new();
    let mut f = file;
    f.seek(SeekFrom::Start(start))?;
    f.read_to_end(&mut tail)?;
    let end = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => start + i as u64 + 1,
        None => start,
    };
    if end < len {
        tracing::warn!(
            bytes = len - end,
            "ledger: dropping a partial last line of the buffer"
        );
        file.set_len(end)?;
    }
    let kept = &tail[..(end - start) as usize];
    let last = kept
        .strip_suffix(b"\n")
        .and_then(|k| k.rsplit(|b| *b == b'\n').next())
        .and_then(|l| serde_json::from_slice::<Line>(l).ok())
        .map_or(0, |l| l.seq);
    Ok((end, last))
}

/// Up to `max` complete lines from `offset`; returns them and the bytes they span. A line
/// that does not parse is skipped (and logged), never retried for ever.
fn read_lines(
    path: &Path,
    offset: u64,
    len: u64,
    max: usize,
) -> Result<(Vec<Line>, u64), LedgerError> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.take((len - offset).min(4 << 20)).read_to_end(&mut buf)?;
    let mut lines = Vec::new();
    let mut used = 0usize;
    for raw in buf.split_inclusive(|b| *b == b'\n') {
        if lines.len() >= max || !raw.ends_with(b"\n") {
            break;
        }
        used += raw.len();
        match serde_json::from_slice::<Line>(&raw[..raw.len() - 1]) {
            Ok(l) => lines.push(l),
            Err(e) => tracing::error!(error = %e, "ledger: skipping an unreadable buffer line"),
        }
    }
    Ok((lines, used as u64))
}
