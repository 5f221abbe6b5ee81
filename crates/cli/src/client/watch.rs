//! `gantry watch`, and the follow every command that waits for a job shares: the job's
//! events shown until it ends, Ctrl+C cancelling it on the server, its outputs
//! downloaded, its exit code.

use super::opts::ServerOpts;
use super::ui::Ui;
use super::{error_exit, fail, CANCELLED, USAGE};
use gantry_client::wire::JobState;
use gantry_client::{Client, Error, Job};
use serde_json::json;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct WatchArgs {
    job: String,
    #[command(flatten)]
    opts: ServerOpts,
    /// On success, download the outputs into this folder.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// On Ctrl+C, stop watching and leave the job running instead of cancelling it.
    #[arg(long)]
    detach: bool,
}

pub async fn run(a: WatchArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    Ok(follow(
        &client,
        &a.job,
        &a.opts,
        true,
        0,
        a.out.as_deref(),
        a.detach,
        false,
    )
    .await)
}

/// Follow job `id` until it ends, then answer its exit code. Ctrl+C cancels it on the
/// server (or, with `detach`, leaves it running); a second Ctrl+C exits at once.
#[allow(clippy::too_many_arguments)]
pub(super) async fn follow(
    client: &Client,
    id: &str,
    opts: &ServerOpts,
    show: bool,
    nodes: usize,
    out: Option<&Path>,
    detach: bool,
    raw_logs: bool,
) -> ExitCode {
    let mut ui = Ui::new(show && !opts.json(), nodes, raw_logs);
    let watch_timeout = match opts.settings() {
        Ok(s) => s.watch_timeout,
        Err(e) => return error_exit(&e),
    };
    let deadline = watch_timeout.map(|d| tokio::time::Instant::now() + d);
    let mut seen: HashSet<i64> = HashSet::new();
    let mut cancelling = false;
    let mut events = match client.events(id).await {
        Ok(events) => events,
        Err(e) => return error_exit(&e),
    };
    // Made once, so a Ctrl+C that comes while an event is being shown is not lost.
    let mut interrupts = match Interrupts::new() {
        Ok(i) => i,
        Err(e) => return fail(USAGE, format!("cannot listen for Ctrl+C: {e}")),
    };
    loop {
        let until = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            next = events.next() => match next {
                Ok(Some(e)) => {
                    if e.id.is_some_and(|n| !seen.insert(n)) {
                        continue;
                    }
                    ui.on(&e);
                    if e.is_terminal() {
                        break;
                    }
                }
                // The stream ended or broke before the job did (a server restarting):
                // read it again from the start; what was shown is skipped.
                Ok(None) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    match client.events(id).await {
                        Ok(again) => events = again,
                        Err(e) => {
                            ui.finish();
                            return error_exit(&e);
                        }
                    }
                }
            },
            _ = interrupts.next() => {
                if cancelling {
                    ui.finish();
                    return fail(CANCELLED, format!("stopped waiting; job {id} may still be cancelling"));
                }
                if detach {
                    ui.finish();
                    return fail(CANCELLED, format!("left job {id} running (gantry watch {id} follows it again)"));
                }
                cancelling = true;
                ui.line(&format!("cancelling job {id} on the server (Ctrl+C again to stop waiting)"));
                if let Err(e) = client.cancel(id).await {
                    if !matches!(&e, Error::Api(r) if r.code == "job_finished") {
                        ui.finish();
                        return error_exit(&e);
                    }
                }
            }
            _ = until => {
                ui.finish();
                return fail(USAGE, format!("stopped watching job {id} after the watch timeout ({}); it goes on (gantry watch {id})", humantime::format_duration(watch_timeout.unwrap_or_default())));
            }
        }
    }
    ui.finish();
    let job = match client.job(id).await {
        Ok(job) => job,
        Err(e) => return error_exit(&e),
    };
    finish(client, &job, opts.json(), out, cancelling).await
}

/// Ctrl+C, buffered between waits.
struct Interrupts {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn new() -> std::io::Result<Interrupts> {
        Ok(Interrupts {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        {
            self.signal.recv().await;
        }
        #[cfg(not(unix))]
        {
            // A failure to listen answers at once, which would read as a Ctrl+C and
            // cancel the job: it waits for ever instead (`new` cannot check it here).
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Report how the job ended, download its outputs, and answer its exit code.
async fn finish(
    client: &Client,
    job: &Job,
    json_out: bool,
    out: Option<&Path>,
    cancelling: bool,
) -> ExitCode {
    let mut files = Vec::new();
    if let (Some(dir), JobState::Succeeded) = (out, job.state) {
        match download_all(client, job, dir).await {
            Ok(f) => files = f,
            Err(e) => return error_exit(&e),
        }
    }
    if json_out {
        println!(
            "{}",
            json!({"id": job.id, "state": job.state, "error": job.error.as_ref().map(|e| json!({"code": e.code, "message": e.message})), "files": files, "result": job.result})
        );
    }
    if let (Some(r), false) = (&job.result, json_out) {
        match (r.exit_code, r.signal) {
            (Some(code), _) => eprintln!("command exited with code {code}"),
            (None, Some(sig)) => eprintln!("command killed by signal {sig}"),
            _ => {}
        }
    }
    match job.state {
        JobState::Succeeded => {
            if !json_out {
                if cancelling {
                    eprintln!("job {} finished before the cancel reached it", job.id);
                }
                for f in &files {
                    eprintln!("wrote {f}");
                }
                eprintln!("job {} succeeded", job.id);
            }
            ExitCode::SUCCESS
        }
        JobState::Cancelled => {
            if !json_out {
                eprintln!("job {} cancelled", job.id);
            }
            ExitCode::from(CANCELLED)
        }
        _ => {
            if !json_out {
                let why = job
                    .error
                    .as_ref()
                    .map(|e| format!("{} ({})", e.message, e.code))
                    .unwrap_or_default();
                eprintln!("job {} failed: {why}", job.id);
            }
            ExitCode::FAILURE
        }
    }
}

pub(super) async fn download_all(
    client: &Client,
    job: &Job,
    dir: &Path,
) -> Result<Vec<String>, Error> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| Error::Io {
            what: format!("creating {}", dir.display()),
            reason: e.to_string(),
        })?;
    let mut files = Vec::new();
    for o in &job.outputs {
        // The file's own name, never a path the server could steer elsewhere.
        let name = Path::new(&o.filename)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| o.sha256.clone());
        let dest = dir.join(name);
        client.download(&o.url, &dest).await?;
        files.push(dest.display().to_string());
    }
    Ok(files)
}
