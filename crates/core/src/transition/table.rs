//! The state machine as one table: every situation a job can be in, against every kind of
//! input, with what `transition` makes of it. Built from DESIGN.md's state tables and the
//! code; where the two disagree the row follows the code and a comment says what DESIGN.md
//! says.
//!
//! A situation is the job's state, its latest attempt's status and whether a cancel was
//! asked for. `situations` lists every such triple through exhaustive matches over
//! `JobState` and `AttemptStatus`, and `build` either drives `transition` from a new job
//! into it or says no job can be there (again an exhaustive match, so a new state or
//! status does not compile until it is placed). An input is a `Case`, and `variant` ties
//! the cases to `Input`'s variants the same way. The test then wants exactly one row for
//! each reachable (situation, case) pair and none for unreachable ones; a missing pair
//! fails it, and the message prints the row as the code would fill it in.
//!
//! An outcome reads `state [marks] | attempts | events | effects`, or the refusal (`late`,
//! `no change`, `not allowed`). Attempt 1 ran on backend `a`, 2 on `b`, 3 on `c`; where a
//! situation has attempts it has two, the first failed.

use super::*;
use crate::job::{JobSpec, Timeouts};
use crate::workflow::Workflow;
use std::fmt;

use AttemptStatus as A;
use JobState as J;

/// When the input arrives; the situation was built at `BEFORE`.
const NOW: Millis = 5_000;
const BEFORE: Millis = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Situation {
    state: JobState,
    /// The latest attempt's status, `None` before the first dispatch.
    attempt: Option<AttemptStatus>,
    cancel: bool,
}

const fn at(state: JobState, attempt: Option<AttemptStatus>, cancel: bool) -> Situation {
    Situation {
        state,
        attempt,
        cancel,
    }
}

impl fmt::Display for Situation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.state)?;
        if let Some(a) = self.attempt {
            write!(f, "/{}", a.as_str())?;
        }
        if self.cancel {
            write!(f, "+cancel")?;
        }
        Ok(())
    }
}

// The reachable situations, by name.
const QUEUED: Situation = at(J::Queued, None, false);
/// Back in the queue after attempts 1 and 2 failed.
const REQUEUED: Situation = at(J::Queued, Some(A::Failed), false);
const SUBMITTING: Situation = at(J::Running, Some(A::Submitting), false);
const PENDING: Situation = at(J::Running, Some(A::Pending), false);
const EXECUTING: Situation = at(J::Running, Some(A::Executing), false);
const SUBMITTING_C: Situation = at(J::Running, Some(A::Submitting), true);
const PENDING_C: Situation = at(J::Running, Some(A::Pending), true);
const EXECUTING_C: Situation = at(J::Running, Some(A::Executing), true);
const SUCCEEDED: Situation = at(J::Succeeded, Some(A::Succeeded), false);
const SUCCEEDED_C: Situation = at(J::Succeeded, Some(A::Succeeded), true);
/// Attempt 1's late success adopted while attempt 2 ran (which it cancelled).
const ADOPTED: Situation = at(J::Succeeded, Some(A::Cancelled), false);
const ADOPTED_C: Situation = at(J::Succeeded, Some(A::Cancelled), true);
/// Attempt 1's late success adopted while the job waited in the queue.
const ADOPTED_QUEUED: Situation = at(J::Succeeded, Some(A::Failed), false);
const FAILED_QUEUED: Situation = at(J::Failed, None, false);
const FAILED: Situation = at(J::Failed, Some(A::Failed), false);
/// The deadline passed while a cancel waited for the backend.
const FAILED_C: Situation = at(J::Failed, Some(A::Failed), true);
const CANCELLED_QUEUED: Situation = at(J::Cancelled, None, true);
const CANCELLED: Situation = at(J::Cancelled, Some(A::Cancelled), true);
/// The attempt failed (or the job was queued) after the cancel was asked for.
const CANCELLED_FAILED: Situation = at(J::Cancelled, Some(A::Failed), true);

const RUNNING: [Situation; 3] = [SUBMITTING, PENDING, EXECUTING];
const CANCELLING: [Situation; 3] = [SUBMITTING_C, PENDING_C, EXECUTING_C];
const IN_QUEUE: [Situation; 2] = [QUEUED, REQUEUED];
const TERMINAL: [Situation; 11] = [
    SUCCEEDED,
    SUCCEEDED_C,
    ADOPTED,
    ADOPTED_C,
    ADOPTED_QUEUED,
    FAILED_QUEUED,
    FAILED,
    FAILED_C,
    CANCELLED_QUEUED,
    CANCELLED,
    CANCELLED_FAILED,
];

/// Which attempt an input is about: the latest (attempt 1 before any dispatch, which does
/// not exist yet), or the one before it (attempt 0, which never exists, when there is none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    Latest,
    Earlier,
}

/// Whether the job has an attempt left after the failing one (its `max_attempts` is set so
/// before the input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tries {
    Left,
    Last,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Dispatch,
    Submitted(At),
    Started(At),
    Succeeded(At),
    Failed(At, FailureKind, Tries),
    Cancel,
    CancelConfirmed(At),
    QueueTimeout,
    Unroutable,
    DeadlinePassed,
}

type Row = (&'static [&'static [Situation]], Case, &'static str);

/// Every (situation, input) pair: each row lists its situations, by name or by group, for
/// one case. One line per row, so the table reads as one.
#[rustfmt::skip]
fn table() -> Vec<Row> {
    use At::*;
    use Case::*;
    use FailureKind::{Backend, Displaced, Lost, Missing, Workflow};
    use Tries::*;
    const NOT_RUNNING: [Situation; 13] = [
        QUEUED, REQUEUED, SUCCEEDED, SUCCEEDED_C, ADOPTED, ADOPTED_C, ADOPTED_QUEUED,
        FAILED_QUEUED, FAILED, FAILED_C, CANCELLED_QUEUED, CANCELLED, CANCELLED_FAILED,
    ];
    const EVERY: &[&[Situation]] = &[&IN_QUEUE, &RUNNING, &CANCELLING, &TERMINAL];
    vec![
        // DESIGN.md: queued | scheduler picks a backend | running, attempt n+1 in submitting.
        (&[&[QUEUED]], Dispatch, "running | 1 submitting | dispatched(1) | none"),
        (&[&[REQUEUED]], Dispatch, "running | 1 failed, 2 failed, 3 submitting | dispatched(3) | none"),
        (&[&RUNNING, &CANCELLING, &TERMINAL], Dispatch, "not allowed"),

        // DESIGN.md: submitting ends on POST /prompt answered (200 -> pending).
        (&[&[SUBMITTING]], Submitted(Latest), "running | 1 failed, 2 pending | submitted(2) | none"),
        (&[&[SUBMITTING_C]], Submitted(Latest), "running [cancel requested] | 1 failed, 2 pending | submitted(2) | none"),
        (&[&[PENDING, EXECUTING, PENDING_C, EXECUTING_C]], Submitted(Latest), "no change"),
        (&[&NOT_RUNNING], Submitted(Latest), "late"),
        (EVERY, Submitted(Earlier), "late"),

        // DESIGN.md: pending ends on execution_start. Not in DESIGN.md: a start that
        // overtakes the submit's answer moves submitting straight to executing.
        (&[&[SUBMITTING, PENDING]], Started(Latest), "running | 1 failed, 2 executing | started(2) | none"),
        (&[&[SUBMITTING_C, PENDING_C]], Started(Latest), "running [cancel requested] | 1 failed, 2 executing | started(2) | none"),
        (&[&[EXECUTING, EXECUTING_C]], Started(Latest), "no change"),
        (&[&NOT_RUNNING], Started(Latest), "late"),
        (EVERY, Started(Earlier), "late"),

        // DESIGN.md: running | attempt succeeded | succeeded. An end heard before the
        // submit's answer or the start (a cached prompt, a reconcile) tells the missing
        // steps first. After a cancel, success wins and the job says the cancel was late.
        (&[&[SUBMITTING]], Succeeded(Latest), "succeeded | 1 failed, 2 succeeded | submitted(2) started(2) succeeded(2) | none"),
        (&[&[PENDING]], Succeeded(Latest), "succeeded | 1 failed, 2 succeeded | started(2) succeeded(2) | none"),
        (&[&[EXECUTING]], Succeeded(Latest), "succeeded | 1 failed, 2 succeeded | succeeded(2) | none"),
        (&[&[SUBMITTING_C]], Succeeded(Latest), "succeeded [cancel requested, note] | 1 failed, 2 succeeded | submitted(2) started(2) succeeded(2) | none"),
        (&[&[PENDING_C]], Succeeded(Latest), "succeeded [cancel requested, note] | 1 failed, 2 succeeded | started(2) succeeded(2) | none"),
        (&[&[EXECUTING_C]], Succeeded(Latest), "succeeded [cancel requested, note] | 1 failed, 2 succeeded | succeeded(2) | none"),
        // DESIGN.md lists the late success under running only; the code adopts it from
        // the queue too (invariant 3: first success wins), and never on a finished job
        // (invariant 1: one terminal state), though invariant 3's "adopted if no later
        // attempt has succeeded" would adopt it after a failure or a cancel.
        (&[&[REQUEUED]], Succeeded(Latest), "succeeded [note] | 1 failed, 2 succeeded | succeeded(2, late) | none"),
        (&[&[QUEUED], &TERMINAL], Succeeded(Latest), "late"),
        (&[&RUNNING], Succeeded(Earlier), "succeeded [note] | 1 succeeded, 2 cancelled | succeeded(1, late) | stop(2)"),
        (&[&CANCELLING], Succeeded(Earlier), "succeeded [cancel requested, note] | 1 succeeded, 2 cancelled | succeeded(1, late) | stop(2)"),
        (&[&[REQUEUED]], Succeeded(Earlier), "succeeded [note] | 1 succeeded, 2 failed | succeeded(1, late) | none"),
        (&[&[QUEUED], &TERMINAL], Succeeded(Earlier), "late"),

        // DESIGN.md: failed, retryable, attempts left -> queued, not before now + backoff;
        // not retryable or none left -> failed. The code waits out a backoff only after
        // the workflow's own trouble (`backend`); a lost backend, a missing model and a
        // displaced prompt go back at once, and the last two do not count. A failure
        // after a cancel cancels the job (not in DESIGN.md).
        (&[&RUNNING], Failed(Latest, Backend, Left), "queued | 1 failed, 2 failed | attempt_failed(2, retry) job_retrying(backoff) | none"),
        (&[&RUNNING], Failed(Latest, Backend, Last), "failed: backend | 1 failed, 2 failed | attempt_failed(2) failed | none"),
        (&[&RUNNING], Failed(Latest, Lost, Left), "queued | 1 failed, 2 failed | attempt_failed(2, retry) job_retrying(now) | none"),
        (&[&RUNNING], Failed(Latest, Lost, Last), "failed: lost | 1 failed, 2 failed | attempt_failed(2) failed | none"),
        (&[&RUNNING], Failed(Latest, Workflow, Left), "failed: workflow | 1 failed, 2 failed | attempt_failed(2) failed | none"),
        (&[&RUNNING], Failed(Latest, Workflow, Last), "failed: workflow | 1 failed, 2 failed | attempt_failed(2) failed | none"),
        (&[&RUNNING], Failed(Latest, Missing, Left), "queued [b excluded] | 1 failed, 2 failed uncounted | attempt_failed(2, retry) job_retrying(now) | none"),
        (&[&RUNNING], Failed(Latest, Missing, Last), "queued [b excluded] | 1 failed, 2 failed uncounted | attempt_failed(2, retry) job_retrying(now) | none"),
        (&[&RUNNING], Failed(Latest, Displaced, Left), "queued | 1 failed, 2 failed uncounted | attempt_failed(2, retry) job_retrying(now) | none"),
        (&[&RUNNING], Failed(Latest, Displaced, Last), "queued | 1 failed, 2 failed uncounted | attempt_failed(2, retry) job_retrying(now) | none"),
        (&[&CANCELLING], Failed(Latest, Backend, Left), "cancelled [cancel requested] | 1 failed, 2 failed | attempt_failed(2) cancelled(2) | none"),
        (&[&CANCELLING], Failed(Latest, Backend, Last), "cancelled [cancel requested] | 1 failed, 2 failed | attempt_failed(2) cancelled(2) | none"),
        (&[&CANCELLING], Failed(Latest, Lost, Left), "cancelled [cancel requested] | 1 failed, 2 failed | attempt_failed(2) cancelled(2) | none"),
        (&[&CANCELLING], Failed(Latest, Lost, Last), "cancelled [cancel requested] | 1 failed, 2 failed | attempt_failed(2) cancelled(2) | none"),
        (&[&CANCELLING], Failed(Latest, Workflow, Left), "cancelled [cancel requested] | 1 failed, 2 failed | attempt_failed(2) cancelled(2) | none"),
        (&[&CANCELLING], Failed(Latest, Workflow, Last), "cancelled [cancel requested] | 1 failed, 2 failed | attempt_failed(2) cancelled(2) | none"),
        (&[&CANCELLING], Failed(Latest, Missing, Left), "cancelled [cancel requested, b excluded] | 1 failed, 2 failed uncounted | attempt_failed(2) cancelled(2) | none"),
        (&[&CANCELLING], Failed(Latest, Missing, Last), "cancelled [cancel requested, b excluded] | 1 failed, 2 failed uncounted | attempt_failed(2) cancelled(2) | none"),
        (&[&CANCELLING], Failed(Latest, Displaced, Left), "cancelled [cancel requested] | 1 failed, 2 failed uncounted | attempt_failed(2) cancelled(2) | none"),
        (&[&CANCELLING], Failed(Latest, Displaced, Last), "cancelled [cancel requested] | 1 failed, 2 failed uncounted | attempt_failed(2) cancelled(2) | none"),
        (&[&NOT_RUNNING], Failed(Latest, Backend, Left), "late"),
        (&[&NOT_RUNNING], Failed(Latest, Backend, Last), "late"),
        (&[&NOT_RUNNING], Failed(Latest, Lost, Left), "late"),
        (&[&NOT_RUNNING], Failed(Latest, Lost, Last), "late"),
        (&[&NOT_RUNNING], Failed(Latest, Workflow, Left), "late"),
        (&[&NOT_RUNNING], Failed(Latest, Workflow, Last), "late"),
        (&[&NOT_RUNNING], Failed(Latest, Missing, Left), "late"),
        (&[&NOT_RUNNING], Failed(Latest, Missing, Last), "late"),
        (&[&NOT_RUNNING], Failed(Latest, Displaced, Left), "late"),
        (&[&NOT_RUNNING], Failed(Latest, Displaced, Last), "late"),
        (EVERY, Failed(Earlier, Backend, Left), "late"),

        // DESIGN.md: queued | cancel | cancelled. A running job's cancel is not a row of
        // DESIGN.md's table (its Interfaces section says it): it stays running, asks the
        // backend to stop, and ends on the confirmation below.
        (&[&[QUEUED]], Cancel, "cancelled [cancel requested] | none | cancelled | none"),
        (&[&[REQUEUED]], Cancel, "cancelled [cancel requested] | 1 failed, 2 failed | cancelled | none"),
        (&[&[SUBMITTING]], Cancel, "running [cancel requested] | 1 failed, 2 submitting | cancel_requested(2) | stop(2)"),
        (&[&[PENDING]], Cancel, "running [cancel requested] | 1 failed, 2 pending | cancel_requested(2) | stop(2)"),
        (&[&[EXECUTING]], Cancel, "running [cancel requested] | 1 failed, 2 executing | cancel_requested(2) | stop(2)"),
        (&[&CANCELLING], Cancel, "no change"),
        (&[&TERMINAL], Cancel, "not allowed"),

        // DESIGN.md: running | cancel confirmed by the backend, or the grace passed ->
        // cancelled. A confirmation nobody asked for is refused as late.
        (&[&CANCELLING], CancelConfirmed(Latest), "cancelled [cancel requested] | 1 failed, 2 cancelled | cancelled(2) | none"),
        (&[&RUNNING, &NOT_RUNNING], CancelConfirmed(Latest), "late"),
        (EVERY, CancelConfirmed(Earlier), "late"),

        // DESIGN.md: queued | queue timeout; or no known backend could ever run it | failed.
        (&[&[QUEUED]], QueueTimeout, "failed: queue_timeout | none | failed | none"),
        (&[&[REQUEUED]], QueueTimeout, "failed: queue_timeout | 1 failed, 2 failed | failed | none"),
        (&[&RUNNING, &CANCELLING, &TERMINAL], QueueTimeout, "not allowed"),
        (&[&[QUEUED]], Unroutable, "failed: unroutable | none | failed | none"),
        (&[&[REQUEUED]], Unroutable, "failed: unroutable | 1 failed, 2 failed | failed | none"),
        (&[&RUNNING, &CANCELLING, &TERMINAL], Unroutable, "not allowed"),

        // DESIGN.md: running | deadline passed | failed. The code fails a queued job on
        // its deadline too, and the deadline beats a pending cancel.
        (&[&[QUEUED]], DeadlinePassed, "failed: deadline | none | failed | none"),
        (&[&[REQUEUED]], DeadlinePassed, "failed: deadline | 1 failed, 2 failed | failed | none"),
        (&[&RUNNING], DeadlinePassed, "failed: deadline | 1 failed, 2 failed | attempt_failed(2) failed | stop(2)"),
        (&[&CANCELLING], DeadlinePassed, "failed: deadline [cancel requested] | 1 failed, 2 failed | attempt_failed(2) failed | stop(2)"),
        (&[&TERMINAL], DeadlinePassed, "not allowed"),
    ]
}

#[test]
fn every_situation_meets_every_input_as_the_table_says() {
    let rows: Vec<(Situation, Case, &str)> = table()
        .into_iter()
        .flat_map(|(groups, case, want)| {
            groups
                .iter()
                .flat_map(|g| g.iter())
                .map(move |s| (*s, case, want))
        })
        .collect();
    let cases = cases();
    let mut problems = Vec::new();

    let mut variants: Vec<usize> = cases
        .iter()
        .map(|c| variant(&input(&new_job(), *c).1))
        .collect();
    variants.sort_unstable();
    variants.dedup();
    if variants != (0..INPUT_VARIANTS).collect::<Vec<_>>() {
        problems.push(format!(
            "the cases cover Input variants {variants:?} of 0..{INPUT_VARIANTS}: add a Case (and its rows) for each new variant"
        ));
    }
    for (i, (s, c, _)) in rows.iter().enumerate() {
        if rows[..i].iter().any(|(s2, c2, _)| s2 == s && c2 == c) {
            problems.push(format!("two rows for {s} x {c:?}"));
        }
    }

    let mut missing = Vec::new();
    let mut n_checked = 0;
    for s in situations() {
        let job = build(s);
        for c in &cases {
            let row = rows.iter().find(|(s2, c2, _)| *s2 == s && c2 == c);
            match (&job, row) {
                (None, None) => {}
                (None, Some(_)) => {
                    problems.push(format!("a row for {s} x {c:?}, a situation no job reaches"))
                }
                (Some(job), None) => missing.push(format!("{s} x {c:?}: \"{}\"", outcome(job, *c))),
                (Some(job), Some((_, _, want))) => {
                    n_checked += 1;
                    let got = outcome(job, *c);
                    if got != *want {
                        problems.push(format!(
                            "{s} x {c:?}\n      table: {want}\n      code:  {got}"
                        ));
                    }
                }
            }
        }
    }
    assert!(
        missing.is_empty() && problems.is_empty(),
        "pairs without a row (check each against DESIGN.md before adding it):\n  {}\n\
         wrong rows:\n  {}",
        missing.join("\n  "),
        problems.join("\n  ")
    );
    assert_eq!(
        n_checked,
        19 * cases.len(),
        "19 reachable situations, every case"
    );
}

/// Every (state, latest attempt status, cancel) triple, in declaration order. The
/// successor matches are exhaustive: a new state or status must be placed in them.
fn situations() -> Vec<Situation> {
    let next_state = |s: JobState| match s {
        J::Queued => Some(J::Running),
        J::Running => Some(J::Succeeded),
        J::Succeeded => Some(J::Failed),
        J::Failed => Some(J::Cancelled),
        J::Cancelled => None,
    };
    let next_status = |s: AttemptStatus| match s {
        A::Submitting => Some(A::Pending),
        A::Pending => Some(A::Executing),
        A::Executing => Some(A::Succeeded),
        A::Succeeded => Some(A::Failed),
        A::Failed => Some(A::Cancelled),
        A::Cancelled => None,
    };
    let states: Vec<JobState> =
        std::iter::successors(Some(J::Queued), |s| next_state(*s)).collect();
    let statuses: Vec<Option<AttemptStatus>> = std::iter::once(None)
        .chain(std::iter::successors(Some(A::Submitting), |s| next_status(*s)).map(Some))
        .collect();
    let mut out = Vec::new();
    for &state in &states {
        for &attempt in &statuses {
            for cancel in [false, true] {
                out.push(at(state, attempt, cancel));
            }
        }
    }
    out
}

/// A job in situation `s`, reached through `transition` from a new job, or `None` when no
/// job can be there.
#[rustfmt::skip]
fn build(s: Situation) -> Option<Job> {
    use At::*;
    use Case::*;
    const FAIL: Case = Failed(Latest, FailureKind::Backend, Tries::Left);
    let steps: &[Case] = match (s.state, s.attempt, s.cancel) {
        (J::Queued, None, false) => &[],
        (J::Queued, Some(A::Failed), false) => &[Dispatch, FAIL, Dispatch, FAIL],
        (J::Running, Some(A::Submitting), false) => &[Dispatch, FAIL, Dispatch],
        (J::Running, Some(A::Pending), false) => &[Dispatch, FAIL, Dispatch, Submitted(Latest)],
        (J::Running, Some(A::Executing), false) => &[Dispatch, FAIL, Dispatch, Started(Latest)],
        (J::Running, Some(A::Submitting), true) => &[Dispatch, FAIL, Dispatch, Cancel],
        (J::Running, Some(A::Pending), true) => &[Dispatch, FAIL, Dispatch, Submitted(Latest), Cancel],
        (J::Running, Some(A::Executing), true) => &[Dispatch, FAIL, Dispatch, Started(Latest), Cancel],
        (J::Succeeded, Some(A::Succeeded), false) => &[Dispatch, FAIL, Dispatch, Started(Latest), Succeeded(Latest)],
        (J::Succeeded, Some(A::Succeeded), true) => &[Dispatch, FAIL, Dispatch, Started(Latest), Cancel, Succeeded(Latest)],
        (J::Succeeded, Some(A::Cancelled), false) => &[Dispatch, FAIL, Dispatch, Started(Latest), Succeeded(Earlier)],
        (J::Succeeded, Some(A::Cancelled), true) => &[Dispatch, FAIL, Dispatch, Started(Latest), Cancel, Succeeded(Earlier)],
        (J::Succeeded, Some(A::Failed), false) => &[Dispatch, FAIL, Dispatch, FAIL, Succeeded(Earlier)],
        (J::Failed, None, false) => &[QueueTimeout],
        (J::Failed, Some(A::Failed), false) => &[Dispatch, FAIL, Dispatch, Failed(Latest, FailureKind::Backend, Tries::Last)],
        (J::Failed, Some(A::Failed), true) => &[Dispatch, FAIL, Dispatch, Cancel, DeadlinePassed],
        (J::Cancelled, None, true) => &[Cancel],
        (J::Cancelled, Some(A::Cancelled), true) => &[Dispatch, FAIL, Dispatch, Cancel, CancelConfirmed(Latest)],
        (J::Cancelled, Some(A::Failed), true) => &[Dispatch, FAIL, Dispatch, Cancel, FAIL],
        // A queued job has no live attempt and never a cancel (a cancel ends it at once);
        // a running one always has a live attempt; an ended job's latest attempt is over;
        // only a job that ended after attempt 1's late success, or a failed one, can have
        // its latest attempt failed without a cancel; every cancelled job asked for it.
        (J::Queued, None | Some(A::Failed), true)
        | (J::Queued, Some(A::Submitting | A::Pending | A::Executing | A::Succeeded | A::Cancelled), _)
        | (J::Running, None | Some(A::Succeeded | A::Failed | A::Cancelled), _)
        | (J::Succeeded, None | Some(A::Submitting | A::Pending | A::Executing), _)
        | (J::Succeeded, Some(A::Failed), true)
        | (J::Failed, None, true)
        | (J::Failed, Some(A::Submitting | A::Pending | A::Executing | A::Succeeded | A::Cancelled), _)
        | (J::Cancelled, None | Some(A::Submitting | A::Pending | A::Executing | A::Succeeded | A::Failed | A::Cancelled), false)
        | (J::Cancelled, Some(A::Submitting | A::Pending | A::Executing | A::Succeeded), true) => return None,
    };
    let mut job = new_job();
    for step in steps {
        let (prepared, input) = input(&job, *step);
        job = transition(&prepared, input, BEFORE, &Policy::default())
            .unwrap_or_else(|e| panic!("building {s}: {step:?} refused: {e}"))
            .job;
    }
    assert_eq!(situation_of(&job), s, "the recipe for {s} lands elsewhere");
    Some(job)
}

fn situation_of(job: &Job) -> Situation {
    at(
        job.state,
        job.current_attempt().map(|a| a.status),
        job.cancel_requested,
    )
}

/// One case of every input variant and attempt reference, every failure kind.
fn cases() -> Vec<Case> {
    let next_kind = |k: FailureKind| match k {
        FailureKind::Backend => Some(FailureKind::Lost),
        FailureKind::Lost => Some(FailureKind::Workflow),
        FailureKind::Workflow => Some(FailureKind::Missing),
        FailureKind::Missing => Some(FailureKind::Displaced),
        FailureKind::Displaced => None,
    };
    let mut out = vec![Case::Dispatch];
    for at in [At::Latest, At::Earlier] {
        out.extend([
            Case::Submitted(at),
            Case::Started(at),
            Case::Succeeded(at),
            Case::CancelConfirmed(at),
        ]);
    }
    for kind in std::iter::successors(Some(FailureKind::Backend), |k| next_kind(*k)) {
        for tries in [Tries::Left, Tries::Last] {
            out.push(Case::Failed(At::Latest, kind, tries));
        }
    }
    out.push(Case::Failed(At::Earlier, FailureKind::Backend, Tries::Left));
    out.extend([
        Case::Cancel,
        Case::QueueTimeout,
        Case::Unroutable,
        Case::DeadlinePassed,
    ]);
    out
}

const INPUT_VARIANTS: usize = 10;

/// Input's variants, numbered: a new one does not compile here, and once numbered fails
/// the test until a case makes it.
fn variant(input: &Input) -> usize {
    match input {
        Input::Dispatch { .. } => 0,
        Input::Submitted { .. } => 1,
        Input::Started { .. } => 2,
        Input::Succeeded { .. } => 3,
        Input::Failed { .. } => 4,
        Input::Cancel => 5,
        Input::CancelConfirmed { .. } => 6,
        Input::QueueTimeout { .. } => 7,
        Input::Unroutable { .. } => 8,
        Input::DeadlinePassed { .. } => 9,
    }
}

fn new_job() -> Job {
    let workflow = Workflow::parse(&serde_json::json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}}
    }))
    .expect("a valid workflow");
    let spec = JobSpec {
        workflow,
        priority: 0,
        max_attempts: 3,
        tags: vec![],
        timeouts: Timeouts::default(),
        idempotency_key: None,
        metadata: Default::default(),
        owner: None,
        attachments: Vec::new(),
        callback: None,
        command: None,
    };
    Job::new(JobId::random(), spec, 0)
}

/// The input `case` stands for on `job`, and the job as it must be for it (`Tries`).
fn input(job: &Job, case: Case) -> (Job, Input) {
    let mut job = job.clone();
    let latest = job.current_attempt().map_or(1, |a| a.number);
    let number = |at: At| match at {
        At::Latest => latest,
        At::Earlier => latest - 1,
    };
    let input = match case {
        Case::Dispatch => {
            let n = job.attempts.len();
            Input::Dispatch {
                backend: ["a", "b", "c", "d"][n.min(3)].to_owned(),
                prompt_id: format!("p{}", n + 1),
            }
        }
        Case::Submitted(at) => Input::Submitted {
            attempt: number(at),
        },
        Case::Started(at) => Input::Started {
            attempt: number(at),
        },
        Case::Succeeded(at) => Input::Succeeded {
            attempt: number(at),
            outputs: vec![],
            result: None,
        },
        Case::Failed(at, kind, tries) => {
            job.spec.max_attempts = match tries {
                Tries::Left => job.attempts_used() + 1,
                Tries::Last => job.attempts_used(),
            };
            let code = serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let exclude = (kind == FailureKind::Missing).then(|| ExclusionReason::MissingModel {
                node: "1".into(),
                input: "ckpt_name".into(),
                value: "x.safetensors".into(),
            });
            Input::Failed {
                attempt: number(at),
                failure: Failure {
                    kind,
                    error: JobError::new(&code, "boom"),
                    exclude,
                },
            }
        }
        Case::Cancel => Input::Cancel,
        Case::CancelConfirmed(at) => Input::CancelConfirmed {
            attempt: number(at),
        },
        Case::QueueTimeout => Input::QueueTimeout { limit_ms: 60_000 },
        Case::Unroutable => Input::Unroutable {
            error: JobError::new("unroutable", "no backend has the model"),
        },
        Case::DeadlinePassed => Input::DeadlinePassed { limit_ms: 600_000 },
    };
    (job, input)
}

/// What `transition` makes of `case` on `job`, as a row writes it, after checking what
/// every outcome must be: a refusal names its input; a change bumps the version, stamps
/// the time, records an event, lands in a reachable situation, stops only attempts it
/// names rightly, and a retry's `not_before` matches its event.
fn outcome(job: &Job, case: Case) -> String {
    let (job, input) = input(job, case);
    let name = input.name();
    let applied = match transition(&job, input, NOW, &Policy::default()) {
        Ok(applied) => applied,
        Err(refused) => {
            let (input, said) = match refused {
                Refused::Late { input, .. } => (input, "late"),
                Refused::NoChange { input } => (input, "no change"),
                Refused::NotAllowed { input, .. } => (input, "not allowed"),
            };
            assert_eq!(input, name, "{case:?}: the refusal names another input");
            return said.to_owned();
        }
    };
    let next = &applied.job;
    assert_eq!(next.version, job.version + 1, "{case:?}: version");
    assert_eq!(next.updated_at, NOW, "{case:?}: updated_at");
    assert!(
        !applied.events.is_empty(),
        "{case:?}: a change without an event"
    );
    let after = situation_of(next);
    assert!(
        build(after).is_some(),
        "{case:?} leads to {after}, which the table calls unreachable"
    );
    for Effect::StopAttempt {
        attempt,
        backend,
        prompt_id,
    } in &applied.effects
    {
        let a = job.attempt(*attempt).expect("a stopped attempt exists");
        assert_eq!(
            (&a.backend, &a.prompt_id),
            (backend, prompt_id),
            "{case:?}: stop names its attempt"
        );
    }
    for e in &applied.events {
        if let EventKind::JobRetrying {
            delay_ms,
            not_before,
            ..
        } = e
        {
            assert_eq!(
                (*not_before, next.not_before),
                (NOW + *delay_ms as Millis, *not_before),
                "{case:?}"
            );
        }
    }
    render(&applied)
}

fn render(applied: &Applied) -> String {
    let job = &applied.job;
    let mut state = job.state.to_string();
    if let Some(error) = &job.error {
        state = format!("{state}: {}", error.code);
    }
    let mut marks = Vec::new();
    if job.cancel_requested {
        marks.push("cancel requested".to_owned());
    }
    marks.extend(
        job.excluded
            .iter()
            .map(|e| format!("{} excluded", e.backend)),
    );
    if job.note.is_some() {
        marks.push("note".to_owned());
    }
    if !marks.is_empty() {
        state = format!("{state} [{}]", marks.join(", "));
    }
    let attempts: Vec<String> = job
        .attempts
        .iter()
        .map(|a| {
            format!(
                "{} {}{}",
                a.number,
                a.status.as_str(),
                if a.counted { "" } else { " uncounted" }
            )
        })
        .collect();
    let events: Vec<String> = applied.events.iter().map(event).collect();
    let effects: Vec<String> = applied
        .effects
        .iter()
        .map(|Effect::StopAttempt { attempt, .. }| format!("stop({attempt})"))
        .collect();
    let or_none = |v: Vec<String>, sep: &str| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(sep)
        }
    };
    format!(
        "{state} | {} | {} | {}",
        or_none(attempts, ", "),
        or_none(events, " "),
        or_none(effects, " ")
    )
}

fn event(e: &EventKind) -> String {
    match e {
        EventKind::Dispatched { attempt, .. } => format!("dispatched({attempt})"),
        EventKind::Submitted { attempt, .. } => format!("submitted({attempt})"),
        EventKind::Started { attempt, .. } => format!("started({attempt})"),
        EventKind::AttemptFailed {
            attempt,
            will_retry,
            ..
        } => {
            format!(
                "attempt_failed({attempt}{})",
                if *will_retry { ", retry" } else { "" }
            )
        }
        EventKind::JobRetrying { delay_ms, .. } => {
            format!(
                "job_retrying({})",
                if *delay_ms == 0 { "now" } else { "backoff" }
            )
        }
        EventKind::CancelRequested { attempt } | EventKind::Cancelled { attempt, .. } => {
            match attempt {
                Some(n) => format!("{}({n})", e.name()),
                None => e.name().to_owned(),
            }
        }
        EventKind::Succeeded { attempt, late, .. } => {
            format!("succeeded({attempt}{})", if *late { ", late" } else { "" })
        }
        EventKind::Failed { .. } => e.name().to_owned(),
        // Made by the engine, never by `transition`: a row would show one by name.
        EventKind::Queued { .. }
        | EventKind::NodeStarted { .. }
        | EventKind::NodeFinished { .. }
        | EventKind::NodesCached { .. }
        | EventKind::BackendBlocked { .. }
        | EventKind::Late { .. } => e.name().to_owned(),
    }
}
