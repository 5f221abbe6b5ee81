//! Which backend a queued job goes to: eligibility (tags, node classes, the job's own
//! exclusions), then preference (backend priority, not much slower than the farm for the
//! job's classes, warm models, not where it failed
//! before, least recently used). Also whether a job can never run anywhere, so it fails
//! instead of waiting forever (DESIGN.md invariant 1).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use utoipa::ToSchema;

use crate::job::{Job, JobError, Millis};

/// What the scheduler knows of one backend at this moment.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub priority: i32,
    pub tags: &'a [String],
    /// Node classes from `/object_info`; `None` until they have been fetched.
    pub classes: Option<&'a HashSet<String>>,
    /// Connected, with no attempt in flight: it can take a prompt now.
    pub idle: bool,
    /// Model files of the latest prompt sent to it (all a ComfyUI keeps loaded).
    pub warm_models: &'a [String],
    /// When it last took a prompt; 0 if never.
    pub last_used: Millis,
    /// Kept away from this job for now: blocked for its workflow after a fault there, or
    /// its circuit is open. It may run the job once that lifts.
    pub blocked: bool,
    /// Much slower than the farm for a class this job uses (from history): used only
    /// when no other backend is idle.
    pub slow: bool,
    /// The programs it runs for command jobs: an agent's allow-list, `None` while an
    /// agent has not said (unlinked since this coordinator started), empty for a URL
    /// backend.
    pub programs: Option<&'a [String]>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Choice {
    /// Dispatch to the candidate at this index.
    Run(usize),
    /// Some backend could run it later; none can now.
    Wait(Waiting),
    /// No known backend can ever run it.
    Never(JobError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// Eligible backends exist and all are busy or offline.
    Busy,
    /// Every eligible backend that is free is blocked for this workflow or unhealthy.
    Blocked,
    /// Some backend's node classes are not known yet.
    Capabilities,
    /// No backend is configured.
    NoBackends,
}

impl Waiting {
    pub fn describe(self) -> &'static str {
        match self {
            Waiting::Busy => "every eligible backend is busy or offline",
            Waiting::Blocked => {
                "every eligible backend is blocked for this workflow or unhealthy, until a block lifts"
            }
            Waiting::Capabilities => {
                "waiting to learn what the backends run (node classes, agents' programs)"
            }
            Waiting::NoBackends => "no backend is configured",
        }
    }
}

/// What keeps one backend from taking a job at this moment, for telling a waiting job
/// why it waits (the scheduler itself decides from `Candidate`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// It could take the job now.
    Free,
    /// It runs another prompt (or drains one gantry stopped).
    Busy,
    /// Not connected: down, restarting, or an agent not linked. `why` is its last error.
    Offline { why: Option<String> },
    /// An operator took it out of rotation.
    Draining,
    /// Blocked for this job's workflow shape after a failure of it there, until `until`.
    Blocked { until: Millis },
    /// Its circuit breaker is open; a probe may close it from `probe_at` on.
    CircuitOpen { probe_at: Millis },
    /// Stuck on a prompt gantry stopped that will not go away.
    Stuck,
}

/// Why a queued job is not running, in one word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    /// Its retry backoff has not ended.
    Backoff,
    /// Every backend that could run it is running something else.
    Busy,
    /// The backends that could run it are blocked for its workflow shape after failing it.
    Blocked,
    /// The circuit breaker of the backends that could run it is open.
    CircuitOpen,
    /// The backends that could run it are offline (down, restarting, not linked).
    BackendOffline,
    /// Node classes or an agent's programs are not known yet.
    Capabilities,
    /// The backends that could run it are draining.
    Draining,
    /// No backend (with its tags) is known at all.
    NoBackend,
}

/// Why a queued job waits and, when that is known, until when: a job's view and its
/// `job_retrying` event say what will really happen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WaitingFor {
    pub reason: WaitReason,
    pub message: String,
    /// The earliest moment it can start, when something with a known end holds it (its
    /// backoff, a block, an open breaker's probe); absent when it waits for an event (a
    /// backend coming back or becoming free).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Millis>,
    /// What keeps it from each backend that could run it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backends: BTreeMap<String, String>,
}

/// What routing says of a queued job, all backends considered.
#[derive(Clone, Debug, PartialEq)]
pub enum Outlook {
    /// A backend could take it now.
    Ready,
    Wait(WaitingFor),
    /// No known backend can ever run it.
    Never(JobError),
}

/// Where `job` stands, given each backend's `standing` (same order as `backends`) at
/// `now`. `wall` renders a time for the messages.
pub fn outlook(
    job: &Job,
    backends: &[Candidate<'_>],
    standings: &[Standing],
    now: Millis,
    wall: &dyn Fn(Millis) -> String,
) -> Outlook {
    let backoff = (job.not_before > now).then_some(job.not_before);
    let mut never = Vec::new();
    let mut held: Vec<(&str, &Standing)> = Vec::new();
    let mut unknown: Vec<&str> = Vec::new();
    for (b, standing) in backends.iter().zip(standings) {
        if let Some(reason) = never_reason(job, b) {
            never.push((b.name, reason));
            continue;
        }
        let capabilities_unknown = match &job.spec.command {
            Some(_) => b.programs.is_none(),
            None => b.classes.is_none(),
        };
        if capabilities_unknown {
            unknown.push(b.name);
            continue;
        }
        held.push((b.name, standing));
    }
    if !backends.is_empty() && never.len() == backends.len() {
        return match choose(job, backends) {
            Choice::Never(error) => Outlook::Never(error),
            // `choose` agrees on `never_reason`; kept total rather than assumed.
            Choice::Run(_) | Choice::Wait(_) => Outlook::Ready,
        };
    }
    let mut explained: BTreeMap<String, String> = BTreeMap::new();
    for (name, reason) in &never {
        explained.insert((*name).to_owned(), format!("never: {reason}"));
    }
    for name in &unknown {
        explained.insert(
            (*name).to_owned(),
            "not read yet: its node classes (or an agent's programs) are unknown".to_owned(),
        );
    }
    for (name, standing) in &held {
        let text = match standing {
            Standing::Free => "free".to_owned(),
            Standing::Busy => "busy".to_owned(),
            Standing::Offline { why: Some(why) } => format!("offline ({why})"),
            Standing::Offline { why: None } => "offline".to_owned(),
            Standing::Draining => "draining".to_owned(),
            Standing::Blocked { until } => {
                format!("blocked for this workflow until {}", wall(*until))
            }
            Standing::CircuitOpen { probe_at } => {
                format!("circuit open, probed from {}", wall(*probe_at))
            }
            Standing::Stuck => "stuck on a prompt gantry stopped".to_owned(),
        };
        explained.insert((*name).to_owned(), text);
    }
    let is = |f: fn(&Standing) -> bool| held.iter().any(|(_, s)| f(s));
    // The hold with a known end that lifts first, when nothing else may free it.
    let timed = held
        .iter()
        .filter_map(|(_, s)| match s {
            Standing::Blocked { until } => Some((*until, WaitReason::Blocked)),
            Standing::CircuitOpen { probe_at } => Some((*probe_at, WaitReason::CircuitOpen)),
            _ => None,
        })
        .min_by_key(|(at, _)| *at);
    let (reason, until) = if held.is_empty() && unknown.is_empty() {
        (WaitReason::NoBackend, None)
    } else if is(|s| *s == Standing::Free) {
        match backoff {
            Some(at) => (WaitReason::Backoff, Some(at)),
            None => return Outlook::Ready,
        }
    } else if is(|s| *s == Standing::Busy) {
        (WaitReason::Busy, None)
    } else if let Some((at, reason)) = timed {
        (reason, Some(backoff.map_or(at, |b| b.max(at))))
    } else if is(|s| matches!(s, Standing::Offline { .. })) {
        (WaitReason::BackendOffline, None)
    } else if !unknown.is_empty() {
        (WaitReason::Capabilities, None)
    } else {
        // Draining or stuck: both wait for a person.
        (WaitReason::Draining, None)
    };
    let mut message = match reason {
        WaitReason::Backoff => "waiting out its retry backoff".to_owned(),
        WaitReason::Busy => "every backend that can run it is busy".to_owned(),
        WaitReason::Blocked => {
            "every backend that can run it and is free is blocked for this workflow".to_owned()
        }
        WaitReason::CircuitOpen => {
            "the circuit breaker of every backend that can run it and is free is open".to_owned()
        }
        WaitReason::BackendOffline => {
            "waiting for a backend that can run it to come back (every one is offline)".to_owned()
        }
        WaitReason::Capabilities => {
            "waiting to learn what the backends run (node classes, agents' programs)".to_owned()
        }
        WaitReason::Draining => "every backend that can run it is draining or stuck".to_owned(),
        WaitReason::NoBackend if job.spec.tags.is_empty() => "no backend is known".to_owned(),
        WaitReason::NoBackend => {
            format!("no backend with tag {} is known", job.spec.tags.join(", "))
        }
    };
    if let Some(at) = until {
        let _ = write!(message, ", until {}", wall(at));
    }
    // A known `until` already counts the backoff in.
    if let (Some(at), None) = (backoff, until) {
        let _ = write!(message, "; its retry backoff ends at {}", wall(at));
    }
    Outlook::Wait(WaitingFor {
        reason,
        message,
        until,
        backends: explained,
    })
}

/// Why `backend` can never run `job`, if it cannot.
pub fn never_reason(job: &Job, backend: &Candidate<'_>) -> Option<String> {
    let missing_tags: Vec<&str> = job
        .spec
        .tags
        .iter()
        .filter(|t| !backend.tags.contains(t))
        .map(String::as_str)
        .collect();
    if !missing_tags.is_empty() {
        return Some(format!("lacks tag {}", missing_tags.join(", ")));
    }
    if let (Some(command), Some(programs)) = (&job.spec.command, backend.programs) {
        if !programs.iter().any(|p| p == command.program()) {
            return Some(if programs.is_empty() {
                format!(
                    "runs no commands (not an agent with --allow), so not {:?}",
                    command.program()
                )
            } else {
                format!(
                    "does not allow program {:?} (allows {})",
                    command.program(),
                    programs.join(", ")
                )
            });
        }
    }
    if let Some(classes) = backend.classes {
        let missing: Vec<String> = job
            .spec
            .workflow
            .nodes()
            .filter(|(_, class)| !classes.contains(*class))
            .map(|(node, class)| format!("node class {class} (node {node})"))
            .collect();
        if !missing.is_empty() {
            return Some(format!("{} not installed", missing.join(", ")));
        }
    }
    let reasons: Vec<String> = job
        .excluded
        .iter()
        .filter(|e| e.backend == backend.name)
        .map(|e| e.reason.to_string())
        .collect();
    if !reasons.is_empty() {
        return Some(reasons.join(", "));
    }
    None
}

/// Sort key among eligible idle backends; smaller is better.
type Preference<'a> = (i32, bool, usize, bool, Millis, &'a str);

/// Choose a backend for `job` among `backends`.
pub fn choose(job: &Job, backends: &[Candidate<'_>]) -> Choice {
    if backends.is_empty() {
        return Choice::Wait(Waiting::NoBackends);
    }
    let models: Vec<String> = job.spec.workflow.model_files();
    let failed_on: HashSet<&str> = job
        .attempts
        .iter()
        .filter(|a| a.error.is_some())
        .map(|a| a.backend.as_str())
        .collect();

    let mut never = Vec::new();
    let mut best: Option<(usize, Preference<'_>)> = None;
    let mut capabilities_unknown = false;
    let mut blocked = false;
    for (idx, b) in backends.iter().enumerate() {
        if let Some(reason) = never_reason(job, b) {
            never.push((b.name, reason));
            continue;
        }
        // A command job needs to know the programs, a workflow the node classes.
        let unknown = match &job.spec.command {
            Some(_) => b.programs.is_none(),
            None => b.classes.is_none(),
        };
        if unknown {
            capabilities_unknown = true;
            continue;
        }
        if b.blocked {
            blocked = true;
            continue;
        }
        if !b.idle {
            continue;
        }
        let warm = models.iter().filter(|m| b.warm_models.contains(m)).count();
        // Smaller is better in every field but priority and warmth, which are negated.
        let key = (
            -b.priority,
            b.slow,
            usize::MAX - warm,
            failed_on.contains(b.name),
            b.last_used,
            b.name,
        );
        if best.as_ref().is_none_or(|(_, k)| key < *k) {
            best = Some((idx, key));
        }
    }
    if let Some((idx, _)) = best {
        return Choice::Run(idx);
    }
    if never.len() == backends.len() {
        let mut message = String::from("no backend can run this job:");
        for (i, (name, reason)) in never.iter().enumerate() {
            let sep = if i == 0 { " " } else { "; " };
            let _ = write!(message, "{sep}{name}: {reason}");
        }
        let details = serde_json::Value::Object(
            never
                .iter()
                .map(|(name, reason)| (name.to_string(), serde_json::Value::from(reason.clone())))
                .collect(),
        );
        return Choice::Never(
            JobError::new("unroutable", message)
                .with_details(serde_json::json!({ "backends": details })),
        );
    }
    if capabilities_unknown {
        return Choice::Wait(Waiting::Capabilities);
    }
    if blocked {
        return Choice::Wait(Waiting::Blocked);
    }
    Choice::Wait(Waiting::Busy)
}

#[cfg(test)]
mod tests;
