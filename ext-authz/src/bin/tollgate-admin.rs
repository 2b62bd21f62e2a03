//! tollgate-admin: manage tenants and keys in the key store.

use clap::{Parser, Subcommand};
use tollgate_authz::api_key;
use tollgate_authz::key_store::SqliteKeyStore;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-admin",
    about = "Manage Tollgate tenants and API keys"
)]
struct Cli {
    /// Key store URL, e.g. sqlite://.tollgate/tollgate.db
    #[arg(
        long,
        env = "TOLLGATE_DATABASE_URL",
        default_value = "sqlite://.tollgate/tollgate.db"
    )]
    database_url: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply database migrations.
    Migrate,
    /// Tenant operations.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// API key operations.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Subcommand, Debug)]
enum TenantCommand {
    /// Create a tenant.
    Create { name: String },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create a key; the key is printed once and never stored.
    Create {
        /// Tenant name.
        #[arg(long)]
        tenant: String,
        /// A name for the key (who or what uses it).
        #[arg(long)]
        name: String,
        /// Requests per minute for this key.
        #[arg(long)]
        rpm: Option<u32>,
        /// Expiry as unix seconds.
        #[arg(long)]
        expires_at: Option<i64>,
    },
    /// Revoke a key by id.
    Revoke { key_id: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let store = SqliteKeyStore::connect(&cli.database_url).await?;
    store.migrate().await?;
    match cli.command {
        Command::Migrate => println!("migrations applied"),
        Command::Tenant {
            command: TenantCommand::Create { name },
        } => {
            let t = store.create_tenant(&name).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"id": t.id, "name": t.name, "status": t.status})
                );
            } else {
                println!("tenant {} created (id {})", t.name, t.id);
            }
        }
        Command::Key {
            command:
                KeyCommand::Create {
                    tenant,
                    name,
                    rpm,
                    expires_at,
                },
        } => {
            let t = store
                .tenant_by_name(&tenant)
                .await?
                .ok_or_else(|| format!("no tenant named {tenant:?}"))?;
            if rpm == Some(0) {
                return Err("--rpm must be at least 1".into());
            }
            let new = tokio::task::spawn_blocking(api_key::generate).await??;
            let id = store
                .insert_key(&t.id, &name, &new.prefix, &new.hash, rpm, expires_at)
                .await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"id": id, "tenant_id": t.id, "name": name, "key": new.full_key})
                );
            } else {
                println!(
                    "key {id} created for tenant {}; it is shown only once:",
                    t.name
                );
                println!("TOLLGATE_API_KEY={}", new.full_key);
            }
        }
        Command::Key {
            command: KeyCommand::Revoke { key_id },
        } => {
            if !store.revoke_key(&key_id).await? {
                return Err(format!("no active key with id {key_id:?}").into());
            }
            println!("key {key_id} revoked");
        }
    }
    Ok(())
}
