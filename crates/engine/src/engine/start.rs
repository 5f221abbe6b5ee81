//! Starting the engine: drivers for the configured backends, recovery of the jobs a
//! previous run left running, the loops; backends added at run time or leased.

use super::registry::{BackendState, Connection};
use super::{Engine, Error, Inner, QueueIndex};
use gantry_core::{Input, Job, Policy};
use gantry_store::stats::NodeStats;
use gantry_store::Store;
use indexmap::IndexMap;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::backend::protocol::{Assignment, Command};
use crate::backend::{self, Kind};
use crate::bus::Bus;
use crate::cluster::Cluster;
use crate::config::{BackendConfig, Config};
use crate::outputs::ContentStore;

pub use crate::clock::now_ms;

impl Engine {
    /// Start the engine: one driver per configured backend, reconciliation of the jobs a
    /// previous run left running, and the scheduler.
    pub async fn start(
        config: Config,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Result<Engine, Error> {
        Engine::start_with(config, store, None, shutdown, tasks).await
    }

    /// As `start`; with a `cluster`, backends are driven only while this coordinator
    /// holds their lease (`cluster.rs`), and the event tail publishes every event.
    pub async fn start_with(
        mut config: Config,
        store: Arc<dyn Store>,
        cluster: Option<Cluster>,
        shutdown: CancellationToken,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Result<Engine, Error> {
        // Agents known from before get their listeners first, so that their running jobs
        // are recovered onto them and adopted once the agent is back.
        let agents = crate::agents::Agents::default();
        for b in &mut config.backends {
            if b.url.starts_with(crate::config::AGENT_SCHEME) {
                let id = crate::agents::stored_id(&b.url);
                b.url = agents
                    .reserve(&b.name, id, &shutdown)
                    .await
                    .map_err(|e| Error::Agent(format!("agent {}: {e}", b.name)))?;
            }
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Http(format!("cannot make the HTTP client for backends: {e}")))?;
        let policy = Policy {
            backoff_base_ms: config.backoff_base.as_millis() as u64,
            backoff_max_ms: config.backoff_max.as_millis() as u64,
        };
        let mut receivers = Vec::new();
        let mut backends = IndexMap::new();
        for b in &config.backends {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut state = BackendState::new(b.clone(), tx);
            if cluster.is_some() {
                // Driven once its lease is taken.
                state.lease = None;
                state.connection = Connection::Offline;
            } else {
                receivers.push((b.name.clone(), rx));
            }
            backends.insert(b.name.clone(), state);
        }
        let (stats_tx, stats_rx) = mpsc::unbounded_channel();
        let (callbacks_tx, callbacks_rx) = mpsc::unbounded_channel();
        let engine = Engine {
            inner: Arc::new(Inner {
                callbacks: callbacks_tx,
                notices: Mutex::new(Some(callbacks_rx)),
                progress_hooks: Mutex::new(HashMap::new()),
                agents,
                late: Mutex::new(Vec::new()),
                profiles: Mutex::new(HashMap::new()),
                stats: stats_tx,
                history: Mutex::new(HashMap::new()),
                slow: Mutex::new(HashSet::new()),
                progress: Mutex::new(HashMap::new()),
                changed: Notify::new(),
                store,
                bus: Bus::new(4096),
                policy,
                outputs: ContentStore::outputs(
                    config.artifacts.as_deref().unwrap_or(&config.data_dir),
                ),
                attachments: ContentStore::attachments(
                    config.artifacts.as_deref().unwrap_or(&config.data_dir),
                ),
                config,
                http,
                backends: Mutex::new(backends),
                queue: Mutex::new(QueueIndex::default()),
                last_sweep: Mutex::new(0),
                wake: Notify::new(),
                shutdown,
                cluster,
            }),
        };
        // Jobs left running by a previous process go back to their backend's driver,
        // which reconciles them with the backend before anything new is dispatched there.
        // The attempt already executing on a backend is adopted first, as its `current`.
        // With leases, each backend's jobs are recovered when its lease is taken.
        if engine.inner.cluster.is_none() {
            let running = engine.inner.store.running_jobs().await?;
            engine.recover_all(running).await?;
        }
        {
            let queued = engine.inner.store.queued_jobs(u32::MAX).await?;
            let global = engine.inner.config.timeouts.clone();
            let mut queue = engine.queue();
            for job in &queued {
                queue.note(job, &global);
            }
        }
        for (name, rx) in receivers {
            if let Some(kind) = engine.kind_of(&name) {
                let stop = engine.inner.shutdown.clone();
                let driver = backend::spawn(engine.clone(), name, kind, rx, stop);
                tasks.spawn(async move {
                    if let Err(e) = driver.await {
                        tracing::error!(error = %e, "a backend's driver failed");
                    }
                });
            }
        }
        if engine.inner.cluster.is_some() {
            let e = engine.clone();
            tasks.spawn(async move { crate::cluster::loops::lease_loop(e).await });
            let e = engine.clone();
            tasks.spawn(async move { crate::cluster::loops::tail_loop(e).await });
        }
        let e = engine.clone();
        tasks.spawn(async move { e.schedule().await });
        let e = engine.clone();
        tasks.spawn(async move { e.stats_loop(stats_rx).await });
        {
            let week = gantry_store::stats::StatsFilter {
                since: Some(now_ms() - 7 * 24 * 3_600_000),
                ..Default::default()
            };
            let rows = engine.inner.store.node_stats(&week).await?;
            let mut history = engine.lock_history();
            for row in rows {
                history
                    .entry((row.class.clone(), row.backend.clone()))
                    .or_insert_with(|| NodeStats::empty(&row.class, "", &row.backend, 0))
                    .merge(&row);
            }
        }
        if !engine.inner.config.retention.is_zero()
            || !engine.inner.config.stats_retention.is_zero()
        {
            let e = engine.clone();
            tasks.spawn(async move { e.purge_loop().await });
        }
        Ok(engine)
    }

    /// The kind of backend `name` is (`backend::Kind::of` its configuration).
    pub fn kind_of(&self, name: &str) -> Option<Kind> {
        self.backends()
            .get(name)
            .map(|b| Kind::of(&b.config, b.agent))
    }

    /// Drive a backend added at run time (already kept in the store): with the embedded
    /// store its driver starts now; in a farm it is one more backend to lease. False when
    /// one of that name is known.
    pub fn add_backend(&self, config: BackendConfig) -> bool {
        let name = config.name.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut backends = self.backends();
            if backends.contains_key(&name) {
                return false;
            }
            let mut state = BackendState::new(config, tx);
            state.programs = self.agents().programs_of(&name);
            state.agent = self.agents().is_agent(&name);
            if self.inner.cluster.is_some() {
                state.lease = None;
                state.connection = Connection::Offline;
            }
            backends.insert(name.clone(), state);
        }
        match &self.inner.cluster {
            Some(cluster) => cluster.check.notify_one(),
            None => {
                if let Some(kind) = self.kind_of(&name) {
                    let stop = self.inner.shutdown.clone();
                    let handle = backend::spawn(self.clone(), name, kind, rx, stop);
                    self.lock_late().push(handle);
                }
            }
        }
        true
    }

    /// Start driving `name` under `token`: a fresh record and command channel for the
    /// driver about to start.
    pub fn take_backend(&self, name: &str, token: i64) -> mpsc::UnboundedReceiver<Command> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(b) = self.backends().get_mut(name) {
            let config = b.config.clone();
            let health = std::mem::take(&mut b.health);
            let warm = std::mem::take(&mut b.warm_models);
            let classes = b.classes.take();
            let (programs, agent, looping, linked) =
                (b.programs.take(), b.agent, b.crash_looping, b.linked);
            *b = BackendState::new(config, tx);
            b.health = health;
            b.warm_models = warm;
            b.classes = classes;
            (b.programs, b.agent, b.crash_looping, b.linked) = (programs, agent, looping, linked);
            b.lease = Some(token);
        }
        rx
    }

    /// Stop driving `name`: its attempts are forgotten here (the next owner adopts them).
    pub fn drop_backend(&self, name: &str) {
        if let Some(b) = self.backends().get_mut(name) {
            let (tx, _) = mpsc::unbounded_channel();
            b.lease = None;
            b.connection = Connection::Offline;
            b.current = None;
            b.next = None;
            b.accepts_next = false;
            b.stuck = None;
            b.commands = tx;
        }
    }

    /// Hand the attempts running on `backend` to its (new) driver.
    pub async fn recover_on(&self, backend: &str, running: Vec<Job>) {
        let here: Vec<Job> = running
            .into_iter()
            .filter(|j| j.live_attempt().is_some_and(|a| a.backend == backend))
            .collect();
        if let Err(e) = self.recover_all(here).await {
            tracing::warn!(backend, error = %e, "cannot recover the attempts of a leased backend");
        }
    }

    /// Recover jobs left running, the attempt already executing on a backend first (it
    /// becomes its `current`; one behind it was pipelined).
    pub(crate) async fn recover_all(&self, mut running: Vec<Job>) -> Result<(), Error> {
        running.sort_by_key(|j| {
            j.live_attempt()
                .is_none_or(|a| a.status != gantry_core::AttemptStatus::Executing)
        });
        for job in running {
            self.recover(job).await?;
        }
        Ok(())
    }

    /// Hand a job found running at start-up back to its backend's driver.
    pub(crate) async fn recover(&self, job: Job) -> Result<(), Error> {
        let Some(attempt) = job.live_attempt().cloned() else {
            return Ok(());
        };
        let sent = {
            let mut backends = self.backends();
            match backends.get_mut(&attempt.backend) {
                Some(b) => {
                    // Two attempts on one backend: the second was pipelined behind the first.
                    let slot = (job.id.clone(), attempt.number);
                    if b.current.is_none() {
                        b.current = Some(slot);
                    } else {
                        b.next = Some(slot);
                    }
                    let limits = self.limits_for(&job, &attempt.backend);
                    let assignment = Assignment::new(&job, &attempt, limits, true);
                    b.commands.send(Command::Run(Box::new(assignment))).is_ok()
                }
                None => false,
            }
        };
        if !sent {
            let failure = gantry_core::Failure::lost(gantry_core::JobError::new(
                "backend_gone",
                format!(
                    "backend {} is no longer configured; its attempt cannot be followed",
                    attempt.backend
                ),
            ));
            self.apply(
                &job.id,
                Input::Failed {
                    attempt: attempt.number,
                    failure,
                },
            )
            .await?;
        }
        Ok(())
    }
}
