//! The commands about jobs already submitted: `show`, `jobs`, `outputs`, `cancel`,
//! `retry`.

use super::opts::ServerOpts;
use super::watch::{download_all, follow};
use super::{fail, pretty_json, USAGE};
use gantry_client::wire::JobState;
use gantry_client::Error;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct JobArgs {
    job: String,
    #[command(flatten)]
    opts: ServerOpts,
}

#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    #[arg(required = true)]
    jobs: Vec<String>,
    #[command(flatten)]
    opts: ServerOpts,
}

#[derive(clap::Args, Debug)]
pub struct JobsArgs {
    #[command(flatten)]
    opts: ServerOpts,
    /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
    #[arg(long)]
    state: Option<String>,
    #[arg(long, default_value_t = 20)]
    limit: u32,
}

#[derive(clap::Args, Debug)]
pub struct RetryArgs {
    job: String,
    #[command(flatten)]
    opts: ServerOpts,
    /// Follow the new job with live progress until it ends.
    #[arg(long)]
    watch: bool,
}

#[derive(clap::Args, Debug)]
pub struct OutputsArgs {
    job: String,
    #[command(flatten)]
    opts: ServerOpts,
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
}

pub async fn cancel(a: CancelArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    let mut code = ExitCode::SUCCESS;
    for id in &a.jobs {
        match client.cancel(id).await {
            Ok(answer) => {
                if a.opts.json() {
                    println!("{}", json!(answer));
                } else {
                    let what = if answer.state == JobState::Cancelled {
                        "cancelled"
                    } else {
                        "cancelling (the backend confirms)"
                    };
                    println!("{id}: {what}");
                }
            }
            Err(e) => {
                eprintln!("gantry: {id}: {e}");
                code = ExitCode::from(USAGE);
            }
        }
    }
    Ok(code)
}

pub async fn show(a: JobArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    let job = client.job(&a.job).await?;
    if a.opts.json() {
        println!("{}", pretty_json(&job, &format!("job {}", job.id))?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("job       {}", job.id);
    println!(
        "state     {}{}",
        job.state,
        job.phase
            .map(|p| format!(" ({})", p.as_str()))
            .unwrap_or_default()
    );
    println!("priority  {}", job.priority);
    println!("created   {}", job.created_at);
    if let Some(c) = &job.command {
        // Shell-quoted only as far as a reader needs to see the words apart.
        let words: Vec<String> = c
            .argv
            .iter()
            .map(|w| {
                if w.is_empty() || w.contains(char::is_whitespace) {
                    format!("{w:?}")
                } else {
                    w.clone()
                }
            })
            .collect();
        println!("command   {}", words.join(" "));
    }
    for a in &job.attempts {
        let error = a
            .error
            .as_ref()
            .map(|e| format!(": {}", e.message))
            .unwrap_or_default();
        println!(
            "attempt {} on {}: {}{error}",
            a.number,
            a.backend,
            a.status.as_str()
        );
    }
    for o in &job.outputs {
        println!("output    {} ({} bytes) {}", o.filename, o.size, o.url);
    }
    if let Some(e) = &job.error {
        println!("error     {} ({})", e.message, e.code);
    }
    if let Some(n) = &job.note {
        println!("note      {n}");
    }
    if let Some(w) = &job.waiting_for {
        println!("waiting   {}", w.message);
        for (backend, why) in &w.backends {
            println!("          {backend}: {why}");
        }
    }
    if let Some(r) = &job.result {
        match (r.exit_code, r.signal) {
            (Some(code), _) => println!("exit code {code}"),
            (None, Some(sig)) => println!("signal    {sig}"),
            _ => {}
        }
        for line in &r.tail {
            println!("  | {line}");
        }
        if let Some(log) = &r.log {
            println!("log       /v1/jobs/{}/log ({} bytes)", job.id, log.size);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(a: JobsArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    let jobs = client.jobs(a.state.as_deref(), a.limit).await?;
    if a.opts.json() {
        println!("{}", json!(jobs));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<36}  {:<10}  {:>8}  {:<24}  BACKEND",
        "ID", "STATE", "ATTEMPTS", "CREATED"
    );
    for j in &jobs {
        let backend = j.attempts.last().map(|a| a.backend.as_str()).unwrap_or("-");
        println!(
            "{:<36}  {:<10}  {:>8}  {:<24}  {backend}",
            j.id,
            j.state,
            j.attempts.len(),
            j.created_at
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn outputs(a: OutputsArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    let job = client.job(&a.job).await?;
    if job.state != JobState::Succeeded {
        return Ok(fail(
            1,
            format!(
                "job {} is {}: it has no outputs to download",
                job.id, job.state
            ),
        ));
    }
    for f in download_all(&client, &job, &a.out).await? {
        println!("{f}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Submit a job's request again as a new job (a failed or cancelled one, typically).
pub async fn retry(a: RetryArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    let body = client.request_of(&a.job).await?;
    let accepted = client.submit(&body).await?;
    if a.opts.json() {
        println!(
            "{}",
            json!({"id": accepted.id, "state": accepted.state, "retry_of": a.job})
        );
    } else {
        println!("{}", accepted.id);
    }
    if !a.watch {
        return Ok(ExitCode::SUCCESS);
    }
    let nodes = body.workflow.len();
    Ok(follow(
        &client,
        &accepted.id,
        &a.opts,
        true,
        nodes,
        None,
        false,
        false,
    )
    .await)
}
