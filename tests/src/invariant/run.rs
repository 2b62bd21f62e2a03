//! Runs every row of one stack: starts the stack once, makes the keys with tollgate-admin,
//! sends the rows from a few threads, and hands what the mocks recorded to the oracle.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::oracle::{self, Cause, Failure, Reply, Seen, Violation};
use super::table::{self, MockKind, Policy, Row, StackKind, REPEATS};
use crate::http;
use crate::process::{temp_dir, Proc};
use crate::routing_config::RoutingSpec;
use crate::stack::{start_mock, Stack, StackOptions};

/// Threads sending rows at once against one stack.
const WORKERS: usize = 4;
/// Tenant of every key.
const TENANT: &str = "inv";
const HOSTED_KEY_ENV: &str = "TOLLGATE_INVARIANT_HOSTED_KEY";
const HOSTED_KEY: &str = "sk-hosted-invariant-0123456789";
const TAG_HEADER: &str = "x-mock-tag";

fn prices() -> Value {
    table::prices_json()
}

/// The outcome of one stack.
#[derive(Debug)]
pub struct Report {
    pub kind: StackKind,
    pub rows: usize,
    pub requests: usize,
    pub keys: usize,
    pub failures: Vec<Failure>,
    pub elapsed: Duration,
    /// Time spent making keys with tollgate-admin.
    pub keys_time: Duration,
    /// Every row with what the client got and what the mocks recorded, one line each.
    pub dump: String,
}

impl Report {
    pub fn render(&self) -> String {
        let mut s = format!(
            "invariant stack [{}]: {} rows, {} requests, {} keys ({:.1}s), {} failing rows, {:.1}s\n",
            self.kind,
            self.rows,
            self.requests,
            self.keys,
            self.keys_time.as_secs_f64(),
            self.failures.len(),
            self.elapsed.as_secs_f64()
        );
        if !self.failures.is_empty() {
            s.push_str("---- failing rows grouped by cause ----\n");
            s.push_str(&oracle::group(&self.failures));
            s.push_str("---- every failing row ----\n");
            for f in &self.failures {
                s.push_str(&f.render());
            }
        }
        s
    }
}

/// The running stack and its mocks.
struct Env {
    stack: Stack,
    /// (name, port) of every mock the stack's Envoy can reach.
    mocks: Vec<(String, u16)>,
    _routed_mocks: Vec<Proc>,
}

impl Env {
    fn start(kind: StackKind, opts: &RunOptions) -> Result<Self, String> {
        match kind.mock {
            Some(mock) => {
                let mut config = json!({ "prices": prices() });
                if let Some(u) = kind.upstream.config_value() {
                    config["upstream"] = json!(u);
                }
                let stack = Stack::start(StackOptions {
                    filter_config: config.to_string(),
                    mock_api: Some(mock.api().to_owned()),
                    envoy_http_filters: opts.envoy_http_filters.clone(),
                    ..Default::default()
                })?;
                let port = stack.model_port;
                Ok(Env {
                    stack,
                    mocks: vec![(mock.api().to_owned(), port)],
                    _routed_mocks: Vec::new(),
                })
            }
            None => Self::start_routed(opts),
        }
    }

    fn start_routed(opts: &RunOptions) -> Result<Self, String> {
        let dir = temp_dir("invariant-routed");
        let ollama_models = "llama3.1:8b,qwen2:0.5b";
        let (a, a_port) = start_mock(
            &dir,
            "ollama-a",
            MockKind::Ollama.api(),
            Some(ollama_models),
        )?;
        let (b, b_port) = start_mock(
            &dir,
            "ollama-b",
            MockKind::Ollama.api(),
            Some(ollama_models),
        )?;
        let (c, c_port) = start_mock(
            &dir,
            "hosted",
            MockKind::OpenAi.api(),
            Some(table::HOSTED_MODEL),
        )?;
        let host = |port: u16| ("127.0.0.1".to_owned(), port);
        let spec = RoutingSpec {
            ollama_a: host(a_port),
            ollama_b: host(b_port),
            hosted: host(c_port),
            hosted_tls: false,
            hosted_key_env: HOSTED_KEY_ENV.into(),
            health_interval_ms: 1000,
            discovery_interval_ms: 1000,
        };
        let mut config: Value = serde_json::from_str(&spec.filter_config())
            .map_err(|e| format!("routing filter config: {e}"))?;
        config["prices"] = prices();
        let stack = Stack::start(StackOptions {
            model: Some(host(a_port)),
            dir: Some(dir),
            filter_config: config.to_string(),
            routing: Some(spec),
            envoy_env: vec![(HOSTED_KEY_ENV.into(), HOSTED_KEY.into())],
            envoy_http_filters: opts.envoy_http_filters.clone(),
            ..Default::default()
        })?;
        Ok(Env {
            stack,
            mocks: vec![
                ("ollama-a".into(), a_port),
                ("ollama-b".into(), b_port),
                ("hosted".into(), c_port),
            ],
            _routed_mocks: vec![a, b, c],
        })
    }

    /// The recorded requests carrying `tag`, from every mock, oldest first per mock.
    fn tagged(&self, tag: &str) -> Result<Vec<Seen>, String> {
        let mut out = Vec::new();
        for (name, port) in &self.mocks {
            let r = http::get(*port, &format!("/__mock/requests?tag={tag}"), &[])?;
            match r.json() {
                Value::Array(items) => out.extend(items.iter().map(Seen::from_json)),
                _ => return Err(format!("mock {name}: {}", r.text())),
            }
        }
        Ok(out)
    }

    fn all_recorded(&self) -> Result<Vec<(String, Value)>, String> {
        let mut out = Vec::new();
        for (name, port) in &self.mocks {
            let r = http::get(*port, "/__mock/requests", &[])?;
            match r.json() {
                Value::Array(items) => out.extend(items.into_iter().map(|i| (name.clone(), i))),
                _ => return Err(format!("mock {name}: {}", r.text())),
            }
        }
        Ok(out)
    }
}

/// A key and the id `tollgate-admin` gave it.
#[derive(Debug, Clone)]
struct Key {
    id: String,
    secret: String,
    /// A row that reached a model server ran on it before (nothing that costs: see
    /// `Outcome::clean`); a key only refused rows ran on is as good as fresh.
    used: bool,
}

fn create_key(stack: &Stack, policy: Policy, n: usize) -> Result<Key, String> {
    let name = format!("{}-{n}", policy.label().replace(' ', "_"));
    let out = stack.admin(&[
        "--json", "key", "create", "--tenant", TENANT, "--name", &name,
    ])?;
    let v: Value =
        serde_json::from_str(out.trim()).map_err(|e| format!("key create: {e}: {out}"))?;
    let key = match (v["id"].as_str(), v["key"].as_str()) {
        (Some(id), Some(secret)) => Key {
            id: id.to_owned(),
            secret: secret.to_owned(),
            used: false,
        },
        _ => return Err(format!("key create output lacks id/key: {out}")),
    };
    if let Some(args) = policy.admin_args() {
        let mut all = vec!["policy", "set", "--key", key.id.as_str()];
        all.extend(args);
        stack.admin(&all)?;
    }
    Ok(key)
}

/// Makes `count` keys of each policy in parallel (tollgate-admin processes).
fn create_keys(
    stack: &Stack,
    wanted: &[(Policy, usize)],
    serial: &AtomicUsize,
) -> Result<Vec<(Policy, Key)>, String> {
    let jobs: Mutex<VecDeque<Policy>> = Mutex::new(
        wanted
            .iter()
            .flat_map(|(p, n)| std::iter::repeat_n(*p, *n))
            .collect(),
    );
    let made: Mutex<Vec<(Policy, Key)>> = Mutex::new(Vec::new());
    let error: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let Some(policy) = lock(&jobs).pop_front() else {
                    return;
                };
                match create_key(stack, policy, serial.fetch_add(1, Ordering::Relaxed)) {
                    Ok(k) => lock(&made).push((policy, k)),
                    Err(e) => {
                        *lock(&error) = Some(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = error
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        return Err(e);
    }
    let made = made
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(made)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A key for a row: one an earlier row handed on if there is one (so fresh keys last),
/// and only an unused one for a row running again because a used key refused it.
fn take_key(keys: &mut Vec<Key>, fresh_only: bool) -> Option<Key> {
    let used = keys.iter().position(|k| k.used);
    let fresh = keys.iter().position(|k| !k.used);
    let i = if fresh_only { fresh } else { used.or(fresh) }?;
    Some(keys.swap_remove(i))
}

/// What running a row left behind.
#[derive(Debug)]
struct Outcome {
    replies: Vec<Reply>,
    seen: Vec<Seen>,
    /// The key may serve another row: nothing was counted on it (see `is_clean`).
    clean: bool,
    /// The first request was refused by a limit on a used key: run the row again
    /// on a fresh key (an earlier row may have left a reservation behind).
    needs_fresh_key: bool,
}

fn send(env: &Env, row: &Row, key: Option<&Key>, tag: &str) -> Result<Reply, String> {
    let auth;
    let mut headers: Vec<(&str, &str)> = vec![(TAG_HEADER, tag)];
    headers.extend(row.extra_headers());
    if let Some(k) = key {
        if row.uses_x_api_key() {
            headers.push(("x-api-key", &k.secret));
            headers.push(("anthropic-version", "2023-06-01"));
        } else {
            auth = format!("Bearer {}", k.secret);
            headers.push(("authorization", &auth));
        }
    }
    if !row.body.is_empty() {
        headers.push(("content-type", "application/json"));
    }
    if row.method == "HEAD" {
        return head(env.stack.envoy_port, &row.target, &headers);
    }
    let r = http::request(
        env.stack.envoy_port,
        row.method,
        &row.target,
        &headers,
        row.body.as_bytes(),
    )?;
    Ok(Reply {
        status: r.status,
        body: r.text(),
    })
}

/// A HEAD request: the reply has headers only (its `transfer-encoding` announces a body
/// that is never sent), so only the status line is read.
fn head(port: u16, target: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut req =
        format!("HEAD {target} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad HEAD reply {text:?}"))?;
    Ok(Reply {
        status,
        body: String::new(),
    })
}

fn run_row(
    env: &Env,
    row: &Row,
    key: Option<&Key>,
    reused: bool,
    attempt: usize,
) -> Result<Outcome, String> {
    let tag = format!("row{}a{attempt}", row.id);
    let mut replies = Vec::new();
    if !row.policy.is_metered() {
        replies.push(send(env, row, key, &tag)?);
        let seen = env.tagged(&tag)?;
        return Ok(Outcome {
            replies,
            seen,
            clean: false,
            needs_fresh_key: false,
        });
    }
    let mut seen = Vec::new();
    for i in 0..REPEATS {
        let reply = send(env, row, key, &tag)?;
        let status = reply.status;
        replies.push(reply);
        let before = seen.len();
        seen = env.tagged(&tag)?;
        if i == 0 && reused && status == 429 && seen.is_empty() {
            return Ok(Outcome {
                replies,
                seen,
                clean: false,
                needs_fresh_key: true,
            });
        }
        // Refused, or the server did nothing that costs: repeating changes nothing.
        let new_cost = seen[before..]
            .iter()
            .any(|s| s.ran() && s.cost(false).0 > 0);
        if status >= 400 || !new_cost {
            break;
        }
        if !oracle::check(row, &seen, &[]).is_empty() {
            break;
        }
    }
    // Nothing that costs reached a server, so nothing should be counted on the key (a
    // request the rate limiter denies consumes nothing; a listing costs nothing). Should
    // that not hold, the next row's first request is refused and that row runs again on a
    // fresh key.
    let cost: u64 = seen
        .iter()
        .filter(|s| s.ran())
        .map(|s| s.cost(false).0)
        .sum();
    let clean = cost == 0 && replies.iter().all(|r| r.status != 503);
    Ok(Outcome {
        replies,
        seen,
        clean,
        needs_fresh_key: false,
    })
}

/// Runs every row of `kind` and checks each against the invariant.
pub fn run_stack(kind: StackKind) -> Result<Report, String> {
    run(kind, &RunOptions::default())
}

/// How to run a stack other than the default (the oracle's own test).
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Keep only these Envoy HTTP filters (see `envoy_config::keep_http_filters`).
    pub envoy_http_filters: Option<Vec<&'static str>>,
    /// Run only the rows this keeps (their ids stay those of the full table).
    pub only: Option<fn(&Row) -> bool>,
}

/// Runs the rows of `kind` (all, or those `opts.only` keeps) and checks each.
pub fn run(kind: StackKind, opts: &RunOptions) -> Result<Report, String> {
    let started = Instant::now();
    let mut rows = table::rows(kind);
    if let Some(keep) = opts.only {
        // Ids index `rows`: renumber, keeping the order.
        rows.retain(keep);
        for (i, r) in rows.iter_mut().enumerate() {
            r.id = i;
        }
    }
    let env = Env::start(kind, opts)?;
    let _ = env.stack.admin(&["tenant", "create", TENANT]);
    let serial = AtomicUsize::new(0);

    // One key per unmetered policy; metered rows each need a key nothing was counted on:
    // a fifth of them are made now (rows that cost nothing hand theirs on), the rest when
    // those are used up.
    let mut wanted: Vec<(Policy, usize)> = Vec::new();
    for policy in Policy::ALL {
        let n = rows.iter().filter(|r| r.policy == policy).count();
        match policy {
            Policy::Anonymous => {}
            p if p.is_metered() => wanted.push((p, n.div_ceil(5))),
            p => wanted.push((p, 1)),
        }
    }
    let mut fixed: BTreeMap<Policy, Key> = BTreeMap::new();
    let pool: Mutex<BTreeMap<Policy, Vec<Key>>> = Mutex::new(BTreeMap::new());
    let mut keys = 0;
    let mut keys_time = Duration::ZERO;
    let t = Instant::now();
    let made = create_keys(&env.stack, &wanted, &serial)?;
    keys_time += t.elapsed();
    for (policy, key) in made {
        keys += 1;
        if policy.is_metered() {
            lock(&pool).entry(policy).or_default().push(key);
        } else {
            fixed.insert(policy, key);
        }
    }
    if kind.mock.is_none() {
        wait_discovered(&env, fixed.get(&Policy::NoPolicy))?;
    }

    let requests = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Outcome)>> = Mutex::new(Vec::new());
    let errors: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
    let mut queue: VecDeque<(usize, usize)> = (0..rows.len()).map(|i| (i, 0)).collect();
    for round in 0..8 {
        let jobs = Mutex::new(std::mem::take(&mut queue));
        let deferred: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
        let in_use: Mutex<BTreeMap<Policy, usize>> = Mutex::new(BTreeMap::new());
        std::thread::scope(|s| {
            for _ in 0..WORKERS {
                s.spawn(|| loop {
                    let Some((i, attempt)) = lock(&jobs).pop_front() else {
                        return;
                    };
                    let row = &rows[i];
                    let (key, reused) = if row.policy.is_metered() {
                        let taken = lock(&pool)
                            .get_mut(&row.policy)
                            .and_then(|keys| take_key(keys, attempt > 0));
                        match taken {
                            Some(k) => {
                                *lock(&in_use).entry(row.policy).or_default() += 1;
                                let reused = k.used;
                                (Some(k), reused)
                            }
                            None if lock(&in_use).get(&row.policy).copied().unwrap_or(0) > 0 => {
                                // A row of this policy is running and may hand its key on.
                                lock(&jobs).push_back((i, attempt));
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                            None => {
                                lock(&deferred).push((i, attempt));
                                continue;
                            }
                        }
                    } else {
                        (fixed.get(&row.policy).cloned(), false)
                    };
                    match run_row(&env, row, key.as_ref(), reused, round * 10 + attempt) {
                        Ok(outcome) => {
                            requests.fetch_add(outcome.replies.len(), Ordering::Relaxed);
                            if let (Some(mut k), true) = (key.clone(), outcome.clean) {
                                k.used |= !outcome.seen.is_empty()
                                    || outcome.replies.iter().any(|r| r.status < 400);
                                lock(&pool).entry(row.policy).or_default().push(k);
                            }
                            if outcome.needs_fresh_key {
                                lock(&deferred).push((i, attempt + 1));
                            } else {
                                lock(&results).push((i, outcome));
                            }
                        }
                        Err(e) => lock(&errors).push((i, e)),
                    }
                    if key.is_some() && row.policy.is_metered() {
                        if let Some(n) = lock(&in_use).get_mut(&row.policy) {
                            *n = n.saturating_sub(1);
                        }
                    }
                });
            }
        });
        queue = std::mem::take(&mut *lock(&deferred)).into();
        if queue.is_empty() {
            break;
        }
        // Fresh keys for the rows left over, all at once (each policy change clears the
        // authz key cache, so no key is made while rows run).
        let mut need: BTreeMap<Policy, usize> = BTreeMap::new();
        for (i, _) in &queue {
            *need.entry(rows[*i].policy).or_default() += 1;
        }
        let wanted: Vec<(Policy, usize)> = need.into_iter().collect();
        let t = Instant::now();
        let made = create_keys(&env.stack, &wanted, &serial)?;
        keys_time += t.elapsed();
        for (policy, key) in made {
            keys += 1;
            lock(&pool).entry(policy).or_default().push(key);
        }
    }

    let mut failures = Vec::new();
    let mut results = std::mem::take(&mut *lock(&results));
    results.sort_by_key(|(i, _)| *i);
    let mut dump = String::new();
    for (i, outcome) in &results {
        let row = &rows[*i];
        let statuses: Vec<String> = outcome
            .replies
            .iter()
            .map(|r| r.status.to_string())
            .collect();
        let seen: Vec<String> = outcome.seen.iter().map(Seen::summary).collect();
        dump.push_str(&format!(
            "row {i}: {} => client [{}] {} => mock [{}]\n",
            row.describe(),
            statuses.join(","),
            outcome
                .replies
                .first()
                .map(|r| oracle::snippet(&r.body))
                .unwrap_or_default(),
            seen.join(" ; ")
        ));
        let violations = oracle::check(row, &outcome.seen, &outcome.replies);
        if !violations.is_empty() {
            failures.push(Failure {
                row: row.clone(),
                violations,
                seen: outcome.seen.clone(),
                replies: outcome.replies.clone(),
            });
        }
    }
    let mut not_run: Vec<(usize, String)> = std::mem::take(&mut *lock(&errors));
    not_run.extend(
        queue
            .iter()
            .map(|(i, _)| (*i, "no fresh key after 8 rounds".to_owned())),
    );
    for (i, e) in not_run {
        failures.push(Failure {
            row: rows[i].clone(),
            violations: vec![Violation {
                cause: Cause::NotRun,
                detail: e,
            }],
            seen: Vec::new(),
            replies: Vec::new(),
        });
    }
    failures.extend(untagged(&env, kind)?);
    failures.sort_by_key(|f| f.row.id);
    Ok(Report {
        kind,
        rows: rows.len(),
        requests: requests.load(Ordering::Relaxed),
        keys,
        failures,
        elapsed: started.elapsed(),
        keys_time,
        dump,
    })
}

/// Requests the mocks got without a row's tag: only the gateway's own health checks and
/// model discovery may be untagged.
fn untagged(env: &Env, kind: StackKind) -> Result<Vec<Failure>, String> {
    let mut out = Vec::new();
    for (mock, r) in env.all_recorded()? {
        if r["headers"][TAG_HEADER].is_string() {
            continue;
        }
        let method = r["method"].as_str().unwrap_or_default();
        let path = r["path"].as_str().unwrap_or_default();
        if method == "GET" && (path == "/api/tags" || path == "/v1/models") {
            continue;
        }
        let seen = Seen::from_json(&r);
        out.push(Failure {
            row: Row {
                id: usize::MAX,
                stack: kind,
                method: "?",
                target: format!("(untagged at mock {mock})"),
                variant: table::Variant::Plain,
                policy: Policy::Anonymous,
                model: "",
                body: r["body"].as_str().unwrap_or_default().to_owned(),
                family: table::Family::Empty,
            },
            violations: vec![Violation {
                cause: Cause::Untagged,
                detail: seen.summary(),
            }],
            seen: vec![seen],
            replies: Vec::new(),
        });
    }
    Ok(out)
}

/// Until the routed filter knows every backend's models (a listing shows them all).
fn wait_discovered(env: &Env, key: Option<&Key>) -> Result<(), String> {
    let key = key.ok_or("no key for the discovery wait")?;
    let auth = format!("Bearer {}", key.secret);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http::get(
            env.stack.envoy_port,
            "/v1/models",
            &[("authorization", &auth), (TAG_HEADER, "discovery-wait")],
        )?;
        if r.json()["data"].as_array().map_or(0, Vec::len) >= 5 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "routed discovery incomplete: {}\n{}",
                r.text(),
                env.stack.logs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
