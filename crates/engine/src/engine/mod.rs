//! The engine: jobs and backends in memory beside the store, and the one way a job
//! changes (`apply`). This module holds the `Engine` handle and its state; what it does is
//! in the modules below, each an `impl Engine` of its own: `start` (start-up, recovery,
//! backends added and leased), `ledger` (the only writer of jobs, and what it publishes),
//! `scheduler` (queued jobs to idle backends), `health` (blocks, breakers, drains),
//! `outlook` (what routing says of a job, for submit and for views), `stats` (node
//! history, adaptive limits, slow backends) and `leases` (the farm's coordinators).

mod health;
mod leases;
mod ledger;
mod outlook;
mod queue;
mod registry;
mod scheduler;
mod start;
mod stats;

use gantry_core::profile::ProfileBuilder;
use gantry_core::{Job, JobId, Millis, Policy, Refused};
use gantry_store::stats::NodeStats;
use gantry_store::Store;
use indexmap::IndexMap;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::outputs::ContentStore;

pub use crate::clock::now_ms;

use queue::{QueueIndex, QueueKey};
pub use registry::{BackendState, Connection};
pub use stats::Suggestion;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] gantry_store::Error),
    #[error("no job {0}")]
    NotFound(JobId),
    #[error("{0}")]
    Agent(String),
    #[error("{0}")]
    Http(String),
}

impl Error {
    /// The write was refused because this coordinator's lease on the backend is gone.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Store(gantry_store::Error::Fenced { .. }))
    }
}

/// Where the outcome of `apply` left things.
#[derive(Debug)]
pub enum Applied {
    Changed(Job),
    Refused(Refused, Job),
}

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    bus: Bus,
    policy: Policy,
    config: Config,
    outputs: ContentStore,
    attachments: ContentStore,
    http: reqwest::Client,
    backends: Mutex<IndexMap<String, BackendState>>,
    queue: Mutex<QueueIndex>,
    /// When the scheduler last looked at every queued job (timeouts, unroutable jobs).
    last_sweep: Mutex<Millis>,
    /// Wakes the scheduler: a job was queued, a backend freed, a capability learned.
    wake: Notify,
    shutdown: CancellationToken,
    /// With several coordinators on Postgres: leases and the event tail.
    cluster: Option<Cluster>,
    /// Drivers of backends added at run time, joined at shutdown.
    late: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// What the drivers heard of each live attempt, made into its profile when the
    /// attempt ends (`apply`).
    profiles: Mutex<HashMap<(JobId, u32), ProfileBuilder>>,
    /// Node samples of finished attempts, for the stats writer (`stats_loop`).
    stats: mpsc::UnboundedSender<Vec<gantry_store::stats::NodeSample>>,
    /// Node durations by (class, backend), for adaptive stall limits: the store's last
    /// week at start, then what this coordinator sees.
    history: Mutex<HashMap<(String, String), NodeStats>>,
    /// (class, backend) pairs much slower than the farm (`SLOW_FACTOR` x its p50), kept
    /// by the stats writer; the scheduler uses those backends last.
    slow: Mutex<HashSet<(String, String)>>,
    /// Where each running job is (node, step), as last heard; for `/v1/state` and the
    /// backends' rows.
    progress: Mutex<HashMap<JobId, gantry_api::Progress>>,
    /// Wakes the monitor's backend feed (`monitor::backend_feed`).
    changed: Notify,
    /// Terminal jobs and progress for the webhook deliverer (`callbacks::run`).
    callbacks: mpsc::UnboundedSender<crate::hooks::Notice>,
    /// Their receiving end, until the deliverer takes it (`take_notices`); what is sent
    /// before waits in the channel.
    notices: Mutex<Option<mpsc::UnboundedReceiver<crate::hooks::Notice>>>,
    /// Running jobs whose callback asks for progress.
    progress_hooks: Mutex<HashMap<JobId, Arc<gantry_core::Callback>>>,
    /// Agents' listeners and links.
    agents: crate::agents::Agents,
}

impl Engine {
    pub(crate) fn lock_late(&self) -> MutexGuard<'_, Vec<tokio::task::JoinHandle<()>>> {
        self.inner.late.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for the drivers of run-time backends (after shutdown was asked).
    pub async fn join_late(&self) {
        let handles = std::mem::take(&mut *self.lock_late());
        for h in handles {
            if let Err(e) = h.await {
                tracing::error!(error = %e, "a backend's driver ended abnormally");
            }
        }
    }

    pub(crate) fn lock_profiles(&self) -> MutexGuard<'_, HashMap<(JobId, u32), ProfileBuilder>> {
        self.inner
            .profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_slow(&self) -> MutexGuard<'_, HashSet<(String, String)>> {
        self.inner.slow.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `backend` is judged much slower than the farm for `class`.
    pub fn is_slow(&self, class: &str, backend: &str) -> bool {
        self.lock_slow()
            .contains(&(class.to_owned(), backend.to_owned()))
    }

    pub(crate) fn lock_history(&self) -> MutexGuard<'_, HashMap<(String, String), NodeStats>> {
        self.inner.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The notices for the webhook deliverer: terminal jobs committed here and progress
    /// of jobs whose callback asks for it. Given once.
    pub fn take_notices(&self) -> Option<mpsc::UnboundedReceiver<crate::hooks::Notice>> {
        self.inner
            .notices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn agents(&self) -> &crate::agents::Agents {
        &self.inner.agents
    }

    /// Jobs' input files, shared by every coordinator that shares the artifacts folder.
    pub fn attachments(&self) -> &ContentStore {
        &self.inner.attachments
    }

    pub fn outputs(&self) -> &ContentStore {
        &self.inner.outputs
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    pub fn backends(&self) -> MutexGuard<'_, IndexMap<String, BackendState>> {
        // A panic while holding this lock is a bug elsewhere; the data is still usable.
        self.inner
            .backends
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn queue(&self) -> MutexGuard<'_, QueueIndex> {
        self.inner
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many jobs wait in the queue.
    /// Jobs in this coordinator's queue index by priority, highest first.
    pub fn queue_depths(&self) -> Vec<(i32, u64)> {
        let mut by: BTreeMap<Reverse<i32>, u64> = BTreeMap::new();
        for (_, key, _) in self.queue().keys.values() {
            *by.entry(key.0).or_default() += 1;
        }
        by.into_iter().map(|(p, n)| (p.0, n)).collect()
    }

    pub fn queue_len(&self) -> usize {
        self.queue().len()
    }

    pub fn wake_scheduler(&self) {
        self.inner.wake.notify_one();
        self.inner.changed.notify_one();
    }

    /// Something about the backends may have changed: the monitor's feed looks.
    pub fn backends_changed(&self) {
        self.inner.changed.notify_one();
    }

    pub fn changed(&self) -> &Notify {
        &self.inner.changed
    }

    /// A backend not heard from for this long is `stale`.
    pub fn stale_after_ms(&self) -> Millis {
        2 * self.inner.config.liveness.as_millis() as Millis
    }

    pub(crate) fn lock_progress(&self) -> MutexGuard<'_, HashMap<JobId, gantry_api::Progress>> {
        self.inner
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Where the running job is, as last heard.
    pub fn progress_of(&self, job: &JobId) -> Option<gantry_api::Progress> {
        self.lock_progress().get(job).cloned()
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        self.inner.cluster.as_ref()
    }
}
