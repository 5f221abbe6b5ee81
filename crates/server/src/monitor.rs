//! What the web monitor reads: backend status from live facts, the farm snapshot of
//! `GET /v1/state`, and the feed that puts a backend's row on the event stream whenever
//! what it shows changes (seed 002: a page must never show a status reported once and
//! never refreshed).

use crate::api::views::backend_rows;
use crate::bus::{BusEvent, Published};
use crate::clock::now_ms;
use crate::clock::rfc3339;
use crate::engine::Engine;
use gantry_api as wire;
use gantry_core::{Job, JobState, Millis};
use gantry_store::JobFilter;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

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
