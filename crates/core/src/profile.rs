//! Per-node profiles of an attempt, built from what the backend's WebSocket said and
//! when gantry heard it. A profile never invents a duration: a node whose run overlaps a
//! stretch gantry could not hear (a reconnect as another client, a restart) is
//! `unknown`, and the profile says which part is missing.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use utoipa::ToSchema;

use crate::clock::Millis;
use crate::workflow::Workflow;

/// Most progress points kept per node: the first, the last, and an evenly thinned middle.
pub const MAX_POINTS: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Never started (a failure came first, or nothing needed it).
    Pending,
    /// Started and not ended when the attempt ended (a timeout, a lost backend).
    Executing,
    Completed,
    /// Its output came from ComfyUI's cache: it did not run.
    Cached,
    Failed,
    Interrupted,
    /// The record is incomplete: it may have run while gantry could not hear.
    Unknown,
}

impl NodeStatus {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Pending => "pending",
            NodeStatus::Executing => "executing",
            NodeStatus::Completed => "completed",
            NodeStatus::Cached => "cached",
            NodeStatus::Failed => "failed",
            NodeStatus::Interrupted => "interrupted",
            NodeStatus::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProgressPoint {
    pub at: Millis,
    pub value: f64,
    pub max: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeProfile {
    pub id: String,
    pub class_type: String,
    /// `_meta.title` in the workflow, when it has one.
    pub title: Option<String>,
    pub status: NodeStatus,
    /// Wall-clock milliseconds, as gantry heard the node start and end.
    pub start: Option<Millis>,
    pub end: Option<Millis>,
    pub duration_ms: Option<i64>,
    /// Kept points (at most `MAX_POINTS`) of `progress_count` heard.
    pub progress: Vec<ProgressPoint>,
    pub progress_count: u32,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SlowNode {
    pub id: String,
    pub class_type: String,
    pub duration_ms: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProfileSummary {
    /// Nodes that ran (completed, failed or interrupted).
    pub executed: u32,
    pub cached: u32,
    pub failed: u32,
    /// The five slowest measured nodes, slowest first.
    pub slowest: Vec<SlowNode>,
    /// Ids of the nodes that reported progress.
    pub with_progress: Vec<String>,
}

/// A stretch gantry could not hear the backend about this prompt; `to` is `None` when
/// it lasted to the end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Gap {
    pub from: Option<Millis>,
    pub to: Option<Millis>,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AttemptProfile {
    pub prompt_id: String,
    /// Accepted into the backend's queue.
    pub queued_at: Option<Millis>,
    /// `execution_start`.
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
    pub queue_ms: Option<i64>,
    pub execution_ms: Option<i64>,
    /// From dispatch to the end.
    pub total_ms: Option<i64>,
    /// Every node of the workflow, in execution order (then the ones never run).
    pub nodes: Vec<NodeProfile>,
    pub summary: ProfileSummary,
    /// False when part of the record is missing (see `gaps`).
    pub complete: bool,
    pub gaps: Vec<Gap>,
}

/// What the driver heard about an attempt, in order.
#[derive(Clone, Debug)]
pub enum Observed<'a> {
    Start,
    Cached(&'a [String]),
    Executing(&'a str),
    /// `executing` with no node: the prompt is done.
    Idle,
    Progress {
        node: &'a str,
        value: f64,
        max: f64,
    },
    Executed(&'a str),
    Success,
    Error {
        node: &'a str,
        message: &'a str,
    },
    Interrupted {
        node: Option<&'a str>,
    },
    /// From here on, gantry hears nothing about the prompt (socket lost; a reconnect
    /// gets a new clientId that ComfyUI tells nothing of it).
    Lost(&'a str),
    /// Taken over after a restart or a lease change: nothing before now was heard here.
    Adopted,
    /// These nodes ran, when is not known (an error's `executed` list in /history).
    Ran(&'a [String]),
}

#[derive(Clone, Debug, Default)]
struct NodeRecord {
    status: Option<NodeStatus>,
    start: Option<Millis>,
    end: Option<Millis>,
    points: Vec<ProgressPoint>,
    last: Option<ProgressPoint>,
    count: u32,
    stride: u32,
    error: Option<String>,
}

impl NodeRecord {
    fn add_point(&mut self, p: ProgressPoint) {
        self.count += 1;
        self.stride = self.stride.max(1);
        if (self.count - 1).is_multiple_of(self.stride) {
            self.points.push(p.clone());
            if self.points.len() > MAX_POINTS - 1 {
                // Thin the middle: keep the first and every other one after it.
                let first = self.points[0].clone();
                let rest: Vec<ProgressPoint> = self
                    .points
                    .drain(1..)
                    .enumerate()
                    .filter(|(i, _)| i % 2 == 1)
                    .map(|(_, p)| p)
                    .collect();
                self.points = std::iter::once(first).chain(rest).collect();
                self.stride *= 2;
            }
        }
        self.last = Some(p);
    }

    fn kept_points(&self) -> Vec<ProgressPoint> {
        let mut points = self.points.clone();
        if let Some(last) = &self.last {
            if points.last() != Some(last) {
                points.push(last.clone());
            }
        }
        points
    }
}

/// A node's step as it was heard, for the job's stored history (`node_started`,
/// `node_finished`, `nodes_cached` events), so a client that subscribes late is told
/// every node. Only what was heard live: what `/history` fills in afterwards is in the
/// attempt's profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeStep {
    Started(String),
    Finished {
        node: String,
        /// Since it was heard starting, when it was.
        duration_ms: Option<u64>,
        status: NodeStatus,
    },
    Cached(Vec<String>),
}

/// When an attempt went through its phases, as its record says (`job::Attempt`): what a
/// profile takes from the record for what it did not hear.
pub trait AttemptTimes {
    fn prompt_id(&self) -> &str;
    fn created_at(&self) -> Millis;
    fn submitted_at(&self) -> Option<Millis>;
    fn started_at(&self) -> Option<Millis>;
    fn finished_at(&self) -> Option<Millis>;
}

/// The record of one attempt as it runs.
#[derive(Clone, Debug, Default)]
pub struct ProfileBuilder {
    order: Vec<String>,
    nodes: HashMap<String, NodeRecord>,
    current: Option<String>,
    started_at: Option<Millis>,
    ended_at: Option<Millis>,
    last_heard: Option<Millis>,
    gaps: Vec<Gap>,
    /// The backend said which nodes ran (an error's `executed`): the others did not.
    knows_what_ran: bool,
    /// Node steps heard since `take_news`.
    news: Vec<NodeStep>,
    /// Whether what is being recorded was heard live (else recalled from /history).
    live: bool,
}

impl ProfileBuilder {
    /// Whether the outcome (success, error, interrupt) was heard.
    pub fn has_outcome(&self) -> bool {
        self.ended_at.is_some()
    }

    /// When gantry last heard anything about the prompt.
    pub fn last_heard(&self) -> Option<Millis> {
        self.last_heard
    }

    fn node(&mut self, id: &str) -> &mut NodeRecord {
        if !self.nodes.contains_key(id) {
            self.order.push(id.to_owned());
        }
        self.nodes.entry(id.to_owned()).or_default()
    }

    /// The node running now, if any, ends at `at` as `status`.
    fn end_current(&mut self, at: Millis, status: NodeStatus) {
        if let Some(id) = self.current.take() {
            self.end(&id, at, status);
        }
    }

    /// Node `id` ends at `at` as `status`, unless it had already ended.
    fn end(&mut self, id: &str, at: Millis, status: NodeStatus) {
        let n = self.node(id);
        if n.end.is_some() {
            return;
        }
        n.end = Some(at);
        n.status = Some(status);
        let duration_ms = n.start.map(|s| (at - s).max(0) as u64);
        if self.live {
            self.news.push(NodeStep::Finished {
                node: id.to_owned(),
                duration_ms,
                status,
            });
        }
    }

    /// The node steps heard since the last call, in order.
    pub fn take_news(&mut self) -> Vec<NodeStep> {
        std::mem::take(&mut self.news)
    }

    fn hear(&mut self, at: Millis) {
        // Hearing about the prompt again closes an open gap.
        if let Some(gap) = self.gaps.last_mut() {
            if gap.to.is_none() {
                gap.to = Some(at);
            }
        }
    }

    /// Record what was heard at `at` on the WebSocket.
    pub fn observe(&mut self, at: Millis, what: Observed<'_>) {
        if !matches!(what, Observed::Lost(_) | Observed::Adopted) {
            self.hear(at);
            self.last_heard = Some(at);
        }
        self.live = true;
        self.record(at, what);
    }

    /// Record what is known from elsewhere (the backend's /history), stamped with the
    /// backend's time: it fills in, and does not close a gap.
    pub fn recall(&mut self, at: Millis, what: Observed<'_>) {
        self.live = false;
        self.record(at, what);
    }

    fn record(&mut self, at: Millis, what: Observed<'_>) {
        match what {
            Observed::Start => {
                self.started_at.get_or_insert(at);
            }
            Observed::Cached(nodes) => {
                for id in nodes {
                    let n = self.node(id);
                    n.status = Some(NodeStatus::Cached);
                }
                if self.live && !nodes.is_empty() {
                    self.news.push(NodeStep::Cached(nodes.to_vec()));
                }
            }
            // Said again of the node running now: nothing new.
            Observed::Executing(id) if self.current.as_deref() == Some(id) => {}
            Observed::Executing(id) => {
                self.end_current(at, NodeStatus::Completed);
                self.started_at.get_or_insert(at);
                let n = self.node(id);
                let first = n.start.is_none();
                n.start.get_or_insert(at);
                n.status = Some(NodeStatus::Executing);
                self.current = Some(id.to_owned());
                if self.live && first {
                    self.news.push(NodeStep::Started(id.to_owned()));
                }
            }
            Observed::Idle | Observed::Success => {
                self.end_current(at, NodeStatus::Completed);
                self.ended_at.get_or_insert(at);
            }
            Observed::Progress { node, value, max } => {
                let n = self.node(node);
                n.add_point(ProgressPoint { at, value, max });
            }
            Observed::Executed(id) => {
                if self.nodes.get(id).is_some_and(|n| n.start.is_some()) {
                    self.end(id, at, NodeStatus::Completed);
                }
                if self.current.as_deref() == Some(id) {
                    self.current = None;
                }
            }
            Observed::Error { node, message } => {
                if self.current.as_deref() != Some(node) {
                    self.end_current(at, NodeStatus::Completed);
                }
                self.current = None;
                let n = self.node(node);
                // The error is the node's end, whatever was recorded before.
                n.end = None;
                n.error = Some(message.to_owned());
                self.end(node, at, NodeStatus::Failed);
                self.ended_at.get_or_insert(at);
            }
            Observed::Interrupted { node } => {
                let node = node.map(str::to_owned).or_else(|| self.current.clone());
                self.current = None;
                if let Some(id) = node {
                    self.end(&id, at, NodeStatus::Interrupted);
                }
                self.ended_at.get_or_insert(at);
            }
            Observed::Lost(reason) => {
                if self.gaps.last().is_none_or(|g| g.to.is_some()) {
                    self.gaps.push(Gap {
                        from: Some(at),
                        to: None,
                        reason: reason.to_owned(),
                    });
                }
            }
            Observed::Ran(nodes) => {
                self.knows_what_ran = true;
                for id in nodes {
                    let n = self.node(id);
                    if matches!(n.status, None | Some(NodeStatus::Executing)) {
                        n.status = Some(NodeStatus::Completed);
                    }
                }
            }
            Observed::Adopted => self.gaps.push(Gap {
                from: None,
                to: Some(at),
                reason: "taken over by this coordinator: what came before was not heard here"
                    .into(),
            }),
        }
    }

    /// Whether `[start, end]` overlaps a gap (an open end counts as the attempt's end).
    fn overlaps_gap(&self, start: Option<Millis>, end: Option<Millis>) -> bool {
        self.gaps.iter().any(|g| {
            let (gs, ge) = (g.from.unwrap_or(Millis::MIN), g.to.unwrap_or(Millis::MAX));
            let (s, e) = (start.unwrap_or(Millis::MIN), end.unwrap_or(Millis::MAX));
            s <= ge && gs <= e
        })
    }

    /// The profile of `attempt` (now ended) of a job running `workflow`.
    pub fn finish(&self, workflow: &Workflow, attempt: &impl AttemptTimes) -> AttemptProfile {
        let complete = self.gaps.is_empty() && self.ended_at.is_some();
        let mut ids: Vec<&String> = self.order.iter().collect();
        let mut rest: Vec<&String> = workflow
            .graph()
            .keys()
            .filter(|id| !self.nodes.contains_key(*id))
            .collect();
        rest.sort_by_key(|id| (id.parse::<u64>().unwrap_or(u64::MAX), id.to_string()));
        ids.extend(rest);
        let mut nodes = Vec::with_capacity(ids.len());
        for id in ids {
            let record = self.nodes.get(id).cloned().unwrap_or_default();
            let node = workflow.graph().get(id);
            let class_type = node
                .and_then(|n| n.get("class_type"))
                .and_then(|c| c.as_str())
                .unwrap_or_default()
                .to_owned();
            let title = node
                .and_then(|n| n.pointer("/_meta/title"))
                .and_then(|t| t.as_str())
                .map(str::to_owned);
            let mut status =
                record
                    .status
                    .unwrap_or(if self.gaps.is_empty() || self.knows_what_ran {
                        NodeStatus::Pending
                    } else {
                        NodeStatus::Unknown
                    });
            let mut end = record.end;
            let ran = record.start.is_some();
            if ran && self.overlaps_gap(record.start, record.end) {
                // It ran while gantry could not hear: its end (or its whole run) is not
                // known; that it completed may be (the backend said it ran).
                if !(status == NodeStatus::Completed && record.end.is_none()) {
                    status = NodeStatus::Unknown;
                }
                end = None;
            }
            let duration_ms = match (status, record.start, end) {
                (NodeStatus::Cached | NodeStatus::Unknown, _, _) => None,
                (_, Some(s), Some(e)) => Some(e - s),
                _ => None,
            };
            nodes.push(NodeProfile {
                id: id.clone(),
                class_type,
                title,
                status,
                start: record.start,
                end,
                duration_ms,
                progress: record.kept_points(),
                progress_count: record.count,
                error: record.error,
            });
        }
        let count = |s: NodeStatus| nodes.iter().filter(|n| n.status == s).count() as u32;
        let mut measured: Vec<&NodeProfile> =
            nodes.iter().filter(|n| n.duration_ms.is_some()).collect();
        measured.sort_by_key(|n| std::cmp::Reverse(n.duration_ms));
        let summary = ProfileSummary {
            executed: count(NodeStatus::Completed)
                + count(NodeStatus::Failed)
                + count(NodeStatus::Interrupted),
            cached: count(NodeStatus::Cached),
            failed: count(NodeStatus::Failed),
            slowest: measured
                .iter()
                .take(5)
                .map(|n| SlowNode {
                    id: n.id.clone(),
                    class_type: n.class_type.clone(),
                    duration_ms: n.duration_ms.unwrap_or_default(),
                })
                .collect(),
            with_progress: nodes
                .iter()
                .filter(|n| n.progress_count > 0)
                .map(|n| n.id.clone())
                .collect(),
        };
        let started_at = self.started_at.or(attempt.started_at());
        let completed_at = self.ended_at.or(attempt.finished_at());
        let mut gaps = self.gaps.clone();
        if let Some(last) = gaps.last_mut() {
            if last.to.is_none() {
                last.to = attempt.finished_at();
            }
        }
        AttemptProfile {
            prompt_id: attempt.prompt_id().to_owned(),
            queued_at: attempt.submitted_at(),
            started_at,
            completed_at,
            queue_ms: attempt.submitted_at().zip(started_at).map(|(q, s)| s - q),
            execution_ms: started_at.zip(completed_at).map(|(s, c)| c - s),
            total_ms: completed_at.map(|c| c - attempt.created_at()),
            nodes,
            summary,
            complete,
            gaps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Attempt;

    #[test]
    fn a_status_name_is_its_wire_name() {
        for s in [
            NodeStatus::Pending,
            NodeStatus::Executing,
            NodeStatus::Completed,
            NodeStatus::Cached,
            NodeStatus::Failed,
            NodeStatus::Interrupted,
            NodeStatus::Unknown,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
    use serde_json::json;

    fn attempt() -> Attempt {
        Attempt {
            number: 1,
            backend: "a".into(),
            prompt_id: "p".into(),
            status: crate::AttemptStatus::Succeeded,
            created_at: 0,
            submitted_at: Some(5),
            started_at: Some(10),
            finished_at: Some(10_000),
            error: None,
            counted: true,
            profile: None,
        }
    }

    fn workflow() -> Workflow {
        Workflow::parse(&json!({
            "1": {"class_type": "Load", "inputs": {}},
            "2": {"class_type": "Sample", "inputs": {"x": ["1", 0]}},
            "3": {"class_type": "Save", "inputs": {"x": ["2", 0]}}
        }))
        .unwrap()
    }

    #[test]
    fn thousands_of_steps_keep_at_most_the_cap_with_first_and_last() {
        let mut b = ProfileBuilder::default();
        b.observe(10, Observed::Executing("2"));
        for i in 1..=5000 {
            b.observe(
                10 + i,
                Observed::Progress {
                    node: "2",
                    value: i as f64,
                    max: 5000.0,
                },
            );
        }
        b.observe(6000, Observed::Success);
        let p = b.finish(&workflow(), &attempt());
        let n = p.nodes.iter().find(|n| n.id == "2").unwrap();
        assert_eq!(n.progress_count, 5000);
        assert!(n.progress.len() <= MAX_POINTS, "{}", n.progress.len());
        assert!(n.progress.len() >= MAX_POINTS / 2, "{}", n.progress.len());
        assert_eq!(n.progress.first().unwrap().value, 1.0);
        assert_eq!(n.progress.last().unwrap().value, 5000.0);
        // The middle is spread evenly, in order.
        assert!(n.progress.windows(2).all(|w| w[0].value < w[1].value));
    }

    #[test]
    fn a_node_running_across_a_gap_is_unknown_and_the_rest_unheard() {
        let mut b = ProfileBuilder::default();
        b.observe(10, Observed::Start);
        b.observe(11, Observed::Executing("1"));
        b.observe(20, Observed::Executing("2"));
        b.observe(50, Observed::Lost("socket lost"));
        let p = b.finish(&workflow(), &attempt());
        assert!(!p.complete);
        assert_eq!(p.gaps[0].from, Some(50));
        assert_eq!(p.gaps[0].to, Some(10_000), "open to the attempt's end");
        let s: Vec<NodeStatus> = p.nodes.iter().map(|n| n.status).collect();
        assert_eq!(
            s,
            [
                NodeStatus::Completed,
                NodeStatus::Unknown,
                NodeStatus::Unknown
            ]
        );
        assert_eq!(p.nodes[0].duration_ms, Some(9));
        assert_eq!(p.nodes[1].duration_ms, None);
        assert_eq!(p.summary.slowest.len(), 1);
    }

    #[test]
    fn an_adopted_attempt_knows_nothing_before_its_adoption() {
        let mut b = ProfileBuilder::default();
        b.observe(500, Observed::Adopted);
        b.observe(600, Observed::Executing("3"));
        b.observe(700, Observed::Success);
        let p = b.finish(&workflow(), &attempt());
        assert!(!p.complete);
        assert_eq!((p.gaps[0].from, p.gaps[0].to), (None, Some(500)));
        let s: Vec<(&str, NodeStatus)> =
            p.nodes.iter().map(|n| (n.id.as_str(), n.status)).collect();
        assert_eq!(
            s,
            [
                ("3", NodeStatus::Completed),
                ("1", NodeStatus::Unknown),
                ("2", NodeStatus::Unknown)
            ]
        );
        assert_eq!(p.nodes[0].duration_ms, Some(100));
    }

    #[test]
    fn every_node_heard_is_news_once_in_order_and_recalled_ones_are_not() {
        let mut b = ProfileBuilder::default();
        b.observe(10, Observed::Start);
        b.observe(11, Observed::Cached(&["1".to_owned()]));
        b.observe(12, Observed::Executing("2"));
        b.observe(13, Observed::Executing("2"));
        b.observe(
            14,
            Observed::Progress {
                node: "2",
                value: 1.0,
                max: 2.0,
            },
        );
        b.observe(40, Observed::Executing("3"));
        b.observe(45, Observed::Executed("3"));
        b.observe(50, Observed::Success);
        b.observe(51, Observed::Idle);
        assert_eq!(
            b.take_news(),
            [
                NodeStep::Cached(vec!["1".into()]),
                NodeStep::Started("2".into()),
                NodeStep::Finished {
                    node: "2".into(),
                    duration_ms: Some(28),
                    status: NodeStatus::Completed
                },
                NodeStep::Started("3".into()),
                NodeStep::Finished {
                    node: "3".into(),
                    duration_ms: Some(5),
                    status: NodeStatus::Completed
                },
            ]
        );
        assert!(b.take_news().is_empty(), "taken once");
        // A failing node ends as failed; what /history recalls is not news.
        let mut b = ProfileBuilder::default();
        b.observe(10, Observed::Executing("1"));
        b.observe(
            20,
            Observed::Error {
                node: "1",
                message: "boom",
            },
        );
        b.recall(5, Observed::Ran(&["2".to_owned()]));
        b.recall(6, Observed::Cached(&["3".to_owned()]));
        assert_eq!(
            b.take_news(),
            [
                NodeStep::Started("1".into()),
                NodeStep::Finished {
                    node: "1".into(),
                    duration_ms: Some(10),
                    status: NodeStatus::Failed
                },
            ]
        );
    }
}
