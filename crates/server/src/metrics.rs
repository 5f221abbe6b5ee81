//! `GET /metrics`: the engine in the Prometheus (OpenMetrics) text format.
//!
//! Counters and histograms are fed by a task that follows the event bus, so nothing on
//! a job's path measures itself: attempts, failures by code, timeouts by phase, queue
//! time (queued -> dispatched), dispatch latency (dispatched -> accepted by the backend),
//! node duration by class (one node's start to the next's, or to the attempt's end).
//! Gauges (jobs by state, backends by status, open event streams) are read at scrape.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast;

use gantry_core::{EventKind, JobId, JobState, Millis};

use crate::bus::BusEvent;
use crate::engine::Engine;
use gantry_api::BackendStatus;

type Labels = Vec<(String, String)>;

fn seconds() -> Histogram {
    // 1 ms to about 9 hours.
    Histogram::new(exponential_buckets(0.001, 2.0, 25))
}

pub struct Metrics {
    registry: Registry,
    attempts: Counter,
    failures: Family<Labels, Counter>,
    timeouts: Family<Labels, Counter>,
    queue_time: Histogram,
    dispatch_latency: Histogram,
    node_duration: Family<Labels, Histogram, fn() -> Histogram>,
    jobs: Family<Labels, Gauge>,
    backends: Family<Labels, Gauge>,
    streams_gauge: Gauge,
    /// Event streams open now (`StreamGuard`).
    streams: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("gantry");
        let m = Metrics {
            attempts: Counter::default(),
            failures: Family::default(),
            timeouts: Family::default(),
            queue_time: seconds(),
            dispatch_latency: seconds(),
            node_duration: Family::new_with_constructor(seconds),
            jobs: Family::default(),
            backends: Family::default(),
            streams_gauge: Gauge::default(),
            streams: AtomicI64::new(0),
            registry: Registry::default(),
        };
        registry.register(
            "attempts",
            "Attempts dispatched to a backend",
            m.attempts.clone(),
        );
        registry.register(
            "attempt_failures",
            "Attempts that failed, by error code",
            m.failures.clone(),
        );
        registry.register(
            "timeouts",
            "Attempts timed out, by phase",
            m.timeouts.clone(),
        );
        registry.register(
            "queue_time_seconds",
            "Time a job waited in the queue before a dispatch",
            m.queue_time.clone(),
        );
        registry.register(
            "dispatch_latency_seconds",
            "Time from a dispatch to the backend accepting the prompt",
            m.dispatch_latency.clone(),
        );
        registry.register(
            "node_duration_seconds",
            "Time a node ran, by class",
            m.node_duration.clone(),
        );
        registry.register("jobs", "Jobs in each state", m.jobs.clone());
        registry.register("backends", "Backends in each status", m.backends.clone());
        registry.register(
            "event_streams",
            "Event streams (SSE) open now",
            m.streams_gauge.clone(),
        );
        Metrics { registry, ..m }
    }
}

fn label(key: &str, value: impl Into<String>) -> Labels {
    vec![(key.to_owned(), value.into())]
}

/// Counts an open event stream while it lives.
pub struct StreamGuard(Arc<Metrics>);

impl StreamGuard {
    pub fn new(metrics: &Arc<Metrics>) -> StreamGuard {
        metrics.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(metrics.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The scrape: gauges read now, then everything encoded.
pub async fn render(engine: &Engine, m: &Metrics) -> Result<String, gantry_store::Error> {
    let counts = engine.store().count_by_state().await?;
    for state in JobState::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n);
        m.jobs
            .get_or_create(&label("state", state.as_str()))
            .set(n as i64);
    }
    let (now, stale) = (crate::engine::now_ms(), engine.stale_after_ms());
    let statuses: Vec<BackendStatus> = engine
        .backends()
        .values()
        .map(|b| crate::api::views::status_of(b, now, stale))
        .collect();
    for status in BackendStatus::ALL {
        let n = statuses.iter().filter(|s| **s == status).count();
        m.backends
            .get_or_create(&label("status", status.as_str()))
            .set(n as i64);
    }
    m.streams_gauge.set(m.streams.load(Ordering::Relaxed));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &m.registry);
    Ok(out)
}

/// Follow the bus and feed the counters and histograms until shutdown.
pub async fn follow(engine: Engine, m: Arc<Metrics>) {
    let mut rx = engine.bus().subscribe();
    // When each job last became queued and when each attempt was dispatched (wall ms).
    let mut queued_at: HashMap<JobId, Millis> = HashMap::new();
    let mut dispatched_at: HashMap<(JobId, u32), Millis> = HashMap::new();
    loop {
        let event = tokio::select! {
            _ = engine.shutdown_token().cancelled() => return,
            e = rx.recv() => e,
        };
        let event = match event {
            Ok(e) => e,
            // A metrics follower that fell behind skips what it missed.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        match event {
            BusEvent::Persisted(e) => {
                let secs = |from: Millis| ((e.at - from).max(0) as f64) / 1000.0;
                match &e.kind {
                    EventKind::Queued { .. } => {
                        queued_at.insert(e.job_id.clone(), e.at);
                    }
                    EventKind::JobRetrying { not_before, .. } => {
                        queued_at.insert(e.job_id.clone(), *not_before);
                    }
                    EventKind::Dispatched { attempt, .. } => {
                        m.attempts.inc();
                        if let Some(at) = queued_at.remove(&e.job_id) {
                            m.queue_time.observe(secs(at));
                        }
                        dispatched_at.insert((e.job_id.clone(), *attempt), e.at);
                    }
                    EventKind::Submitted { attempt, .. } => {
                        if let Some(at) = dispatched_at.remove(&(e.job_id.clone(), *attempt)) {
                            m.dispatch_latency.observe(secs(at));
                        }
                    }
                    EventKind::AttemptFailed { attempt, error, .. } => {
                        m.failures.get_or_create(&label("code", &error.code)).inc();
                        if let Some(phase) = error.details.get("phase").and_then(|p| p.as_str()) {
                            if error.code == "timeout" {
                                m.timeouts.get_or_create(&label("phase", phase)).inc();
                            }
                        }
                        dispatched_at.remove(&(e.job_id.clone(), *attempt));
                    }
                    EventKind::NodeFinished {
                        class_type,
                        duration_ms: Some(ms),
                        ..
                    } => {
                        m.node_duration
                            .get_or_create(&label("class", class_type))
                            .observe(*ms as f64 / 1000.0);
                    }
                    EventKind::Succeeded { .. }
                    | EventKind::Failed { .. }
                    | EventKind::Cancelled { .. }
                    | EventKind::NodeStarted { .. }
                    | EventKind::NodeFinished { .. }
                    | EventKind::NodesCached { .. } => {}
                    EventKind::Started { .. }
                    | EventKind::BackendBlocked { .. }
                    | EventKind::CancelRequested { .. }
                    | EventKind::Late { .. } => {}
                }
                if e.state.is_terminal() {
                    queued_at.remove(&e.job_id);
                    dispatched_at.retain(|(j, _), _| *j != e.job_id);
                }
            }
            BusEvent::Live(_) | BusEvent::Backend(_) | BusEvent::BackendState(_) => {}
        }
    }
}
