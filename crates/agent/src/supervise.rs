//! `gantry agent --spawn`: ComfyUI as the agent's child, in a process group of its own.
//! Started, waited for (`GET /system_stats`), restarted when it exits (with backoff, and
//! `crash_looping` after quick exits in a row) or when the coordinator says it is stuck.
//! A restart is SIGTERM to the whole group, then SIGKILL after a grace; never a broad
//! kill. The child's output lines are kept (the last `LOG_LINES`) and reported.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Lines of the child's output kept.
pub const LOG_LINES: usize = 1000;

/// A child that exits sooner than this after its start counts as a crash.
const QUICK_EXIT: Duration = Duration::from_secs(10);
/// Quick exits in a row before the child is `crash_looping`.
const LOOP_AFTER: u32 = 3;
/// SIGTERM, then this long, then SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct SpawnConfig {
    /// Run by `sh -c` (so it may carry arguments, redirections and `;`).
    pub command: String,
    pub cwd: Option<std::path::PathBuf>,
    /// Where the child serves, for readiness.
    pub comfyui: String,
}

/// What the supervisor reports (as control messages on the link).
pub type Report = Value;

/// Restarts kept, newest last.
pub const RESTARTS_KEPT: usize = 100;

/// The supervisor's shared view: recent lines, the child's state and its restarts (kept
/// here, so those made while the link was down reach the coordinator in the next hello).
#[derive(Clone, Default)]
pub struct Shared {
    inner: Arc<Mutex<Kept>>,
}

#[derive(Default)]
struct Kept {
    lines: VecDeque<String>,
    state: Value,
    restarts: VecDeque<Value>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn line(&self, line: String) {
        let mut g = self.lock();
        if g.lines.len() == LOG_LINES {
            g.lines.pop_front();
        }
        g.lines.push_back(line);
    }

    /// The last lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lock().lines.iter().cloned().collect()
    }

    /// The child's latest state message.
    pub fn state(&self) -> Value {
        self.lock().state.clone()
    }

    fn set_state(&self, v: Value) {
        self.lock().state = v;
    }

    /// The last restarts, oldest first, each with its time on this machine's clock.
    pub fn restarts(&self) -> Vec<Value> {
        self.lock().restarts.iter().cloned().collect()
    }

    /// Keeps a restart (stamped with `at`) and answers it, to report.
    fn restart(&self, reason: &str, pid: Option<u32>) -> Value {
        let v = json!({"type": "restart", "reason": reason, "pid": pid,
            "at": crate::now_rfc3339()});
        let mut g = self.lock();
        if g.restarts.len() == RESTARTS_KEPT {
            g.restarts.pop_front();
        }
        g.restarts.push_back(v.clone());
        v
    }
}

/// Why the child is being restarted.
pub enum Restart {
    /// The coordinator found a prompt stuck past its interrupt.
    Stuck(String),
}

/// Runs the child until `stop`, reporting on `reports`; `restarts` asks for a restart.
pub async fn run(
    config: SpawnConfig,
    shared: Shared,
    reports: mpsc::UnboundedSender<Report>,
    mut restarts: mpsc::UnboundedReceiver<Restart>,
    stop: CancellationToken,
) {
    let http = reqwest::Client::new();
    let ready_url = format!("{}/system_stats", config.comfyui.trim_end_matches('/'));
    let mut quick_exits = 0u32;
    let mut backoff = Duration::from_millis(500);
    let mut reason = "start".to_owned();
    loop {
        let why = reason.clone();
        let state = |s: &str, extra: Value| {
            let mut v = json!({"type": "child", "state": s, "reason": why});
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            shared.set_state(v.clone());
            // The link reads reports while it lives; the state is kept in `shared` and
            // sent again in the next hello, so one with no reader is not lost.
            let _ = reports.send(v);
        };
        let mut child = match spawn(&config) {
            Ok(c) => c,
            Err(e) => {
                state("failed_to_start", json!({"error": e.to_string()}));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
                continue;
            }
        };
        let pid = child.id();
        state("starting", json!({"pid": pid}));
        forward_output(&mut child, &shared, &reports);
        let started = Instant::now();
        // Readiness, while watching for an early exit.
        let ready = async {
            loop {
                if let Ok(r) = http.get(&ready_url).send().await {
                    if r.status().is_success() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let mut exited = None;
        tokio::select! {
            _ = ready => state("ready", json!({"pid": pid})),
            status = child.wait() => exited = Some(status),
            _ = stop.cancelled() => {
                stop_group(&mut child).await;
                return;
            }
        }
        if exited.is_none() {
            tokio::select! {
                status = child.wait() => exited = Some(status),
                asked = restarts.recv() => {
                    match asked {
                        Some(Restart::Stuck(prompt)) => {
                            reason = format!("stuck: prompt {prompt} still running after its interrupt");
                            let _ = reports.send(shared.restart(&reason, pid));
                            stop_group(&mut child).await;
                            // Asked for: not a crash.
                            quick_exits = 0;
                            backoff = Duration::from_millis(500);
                            continue;
                        }
                        None => return,
                    }
                }
                _ = stop.cancelled() => {
                    stop_group(&mut child).await;
                    return;
                }
            }
        }
        let code = exited
            .and_then(|s| s.ok())
            .map(|s| describe(&s))
            .unwrap_or_else(|| "unknown".into());
        // What the child left behind in its group goes with it.
        if let Some(pid) = pid {
            // SAFETY: kill takes no pointers; an empty group only makes it fail.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
        if started.elapsed() < QUICK_EXIT {
            quick_exits += 1;
        } else {
            quick_exits = 0;
            backoff = Duration::from_millis(500);
        }
        reason = format!("exited ({code})");
        let _ = reports.send(shared.restart(&reason, pid));
        if quick_exits >= LOOP_AFTER {
            state("crash_looping", json!({"quick_exits": quick_exits}));
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(if quick_exits > 0 { backoff } else { Duration::ZERO }) => {}
        }
        if quick_exits > 0 {
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }
}

fn describe(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    }
}

fn spawn(config: &SpawnConfig) -> std::io::Result<Child> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&config.command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: a restart signals the whole tree and nothing else.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &config.cwd {
        cmd.current_dir(dir);
    }
    cmd.spawn()
}

fn forward_output(child: &mut Child, shared: &Shared, reports: &mpsc::UnboundedSender<Report>) {
    let out = child.stdout.take().map(|o| BufReader::new(o).lines());
    let err = child.stderr.take().map(|e| BufReader::new(e).lines());
    for (mut lines, stream) in [
        (out.map(Either::Out), "stdout"),
        (err.map(Either::Err), "stderr"),
    ]
    .into_iter()
    .filter_map(|(l, s)| l.map(|l| (l, s)))
    {
        let shared = shared.clone();
        let reports = reports.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                shared.line(line.clone());
                // Kept in `shared` too (the coordinator's logs route reads those).
                let _ = reports.send(json!({"type": "log", "stream": stream, "line": line}));
            }
        });
    }
}

/// Either of the child's two output streams, read line by line.
enum Either {
    Out(tokio::io::Lines<BufReader<tokio::process::ChildStdout>>),
    Err(tokio::io::Lines<BufReader<tokio::process::ChildStderr>>),
}

impl Either {
    async fn next_line(&mut self) -> std::io::Result<Option<String>> {
        match self {
            Either::Out(l) => l.next_line().await,
            Either::Err(l) => l.next_line().await,
        }
    }
}

/// SIGTERM to the child's group, SIGKILL after the grace if it is still there.
async fn stop_group(child: &mut Child) {
    let Some(pid) = child.id() else { return };
    let group = -(pid as i32);
    // SAFETY: kill takes no pointers; a group that is gone only makes it fail.
    unsafe {
        libc::kill(group, libc::SIGTERM);
    }
    if tokio::time::timeout(KILL_GRACE, child.wait())
        .await
        .is_err()
    {
        // SAFETY: as above.
        unsafe {
            libc::kill(group, libc::SIGKILL);
        }
        let _ = child.wait().await;
    }
}
