//! The `gantry` binary: a thin command-line layer over the library crates.

mod bench;
mod client;
mod demo;
mod token;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "gantry",
    version,
    about = "A job orchestrator for ComfyUI GPU farms"
)]
struct Cli {
    /// How logs are written to stderr: `text` for people, `json` (one object a line,
    /// with the span fields: job id, attempt, backend) for log pipelines.
    #[arg(long, global = true, env = "GANTRY_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the orchestrator against ComfyUI servers (or simulators).
    Serve(ServeArgs),
    /// Run gantry with three simulated ComfyUI backends (one faulty) and a trickle of jobs.
    Demo(demo::DemoArgs),
    /// Run a ComfyUI simulator that speaks the real protocol, with injectable faults.
    Sim(SimArgs),
    /// On a GPU machine: connect out to a coordinator and serve it the local ComfyUI
    /// (no port opened here; works behind NAT).
    Agent(AgentArgs),
    /// Measure what gantry costs and how it scales (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Submit a workflow; with --watch, follow it live (Ctrl+C cancels it on the server).
    Submit(client::submit::SubmitArgs),
    /// Follow a job until it ends (Ctrl+C cancels it on the server).
    Watch(client::watch::WatchArgs),
    /// Run a program on an agent that allows it, as a command job: its output comes
    /// here, Ctrl+C kills it there (gantry exec --tag gpu -- /usr/bin/prog args).
    Exec(client::exec::ExecArgs),
    /// Cancel jobs, down to the backend.
    Cancel(client::jobs::CancelArgs),
    /// Show one job: state, attempts, outputs, error.
    Show(client::jobs::JobArgs),
    /// List jobs, newest first.
    Jobs(client::jobs::JobsArgs),
    /// Download a finished job's outputs.
    Outputs(client::jobs::OutputsArgs),
    /// Submit a job's workflow and options again, as a new job.
    Retry(client::jobs::RetryArgs),
    /// The backends: status, current job, tags.
    Backends(client::backends::BackendsArgs),
    /// Where a job's time went, node by node (--vs JOB2: the differences).
    Profile(client::profile::ProfileArgs),
    /// Node timings over the farm's history: runs, cached ratio, failures, quantiles.
    Stats(client::stats::StatsArgs),
    /// API tokens: create (printed once), list, revoke.
    Token(token::TokenArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(clap::Args)]
struct AgentArgs {
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

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to serve the API on.
    #[arg(long, env = "GANTRY_LISTEN", default_value = gantry_server::config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Folder for the embedded store and the jobs' output files.
    #[arg(long, env = "GANTRY_DATA_DIR", default_value = "gantry-data")]
    data_dir: PathBuf,
    /// A ComfyUI server, as [NAME=]URL (the name defaults to host:port); repeatable.
    #[arg(long = "backend", value_name = "[NAME=]URL")]
    backends: Vec<String>,
    /// A TOML file with backends (tags, priority), timeouts and limits.
    #[arg(long, env = "GANTRY_CONFIG")]
    config: Option<PathBuf>,
    /// Where jobs are kept: `embedded` (SQLite in the data dir) or
    /// postgres://USER@HOST/DB, shared by several coordinators.
    #[arg(long, env = "GANTRY_STORE", value_name = "URL")]
    store: Option<String>,
    /// A folder for output files that every coordinator shares (needed with postgres).
    #[arg(long, env = "GANTRY_ARTIFACTS", value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// This coordinator's id among those sharing a postgres store (random by default).
    #[arg(long, env = "GANTRY_COORDINATOR", value_name = "ID")]
    coordinator: Option<String>,
    /// How long a backend lease lasts without renewal (postgres store), e.g. 10s.
    #[arg(long, value_name = "DURATION", value_parser = parse_lease)]
    lease: Option<std::time::Duration>,
    /// Serve on a non-loopback address even though no API token exists (see `gantry
    /// token create`): anyone who reaches it may submit, cancel and drain.
    #[arg(long, env = "GANTRY_INSECURE")]
    insecure: bool,
}

#[derive(clap::Args)]
struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8188")]
    listen: SocketAddr,
    /// Run every timed phase this many times faster (100 for tests).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// A fault to inject, e.g. `stall:at=50,every=3`; repeatable. Also settable at run
    /// time with POST /sim/faults.
    #[arg(long = "fault", value_name = "SPEC")]
    faults: Vec<String>,
    /// Seed for faults with a probability (`p=0.25`), for a reproducible sequence.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Model files the loaders list and accept, comma-separated.
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// Folder for output, input and temp files (a temporary one by default).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run this many simulators in this process, on consecutive ports from --listen's
    /// (or each on a free port when that is 0); one line with its URL each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10000))]
    count: u32,
    /// What every model loader costs, cold and warm (its file was the previous prompt's),
    /// e.g. 3000,0 (milliseconds at speed 1).
    #[arg(long, value_name = "COLD,WARM", value_parser = parse_loader_ms)]
    loader_ms: Option<(std::time::Duration, std::time::Duration)>,
}

/// `--lease`, bounded as the config file's durations are (timers add it to the clock).
fn parse_lease(s: &str) -> Result<std::time::Duration, String> {
    gantry_server::config::parse_duration("--lease", s).map_err(|e| e.to_string())
}

fn parse_loader_ms(s: &str) -> Result<(std::time::Duration, std::time::Duration), String> {
    let (cold, warm) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?}: write COLD,WARM in milliseconds, e.g. 3000,0"))?;
    let ms = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map(std::time::Duration::from_millis)
            .map_err(|e| format!("{v:?} in --loader-ms: {e}"))
    };
    Ok((ms(cold)?, ms(warm)?))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file or a pipe they are noise.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    let done = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Sim(args) => sim(args).await,
        Command::Agent(args) => agent(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Token(args) => token::run(args).await,
        // The client commands answer their own exit codes (see client/mod.rs).
        Command::Submit(args) => return client::exit(client::submit::run(args).await),
        Command::Watch(args) => return client::exit(client::watch::run(args).await),
        Command::Exec(args) => return client::exit(client::exec::run(args).await),
        Command::Cancel(args) => return client::exit(client::jobs::cancel(args).await),
        Command::Show(args) => return client::exit(client::jobs::show(args).await),
        Command::Jobs(args) => return client::exit(client::jobs::list(args).await),
        Command::Outputs(args) => return client::exit(client::jobs::outputs(args).await),
        Command::Retry(args) => return client::exit(client::jobs::retry(args).await),
        Command::Backends(args) => return client::exit(client::backends::run(args).await),
        Command::Profile(args) => return client::exit(client::profile::run(args).await),
        Command::Stats(args) => return client::exit(client::stats::run(args).await),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "gantry", &mut std::io::stdout());
            return std::process::ExitCode::SUCCESS;
        }
    };
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn agent(args: AgentArgs) -> anyhow::Result<()> {
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
    // Ctrl+C, or systemd's SIGTERM: close the link and exit.
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        on_signal.cancel();
    });
    gantry_agent::link::run(config, stop)
        .await
        .map_err(|e| anyhow::anyhow!(e))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = gantry_server::Config::new(args.listen, args.data_dir);
    for spec in &args.backends {
        config
            .backends
            .push(gantry_server::BackendConfig::parse(spec)?);
    }
    if let Some(path) = &args.config {
        config.apply_file(path)?;
    }
    // Flags and environment win over the file.
    if let Some(store) = &args.store {
        config.store = gantry_server::StoreConfig::parse(store)?;
    }
    if let Some(dir) = args.artifacts {
        config.artifacts = Some(dir);
    }
    if let Some(id) = args.coordinator {
        config.coordinator = Some(id);
    }
    if let Some(lease) = args.lease {
        config.lease = lease;
    }
    if args.insecure {
        config.insecure = true;
    }
    let configured = !config.backends.is_empty();
    let server = gantry_server::Server::start(config)
        .await
        .context("cannot start gantry")?;
    // None configured is a farm of agents (or of backends added at run time): say how
    // one joins, since jobs wait until then.
    if !configured && server.engine.backends().is_empty() {
        tracing::warn!(
            "no backends yet: jobs wait for one. Give --backend [NAME=]URL (a ComfyUI server) or [[backends]] in --config, add one with `gantry backends add URL`, or link a GPU machine with `gantry agent --server {}`",
            server.url()
        );
    }
    println!("gantry: serving on {}", server.url());
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl+C")?;
    server.shutdown().await;
    Ok(())
}

async fn sim(args: SimArgs) -> anyhow::Result<()> {
    let mut handles = Vec::new();
    for i in 0..args.count {
        let mut listen = args.listen;
        if listen.port() != 0 {
            let port = u16::try_from(u32::from(listen.port()) + i)
                .context("--count runs past the last port")?;
            listen.set_port(port);
        }
        let config = gantry_sim::SimConfig {
            loader: args.loader_ms,
            listen,
            speed: args.speed,
            faults: args.faults.clone(),
            seed: args.seed.wrapping_add(u64::from(i)),
            models: args
                .models
                .clone()
                .unwrap_or_else(gantry_sim::default_models),
            data_dir: args.data_dir.as_ref().map(|d| {
                if args.count == 1 {
                    d.clone()
                } else {
                    d.join(format!("sim-{i}"))
                }
            }),
        };
        let handle = gantry_sim::spawn(config)
            .await
            .with_context(|| format!("cannot start simulator {}", i + 1))?;
        println!("gantry sim: a ComfyUI server on {}", handle.url());
        handles.push(handle);
    }
    if let [handle] = handles.as_slice() {
        println!(
            "  try: curl {}/system_stats    (Ctrl+C stops it)",
            handle.url()
        );
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl+C")?;
    for handle in handles {
        handle.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Instant + lease` panicked for a lease past what the clock holds.
    #[test]
    fn a_lease_over_ten_years_is_refused() {
        assert_eq!(parse_lease("10s"), Ok(std::time::Duration::from_secs(10)));
        assert!(parse_lease("500000000000y")
            .unwrap_err()
            .contains("longer than the longest limit, 10 years"));
    }
}
