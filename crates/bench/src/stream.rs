//! The farm's event stream (`/v1/events`) as the benchmarks follow it: each job event
//! with when it arrived, followed until jobs end.

use crate::time::now_us;
use anyhow::{bail, Context};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// One event of `/v1/events`, with when it arrived (wall µs).
#[derive(Debug)]
pub struct StreamEvent {
    pub kind: String,
    pub data: Value,
    pub at_us: i64,
}

/// Follow `/v1/events?since=SINCE`, delivering each job event as it arrives.
pub async fn follow_events(
    http: &reqwest::Client,
    server: &str,
    since: i64,
) -> anyhow::Result<mpsc::UnboundedReceiver<StreamEvent>> {
    let mut resp = http
        .get(format!("{server}/v1/events?since={since}"))
        .send()
        .await?
        .error_for_status()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let server = server.to_owned();
    tokio::spawn(async move {
        let mut buf = String::new();
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                // The receiver sees the stream end; the reason goes to stderr, as nothing
                // else would say it.
                Err(e) => {
                    eprintln!("bench: the event stream of {server} broke: {e}");
                    break;
                }
            };
            let at_us = now_us();
            buf.push_str(&String::from_utf8_lossy(&chunk));
            // One pass over what came (a chunk may hold many events), then one drain:
            // shifting the buffer after every event would cost its length each time.
            let mut start = 0;
            while let Some(rel) = buf[start..].find("\n\n") {
                let block = &buf[start..start + rel];
                start += rel + 2;
                // Only job events (the ones with an `id`) are wanted here: backend rows
                // and progress are skipped unparsed, so the client's cost stays that of
                // the events it measures.
                if !block.lines().any(|l| l.starts_with("id:")) {
                    continue;
                }
                let mut kind = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                // Delivered all the same (as null), so counts by kind stay whole; said on
                // stderr, since a server that sends such an event is broken.
                let data = serde_json::from_str(&data).unwrap_or_else(|e| {
                    eprintln!("bench: a {kind} event of {server} is not JSON ({e}): {data}");
                    Value::Null
                });
                if tx.send(StreamEvent { kind, data, at_us }).is_err() {
                    return;
                }
            }
            buf.drain(..start);
        }
    });
    Ok(rx)
}

/// A job's terminal event kinds.
pub fn is_terminal(kind: &str) -> bool {
    matches!(kind, "succeeded" | "failed" | "cancelled")
}

/// What an event stream said until every job of `ids` was terminal.
pub struct UntilTerminal {
    /// Every event, in arrival order.
    pub log: Vec<StreamEvent>,
    /// The jobs of `ids` that reached a terminal state.
    pub done: HashSet<String>,
    /// `timeout` passed before they all did.
    pub timed_out: bool,
}

/// Read `events` until every job of `ids` is terminal or `timeout` has passed.
pub async fn follow_until_terminal(
    events: &mut mpsc::UnboundedReceiver<StreamEvent>,
    ids: &[String],
    timeout: Duration,
) -> anyhow::Result<UntilTerminal> {
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut followed = UntilTerminal {
        log: Vec::new(),
        done: HashSet::new(),
        timed_out: false,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    while followed.done.len() < wanted.len() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) => {
                if is_terminal(&e.kind) {
                    if let Some(job) = e.data["job_id"].as_str().filter(|j| wanted.contains(j)) {
                        followed.done.insert(job.to_owned());
                    }
                }
                followed.log.push(e);
            }
            Ok(None) => bail!("the server's event stream ended"),
            Err(_) => {
                followed.timed_out = true;
                break;
            }
        }
    }
    Ok(followed)
}

/// Terminal events and prompt ids by job, filled from `/v1/events`.
#[derive(Default)]
pub struct Tracker {
    waiting: HashMap<String, oneshot::Sender<(bool, i64)>>,
    done: HashMap<String, (bool, i64)>,
    pub prompt_of: HashMap<String, String>,
    /// When each job's `dispatched` event arrived (wall µs).
    pub dispatched_us: HashMap<String, i64>,
}

impl Tracker {
    /// Route events until the stream ends.
    pub fn spawn(mut events: mpsc::UnboundedReceiver<StreamEvent>) -> Arc<Mutex<Tracker>> {
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let t = tracker.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                let Some(job) = e.data["job_id"].as_str().map(str::to_owned) else {
                    continue;
                };
                let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                match e.kind.as_str() {
                    "dispatched" => {
                        t.dispatched_us.entry(job.clone()).or_insert(e.at_us);
                        if let Some(pid) = e.data["prompt_id"].as_str() {
                            t.prompt_of.insert(job, pid.to_owned());
                        }
                    }
                    "succeeded" | "failed" | "cancelled" => {
                        let outcome = (e.kind == "succeeded", e.at_us);
                        match t.waiting.remove(&job) {
                            Some(tx) => {
                                // Refused only when its waiter is gone: no one to tell.
                                let _ = tx.send(outcome);
                            }
                            None => {
                                t.done.insert(job, outcome);
                            }
                        }
                    }
                    _ => {}
                }
            }
        });
        tracker
    }

    /// Wait for `job`'s terminal event: (succeeded, when it arrived).
    pub async fn wait(tracker: &Mutex<Tracker>, job: &str) -> anyhow::Result<(bool, i64)> {
        let rx = {
            let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(done) = t.done.remove(job) {
                return Ok(done);
            }
            let (tx, rx) = oneshot::channel();
            t.waiting.insert(job.to_owned(), tx);
            rx
        };
        rx.await.context("the event stream ended")
    }
}
