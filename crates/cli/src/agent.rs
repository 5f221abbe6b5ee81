//! `gantry agent`: on a GPU machine, the link out to a coordinator that serves it the
//! local ComfyUI (and runs the command jobs `--allow` permits), until Ctrl+C or SIGTERM.

use anyhow::Context;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// The coordinator, http(s)://host:port.
    #[arg(long)]
    server: String,
    /// An admin token of the coordinator (when it asks for tokens).
    #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This machine's backend name on the coordinator (kept in the state file; needed
    /// on the first run).
    #[arg(long)]
    name: Option<String>,
    /// Where the agent keeps its name and identity.
    #[arg(long, value_name = "FILE", default_value = "gantry-agent.json")]
    state: std::path::PathBuf,
    /// A tag jobs may ask for; repeatable.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// The local ComfyUI.
    #[arg(long, default_value = "http://127.0.0.1:8188")]
    comfyui: String,
    /// Start ComfyUI as this agent's child with this command (run by sh, in its own
    /// process group); restarted when it exits or when the coordinator finds it stuck.
    #[arg(long, value_name = "COMMAND")]
    spawn: Option<String>,
    /// The child's working directory.
    #[arg(long, value_name = "DIR", requires = "spawn")]
    cwd: Option<std::path::PathBuf>,
    /// A program command jobs may run here, by absolute path (a job's argv[0] must be
    /// exactly this); repeatable. With none, this agent runs no commands.
    #[arg(long = "allow", value_name = "PROGRAM")]
    allow: Vec<String>,
    /// How often the link is pinged; three silent ones and it is made anew (a NAT that
    /// dropped it says nothing).
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    heartbeat: String,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    gantry_agent::link::check_urls(&args.server, &args.comfyui).map_err(|e| anyhow::anyhow!(e))?;
    if let Some(p) = args
        .allow
        .iter()
        .find(|p| !std::path::Path::new(p).is_absolute())
    {
        anyhow::bail!("--allow {p}: give the program's absolute path (a name would be looked up in PATH, which a job cannot be trusted with)");
    }
    let heartbeat = gantry_server::config::parse_duration("--heartbeat", &args.heartbeat)?;
    if heartbeat.is_zero() {
        anyhow::bail!("--heartbeat 0s: the link needs a heartbeat");
    }
    let (name, id) = gantry_agent::link::identity(&args.state, args.name.as_deref())
        .map_err(|e| anyhow::anyhow!(e))?;
    let config = gantry_agent::link::AgentConfig {
        server: args.server,
        token: args.token,
        name,
        id: Some(id),
        tags: args.tags,
        spawn: args
            .spawn
            .map(|command| gantry_agent::supervise::SpawnConfig {
                command,
                cwd: args.cwd,
                comfyui: args.comfyui.clone(),
            }),
        comfyui: args.comfyui,
        max_backoff: std::time::Duration::from_secs(30),
        allow: args.allow,
        heartbeat,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    // Ctrl+C, or systemd's SIGTERM: close the link and exit. Both are listened for
    // before the link starts, so a failure to listen is an error now: with
    // `tokio::signal::ctrl_c()`, whose failure answers at once, the agent stopped as if
    // interrupted, without a word.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for Ctrl+C")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
        on_signal.cancel();
    });
    gantry_agent::link::run(config, stop)
        .await
        .map_err(|e| anyhow::anyhow!(e))
}
