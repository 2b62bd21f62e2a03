//! Redis counters: GCRA and concurrency leases (a sorted set of request ids scored by
//! expiry) in a Lua script (`lua/gcra.lua`), loaded once at start-up with
//! `SCRIPT LOAD` and run with `EVALSHA` (loaded again on `NOSCRIPT`, e.g. after a Redis
//! restart). One decision is one round trip: every hit of a request goes into one script
//! call, using Redis server time.
//!
//! Single node (`redis://host:port`) or Redis Cluster (`redis+cluster://h1:p1,h2:p2,…`).
//! In Cluster a script may only touch keys of one slot, so a request's hits are grouped
//! by slot and the groups run concurrently, one script call each. Consequence: a batch is
//! atomic per slot only. If one slot denies while another admits, the admitting slot has
//! already consumed: a denied request may use up to its own hits on counters in other
//! slots. That errs towards denying, never towards admitting more than a limit.
//!
//! Every call is bounded by a timeout; an error or timeout is a [`StoreError`], which the
//! service answers with gRPC `UNAVAILABLE` (Envoy denies). The connection manager and the
//! cluster client reconnect by themselves after a dropped connection, and a single-node
//! connection that times out is replaced, so decisions succeed again once Redis is back.

use super::{redis_keys, CounterStore, Hit, HitMode, StoreError};
use crate::gcra::Verdict;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::Script;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const GCRA_LUA: &str = include_str!("../../lua/gcra.lua");

/// Hits above this always exceed any burst (`requests_per_unit` is a u32); capping keeps
/// the script's arithmetic within exact doubles.
const MAX_HITS: u64 = 1 << 32;

/// Where Redis is, from `--redis-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    /// Seed nodes, each a `redis://` URL.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// `redis://[user:pass@]host:port[/db]` is one node;
    /// `redis+cluster://[user:pass@]host:port,host:port,…` a Cluster (the credentials of
    /// the first node apply to all).
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let mut pieces = rest.split(',').map(str::trim).filter(|p| !p.is_empty());
            let first = pieces
                .next()
                .ok_or_else(|| StoreError::InvalidUrl("no cluster node given".into()))?;
            let userinfo = first.rsplit_once('@').map(|(u, _)| u);
            let mut nodes = vec![format!("redis://{first}")];
            for p in pieces {
                nodes.push(match (userinfo, p.contains('@')) {
                    (Some(u), false) => format!("redis://{u}@{p}"),
                    _ => format!("redis://{p}"),
                });
            }
            Ok(RedisTarget::Cluster(nodes))
        } else if url.starts_with("redis://") {
            Ok(RedisTarget::Single(url.to_string()))
        } else {
            // Only the scheme: the rest may carry a password, and this error is logged.
            let scheme = url.split_once("://").map_or("none", |(s, _)| s);
            Err(StoreError::InvalidUrl(format!(
                "scheme {scheme:?}: expected redis:// or redis+cluster:// (TLS to Redis is not built in)"
            )))
        }
    }
}

/// One node: a connection manager (which reconnects after a dropped connection), replaced
/// by a fresh one after a timeout. A connection that silently died (no RST: a vanished
/// host or pod IP) otherwise times out until the kernel gives up on it, many minutes.
struct SingleNode {
    client: redis::Client,
    config: ConnectionManagerConfig,
    current: RwLock<ConnectionManager>,
    /// At most one replacement per timeout period, however many calls time out.
    replaced_at: Mutex<Instant>,
}

impl SingleNode {
    fn connection(&self) -> ConnectionManager {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn replace_after_timeout(&self, timeout: Duration) {
        let mut at = self.replaced_at.lock().unwrap_or_else(|p| p.into_inner());
        if at.elapsed() < timeout {
            return;
        }
        *at = Instant::now();
        // Lazy: connects on first use, so this never blocks the caller.
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(fresh) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                tracing::warn!("redis call timed out; opening a fresh connection");
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis call timed out; cannot open a fresh connection")
            }
        }
    }
}

enum Conn {
    // Boxed: the client and config are large, the cluster handle is a pointer.
    Single(Box<SingleNode>),
    Cluster(ClusterConnection),
}

pub struct RedisStore {
    conn: Conn,
    script: Arc<Script>,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.is_cluster())
            .field("timeout", &self.timeout)
            .finish()
    }
}

async fn bounded<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(StoreError::Timeout(timeout)))
}

impl RedisStore {
    /// Connects and loads the script. `timeout` bounds this and every later call.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let target = RedisTarget::parse(url)?;
        let script = Arc::new(Script::new(GCRA_LUA));
        // A URL the client refuses is a configuration error (fatal at start-up), unlike
        // an unreachable server (retried).
        let invalid = |e: redis::RedisError| StoreError::InvalidUrl(e.to_string());
        let conn = bounded(timeout, async {
            Ok(match target {
                RedisTarget::Single(url) => {
                    let client = redis::Client::open(url.as_str()).map_err(invalid)?;
                    // Few quick reconnection attempts: while Redis is down every call
                    // fails fast (UNAVAILABLE) and the next call starts a fresh attempt,
                    // so recovery is not stuck behind a long backoff. No response timeout
                    // of its own: every call is bounded here (one timer, not two).
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(None)
                        .set_number_of_retries(1)
                        .set_min_delay(Duration::from_millis(50))
                        .set_max_delay(Duration::from_millis(200));
                    let manager =
                        ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
                    Conn::Single(Box::new(SingleNode {
                        client,
                        config,
                        current: RwLock::new(manager),
                        replaced_at: Mutex::new(Instant::now()),
                    }))
                }
                RedisTarget::Cluster(nodes) => {
                    let client = ClusterClientBuilder::new(nodes)
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .retries(2)
                        .build()
                        .map_err(invalid)?;
                    Conn::Cluster(client.get_async_connection().await?)
                }
            })
        })
        .await?;
        let store = RedisStore {
            conn,
            script,
            timeout,
        };
        // SCRIPT LOAD goes to every primary in Cluster mode.
        bounded(timeout, async {
            match &store.conn {
                Conn::Single(n) => store.script.load_async(&mut n.connection()).await?,
                Conn::Cluster(c) => store.script.load_async(&mut c.clone()).await?,
            };
            Ok(())
        })
        .await?;
        Ok(store)
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// The SHA1 the script runs under (`EVALSHA`).
    pub fn script_sha(&self) -> &str {
        self.script.get_hash()
    }
}

async fn run_script<C: ConnectionLike>(
    conn: &mut C,
    script: &Script,
    hits: &[Hit],
) -> Result<Vec<Verdict>, StoreError> {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(hits.len());
    for h in hits {
        cmd.arg(&h.key);
    }
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    for h in hits {
        let period_us = micros(h.limit.unit.period());
        let per = h.limit.requests_per_unit;
        let hits = h.hits.min(MAX_HITS);
        // Leases put the lease TTL where a counter has its period and the request id
        // where it has its hits (see `gcra.lua`).
        match &h.mode {
            HitMode::Enforce => cmd.arg(period_us).arg(per).arg(hits).arg("e"),
            HitMode::Shadow => cmd.arg(period_us).arg(per).arg(hits).arg("s"),
            HitMode::Refund => cmd.arg(period_us).arg(per).arg(hits).arg("r"),
            HitMode::Debit => cmd.arg(period_us).arg(per).arg(hits).arg("d"),
            HitMode::Acquire { id, ttl } => cmd.arg(micros(*ttl)).arg(per).arg(id).arg("l"),
            HitMode::Release { id } => cmd.arg(0).arg(per).arg(id).arg("u"),
        };
    }
    let reply: Vec<i64> = match cmd.query_async(conn).await {
        Err(e) if e.code() == Some("NOSCRIPT") => {
            // Redis restarted or its script cache was flushed: load and run again.
            script.load_async(conn).await?;
            cmd.query_async(conn).await?
        }
        other => other?,
    };
    if reply.len() != hits.len() * 4 {
        return Err(StoreError::BadReply(format!(
            "{} integers for {} hits",
            reply.len(),
            hits.len()
        )));
    }
    let us = |v: i64| u64::try_from(v).unwrap_or(0).saturating_mul(1_000);
    Ok(reply
        .chunks_exact(4)
        .map(|r| Verdict {
            allowed: r[0] == 1,
            remaining: u32::try_from(r[1].max(0)).unwrap_or(u32::MAX),
            reset_after: us(r[2]),
            retry_after: us(r[3]),
        })
        .collect())
}

impl RedisStore {
    async fn hit_cluster(
        &self,
        conn: &ClusterConnection,
        hits: &[Hit],
    ) -> Result<Vec<Verdict>, StoreError> {
        // Group hit indices by slot, keeping first-seen order.
        let mut groups: Vec<(redis::cluster_routing::Slot, Vec<usize>)> = Vec::new();
        for (i, h) in hits.iter().enumerate() {
            let s = redis_keys::slot(&h.key);
            match groups.iter_mut().find(|(g, _)| *g == s) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((s, vec![i])),
            }
        }
        if groups.len() == 1 {
            return run_script(&mut conn.clone(), &self.script, hits).await;
        }
        // One script call per slot, concurrently: the first inline, the others spawned
        // (they need owned hits).
        let mut tasks = Vec::with_capacity(groups.len() - 1);
        for (_, idx) in &groups[1..] {
            let group: Vec<Hit> = idx.iter().map(|&i| hits[i].clone()).collect();
            let mut c = conn.clone();
            let script = Arc::clone(&self.script);
            tasks.push(tokio::spawn(async move {
                run_script(&mut c, &script, &group).await
            }));
        }
        let first: Vec<Hit> = groups[0].1.iter().map(|&i| hits[i].clone()).collect();
        let first = run_script(&mut conn.clone(), &self.script, &first).await;
        let mut verdicts = vec![Verdict::default(); hits.len()];
        for (i, v) in groups[0].1.iter().zip(first?) {
            verdicts[*i] = v;
        }
        for ((_, idx), task) in groups[1..].iter().zip(tasks) {
            let got = task
                .await
                .map_err(|e| StoreError::BadReply(format!("slot task failed: {e}")))??;
            for (i, v) in idx.iter().zip(got) {
                verdicts[*i] = v;
            }
        }
        Ok(verdicts)
    }
}

impl CounterStore for RedisStore {
    async fn hit_batch(&self, hits: &[Hit]) -> Result<Vec<Verdict>, StoreError> {
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let result = bounded(self.timeout, async {
            match &self.conn {
                // One node holds every slot: the whole batch is one atomic call.
                Conn::Single(n) => run_script(&mut n.connection(), &self.script, hits).await,
                Conn::Cluster(c) => self.hit_cluster(c, hits).await,
            }
        })
        .await;
        if let (Err(StoreError::Timeout(_)), Conn::Single(n)) = (&result, &self.conn) {
            n.replace_after_timeout(self.timeout);
        }
        result
    }

    async fn expires_in(&self, key: &str) -> Result<Option<Duration>, StoreError> {
        let mut cmd = redis::cmd("PTTL");
        cmd.arg(key);
        let ms: i64 = bounded(self.timeout, async {
            Ok(match &self.conn {
                Conn::Single(n) => cmd.query_async(&mut n.connection()).await?,
                Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await?,
            })
        })
        .await?;
        Ok(match ms {
            -2 => None,
            // A key without a TTL would be a leak; report it as never expiring.
            -1 => Some(Duration::MAX),
            ms => Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsupported_url_is_refused_without_echoing_its_password() {
        for url in [
            "rediss://:hunter2@redis.internal:6380",
            "http://u:hunter2@h",
        ] {
            let e = RedisTarget::parse(url).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
            assert!(e.contains("redis://"), "{e}");
        }
        let e = RedisTarget::parse("rediss://:hunter2@h:6380")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rediss"), "the scheme is named: {e}");
    }

    #[test]
    fn urls_select_single_node_or_cluster() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379").unwrap(),
            RedisTarget::Single("redis://127.0.0.1:6379".into())
        );
        assert_eq!(
            RedisTarget::parse("redis+cluster://:pw@10.0.0.1:7000, 10.0.0.2:7001").unwrap(),
            RedisTarget::Cluster(vec![
                "redis://:pw@10.0.0.1:7000".into(),
                "redis://:pw@10.0.0.2:7001".into()
            ])
        );
        assert!(RedisTarget::parse("redis+cluster://").is_err());
        assert!(RedisTarget::parse("http://x").is_err());
        // TLS is not built in: refused up front rather than failing every connection.
        assert!(RedisTarget::parse("rediss://x:6379").is_err());
    }
}
