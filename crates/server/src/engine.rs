//! The engine: the backend registry, the scheduler that matches queued jobs to idle
//! backends, and `apply`, the one path by which anything (API, scheduler, drivers) changes
//! a job: transition, conditional store update with its events, publish, carry out effects.

use gantry_core::health::{Health, HealthEvent};
use gantry_core::profile::{NodeStep, ProfileBuilder};
use gantry_core::routing::{self, Candidate, Choice};
use gantry_core::watchdog::Limits;
use gantry_core::workflow::{ModelChoices, ModelRef};
use gantry_core::{
    transition, Effect, EventKind, Input, Job, JobId, JobSpec, JobState, Millis, Policy, Refused,
    Workflow,
};
use gantry_store::stats::NodeStats;
use gantry_store::{Created, Event, Fence, Store};
use indexmap::IndexMap;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::bus::{BackendEvent, Bus, BusEvent, LiveEvent, LiveKind};
use crate::cluster::Cluster;
use crate::config::{BackendConfig, Config};
use crate::driver::{self, Assignment, Command};
use crate::outputs::ContentStore;

pub use crate::clock::now_ms;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] gantry_store::Error),
    #[error("no job {0}")]
    NotFound(JobId),
    #[error("{0}")]
    Agent(String),
}

impl Error {
    /// The write was refused because this coordinator's lease on the backend is gone.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Store(gantry_store::Error::Fenced { .. }))
    }
}

/// How a backend's connection is, as its driver last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Connection {
    Connecting,
    Connected,
    Offline,
}

/// What the engine knows of one backend.
pub struct BackendState {
    pub config: BackendConfig,
    pub connection: Connection,
    /// Node classes from `/object_info`.
    pub classes: Option<Arc<HashSet<String>>>,
    /// The model files its loaders offer, from the same read (and refreshed per class
    /// before a submit is refused for a model no backend offered).
    pub models: Option<Arc<ModelChoices>>,
    /// Model files of the latest prompt sent to it: ComfyUI keeps only what its latest
    /// prompt used (PROTOCOL.md section 6), so these are what it holds, or will once
    /// the prompts it has are done.
    pub warm_models: Vec<String>,
    pub last_used: Millis,
    /// The attempt it is running (reserved by the scheduler before the dispatch commits).
    pub current: Option<(JobId, u32)>,
    /// The attempt queued on it behind `current` (pipelining), promoted when it ends.
    pub next: Option<(JobId, u32)>,
    /// Its driver takes a next attempt: `current` is executing and not being stopped.
    pub accepts_next: bool,
    pub last_seen: Option<Millis>,
    /// It has been connected at least once: until then a failed connect is still
    /// `connecting` (the machine may not have started yet), not `offline`.
    pub connected_once: bool,
    pub last_error: Option<String>,
    /// Blocks per workflow shape and the circuit breaker.
    pub health: Health,
    /// A prompt gantry stopped that still runs there after the grace: (prompt id, since).
    pub stuck: Option<(String, Millis)>,
    /// Commands for this backend's driver.
    pub commands: mpsc::UnboundedSender<Command>,
    /// The fencing token of this coordinator's lease on it, while it drives it (always
    /// `Some(0)` with the embedded store, where one coordinator drives every backend).
    pub lease: Option<i64>,
    /// An operator took it out of rotation: it takes no new work; what runs finishes.
    pub draining: bool,
    /// The programs it runs for command jobs: an agent's `--allow` list (`None` until
    /// the agent says), empty for a URL backend.
    pub programs: Option<Arc<Vec<String>>>,
    /// It is an agent's (`/v1/agents/connect`), not a URL the coordinator was given.
    pub agent: bool,
    /// The agent reports its supervised ComfyUI exiting soon after each start.
    pub crash_looping: bool,
    /// The agent is linked to this coordinator now: it can run commands, whatever
    /// state its ComfyUI is in.
    pub linked: bool,
}

impl BackendState {
    /// A configured backend before its driver has connected.
    pub fn new(config: BackendConfig, commands: mpsc::UnboundedSender<Command>) -> BackendState {
        BackendState {
            config,
            connection: Connection::Connecting,
            classes: None,
            models: None,
            warm_models: Vec::new(),
            last_used: 0,
            current: None,
            next: None,
            accepts_next: false,
            last_seen: None,
            connected_once: false,
            last_error: None,
            health: Health::default(),
            stuck: None,
            commands,
            lease: Some(0),
            draining: false,
            programs: Some(Arc::default()),
            agent: false,
            crash_looping: false,
            linked: false,
        }
    }

    /// Take the node classes a (re)connection reported, unless the answer was empty: a
    /// known value is never replaced by an unknown one (DESIGN.md invariant 8, seed 002).
    pub fn learn_classes(&mut self, classes: HashSet<String>, models: ModelChoices) -> bool {
        if classes.is_empty() {
            return false;
        }
        self.classes = Some(Arc::new(classes));
        self.models = Some(Arc::new(models));
        true
    }
}

/// Where a queued job stands in dispatch order: priority (higher first), then age.
type QueueKey = (Reverse<i32>, Millis, JobId);

/// The queued jobs in dispatch order, kept beside the store (which stays the truth) so
/// that a scheduling pass reads no rows. Jobs are grouped by everything routing looks at
/// (tags, workflow shape, models, backends to avoid): the jobs of a group are routed
/// alike, so a pass asks once per group, not once per job, and a runnable job is never
/// stuck behind any number of jobs that must wait. Kept by `submit` and `apply`; a
/// version check keeps a slow writer from putting back an older state, and a dispatch
/// refused for a stale entry fixes it.
///
/// The whole job is kept only while the queue is short (`HOT`): beyond that an entry is
/// its key and a few numbers, and the scheduler reads the job from the store when it
/// reaches the head of its group, so a deep queue costs little memory per job.
#[derive(Default)]
struct QueueIndex {
    groups: HashMap<u64, BTreeMap<QueueKey, Entry>>,
    keys: HashMap<JobId, (u64, QueueKey, Option<Millis>)>,
    /// Jobs with a deadline or queue timeout, by when the first of them ends.
    expiries: std::collections::BTreeSet<(Millis, JobId)>,
    /// How often each queued job has been passed over for one a backend was warm for.
    passed: HashMap<JobId, u32>,
}

/// One queued job in the index.
struct Entry {
    version: u64,
    not_before: Millis,
    /// The job itself, while the queue is short.
    job: Option<Arc<Job>>,
}

impl QueueIndex {
    /// Up to this many queued jobs are kept whole.
    const HOT: usize = 4096;

    fn key(job: &Job) -> QueueKey {
        (Reverse(job.spec.priority), job.created_at, job.id.clone())
    }

    /// What routing decides a job by.
    fn group(job: &Job) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut tags = job.spec.tags.clone();
        tags.sort();
        tags.hash(&mut h);
        job.spec.workflow.shape_hash().hash(&mut h);
        job.spec.command.as_ref().map(|c| c.program()).hash(&mut h);
        for m in job.spec.workflow.models() {
            m.file.hash(&mut h);
        }
        let mut avoid: Vec<&str> = job
            .excluded
            .iter()
            .map(|e| e.backend.as_str())
            .chain(
                job.attempts
                    .iter()
                    .filter(|a| a.error.is_some())
                    .map(|a| a.backend.as_str()),
            )
            .collect();
        avoid.sort_unstable();
        avoid.dedup();
        avoid.hash(&mut h);
        h.finish()
    }

    /// When the job's deadline or queue timeout ends, if it has one.
    fn expiry(job: &Job, global: &gantry_core::Timeouts) -> Option<Millis> {
        let timeouts = job.spec.timeouts.or(global);
        let deadline = timeouts
            .deadline_ms
            .filter(|ms| *ms > 0)
            .map(|ms| job.created_at + ms as Millis);
        let queue = timeouts.queue_ms.filter(|ms| *ms > 0).map(|ms| {
            let since = job
                .attempts
                .last()
                .and_then(|a| a.finished_at)
                .unwrap_or(job.created_at);
            since + ms as Millis + 1
        });
        match (deadline, queue) {
            (Some(d), Some(q)) => Some(d.min(q)),
            (d, q) => d.or(q),
        }
    }

    /// Take the job's new state: in the queue when queued, out of it otherwise.
    fn note(&mut self, job: &Job, global: &gantry_core::Timeouts) {
        self.note_from(job, global, job.not_before);
    }

    /// As `note`, not dispatching the job before `not_before` (which may be later than
    /// the job's own: a job another coordinator queued is left to it for a moment).
    fn note_from(&mut self, job: &Job, global: &gantry_core::Timeouts, not_before: Millis) {
        if let Some((g, k, _)) = self.keys.get(&job.id) {
            let newer = self
                .groups
                .get(g)
                .and_then(|m| m.get(k))
                .is_some_and(|e| e.version > job.version);
            if newer {
                return;
            }
        }
        if let Some((g, k, expiry)) = self.keys.remove(&job.id) {
            if let Some(m) = self.groups.get_mut(&g) {
                m.remove(&k);
                if m.is_empty() {
                    self.groups.remove(&g);
                }
            }
            if let Some(at) = expiry {
                self.expiries.remove(&(at, job.id.clone()));
            }
        }
        if job.state != JobState::Queued {
            self.passed.remove(&job.id);
        } else {
            let (g, k) = (Self::group(job), Self::key(job));
            let expiry = Self::expiry(job, global);
            if let Some(at) = expiry {
                self.expiries.insert((at, job.id.clone()));
            }
            let hot = self.keys.len() < Self::HOT;
            self.keys.insert(job.id.clone(), (g, k.clone(), expiry));
            self.groups.entry(g).or_default().insert(
                k,
                Entry {
                    version: job.version,
                    not_before: not_before.max(job.not_before),
                    job: hot.then(|| Arc::new(job.clone())),
                },
            );
        }
    }

    /// The first job of group `g` after `after` that may run at `now`; the end of the
    /// earliest backoff passed over goes into `next`.
    fn eligible(
        &self,
        g: u64,
        after: Option<&QueueKey>,
        now: Millis,
        next: &mut Option<Millis>,
    ) -> Option<QueueKey> {
        use std::ops::Bound;
        let m = self.groups.get(&g)?;
        let from = match after {
            Some(k) => Bound::Excluded(k.clone()),
            None => Bound::Unbounded,
        };
        for (key, e) in m.range((from, Bound::Unbounded)) {
            if e.not_before <= now {
                return Some(key.clone());
            }
            *next = Some(next.map_or(e.not_before, |n| n.min(e.not_before)));
        }
        None
    }

    /// The whole job, when the index keeps it.
    fn hot(&self, id: &JobId) -> Option<Arc<Job>> {
        let (g, k, _) = self.keys.get(id)?;
        self.groups.get(g)?.get(k)?.job.clone()
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    fn passed(&self, id: &JobId) -> u32 {
        self.passed.get(id).copied().unwrap_or(0)
    }

    /// Another job was dispatched in `id`'s place.
    fn pass(&mut self, id: &JobId) {
        *self.passed.entry(id.clone()).or_default() += 1;
    }
}

/// How many other groups' heads a free backend may look at for a job it is warm for.
const LOOKAHEAD: usize = 8;
/// How many times a queued job may be passed over for one a free backend is warm for.
const MAX_PASSED: u32 = 8;

/// What one scheduling decision reads: the backends as they are now.
struct Scheduling<'a> {
    backends: &'a IndexMap<String, BackendState>,
    slow: &'a HashSet<(String, String)>,
    /// Some backend has a block or an open circuit (else no job's shape is hashed).
    any_blocks: bool,
    random: bool,
    pipeline: bool,
    now: Millis,
}

impl Scheduling<'_> {
    /// Where `job` goes now (`only` restricts it to that backend), and whether it is
    /// queued behind a running prompt there rather than on an idle backend.
    fn choose(&self, job: &Job, only: Option<&str>) -> (Result<String, Choice>, bool) {
        let hash = self.any_blocks.then(|| job.spec.workflow.shape_hash());
        let command = job.spec.command.is_some();
        let classes: Vec<&str> = job.spec.workflow.nodes().map(|(_, c)| c).collect();
        // An idle backend first; else one whose running prompt can have this one
        // queued behind it.
        let mut choice = Err(Choice::Wait(routing::Waiting::Busy));
        let mut behind = false;
        for second in [false, true] {
            // A command is never queued behind a prompt: it runs on the agent, not in
            // ComfyUI's queue.
            if second
                && !(self.pipeline
                    && job.spec.command.is_none()
                    && matches!(choice, Err(Choice::Wait(_))))
            {
                break;
            }
            let candidates: Vec<Candidate<'_>> = self
                .backends
                .values()
                .map(|b| Candidate {
                    // A command runs on the agent, not in ComfyUI: ComfyUI's health and
                    // reachability are no matter (a command may be what repairs it).
                    blocked: !command
                        && (!b.health.accepts_work()
                            || hash
                                .as_deref()
                                .is_some_and(|h| b.health.is_blocked(h, self.now))),
                    name: &b.config.name,
                    priority: b.config.priority,
                    tags: &b.config.tags,
                    classes: b.classes.as_deref(),
                    idle: if command {
                        b.linked && b.lease.is_some()
                    } else {
                        b.connection == Connection::Connected
                    } && !b.draining
                        && only.is_none_or(|o| o == b.config.name)
                        && if second {
                            b.current.is_some() && b.accepts_next && b.next.is_none()
                        } else {
                            b.current.is_none()
                        },
                    warm_models: if self.random { &[] } else { &b.warm_models },
                    last_used: if self.random {
                        rand::random()
                    } else {
                        b.last_used
                    },
                    slow: !self.random
                        && classes.iter().any(|c| {
                            self.slow
                                .contains(&((*c).to_owned(), b.config.name.clone()))
                        }),
                    programs: b.programs.as_deref().map(Vec::as_slice),
                })
                .collect();
            choice = match routing::choose(job, &candidates) {
                Choice::Run(idx) => Ok(candidates[idx].name.to_owned()),
                other => Err(other),
            };
            behind = second;
        }
        (choice, behind)
    }
}

/// A failed attempt's mark on its backend's health, made once the failure is committed.
struct HealthChange {
    backend: String,
    /// The workflow shape to block there, if the failure was that workflow's own.
    block: Option<String>,
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

/// A backend whose median for a class is this many times the farm's is slow for it.
const SLOW_FACTOR: f64 = 2.0;
/// Runs needed, on the backend and farm-wide, before judging.
const SLOW_MIN_SAMPLES: u64 = 20;

/// What an adaptive stall limit is for one class on one backend, and why.
#[derive(Clone, Debug)]
pub struct Suggestion {
    pub class: String,
    pub backend: String,
    /// Measured runs on that backend, and farm-wide.
    pub backend_samples: u64,
    pub farm_samples: u64,
    /// `backend`, `farm`, or `none` (too few samples anywhere).
    pub source: &'static str,
    pub p99_ms: Option<f64>,
    /// The limit: `max(floor, factor x p99)`, when there are enough samples.
    pub node_stall_ms: Option<u64>,
    pub reason: String,
}

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
            .unwrap_or_default();
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
            let e = engine.clone();
            let instant = e
                .backends()
                .get(&name)
                .is_some_and(|b| b.config.instant.is_some());
            if instant {
                tasks.spawn(async move { crate::instant::run(e, name, rx).await });
            } else {
                let stop = e.inner.shutdown.clone();
                tasks.spawn(async move { driver::run(e, name, rx, stop).await });
            }
        }
        if engine.inner.cluster.is_some() {
            let e = engine.clone();
            tasks.spawn(async move { crate::cluster::lease_loop(e).await });
            let e = engine.clone();
            tasks.spawn(async move { crate::cluster::tail_loop(e).await });
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
                let e = self.clone();
                let stop = self.inner.shutdown.clone();
                let handle = tokio::spawn(async move { driver::run(e, name, rx, stop).await });
                self.lock_late().push(handle);
            }
        }
        true
    }

    fn lock_late(&self) -> MutexGuard<'_, Vec<tokio::task::JoinHandle<()>>> {
        self.inner.late.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for the drivers of run-time backends (after shutdown was asked).
    pub async fn join_late(&self) {
        let handles = std::mem::take(&mut *self.lock_late());
        for h in handles {
            let _ = h.await;
        }
    }

    fn lock_profiles(&self) -> MutexGuard<'_, HashMap<(JobId, u32), ProfileBuilder>> {
        self.inner
            .profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Record, in the profile of `job`'s attempt `attempt`, what its backend said;
    /// answers the node steps it made known (for `record_nodes`).
    pub fn observe(
        &self,
        job: &JobId,
        attempt: u32,
        f: impl FnOnce(&mut ProfileBuilder),
    ) -> Vec<NodeStep> {
        let mut profiles = self.lock_profiles();
        let profile = profiles.entry((job.clone(), attempt)).or_default();
        f(profile);
        profile.take_news()
    }

    /// Keep a running attempt's node steps in the job's history (so a client that
    /// subscribes late is told every node, in order) and publish them; a started node
    /// is also the job's current progress. Held while the store is unreachable, like a
    /// state change.
    pub async fn record_nodes(
        &self,
        job: &JobId,
        attempt: u32,
        backend: &str,
        workflow: &Workflow,
        steps: Vec<NodeStep>,
    ) {
        let class = |node: &str| workflow.class_of(node).unwrap_or_default().to_owned();
        let kinds: Vec<EventKind> = steps
            .into_iter()
            .map(|step| match step {
                NodeStep::Started(node) => EventKind::NodeStarted {
                    attempt,
                    backend: backend.to_owned(),
                    class_type: class(&node),
                    node,
                },
                NodeStep::Finished {
                    node,
                    duration_ms,
                    status,
                } => EventKind::NodeFinished {
                    attempt,
                    backend: backend.to_owned(),
                    class_type: class(&node),
                    node,
                    status,
                    duration_ms,
                },
                NodeStep::Cached(nodes) => EventKind::NodesCached {
                    attempt,
                    backend: backend.to_owned(),
                    nodes,
                },
            })
            .collect();
        for kind in &kinds {
            if let EventKind::NodeStarted {
                node, class_type, ..
            } = kind
            {
                self.note_progress(job, attempt, backend, |p| {
                    p.node = Some(node.clone());
                    p.class_type = Some(class_type.clone());
                    (p.value, p.max) = (None, None);
                });
            }
        }
        let mut wait = Duration::from_millis(100);
        loop {
            match self
                .inner
                .store
                .append_events(job, JobState::Running, now_ms(), &kinds)
                .await
            {
                Ok(events) => return self.publish_persisted(events),
                Err(e) if e.is_unavailable() => {
                    tracing::warn!(job_id = %job, error = %e, "store unreachable: holding node events");
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(job_id = %job, error = %e, "cannot record node events");
                    return;
                }
            }
        }
    }

    /// Forget an attempt's record (its driver let it go without an end being written
    /// here: a lost lease, a drain that outlived it).
    pub fn forget_profile(&self, job: &JobId, attempt: u32) {
        self.lock_profiles().remove(&(job.clone(), attempt));
    }

    /// Attach to each attempt that `applied` ends its profile, and to the job's terminal
    /// event the profile of the attempt that ended it. Answers the attempts whose
    /// records to drop once the write commits.
    fn attach_profiles(&self, before: &Job, applied: &mut gantry_core::Applied) -> Vec<u32> {
        let mut ended = Vec::new();
        {
            let profiles = self.lock_profiles();
            for a in applied.job.attempts.iter_mut() {
                let was_live = before
                    .attempts
                    .iter()
                    .any(|b| b.number == a.number && b.status.is_live());
                // A command runs no nodes: it has no profile.
                let command = before.spec.command.is_some();
                if was_live && !a.status.is_live() && a.profile.is_none() && !command {
                    let builder = profiles.get(&(before.id.clone(), a.number));
                    let profile = builder.cloned().unwrap_or_default();
                    a.profile = Some(Box::new(profile.finish(&before.spec.workflow, a)));
                    ended.push(a.number);
                }
            }
        }
        let last = applied
            .job
            .attempts
            .iter()
            .rev()
            .find(|a| ended.contains(&a.number))
            .or_else(|| applied.job.attempts.last())
            .and_then(|a| a.profile.clone());
        for e in applied.events.iter_mut() {
            match e {
                EventKind::Succeeded { profile, .. }
                | EventKind::Failed { profile, .. }
                | EventKind::Cancelled { profile, .. } => *profile = last.clone(),
                _ => {}
            }
        }
        ended
    }

    fn lock_slow(&self) -> MutexGuard<'_, HashSet<(String, String)>> {
        self.inner.slow.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `backend` is judged much slower than the farm for `class`.
    pub fn is_slow(&self, class: &str, backend: &str) -> bool {
        self.lock_slow()
            .contains(&(class.to_owned(), backend.to_owned()))
    }

    /// Judge again which backends are much slower than the farm for a class.
    fn judge_slowness(&self) {
        let mut slow = HashSet::new();
        {
            let history = self.lock_history();
            let mut farm: HashMap<&str, NodeStats> = HashMap::new();
            for ((class, _), s) in history.iter() {
                farm.entry(class.as_str())
                    .or_insert_with(|| NodeStats::empty(class, "", "", 0))
                    .merge(s);
            }
            for ((class, backend), s) in history.iter() {
                let Some(all) = farm.get(class.as_str()) else {
                    continue;
                };
                if (s.sketch.count() as u64) < SLOW_MIN_SAMPLES
                    || (all.sketch.count() as u64) < 2 * SLOW_MIN_SAMPLES
                {
                    continue;
                }
                if let (Some(here), Some(median)) = (s.quantile(0.5), all.quantile(0.5)) {
                    if here > SLOW_FACTOR * median.max(1.0) {
                        slow.insert((class.clone(), backend.clone()));
                    }
                }
            }
        }
        *self.lock_slow() = slow;
    }

    fn lock_history(&self) -> MutexGuard<'_, HashMap<(String, String), NodeStats>> {
        self.inner.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stall limit history gives `class` on `backend` under `policy`.
    pub fn suggest(
        &self,
        policy: &crate::config::Adaptive,
        class: &str,
        backend: &str,
    ) -> Suggestion {
        let history = self.lock_history();
        let here = history.get(&(class.to_owned(), backend.to_owned()));
        let mut farm = NodeStats::empty(class, "", "", 0);
        for ((c, _), s) in history.iter() {
            if c == class {
                farm.merge(s);
            }
        }
        let measured = |s: &NodeStats| s.sketch.count() as u64;
        let (backend_samples, farm_samples) = (here.map_or(0, measured), measured(&farm));
        let (source, p99) = if backend_samples >= policy.min_samples {
            ("backend", here.and_then(|s| s.quantile(0.99)))
        } else if farm_samples >= policy.min_samples {
            ("farm", farm.quantile(0.99))
        } else {
            ("none", None)
        };
        let floor = policy.floor.as_millis() as u64;
        let node_stall_ms = p99.map(|p| ((policy.factor * p).ceil() as u64).max(floor));
        let reason = match (p99, node_stall_ms) {
            (Some(p), Some(limit)) if limit == floor && (policy.factor * p) < floor as f64 => format!(
                "the floor: {} x p99 {p:.0} ms of {} runs ({source}) is below {floor} ms",
                policy.factor,
                if source == "backend" { backend_samples } else { farm_samples }
            ),
            (Some(p), Some(_)) => format!(
                "{} x p99 {p:.0} ms of {} runs ({})",
                policy.factor,
                if source == "backend" { backend_samples } else { farm_samples },
                if source == "backend" { "on this backend" } else { "farm-wide: too few on this backend" }
            ),
            _ => format!(
                "too few runs ({backend_samples} here, {farm_samples} farm-wide, {} needed): the configured limit stays",
                policy.min_samples
            ),
        };
        Suggestion {
            class: class.to_owned(),
            backend: backend.to_owned(),
            backend_samples,
            farm_samples,
            source,
            p99_ms: p99,
            node_stall_ms,
            reason,
        }
    }

    /// Every (class, backend) history knows of.
    pub fn history_keys(&self) -> Vec<(String, String)> {
        let mut keys: Vec<(String, String)> = self.lock_history().keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Hand the nodes of the attempts that just ended to the stats writer.
    fn sample_nodes(&self, job: &Job, ended: &[u32]) {
        use gantry_core::profile::NodeStatus;
        let mut samples = Vec::new();
        for a in job.attempts.iter().filter(|a| ended.contains(&a.number)) {
            let Some(p) = &a.profile else { continue };
            let timed_out = a.error.as_ref().is_some_and(|e| e.code == "timeout");
            let workflow = job.spec.workflow.shape_hash();
            for n in &p.nodes {
                if matches!(n.status, NodeStatus::Pending | NodeStatus::Unknown) {
                    continue;
                }
                samples.push(gantry_store::stats::NodeSample {
                    class: n.class_type.clone(),
                    workflow: workflow.clone(),
                    backend: a.backend.clone(),
                    at: a.finished_at.unwrap_or(job.updated_at),
                    duration_ms: n.duration_ms.map(|d| d as f64),
                    cached: n.status == NodeStatus::Cached,
                    failed: n.status == NodeStatus::Failed,
                    timed_out: timed_out
                        && matches!(n.status, NodeStatus::Executing | NodeStatus::Interrupted),
                });
            }
        }
        if samples.is_empty() {
            return;
        }
        {
            let mut history = self.lock_history();
            for s in samples.iter().filter(|s| s.duration_ms.is_some()) {
                history
                    .entry((s.class.clone(), s.backend.clone()))
                    .or_insert_with(|| NodeStats::empty(&s.class, "", &s.backend, 0))
                    .add(s);
            }
        }
        let _ = self.inner.stats.send(samples);
    }

    /// Write node samples to the store's aggregates, gathered for up to a second, so
    /// jobs never wait for them and the store takes one write a second at most (a
    /// crash loses at most that second of statistics, never a job).
    async fn stats_loop(
        &self,
        mut rx: mpsc::UnboundedReceiver<Vec<gantry_store::stats::NodeSample>>,
    ) {
        // Samples a failed write left are kept (up to this many, the oldest dropped
        // first) and written with the next batch, or after a second when none comes.
        const KEPT: usize = 100_000;
        let mut pending = Vec::new();
        loop {
            let stop = tokio::select! {
                more = rx.recv() => match more {
                    Some(s) => { pending.extend(s); false }
                    None => true,
                },
                _ = tokio::time::sleep(Duration::from_secs(1)), if !pending.is_empty() => false,
                _ = self.inner.shutdown.cancelled() => true,
            };
            if !stop && pending.len() < 10_000 {
                // Gather what comes within the second.
                let until = tokio::time::Instant::now() + Duration::from_secs(1);
                while let Ok(Some(s)) = tokio::time::timeout_at(until, rx.recv()).await {
                    pending.extend(s);
                    if pending.len() >= 10_000 {
                        break;
                    }
                }
            }
            while let Ok(s) = rx.try_recv() {
                pending.extend(s);
            }
            if !pending.is_empty() {
                self.judge_slowness();
                match self.inner.store.record_node_stats(&pending).await {
                    Ok(()) => pending.clear(),
                    Err(e) => {
                        tracing::warn!(error = %e, samples = pending.len(), "cannot record node statistics; will try again");
                        if pending.len() > KEPT {
                            let excess = pending.len() - KEPT;
                            tracing::warn!(
                                dropped = excess,
                                "node statistics kept too long unwritten"
                            );
                            pending.drain(..excess);
                        }
                    }
                }
            }
            if stop {
                return;
            }
        }
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

    fn queue(&self) -> MutexGuard<'_, QueueIndex> {
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

    pub(crate) fn changed(&self) -> &Notify {
        &self.inner.changed
    }

    /// A backend not heard from for this long is `stale`.
    pub fn stale_after_ms(&self) -> Millis {
        2 * self.inner.config.liveness.as_millis() as Millis
    }

    fn lock_progress(&self) -> MutexGuard<'_, HashMap<JobId, gantry_api::Progress>> {
        self.inner
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Where the running job is, as last heard.
    pub fn progress_of(&self, job: &JobId) -> Option<gantry_api::Progress> {
        self.lock_progress().get(job).cloned()
    }

    /// The first node of `workflow` whose class no backend has, judged by the backends
    /// whose classes are known; `None` when every class is found or nothing is known yet.
    pub fn unknown_class<'w>(&self, workflow: &'w Workflow) -> Option<(&'w str, &'w str)> {
        let backends = self.backends();
        let known: Vec<&HashSet<String>> = backends
            .values()
            .filter_map(|b| b.classes.as_deref())
            .collect();
        if known.is_empty() {
            return None;
        }
        workflow
            .nodes()
            .find(|(_, class)| !known.iter().any(|k| k.contains(*class)))
    }

    /// A model the workflow names that no backend offers, judged only when every
    /// backend has been read: (the model, each backend's reason). A backend that can run
    /// the job on every other count but offers no list for the input accepts it.
    pub fn missing_model(&self, spec: &JobSpec) -> Option<(ModelRef, BTreeMap<String, String>)> {
        let job = Job::new(JobId::random(), spec.clone(), now_ms());
        let backends = self.backends();
        let mut first = None;
        let mut reasons = BTreeMap::new();
        for b in backends.values() {
            let candidate = Candidate {
                name: &b.config.name,
                priority: b.config.priority,
                tags: &b.config.tags,
                classes: b.classes.as_deref(),
                idle: false,
                warm_models: &[],
                last_used: 0,
                blocked: false,
                slow: false,
                programs: b.programs.as_deref().map(Vec::as_slice),
            };
            let reason = match (routing::never_reason(&job, &candidate), &b.models) {
                (Some(never), _) => never,
                // Not read yet: it may have the model.
                (None, None) => return None,
                (None, Some(models)) => {
                    let missing = models.first_missing(&spec.workflow)?;
                    let reason = format!(
                        "does not offer {:?} for node {} input {}",
                        missing.file, missing.node, missing.input
                    );
                    first.get_or_insert(missing);
                    reason
                }
            };
            reasons.insert(b.config.name.clone(), reason);
        }
        Some((first?, reasons))
    }

    /// Read again the model lists of the classes `workflow` loads models with, from
    /// every backend that said it lacks one, so a refusal never rests on a list older
    /// than a file just installed. A backend that does not answer in time keeps its list.
    pub async fn refresh_models(&self, workflow: &Workflow) {
        let classes: BTreeSet<String> = workflow
            .models()
            .iter()
            .filter_map(|m| workflow.class_of(&m.node).map(str::to_owned))
            .collect();
        let targets: Vec<(String, String)> = self
            .backends()
            .values()
            .filter(|b| {
                b.models
                    .as_ref()
                    .is_some_and(|m| m.first_missing(workflow).is_some())
            })
            .map(|b| (b.config.name.clone(), b.config.url.clone()))
            .collect();
        let reads = targets.into_iter().map(|(name, url)| {
            let classes = &classes;
            async move {
                let client = gantry_comfy::Client::with_http(&url, self.inner.http.clone()).ok()?;
                let mut fresher = ModelChoices::default();
                for class in classes {
                    let read = tokio::time::timeout(
                        Duration::from_secs(2),
                        client.object_info_of(class),
                    )
                    .await;
                    match read {
                        Ok(Ok(info)) => fresher.update(ModelChoices::from_object_info(&info)),
                        Ok(Err(e)) => {
                            tracing::debug!(backend = %name, class, error = %e, "cannot read a class's model list");
                            return None;
                        }
                        Err(_) => return None,
                    }
                }
                Some((name, fresher))
            }
        });
        for (name, fresher) in futures_util::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
        {
            if let Some(b) = self.backends().get_mut(&name) {
                let mut models = b.models.as_deref().cloned().unwrap_or_default();
                models.update(fresher);
                b.models = Some(Arc::new(models));
            }
        }
    }

    /// Why no backend can ever run this command job, when each has said what it allows.
    pub fn command_refusal(&self, spec: &JobSpec) -> Option<String> {
        let command = spec.command.as_ref()?;
        let job = Job::new(JobId::random(), spec.clone(), now_ms());
        let backends = self.backends();
        if backends.is_empty() {
            return Some(format!(
                "no agent allows program {:?}: no backend is known (run `gantry agent --allow {}`)",
                command.program(),
                command.program()
            ));
        }
        let mut reasons = Vec::new();
        for b in backends.values() {
            let candidate = Candidate {
                name: &b.config.name,
                priority: b.config.priority,
                tags: &b.config.tags,
                classes: b.classes.as_deref(),
                idle: false,
                warm_models: &[],
                last_used: 0,
                blocked: false,
                slow: false,
                programs: b.programs.as_deref().map(Vec::as_slice),
            };
            // An agent that has not said what it allows yet may allow it
            // (`never_reason` looks at programs only once they are known).
            match routing::never_reason(&job, &candidate) {
                Some(reason) => reasons.push(format!("{}: {reason}", b.config.name)),
                None => return None,
            }
        }
        Some(format!(
            "no backend may run program {:?}: {}",
            command.program(),
            reasons.join("; ")
        ))
    }

    /// Every source of a job's limits on `backend`: its own, the node classes', the
    /// backend's and the global defaults.
    pub fn limits_for(&self, job: &Job, backend: &str) -> Limits {
        let config = &self.inner.config;
        let mut adaptive = BTreeMap::new();
        if let Some(policy) = &config.adaptive {
            for (_, class) in job.spec.workflow.nodes() {
                if policy.applies_to(class) && !adaptive.contains_key(class) {
                    if let Some(ms) = self.suggest(policy, class, backend).node_stall_ms {
                        adaptive.insert(class.to_owned(), ms);
                    }
                }
            }
        }
        Limits {
            adaptive: Arc::new(adaptive),
            job: job.spec.timeouts.clone(),
            node_class: config.node_class.clone(),
            backend: config
                .backends
                .iter()
                .find(|b| b.name == backend)
                .map(|b| b.timeouts.clone())
                .unwrap_or_default(),
            global: config.timeouts.clone(),
        }
    }

    /// Publish health changes of `backend` on the global stream.
    pub fn publish_health(&self, backend: &str, events: Vec<HealthEvent>) {
        let at = now_ms();
        for kind in events {
            tracing::info!(backend, event = ?kind, "backend health");
            self.inner
                .bus
                .publish(BusEvent::Backend(Arc::new(BackendEvent {
                    backend: backend.to_owned(),
                    at,
                    kind,
                })));
        }
    }

    /// What a failed attempt does to its backend's health (`Failure::is_backends_fault`),
    /// settled with the transition that records the failure: the breaker counts it, and
    /// the workflow's own trouble there (`Failure::blocks_workflow`) blocks its shape on
    /// the backend, a `backend_blocked` event in the same commit. A retry is then told
    /// what routing says with that health (`settle_retry`): when it can really start,
    /// what it waits for, or that no backend can run it any more. Answers the health
    /// change to make once the commit succeeded.
    fn settle_failure(
        &self,
        job: &Job,
        input: &Input,
        applied: &mut gantry_core::Applied,
        now: Millis,
    ) -> Option<HealthChange> {
        let Input::Failed { attempt, failure } = input else {
            return None;
        };
        let backend = job
            .attempts
            .iter()
            .find(|a| a.number == *attempt)?
            .backend
            .clone();
        // A command runs on the agent, not in ComfyUI: its failures say nothing of
        // ComfyUI's health.
        let change =
            (failure.is_backends_fault() && job.spec.command.is_none()).then(|| HealthChange {
                backend: backend.clone(),
                block: failure
                    .blocks_workflow()
                    .then(|| job.spec.workflow.shape_hash()),
            });
        let health = change.as_ref().and_then(|c| {
            let mut health = self.backends().get(&c.backend)?.health.clone();
            let events = health.on_fault(c.block.as_deref(), now, &self.inner.config.health);
            for e in events {
                if let HealthEvent::BackendBlocked {
                    workflow_hash,
                    until,
                } = e
                {
                    // Right after the failure and its retry (which says it waits for
                    // the block), before a terminal event that must come last.
                    let at = applied
                        .events
                        .iter()
                        .rposition(|k| {
                            matches!(
                                k,
                                EventKind::AttemptFailed { .. } | EventKind::JobRetrying { .. }
                            )
                        })
                        .map_or(applied.events.len(), |i| i + 1);
                    applied.events.insert(
                        at,
                        EventKind::BackendBlocked {
                            backend: backend.clone(),
                            workflow_hash,
                            until,
                        },
                    );
                }
            }
            Some(health)
        });
        if applied.job.state == JobState::Queued {
            let outlook = self.outlook(
                &applied.job,
                Some((&job.id, *attempt)),
                health.as_ref().map(|h| (backend.as_str(), h)),
                now,
            );
            gantry_core::transition::settle_retry(applied, outlook, now);
        }
        change
    }

    /// Make a committed failure's health change (see `settle_failure`) and publish it.
    fn change_health(&self, change: HealthChange, now: Millis) {
        let events = match self.backends().get_mut(&change.backend) {
            Some(b) => b
                .health
                .on_fault(change.block.as_deref(), now, &self.inner.config.health),
            None => return,
        };
        if !events.is_empty() {
            self.wake_scheduler();
        }
        self.publish_health(&change.backend, events);
    }

    /// Why `job` (queued) is not running now and until when, if it waits; `None` when a
    /// backend could take it now, or none ever can (the scheduler fails it promptly).
    pub fn waiting_for(&self, job: &Job) -> Option<routing::WaitingFor> {
        if job.state != JobState::Queued {
            return None;
        }
        match self.outlook(job, None, None, now_ms()) {
            routing::Outlook::Wait(w) => Some(w),
            routing::Outlook::Ready | routing::Outlook::Never(_) => None,
        }
    }

    /// What routing says of `job` at `now`, over every backend. `freeing` is an attempt
    /// that is ending (its backend counts as free of it); `health` stands in for one
    /// backend's health record (the one the ending attempt's failure is about to make).
    fn outlook(
        &self,
        job: &Job,
        freeing: Option<(&JobId, u32)>,
        health: Option<(&str, &Health)>,
        now: Millis,
    ) -> routing::Outlook {
        let backends = self.backends();
        let hash = job.spec.workflow.shape_hash();
        let command = job.spec.command.is_some();
        let pipeline = self.inner.config.pipeline;
        let mut candidates = Vec::with_capacity(backends.len());
        let mut standings = Vec::with_capacity(backends.len());
        for b in backends.values() {
            let health = match health {
                Some((name, h)) if name == b.config.name => h,
                _ => &b.health,
            };
            let ending = |slot: &Option<(JobId, u32)>| {
                slot.as_ref().is_some_and(|(j, n)| freeing == Some((j, *n)))
            };
            let current = b.current.is_some() && !ending(&b.current);
            let standing = if b.draining {
                routing::Standing::Draining
            } else if command {
                if !(b.linked && b.lease.is_some()) {
                    routing::Standing::Offline { why: None }
                } else if current {
                    routing::Standing::Busy
                } else {
                    routing::Standing::Free
                }
            } else if b.lease.is_none() {
                // Another coordinator drives it and may well take the job.
                routing::Standing::Free
            } else if b.connection != Connection::Connected {
                routing::Standing::Offline {
                    why: b.last_error.clone(),
                }
            } else if let Some(probe_at) = health.probe_at() {
                routing::Standing::CircuitOpen { probe_at }
            } else if let Some(until) = health
                .blocks()
                .get(&hash)
                .copied()
                .filter(|until| *until > now)
            {
                routing::Standing::Blocked { until }
            } else if b.stuck.is_some() {
                routing::Standing::Stuck
            } else if current
                && !(pipeline && b.accepts_next && b.next.is_none() && !ending(&b.next))
            {
                routing::Standing::Busy
            } else {
                routing::Standing::Free
            };
            standings.push(standing);
            candidates.push(Candidate {
                name: &b.config.name,
                priority: b.config.priority,
                tags: &b.config.tags,
                classes: b.classes.as_deref(),
                idle: false,
                warm_models: &[],
                last_used: 0,
                blocked: false,
                slow: false,
                programs: b.programs.as_deref().map(Vec::as_slice),
            });
        }
        routing::outlook(job, &candidates, &standings, now, &crate::clock::rfc3339)
    }

    /// An attempt succeeded on `backend`: its fault streak ends.
    pub fn backend_ok(&self, backend: &str) {
        let events = match self.backends().get_mut(backend) {
            Some(b) => b.health.on_success(),
            None => return,
        };
        self.publish_health(backend, events);
    }

    /// A circuit probe of `backend` answered.
    pub fn probe_result(&self, backend: &str, healthy: bool) {
        let events = match self.backends().get_mut(backend) {
            Some(b) => b
                .health
                .on_probe(healthy, now_ms(), &self.inner.config.health),
            None => return,
        };
        if !events.is_empty() {
            self.wake_scheduler();
        }
        self.publish_health(backend, events);
    }

    /// Mark `backend` stuck on `prompt_id` (Some) or free of it (None).
    pub fn set_stuck(&self, backend: &str, stuck: Option<&str>) {
        let event = {
            let mut backends = self.backends();
            let Some(b) = backends.get_mut(backend) else {
                return;
            };
            match (stuck, b.stuck.take()) {
                (Some(pid), None) => {
                    let since = now_ms();
                    b.stuck = Some((pid.to_owned(), since));
                    // An agent that supervises its ComfyUI restarts it (issue 11).
                    self.inner.agents.on_stuck(backend, pid);
                    HealthEvent::BackendStuck {
                        prompt_id: pid.to_owned(),
                        since,
                    }
                }
                (None, Some((pid, _))) => HealthEvent::BackendRecovered { prompt_id: pid },
                (_, was) => {
                    b.stuck = was;
                    return;
                }
            }
        };
        self.publish_health(backend, vec![event]);
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        self.inner.cluster.as_ref()
    }

    /// Put committed events on the bus; with several coordinators the event tail does,
    /// in sequence order for every coordinator alike.
    fn publish_persisted(&self, events: Vec<Event>) {
        match &self.inner.cluster {
            Some(cluster) => cluster.wrote(&events),
            None => {
                for event in events {
                    self.inner.bus.publish(BusEvent::persisted(event));
                }
            }
        }
    }

    /// The proof of lease a write of `input` on `job` must carry, if any: dispatches
    /// and every input about an attempt are about that attempt's backend.
    fn fence(&self, job: &Job, input: &Input) -> Option<Fence> {
        let cluster = self.inner.cluster.as_ref()?;
        let attempt_backend = |n: u32| {
            job.attempts
                .get((n as usize).checked_sub(1)?)
                .map(|a| a.backend.clone())
        };
        let (backend, claim) = match input {
            Input::Dispatch { backend, .. } => (backend.clone(), true),
            Input::Submitted { attempt }
            | Input::Started { attempt }
            | Input::Succeeded { attempt, .. }
            | Input::Failed { attempt, .. }
            | Input::CancelConfirmed { attempt } => (attempt_backend(*attempt)?, false),
            Input::DeadlinePassed { .. } if job.state == JobState::Running => {
                (job.live_attempt()?.backend.clone(), false)
            }
            Input::DeadlinePassed { .. }
            | Input::Cancel
            | Input::QueueTimeout { .. }
            | Input::Unroutable { .. } => return None,
        };
        // A backend not leased here gets a token no lease has: the write is refused.
        let token = self
            .backends()
            .get(&backend)
            .and_then(|b| b.lease)
            .unwrap_or(-1);
        Some(Fence {
            backend,
            owner: cluster.id.clone(),
            token,
            claim,
        })
    }

    /// Take `backend` out of rotation (`drain`) or put it back. Answers `None` for a
    /// backend this server does not know, and `Some(false)` for one it knows but does not
    /// drive (another coordinator holds its lease).
    pub fn set_draining(&self, backend: &str, drain: bool) -> Option<bool> {
        let changed = {
            let mut backends = self.backends();
            let b = backends.get_mut(backend)?;
            if b.lease.is_none() {
                return Some(false);
            }
            b.draining = drain;
            true
        };
        tracing::info!(backend, drain, "backend taken out of rotation or put back");
        self.wake_scheduler();
        Some(changed)
    }

    /// Lift `backend`'s block on a workflow shape before its cooldown ends. `None`: no
    /// such backend; `Some(Err(()))`: another coordinator drives it; `Some(Ok(false))`:
    /// it has no such block.
    pub fn lift_block(&self, backend: &str, workflow_hash: &str) -> Option<Result<bool, ()>> {
        let events = {
            let mut backends = self.backends();
            let b = backends.get_mut(backend)?;
            if b.lease.is_none() {
                return Some(Err(()));
            }
            b.health.unblock(workflow_hash)
        };
        if events.is_empty() {
            return Some(Ok(false));
        }
        tracing::info!(backend, workflow_hash, "block lifted by an operator");
        self.publish_health(backend, events);
        self.wake_scheduler();
        Some(Ok(true))
    }

    /// The backends leased here, with their tokens.
    pub fn owned_leases(&self) -> Vec<(String, i64)> {
        if self.inner.cluster.is_none() {
            return Vec::new();
        }
        self.backends()
            .values()
            .filter_map(|b| b.lease.map(|t| (b.config.name.clone(), t)))
            .collect()
    }

    pub fn leases_backend(&self, name: &str) -> bool {
        self.backends().get(name).is_some_and(|b| b.lease.is_some())
    }

    /// A lease to give back when this coordinator has more than its share: an idle
    /// backend's if there is one. Never an agent's: only the coordinator it links to can
    /// drive it.
    pub fn lease_to_give_back(&self) -> Option<(String, i64)> {
        let backends = self.backends();
        let owned = || backends.values().filter(|b| b.lease.is_some() && !b.agent);
        owned()
            .find(|b| b.current.is_none())
            .or_else(|| owned().next())
            .and_then(|b| b.lease.map(|t| (b.config.name.clone(), t)))
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
    async fn recover_all(&self, mut running: Vec<Job>) -> Result<(), Error> {
        running.sort_by_key(|j| {
            j.live_attempt()
                .is_none_or(|a| a.status != gantry_core::AttemptStatus::Executing)
        });
        for job in running {
            self.recover(job).await?;
        }
        Ok(())
    }

    pub fn is_queued_here(&self, id: &JobId) -> bool {
        self.queue().keys.contains_key(id)
    }

    /// An attempt of the job runs (or waits) on a backend driven here.
    pub fn runs_here(&self, id: &JobId) -> bool {
        self.backends().values().any(|b| {
            [&b.current, &b.next]
                .iter()
                .any(|s| s.as_ref().is_some_and(|(j, _)| j == id))
        })
    }

    /// Take the stored state of a job another coordinator queued or took into the queue
    /// index. A queued one is left to that coordinator for `STEAL_MS` first: every
    /// coordinator racing to claim every job wastes writes, and the one that queued it
    /// dispatches it at once if it can.
    pub fn note_queued(&self, job: &Job) {
        const STEAL_MS: Millis = 50;
        self.queue()
            .note_from(job, &self.inner.config.timeouts, now_ms() + STEAL_MS);
        if job.state == JobState::Queued {
            self.wake_scheduler();
        }
    }

    /// Another coordinator finished the job or asked to cancel it: stop its attempt on
    /// the backend driven here.
    pub fn stop_here(&self, job: &Job) {
        let confirm = job.state == JobState::Running && job.cancel_requested;
        let backends = self.backends();
        for b in backends.values() {
            for slot in [&b.current, &b.next] {
                let Some((id, n)) = slot else { continue };
                if *id != job.id {
                    continue;
                }
                let Some(a) = job.attempts.get((*n as usize).saturating_sub(1)) else {
                    continue;
                };
                if job.state.is_terminal() || confirm {
                    let _ = b.commands.send(Command::Stop {
                        job_id: job.id.clone(),
                        attempt: *n,
                        prompt_id: a.prompt_id.clone(),
                        confirm,
                    });
                }
            }
        }
    }

    /// Commit a new job. The caller answers 202 only after this returns `New`.
    pub async fn submit(&self, spec: JobSpec, request_hash: &str) -> Result<Created, Error> {
        let job = Job::new(JobId::random(), spec, now_ms());
        let created = self.inner.store.create_job(&job, request_hash).await?;
        if let Created::New(event) = &created {
            self.queue().note(&job, &self.inner.config.timeouts);
            self.publish_persisted(vec![event.clone()]);
            self.wake_scheduler();
        }
        Ok(created)
    }

    /// As `apply`, holding `input` in memory while the store is unreachable and trying
    /// again with backoff until it is back (or the server stops): what a backend said
    /// about a running prompt is never dropped for want of a database. The scheduler
    /// and the API do not hold: they stop dispatching, and refuse with 503.
    pub async fn apply_held(&self, id: &JobId, input: Input) -> Result<Applied, Error> {
        let mut wait = Duration::from_millis(100);
        loop {
            match self.apply(id, input.clone()).await {
                Err(Error::Store(e)) if e.is_unavailable() => {
                    tracing::warn!(job_id = %id, input = input.name(), error = %e, "store unreachable: holding the change");
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => return Err(Error::Store(e)),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// Apply `input` to job `id`: recompute on a concurrent change, record late inputs.
    /// A queued job starts from the queue index's copy instead of reading its row; that
    /// is safe because the write is conditional on the version, and a refusal is decided
    /// on the stored row only.
    pub async fn apply(&self, id: &JobId, input: Input) -> Result<Applied, Error> {
        let mut cached = self.queue().hot(id);
        loop {
            let from_cache = cached.is_some();
            let job = match cached.take() {
                Some(job) => job,
                None => Arc::new(
                    self.inner
                        .store
                        .job(id)
                        .await?
                        .ok_or_else(|| Error::NotFound(id.clone()))?,
                ),
            };
            let now = now_ms();
            match transition(&job, input.clone(), now, &self.inner.policy) {
                Ok(mut applied) => {
                    let health = self.settle_failure(&job, &input, &mut applied, now);
                    let ended = self.attach_profiles(&job, &mut applied);
                    let stored = match self.fence(&job, &input) {
                        Some(fence) => {
                            self.inner
                                .store
                                .update_job_fenced(&applied.job, &applied.events, &fence)
                                .await
                        }
                        None => {
                            self.inner
                                .store
                                .update_job(&applied.job, &applied.events)
                                .await
                        }
                    };
                    match stored {
                        Ok(events) => {
                            if let Some(change) = health {
                                self.change_health(change, now);
                            }
                            self.sample_nodes(&applied.job, &ended);
                            if !ended.is_empty() {
                                let mut profiles = self.lock_profiles();
                                for n in ended {
                                    profiles.remove(&(id.clone(), n));
                                }
                            }
                            self.queue().note(&applied.job, &self.inner.config.timeouts);
                            if applied.job.state != JobState::Running {
                                self.lock_progress().remove(id);
                            }
                            self.publish_persisted(events);
                            self.hooks_after(&applied.job, &applied.events);
                            self.carry_out(&applied.job, applied.effects);
                            if applied.job.state != JobState::Running {
                                self.wake_scheduler();
                            }
                            return Ok(Applied::Changed(applied.job));
                        }
                        // Someone wrote first: reread.
                        Err(gantry_store::Error::Conflict { .. }) => continue,
                        Err(e @ gantry_store::Error::Fenced { .. }) => {
                            tracing::warn!(job_id = %id, error = %e, "write refused by its fence");
                            if let Some(cluster) = &self.inner.cluster {
                                cluster
                                    .fenced_writes
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                cluster.check.notify_one();
                            }
                            return Err(e.into());
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(_) if from_cache => {
                    // Refuse only on the stored truth, never on a copy a concurrent
                    // writer may not have refreshed yet.
                    continue;
                }
                Err(refused) => {
                    // The stored job is the truth: an index entry it contradicts goes.
                    self.queue().note(&job, &self.inner.config.timeouts);
                    if let Refused::Late { attempt, .. } = &refused {
                        tracing::info!(job_id = %id, attempt, input = input.name(), "late input recorded");
                        let events = self
                            .inner
                            .store
                            .append_events(
                                &job.id,
                                job.state,
                                now,
                                &[EventKind::Late {
                                    attempt: *attempt,
                                    input: input.name().to_owned(),
                                }],
                            )
                            .await?;
                        self.publish_persisted(events);
                    }
                    return Ok(Applied::Refused(refused, Arc::unwrap_or_clone(job)));
                }
            }
        }
    }

    /// Tells the webhook deliverer about a job that just ended here, and keeps the set of
    /// running jobs whose callback wants progress.
    fn hooks_after(&self, job: &Job, events: &[EventKind]) {
        let Some((callback, _)) = crate::hooks::effective(job, &self.inner.config.callbacks) else {
            return;
        };
        let ended = events.iter().any(|k| {
            matches!(
                k,
                EventKind::Succeeded { .. }
                    | EventKind::Failed { .. }
                    | EventKind::Cancelled { .. }
            )
        });
        if job.state == JobState::Running && callback.wants("progress") {
            let mut hooks = self
                .inner
                .progress_hooks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            hooks
                .entry(job.id.clone())
                .or_insert_with(|| Arc::new(callback.clone()));
        } else if job.state.is_terminal() {
            self.inner
                .progress_hooks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&job.id);
        }
        if ended && job.state.is_terminal() {
            let _ = self
                .inner
                .callbacks
                .send(crate::hooks::Notice::Ended(Arc::new(job.clone())));
        }
    }

    pub fn publish_live(&self, event: LiveEvent) {
        if let LiveKind::Progress { node, value, max } = &event.kind {
            let hook = self
                .inner
                .progress_hooks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&event.job_id)
                .cloned();
            if let Some(callback) = hook {
                let body = serde_json::json!({
                    "event": "progress",
                    "job_id": event.job_id.to_string(),
                    "attempt": event.attempt,
                    "backend": event.backend,
                    "node": node,
                    "value": value,
                    "max": max,
                });
                let _ = self.inner.callbacks.send(crate::hooks::Notice::Progress {
                    job_id: event.job_id.clone(),
                    callback,
                    body,
                });
            }
        }
        match &event.kind {
            LiveKind::Log { .. } => {}
            LiveKind::Progress { node, value, max } => {
                self.note_progress(&event.job_id, event.attempt, &event.backend, |p| {
                    if p.node.as_deref() != Some(node) {
                        p.node = Some(node.clone());
                        p.class_type = None;
                    }
                    (p.value, p.max) = (Some(*value), Some(*max));
                });
            }
        }
        self.inner
            .bus
            .publish(BusEvent::Live(Arc::new(crate::bus::Published::new(event))));
    }

    /// Change what the monitor shows of a running job's progress (`progress_of`).
    fn note_progress(
        &self,
        job: &JobId,
        attempt: u32,
        backend: &str,
        f: impl FnOnce(&mut gantry_api::Progress),
    ) {
        let mut progress = self.lock_progress();
        let p = progress
            .entry(job.clone())
            .or_insert_with(|| gantry_api::Progress {
                job_id: job.to_string(),
                attempt,
                backend: backend.to_owned(),
                node: None,
                class_type: None,
                value: None,
                max: None,
            });
        if p.attempt != attempt {
            p.attempt = attempt;
            backend.clone_into(&mut p.backend);
            (p.node, p.class_type, p.value, p.max) = (None, None, None, None);
        }
        f(p);
    }

    fn carry_out(&self, job: &Job, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::StopAttempt {
                    attempt,
                    backend,
                    prompt_id,
                } => {
                    // A cancel waits for the backend's confirmation; a superseded attempt
                    // (a late success won) is stopped and forgotten.
                    let confirm = job.state == JobState::Running && job.cancel_requested;
                    let backends = self.backends();
                    if let Some(b) = backends.get(&backend) {
                        let _ = b.commands.send(Command::Stop {
                            job_id: job.id.clone(),
                            attempt,
                            prompt_id,
                            confirm,
                        });
                    }
                }
            }
        }
    }

    /// Hand a job found running at start-up back to its backend's driver.
    async fn recover(&self, job: Job) -> Result<(), Error> {
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

    /// The scheduler loop: whenever woken (or every second, for backoffs and queue
    /// timeouts), give queued jobs to idle backends in priority order.
    async fn schedule(self) {
        loop {
            let next = match self.schedule_once().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "scheduling pass failed");
                    None
                }
            };
            // Wake when a backoff ends or a block lifts, not only on the next tick.
            let tick = Duration::from_millis(500);
            let nap = next
                .map(|at| Duration::from_millis((at - now_ms()).max(0) as u64))
                .map_or(tick, |d| d.min(tick));
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Delete jobs that finished longer than `retention` ago, and node statistics of
    /// hours older than `stats_retention`, once a minute.
    async fn purge_loop(self) {
        const PASS: u32 = 1000;
        let retention = self.inner.config.retention.as_millis() as Millis;
        loop {
            let before = now_ms() - retention;
            let mut more = retention > 0;
            while more {
                more = false;
                match self.inner.store.purge_finished(before, PASS).await {
                    Ok(n) if n == u64::from(PASS) => more = true,
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "purged finished jobs past retention"),
                    Err(e) => tracing::warn!(error = %e, "cannot purge finished jobs"),
                }
            }
            let stats = self.inner.config.stats_retention.as_millis() as Millis;
            if stats > 0 {
                match self.inner.store.purge_node_stats(now_ms() - stats).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(rows = n, "purged node statistics past retention"),
                    Err(e) => tracing::warn!(error = %e, "cannot purge node statistics"),
                }
            }
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        }
    }

    /// Lift the blocks whose cooldown is over.
    fn expire_blocks(&self, now: Millis) {
        let lifted: Vec<(String, Vec<HealthEvent>)> = self
            .backends()
            .values_mut()
            .filter(|b| b.health.next_change().is_some_and(|at| at <= now))
            .map(|b| (b.config.name.clone(), b.health.expire(now)))
            .collect();
        for (backend, events) in lifted {
            self.publish_health(&backend, events);
        }
    }

    /// One pass over the queue; answers when the next backoff, block or timeout ends.
    ///
    /// Timeouts come from the index of expiries, so only the jobs whose time is up are
    /// looked at. Dispatching asks each group of alike jobs (see `QueueIndex`) in
    /// priority order while some backend is idle, so a pass costs the same with 100 or
    /// 100 000 jobs waiting. Every `SWEEP_MS` every group is asked even with no backend
    /// idle, so a job that can never run fails promptly.
    async fn schedule_once(&self) -> Result<Option<Millis>, Error> {
        const SWEEP_MS: Millis = 200;
        let now = now_ms();
        self.expire_blocks(now);
        let mut next: Option<Millis> = self
            .backends()
            .values()
            .filter_map(|b| b.health.next_change())
            .min();
        self.expire_queued(now).await?;
        let sweep = {
            let mut last = self
                .inner
                .last_sweep
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let due = now - *last >= SWEEP_MS;
            if due {
                *last = now;
            }
            due
        };
        let pipeline = self.inner.config.pipeline;
        let idle = |backends: &IndexMap<String, BackendState>| {
            backends.values().any(|b| {
                b.connection == Connection::Connected
                    && !b.draining
                    && b.health.accepts_work()
                    && (b.current.is_none() || (pipeline && b.accepts_next && b.next.is_none()))
            })
        };
        let earliest = |next: Option<Millis>, q: &QueueIndex| {
            // One whose expiry was refused stays behind: it must not make the loop spin.
            let expiry = q.expiries.iter().map(|(at, _)| *at).find(|at| *at > now);
            [next, expiry, Some(now + SWEEP_MS)]
                .into_iter()
                .flatten()
                .min()
        };
        if !sweep && !idle(&self.backends()) {
            return Ok(earliest(next, &self.queue()));
        }
        // The head of each group, best first.
        let mut heads = std::collections::BinaryHeap::new();
        {
            let q = self.queue();
            for g in q.groups.keys() {
                if let Some(key) = q.eligible(*g, None, now, &mut next) {
                    heads.push(Reverse((key, *g)));
                }
            }
        }
        let any_blocks = self
            .backends()
            .values()
            .any(|b| !b.health.blocks().is_empty() || !b.health.accepts_work());
        let mut dispatches = Vec::new();
        while let Some(Reverse((key, g))) = heads.pop() {
            let hot = self.queue().hot(&key.2);
            let job = match hot {
                Some(job) => job,
                None => match self.inner.store.job(&key.2).await? {
                    Some(job) if job.state == JobState::Queued => Arc::new(job),
                    other => {
                        // The index was behind the store: take the stored state.
                        if let Some(job) = other {
                            self.queue().note(&job, &self.inner.config.timeouts);
                        }
                        if let Some(key) = self.queue().eligible(g, Some(&key), now, &mut next) {
                            heads.push(Reverse((key, g)));
                        }
                        continue;
                    }
                },
            };
            let random = self.inner.config.routing == crate::config::Routing::Random;
            // Other groups' heads of the same priority that a free backend may take
            // instead, when it is warm for their model files and cold for this job's
            // (ComfyUI reloads weights it does not hold: seconds per job). Bounded: a
            // job is passed over at most `MAX_PASSED` times.
            let job_models: Vec<String> = job.spec.workflow.model_files();
            let mut others: Vec<(QueueKey, u64, Arc<Job>)> = Vec::new();
            let mut set_aside = Vec::new();
            if !random && !job_models.is_empty() && self.queue().passed(&job.id) < MAX_PASSED {
                let q = self.queue();
                while others.len() < LOOKAHEAD {
                    let Some(Reverse((k, og))) = heads.peek().cloned() else {
                        break;
                    };
                    if k.0 != key.0 {
                        break;
                    }
                    heads.pop();
                    if let Some(other) = q.hot(&k.2) {
                        others.push((k, og, other));
                    } else {
                        set_aside.push(Reverse((k, og)));
                    }
                }
            }
            let (taken, choice) = {
                let mut backends = self.backends();
                let slow = self.lock_slow();
                if !sweep && !idle(&backends) {
                    break;
                }
                let view = Scheduling {
                    backends: &backends,
                    slow: &slow,
                    any_blocks,
                    random,
                    pipeline,
                    now,
                };
                let (choice, behind) = view.choose(&job, None);
                // The job dispatched now: this one, or another group's head.
                let mut taken = None;
                if let Ok(name) = &choice {
                    let warm = |models: &[String]| {
                        backends
                            .get(name)
                            .is_some_and(|b| models.iter().all(|m| b.warm_models.contains(m)))
                    };
                    if !warm(&job_models) {
                        taken = others.iter().position(|(_, _, other)| {
                            let models: Vec<String> = other.spec.workflow.model_files();
                            !models.is_empty()
                                && warm(&models)
                                && view.choose(other, Some(name)) == (Ok(name.clone()), behind)
                        });
                    }
                }
                let job = match taken {
                    Some(i) => &others[i].2,
                    None => &job,
                };
                if let Ok(backend) = &choice {
                    if let Some(b) = backends.get_mut(backend) {
                        // Reserve before the dispatch commits, so no other job takes it.
                        let slot = Some((job.id.clone(), job.attempts.len() as u32 + 1));
                        if behind {
                            b.next = slot;
                            b.accepts_next = false;
                        } else {
                            b.current = slot;
                        }
                        b.last_used = now;
                        b.warm_models = job.spec.workflow.model_files();
                    }
                }
                (taken, choice)
            };
            // What was looked at and not taken goes back; so does this job when another
            // took its place (it is the best head still).
            let (job, key, g) = match taken {
                Some(i) => {
                    let (k, og, other) = others.swap_remove(i);
                    self.queue().pass(&job.id);
                    heads.push(Reverse((key, g)));
                    (other, k, og)
                }
                None => (job, key, g),
            };
            heads.extend(others.into_iter().map(|(k, og, _)| Reverse((k, og))));
            heads.extend(set_aside);
            let go_on = match choice {
                Ok(backend) => {
                    dispatches.push((job, backend));
                    true
                }
                Err(Choice::Never(error)) => {
                    self.apply(&job.id, Input::Unroutable { error }).await?;
                    true
                }
                // The rest of the group would wait alike.
                Err(Choice::Run(_) | Choice::Wait(_)) => false,
            };
            if go_on {
                if let Some(key) = self.queue().eligible(g, Some(&key), now, &mut next) {
                    heads.push(Reverse((key, g)));
                }
            }
        }
        // The dispatches commit together (the store groups concurrent writes).
        let results = futures_util::future::join_all(
            dispatches
                .iter()
                .map(|(job, backend)| self.dispatch(job, backend)),
        )
        .await;
        for r in results {
            r?;
        }
        Ok(earliest(next, &self.queue()))
    }

    /// Fail the queued jobs whose deadline or queue timeout has passed.
    async fn expire_queued(&self, now: Millis) -> Result<(), Error> {
        let due: Vec<JobId> = self
            .queue()
            .expiries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| id.clone())
            .collect();
        for id in due {
            let hot = self.queue().hot(&id);
            let job = match hot {
                Some(job) => job,
                None => match self.inner.store.job(&id).await? {
                    Some(job) => Arc::new(job),
                    None => continue,
                },
            };
            let timeouts = job.spec.timeouts.or(&self.inner.config.timeouts);
            if let Some(limit) = timeouts.deadline_ms.filter(|ms| *ms > 0) {
                if now - job.created_at >= limit as i64 {
                    self.apply(&job.id, Input::DeadlinePassed { limit_ms: limit })
                        .await?;
                    continue;
                }
            }
            if let Some(limit) = timeouts.queue_ms.filter(|ms| *ms > 0) {
                self.apply(&job.id, Input::QueueTimeout { limit_ms: limit })
                    .await?;
            }
        }
        Ok(())
    }

    async fn dispatch(&self, job: &Job, backend: &str) -> Result<(), Error> {
        let prompt_id = uuid::Uuid::new_v4().to_string();
        let reserved = (job.id.clone(), job.attempts.len() as u32 + 1);
        let applied = self
            .apply(
                &job.id,
                Input::Dispatch {
                    backend: backend.to_owned(),
                    prompt_id,
                },
            )
            .await;
        let mut backends = self.backends();
        let Some(b) = backends.get_mut(backend) else {
            return Ok(());
        };
        // The reservation may have moved from `next` to `current` meanwhile (the prompt
        // ahead ended): clear it wherever it is.
        let release = |b: &mut BackendState| {
            if b.current.as_ref() == Some(&reserved) {
                b.current = b.next.take();
            } else if b.next.as_ref() == Some(&reserved) {
                b.next = None;
            }
        };
        match applied {
            Ok(Applied::Changed(job)) => {
                if let Some(attempt) = job.live_attempt() {
                    let limits = self.limits_for(&job, backend);
                    let assignment = Assignment::new(&job, attempt, limits, false);
                    let _ = b.commands.send(Command::Run(Box::new(assignment)));
                } else {
                    release(b);
                }
                Ok(())
            }
            Ok(Applied::Refused(..)) => {
                release(b);
                Ok(())
            }
            Err(e) => {
                release(b);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconnection_never_forgets_known_classes() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut b = BackendState::new(BackendConfig::parse("gpu-1=http://h:1").unwrap(), tx);
        assert!(b.learn_classes(["KSampler".to_owned()].into(), ModelChoices::default()));
        // Seed 002: a re-registration with nothing in it must not blank the record.
        assert!(!b.learn_classes(HashSet::new(), ModelChoices::default()));
        let classes = b.classes.as_deref().unwrap();
        assert!(classes.contains("KSampler"));
        assert_eq!(b.config.name, "gpu-1");
    }
}
