//! The agent's command runner: one program of a command job, started without a shell in
//! a process group of its own, its output read line by line, its time limit kept, and
//! the whole group killed (SIGTERM, the grace, SIGKILL) on cancel, on timeout and once
//! it exits, so nothing it started outlives it. The allow-list is checked here, on the
//! agent, whatever the coordinator asked.

use serde::Serialize;
use std::collections::VecDeque;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Lines of output kept for the result.
pub const TAIL_LINES: usize = 50;
/// A longer line is cut here (and still counts as one line).
const MAX_LINE: usize = 8 * 1024;

/// What to run, as the coordinator's `command` message gives it.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Spec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    pub timeout_ms: u64,
    pub grace_ms: u64,
}

/// Something the program did, as it happens.
#[derive(Debug)]
pub enum Event {
    Started { pid: u32 },
    Line { stream: &'static str, line: String },
}

/// How it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Exit {
    /// `exited`, `timed_out`, `cancelled`, `refused` (not allowed) or `spawn_failed`.
    pub outcome: &'static str,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub tail: Vec<String>,
    pub message: String,
    pub timeout_ms: u64,
    /// Lines the live stream lost (the link was slower than the program).
    pub dropped: u64,
}

/// Runs `spec` if `allow` names its program; `events` hears the start and each line.
/// `events` is bounded: a program that writes faster than the link carries loses lines
/// from the live stream (never from `Exit::tail`), counted in `Exit::dropped` and told
/// in a line of gantry's own once there is room again; the pipes are always drained, so
/// the program never blocks on its output.
pub async fn run(
    spec: &Spec,
    allow: &[String],
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
) -> Exit {
    let program = spec.argv.first().cloned().unwrap_or_default();
    let mut exit = Exit {
        timeout_ms: spec.timeout_ms,
        ..Exit::default()
    };
    if !allow.contains(&program) {
        exit.outcome = "refused";
        exit.message = if allow.is_empty() {
            format!("program {program:?} is not allowed: this agent runs no commands (start it with --allow PROGRAM)")
        } else {
            format!(
                "program {program:?} is not on this agent's allow-list ({})",
                allow.join(", ")
            )
        };
        return exit;
    }
    let mut cmd = Command::new(&program);
    cmd.args(&spec.argv[1..])
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that every process it starts is signalled with it.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            exit.outcome = "spawn_failed";
            exit.message = e.to_string();
            return exit;
        }
    };
    let Some(pid) = child.id() else {
        exit.outcome = "spawn_failed";
        exit.message = "the process ended before it could be followed".into();
        return exit;
    };
    // The first event on a fresh channel: it always fits, and a caller that stopped
    // listening needs no start.
    let _ = events.try_send(Event::Started { pid });
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(read_lines(out, "stdout", lines_tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(read_lines(err, "stderr", lines_tx));
    }
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let (mut dropped, mut untold) = (0u64, 0u64);
    let mut keep = |stream: &'static str, line: String| {
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.clone());
        if untold > 0 {
            let notice = format!("[gantry: {untold} lines not streamed: the link was slower than the program; the tail has the last ones]");
            match events.try_send(Event::Line {
                stream: "stderr",
                line: notice,
            }) {
                Ok(()) => untold = 0,
                Err(_) => {
                    dropped += 1;
                    untold += 1;
                    return;
                }
            }
        }
        if events.try_send(Event::Line { stream, line }).is_err() {
            dropped += 1;
            untold += 1;
        }
    };
    let limit = tokio::time::sleep(Duration::from_millis(spec.timeout_ms));
    tokio::pin!(limit);
    let grace = Duration::from_millis(spec.grace_ms);
    let status = loop {
        tokio::select! {
            Some((stream, line)) = lines.recv() => keep(stream, line),
            status = child.wait() => break status.ok(),
            _ = &mut limit => {
                exit.outcome = "timed_out";
                kill_group(pid, grace).await;
                break child.wait().await.ok();
            }
            _ = cancel.cancelled() => {
                exit.outcome = "cancelled";
                kill_group(pid, grace).await;
                break child.wait().await.ok();
            }
        }
    };
    // What it left running in its group goes with it.
    kill_group(pid, grace).await;
    // Lines still in the pipes, now closed (bounded: a process that left the group,
    // by setsid, may hold them open).
    let drained = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(drained);
    loop {
        tokio::select! {
            l = lines.recv() => match l {
                Some((stream, line)) => keep(stream, line),
                None => break,
            },
            _ = &mut drained => break,
        }
    }
    if exit.outcome.is_empty() {
        exit.outcome = "exited";
    }
    if let Some(status) = status {
        use std::os::unix::process::ExitStatusExt;
        exit.exit_code = status.code();
        exit.signal = status.signal();
    }
    exit.tail = tail.into();
    exit.dropped = dropped;
    exit
}

/// Whether any process of group `pgid` is alive. A zombie (dead, not yet reaped by
/// its parent) does not count: it runs nothing, yet `kill(-pgid, 0)` still finds it.
pub fn group_alive(pgid: u32) -> bool {
    // SAFETY: kill takes no pointers; signal 0 only checks.
    if unsafe { libc::kill(-(pgid as i32), 0) } != 0 {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    procs.flatten().any(|p| {
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            return false;
        };
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
        pgrp == Some(pgid) && state != Some("Z") && state != Some("X")
    })
}

/// SIGTERM to the group, then SIGKILL if any of it is left after `grace`. The group
/// id is the leader's pid, which stays unused while any member lives.
async fn kill_group(pgid: u32, grace: Duration) {
    if !group_alive(pgid) {
        return;
    }
    // SAFETY: as in `group_alive`.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGTERM);
    }
    let until = tokio::time::Instant::now() + grace;
    // Polled: no event says that every member of a group is gone.
    while group_alive(pgid) && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if group_alive(pgid) {
        // SAFETY: as above.
        unsafe {
            libc::kill(-(pgid as i32), libc::SIGKILL);
        }
        // SIGKILL cannot be refused; this only waits for the kernel to carry it out.
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while group_alive(pgid) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Sends each line of `r` (lossy UTF-8, cut at `MAX_LINE`) until it closes.
async fn read_lines(
    r: impl AsyncRead + Unpin,
    stream: &'static str,
    tx: mpsc::UnboundedSender<(&'static str, String)>,
) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    buf.pop();
                }
                buf.truncate(MAX_LINE);
                let line = String::from_utf8_lossy(&buf).into_owned();
                if tx.send((stream, line)).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str], timeout_ms: u64) -> Spec {
        Spec {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: [("GREETING".to_owned(), "hello".to_owned())].into(),
            cwd: None,
            timeout_ms,
            grace_ms: 2_000,
        }
    }

    fn allow(p: &[&str]) -> Vec<String> {
        p.iter().map(|a| a.to_string()).collect()
    }

    #[tokio::test]
    async fn a_program_off_the_allow_list_never_starts() {
        let (tx, mut rx) = mpsc::channel(1024);
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let s = spec(
            &["/bin/sh", "-c", &format!("touch {}", marker.display())],
            5_000,
        );
        let exit = run(&s, &allow(&["/bin/echo"]), tx, CancellationToken::new()).await;
        assert_eq!(exit.outcome, "refused");
        assert!(
            exit.message
                .contains("\"/bin/sh\" is not on this agent's allow-list (/bin/echo)"),
            "{}",
            exit.message
        );
        assert!(rx.try_recv().is_err(), "nothing started");
        assert!(!marker.exists());
        let (tx, _rx) = mpsc::channel(1024);
        let exit = run(&s, &[], tx, CancellationToken::new()).await;
        assert_eq!(exit.outcome, "refused");
        assert!(exit.message.contains("--allow"), "{}", exit.message);
    }

    #[tokio::test]
    async fn output_lines_and_the_exit_code_are_reported() {
        let (tx, mut rx) = mpsc::channel(1024);
        let s = spec(
            &[
                "/bin/sh",
                "-c",
                "echo $GREETING; echo oops >&2; printf 'no newline'; exit 3",
            ],
            5_000,
        );
        let exit = run(&s, &allow(&["/bin/sh"]), tx, CancellationToken::new()).await;
        assert_eq!((exit.outcome, exit.exit_code), ("exited", Some(3)));
        let mut tail = exit.tail.clone();
        tail.sort();
        assert_eq!(tail, ["hello", "no newline", "oops"]);
        let mut lines = Vec::new();
        while let Ok(e) = rx.try_recv() {
            if let Event::Line { stream, line } = e {
                lines.push(format!("{stream}: {line}"));
            }
        }
        lines.sort();
        assert_eq!(
            lines,
            ["stderr: oops", "stdout: hello", "stdout: no newline"]
        );
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let (tx, mut rx) = mpsc::channel(1024);
        // A child that ignores SIGTERM, and a grandchild: both must go.
        let s = spec(
            &["/bin/sh", "-c", "trap '' TERM; sleep 600 & sleep 600; wait"],
            300,
        );
        let exit = run(&s, &allow(&["/bin/sh"]), tx, CancellationToken::new()).await;
        assert_eq!(exit.outcome, "timed_out");
        let Some(Event::Started { pid }) = rx.recv().await else {
            panic!("no start")
        };
        assert!(!group_alive(pid), "a process of the group survived");
    }

    #[tokio::test]
    async fn a_cancel_kills_the_group_and_leftovers_go_at_exit() {
        let (tx, mut rx) = mpsc::channel(1024);
        let cancel = CancellationToken::new();
        let s = spec(&["/bin/sh", "-c", "sleep 600 & echo started; wait"], 60_000);
        let c = cancel.clone();
        let task = tokio::spawn(async move { run(&s, &allow(&["/bin/sh"]), tx, c).await });
        let Some(Event::Started { pid }) = rx.recv().await else {
            panic!("no start")
        };
        let Some(Event::Line { line, .. }) = rx.recv().await else {
            panic!("no line")
        };
        assert_eq!(line, "started");
        cancel.cancel();
        let exit = task.await.unwrap();
        assert_eq!(exit.outcome, "cancelled");
        assert!(!group_alive(pid));
        // A program that exits leaving a background process behind: it goes too.
        let (tx, mut rx) = mpsc::channel(1024);
        let s = spec(
            &["/bin/sh", "-c", "sleep 600 >/dev/null 2>&1 & exit 0"],
            60_000,
        );
        let exit = run(&s, &allow(&["/bin/sh"]), tx, CancellationToken::new()).await;
        assert_eq!((exit.outcome, exit.exit_code), ("exited", Some(0)));
        let Some(Event::Started { pid }) = rx.recv().await else {
            panic!("no start")
        };
        assert!(!group_alive(pid));
    }

    #[tokio::test]
    async fn a_flood_of_output_never_blocks_the_program_and_the_tail_stays_whole() {
        // Nobody reads the live stream while it runs: it fills, and lines are dropped.
        let (tx, mut rx) = mpsc::channel(16);
        let s = spec(
            &[
                "/bin/sh",
                "-c",
                "i=0; while [ $i -lt 5000 ]; do i=$((i+1)); echo line $i; done",
            ],
            60_000,
        );
        let exit = run(&s, &allow(&["/bin/sh"]), tx, CancellationToken::new()).await;
        assert_eq!((exit.outcome, exit.exit_code), ("exited", Some(0)));
        assert_eq!(exit.tail.len(), TAIL_LINES);
        assert_eq!(exit.tail.last().map(String::as_str), Some("line 5000"));
        let mut streamed = 0;
        while let Ok(e) = rx.try_recv() {
            if matches!(e, Event::Line { .. }) {
                streamed += 1;
            }
        }
        assert_eq!(
            streamed + exit.dropped,
            5000,
            "every line streamed or counted"
        );
        assert!(exit.dropped > 0);
    }
}
