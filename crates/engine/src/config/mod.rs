//! The server's configuration: command-line values layered over an optional TOML file.
//! Durations are human (`30s`, `5m`) in the file and milliseconds inside.

mod file;
#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;

use file::*;
use gantry_core::health::HealthPolicy;
use gantry_core::watchdog::ClassTimeouts;
use gantry_core::Timeouts;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8700";

/// How an agent's backend URL is stored: `agent://NAME?id=ID` (see `agents`).
pub const AGENT_SCHEME: &str = "agent://";

#[derive(Clone, Debug, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    pub url: String,
    pub tags: Vec<String>,
    /// Higher is preferred.
    pub priority: i32,
    /// This backend's timeouts: between a node class's and the global defaults.
    pub timeouts: Timeouts,
    /// An in-process backend with these node classes that finishes every prompt at once
    /// (`instant.rs`, for `gantry bench engine`); never set from a file.
    pub instant: Option<Vec<String>>,
}

impl BackendConfig {
    /// Parse `[NAME=]URL`; the name defaults to the URL's host:port.
    pub fn parse(spec: &str) -> Result<BackendConfig, Error> {
        let (name, url) = match spec.split_once('=') {
            Some((name, url)) if !name.contains("://") => (Some(name.trim()), url.trim()),
            _ => (None, spec.trim()),
        };
        let parsed = url::Url::parse(url).map_err(|e| Error::Backend {
            spec: spec.to_owned(),
            reason: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(Error::Backend {
                spec: spec.to_owned(),
                reason: "the URL must be http:// or https:// with a host".into(),
            });
        }
        let name = match name {
            Some("") => {
                return Err(Error::Backend {
                    spec: spec.to_owned(),
                    reason: "the name before = is empty".into(),
                })
            }
            Some(name) => name.to_owned(),
            None => match parsed.port_or_known_default() {
                Some(port) => format!("{}:{port}", parsed.host_str().unwrap_or_default()),
                None => parsed.host_str().unwrap_or_default().to_owned(),
            },
        };
        Ok(BackendConfig {
            name,
            url: url.to_owned(),
            tags: Vec::new(),
            priority: 0,
            timeouts: Timeouts::default(),
            instant: None,
        })
    }

    /// A backend added at run time, as the store keeps it; `None` (with a warning) when
    /// its stored URL is no longer valid.
    pub fn added(b: &gantry_store::BackendRecord) -> Option<BackendConfig> {
        // An agent's backend: its loopback listener is made at start (`Agents::reserve`).
        if b.url.starts_with(AGENT_SCHEME) {
            return Some(BackendConfig {
                name: b.name.clone(),
                url: b.url.clone(),
                tags: b.tags.clone(),
                priority: b.priority,
                timeouts: Timeouts::default(),
                instant: None,
            });
        }
        match BackendConfig::parse(&format!("{}={}", b.name, b.url)) {
            Ok(mut config) => {
                config.tags = b.tags.clone();
                config.priority = b.priority;
                Some(config)
            }
            Err(e) => {
                tracing::warn!(backend = %b.name, error = %e, "a stored backend is not valid; skipped");
                None
            }
        }
    }

    /// An in-process backend that finishes every prompt at once, knowing `classes`.
    pub fn instant(name: &str, classes: Vec<String>) -> BackendConfig {
        BackendConfig {
            name: name.to_owned(),
            url: format!("instant://{name}"),
            tags: Vec::new(),
            priority: 0,
            timeouts: Timeouts::default(),
            instant: Some(classes),
        }
    }
}

/// Where jobs are kept.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreConfig {
    /// The embedded SQLite file in the data dir.
    Embedded,
    /// A PostgreSQL database, shared by every coordinator of a farm.
    Postgres(String),
}

impl StoreConfig {
    /// `postgres://USER@HOST/DB` (or `postgresql://`), or `embedded`.
    pub fn parse(s: &str) -> Result<StoreConfig, Error> {
        let s = s.trim();
        if s == "embedded" || s.is_empty() {
            return Ok(StoreConfig::Embedded);
        }
        match url::Url::parse(s) {
            Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => {
                Ok(StoreConfig::Postgres(s.to_owned()))
            }
            Ok(u) => Err(Error::Store(format!(
                "{s}: a {} store is not supported (give postgres://USER@HOST/DB, or embedded)",
                u.scheme()
            ))),
            Err(e) => Err(Error::Store(format!(
                "{s}: {e} (give postgres://USER@HOST/DB, or embedded)"
            ))),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub store: StoreConfig,
    /// Where output files are kept; every coordinator of a Postgres farm must name the
    /// same shared folder. The data dir when unset (embedded store only).
    pub artifacts: Option<PathBuf>,
    /// Finished jobs are deleted this long after they finished; zero keeps them for ever.
    pub retention: Duration,
    /// Node statistics (`/v1/stats/nodes`, adaptive limits) of hours older than this are
    /// deleted; zero keeps them for ever.
    pub stats_retention: Duration,
    /// With a postgres store: this coordinator's id among those sharing the database
    /// (random when unset), and how long a backend lease lasts without renewal.
    pub coordinator: Option<String>,
    pub lease: Duration,
    pub backends: Vec<BackendConfig>,
    /// Global timeout defaults; a job's own values come first.
    pub timeouts: Timeouts,
    /// Per node class limits (`[timeouts.node_class]`), between the job's and the backend's.
    pub node_class: Arc<BTreeMap<String, ClassTimeouts>>,
    /// How long a command job may run, per operation (`[timeouts.command]`; the key
    /// `default`, 30 s unless set, for the rest); the job's own `timeout_ms` comes first.
    pub command_timeouts: Arc<BTreeMap<String, Duration>>,
    /// Blocks after a backend fault, and the circuit breaker.
    pub health: HealthPolicy,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Webhooks: the default callback, the hosts callbacks may name, retries.
    pub callbacks: crate::hooks::CallbackConfig,
    /// This server's URL as clients reach it (outputs' URLs in callbacks); the address it
    /// listens on when unset.
    pub public_url: Option<String>,
    /// Largest input file a job may attach (`POST /v1/files`, or inline in a submit,
    /// where the body limit applies too).
    pub max_attachment_bytes: u64,
    /// A client of `/v1/events` this many events behind is told to `resync` (fetch
    /// `/v1/state` again) rather than sent the backlog.
    pub resync_gap: i64,
    /// How long a cancelled running job waits for its backend to confirm.
    pub cancel_grace: Duration,
    /// With an attempt in flight and nothing heard for this long, poll the backend.
    pub liveness: Duration,
    /// An agent link is pinged this often, and closed when nothing came over it for
    /// three times as long (a NAT that forgot the connection loses every byte silently).
    pub agent_heartbeat: Duration,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Queue the next job on a backend while its current one runs, so the GPU never waits
    /// for the orchestrator between two prompts.
    pub pipeline: bool,
    /// Serve on a non-loopback address while no token exists (the API open to anyone
    /// who can reach it).
    pub insecure: bool,
    /// Node-stall limits from history, for the classes that opt in (`[adaptive]`).
    pub adaptive: Option<Adaptive>,
    /// How the scheduler picks among idle backends.
    pub routing: Routing,
}

/// `routing = "warm"` (the default): prefer a backend warm for the job's models and not
/// much slower for its classes; `"random"`: any idle backend, by chance, as a baseline
/// to measure that preference against (`gantry bench routing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    Warm,
    Random,
}

/// `[adaptive]`: a node's stall limit becomes `max(floor, factor x p99)` of its class's
/// durations on that backend, or farm-wide when the backend has fewer than
/// `min_samples`; with fewer everywhere, the configured limit stays.
#[derive(Clone, Debug, PartialEq)]
pub struct Adaptive {
    /// The node classes it applies to; `*` for all.
    pub classes: Vec<String>,
    pub factor: f64,
    pub floor: Duration,
    pub min_samples: u64,
}

impl Default for Adaptive {
    /// What `[adaptive]` sets where it is silent (and what suggestions assume when it is
    /// off): every class, 3 x p99, a 30 s floor, 20 runs.
    fn default() -> Adaptive {
        Adaptive {
            classes: vec!["*".into()],
            factor: 3.0,
            floor: Duration::from_secs(30),
            min_samples: 20,
        }
    }
}

impl Adaptive {
    pub fn applies_to(&self, class: &str) -> bool {
        self.classes.iter().any(|c| c == "*" || c == class)
    }
}

impl Config {
    /// How long `command` may run: its own `timeout_ms`, else its operation's limit in
    /// `[timeouts.command]`, else that table's `default`.
    pub fn command_timeout(&self, command: &gantry_core::CommandSpec) -> Duration {
        if let Some(ms) = command.timeout_ms.filter(|ms| *ms > 0) {
            return Duration::from_millis(ms);
        }
        command
            .operation
            .as_deref()
            .and_then(|op| self.command_timeouts.get(op))
            .or_else(|| self.command_timeouts.get("default"))
            .copied()
            .unwrap_or(Duration::from_secs(30))
    }

    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Config {
        Config {
            listen,
            data_dir,
            store: StoreConfig::Embedded,
            artifacts: None,
            retention: Duration::from_secs(30 * 24 * 3600),
            stats_retention: Duration::from_secs(90 * 24 * 3600),
            coordinator: None,
            lease: Duration::from_secs(10),
            backends: Vec::new(),
            timeouts: Timeouts {
                submit_ms: Some(10_000),
                start_ms: Some(30_000),
                first_progress_ms: Some(600_000),
                node_stall_ms: Some(300_000),
                deadline_ms: Some(0),
                queue_ms: Some(0),
            },
            node_class: Arc::default(),
            command_timeouts: Arc::new(BTreeMap::from([(
                "default".to_owned(),
                Duration::from_secs(30),
            )])),
            health: HealthPolicy::default(),
            max_body_bytes: 32 * 1024 * 1024,
            max_attachment_bytes: 64 * 1024 * 1024,
            callbacks: crate::hooks::CallbackConfig::default(),
            public_url: None,
            cancel_grace: Duration::from_secs(10),
            liveness: Duration::from_secs(10),
            agent_heartbeat: Duration::from_secs(5),
            resync_gap: 10_000,
            max_attempts: 3,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            pipeline: true,
            insecure: false,
            adaptive: None,
            routing: Routing::Warm,
        }
    }

    /// Apply a TOML config file over `self`. Backends in the file come after (and may
    /// describe, by name, the tags and priority of) those given on the command line.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        self.apply_toml(&text).map_err(|e| Error::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Apply TOML text over `self`; on an error `self` is left as it was.
    pub fn apply_toml(&mut self, text: &str) -> Result<(), Error> {
        let mut next = self.clone();
        next.apply_toml_over(text)?;
        *self = next;
        Ok(())
    }

    fn apply_toml_over(&mut self, text: &str) -> Result<(), Error> {
        let file: FileConfig = toml::from_str(text).map_err(|e| Error::Toml(e.to_string()))?;
        if let Some(listen) = file.listen {
            self.listen = listen;
        }
        if let Some(dir) = file.data_dir {
            self.data_dir = dir;
        }
        if let Some(store) = &file.store {
            self.store = StoreConfig::parse(store)?;
        }
        if let Some(dir) = file.artifacts {
            self.artifacts = Some(dir);
        }
        if let Some(size) = file.max_body_bytes {
            self.max_body_bytes = size;
        }
        if let Some(size) = file.max_attachment_bytes {
            self.max_attachment_bytes = size;
        }
        if let Some(url) = file.public_url {
            self.public_url = Some(url.trim_end_matches('/').to_owned());
        }
        let d = |key: &str, v: &Option<String>| -> Result<Option<Duration>, Error> {
            v.as_deref().map(|s| parse_duration(key, s)).transpose()
        };
        if let Some(c) = file.callback {
            let key = |k: &str| format!("callback.{k}");
            if let Some(hosts) = c.allow_hosts {
                self.callbacks.allow_hosts = hosts;
            }
            if let Some(v) = d(&key("retry_for"), &c.retry_for)? {
                self.callbacks.retry_for = v;
            }
            if let Some(v) = d(&key("backoff"), &c.backoff)? {
                self.callbacks.backoff = v;
            }
            if let Some(v) = d(&key("timeout"), &c.timeout)? {
                self.callbacks.timeout = v;
            }
            if let Some(url) = c.url {
                let req = gantry_api::CallbackRequest {
                    url,
                    events: c.events,
                    secret: c.secret,
                };
                let cb = crate::hooks::parse(&req, &self.callbacks.allow_hosts)
                    .map_err(|e| Error::Toml(format!("[callback] {e}")))?;
                self.callbacks.default = Some(cb);
            } else if c.events.is_some() || c.secret.is_some() {
                return Err(Error::Toml(
                    "[callback] events and secret need a url (the default callback's)".into(),
                ));
            }
        }
        if let Some(n) = file.max_attempts {
            self.max_attempts = n;
        }
        if let Some(v) = d("cancel_grace", &file.cancel_grace)? {
            self.cancel_grace = v;
        }
        if let Some(v) = d("liveness", &file.liveness)? {
            self.liveness = v;
        }
        if let Some(v) = d("agent_heartbeat", &file.agent_heartbeat)? {
            if v.is_zero() {
                return Err(Error::Toml(
                    "agent_heartbeat = \"0s\": a link needs a heartbeat".into(),
                ));
            }
            self.agent_heartbeat = v;
        }
        if let Some(v) = file.resync_gap {
            self.resync_gap = i64::from(v.get());
        }
        if let Some(v) = d("retention", &file.retention)? {
            self.retention = v;
        }
        if let Some(v) = d("stats_retention", &file.stats_retention)? {
            self.stats_retention = v;
        }
        if let Some(v) = d("lease", &file.lease)? {
            self.lease = v;
        }
        if let Some(id) = file.coordinator {
            self.coordinator = Some(id);
        }
        let ms = |v: Option<Duration>| v.map(|d| d.as_millis() as u64);
        if let Some(v) = d("block_cooldown", &file.block_cooldown)? {
            self.health.block_ms = v.as_millis() as u64;
        }
        if let Some(v) = d("circuit_cooldown", &file.circuit_cooldown)? {
            self.health.circuit_ms = v.as_millis() as u64;
            self.health.circuit_max_ms = self.health.circuit_max_ms.max(self.health.circuit_ms);
        }
        if let Some(n) = file.circuit_threshold {
            self.health.circuit_threshold = n;
        }
        if let Some(a) = &file.adaptive {
            if a.classes.is_empty() {
                return Err(Error::Toml(
                    "adaptive.classes is empty: name the node classes (or \"*\" for all)".into(),
                ));
            }
            let defaults = Adaptive::default();
            let factor = a.factor.unwrap_or(defaults.factor);
            if !(1.0..=100.0).contains(&factor) {
                return Err(Error::Toml(format!(
                    "adaptive.factor = {factor}: it must be from 1 to 100"
                )));
            }
            self.adaptive = Some(Adaptive {
                classes: a.classes.clone(),
                factor,
                floor: d("adaptive.floor", &a.floor)?.unwrap_or(defaults.floor),
                min_samples: a.min_samples.unwrap_or(defaults.min_samples).max(1),
            });
        }
        match file.routing.as_deref() {
            None => {}
            Some("warm") => self.routing = Routing::Warm,
            Some("random") => self.routing = Routing::Random,
            Some(other) => {
                return Err(Error::Toml(format!(
                    "routing = {other:?}: use \"warm\" or \"random\""
                )))
            }
        }
        if let Some(v) = file.insecure {
            self.insecure = v;
        }
        if let Some(v) = file.pipeline {
            self.pipeline = v;
        }
        if let Some(v) = d("backoff_base", &file.backoff_base)? {
            self.backoff_base = v;
        }
        if let Some(v) = d("backoff_max", &file.backoff_max)? {
            self.backoff_max = v;
        }
        let given = file.timeouts.parse("timeouts")?;
        self.timeouts = given.or(&self.timeouts);
        if !file.timeouts.node_class.is_empty() {
            let mut classes = (*self.node_class).clone();
            for (class, v) in &file.timeouts.node_class {
                let key = format!("timeouts.node_class.{class}");
                let limits = match v {
                    FileClassTimeout::Both(s) => {
                        let v = ms(Some(parse_duration(&key, s)?));
                        ClassTimeouts {
                            first_progress_ms: v,
                            node_stall_ms: v,
                        }
                    }
                    FileClassTimeout::Each {
                        first_progress,
                        node_stall,
                    } => ClassTimeouts {
                        first_progress_ms: ms(d(&format!("{key}.first_progress"), first_progress)?),
                        node_stall_ms: ms(d(&format!("{key}.node_stall"), node_stall)?),
                    },
                };
                classes.insert(class.clone(), limits);
            }
            self.node_class = Arc::new(classes);
        }
        if !file.timeouts.command.is_empty() {
            let mut ops = (*self.command_timeouts).clone();
            for (op, v) in &file.timeouts.command {
                let limit = parse_duration(&format!("timeouts.command.{op}"), v)?;
                if limit.is_zero() {
                    return Err(Error::Toml(format!(
                        "timeouts.command.{op} = {v:?}: a command must have a limit"
                    )));
                }
                ops.insert(op.clone(), limit);
            }
            self.command_timeouts = Arc::new(ops);
        }
        for b in file.backends {
            let mut parsed = match (&b.url, self.backends.iter().position(|c| c.name == b.name)) {
                (_, Some(idx)) => self.backends.remove(idx),
                (Some(url), None) => BackendConfig::parse(&format!("{}={url}", b.name))?,
                (None, None) => {
                    return Err(Error::Toml(format!(
                        "backend {}: no url, and no --backend of that name",
                        b.name
                    )))
                }
            };
            if let Some(url) = b.url {
                parsed.url = url;
            }
            parsed.tags = b.tags;
            parsed.priority = b.priority;
            if let Some(t) = &b.timeouts {
                if !t.node_class.is_empty() || !t.command.is_empty() {
                    return Err(Error::Toml(format!(
                        "backend {}: node_class and command limits are global ([timeouts.node_class], [timeouts.command])",
                        b.name
                    )));
                }
                if t.deadline.is_some() || t.queue.is_some() {
                    return Err(Error::Toml(format!(
                        "backend {}: deadline and queue are limits of a job, not of a backend ([timeouts] or the job's own)",
                        b.name
                    )));
                }
                parsed.timeouts = t.parse(&format!("backends.{}.timeouts", b.name))?;
            }
            self.backends.push(parsed);
        }
        Ok(())
    }

    /// Check what cannot be checked while parsing.
    pub fn validate(&self) -> Result<(), Error> {
        let mut names = std::collections::HashSet::new();
        for b in &self.backends {
            if !names.insert(&b.name) {
                return Err(Error::Toml(format!(
                    "two backends are named {}: give each a unique NAME=URL",
                    b.name
                )));
            }
        }
        if matches!(self.store, StoreConfig::Postgres(_)) && self.artifacts.is_none() {
            return Err(Error::Store(
                "a postgres store needs --artifacts DIR: a folder every coordinator shares, \
                 so outputs are reachable from all of them"
                    .into(),
            ));
        }
        if self.lease < Duration::from_millis(300) {
            return Err(Error::Toml(format!(
                "lease ({}) is too short: coordinators renew every third of it (at least 300ms)",
                humantime::format_duration(self.lease)
            )));
        }
        if self.max_attempts == 0 {
            return Err(Error::Toml("max_attempts must be at least 1".into()));
        }
        if self.backoff_max < self.backoff_base {
            return Err(Error::Toml(format!(
                "backoff_max ({}) is shorter than backoff_base ({})",
                humantime::format_duration(self.backoff_max),
                humantime::format_duration(self.backoff_base)
            )));
        }
        Ok(())
    }
}

/// A duration of the file: a longer one than gantry's longest limit (ten years) is
/// refused, since timers add it to the clock.
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, Error> {
    let error = |reason: String| Error::Duration {
        key: key.to_owned(),
        value: s.to_owned(),
        reason,
    };
    let d = humantime::parse_duration(s).map_err(|e| error(e.to_string()))?;
    if d > Duration::from_millis(gantry_core::MAX_LIMIT_MS) {
        return Err(error("longer than the longest limit, 10 years".into()));
    }
    Ok(d)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--backend {spec}: {reason}")]
    Backend { spec: String, reason: String },
    #[error("config {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Toml(String),
    #[error("store {0}")]
    Store(String),
    #[error("{key} = {value:?}: {reason} (write durations like 30s, 5m or 1h30m)")]
    Duration {
        key: String,
        value: String,
        reason: String,
    },
}

impl FileTimeouts {
    fn parse(&self, prefix: &str) -> Result<Timeouts, Error> {
        let ms = |key: &str, v: &Option<String>| -> Result<Option<u64>, Error> {
            v.as_deref()
                .map(|s| {
                    parse_duration(&format!("{prefix}.{key}"), s).map(|d| d.as_millis() as u64)
                })
                .transpose()
        };
        Ok(Timeouts {
            submit_ms: ms("submit", &self.submit)?,
            start_ms: ms("start", &self.start)?,
            first_progress_ms: ms("first_progress", &self.first_progress)?,
            node_stall_ms: ms("node_stall", &self.node_stall)?,
            deadline_ms: ms("deadline", &self.deadline)?,
            queue_ms: ms("queue", &self.queue)?,
        })
    }
}
