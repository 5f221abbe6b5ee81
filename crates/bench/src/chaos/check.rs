//! The verdict of a chaos run, read from the store once every coordinator stopped: every
//! promise of RELIABILITY.md checked over every job and every event.

use super::farm::Kill;
use super::load::{Acked, Progress};
use super::plan::Plan;
use crate::stats::Stats;
use crate::time::rfc3339_ms;
use gantry_core::{AttemptStatus, Job, JobId, JobState};
use gantry_store::{JobFilter, Store};
use std::collections::{BTreeMap, HashMap, HashSet};

/// How late past its limit a stall may be detected.
const STALL_SLACK_MS: i64 = 500;
/// At most this many problems of one kind are listed (all are counted).
pub(super) const LISTED: usize = 20;

/// What the store says, and what is wrong with it.
pub(super) struct Verdict {
    pub(super) problems: Vec<String>,
    pub(super) found: usize,
    pub(super) events: usize,
    pub(super) states: BTreeMap<String, usize>,
    pub(super) failed_by_code: BTreeMap<String, usize>,
    pub(super) attempts: usize,
    pub(super) attempt_codes: BTreeMap<String, usize>,
    pub(super) phases: BTreeMap<String, usize>,
    /// Per kill: attempts in flight at it, by how they ended.
    pub(super) in_flight: Vec<BTreeMap<String, usize>>,
    /// Prompts left on a backend whose attempt a coordinator failed just before it was
    /// killed (the known gap).
    pub(super) left_at_kill: Vec<String>,
    /// Per backend: attempts by how they ended.
    pub(super) by_backend: BTreeMap<String, BTreeMap<String, usize>>,
    pub(super) lag: Stats,
    pub(super) lag_adopted: Stats,
    pub(super) from_kill_max_ms: f64,
}

/// Problems of one kind: all counted, the first `LISTED` kept.
#[derive(Default)]
struct Found(BTreeMap<&'static str, (usize, Vec<String>)>);

impl Found {
    fn add(&mut self, kind: &'static str, what: String) {
        let e = self.0.entry(kind).or_default();
        e.0 += 1;
        if e.1.len() < LISTED {
            e.1.push(what);
        }
    }

    fn lines(self) -> Vec<String> {
        self.0
            .into_iter()
            .flat_map(|(kind, (n, first))| {
                std::iter::once(format!("{kind}: {n}"))
                    .chain(first.into_iter().map(|w| format!("  {w}")))
            })
            .collect()
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn check(
    store: &dyn Store,
    plans: &[Plan],
    progress: &Progress,
    kills: &[Kill],
    limit_ms: i64,
    streamed_to: i64,
    caught_up: bool,
    left_on_backends: &[(String, String)],
) -> anyhow::Result<Verdict> {
    let mut bad = Found::default();
    // Every event, for the succeeded counts and the stream comparison.
    let mut events = Vec::new();
    loop {
        let after = events.last().map_or(0, |e: &gantry_store::Event| e.seq);
        let page = store.events_since(after, 5000).await?;
        if page.is_empty() {
            break;
        }
        events.extend(page);
    }
    let mut successes: HashMap<&str, usize> = HashMap::new();
    for e in &events {
        if e.kind.name() == "succeeded" {
            *successes.entry(e.job_id.as_str()).or_default() += 1;
        }
    }
    // The stream a client followed across the kills: every stored event up to the last
    // one reported at the end, once and in order.
    let stored_seqs: Vec<i64> = events
        .iter()
        .map(|e| e.seq)
        .filter(|s| *s <= streamed_to)
        .collect();
    let read: Vec<i64> = progress
        .seqs
        .iter()
        .copied()
        .filter(|s| *s <= streamed_to)
        .collect();
    if !caught_up || read != stored_seqs {
        let missed = stored_seqs.len().saturating_sub(read.len());
        bad.add(
            "the event stream followed across the kills is not the stored sequence",
            format!(
                "read {} events, stored {} up to seq {streamed_to} ({missed} missing){}",
                read.len(),
                stored_seqs.len(),
                if caught_up {
                    ""
                } else {
                    "; it never caught up"
                }
            ),
        );
    }

    // Jobs: every acknowledged one, and nothing else.
    let mut stored_ids: HashSet<String> = HashSet::new();
    let mut filter = JobFilter {
        state: None,
        limit: 1000,
        before: None,
    };
    loop {
        let page = store.list_jobs(&filter).await?;
        stored_ids.extend(page.jobs.iter().map(|j| j.id.to_string()));
        match page.next {
            Some(next) if !page.jobs.is_empty() => filter.before = Some(next),
            _ => break,
        }
    }
    let acked: Vec<(usize, &Acked)> = progress
        .acked
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.as_ref().map(|a| (i, a)))
        .collect();
    let acked_ids: HashSet<&str> = acked.iter().map(|(_, a)| a.id.as_str()).collect();
    if acked_ids.len() != acked.len() {
        bad.add(
            "two idempotency keys answered the same job",
            format!("{} acknowledgements, {} ids", acked.len(), acked_ids.len()),
        );
    }
    for id in &stored_ids {
        if !acked_ids.contains(id.as_str()) {
            bad.add("a stored job no submit was acknowledged for", id.clone());
        }
    }

    let mut v = Verdict {
        problems: Vec::new(),
        found: 0,
        events: events.len(),
        states: BTreeMap::new(),
        failed_by_code: BTreeMap::new(),
        attempts: 0,
        attempt_codes: BTreeMap::new(),
        phases: BTreeMap::new(),
        in_flight: vec![BTreeMap::new(); kills.len()],
        by_backend: BTreeMap::new(),
        left_at_kill: Vec::new(),
        lag: Stats::of(&[]),
        lag_adopted: Stats::of(&[]),
        from_kill_max_ms: f64::NAN,
    };
    let mut lags = Vec::new();
    let mut lags_adopted = Vec::new();
    for (i, a) in &acked {
        let Some(job_id) = JobId::parse(&a.id) else {
            bad.add("an acknowledged id that is not a job id", a.id.clone());
            continue;
        };
        let Some(job) = store.job(&job_id).await? else {
            bad.add("lost: acknowledged, not in the store", a.id.clone());
            continue;
        };
        v.found += 1;
        check_job(
            &job,
            plans[*i],
            successes.get(a.id.as_str()).copied().unwrap_or(0),
            kills,
            limit_ms,
            &mut v,
            &mut lags,
            &mut lags_adopted,
            &mut bad,
        );
    }
    // Prompts left on a backend: the known gap (RELIABILITY.md) is a timeout committed by
    // a coordinator killed before it stopped the prompt (record, then act), which no
    // later coordinator knows to stop; anything else is a problem.
    let mut attempt_of: HashMap<String, (String, i64)> = HashMap::new();
    for (_, a) in &acked {
        if let Some(job) = JobId::parse(&a.id) {
            if let Some(job) = store.job(&job).await? {
                for at in &job.attempts {
                    if let Some(f) = at.finished_at {
                        attempt_of.insert(
                            at.prompt_id.clone(),
                            (
                                format!("{} attempt {} {}", a.id, at.number, at.status.as_str()),
                                f,
                            ),
                        );
                    }
                }
            }
        }
    }
    for (url, prompt) in left_on_backends {
        let explained = attempt_of.get(prompt).filter(|(_, finished)| {
            kills
                .iter()
                .any(|k| *finished <= k.at_ms && *finished > k.at_ms - limit_ms - STALL_SLACK_MS)
        });
        match explained {
            Some((what, _)) => v.left_at_kill.push(format!("{prompt} on {url} ({what})")),
            None => bad.add(
                "a prompt left on a backend after every job ended",
                format!(
                    "{prompt} on {url} ({})",
                    attempt_of
                        .get(prompt)
                        .map_or("no ended attempt of it", |(w, _)| w.as_str())
                ),
            ),
        }
    }
    v.lag = Stats::of(&lags);
    v.lag_adopted = Stats::of(&lags_adopted.iter().map(|l| l.0).collect::<Vec<_>>());
    v.from_kill_max_ms = lags_adopted.iter().map(|l| l.1).fold(f64::NAN, f64::max);
    v.problems = bad.lines();
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
fn check_job(
    job: &Job,
    plan: Plan,
    successes: usize,
    kills: &[Kill],
    limit_ms: i64,
    v: &mut Verdict,
    lags: &mut Vec<f64>,
    lags_adopted: &mut Vec<(f64, f64)>,
    bad: &mut Found,
) {
    let id = job.id.to_string();
    *v.states.entry(job.state.as_str().to_owned()).or_default() += 1;
    v.attempts += job.attempts.len();
    let won = job
        .attempts
        .iter()
        .filter(|a| a.status == AttemptStatus::Succeeded)
        .count();
    if successes > 1 || won > 1 {
        bad.add(
            "succeeded twice",
            format!("{id}: {successes} succeeded events, {won} succeeded attempts"),
        );
    }
    if !job.state.is_terminal() {
        bad.add(
            "stuck: not terminal",
            format!(
                "{id}: {} after {} attempts",
                job.state.as_str(),
                job.attempts.len()
            ),
        );
    }
    if job.state.is_terminal() {
        for a in &job.attempts {
            if matches!(
                a.status,
                AttemptStatus::Submitting | AttemptStatus::Pending | AttemptStatus::Executing
            ) {
                bad.add(
                    "stuck: an attempt still live in a terminal job",
                    format!("{id}: attempt {} {}", a.number, a.status.as_str()),
                );
            }
        }
    }
    if job.state == JobState::Failed {
        let code = job.error.as_ref().map_or("none", |e| e.code.as_str());
        *v.failed_by_code.entry(code.to_owned()).or_default() += 1;
    }
    match (plan, job.state) {
        (Plan::Work, JobState::Succeeded) => {
            if successes != 1 || won != 1 {
                bad.add(
                    "succeeded without exactly one success recorded",
                    format!("{id}: {successes} succeeded events, {won} succeeded attempts"),
                );
            }
        }
        (Plan::Doomed, JobState::Failed) => {
            // The workflow's fault: the same exception on two backends.
            let raised: HashSet<&str> = job
                .attempts
                .iter()
                .filter(|a| a.error.as_ref().is_some_and(|e| e.code == "node_error"))
                .map(|a| a.backend.as_str())
                .collect();
            let code = job.error.as_ref().map(|e| e.code.as_str());
            if code != Some("node_error") || raised.len() < 2 {
                bad.add(
                    "a doomed job failed otherwise than by its workflow",
                    format!("{id}: {code:?}, node errors on {raised:?}"),
                );
            }
        }
        (_, state) if !state.is_terminal() => {}
        (plan, state) => bad.add(
            "a job ended otherwise than its faults allow",
            format!(
                "{id} ({plan:?}): {} {}",
                state.as_str(),
                job.error
                    .as_ref()
                    .map_or(String::new(), |e| format!("{}: {}", e.code, e.message))
            ),
        ),
    }

    for a in &job.attempts {
        let how = match &a.error {
            Some(e) if a.status == AttemptStatus::Failed => e.code.clone(),
            _ => a.status.as_str().to_owned(),
        };
        *v.by_backend
            .entry(a.backend.clone())
            .or_default()
            .entry(how)
            .or_default() += 1;
        // In flight at a kill: created before it and not finished by then.
        for (k, kill) in kills.iter().enumerate() {
            if a.created_at <= kill.at_ms && a.finished_at.is_none_or(|f| f > kill.at_ms) {
                let how = match &a.error {
                    Some(e) => format!("{} ({})", a.status.as_str(), e.code),
                    None => a.status.as_str().to_owned(),
                };
                *v.in_flight[k].entry(how).or_default() += 1;
            }
        }
        let Some(error) = &a.error else { continue };
        if a.status == AttemptStatus::Failed {
            *v.attempt_codes.entry(error.code.clone()).or_default() += 1;
        }
        if error.code != "timeout" {
            continue;
        }
        let phase = error.details["phase"].as_str().unwrap_or("?");
        *v.phases.entry(phase.to_owned()).or_default() += 1;
        if a.status != AttemptStatus::Failed || !matches!(phase, "node_stall" | "first_progress") {
            continue;
        }
        let since = error.details["since"].as_str().and_then(rfc3339_ms);
        let limit = error.details["limit_ms"].as_i64();
        let (Some(since), Some(limit), Some(finished)) = (since, limit, a.finished_at) else {
            bad.add(
                "a stall timeout without since, limit or finished_at",
                format!("{id}: attempt {}: {}", a.number, error.details),
            );
            continue;
        };
        if limit != limit_ms {
            bad.add(
                "a stall timeout with another limit than configured",
                format!("{id}: attempt {} {phase}: {limit} ms", a.number),
            );
        }
        let lag = finished - since - limit;
        let straddled = kills
            .iter()
            .filter(|k| a.created_at <= k.at_ms && finished > k.at_ms)
            .map(|k| k.at_ms)
            .max();
        match straddled {
            Some(kill_ms) => lags_adopted.push((lag as f64, (finished - kill_ms - limit) as f64)),
            None => lags.push(lag as f64),
        }
        if !(0..=STALL_SLACK_MS).contains(&lag) {
            bad.add(
                "a stall detected outside its limit + 500 ms",
                format!(
                    "{id}: attempt {} on {} ({phase}): {lag} ms past the limit of {limit} ms{}",
                    a.number,
                    a.backend,
                    if straddled.is_some() {
                        ", in flight at a kill"
                    } else {
                        ""
                    }
                ),
            );
        }
    }
}
