//! The attempt watchdog: which phase timer runs, when it fires, and what the failure it
//! causes says. Pure: the driver feeds it what the backend said and the time, on its own
//! monotonic clock, and asks when to wake (DESIGN.md, timeouts table and invariant 4).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::job::{JobError, Millis, Timeouts};

/// Limits for one node class; `None` falls through to the backend's and global value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassTimeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_progress_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_stall_ms: Option<u64>,
}

/// Every source of a limit, in precedence order: the job's own value, then (for a
/// node's stall) the one learnt from history, then the node class's, then the
/// backend's, then the global default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    pub job: Timeouts,
    /// Node-stall limits learnt from the class's durations on this backend
    /// (`[adaptive]`), by class.
    pub adaptive: Arc<BTreeMap<String, u64>>,
    pub node_class: Arc<BTreeMap<String, ClassTimeouts>>,
    pub backend: Timeouts,
    pub global: Timeouts,
}

/// A phase with its own timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// `POST /prompt` answered.
    Submit,
    /// `execution_start`, counted from when the prompt reached the head of the queue.
    Start,
    /// Waiting behind other prompts on the backend: the queue ahead must move.
    QueueAhead,
    /// A running node's first progress (or its end, for nodes that report none).
    FirstProgress,
    /// A running node's progress value changing, or the next node starting.
    NodeStall,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Submit => "submit",
            Phase::Start => "start",
            Phase::QueueAhead => "queue_ahead",
            Phase::FirstProgress => "first_progress",
            Phase::NodeStall => "node_stall",
        }
    }
}

/// A limit in force: 0 and unset both mean none.
fn active(v: Option<u64>) -> Option<u64> {
    v.filter(|ms| *ms > 0)
}

impl Limits {
    /// The job-wide value of a field: job, backend, global.
    fn plain(&self, field: fn(&Timeouts) -> Option<u64>) -> Option<u64> {
        field(&self.job)
            .or(field(&self.backend))
            .or(field(&self.global))
    }

    /// The limit of a phase that is not about one node.
    pub fn phase(&self, phase: Phase) -> Option<u64> {
        active(match phase {
            Phase::Submit => self.plain(|t| t.submit_ms),
            Phase::Start => self.plain(|t| t.start_ms),
            // Behind other prompts the wait is for someone else's node: allow a node's
            // longest limit for the queue ahead to move.
            Phase::QueueAhead => {
                return self
                    .phase(Phase::FirstProgress)
                    .into_iter()
                    .chain(self.phase(Phase::NodeStall))
                    .max()
            }
            Phase::FirstProgress => self.plain(|t| t.first_progress_ms),
            Phase::NodeStall => self.plain(|t| t.node_stall_ms),
        })
    }

    /// The limit for a node of `class`, before (`first`) or after its first progress.
    pub fn node(&self, class: &str, first: bool) -> Option<u64> {
        let (job, class_value, phase) = if first {
            (
                self.job.first_progress_ms,
                self.node_class.get(class).and_then(|c| c.first_progress_ms),
                Phase::FirstProgress,
            )
        } else {
            (
                self.job.node_stall_ms,
                self.adaptive
                    .get(class)
                    .copied()
                    .or_else(|| self.node_class.get(class).and_then(|c| c.node_stall_ms)),
                Phase::NodeStall,
            )
        };
        match job.or(class_value) {
            Some(v) => active(Some(v)),
            None => self.phase(phase),
        }
    }

    /// The job's deadline: a property of the job, so the job's value or the global one,
    /// never a backend's (the scheduler judges queued jobs by the same rule).
    pub fn deadline(&self) -> Option<u64> {
        active(self.job.deadline_ms.or(self.global.deadline_ms))
    }
}

/// A running timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timer {
    pub phase: Phase,
    /// When it was (re)armed: for stalls, the last sign of progress.
    pub since: Millis,
    pub at: Millis,
    pub limit_ms: u64,
}

/// A timer that fired, with what its message needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Expired {
    pub timer: Timer,
    pub node: Option<(String, String)>,
    pub progress: Option<(f64, f64)>,
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl Expired {
    /// The failure's message: phase, limit, backend, and for stalls node, class and
    /// last progress.
    pub fn message(&self, backend: &str) -> String {
        let limit = self.timer.limit_ms;
        let node = match &self.node {
            Some((id, class)) => format!("Node {id} ({class})"),
            None => "The running node".to_owned(),
        };
        match self.timer.phase {
            Phase::Submit => {
                format!("Submit got no answer from {backend} within {limit} ms: server may be stuck")
            }
            Phase::Start => {
                format!("Execution failed to start within {limit} ms on {backend}: server may be stuck")
            }
            Phase::QueueAhead => format!(
                "Execution failed to start on {backend}: the prompts ahead of it did not move for {limit} ms"
            ),
            Phase::FirstProgress => {
                format!("{node} made no progress for {limit} ms since it started on {backend}")
            }
            Phase::NodeStall => match self.progress {
                Some((v, m)) => format!(
                    "{node} made no progress for {limit} ms at step {}/{} on {backend}",
                    num(v),
                    num(m)
                ),
                None => format!("{node} made no progress for {limit} ms on {backend}"),
            },
        }
    }

    /// The attempt's error, with the facts in `details` for programs.
    pub fn error(&self, backend: &str, last_sign_wall: Millis) -> JobError {
        let (node, class) = match &self.node {
            Some((n, c)) => (Some(n.as_str()), Some(c.as_str())),
            None => (None, None),
        };
        JobError::new("timeout", self.message(backend)).with_details(serde_json::json!({
            "phase": self.timer.phase,
            "limit_ms": self.timer.limit_ms,
            "backend": backend,
            "node": node,
            "class_type": class,
            "progress": self.progress.map(|(v, m)| serde_json::json!({"value": v, "max": m})),
            "since": last_sign_wall,
        }))
    }
}

/// The watchdog of one attempt.
#[derive(Clone, Debug)]
pub struct Watch {
    limits: Limits,
    node: Option<(String, String)>,
    progress: Option<(f64, f64)>,
    timer: Option<Timer>,
    /// The prompts ahead of ours when last looked at (`None` once at the head).
    ahead: Option<Vec<String>>,
}

impl Watch {
    pub fn new(limits: Limits) -> Watch {
        Watch {
            limits,
            node: None,
            progress: None,
            timer: None,
            ahead: None,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn timer(&self) -> Option<Timer> {
        self.timer
    }

    /// When the driver must look again, if a timer runs.
    pub fn due(&self) -> Option<Millis> {
        self.timer.map(|t| t.at)
    }

    fn arm(&mut self, phase: Phase, limit: Option<u64>, now: Millis) {
        self.timer = limit.map(|ms| Timer {
            phase,
            since: now,
            at: now + ms as Millis,
            limit_ms: ms,
        });
    }

    pub fn disarm(&mut self) {
        self.timer = None;
    }

    /// The submit request is being sent.
    pub fn submitting(&mut self, now: Millis) {
        self.arm(Phase::Submit, self.limits.phase(Phase::Submit), now);
    }

    /// The prompt waits in the backend's queue behind `ahead` (prompt ids, running one
    /// first). The start timer counts only from the head; behind others, the queue ahead
    /// must move within a node's limit.
    pub fn pending(&mut self, ahead: Vec<String>, now: Millis) {
        if matches!(
            self.timer.map(|t| t.phase),
            Some(Phase::FirstProgress | Phase::NodeStall)
        ) {
            return;
        }
        if ahead.is_empty() {
            if self.timer.map(|t| t.phase) != Some(Phase::Start) {
                self.arm(Phase::Start, self.limits.phase(Phase::Start), now);
            }
            self.ahead = None;
            return;
        }
        let moved = self.ahead.as_ref() != Some(&ahead);
        if moved || self.timer.is_none() {
            self.arm(Phase::QueueAhead, self.limits.phase(Phase::QueueAhead), now);
        }
        self.ahead = Some(ahead);
    }

    /// Execution started (or was found running after a restart) before any node is
    /// known: the first-progress limit applies until a node reports.
    pub fn executing(&mut self, now: Millis) {
        if matches!(
            self.timer.map(|t| t.phase),
            Some(Phase::FirstProgress | Phase::NodeStall)
        ) {
            return;
        }
        self.ahead = None;
        self.arm(
            Phase::FirstProgress,
            self.limits.phase(Phase::FirstProgress),
            now,
        );
    }

    /// The driver can no longer see the prompt's progress (a reconnected socket has a new
    /// clientId, and ComfyUI sends a prompt's progress only to the one it came with): the
    /// running node is unknown, and the first-progress limit bounds it from now on.
    pub fn blind(&mut self, now: Millis) {
        self.node = None;
        self.progress = None;
        self.ahead = None;
        self.arm(
            Phase::FirstProgress,
            self.limits.phase(Phase::FirstProgress),
            now,
        );
    }

    /// A node started running: the first-progress limit of its class applies.
    pub fn node_started(&mut self, node: &str, class: &str, now: Millis) {
        if self.node.as_ref().is_some_and(|(n, _)| n == node) {
            return;
        }
        self.node = Some((node.to_owned(), class.to_owned()));
        self.progress = None;
        self.arm(Phase::FirstProgress, self.limits.node(class, true), now);
    }

    /// A progress value for `node`. Only a value different from the last one resets the
    /// timer: a repeated value is a node that stopped while something keeps talking
    /// (seed 001). Answers whether it counted as progress.
    pub fn progress(&mut self, node: &str, class: &str, value: f64, max: f64, now: Millis) -> bool {
        if self.node.as_ref().is_none_or(|(n, _)| n != node) {
            self.node_started(node, class, now);
        }
        let moved = self.progress.is_none_or(|(last, _)| last != value);
        if !moved {
            return false;
        }
        self.progress = Some((value, max));
        self.arm(Phase::NodeStall, self.limits.node(class, false), now);
        true
    }

    /// The current node and its last progress.
    pub fn node(&self) -> Option<&(String, String)> {
        self.node.as_ref()
    }

    pub fn last_progress(&self) -> Option<(f64, f64)> {
        self.progress
    }

    /// The timer that has fired by `now`, if any.
    pub fn expired(&self, now: Millis) -> Option<Expired> {
        let timer = self.timer.filter(|t| now >= t.at)?;
        let node_phase = matches!(timer.phase, Phase::FirstProgress | Phase::NodeStall);
        Some(Expired {
            timer,
            node: self.node.clone().filter(|_| node_phase),
            progress: self.progress.filter(|_| node_phase),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            global: Timeouts {
                submit_ms: Some(10_000),
                start_ms: Some(30_000),
                first_progress_ms: Some(600_000),
                node_stall_ms: Some(300_000),
                deadline_ms: Some(0),
                queue_ms: Some(0),
            },
            ..Limits::default()
        }
    }

    #[test]
    fn a_learnt_stall_limit_comes_after_the_job_and_before_the_class() {
        let mut l = limits();
        l.node_class = Arc::new(BTreeMap::from([(
            "KSampler".to_owned(),
            ClassTimeouts {
                first_progress_ms: None,
                node_stall_ms: Some(100_000),
            },
        )]));
        l.adaptive = Arc::new(BTreeMap::from([("KSampler".to_owned(), 45_000)]));
        assert_eq!(l.node("KSampler", false), Some(45_000));
        // Only the stall limit is learnt; first progress keeps its own.
        assert_eq!(l.node("KSampler", true), Some(600_000));
        assert_eq!(l.node("VAEDecode", false), Some(300_000));
        l.job.node_stall_ms = Some(5_000);
        assert_eq!(l.node("KSampler", false), Some(5_000));
    }

    #[test]
    fn precedence_is_job_then_class_then_backend_then_global() {
        let mut l = limits();
        assert_eq!(l.node("KSampler", false), Some(300_000));
        l.backend.node_stall_ms = Some(200_000);
        assert_eq!(l.node("KSampler", false), Some(200_000));
        l.node_class = Arc::new(BTreeMap::from([(
            "KSampler".to_owned(),
            ClassTimeouts {
                first_progress_ms: None,
                node_stall_ms: Some(100_000),
            },
        )]));
        assert_eq!(l.node("KSampler", false), Some(100_000));
        assert_eq!(l.node("VAEDecode", false), Some(200_000));
        assert_eq!(
            l.node("KSampler", true),
            Some(600_000),
            "first progress untouched"
        );
        l.job.node_stall_ms = Some(5_000);
        assert_eq!(l.node("KSampler", false), Some(5_000));
        l.job.node_stall_ms = Some(0);
        assert_eq!(l.node("KSampler", false), None, "0 disables");
        assert_eq!(l.deadline(), None);
        l.backend.deadline_ms = Some(5_000);
        assert_eq!(
            l.deadline(),
            None,
            "a deadline belongs to the job, not the backend"
        );
        l.job.deadline_ms = Some(60_000);
        assert_eq!(l.deadline(), Some(60_000));
    }

    #[test]
    fn a_repeated_progress_value_does_not_reset_the_stall_timer() {
        let mut w = Watch::new(limits());
        w.node_started("3", "KSampler", 0);
        assert_eq!(
            w.timer().map(|t| (t.phase, t.at)),
            Some((Phase::FirstProgress, 600_000))
        );
        assert!(w.progress("3", "KSampler", 12.0, 20.0, 1_000));
        assert_eq!(w.due(), Some(301_000));
        // Seed 001: the same value and status frames keep arriving; none is progress.
        for t in (2_000..300_000).step_by(100) {
            assert!(!w.progress("3", "KSampler", 12.0, 20.0, t));
        }
        assert_eq!(w.due(), Some(301_000));
        assert!(w.expired(300_999).is_none());
        let e = w.expired(301_000).expect("fires at the limit");
        assert_eq!(e.timer.since, 1_000, "counted from the last real progress");
        assert_eq!(
            e.message("gpu-2"),
            "Node 3 (KSampler) made no progress for 300000 ms at step 12/20 on gpu-2"
        );
        let err = e.error("gpu-2", 42);
        assert_eq!(err.details["phase"], "node_stall");
        assert_eq!(err.details["class_type"], "KSampler");
        assert_eq!(err.details["since"], 42);
    }

    #[test]
    fn advancing_progress_and_a_new_node_reset_the_timer() {
        let mut w = Watch::new(limits());
        w.progress("3", "KSampler", 1.0, 20.0, 0);
        w.progress("3", "KSampler", 2.0, 20.0, 250_000);
        assert_eq!(w.due(), Some(550_000));
        w.node_started("4", "VAEDecode", 500_000);
        assert_eq!(w.timer().map(|t| t.phase), Some(Phase::FirstProgress));
        assert_eq!(w.due(), Some(1_100_000));
        assert_eq!(w.last_progress(), None);
        // Executing for the same node again is not a change.
        w.node_started("4", "VAEDecode", 900_000);
        assert_eq!(w.due(), Some(1_100_000));
        let e = w.expired(1_100_000).unwrap();
        assert_eq!(
            e.message("b"),
            "Node 4 (VAEDecode) made no progress for 600000 ms since it started on b"
        );
    }

    #[test]
    fn a_loader_gets_its_class_limit() {
        let mut l = limits();
        l.node_class = Arc::new(BTreeMap::from([(
            "CheckpointLoaderSimple".to_owned(),
            ClassTimeouts {
                first_progress_ms: Some(900_000),
                node_stall_ms: Some(900_000),
            },
        )]));
        let mut w = Watch::new(l);
        w.node_started("4", "CheckpointLoaderSimple", 0);
        assert_eq!(w.due(), Some(900_000));
    }

    #[test]
    fn the_start_timer_counts_from_the_head_of_the_queue() {
        let mut w = Watch::new(limits());
        w.submitting(0);
        assert_eq!(
            w.timer().map(|t| (t.phase, t.at)),
            Some((Phase::Submit, 10_000))
        );
        w.pending(vec!["other".into()], 100);
        assert_eq!(w.timer().map(|t| t.phase), Some(Phase::QueueAhead));
        assert_eq!(
            w.due(),
            Some(600_100),
            "a node's longest limit for the queue ahead"
        );
        // The same queue seen again is no movement.
        w.pending(vec!["other".into()], 50_000);
        assert_eq!(w.due(), Some(600_100));
        w.pending(vec![], 400_000);
        assert_eq!(
            w.timer().map(|t| (t.phase, t.at)),
            Some((Phase::Start, 430_000))
        );
        // Seeing the head again does not restart the count.
        w.pending(vec![], 420_000);
        assert_eq!(w.due(), Some(430_000));
        let e = w.expired(430_000).unwrap();
        assert_eq!(
            e.message("gpu-2"),
            "Execution failed to start within 30000 ms on gpu-2: server may be stuck"
        );
        assert_eq!(e.node, None);
    }

    #[test]
    fn zero_disables_a_timer() {
        let mut l = limits();
        l.job.start_ms = Some(0);
        l.job.first_progress_ms = Some(0);
        let mut w = Watch::new(l);
        w.pending(vec![], 0);
        assert_eq!(w.due(), None);
        w.node_started("3", "KSampler", 0);
        assert_eq!(w.due(), None);
        w.progress("3", "KSampler", 1.0, 2.0, 5);
        assert_eq!(w.due(), Some(300_005));
    }
}
