//! One contract suite for every counter store: the in-memory store, a real single-node
//! `redis-server`, and a real three-master Redis Cluster. Plus Redis failure and recovery.
// Test helpers outside #[test] functions (the shared `support` launchers) may panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Redis, RedisCluster, TempDir};
use tollgate_ratelimit::counter_store::{
    redis_keys, CounterStore, Hit, HitMode, MemoryStore, RedisStore,
};
use tollgate_ratelimit::gcra::Verdict;
use tollgate_ratelimit::limit_policy::{Limit, Unit};

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

fn limit(n: u32, unit: Unit) -> Limit {
    Limit {
        requests_per_unit: n,
        unit,
    }
}

/// A counter key with Tollgate's layout: `ns` keeps cases and backends apart; keys with
/// the same `id` share a hash tag (one Cluster slot).
fn key(ns: &str, id: &str, sub: &str, l: &Limit) -> String {
    let id = format!("{ns}-{id}");
    if sub.is_empty() {
        redis_keys::counter_key("contract", &[("key_id", &id)], l)
    } else {
        redis_keys::counter_key("contract", &[("key_id", &id), ("phase", sub)], l)
    }
}

fn hit(key: &str, l: Limit, hits: u64, mode: HitMode) -> Hit {
    Hit {
        key: key.to_string(),
        limit: l,
        hits,
        mode,
    }
}

async fn one<S: CounterStore>(s: &S, h: Hit) -> Verdict {
    let v = s.hit_batch(std::slice::from_ref(&h)).await.expect("store");
    assert_eq!(v.len(), 1);
    v[0]
}

fn within(what: &str, got: u64, low: u64, high: u64) {
    assert!(
        (low..=high).contains(&got),
        "{what}: {got} ns not in [{low}, {high}]"
    );
}

async fn burst_then_deny_with_retry_after<S: CounterStore>(s: &S, ns: &str) {
    let l = limit(3, Unit::Minute);
    let k = key(ns, "burst", "", &l);
    let mut remaining = vec![];
    for _ in 0..3 {
        let v = one(s, hit(&k, l, 1, HitMode::Enforce)).await;
        assert!(v.allowed);
        remaining.push(v.remaining);
    }
    assert_eq!(remaining, vec![2, 1, 0]);
    let v = one(s, hit(&k, l, 1, HitMode::Enforce)).await;
    assert!(!v.allowed);
    assert_eq!(v.remaining, 0);
    // One request is readmitted after one interval (60 s / 3), less the time spent.
    within("retry_after", v.retry_after, 19 * SEC, 20 * SEC);
    within("reset_after", v.reset_after, 59 * SEC, 60 * SEC);
    // A denied hit does not consume: the wait does not grow.
    let again = one(s, hit(&k, l, 1, HitMode::Enforce)).await;
    assert!(!again.allowed);
    assert!(again.retry_after <= v.retry_after);
}

async fn separate_keys_are_independent<S: CounterStore>(s: &S, ns: &str) {
    let l = limit(1, Unit::Minute);
    let a = key(ns, "a", "", &l);
    let b = key(ns, "b", "", &l);
    assert!(one(s, hit(&a, l, 1, HitMode::Enforce)).await.allowed);
    assert!(!one(s, hit(&a, l, 1, HitMode::Enforce)).await.allowed);
    assert!(one(s, hit(&b, l, 1, HitMode::Enforce)).await.allowed);
    // Same id, another sub-counter: independent too.
    let a2 = key(ns, "a", "tokens", &l);
    assert!(one(s, hit(&a2, l, 1, HitMode::Enforce)).await.allowed);
}

async fn hits_addend_consumes_several<S: CounterStore>(s: &S, ns: &str) {
    let l = limit(10, Unit::Minute);
    let k = key(ns, "addend", "", &l);
    let v = one(s, hit(&k, l, 4, HitMode::Enforce)).await;
    assert!(v.allowed);
    assert_eq!(v.remaining, 6);
    let v = one(s, hit(&k, l, 7, HitMode::Enforce)).await;
    assert!(!v.allowed, "7 > 6 left");
    assert_eq!(v.remaining, 6, "a denied addend consumes nothing");
    let v = one(s, hit(&k, l, 6, HitMode::Enforce)).await;
    assert!(v.allowed);
    assert_eq!(v.remaining, 0);
}

async fn zero_hits_only_read<S: CounterStore>(s: &S, ns: &str) {
    let l = limit(10, Unit::Minute);
    let k = key(ns, "zero", "", &l);
    let v = one(s, hit(&k, l, 0, HitMode::Enforce)).await;
    assert!(v.allowed);
    assert_eq!(v.remaining, 10);
    assert_eq!(
        s.expires_in(&k).await.unwrap(),
        None,
        "a read creates no counter"
    );
    one(s, hit(&k, l, 3, HitMode::Enforce)).await;
    for _ in 0..3 {
        let v = one(s, hit(&k, l, 0, HitMode::Enforce)).await;
        assert!(v.allowed);
        assert_eq!(v.remaining, 7);
    }
}

async fn negative_hits_never_consume<S: CounterStore>(s: &S, ns: &str) {
    let l = limit(10, Unit::Minute);
    let k = key(ns, "refund", "", &l);
    let v = one(s, hit(&k, l, 5, HitMode::Refund)).await;
    assert!(v.allowed);
    assert_eq!(v.remaining, 10);
    assert_eq!(s.expires_in(&k).await.unwrap(), None);
    assert_eq!(one(s, hit(&k, l, 4, HitMode::Enforce)).await.remaining, 6);
    assert_eq!(one(s, hit(&k, l, 2, HitMode::Refund)).await.remaining, 8);
    assert_eq!(one(s, hit(&k, l, 100, HitMode::Refund)).await.remaining, 10);
    // A refund never gives more than a full burst.
    assert!(one(s, hit(&k, l, 10, HitMode::Enforce)).await.allowed);
    assert!(!one(s, hit(&k, l, 1, HitMode::Enforce)).await.allowed);
}

async fn debits_consume_past_the_limit_and_survive_a_denied_batch<S: CounterStore>(
    s: &S,
    ns: &str,
) {
    let l = limit(10, Unit::Minute);
    let k = key(ns, "debit", "", &l);
    // Tokens already used are never refused, even beyond the limit.
    let v = one(s, hit(&k, l, 15, HitMode::Debit)).await;
    assert!(v.allowed);
    assert_eq!(v.remaining, 0);
    assert!(!one(s, hit(&k, l, 1, HitMode::Enforce)).await.allowed);
    // A debit in a batch another hit denies still lands.
    let k2 = key(ns, "debit2", "", &l);
    let tight = limit(1, Unit::Minute);
    let other = key(ns, "debit-other", "", &tight);
    one(s, hit(&other, tight, 1, HitMode::Enforce)).await;
    let vs = s
        .hit_batch(&[
            hit(&k2, l, 4, HitMode::Debit),
            hit(&other, tight, 1, HitMode::Enforce),
        ])
        .await
        .unwrap();
    assert!(!vs[1].allowed);
    assert_eq!(one(s, hit(&k2, l, 0, HitMode::Enforce)).await.remaining, 6);
    assert_eq!(
        one(s, hit(&k2, l, 0, HitMode::Debit)).await.remaining,
        6,
        "0 only reads"
    );
}

async fn counters_expire_when_back_to_full<S: CounterStore>(s: &S, ns: &str) {
    let l = limit(60, Unit::Minute);
    let k = key(ns, "ttl", "", &l);
    one(s, hit(&k, l, 30, HitMode::Enforce)).await;
    let ttl = s
        .expires_in(&k)
        .await
        .unwrap()
        .expect("a counter with a TTL");
    within("ttl", ttl.as_nanos() as u64, 29 * SEC, 30 * SEC);
    let fast = limit(10, Unit::Second);
    let k = key(ns, "ttl-fast", "", &fast);
    one(s, hit(&k, fast, 1, HitMode::Enforce)).await;
    let ttl = s
        .expires_in(&k)
        .await
        .unwrap()
        .expect("a counter with a TTL");
    within("ttl", ttl.as_nanos() as u64, 50 * MS, 100 * MS);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        s.expires_in(&k).await.unwrap(),
        None,
        "expired counter still held"
    );
}

async fn concurrent_decisions_never_admit_more_than_the_limit<S: CounterStore>(
    s: &Arc<S>,
    ns: &str,
) {
    let l = limit(50, Unit::Minute);
    let k = key(ns, "race", "", &l);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let s = Arc::clone(s);
            let h = hit(&k, l, 1, HitMode::Enforce);
            tokio::spawn(async move { s.hit_batch(&[h]).await.expect("store")[0].allowed })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.expect("task"));
    }
    assert_eq!(admitted, 50);
}

async fn a_denied_batch_consumes_nothing<S: CounterStore>(s: &S, ns: &str) {
    let roomy = limit(10, Unit::Minute);
    let tight = limit(1, Unit::Minute);
    // One id, two sub-counters: same hash tag, so one atomic call even in Cluster.
    let a = key(ns, "batch", "roomy", &roomy);
    let b = key(ns, "batch", "tight", &tight);
    let batch = [
        hit(&a, roomy, 1, HitMode::Enforce),
        hit(&b, tight, 1, HitMode::Enforce),
    ];
    let v = s.hit_batch(&batch).await.unwrap();
    assert!(v[0].allowed && v[1].allowed);
    for _ in 0..3 {
        let v = s.hit_batch(&batch).await.unwrap();
        assert!(v[0].allowed && !v[1].allowed);
    }
    assert_eq!(
        one(s, hit(&a, roomy, 0, HitMode::Enforce)).await.remaining,
        9
    );
    // Refunds in a denied batch still apply.
    let with_refund = [
        hit(&a, roomy, 1, HitMode::Refund),
        hit(&b, tight, 1, HitMode::Enforce),
    ];
    let v = s.hit_batch(&with_refund).await.unwrap();
    assert!(!v[1].allowed);
    assert_eq!(
        one(s, hit(&a, roomy, 0, HitMode::Enforce)).await.remaining,
        10
    );
}

async fn shadow_hits_count_but_never_deny<S: CounterStore>(s: &S, ns: &str) {
    let l = limit(1, Unit::Minute);
    let shadow = key(ns, "shadow", "shadow", &l);
    let real = key(ns, "shadow", "real", &limit(10, Unit::Minute));
    let batch = [
        hit(&shadow, l, 1, HitMode::Shadow),
        hit(&real, limit(10, Unit::Minute), 1, HitMode::Enforce),
    ];
    let v = s.hit_batch(&batch).await.unwrap();
    assert!(v[0].allowed && v[1].allowed);
    let v = s.hit_batch(&batch).await.unwrap();
    assert!(!v[0].allowed, "the shadow limit is counted");
    assert!(v[1].allowed);
    assert_eq!(v[1].remaining, 8, "and does not stop the request");
}

async fn a_repeated_key_sees_the_earlier_hits<S: CounterStore>(s: &S, ns: &str) {
    let l = limit(2, Unit::Minute);
    let k = key(ns, "repeat", "", &l);
    let h = hit(&k, l, 1, HitMode::Enforce);
    let v = s.hit_batch(&[h.clone(), h.clone()]).await.unwrap();
    assert_eq!((v[0].remaining, v[1].remaining), (1, 0));
    let v = s.hit_batch(&[h.clone(), h.clone()]).await.unwrap();
    assert!(!v[0].allowed && !v[1].allowed);
}

/// A lease set with Tollgate's layout; the same `id` shares the slot of its counters.
fn lease_set(ns: &str, id: &str) -> String {
    let id = format!("{ns}-{id}");
    redis_keys::lease_key("contract", &[("key_id", &id), ("tollgate_phase", "lease")])
}

fn acquire(set: &str, max: u32, rid: &str, ttl: Duration) -> Hit {
    let mode = HitMode::Acquire {
        id: rid.to_string(),
        ttl,
    };
    hit(set, limit(max, Unit::Minute), 1, mode)
}

fn release(set: &str, max: u32, rid: &str) -> Hit {
    let mode = HitMode::Release {
        id: rid.to_string(),
    };
    hit(set, limit(max, Unit::Minute), 1, mode)
}

const LONG: Duration = Duration::from_secs(600);

async fn leases_hold_slots_until_released<S: CounterStore>(s: &S, ns: &str) {
    let set = lease_set(ns, "slots");
    let a = one(s, acquire(&set, 2, "r1", LONG)).await;
    assert!(a.allowed);
    assert_eq!(a.remaining, 1);
    assert!(one(s, acquire(&set, 2, "r2", LONG)).await.allowed);
    let full = one(s, acquire(&set, 2, "r3", LONG)).await;
    assert!(!full.allowed);
    assert_eq!(full.remaining, 0);
    assert_eq!(full.retry_after, 1_000_000_000);
    let r = one(s, release(&set, 2, "r1")).await;
    assert!(r.allowed);
    assert_eq!(r.remaining, 1);
    assert!(one(s, acquire(&set, 2, "r3", LONG)).await.allowed);
    // A lower maximum applies to the slots already held (the set names no limit).
    assert!(!one(s, acquire(&set, 1, "r4", LONG)).await.allowed);
    let ttl = s
        .expires_in(&set)
        .await
        .unwrap()
        .expect("a lease set expires");
    assert!(
        // Redis rounds the expiry up to the next millisecond.
        ttl <= LONG + Duration::from_millis(1) && ttl > LONG - Duration::from_secs(5),
        "{ttl:?}"
    );
    one(s, release(&set, 2, "r2")).await;
    one(s, release(&set, 2, "r3")).await;
    assert_eq!(
        s.expires_in(&set).await.unwrap(),
        None,
        "an empty set is dropped"
    );
}

async fn releases_are_idempotent<S: CounterStore>(s: &S, ns: &str) {
    let set = lease_set(ns, "idem");
    // A release of a slot never taken (the request was denied) changes nothing.
    let r = one(s, release(&set, 1, "never")).await;
    assert!(r.allowed);
    assert_eq!(r.remaining, 1);
    assert_eq!(s.expires_in(&set).await.unwrap(), None);
    assert!(one(s, acquire(&set, 1, "r1", LONG)).await.allowed);
    one(s, release(&set, 1, "r1")).await;
    assert_eq!(one(s, release(&set, 1, "r1")).await.remaining, 1);
    assert!(one(s, acquire(&set, 1, "r2", LONG)).await.allowed);
    // Releasing r1 again does not free r2's slot.
    one(s, release(&set, 1, "r1")).await;
    assert!(!one(s, acquire(&set, 1, "r3", LONG)).await.allowed);
    one(s, release(&set, 1, "r2")).await;
}

async fn a_request_id_holds_at_most_one_slot<S: CounterStore>(s: &S, ns: &str) {
    let set = lease_set(ns, "dup");
    assert!(one(s, acquire(&set, 5, "same", LONG)).await.allowed);
    let dup = one(s, acquire(&set, 5, "same", LONG)).await;
    assert!(!dup.allowed, "two streams must not share one slot");
    assert_eq!(dup.remaining, 4);
    assert!(
        !one(s, acquire(&set, 5, "", LONG)).await.allowed,
        "no id, no slot"
    );
    one(s, release(&set, 5, "same")).await;
    assert_eq!(s.expires_in(&set).await.unwrap(), None);
}

async fn leases_expire_without_a_release<S: CounterStore>(s: &S, ns: &str) {
    let set = lease_set(ns, "expiry");
    let short = Duration::from_millis(150);
    assert!(one(s, acquire(&set, 1, "crashed", short)).await.allowed);
    assert!(!one(s, acquire(&set, 1, "next", short)).await.allowed);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        one(s, acquire(&set, 1, "next", LONG)).await.allowed,
        "an expired lease still holds its slot"
    );
    one(s, release(&set, 1, "next")).await;
}

async fn leases_and_rates_are_one_atomic_decision<S: CounterStore>(s: &S, ns: &str) {
    let set = lease_set(ns, "atomic");
    let rpm = limit(1, Unit::Minute);
    let rate = key(ns, "atomic", "", &rpm);
    // Admitted: both the slot and the rate are taken.
    let v = s
        .hit_batch(&[
            hit(&rate, rpm, 1, HitMode::Enforce),
            acquire(&set, 5, "r1", LONG),
        ])
        .await
        .unwrap();
    assert!(v[0].allowed && v[1].allowed);
    // The rate denies: no slot is taken.
    let v = s
        .hit_batch(&[
            hit(&rate, rpm, 1, HitMode::Enforce),
            acquire(&set, 5, "r2", LONG),
        ])
        .await
        .unwrap();
    assert!(!v[0].allowed);
    assert_eq!(one(s, release(&set, 5, "none")).await.remaining, 4);
    // The slot denies: no rate is consumed.
    let roomy = limit(10, Unit::Minute);
    let rate2 = key(ns, "atomic", "roomy", &roomy);
    let v = s
        .hit_batch(&[
            hit(&rate2, roomy, 1, HitMode::Enforce),
            acquire(&set, 1, "r3", LONG),
        ])
        .await
        .unwrap();
    assert!(v[0].allowed && !v[1].allowed);
    assert_eq!(
        one(s, hit(&rate2, roomy, 0, HitMode::Enforce))
            .await
            .remaining,
        10
    );
    one(s, release(&set, 5, "r1")).await;
}

async fn concurrent_leases_never_exceed_the_maximum<S: CounterStore>(s: &Arc<S>, ns: &str) {
    let set = lease_set(ns, "race");
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let s = Arc::clone(s);
            let h = acquire(&set, 7, &format!("r{i}"), LONG);
            tokio::spawn(async move { s.hit_batch(&[h]).await.expect("store")[0].allowed })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.expect("task"));
    }
    assert_eq!(admitted, 7);
    for i in 0..100 {
        s.hit_batch(&[release(&set, 7, &format!("r{i}"))])
            .await
            .unwrap();
    }
    assert_eq!(s.expires_in(&set).await.unwrap(), None);
}

/// The whole suite; `ns` keeps keys of different runs apart.
async fn contract<S: CounterStore>(store: Arc<S>, ns: &str) {
    let s = &*store;
    burst_then_deny_with_retry_after(s, ns).await;
    separate_keys_are_independent(s, ns).await;
    hits_addend_consumes_several(s, ns).await;
    zero_hits_only_read(s, ns).await;
    negative_hits_never_consume(s, ns).await;
    debits_consume_past_the_limit_and_survive_a_denied_batch(s, ns).await;
    counters_expire_when_back_to_full(s, ns).await;
    concurrent_decisions_never_admit_more_than_the_limit(&store, ns).await;
    a_denied_batch_consumes_nothing(s, ns).await;
    shadow_hits_count_but_never_deny(s, ns).await;
    a_repeated_key_sees_the_earlier_hits(s, ns).await;
    leases_hold_slots_until_released(s, ns).await;
    releases_are_idempotent(s, ns).await;
    a_request_id_holds_at_most_one_slot(s, ns).await;
    leases_expire_without_a_release(s, ns).await;
    leases_and_rates_are_one_atomic_decision(s, ns).await;
    concurrent_leases_never_exceed_the_maximum(&store, ns).await;
}

const TIMEOUT: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_meets_the_contract() {
    contract(Arc::new(MemoryStore::new()), "mem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_meets_the_contract() {
    let dir = TempDir::new("contract");
    let redis = Redis::start_in(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let store = RedisStore::connect(&redis.url(), TIMEOUT).await.unwrap();
    assert!(!store.is_cluster());
    contract(Arc::new(store), "redis").await;

    // One round trip per decision: a fresh store sends nothing but EVALSHA, one per batch
    // (GET/SET/DEL/TIME and the lease set's Z* commands run inside the script; INFO is
    // this test's own probe).
    let store = RedisStore::connect(&redis.url(), TIMEOUT).await.unwrap();
    let l = limit(100, Unit::Minute);
    let set = lease_set("trips", "k");
    let before = client_calls(redis.port);
    for i in 0..20 {
        let rid = format!("r{i}");
        let batch = [
            hit(&key("trips", "k", "", &l), l, 1, HitMode::Enforce),
            hit(&key("trips", "t", "", &l), l, 1, HitMode::Enforce),
            acquire(&set, 100, &rid, LONG),
        ];
        store.hit_batch(&batch).await.unwrap();
    }
    let after = client_calls(redis.port);
    assert_eq!(
        after.get("evalsha").copied().unwrap_or(0) - before.get("evalsha").copied().unwrap_or(0),
        20
    );
    for (cmd, n) in &after {
        let delta = n - before.get(cmd).copied().unwrap_or(0);
        match cmd.as_str() {
            "evalsha" => assert_eq!(delta, 20),
            "get" | "set" | "del" | "time" | "info" | "zremrangebyscore" | "zcard" | "zscore"
            | "zadd" | "zrange" | "pexpireat" => {}
            other => assert_eq!(delta, 0, "unexpected {other} calls"),
        }
    }
}

/// Calls per command from `INFO commandstats`.
fn client_calls(port: u16) -> std::collections::HashMap<String, u64> {
    let info = support::redis_command(port, "INFO commandstats").unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            let calls = rest.split(',').next()?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_store_meets_the_contract() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("redis cluster: {e}"));
    let store = Arc::new(RedisStore::connect(&cluster.url(), TIMEOUT).await.unwrap());
    assert!(store.is_cluster());
    contract(Arc::clone(&store), "cluster").await;

    // Counters of different ids are in different slots (very likely on different
    // masters): one request touching several is split per slot and still decided.
    let l = limit(2, Unit::Minute);
    let keys: Vec<String> = (0..6)
        .map(|i| key("cluster", &format!("x{i}"), "", &l))
        .collect();
    let slots: std::collections::HashSet<_> = keys.iter().map(|k| redis_keys::slot(k)).collect();
    assert!(slots.len() > 1);
    let batch: Vec<Hit> = keys
        .iter()
        .map(|k| hit(k, l, 1, HitMode::Enforce))
        .collect();
    for want in [1, 0] {
        let v = store.hit_batch(&batch).await.unwrap();
        assert!(v.iter().all(|v| v.allowed && v.remaining == want), "{v:?}");
    }
    assert!(store
        .hit_batch(&batch)
        .await
        .unwrap()
        .iter()
        .all(|v| !v.allowed));
    // Each key lives on the master that owns its slot, with a TTL.
    for k in &keys {
        let ttl = store.expires_in(k).await.unwrap().expect("ttl");
        assert!(ttl <= Duration::from_secs(60));
    }
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_an_error_and_recovers_without_a_new_store() {
    let dir = TempDir::new("outage");
    let mut redis = Redis::start_in(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let store = RedisStore::connect(&redis.url(), Duration::from_millis(300))
        .await
        .unwrap();
    let l = limit(1000, Unit::Minute);
    let k = key("outage", "k", "", &l);
    let h = [hit(&k, l, 1, HitMode::Enforce)];
    assert!(store.hit_batch(&h).await.unwrap()[0].allowed);

    // A hung server (SIGSTOP: the connection stays open, nothing answers) must not hang
    // a decision.
    redis.signal("-STOP").unwrap_or_else(|e| panic!("{e}"));
    let t = Instant::now();
    assert!(store.hit_batch(&h).await.is_err());
    assert!(
        t.elapsed() < Duration::from_millis(1_000),
        "{:?}",
        t.elapsed()
    );
    redis.signal("-CONT").unwrap_or_else(|e| panic!("{e}"));

    redis.stop_server();
    for _ in 0..3 {
        let t = Instant::now();
        assert!(store.hit_batch(&h).await.is_err(), "Redis is down");
        assert!(
            t.elapsed() < Duration::from_millis(1_000),
            "{:?}",
            t.elapsed()
        );
    }

    // Same port, empty script cache: the store reconnects and reloads the script.
    redis.restart().unwrap_or_else(|e| panic!("{e}"));
    recovers(&store, &h).await;
}

async fn recovers(store: &RedisStore, h: &[Hit]) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match store.hit_batch(h).await {
            Ok(v) => {
                assert!(v[0].allowed);
                return;
            }
            Err(e) => {
                assert!(Instant::now() < until, "no recovery: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
