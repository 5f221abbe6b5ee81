//! What the web monitor reads: backend status from live facts, the farm snapshot of
//! `GET /v1/state`, and the feed that puts a backend's row on the event stream whenever
//! what it shows changes (seed 002: a page must never show a status reported once and
//! never refreshed).

use crate::api::views::backend_rows;
use crate::bus::{BusEvent, Published};
use crate::clock::now_ms;
use crate::clock::rfc3339;
use crate::engine::{BackendState, Connection, Engine};
use gantry_api as wire;
use gantry_core::{Job, JobState, Millis};
use gantry_store::JobFilter;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// A backend's status from what is true of it now.
pub fn status_of(b: &BackendState, now: Millis, stale_after: Millis) -> wire::BackendStatus {
    use wire::BackendStatus as S;
    let heard_lately = b.last_seen.is_some_and(|t| now - t <= stale_after);
    match (b.connection, &b.current) {
        _ if b.stuck.is_some() => S::Stuck,
        (_, Some(_)) if b.draining => S::Draining,
        _ if b.draining => S::Drained,
        // An agent's supervised ComfyUI keeps exiting: why it cannot be reached.
        (Connection::Connecting | Connection::Offline, _) if b.crash_looping => S::CrashLooping,
        (Connection::Connecting, _) => S::Connecting,
        // Never reached yet from here, while this coordinator drives it: still coming up,
        // as far as anyone knows. (One driven by another coordinator is offline here.)
        (Connection::Offline, _) if !b.connected_once && b.lease.is_some() => S::Connecting,
        (Connection::Offline, _) => S::Offline,
        (Connection::Connected, _) if !b.health.accepts_work() => S::Unhealthy,
        (Connection::Connected, _) if !heard_lately => S::Stale,
        (Connection::Connected, Some(_)) => S::Busy,
        (Connection::Connected, None) if b.health.blocks().values().any(|until| *until > now) => {
            S::Blocked
        }
        (Connection::Connected, None) => S::Idle,
    }
}

/// How often the feed looks even when nothing woke it (a backend turns `stale`, a
/// block ends, with no other change).
const FEED_TICK: Duration = Duration::from_millis(250);
/// The least time between two looks: a busy farm's changes are coalesced into one row
/// per backend per look (a row a tenth of a second late is no matter to a person; one
/// per change, sent to every open stream, is).
const FEED_MIN_GAP: Duration = Duration::from_millis(100);
/// `last_seen` alone is re-sent at most this often per backend.
const SEEN_EVERY_MS: Millis = 2000;

/// Publish a backend's whole row whenever what a monitor shows of it changes (progress
/// aside, which has its own events), and its `last_seen` every `SEEN_EVERY_MS` while it
/// is heard from.
pub async fn backend_feed(engine: Engine) {
    let mut sent: HashMap<String, (wire::Backend, Option<Millis>)> = HashMap::new();
    loop {
        tokio::select! {
            _ = engine.shutdown_token().cancelled() => return,
            _ = engine.changed().notified() => {}
            _ = tokio::time::sleep(FEED_TICK) => {}
        }
        for (row, seen) in backend_rows(&engine) {
            let mut key = row.clone();
            key.last_seen = None;
            key.progress = None;
            let fresh = match sent.get(&row.name) {
                Some((k, s)) => {
                    *k != key || seen.is_some_and(|t| s.is_none_or(|s| t - s >= SEEN_EVERY_MS))
                }
                None => true,
            };
            if fresh {
                sent.insert(row.name.clone(), (key, seen));
                engine
                    .bus()
                    .publish(BusEvent::BackendState(Arc::new(Published::new(row))));
            }
        }
        tokio::time::sleep(FEED_MIN_GAP).await;
    }
}

/// A job as a monitor's row shows it.
pub fn summary(engine: &Engine, job: &Job) -> wire::JobSummary {
    wire::JobSummary {
        id: job.id.to_string(),
        state: job.state,
        priority: job.spec.priority,
        workflow_hash: job.spec.workflow.shape_hash(),
        created_at: rfc3339(job.created_at),
        updated_at: rfc3339(job.updated_at),
        backend: job.attempts.last().map(|a| a.backend.clone()),
        attempts: job.attempts.len() as u32,
        error: job.error.clone(),
        duration_ms: job
            .state
            .is_terminal()
            .then(|| job.updated_at - job.created_at),
        progress: (job.state == JobState::Running)
            .then(|| engine.progress_of(&job.id))
            .flatten(),
    }
}

/// Running jobs a snapshot lists at most.
const RUNNING: u32 = 1000;

/// The farm now, consistent with the event stream from its `seq`: the jobs are read
/// between two readings of the newest event number that agree (three tries; under a
/// steady stream of commits the last try's first reading is given, so a client may see
/// again an event the snapshot already shows, never miss one).
pub async fn farm_state(engine: &Engine) -> Result<wire::FarmState, gantry_store::Error> {
    let store = engine.store();
    let mut tries = 0;
    let (seq, counts, running, mut recent, queued) = loop {
        tries += 1;
        let before = store.last_seq().await?;
        let counts = store.count_by_state().await?;
        let running = store
            .list_jobs(&JobFilter {
                state: Some(JobState::Running),
                limit: RUNNING,
                before: None,
            })
            .await?
            .jobs;
        let queued = store
            .list_jobs(&JobFilter {
                state: Some(JobState::Queued),
                limit: wire::FarmState::RECENT as u32,
                before: None,
            })
            .await?
            .jobs;
        let mut recent = Vec::new();
        for state in [JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
            let page = store
                .list_jobs(&JobFilter {
                    state: Some(state),
                    limit: wire::FarmState::RECENT as u32,
                    before: None,
                })
                .await?;
            recent.extend(page.jobs);
        }
        let after = store.last_seq().await?;
        if after == before || tries == 3 {
            break (before, counts, running, recent, queued);
        }
    };
    recent.sort_by_key(|j| std::cmp::Reverse((j.updated_at, j.created_at)));
    recent.truncate(wire::FarmState::RECENT);
    let counts: BTreeMap<String, u64> = counts
        .into_iter()
        .map(|(s, n)| (s.as_str().to_owned(), n))
        .collect();
    let queue = engine
        .queue_depths()
        .into_iter()
        .map(|(priority, count)| wire::PriorityDepth { priority, count })
        .collect();
    Ok(wire::FarmState {
        seq,
        at: rfc3339(now_ms()),
        backends: backend_rows(engine).into_iter().map(|(b, _)| b).collect(),
        queue,
        queued: counts.get("queued").copied().unwrap_or(0),
        queued_jobs: queued.iter().map(|j| summary(engine, j)).collect(),
        running: running.iter().map(|j| summary(engine, j)).collect(),
        recent: recent.iter().map(|j| summary(engine, j)).collect(),
        counts,
        stale_after_ms: engine.stale_after_ms() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    fn backend() -> BackendState {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let config = BackendConfig::parse("a=http://127.0.0.1:1").expect("a backend spec");
        let mut b = BackendState::new(config, tx);
        b.connection = Connection::Connected;
        b.connected_once = true;
        b.last_seen = Some(1_000);
        b
    }

    #[test]
    fn status_comes_from_live_facts() {
        use wire::BackendStatus as S;
        let mut b = backend();
        assert_eq!(status_of(&b, 1_500, 1_000), S::Idle);
        // Nothing heard for longer than the interval: stale, whatever it said last.
        assert_eq!(status_of(&b, 2_001, 1_000), S::Stale);
        b.last_seen = Some(2_000);
        let policy = gantry_core::health::HealthPolicy {
            block_ms: 3_000,
            circuit_threshold: 0,
            ..Default::default()
        };
        b.health.on_fault(Some("shape"), 2_000, &policy);
        assert_eq!(status_of(&b, 2_500, 1_000), S::Blocked);
        // A block that has ended no longer counts, lifted yet or not.
        b.last_seen = Some(5_000);
        assert_eq!(status_of(&b, 5_001, 1_000), S::Idle);
        b.current = Some((gantry_core::JobId::random(), 1));
        b.health.on_fault(Some("shape"), 5_000, &policy);
        // Busy with blocks beside it shows busy (the blocks are in the row).
        assert_eq!(status_of(&b, 5_500, 1_000), S::Busy);
        b.draining = true;
        assert_eq!(status_of(&b, 5_500, 1_000), S::Draining);
        b.draining = false;
        b.connection = Connection::Offline;
        assert_eq!(status_of(&b, 5_500, 1_000), S::Offline);
        b.connection = Connection::Connecting;
        assert_eq!(status_of(&b, 5_500, 1_000), S::Connecting);
        // Not reached once yet: a failed connect is no reason to say it went away.
        b.connection = Connection::Offline;
        b.connected_once = false;
        assert_eq!(status_of(&b, 5_500, 1_000), S::Connecting);
    }
}
