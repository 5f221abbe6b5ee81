//! `gantry token create|list|revoke`: API tokens, made straight in the store the server
//! uses (its `--data-dir`, `--store` or `--config`), so the first admin token needs no
//! token to make. The store keeps only a token's hash: it is printed once, at creation.

use anyhow::Context;
use gantry_core::auth::Scope;
use gantry_server::{Config, StoreConfig};
use gantry_store::{PgStore, SqliteStore, Store};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    action: TokenAction,
    /// The server's data dir (its embedded store).
    #[arg(
        long,
        env = "GANTRY_DATA_DIR",
        default_value = "gantry-data",
        global = true
    )]
    data_dir: PathBuf,
    /// The server's store, when it is postgres://...
    #[arg(long, env = "GANTRY_STORE", value_name = "URL", global = true)]
    store: Option<String>,
    /// The server's config file, for its data dir and store.
    #[arg(long, env = "GANTRY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum TokenAction {
    /// Make a token and print it (once: only its hash is kept).
    Create {
        /// What the token may do.
        #[arg(long, value_parser = ScopeParser)]
        scope: Scope,
        /// A name to tell it by (who or what uses it).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List the tokens (never the tokens themselves).
    List,
    /// Revoke a token by its id: it is refused from the next request on.
    Revoke { id: String },
}

/// What a token of `scope` may do, for `--help`.
fn allows(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => "see jobs, events, backends and metrics",
        Scope::Submit => "also submit jobs and cancel its own",
        Scope::Admin => "also add, drain and resume backends and cancel anyone's jobs",
        Scope::Agent => "only link a GPU machine (gantry agent), nothing else of the API",
    }
}

/// `--scope`: one of `Scope::ALL`, which the help and the error list, so that neither
/// can leave a scope out.
#[derive(Clone)]
struct ScopeParser;

impl clap::builder::TypedValueParser for ScopeParser {
    type Value = Scope;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Scope, clap::Error> {
        let s = value.to_string_lossy();
        Scope::parse(&s).ok_or_else(|| {
            let names: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
            let list = match names.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
                _ => names.join(""),
            };
            clap::Error::raw(
                clap::error::ErrorKind::InvalidValue,
                format!("no scope {s:?}: use {list}\n"),
            )
            .with_cmd(cmd)
        })
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(Scope::ALL.into_iter().map(|scope| {
            clap::builder::PossibleValue::new(scope.as_str()).help(allows(scope))
        })))
    }
}

async fn open(a: &TokenArgs) -> anyhow::Result<Arc<dyn Store>> {
    let mut config = Config::new(
        gantry_server::config::DEFAULT_LISTEN
            .parse()
            .context("the default listen address")?,
        a.data_dir.clone(),
    );
    if let Some(path) = &a.config {
        config.apply_file(path)?;
    }
    if let Some(store) = &a.store {
        config.store = StoreConfig::parse(store)?;
    }
    Ok(match &config.store {
        StoreConfig::Embedded => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
            Arc::new(SqliteStore::open(&config.data_dir).await?)
        }
        StoreConfig::Postgres(url) => Arc::new(PgStore::open(url).await?),
    })
}

fn time(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), gantry_server::api::rfc3339)
}

pub async fn run(a: TokenArgs) -> anyhow::Result<()> {
    let store = open(&a).await?;
    match &a.action {
        TokenAction::Create { scope, name } => {
            let (token, record) =
                gantry_server::auth::issue(*scope, name, gantry_server::engine::now_ms());
            store.create_token(&record).await?;
            if a.json {
                println!(
                    "{}",
                    json!({"id": record.id, "name": record.name, "scope": record.scope, "token": token})
                );
            } else {
                println!("{token}");
                eprintln!(
                    "token {} ({scope}) made; keep it now, it is not shown again. The server asks for tokens from now on.",
                    record.id
                );
            }
        }
        TokenAction::List => {
            let tokens = store.tokens().await?;
            if a.json {
                let list: Vec<_> = tokens
                    .iter()
                    .map(|t| json!({"id": t.id, "name": t.name, "scope": t.scope, "created_at": time(Some(t.created_at)), "revoked_at": t.revoked_at.map(|r| time(Some(r)))}))
                    .collect();
                println!("{}", json!(list));
            } else {
                println!(
                    "{:<12}  {:<7}  {:<24}  {:<24}  NAME",
                    "ID", "SCOPE", "CREATED", "REVOKED"
                );
                for t in &tokens {
                    println!(
                        "{:<12}  {:<7}  {:<24}  {:<24}  {}",
                        t.id,
                        t.scope,
                        time(Some(t.created_at)),
                        time(t.revoked_at),
                        t.name
                    );
                }
            }
        }
        TokenAction::Revoke { id } => {
            if !store
                .revoke_token(id, gantry_server::engine::now_ms())
                .await?
            {
                anyhow::bail!("no unrevoked token {id} (gantry token list shows them)");
            }
            if a.json {
                println!("{}", json!({"id": id, "revoked": true}));
            } else {
                println!("{id}: revoked");
            }
        }
    }
    Ok(())
}
