//! Hand-written traces of `transition`: one story per test (a happy path, a late success,
//! a cancel racing the end, retries and their delays), each checking the steps it tells.
//! `table` holds the exhaustive check of every (situation, input) pair.

use super::*;
use crate::job::{JobId, JobSpec, Timeouts};
use crate::workflow::Workflow;

fn job(max_attempts: u32) -> Job {
    let workflow = Workflow::parse(&serde_json::json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}}
    }))
    .unwrap();
    Job::new(
        JobId::random(),
        JobSpec {
            workflow,
            priority: 0,
            max_attempts,
            tags: vec![],
            timeouts: Timeouts::default(),
            idempotency_key: None,
            metadata: Default::default(),
            owner: None,
            attachments: Vec::new(),
            callback: None,
            command: None,
        },
        0,
    )
}

fn apply(job: &Job, input: Input) -> Job {
    transition(job, input, 10, &Policy::default()).unwrap().job
}

fn dispatch(job: &Job, backend: &str) -> Job {
    apply(
        job,
        Input::Dispatch {
            backend: backend.into(),
            prompt_id: format!("p-{backend}-{}", job.attempts.len() + 1),
        },
    )
}

fn fail(kind: FailureKind) -> Failure {
    Failure {
        kind,
        error: JobError::new("x", "boom"),
        exclude: None,
    }
}

/// One line per step: the state, the current attempt and its status.
fn trace(job: &Job) -> String {
    match job.current_attempt() {
        Some(a) => format!(
            "{} #{} {:?} v{}",
            job.state, a.number, a.status, job.version
        ),
        None => format!("{} v{}", job.state, job.version),
    }
}

#[test]
fn happy_path() {
    let j = job(3);
    let j1 = dispatch(&j, "a");
    let j2 = apply(&j1, Input::Submitted { attempt: 1 });
    let j3 = apply(&j2, Input::Started { attempt: 1 });
    let j4 = apply(
        &j3,
        Input::Succeeded {
            attempt: 1,
            outputs: vec![],
            result: None,
        },
    );
    let got: Vec<String> = [&j, &j1, &j2, &j3, &j4].iter().map(|j| trace(j)).collect();
    assert_eq!(
        got,
        [
            "queued v1",
            "running #1 Submitting v2",
            "running #1 Pending v3",
            "running #1 Executing v4",
            "succeeded #1 Succeeded v5"
        ]
    );
}

#[test]
fn a_success_seen_before_the_start_still_tells_every_step() {
    let j = apply(&dispatch(&job(1), "a"), Input::Submitted { attempt: 1 });
    let applied = transition(
        &j,
        Input::Succeeded {
            attempt: 1,
            outputs: vec![],
            result: None,
        },
        10,
        &Policy::default(),
    )
    .unwrap();
    let names: Vec<&str> = applied.events.iter().map(EventKind::name).collect();
    assert_eq!(names, ["started", "succeeded"]);
    let a = applied.job.current_attempt().unwrap();
    assert_eq!((a.submitted_at, a.started_at), (Some(10), Some(10)));
}

#[test]
fn a_displaced_attempt_is_retried_at_once_and_not_counted() {
    let j = apply(&dispatch(&job(1), "a"), Input::Submitted { attempt: 1 });
    let j = apply(
        &j,
        Input::Failed {
            attempt: 1,
            failure: fail(FailureKind::Displaced),
        },
    );
    assert_eq!(j.state, JobState::Queued, "one attempt allowed, none used");
    assert_eq!(j.not_before, 10, "no backoff");
    assert!(!j.attempts[0].counted);
    assert!(j.excluded.is_empty(), "the backend is not excluded");
}

#[test]
fn start_may_overtake_the_submit_answer() {
    let j = dispatch(&job(1), "a");
    let j = apply(&j, Input::Started { attempt: 1 });
    assert_eq!(trace(&j), "running #1 Executing v3");
    let again = transition(&j, Input::Submitted { attempt: 1 }, 10, &Policy::default());
    assert_eq!(again, Err(Refused::NoChange { input: "submitted" }));
}

#[test]
fn backend_failures_retry_until_attempts_run_out() {
    let j = dispatch(&job(2), "a");
    let applied = transition(
        &j,
        Input::Failed {
            attempt: 1,
            failure: fail(FailureKind::Backend),
        },
        100,
        &Policy::default(),
    )
    .unwrap();
    assert_eq!(applied.job.state, JobState::Queued);
    // Equal jitter: between half and all of the 1 s base backoff.
    let delay = applied.job.not_before - 100;
    assert!((500..=1_000).contains(&delay), "{delay}");
    assert_eq!(
        applied.events.last(),
        Some(&EventKind::JobRetrying {
            attempt: 1,
            delay_ms: delay as u64,
            not_before: applied.job.not_before,
            waiting_for: None,
        })
    );
    let j = dispatch(&applied.job, "b");
    let j = apply(
        &j,
        Input::Failed {
            attempt: 2,
            failure: fail(FailureKind::Backend),
        },
    );
    assert_eq!(j.state, JobState::Failed);
    let error = j.error.unwrap();
    assert_eq!(error.message, "boom (gave up after 2 of 2 attempts)");
}

#[test]
fn retry_delays_are_jittered_per_job_and_grow() {
    let p = Policy::default();
    let delays: Vec<u64> = (0..50)
        .map(|_| p.retry_delay_ms(&JobId::random(), 1))
        .collect();
    assert!(delays.iter().all(|d| (500..=1_000).contains(d)));
    let distinct: std::collections::HashSet<_> = delays.iter().collect();
    assert!(distinct.len() > 10, "spread out: {delays:?}");
    let id = JobId::random();
    assert_eq!(p.retry_delay_ms(&id, 3), p.retry_delay_ms(&id, 3));
    assert!((2_000..=4_000).contains(&p.retry_delay_ms(&id, 3)));
    assert!(p.retry_delay_ms(&id, 30) <= 30_000);
}

#[test]
fn a_deadline_fails_the_job_and_stops_its_attempt() {
    let j = dispatch(&job(3), "a");
    let j = apply(&j, Input::Started { attempt: 1 });
    let applied = transition(
        &j,
        Input::DeadlinePassed { limit_ms: 60_000 },
        70,
        &Policy::default(),
    )
    .unwrap();
    assert_eq!(applied.job.state, JobState::Failed);
    let error = applied.job.error.clone().unwrap();
    assert_eq!(error.code, "deadline");
    assert_eq!(
        error.message,
        "the job did not finish within its deadline of 60000 ms (attempt 1 was executing on a)"
    );
    assert_eq!(applied.job.attempts[0].status, AttemptStatus::Failed);
    assert_eq!(applied.effects.len(), 1);
    // A success that arrives after that is late: the job stays failed.
    let late = transition(
        &applied.job,
        Input::Succeeded {
            attempt: 1,
            outputs: vec![],
            result: None,
        },
        80,
        &Policy::default(),
    );
    assert!(matches!(late, Err(Refused::Late { .. })), "{late:?}");
    // A queued job fails the same way, with nothing to stop.
    let queued = transition(
        &job(1),
        Input::DeadlinePassed { limit_ms: 5 },
        9,
        &Policy::default(),
    )
    .unwrap();
    assert_eq!(queued.job.state, JobState::Failed);
    assert!(queued.effects.is_empty());
}

#[test]
fn workflow_failures_do_not_retry() {
    let j = dispatch(&job(3), "a");
    let j = apply(
        &j,
        Input::Failed {
            attempt: 1,
            failure: fail(FailureKind::Workflow),
        },
    );
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.error.unwrap().message, "boom");
}

#[test]
fn missing_capability_excludes_the_backend_and_costs_no_attempt() {
    let j = dispatch(&job(1), "a");
    let j = apply(
        &j,
        Input::Failed {
            attempt: 1,
            failure: Failure {
                kind: FailureKind::Missing,
                error: JobError::new("missing_model", "no model"),
                exclude: Some(ExclusionReason::MissingModel {
                    node: "4".into(),
                    input: "ckpt_name".into(),
                    value: "x.safetensors".into(),
                }),
            },
        },
    );
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.not_before, 10, "no backoff for a missing model");
    assert!(j.is_excluded("a"));
    assert!(!j.is_excluded("b"));
    assert_eq!(j.attempts_used(), 0);
}

#[test]
fn late_inputs_about_an_old_attempt_change_nothing() {
    let j = dispatch(&job(3), "a");
    let j = apply(
        &j,
        Input::Failed {
            attempt: 1,
            failure: fail(FailureKind::Backend),
        },
    );
    let j = dispatch(&j, "b");
    for input in [
        Input::Started { attempt: 1 },
        Input::Submitted { attempt: 1 },
        Input::Failed {
            attempt: 1,
            failure: fail(FailureKind::Backend),
        },
        Input::CancelConfirmed { attempt: 1 },
    ] {
        let refused = transition(&j, input, 20, &Policy::default()).unwrap_err();
        assert!(
            matches!(
                refused,
                Refused::Late {
                    attempt: Some(1),
                    current: Some(2),
                    ..
                }
            ),
            "{refused:?}"
        );
    }
}

#[test]
fn a_late_success_is_adopted_and_stops_the_live_attempt() {
    let j = dispatch(&job(3), "a");
    let j = apply(
        &j,
        Input::Failed {
            attempt: 1,
            failure: fail(FailureKind::Backend),
        },
    );
    let j = dispatch(&j, "b");
    let applied = transition(
        &j,
        Input::Succeeded {
            attempt: 1,
            outputs: vec![],
            result: None,
        },
        30,
        &Policy::default(),
    )
    .unwrap();
    assert_eq!(applied.job.state, JobState::Succeeded);
    assert_eq!(applied.job.attempts[0].status, AttemptStatus::Succeeded);
    assert_eq!(
        applied.job.attempts[0].error, None,
        "a succeeded attempt has no error"
    );
    assert_eq!(
        applied.job.note.as_deref(),
        Some("attempt 1 succeeded after gantry had given up on it (boom)")
    );
    assert_eq!(applied.job.attempts[1].status, AttemptStatus::Cancelled);
    assert_eq!(
        applied.effects,
        [Effect::StopAttempt {
            attempt: 2,
            backend: "b".into(),
            prompt_id: "p-b-2".into()
        }]
    );
    assert!(matches!(
        applied.events[0],
        EventKind::Succeeded { late: true, .. }
    ));
    // A second success (the other attempt finishing too) is late: one terminal state.
    let second = transition(
        &applied.job,
        Input::Succeeded {
            attempt: 2,
            outputs: vec![],
            result: None,
        },
        40,
        &Policy::default(),
    );
    assert!(matches!(second, Err(Refused::Late { .. })));
}

#[test]
fn cancel_queued_is_immediate_and_running_waits_for_the_backend() {
    let queued = apply(&job(3), Input::Cancel);
    assert_eq!(queued.state, JobState::Cancelled);

    let running = dispatch(&job(3), "a");
    let applied = transition(&running, Input::Cancel, 10, &Policy::default()).unwrap();
    assert_eq!(applied.job.state, JobState::Running);
    assert!(applied.job.cancel_requested);
    assert_eq!(applied.effects.len(), 1);
    let again = transition(&applied.job, Input::Cancel, 11, &Policy::default());
    assert_eq!(again, Err(Refused::NoChange { input: "cancel" }));
    let done = apply(&applied.job, Input::CancelConfirmed { attempt: 1 });
    assert_eq!(trace(&done), "cancelled #1 Cancelled v4");
    let terminal = transition(&done, Input::Cancel, 12, &Policy::default());
    assert_eq!(
        terminal,
        Err(Refused::NotAllowed {
            input: "cancel",
            state: JobState::Cancelled
        })
    );
}

#[test]
fn a_failure_after_cancel_cancels_and_a_success_wins_with_a_note() {
    let running = apply(&dispatch(&job(3), "a"), Input::Cancel);
    let failed = apply(
        &running,
        Input::Failed {
            attempt: 1,
            failure: fail(FailureKind::Backend),
        },
    );
    assert_eq!(failed.state, JobState::Cancelled);
    let succeeded = apply(
        &running,
        Input::Succeeded {
            attempt: 1,
            outputs: vec![],
            result: None,
        },
    );
    assert_eq!(succeeded.state, JobState::Succeeded);
    assert!(succeeded.note.is_some());
}

#[test]
fn only_queued_jobs_dispatch_time_out_or_become_unroutable() {
    let running = dispatch(&job(3), "a");
    for input in [
        Input::Dispatch {
            backend: "b".into(),
            prompt_id: "p".into(),
        },
        Input::QueueTimeout { limit_ms: 5 },
        Input::Unroutable {
            error: JobError::new("unroutable", "none"),
        },
    ] {
        assert!(matches!(
            transition(&running, input, 10, &Policy::default()),
            Err(Refused::NotAllowed { .. })
        ));
    }
    let timed_out = apply(&job(3), Input::QueueTimeout { limit_ms: 5 });
    assert_eq!(timed_out.state, JobState::Failed);
    assert_eq!(timed_out.error.unwrap().code, "queue_timeout");
}

#[test]
fn backoff_doubles_and_is_capped() {
    let p = Policy::default();
    let got: Vec<u64> = (1..=7).map(|n| p.backoff_ms(n)).collect();
    assert_eq!(got, [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]);
}

#[test]
fn a_lost_backend_is_retried_at_once_and_counted() {
    let j = dispatch(&job(2), "a");
    let j = apply(
        &j,
        Input::Failed {
            attempt: 1,
            failure: Failure::lost(JobError::new("backend_lost", "gone")),
        },
    );
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(
        j.not_before, 10,
        "no backoff: routing waits for a ready backend"
    );
    assert!(
        j.attempts[0].counted,
        "a workflow that kills every backend still ends"
    );
    let j = dispatch(&j, "a");
    let j = apply(
        &j,
        Input::Failed {
            attempt: 2,
            failure: Failure::lost(JobError::new("backend_lost", "gone")),
        },
    );
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(
        j.error.unwrap().message,
        "gone (gave up after 2 of 2 attempts)"
    );
}

#[test]
fn only_the_workflows_own_trouble_on_a_backend_blocks_it() {
    let blocks = |f: Failure| (f.blocks_workflow(), f.is_backends_fault());
    assert_eq!(blocks(fail(FailureKind::Backend)), (true, true));
    assert_eq!(blocks(fail(FailureKind::Lost)), (false, true));
    assert_eq!(blocks(fail(FailureKind::Workflow)), (false, false));
    assert_eq!(blocks(fail(FailureKind::Missing)), (false, false));
    assert_eq!(blocks(fail(FailureKind::Displaced)), (false, false));
    let excluded = Failure {
        exclude: Some(ExclusionReason::NodeFailed {
            node: "1".into(),
            exception_type: "E".into(),
        }),
        ..fail(FailureKind::Backend)
    };
    assert_eq!(blocks(excluded), (false, true));
}

fn retried(kind: FailureKind) -> Applied {
    let j = dispatch(&job(3), "a");
    transition(
        &j,
        Input::Failed {
            attempt: 1,
            failure: fail(kind),
        },
        100,
        &Policy::default(),
    )
    .unwrap()
}

#[test]
fn a_retry_that_routing_says_can_never_run_fails_now() {
    let mut applied = retried(FailureKind::Missing);
    let error = JobError::new("unroutable", "no backend can run this job: a: lacks it");
    settle_retry(&mut applied, Outlook::Never(error.clone()), 100);
    assert_eq!(applied.job.state, JobState::Failed);
    assert_eq!(applied.job.error.as_ref(), Some(&error));
    let names: Vec<&str> = applied.events.iter().map(EventKind::name).collect();
    assert_eq!(names, ["attempt_failed", "failed"]);
    assert!(matches!(
        applied.events[0],
        EventKind::AttemptFailed {
            will_retry: false,
            ..
        }
    ));
}

#[test]
fn a_retry_says_when_it_can_really_start() {
    let waiting = |until| WaitingFor {
        reason: crate::routing::WaitReason::Blocked,
        message: "blocked".into(),
        until,
        backends: Default::default(),
    };
    let mut applied = retried(FailureKind::Backend);
    let backoff_end = applied.job.not_before;
    settle_retry(&mut applied, Outlook::Wait(waiting(Some(60_100))), 100);
    assert_eq!(
        applied.events.last(),
        Some(&EventKind::JobRetrying {
            attempt: 1,
            delay_ms: 60_000,
            not_before: 60_100,
            waiting_for: Some(waiting(Some(60_100))),
        })
    );
    assert_eq!(
        applied.job.not_before, backoff_end,
        "the job itself may go as soon as the hold lifts early (an unblock, a new backend)"
    );
    // Waiting for an event with no known end: the backoff still stands.
    let mut applied = retried(FailureKind::Lost);
    settle_retry(&mut applied, Outlook::Wait(waiting(None)), 100);
    assert!(matches!(
        applied.events.last(),
        Some(EventKind::JobRetrying {
            delay_ms: 0,
            not_before: 100,
            waiting_for: Some(_),
            ..
        })
    ));
    // Ready: nothing changes.
    let mut applied = retried(FailureKind::Backend);
    let before = applied.clone();
    settle_retry(&mut applied, Outlook::Ready, 100);
    assert_eq!(applied, before);
}
