//! The client commands (`submit`, `watch`, `cancel`, `show`, `jobs`, `outputs`): the farm
//! from a terminal or a script, through `gantry-client`. Exit codes: 0 succeeded, 1
//! failed, 130 cancelled (Ctrl+C), 2 usage or connection errors.

use gantry_client::wire::JobState;
use gantry_client::{Client, Error, Event, Job, SubmitRequest, Timeouts};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const CANCELLED: u8 = 130;
const USAGE: u8 = 2;

/// Where the server is and how long each kind of operation may take. Each comes from
/// its flag, else its `GANTRY_*` variable, else the client config file, else its default.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerOpts {
    /// The gantry to talk to [default: http://127.0.0.1:8700].
    #[arg(long, env = "GANTRY_SERVER")]
    server: Option<String>,
    /// Bearer token for a server that asks for one.
    #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Longest wait for a connection [default: 5s].
    #[arg(long, env = "GANTRY_CONNECT_TIMEOUT", value_parser = limit)]
    connect_timeout: Option<Duration>,
    /// Longest wait for one request's answer [default: 30s].
    #[arg(long, env = "GANTRY_REQUEST_TIMEOUT", value_parser = limit)]
    request_timeout: Option<Duration>,
    /// Stop watching after this long (the job goes on); none by default, since the
    /// server owns the job's timeouts.
    #[arg(long, env = "GANTRY_WATCH_TIMEOUT", value_parser = limit)]
    watch_timeout: Option<Duration>,
    /// The client config file (TOML: server, token, connect_timeout, request_timeout,
    /// watch_timeout) [default: $XDG_CONFIG_HOME/gantry/client.toml or
    /// ~/.config/gantry/client.toml, when it exists].
    #[arg(long, env = "GANTRY_CLIENT_CONFIG", value_name = "FILE")]
    client_config: Option<PathBuf>,
    /// Print JSON instead of tables and messages.
    #[arg(long)]
    json: bool,
}

/// The client config file's keys; any other is refused, by name.
#[derive(serde::Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    server: Option<String>,
    token: Option<String>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    watch_timeout: Option<String>,
}

/// What the client uses, once flags, variables, the file and defaults are merged.
#[derive(Clone, Debug)]
pub struct Settings {
    pub server: String,
    pub token: Option<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub watch_timeout: Option<Duration>,
}

/// The default client config file, when `$XDG_CONFIG_HOME` or `$HOME` says where.
fn default_client_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("gantry").join("client.toml"))
}

impl ServerOpts {
    pub fn settings(&self) -> Result<Settings, Error> {
        let (file, path) = match &self.client_config {
            Some(path) => (read_client_file(path)?, Some(path.clone())),
            None => match default_client_config().filter(|p| p.exists()) {
                Some(path) => (read_client_file(&path)?, Some(path)),
                None => (ClientFile::default(), None),
            },
        };
        let duration = |key: &str, v: &Option<String>| -> Result<Option<Duration>, Error> {
            v.as_deref()
                .map(|s| {
                    limit(s).map_err(|e| {
                        Error::Invalid(format!(
                            "{}: {key} = {s:?}: {e} (write durations like 30s, 5m)",
                            path.as_deref()
                                .unwrap_or(Path::new("client config"))
                                .display()
                        ))
                    })
                })
                .transpose()
        };
        Ok(Settings {
            server: self
                .server
                .clone()
                .or(file.server)
                .unwrap_or_else(|| "http://127.0.0.1:8700".into()),
            token: self.token.clone().or(file.token),
            connect_timeout: match self.connect_timeout {
                Some(d) => d,
                None => duration("connect_timeout", &file.connect_timeout)?
                    .unwrap_or(Duration::from_secs(5)),
            },
            request_timeout: match self.request_timeout {
                Some(d) => d,
                None => duration("request_timeout", &file.request_timeout)?
                    .unwrap_or(Duration::from_secs(30)),
            },
            watch_timeout: match self.watch_timeout {
                Some(d) => Some(d),
                None => duration("watch_timeout", &file.watch_timeout)?,
            },
        })
    }

    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.json
    }

    pub fn client(&self) -> Result<Client, Error> {
        let s = self.settings()?;
        Client::new(
            &s.server,
            Timeouts {
                connect: s.connect_timeout,
                request: s.request_timeout,
            },
            s.token,
        )
    }
}

fn read_client_file(path: &Path) -> Result<ClientFile, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        what: format!("reading the client config {}", path.display()),
        reason: e.to_string(),
    })?;
    toml::from_str(&text)
        .map_err(|e| Error::Invalid(format!("client config {}: {e}", path.display())))
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// An API-format workflow (ComfyUI: Workflow > Export (API)), or - for stdin.
    workflow: String,
    #[command(flatten)]
    opts: ServerOpts,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i32,
    /// A tag the backend must have; repeatable.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// The job's own limit for a phase (submit, start, first_progress, node_stall,
    /// deadline, queue), e.g. node_stall=2m; 0 disables it. Repeatable.
    #[arg(long = "timeout", value_name = "PHASE=DURATION")]
    timeouts: Vec<String>,
    /// Change an input before submitting, e.g. 3.seed=42 or 6.text="a red fox"; the
    /// value is JSON, or a string when it is not JSON. Repeatable.
    #[arg(long = "set", value_name = "NODE.INPUT=VALUE")]
    sets: Vec<String>,
    /// Attach an input file to the job and name it in a node's input, e.g.
    /// 1.image=face.png for a LoadImage: gantry uploads it to whichever backend runs the
    /// job. Repeatable.
    #[arg(long = "attach", value_name = "NODE.INPUT=PATH")]
    attach: Vec<String>,
    /// How many attempts the job may take.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Wait for the job to end, quietly.
    #[arg(long, conflicts_with = "watch")]
    wait: bool,
    /// Follow the job with live progress until it ends.
    #[arg(long)]
    watch: bool,
    /// On success, download the outputs into this folder (implies --wait).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// On Ctrl+C, stop watching and leave the job running instead of cancelling it.
    #[arg(long)]
    detach: bool,
}

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

#[derive(clap::Args, Debug)]
pub struct OutputsArgs {
    job: String,
    #[command(flatten)]
    opts: ServerOpts,
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("gantry: {message}");
    ExitCode::from(code)
}

/// Exit code 2, for a client error: unreachable, timed out, refused, bad usage.
fn error_exit(e: &Error) -> ExitCode {
    fail(USAGE, e)
}

/// A command's exit code: its own, or 2 when it stopped on a client error.
pub fn exit(done: Result<ExitCode, Error>) -> ExitCode {
    done.unwrap_or_else(|e| error_exit(&e))
}

pub async fn submit(a: SubmitArgs) -> Result<ExitCode, Error> {
    let mut body = match request_body(&a) {
        Ok(body) => body,
        Err(message) => return Ok(fail(USAGE, message)),
    };
    let files = match attachments(&a.attach, &mut body) {
        Ok(files) => files,
        Err(message) => return Ok(fail(USAGE, message)),
    };
    let client = a.opts.client()?;
    for (name, path, bytes) in files {
        let stored = match client.upload_file(bytes).await {
            Ok(stored) => stored,
            Err(Error::Api(r)) if r.status == 400 || r.status == 413 => {
                return Ok(fail(
                    USAGE,
                    format!("the server refused {}: {}", path.display(), r.message),
                ))
            }
            Err(e) => return Err(e),
        };
        body.attachments
            .push(gantry_client::wire::AttachmentRequest {
                name,
                sha256: Some(stored.sha256),
                data: None,
            });
    }
    let accepted = match client.submit(&body).await {
        Ok(accepted) => accepted,
        Err(Error::Api(r)) if r.status == 400 || r.status == 413 => {
            return Ok(fail(
                USAGE,
                format!("the server refused the job: {}", r.message),
            ))
        }
        Err(e) => return Err(e),
    };
    if a.opts.json {
        println!("{}", json!(accepted));
    } else {
        println!("{}", accepted.id);
    }
    if !(a.wait || a.watch || a.out.is_some()) {
        return Ok(ExitCode::SUCCESS);
    }
    let nodes = body.workflow.len();
    Ok(follow(
        &client,
        &accepted.id,
        &a.opts,
        a.watch,
        nodes,
        a.out.as_deref(),
        a.detach,
        false,
    )
    .await)
}

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
pub async fn exec(a: ExecArgs) -> Result<ExitCode, Error> {
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

pub async fn watch(a: WatchArgs) -> Result<ExitCode, Error> {
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

/// The body of `POST /v1/jobs` from the arguments, or what is wrong with them.
fn request_body(a: &SubmitArgs) -> Result<SubmitRequest, String> {
    let (what, text) = if a.workflow == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read the workflow from stdin: {e}"))?;
        ("stdin".to_owned(), text)
    } else {
        let text = std::fs::read_to_string(&a.workflow)
            .map_err(|e| format!("cannot read {}: {e}", a.workflow))?;
        (a.workflow.clone(), text)
    };
    let mut workflow: Value =
        serde_json::from_str(&text).map_err(|e| format!("{what} is not JSON: {e}"))?;
    if workflow.get("nodes").is_some_and(Value::is_array) && workflow.get("links").is_some() {
        return Err(format!(
            "{what} is in ComfyUI's UI save format, not the API format gantry runs: \
             in ComfyUI, use Workflow > Export (API) (enable the dev mode options in the \
             settings if it is not shown) and submit that file"
        ));
    }
    let Some(graph) = workflow.as_object_mut() else {
        return Err(format!("{what}: a workflow is a JSON object of nodes"));
    };
    for set in &a.sets {
        apply_set(graph, set)?;
    }
    let workflow = std::mem::take(graph);
    let mut timeouts = Map::new();
    for t in &a.timeouts {
        let (phase, duration) = t
            .split_once('=')
            .ok_or_else(|| format!("--timeout {t}: write PHASE=DURATION, e.g. node_stall=2m"))?;
        const PHASES: [&str; 6] = [
            "submit",
            "start",
            "first_progress",
            "node_stall",
            "deadline",
            "queue",
        ];
        if !PHASES.contains(&phase) {
            return Err(format!(
                "--timeout {t}: no phase {phase:?} (phases: {})",
                PHASES.join(", ")
            ));
        }
        let ms = if duration.trim() == "0" {
            0
        } else {
            humantime::parse_duration(duration)
                .map_err(|e| format!("--timeout {t}: {e} (write durations like 30s, 5m)"))?
                .as_millis() as u64
        };
        timeouts.insert(format!("{phase}_ms"), json!(ms));
    }
    let timeouts = if timeouts.is_empty() {
        None
    } else {
        Some(
            serde_json::from_value(Value::Object(timeouts))
                .map_err(|e| format!("--timeout: {e}"))?,
        )
    };
    Ok(SubmitRequest {
        workflow,
        priority: Some(a.priority),
        max_attempts: a.max_attempts,
        tags: a.tags.clone(),
        timeouts,
        ..SubmitRequest::default()
    })
}

/// `--attach NODE.INPUT=PATH`: reads each file, names it in the workflow's input by its
/// file name (made unique), and answers (name, path, bytes) to upload.
fn attachments(
    specs: &[String],
    body: &mut SubmitRequest,
) -> Result<Vec<(String, PathBuf, Vec<u8>)>, String> {
    let mut out: Vec<(String, PathBuf, Vec<u8>)> = Vec::new();
    for spec in specs {
        let usage = || format!("--attach {spec}: write NODE.INPUT=PATH, e.g. 1.image=face.png");
        let (target, path) = spec.split_once('=').ok_or_else(usage)?;
        if !target.contains('.') || path.is_empty() {
            return Err(usage());
        }
        let path = PathBuf::from(path);
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("--attach {spec}: cannot read {}: {e}", path.display()))?;
        let base = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let mut name = base.clone();
        let mut n = 1;
        while out.iter().any(|(other, _, _)| *other == name) {
            n += 1;
            name = format!("{n}-{base}");
        }
        let value = serde_json::to_string(&name).map_err(|e| e.to_string())?;
        apply_set(&mut body.workflow, &format!("{target}={value}"))
            .map_err(|e| e.replacen("--set", "--attach", 1))?;
        out.push((name, path, bytes));
    }
    Ok(out)
}

/// A client timeout: a human duration of at most ten years, since a deadline adds it to
/// the clock (`--watch-timeout 500000000000y` overflowed it).
fn limit(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > Duration::from_millis(gantry_core::MAX_LIMIT_MS) {
        return Err("longer than the longest limit, 10 years".into());
    }
    Ok(d)
}

/// `NODE.INPUT=VALUE` on the graph: the value is JSON, or a string when it is not.
fn apply_set(graph: &mut Map<String, Value>, set: &str) -> Result<(), String> {
    let (target, raw) = set
        .split_once('=')
        .ok_or_else(|| format!("--set {set}: write NODE.INPUT=VALUE, e.g. 3.seed=42"))?;
    let (node, input) = target
        .split_once('.')
        .ok_or_else(|| format!("--set {set}: write NODE.INPUT=VALUE, e.g. 3.seed=42"))?;
    if input.is_empty() {
        return Err(format!(
            "--set {set}: no input name after {node}. (write NODE.INPUT=VALUE, e.g. 3.seed=42)"
        ));
    }
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
    let Some(entry) = graph.get_mut(node) else {
        let mut ids: Vec<&String> = graph.keys().collect();
        ids.sort();
        return Err(format!(
            "--set {set}: the workflow has no node {node} (its nodes: {})",
            ids.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let Some(inputs) = entry.get_mut("inputs").and_then(Value::as_object_mut) else {
        return Err(format!("--set {set}: node {node} has no inputs object"));
    };
    inputs.insert(input.to_owned(), value);
    Ok(())
}

/// Follow job `id` until it ends, then answer its exit code. Ctrl+C cancels it on the
/// server (or, with `detach`, leaves it running); a second Ctrl+C exits at once.
#[allow(clippy::too_many_arguments)]
async fn follow(
    client: &Client,
    id: &str,
    opts: &ServerOpts,
    show: bool,
    nodes: usize,
    out: Option<&Path>,
    detach: bool,
    raw_logs: bool,
) -> ExitCode {
    let mut ui = Ui::new(show && !opts.json, nodes, raw_logs);
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
    finish(client, &job, opts.json, out, cancelling).await
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
            let _ = tokio::signal::ctrl_c().await;
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

async fn download_all(client: &Client, job: &Job, dir: &Path) -> Result<Vec<String>, Error> {
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

/// Progress on stderr: bars on a terminal, one line per event elsewhere.
struct Ui {
    show: bool,
    /// A command's output goes to stdout and stderr as its program wrote it (`exec`),
    /// not as prefixed progress lines.
    raw_logs: bool,
    bars: Option<(MultiProgress, ProgressBar, ProgressBar)>,
    started: HashSet<String>,
    backend: String,
}

impl Ui {
    fn new(show: bool, nodes: usize, raw_logs: bool) -> Ui {
        let bars = (show && !raw_logs && std::io::stderr().is_terminal()).then(|| {
            let multi = MultiProgress::new();
            let overall = multi.add(ProgressBar::new(nodes as u64));
            overall.set_style(
                ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} nodes {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            overall.set_prefix("job");
            let node = multi.add(ProgressBar::new(0));
            node.set_style(
                ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            node.set_prefix("node");
            (multi, overall, node)
        });
        Ui {
            show,
            raw_logs,
            bars,
            started: HashSet::new(),
            backend: String::new(),
        }
    }

    fn line(&self, text: &str) {
        match &self.bars {
            Some((multi, ..)) => {
                let _ = multi.println(text);
            }
            None if self.show => eprintln!("{text}"),
            None => {}
        }
    }

    fn on(&mut self, e: &Event) {
        let d = &e.data;
        let s = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
        match e.name.as_str() {
            "queued" => self.line("queued"),
            "dispatched" => {
                self.backend = s("backend");
                self.line(&format!(
                    "attempt {} dispatched to {}",
                    d["attempt"], self.backend
                ));
            }
            "started" => self.line(&format!("started on {}", self.backend)),
            "node_started" => {
                self.started.insert(s("node"));
                let text = format!(
                    "node {} ({}) on {}",
                    s("node"),
                    s("class_type"),
                    s("backend")
                );
                match &self.bars {
                    Some((_, overall, node)) => {
                        overall.set_position(self.started.len().saturating_sub(1) as u64);
                        node.reset();
                        node.set_length(0);
                        node.set_message(text);
                    }
                    None => self.line(&text),
                }
            }
            "progress" => {
                let (value, max) = (
                    d["value"].as_f64().unwrap_or(0.0),
                    d["max"].as_f64().unwrap_or(0.0),
                );
                match &self.bars {
                    Some((_, _, node)) => {
                        node.set_length(max as u64);
                        node.set_position(value as u64);
                    }
                    None => self.line(&format!("  node {} step {value}/{max}", s("node"))),
                }
            }
            "node_finished" if self.bars.is_none() => {
                let took = d["duration_ms"]
                    .as_u64()
                    .map(|ms| format!(" in {ms} ms"))
                    .unwrap_or_default();
                self.line(&format!(
                    "node {} ({}) {}{took}",
                    s("node"),
                    s("class_type"),
                    s("status")
                ));
            }
            "nodes_cached" => {
                let nodes: Vec<&str> = d["nodes"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                for n in &nodes {
                    self.started.insert((*n).to_owned());
                }
                match &self.bars {
                    Some((_, overall, _)) => overall.set_position(self.started.len() as u64),
                    None => self.line(&format!("cached: node {}", nodes.join(", "))),
                }
            }
            "attempt_failed" => {
                let will_retry = d["will_retry"].as_bool().unwrap_or(false);
                self.line(&format!(
                    "attempt {} failed on {}: {}{}",
                    d["attempt"],
                    s("backend"),
                    d["error"]["message"].as_str().unwrap_or_default(),
                    if will_retry { "; retrying" } else { "" }
                ));
            }
            "job_retrying" => match d["waiting_for"]["message"].as_str() {
                Some(why) => self.line(&format!(
                    "next attempt in at least {} ms: {why}",
                    d["delay_ms"]
                )),
                None => self.line(&format!("next attempt in {} ms", d["delay_ms"])),
            },
            "backend_blocked" => self.line(&format!(
                "{} blocked for this workflow until {}",
                s("backend"),
                s("until")
            )),
            "cancel_requested" => self.line("cancel requested"),
            // A command job's output, as its program wrote it.
            "log" if self.raw_logs => match d["stream"].as_str() {
                Some("stderr") => eprintln!("{}", s("line")),
                _ => println!("{}", s("line")),
            },
            "log" => self.line(&format!("[{}] {}", s("stream"), s("line"))),
            _ => {}
        }
    }

    fn finish(&mut self) {
        if let Some((multi, overall, node)) = self.bars.take() {
            overall.finish_and_clear();
            node.finish_and_clear();
            let _ = multi.clear();
        }
    }
}

pub async fn cancel(a: CancelArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    let mut code = ExitCode::SUCCESS;
    for id in &a.jobs {
        match client.cancel(id).await {
            Ok(answer) => {
                if a.opts.json {
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
    if a.opts.json {
        println!("{}", serde_json::to_string_pretty(&job).unwrap_or_default());
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

pub async fn jobs(a: JobsArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    let jobs = client.jobs(a.state.as_deref(), a.limit).await?;
    if a.opts.json {
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
    if a.opts.json {
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

/// The backends as this server sees them: a table, or `--json`.
pub async fn backends(a: BackendsArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    let (name, drain) = match &a.action {
        None => return list_backends(&client, a.opts.json).await,
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
            if a.opts.json {
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
    if a.opts.json {
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

/// Property tests of `--set`: whatever the expression, it edits exactly the input it
/// names, or changes nothing and says what is wrong. `PROPTEST_CASES` asks for more.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            rng_seed: proptest::test_runner::RngSeed::Fixed(24),
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// A real prompt, plus a node whose `inputs` is not an object.
    fn graph() -> Map<String, Value> {
        let text = include_str!("../../../fixtures/comfyui/workflows/a_normal.json");
        let mut graph: Map<String, Value> = serde_json::from_str(text).unwrap_or_default();
        graph.insert("9".into(), json!({"class_type": "X", "inputs": [1]}));
        graph
    }

    /// Expressions near the right shape: ids that exist or not, inputs that exist,
    /// are new or empty, values that are JSON or not, and the separators in odd places.
    fn expression() -> impl Strategy<Value = String> {
        let node = prop_oneof![
            prop::sample::select(vec!["1", "2", "4", "9", "", "7", "2.1"]).prop_map(str::to_owned),
            "\\PC{0,4}",
        ];
        let input = prop_oneof![
            prop::sample::select(vec!["seed", "width", "", "new", "a.b", "a=b"])
                .prop_map(str::to_owned),
            "\\PC{0,6}",
        ];
        let value = prop_oneof![
            prop::sample::select(vec![
                "42",
                "-1",
                "1e400",
                "18446744073709551616",
                "\"text\"",
                "[\"1\", 0]",
                "{\"a\": 1}",
                "null",
                "",
                "=",
                "not json",
                "\"unterminated",
            ])
            .prop_map(str::to_owned),
            "\\PC{0,8}",
        ];
        prop_oneof![
            3 => (node, input, value).prop_map(|(n, i, v)| format!("{n}.{i}={v}")),
            1 => "\\PC{0,16}",
        ]
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn a_set_edits_the_input_it_names_or_nothing(set in expression()) {
            let before = graph();
            let mut after = before.clone();
            match apply_set(&mut after, &set) {
                Err(e) => {
                    prop_assert!(e.starts_with(&format!("--set {set}: ")), "{e}");
                    prop_assert_eq!(&after, &before, "a refused --set changed the graph");
                }
                Ok(()) => {
                    let (target, raw) = set.split_once('=').unwrap_or_default();
                    let (node, input) = target.split_once('.').unwrap_or_default();
                    prop_assert!(!input.is_empty());
                    let expect = serde_json::from_str(raw)
                        .unwrap_or_else(|_| Value::String(raw.to_owned()));
                    prop_assert_eq!(&after[node]["inputs"][input], &expect);
                    // Nothing else moved.
                    after[node]["inputs"]
                        .as_object_mut()
                        .map(|inputs| match before[node]["inputs"].get(input) {
                            Some(old) => inputs.insert(input.to_owned(), old.clone()),
                            None => inputs.remove(input),
                        });
                    prop_assert_eq!(&after, &before);
                }
            }
        }
    }

    /// A watch deadline is the clock plus the timeout: one past what the clock holds
    /// panicked as it was added.
    #[test]
    fn a_timeout_longer_than_ten_years_is_refused() {
        assert_eq!(limit("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(
            limit("500000000000y"),
            Err("longer than the longest limit, 10 years".to_owned())
        );
        assert!(limit("soon").is_err());
    }

    /// Found by the property above: `3.=5` set an input named "" that no node has.
    #[test]
    fn an_empty_input_name_is_refused() {
        let mut g = graph();
        let e = apply_set(&mut g, "2.=5").unwrap_err();
        assert_eq!(
            e,
            "--set 2.=5: no input name after 2. (write NODE.INPUT=VALUE, e.g. 3.seed=42)"
        );
        assert_eq!(g, graph());
    }
}
