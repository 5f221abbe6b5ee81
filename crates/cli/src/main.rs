//! The `gantry` binary: a thin command-line layer over the library crates. This file is
//! the command line (clap) and the dispatch, with the logs' set-up; each command lives in
//! a module of its own (`serve`, `sim`, `agent`, `demo`, `token`, `bench`, `client::*`).

mod agent;
mod bench;
mod client;
mod demo;
mod serve;
mod sim;
mod token;

use clap::{Parser, Subcommand};

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
    Serve(serve::ServeArgs),
    /// Run gantry with three simulated ComfyUI backends (one faulty) and a trickle of jobs.
    Demo(demo::DemoArgs),
    /// Run a ComfyUI simulator that speaks the real protocol, with injectable faults.
    Sim(sim::SimArgs),
    /// On a GPU machine: connect out to a coordinator and serve it the local ComfyUI
    /// (no port opened here; works behind NAT).
    Agent(agent::AgentArgs),
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
        Command::Serve(args) => serve::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Sim(args) => sim::run(args).await,
        Command::Agent(args) => agent::run(args).await,
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
