//! The moving parts of a chaos run: the load (submitters in a closed loop, each submit
//! retried with its idempotency key until a coordinator acknowledges it), the follower
//! of the farm's event stream across the kills, and the operator who mends hanging
//! workers; and the progress they share.

use super::farm::set_faults;
use super::plan::{HANG_MIX, MIXES};
use crate::time::now_us;
use anyhow::{bail, Context};
use serde_json::Value;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A submit answered 2xx.
#[derive(Clone, Debug)]
pub(super) struct Acked {
    pub(super) id: String,
    pub(super) at_us: i64,
}

/// What the follower, the submitters and the controller share.
pub(super) struct Shared {
    /// Each coordinator's URL while it serves.
    pub(super) urls: Mutex<Vec<Option<String>>>,
    pub(super) progress: Mutex<Progress>,
    /// Bumped on every change of `progress`, for those waiting on it.
    pub(super) changed: watch::Sender<u64>,
}

#[derive(Default)]
pub(super) struct Progress {
    /// Submits begun.
    pub(super) taken: usize,
    pub(super) acked: Vec<Option<Acked>>,
    pub(super) n_acked: usize,
    /// Jobs whose terminal event was seen.
    pub(super) terminal: HashSet<String>,
    pub(super) succeeded: usize,
    /// Every persisted event's number, as the follower read them.
    pub(super) seqs: Vec<i64>,
    /// Times the follower opened the stream again after losing it.
    pub(super) resumes: usize,
    pub(super) last_end: Option<Instant>,
}

impl Shared {
    // A lock poisoned by a panicking holder still holds whole values (each write is one
    // assignment), so every lock here is taken with `into_inner` rather than skipped: a
    // skipped one lost a coordinator's URL, and the submitters then waited for ever.
    pub(super) fn live_urls(&self) -> Vec<String> {
        let urls = self.urls.lock().unwrap_or_else(|e| e.into_inner());
        urls.iter().flatten().cloned().collect()
    }

    pub(super) fn set_url(&self, i: usize, url: Option<String>) {
        self.urls.lock().unwrap_or_else(|e| e.into_inner())[i] = url;
    }

    pub(super) fn update<T>(&self, f: impl FnOnce(&mut Progress) -> T) -> T {
        let out = {
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut p)
        };
        self.changed.send_modify(|n| *n += 1);
        out
    }

    /// `update` without waking those who wait.
    pub(super) fn quiet<T>(&self, f: impl FnOnce(&mut Progress) -> T) -> T {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p)
    }

    pub(super) fn read<T>(&self, f: impl FnOnce(&Progress) -> T) -> T {
        let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        f(&p)
    }

    /// Wait until `ready` holds, or until no job has ended for `limit` (the run stopped
    /// moving): answers whether it holds.
    pub(super) async fn wait_moving(
        &self,
        limit: Duration,
        ready: impl Fn(&Progress) -> bool,
    ) -> bool {
        let mut rx = self.changed.subscribe();
        let begun = Instant::now();
        loop {
            if self.read(&ready) {
                return true;
            }
            let moved = self.read(|p| p.last_end).map_or(begun, |t| t.max(begun));
            let deadline = moved + limit;
            if Instant::now() >= deadline {
                return false;
            }
            if let Ok(Err(_)) = tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                return self.read(&ready);
            }
        }
    }

    /// Wait until `ready` holds or `deadline` passes: answers whether it holds.
    pub(super) async fn wait_until(
        &self,
        deadline: Instant,
        ready: impl Fn(&Progress) -> bool,
    ) -> bool {
        let mut rx = self.changed.subscribe();
        loop {
            if self.read(&ready) {
                return true;
            }
            match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.read(&ready),
            }
        }
    }
}

/// Send the next job while fewer than `window` are outstanding, until all are
/// acknowledged; each submit goes to a live coordinator and is sent again, with the
/// same idempotency key, until one answers 2xx with an id.
pub(super) async fn submit_loop(
    shared: Arc<Shared>,
    bodies: Arc<Vec<Value>>,
    seed: u64,
    window: usize,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut turn = seed as usize;
    loop {
        let mut rx = shared.changed.subscribe();
        let i = loop {
            // Taking a job changes nothing anyone waits on: no wake-up (one would wake
            // the other submitters, which would wake this one, and so on).
            let taken = shared.quiet(|p| {
                if p.taken < bodies.len() && p.taken - p.terminal.len().min(p.taken) < window {
                    p.taken += 1;
                    Some(Some(p.taken - 1))
                } else if p.taken >= bodies.len() {
                    Some(None)
                } else {
                    None
                }
            });
            match taken {
                Some(Some(i)) => break i,
                Some(None) => return Ok(()),
                None => {
                    tokio::select! {
                        _ = rx.changed() => {}
                        _ = stop.cancelled() => return Ok(()),
                    }
                }
            }
        };
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let urls = shared.live_urls();
            turn = turn.wrapping_add(1);
            let Some(url) = urls.get(turn % urls.len().max(1)) else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let answer = match http
                .post(format!("{url}/v1/jobs"))
                .json(&bodies[i])
                .send()
                .await
            {
                // No answer, or a body cut short by a coordinator dying under it: the
                // submit may or may not have been taken, so it is sent again with the same
                // idempotency key, which answers the same job if it was.
                Ok(r) => {
                    let status = r.status();
                    r.json::<Value>().await.ok().map(|v| (status, v))
                }
                Err(_) => None,
            };
            match answer {
                Some((status, v)) if status.is_success() => {
                    let id = v["id"]
                        .as_str()
                        .with_context(|| format!("a {status} answer without an id: {v}"))?
                        .to_owned();
                    let at_us = now_us();
                    shared.update(|p| {
                        p.acked[i] = Some(Acked { id, at_us });
                        p.n_acked += 1;
                    });
                    break;
                }
                // The store is unreachable, or the coordinator died under the request.
                Some((status, _)) if status.as_u16() == 503 => {}
                None => {}
                Some((status, v)) => bail!("submit of job {i} refused: {status} {v}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Follow the farm's event stream on whichever coordinator is up, resuming after the
/// last event read (`since=`) whenever the stream is lost; count what ended and tell
/// the operator of timeouts on a backend that hangs.
pub(super) async fn follow(
    http: reqwest::Client,
    shared: Arc<Shared>,
    hang_backends: HashSet<String>,
    hang: mpsc::UnboundedSender<String>,
    stop: CancellationToken,
) {
    let mut turn = 0usize;
    let mut opened = false;
    while !stop.is_cancelled() {
        let urls = shared.live_urls();
        turn = turn.wrapping_add(1);
        let Some(url) = urls.get(turn % urls.len().max(1)) else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let since = shared.read(|p| p.seqs.last().copied().unwrap_or(0));
        let resp = http
            .get(format!("{url}/v1/events?since={since}"))
            .send()
            .await
            .and_then(|r| r.error_for_status());
        // A coordinator being killed or restarted answers nothing: try the next one.
        let Ok(mut resp) = resp else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if opened {
            shared.update(|p| p.resumes += 1);
        }
        opened = true;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let chunk = tokio::select! {
                c = resp.chunk() => c,
                _ = stop.cancelled() => return,
            };
            // Lost (a kill), or ended: open it again after the last event read.
            let Ok(Some(chunk)) = chunk else { break };
            buf.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(rel) = buf[start..].windows(2).position(|w| w == b"\n\n") {
                let block = String::from_utf8_lossy(&buf[start..start + rel]).into_owned();
                start += rel + 2;
                on_block(&shared, &block, &hang_backends, &hang);
            }
            buf.drain(..start);
        }
    }
}

/// One SSE frame of the farm's stream: only persisted job events (with an `id`) count.
fn on_block(
    shared: &Shared,
    block: &str,
    hang_backends: &HashSet<String>,
    hang: &mpsc::UnboundedSender<String>,
) {
    let mut seq = None;
    let mut kind = "";
    let mut data = String::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            seq = v.trim().parse::<i64>().ok();
        } else if let Some(v) = line.strip_prefix("event:") {
            kind = v.trim();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    // Without an id (or with one that is not a number) it is not a persisted event; one
    // the server meant as such shows up in `check` as missing from the stream.
    let Some(seq) = seq else { return };
    // Counted all the same (its number is in the stream), and said on stderr.
    let v: Value = serde_json::from_str(&data).unwrap_or_else(|e| {
        eprintln!("chaos: event {seq} ({kind}) is not JSON ({e}): {data}");
        Value::Null
    });
    let job = v["job_id"].as_str().unwrap_or_default().to_owned();
    if kind == "attempt_failed"
        && v["error"]["code"] == "timeout"
        && hang_backends.contains(v["backend"].as_str().unwrap_or_default())
    {
        // Refused only once the operator is gone, which happens when it panicked: the
        // run reports that when it joins it.
        let _ = hang.send(v["backend"].as_str().unwrap_or_default().to_owned());
    }
    shared.update(|p| {
        p.seqs.push(seq);
        if matches!(kind, "succeeded" | "failed" | "cancelled") && p.terminal.insert(job) {
            p.last_end = Some(Instant::now());
            if kind == "succeeded" {
                p.succeeded += 1;
            }
        }
    });
}

/// The operator: when gantry reports a timeout on a backend whose worker hangs, it
/// restarts that simulator's worker (clears the hang, then arms it again). Answers how
/// many times it did.
pub(super) async fn operate(
    http: reqwest::Client,
    sims: Vec<String>,
    mut hangs: mpsc::UnboundedReceiver<String>,
) -> u64 {
    let mut mends = 0;
    while let Some(backend) = hangs.recv().await {
        let Some(url) = backend
            .strip_prefix('b')
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| sims.get(i))
        else {
            continue;
        };
        // A mend that fails leaves the worker hung, and its backend times out again:
        // the run goes on, but the operator says so.
        let mended = match set_faults(&http, url, &[]).await {
            Ok(()) => set_faults(&http, url, MIXES[HANG_MIX]).await,
            Err(e) => Err(e),
        };
        match mended {
            Ok(()) => mends += 1,
            Err(e) => eprintln!("chaos: cannot mend the hang of {backend} ({url}): {e:#}"),
        }
    }
    mends
}
