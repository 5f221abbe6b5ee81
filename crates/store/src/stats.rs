//! Per-node timing aggregates: for each node class, workflow shape and backend, per hour,
//! how many runs, how many cached, failed or timed out, and a DDSketch of the durations
//! (streaming quantiles with 1% relative error: nothing sorts stored samples).

use gantry_core::Millis;
use serde::{Deserialize, Serialize};
use sketches_ddsketch::{Config, DDSketch};

pub const HOUR_MS: Millis = 3_600_000;

/// One node of one finished attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeSample {
    pub class: String,
    pub workflow: String,
    pub backend: String,
    pub at: Millis,
    /// Measured run time; none for cached and unknown nodes.
    pub duration_ms: Option<f64>,
    pub cached: bool,
    pub failed: bool,
    pub timed_out: bool,
}

/// The aggregate of one (class, workflow, backend, hour).
#[derive(Clone, Serialize, Deserialize)]
pub struct NodeStats {
    pub class: String,
    pub workflow: String,
    pub backend: String,
    pub hour: Millis,
    pub count: u64,
    pub cached: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub sketch: DDSketch,
}

pub fn new_sketch() -> DDSketch {
    DDSketch::new(Config::defaults())
}

/// A sketch as stored: empty for one with no values (whose infinite min and max JSON
/// cannot carry), JSON otherwise.
pub fn encode_sketch(s: &DDSketch) -> Result<String, serde_json::Error> {
    if s.count() == 0 {
        Ok(String::new())
    } else {
        serde_json::to_string(s)
    }
}

pub fn decode_sketch(text: &str) -> Result<DDSketch, serde_json::Error> {
    if text.is_empty() {
        Ok(new_sketch())
    } else {
        serde_json::from_str(text)
    }
}

impl NodeStats {
    pub fn empty(class: &str, workflow: &str, backend: &str, hour: Millis) -> NodeStats {
        NodeStats {
            class: class.to_owned(),
            workflow: workflow.to_owned(),
            backend: backend.to_owned(),
            hour,
            count: 0,
            cached: 0,
            failed: 0,
            timed_out: 0,
            sketch: new_sketch(),
        }
    }

    pub fn add(&mut self, s: &NodeSample) {
        self.count += 1;
        self.cached += u64::from(s.cached);
        self.failed += u64::from(s.failed);
        self.timed_out += u64::from(s.timed_out);
        if let Some(d) = s.duration_ms {
            self.sketch.add(d.max(0.0));
        }
    }

    /// Fold `other` in. Every sketch gantry makes has the default configuration, so
    /// the durations merge; one stored with another (by another version) would not,
    /// and its durations are then left out of this aggregate, said in the log.
    pub fn merge(&mut self, other: &NodeStats) {
        self.count += other.count;
        self.cached += other.cached;
        self.failed += other.failed;
        self.timed_out += other.timed_out;
        if let Err(e) = self.sketch.merge(&other.sketch) {
            tracing::warn!(
                class = %self.class,
                workflow = %self.workflow,
                backend = %self.backend,
                hour = self.hour,
                durations = other.sketch.count(),
                error = ?e,
                "node stats: durations left out, their sketches do not merge"
            );
        }
    }

    /// The `q` quantile of the measured durations, in ms; none without durations. The
    /// sketch refuses only a `q` outside 0..=1, which no caller asks for.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.sketch.quantile(q).ok().flatten()
    }
}

/// The samples grouped into per-hour aggregates.
pub fn aggregate(samples: &[NodeSample]) -> Vec<NodeStats> {
    let mut out: Vec<NodeStats> = Vec::new();
    for s in samples {
        let hour = s.at - s.at.rem_euclid(HOUR_MS);
        let i = match out.iter().position(|n| {
            n.class == s.class
                && n.workflow == s.workflow
                && n.backend == s.backend
                && n.hour == hour
        }) {
            Some(i) => i,
            None => {
                out.push(NodeStats::empty(&s.class, &s.workflow, &s.backend, hour));
                out.len() - 1
            }
        };
        out[i].add(s);
    }
    out
}

/// Which aggregates a query wants; empty fields match all.
#[derive(Clone, Debug, Default)]
pub struct StatsFilter {
    pub class: Option<String>,
    pub workflow: Option<String>,
    pub backend: Option<String>,
    /// Hours starting at or after the hour holding this moment.
    pub since: Option<Millis>,
}
