//! `gantry backends`: the backends as this server sees them, and `add`, `drain`,
//! `resume`.

use super::opts::ServerOpts;
use gantry_client::{Client, Error};
use serde_json::json;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct BackendsArgs {
    #[command(subcommand)]
    action: Option<BackendsAction>,
    #[command(flatten)]
    opts: ServerOpts,
}

#[derive(clap::Subcommand, Debug)]
enum BackendsAction {
    /// Take a backend out of rotation: no new work; what runs there finishes.
    Drain { name: String },
    /// Put a drained backend back into rotation.
    Resume { name: String },
    /// Add a ComfyUI server; the server keeps it across restarts.
    Add {
        /// Its base URL, http://host:port.
        url: String,
        /// Its name [default: host:port].
        #[arg(long)]
        name: Option<String>,
        /// A tag jobs may ask for; repeatable.
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Higher is preferred.
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i32>,
    },
}

/// The backends as this server sees them: a table, or `--json`.
pub async fn run(a: BackendsArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    let (name, drain) = match &a.action {
        None => return list_backends(&client, a.opts.json()).await,
        Some(BackendsAction::Add {
            url,
            name,
            tags,
            priority,
        }) => {
            let added = client
                .add_backend(&gantry_client::wire::AddBackend {
                    url: url.clone(),
                    name: name.clone(),
                    tags: tags.clone(),
                    priority: *priority,
                })
                .await?;
            if a.opts.json() {
                println!("{}", json!(added));
            } else {
                println!("{}: added ({})", added.name, added.url);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(BackendsAction::Drain { name }) => (name, true),
        Some(BackendsAction::Resume { name }) => (name, false),
    };
    let answer = client.set_draining(name, drain).await?;
    if a.opts.json() {
        println!("{}", json!(answer));
    } else {
        println!("{name}: {}", answer.status.as_str());
    }
    Ok(ExitCode::SUCCESS)
}

/// The backends as a table, or `--json`.
async fn list_backends(client: &Client, json_out: bool) -> Result<ExitCode, Error> {
    let backends = client.backends().await?;
    if json_out {
        println!("{}", json!({ "backends": backends }));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16}  {:<10}  {:<38}  {:<12}  URL",
        "NAME", "STATUS", "JOB", "TAGS"
    );
    for b in &backends {
        let tags = if b.tags.is_empty() {
            "-".to_owned()
        } else {
            b.tags.join(",")
        };
        // An agent's URL is a listener on this coordinator: say what it is instead.
        let reach = match (b.kind, &b.allow) {
            (gantry_client::wire::BackendKind::Agent, Some(allow)) if !allow.is_empty() => {
                format!("agent (allows {})", allow.join(", "))
            }
            (gantry_client::wire::BackendKind::Agent, _) => "agent".to_owned(),
            (gantry_client::wire::BackendKind::Url, _) => b.url.clone(),
        };
        println!(
            "{:<16}  {:<10}  {:<38}  {:<12}  {reach}",
            b.name,
            b.status.as_str(),
            b.current_job.as_deref().unwrap_or("-"),
            tags,
        );
    }
    Ok(ExitCode::SUCCESS)
}
