//! `gantry exec`: a program run on an agent that allows it, as a command job, followed.

use super::opts::ServerOpts;
use super::watch::follow;
use super::{fail, USAGE};
use gantry_client::{Error, SubmitRequest};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// The program, by the absolute path an agent allows (`gantry agent --allow`), then
    /// its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM"
    )]
    argv: Vec<String>,
    #[command(flatten)]
    opts: ServerOpts,
    /// A tag the agent must have; repeatable.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Picks the limit in the server's [timeouts.command] (model_download, ...).
    #[arg(long)]
    operation: Option<String>,
    /// The command's own limit, e.g. 10m, over the operation's.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// An environment variable for the program; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Where it runs on the agent's machine (absolute).
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// On Ctrl+C, stop following and leave the command running instead of killing it.
    #[arg(long)]
    detach: bool,
}

/// `gantry exec`: a command job, followed to its end: the program's stdout and stderr
/// come out here as they are written, and Ctrl+C kills its process group on the agent.
pub async fn run(a: ExecArgs) -> Result<ExitCode, Error> {
    let mut env = std::collections::BTreeMap::new();
    for kv in &a.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                env.insert(k.to_owned(), v.to_owned());
            }
            _ => return Ok(fail(USAGE, format!("--env {kv}: use NAME=VALUE"))),
        }
    }
    let timeout_ms = match &a.timeout {
        None => None,
        Some(t) => match gantry_server::config::parse_duration("--timeout", t) {
            Ok(d) if !d.is_zero() => Some(d.as_millis() as u64),
            Ok(_) => return Ok(fail(USAGE, "--timeout 0: a command must have a limit")),
            Err(e) => return Ok(fail(USAGE, e)),
        },
    };
    let body = SubmitRequest {
        kind: Some(gantry_client::wire::JobKind::Command),
        command: Some(gantry_client::wire::CommandRequest {
            argv: a.argv.clone(),
            env,
            cwd: a.cwd.clone(),
            operation: a.operation.clone(),
            timeout_ms,
        }),
        tags: a.tags.clone(),
        ..SubmitRequest::default()
    };
    let client = a.opts.client()?;
    let accepted = match client.submit(&body).await {
        Ok(accepted) => accepted,
        Err(Error::Api(r)) if r.status == 400 => {
            return Ok(fail(
                USAGE,
                format!("the server refused the command: {}", r.message),
            ))
        }
        Err(e) => return Err(e),
    };
    eprintln!("job {}", accepted.id);
    Ok(follow(
        &client,
        &accepted.id,
        &a.opts,
        true,
        0,
        None,
        a.detach,
        true,
    )
    .await)
}
