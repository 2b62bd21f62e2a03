//! tollgate-admin: manage tenants, keys and policies in the key store.

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use tollgate_authz::api_key;
use tollgate_authz::key_store::{KeyInfo, KeyStore, Scope, StoreError, Tenant};
use tollgate_authz::policy::{self, PolicyRow};
use tollgate_core::usd;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-admin",
    about = "Manage Tollgate tenants, API keys and policies"
)]
struct Cli {
    /// Key store URL: sqlite://path or postgres://…
    #[arg(
        long,
        env = "TOLLGATE_DATABASE_URL",
        default_value = "sqlite://.tollgate/tollgate.db",
        global = true
    )]
    database_url: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply database migrations.
    Migrate,
    /// Tenants: create, list, disable, enable.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// API keys: create, list, revoke, rotate.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Policies of a tenant or a key: set, show.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Export a tenant's prompt log (only for tenants that opted in).
    Prompts {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "24h")]
        since: String,
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
    /// Export audit events (no content, no key material).
    Audit {
        /// Start: unix seconds, or an age like 15m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Only this tenant (name).
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        limit: i64,
    },
}

/// `1700000000` (unix seconds) or an age `30s`, `15m`, `24h`, `7d`, as unix milliseconds.
fn parse_since(s: &str, now_ms: i64) -> Result<i64, String> {
    if let Ok(secs) = s.parse::<i64>() {
        return Ok(secs * 1000);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("--since {s:?}: a unix time or an age like 24h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("--since {s:?}: unit must be s, m, h or d")),
    };
    Ok(now_ms - secs * 1000)
}

#[derive(Subcommand, Debug)]
enum TenantCommand {
    Create {
        name: String,
        /// Free-form labels, e.g. team=ml,env=prod.
        #[arg(long, default_value = "")]
        labels: String,
    },
    List,
    Disable {
        name: String,
    },
    Enable {
        name: String,
    },
    /// Log this tenant's request bodies for N days (0 turns it off and purges them).
    PromptLog {
        name: String,
        #[arg(long)]
        days: u32,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create a key; it is printed once and never stored.
    Create {
        #[arg(long)]
        tenant: String,
        /// Who or what uses the key.
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        labels: String,
        /// Expiry as unix seconds.
        #[arg(long, conflicts_with = "expires_in")]
        expires_at: Option<i64>,
        /// Expiry as seconds from now.
        #[arg(long)]
        expires_in: Option<i64>,
        /// Requests per minute for this key (shortcut for `policy set --key`).
        #[arg(long)]
        rpm: Option<u32>,
    },
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    Revoke {
        key_id: String,
    },
    /// Issue a new key for the same tenant and policy; the old one keeps working for the
    /// grace period, then expires.
    Rotate {
        key_id: String,
        /// Seconds the old key stays valid.
        #[arg(long, default_value_t = 3600)]
        grace: i64,
    },
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct Subject {
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    key: Option<String>,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    Set {
        #[command(flatten)]
        subject: Subject,
        /// Model patterns, comma-separated: exact names, `llama3*`, `local/*`, or `*`.
        #[arg(long)]
        models: Option<String>,
        /// Operations: chat, completions, embeddings, models, audio, images, moderation, other, or `*`.
        #[arg(long)]
        operations: Option<String>,
        /// Source IPs/CIDRs allowed, comma-separated.
        #[arg(long)]
        ips: Option<String>,
        #[arg(long)]
        rpm: Option<u32>,
        #[arg(long)]
        tpm: Option<u32>,
        #[arg(long)]
        budget_day: Option<u64>,
        #[arg(long)]
        budget_month: Option<u64>,
        /// USD budget per day, in dollars (`12.50`; at most 4 decimals, at most 429496.7295),
        /// charged at the filter's per-model prices.
        #[arg(long, value_parser = tollgate_core::usd::parse_dollars)]
        budget_usd_day: Option<u64>,
        /// USD budget per month (30 days), in dollars.
        #[arg(long, value_parser = tollgate_core::usd::parse_dollars)]
        budget_usd_month: Option<u64>,
        #[arg(long)]
        max_concurrent: Option<u32>,
        /// Fields to clear (inherit / no limit): models, operations, ips, rpm, tpm,
        /// budget-day, budget-month, budget-usd-day, budget-usd-month, max-concurrent.
        #[arg(long, value_delimiter = ',')]
        unset: Vec<String>,
    },
    Show {
        #[command(flatten)]
        subject: Subject,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader went away (`tollgate-admin audit | head`): what it read was all it
        // wanted, so stop quietly with status 0 rather than panic like `println!`.
        Err(e) if is_broken_pipe(e.as_ref()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// `println!` that returns the write error (a closed pipe) instead of panicking on it.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

fn fmt_time(t: Option<i64>) -> String {
    t.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    out!("{}", line(headers.iter().map(|h| h.to_string()).collect()))?;
    for r in rows {
        out!("{}", line(r.clone()))?;
    }
    Ok(())
}

fn tenant_json(t: &Tenant) -> Value {
    json!({"id": t.id, "name": t.name, "status": t.status, "labels": t.labels, "created_at": t.created_at,
           "prompt_log_days": t.prompt_log_days})
}

fn key_json(k: &KeyInfo) -> Value {
    json!({"id": k.id, "prefix": k.prefix, "name": k.name, "tenant_id": k.tenant_id,
           "tenant": k.tenant_name, "labels": k.labels, "created_at": k.created_at,
           "expires_at": k.expires_at, "revoked_at": k.revoked_at,
           "last_used_at": k.last_used_at, "rotated_to": k.rotated_to})
}

fn policy_json(p: &PolicyRow) -> Value {
    json!({"models": p.models, "operations": p.operations, "ips": p.ips,
           "rpm": p.limits.rpm, "tpm": p.limits.tpm, "budget_day": p.limits.budget_day,
           "budget_month": p.limits.budget_month, "max_concurrent": p.limits.max_concurrent,
           "budget_usd_day": p.limits.budget_usd_day.map(usd::format_dollars),
           "budget_usd_month": p.limits.budget_usd_month.map(usd::format_dollars)})
}

async fn tenant_named(store: &KeyStore, name: &str) -> Res<Tenant> {
    Ok(store
        .tenant_by_name(name)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("tenant {name:?}")))?)
}

async fn subject(store: &KeyStore, s: &Subject) -> Res<(Scope, String)> {
    match (&s.tenant, &s.key) {
        (Some(t), _) => Ok((Scope::Tenant, tenant_named(store, t).await?.id)),
        (_, Some(k)) => {
            store
                .key_info(k)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("key {k:?}")))?;
            Ok((Scope::Key, k.clone()))
        }
        _ => Err("name --tenant or --key".into()),
    }
}

/// Creates the key row and prints the key once.
async fn issue_key(
    store: &KeyStore,
    json_out: bool,
    tenant: &Tenant,
    name: &str,
    labels: &str,
    expires_at: Option<i64>,
) -> Res<String> {
    let new = tokio::task::spawn_blocking(api_key::generate).await??;
    let id = store
        .insert_key(&tenant.id, name, labels, &new.prefix, &new.hash, expires_at)
        .await?;
    let shown = if json_out {
        out!(
            "{}",
            json!({"id": id, "tenant_id": tenant.id, "tenant": tenant.name, "name": name,
                   "prefix": new.prefix, "expires_at": expires_at, "key": new.full_key})
        )
    } else {
        out!(
            "key {id} created for tenant {}; it is shown only once:",
            tenant.name
        )
        .and_then(|()| out!("TOLLGATE_API_KEY={}", new.full_key))
    };
    // Unlike a listing cut short, a key nobody saw is a failure (even on a closed pipe):
    // it exists, works, and must be revoked.
    shown.map_err(|e| {
        format!("key {id} was created but could not be printed ({e}); revoke it with `tollgate-admin key revoke {id}`")
    })?;
    Ok(id)
}

fn audit_json(e: &tollgate_authz::audit::AuditEvent) -> Value {
    json!({"at_ms": e.at_ms, "request_id": e.request_id, "key_id": e.key_id, "tenant_id": e.tenant_id,
           "model": e.model, "operation": e.operation, "decision": e.decision, "reason": e.reason,
           "status": e.status, "tokens_in": e.tokens_in, "tokens_out": e.tokens_out,
           "latency_ms": e.latency_ms, "client_ip": e.client_ip})
}

async fn run(cli: Cli) -> Res<()> {
    let store = KeyStore::connect(&cli.database_url).await?;
    store.migrate().await?;
    let j = cli.json;
    match cli.command {
        Command::Migrate => out!("migrations applied")?,
        Command::Prompts {
            tenant,
            since,
            limit,
        } => {
            let since_ms = parse_since(&since, tollgate_authz::time::unix_now_ms())?;
            let t = tenant_named(&store, &tenant).await?;
            let rows = store.prompt_logs(&t.id, since_ms, limit).await?;
            let as_json: Vec<Value> = rows
                .iter()
                .map(|(at, rid, key, model, body)| {
                    json!({"at_ms": at, "request_id": rid, "key_id": key, "model": model, "body": body})
                })
                .collect();
            if j {
                out!("{}", Value::Array(as_json))?;
            } else {
                for r in &as_json {
                    out!("{r}")?;
                }
            }
        }
        Command::Audit {
            since,
            tenant,
            limit,
        } => {
            let since_ms = parse_since(&since, tollgate_authz::time::unix_now_ms())?;
            let tenant_id = match tenant {
                Some(t) => Some(tenant_named(&store, &t).await?.id),
                None => None,
            };
            let events = store
                .audit_events(since_ms, tenant_id.as_deref(), limit)
                .await?;
            if j {
                out!("{}", Value::Array(events.iter().map(audit_json).collect()))?;
            } else {
                let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
                let num = |o: Option<u64>| o.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
                let rows: Vec<Vec<String>> = events
                    .iter()
                    .map(|e| {
                        vec![
                            e.at_ms.to_string(),
                            e.request_id.clone(),
                            opt(&e.tenant_id),
                            opt(&e.key_id),
                            opt(&e.model),
                            e.operation.clone(),
                            e.decision.clone(),
                            e.reason.clone(),
                            e.status.to_string(),
                            num(e.tokens_in),
                            num(e.tokens_out),
                            e.latency_ms.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "AT_MS", "REQUEST", "TENANT", "KEY", "MODEL", "OP", "DECISION", "REASON",
                        "STATUS", "IN", "OUT", "MS",
                    ],
                    &rows,
                )?;
            }
        }
        Command::Tenant { command } => match command {
            TenantCommand::Create { name, labels } => {
                let t = store.create_tenant(&name, &labels).await?;
                if j {
                    out!("{}", tenant_json(&t))?;
                } else {
                    out!("tenant {} created (id {})", t.name, t.id)?;
                }
            }
            TenantCommand::List => {
                let all = store.list_tenants().await?;
                if j {
                    out!("{}", Value::Array(all.iter().map(tenant_json).collect()))?;
                } else {
                    let rows: Vec<Vec<String>> = all
                        .iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                t.name.clone(),
                                t.status.clone(),
                                t.labels.clone(),
                            ]
                        })
                        .collect();
                    print_table(&["ID", "NAME", "STATUS", "LABELS"], &rows)?;
                }
            }
            TenantCommand::Disable { name } => {
                let t = store.set_tenant_status(&name, "disabled").await?;
                if j {
                    out!("{}", tenant_json(&t))?
                } else {
                    out!("tenant {} disabled", t.name)?
                }
            }
            TenantCommand::PromptLog { name, days } => {
                let t = store.set_tenant_prompt_log(&name, days).await?;
                if days == 0 {
                    let purged = store
                        .purge_prompt_logs(tollgate_authz::time::unix_now_ms())
                        .await?;
                    if !j {
                        out!(
                            "prompt logging of tenant {} is off ({purged} entries purged)",
                            t.name
                        )?;
                    }
                } else if !j {
                    out!(
                        "tenant {}: request bodies are logged and kept {days} days",
                        t.name
                    )?;
                }
                if j {
                    out!("{}", tenant_json(&t))?;
                }
            }
            TenantCommand::Enable { name } => {
                let t = store.set_tenant_status(&name, "active").await?;
                if j {
                    out!("{}", tenant_json(&t))?
                } else {
                    out!("tenant {} enabled", t.name)?
                }
            }
        },
        Command::Key { command } => match command {
            KeyCommand::Create {
                tenant,
                name,
                labels,
                expires_at,
                expires_in,
                rpm,
            } => {
                let t = tenant_named(&store, &tenant).await?;
                if rpm == Some(0) {
                    return Err("--rpm must be at least 1".into());
                }
                // Saturating: a huge --expires-in means "far future", not an overflow.
                let expires_at = expires_at
                    .or(expires_in.map(|s| tollgate_authz::time::unix_now().saturating_add(s)));
                let id = issue_key(&store, j, &t, &name, &labels, expires_at).await?;
                if let Some(rpm) = rpm {
                    let mut row = PolicyRow::default();
                    row.limits.rpm = Some(rpm);
                    store.put_policy(Scope::Key, &id, &row).await?;
                }
            }
            KeyCommand::List { tenant } => {
                let tenant_id = match tenant {
                    Some(t) => Some(tenant_named(&store, &t).await?.id),
                    None => None,
                };
                let all = store.list_keys(tenant_id.as_deref()).await?;
                if j {
                    out!("{}", Value::Array(all.iter().map(key_json).collect()))?;
                } else {
                    let rows: Vec<Vec<String>> = all
                        .iter()
                        .map(|k| {
                            vec![
                                k.id.clone(),
                                format!("tg_{}_…", k.prefix),
                                k.name.clone(),
                                k.tenant_name.clone(),
                                fmt_time(k.expires_at),
                                fmt_time(k.revoked_at),
                                fmt_time(k.last_used_at),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "ID",
                            "KEY",
                            "NAME",
                            "TENANT",
                            "EXPIRES",
                            "REVOKED",
                            "LAST USED",
                        ],
                        &rows,
                    )?;
                }
            }
            KeyCommand::Revoke { key_id } => {
                store.revoke_key(&key_id).await?;
                if j {
                    out!("{}", json!({"id": key_id, "revoked": true}))?
                } else {
                    out!("key {key_id} revoked")?
                }
            }
            KeyCommand::Rotate { key_id, grace } => {
                if grace < 0 {
                    return Err("--grace must not be negative".into());
                }
                let old = store
                    .key_info(&key_id)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("key {key_id:?}")))?;
                if old.revoked_at.is_some() {
                    return Err(format!("key {key_id} is revoked; create a new key instead").into());
                }
                let t = Tenant {
                    id: old.tenant_id.clone(),
                    name: old.tenant_name.clone(),
                    status: String::new(),
                    labels: String::new(),
                    created_at: 0,
                    prompt_log_days: 0,
                };
                let new_id =
                    issue_key(&store, j, &t, &old.name, &old.labels, old.expires_at).await?;
                if let Some(p) = store.policy(Scope::Key, &key_id).await? {
                    store.put_policy(Scope::Key, &new_id, &p).await?;
                }
                let until = tollgate_authz::time::unix_now().saturating_add(grace);
                store.expire_key_at(&key_id, until, &new_id).await?;
                if !j {
                    out!("old key {key_id} stays valid until {until} (unix seconds)")?;
                }
            }
        },
        Command::Policy { command } => match command {
            PolicyCommand::Set {
                subject: s,
                models,
                operations,
                ips,
                rpm,
                tpm,
                budget_day,
                budget_month,
                budget_usd_day,
                budget_usd_month,
                max_concurrent,
                unset,
            } => {
                let (scope, id) = subject(&store, &s).await?;
                let mut row = store.policy(scope, &id).await?.unwrap_or_default();
                if let Some(m) = models {
                    policy::parse_models(&m)?;
                    row.models = Some(m);
                }
                if let Some(o) = operations {
                    policy::parse_operations(&o)?;
                    row.operations = Some(o);
                }
                if let Some(i) = ips {
                    policy::parse_ips(&i)?;
                    row.ips = Some(i);
                }
                let l = &mut row.limits;
                if rpm.is_some() {
                    l.rpm = rpm;
                }
                if tpm.is_some() {
                    l.tpm = tpm;
                }
                if budget_day.is_some() {
                    l.budget_day = budget_day;
                }
                if budget_month.is_some() {
                    l.budget_month = budget_month;
                }
                if budget_usd_day.is_some() {
                    l.budget_usd_day = budget_usd_day;
                }
                if budget_usd_month.is_some() {
                    l.budget_usd_month = budget_usd_month;
                }
                if max_concurrent.is_some() {
                    l.max_concurrent = max_concurrent;
                }
                for f in unset {
                    match f.as_str() {
                        "models" => row.models = None,
                        "operations" => row.operations = None,
                        "ips" => row.ips = None,
                        "rpm" => row.limits.rpm = None,
                        "tpm" => row.limits.tpm = None,
                        "budget-day" => row.limits.budget_day = None,
                        "budget-month" => row.limits.budget_month = None,
                        "budget-usd-day" => row.limits.budget_usd_day = None,
                        "budget-usd-month" => row.limits.budget_usd_month = None,
                        "max-concurrent" => row.limits.max_concurrent = None,
                        other => return Err(format!("--unset: unknown field {other:?}").into()),
                    }
                }
                let budgets = [row.limits.budget_day, row.limits.budget_month];
                if [row.limits.rpm, row.limits.tpm, row.limits.max_concurrent].contains(&Some(0))
                    || budgets.contains(&Some(0))
                {
                    return Err("limits must be at least 1 (use --unset for no limit)".into());
                }
                // Envoy carries a limit as a uint32: a larger budget would not arrive as set.
                if budgets.iter().flatten().any(|b| *b > u64::from(u32::MAX)) {
                    return Err(format!(
                        "token budgets must be at most {} tokens per period",
                        u32::MAX
                    )
                    .into());
                }
                if [row.limits.budget_usd_day, row.limits.budget_usd_month].contains(&Some(0)) {
                    return Err(
                        "USD budgets must be at least 0.0001 (use --unset for no limit)".into(),
                    );
                }
                store.put_policy(scope, &id, &row).await?;
                if j {
                    out!("{}", policy_json(&row))?
                } else {
                    out!("policy of {} {id} updated", scope.as_str())?
                }
            }
            PolicyCommand::Show { subject: s } => {
                let (scope, id) = subject(&store, &s).await?;
                let row = store.policy(scope, &id).await?.unwrap_or_default();
                if j {
                    out!(
                        "{}",
                        json!({"scope": scope.as_str(), "id": id, "policy": policy_json(&row)})
                    )?;
                } else {
                    let show = |o: &Option<String>, unset: &str| {
                        o.clone().unwrap_or_else(|| unset.to_string())
                    };
                    let num =
                        |o: Option<u64>| o.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
                    let dollars = |o: Option<u64>| {
                        o.map(|n| format!("{} USD", usd::format_dollars(n)))
                            .unwrap_or_else(|| "-".into())
                    };
                    let inherit = if scope == Scope::Key {
                        "(tenant's)"
                    } else {
                        "(default)"
                    };
                    print_table(
                        &["FIELD", "VALUE"],
                        &[
                            vec!["models".into(), show(&row.models, inherit)],
                            vec!["operations".into(), show(&row.operations, inherit)],
                            vec!["ips".into(), show(&row.ips, "(any)")],
                            vec!["rpm".into(), num(row.limits.rpm.map(u64::from))],
                            vec!["tpm".into(), num(row.limits.tpm.map(u64::from))],
                            vec!["budget_day".into(), num(row.limits.budget_day)],
                            vec!["budget_month".into(), num(row.limits.budget_month)],
                            vec!["budget_usd_day".into(), dollars(row.limits.budget_usd_day)],
                            vec![
                                "budget_usd_month".into(),
                                dollars(row.limits.budget_usd_month),
                            ],
                            vec![
                                "max_concurrent".into(),
                                num(row.limits.max_concurrent.map(u64::from)),
                            ],
                        ],
                    )?;
                }
            }
        },
    }
    Ok(())
}
