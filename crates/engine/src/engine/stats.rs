//! Node history: per-node samples into the store's aggregates, durations by class and
//! backend for adaptive stall limits and the slow-backend judgement.

use super::Engine;
use gantry_core::watchdog::Limits;
use gantry_core::Job;
use gantry_store::stats::NodeStats;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A backend whose median for a class is this many times the farm's is slow for it.
pub(crate) const SLOW_FACTOR: f64 = 2.0;
/// Runs needed, on the backend and farm-wide, before judging.
pub(crate) const SLOW_MIN_SAMPLES: u64 = 20;

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
    /// Judge again which backends are much slower than the farm for a class.
    pub(crate) fn judge_slowness(&self) {
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
    pub(crate) fn sample_nodes(&self, job: &Job, ended: &[u32]) {
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
        if self.inner.stats.send(samples).is_err() {
            // The stats writer stops only with the coordinator: these samples would be
            // of an attempt ended during shutdown.
            tracing::debug!(job_id = %job.id, "node samples not recorded: the stats writer has stopped");
        }
    }

    /// Write node samples to the store's aggregates, gathered for up to a second, so
    /// jobs never wait for them and the store takes one write a second at most (a
    /// crash loses at most that second of statistics, never a job).
    pub(crate) async fn stats_loop(
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
}
