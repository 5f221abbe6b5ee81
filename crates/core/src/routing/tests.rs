//! `choose` and `outlook` on small farms: eligibility (tags, classes, exclusions,
//! commands), preference (priority, warmth, speed, least recently used), and what a waiting
//! or never-runnable job is told.

use super::*;
use crate::job::{Exclusion, ExclusionReason, JobId, JobSpec, Timeouts};
use crate::workflow::Workflow;

fn job(tags: &[&str]) -> Job {
    let workflow = Workflow::parse(&serde_json::json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}}
    }))
    .unwrap();
    Job::new(
        JobId::random(),
        JobSpec {
            workflow,
            priority: 0,
            max_attempts: 3,
            tags: tags.iter().map(|t| t.to_string()).collect(),
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

fn command_job(program: &str) -> Job {
    let mut j = job(&[]);
    j.spec.workflow = Workflow::none();
    j.spec.command = Some(crate::job::CommandSpec {
        argv: vec![program.to_owned(), "--fast".to_owned()],
        env: Default::default(),
        cwd: None,
        operation: None,
        timeout_ms: None,
    });
    j
}

struct B {
    name: &'static str,
    priority: i32,
    tags: Vec<String>,
    classes: Option<HashSet<String>>,
    idle: bool,
    warm: Vec<String>,
    last_used: Millis,
    blocked: bool,
    slow: bool,
    programs: Option<Vec<String>>,
}

fn b(name: &'static str) -> B {
    B {
        name,
        priority: 0,
        tags: vec![],
        classes: Some(
            ["CheckpointLoaderSimple", "SaveImage"]
                .into_iter()
                .map(String::from)
                .collect(),
        ),
        idle: true,
        warm: vec![],
        last_used: 0,
        blocked: false,
        slow: false,
        programs: Some(vec![]),
    }
}

fn pick(job: &Job, bs: &[B]) -> String {
    let candidates: Vec<Candidate<'_>> = bs
        .iter()
        .map(|b| Candidate {
            name: b.name,
            priority: b.priority,
            tags: &b.tags,
            classes: b.classes.as_ref(),
            idle: b.idle,
            warm_models: &b.warm,
            last_used: b.last_used,
            blocked: b.blocked,
            slow: b.slow,
            programs: b.programs.as_deref(),
        })
        .collect();
    match choose(job, &candidates) {
        Choice::Run(i) => bs[i].name.to_owned(),
        Choice::Wait(w) => format!("wait: {}", w.describe()),
        Choice::Never(e) => format!("never: {}", e.message),
    }
}

#[test]
fn least_recently_used_breaks_ties() {
    let bs = [
        B {
            last_used: 5,
            ..b("a")
        },
        B {
            last_used: 3,
            ..b("b")
        },
        B {
            last_used: 9,
            ..b("c")
        },
    ];
    assert_eq!(pick(&job(&[]), &bs), "b");
}

#[test]
fn a_backend_slow_for_the_job_is_used_only_when_no_other_is_idle() {
    let warm = vec!["m.safetensors".to_owned()];
    let j = job(&[]);
    // Slow but warm loses to a cold one that is not slow.
    let bs = [
        B {
            warm: warm.clone(),
            slow: true,
            ..b("slow")
        },
        b("fast"),
    ];
    assert_eq!(pick(&j, &bs), "fast");
    // With the other busy, the slow one runs it.
    let bs = [
        B {
            slow: true,
            ..b("slow")
        },
        B {
            idle: false,
            ..b("fast")
        },
    ];
    assert_eq!(pick(&j, &bs), "slow");
}

#[test]
fn priority_beats_warmth_beats_lru() {
    let warm = vec!["m.safetensors".to_owned()];
    let bs = [
        B {
            last_used: 1,
            ..b("cold")
        },
        B {
            last_used: 9,
            warm: warm.clone(),
            ..b("warm")
        },
    ];
    assert_eq!(pick(&job(&[]), &bs), "warm");
    let bs = [
        B {
            priority: 1,
            last_used: 9,
            ..b("preferred")
        },
        B {
            last_used: 1,
            warm,
            ..b("warm")
        },
    ];
    assert_eq!(pick(&job(&[]), &bs), "preferred");
}

#[test]
fn tags_and_classes_are_required() {
    let bs = [
        B {
            last_used: 0,
            ..b("untagged")
        },
        B {
            tags: vec!["sdxl".into()],
            last_used: 9,
            ..b("tagged")
        },
    ];
    assert_eq!(pick(&job(&["sdxl"]), &bs), "tagged");
    let bs = [
        B {
            classes: Some(HashSet::from(["SaveImage".to_owned()])),
            ..b("small")
        },
        B {
            last_used: 9,
            ..b("full")
        },
    ];
    assert_eq!(pick(&job(&[]), &bs), "full");
}

#[test]
fn busy_or_unknown_backends_mean_wait() {
    assert_eq!(
        pick(
            &job(&[]),
            &[B {
                idle: false,
                ..b("a")
            }]
        ),
        "wait: every eligible backend is busy or offline"
    );
    assert_eq!(
        pick(
            &job(&[]),
            &[B {
                classes: None,
                ..b("a")
            }]
        ),
        "wait: waiting to learn what the backends run (node classes, agents' programs)"
    );
    assert_eq!(pick(&job(&[]), &[]), "wait: no backend is configured");
}

#[test]
fn a_blocked_backend_is_passed_over_and_alone_means_wait() {
    let blocked = B {
        blocked: true,
        last_used: 0,
        ..b("a")
    };
    let other = B {
        last_used: 9,
        ..b("b")
    };
    assert_eq!(pick(&job(&[]), &[blocked, other]), "b");
    let blocked = B {
        blocked: true,
        ..b("a")
    };
    let busy = B {
        idle: false,
        ..b("b")
    };
    assert_eq!(
        pick(&job(&[]), &[blocked, busy]),
        "wait: every eligible backend is blocked for this workflow or unhealthy, until a block lifts"
    );
}

#[test]
fn never_lists_what_is_missing_where() {
    let mut j = job(&[]);
    j.excluded.push(Exclusion {
        backend: "a".into(),
        reason: ExclusionReason::MissingModel {
            node: "4".into(),
            input: "ckpt_name".into(),
            value: "m.safetensors".into(),
        },
    });
    let bs = [
        b("a"),
        B {
            classes: Some(HashSet::from(["SaveImage".to_owned()])),
            ..b("b")
        },
    ];
    assert_eq!(
        pick(&j, &bs),
        "never: no backend can run this job: a: model \"m.safetensors\" (node 4 input ckpt_name) not installed; b: node class CheckpointLoaderSimple (node 4) not installed"
    );
}

#[test]
fn a_job_avoids_the_backend_it_failed_on() {
    let mut j = job(&[]);
    j.attempts.push(crate::job::Attempt {
        number: 1,
        backend: "a".into(),
        prompt_id: "p".into(),
        status: crate::job::AttemptStatus::Failed,
        created_at: 0,
        submitted_at: None,
        started_at: None,
        finished_at: None,
        error: Some(JobError::new("x", "y")),
        counted: true,
        profile: None,
    });
    let bs = [
        b("a"),
        B {
            last_used: 9,
            ..b("b")
        },
    ];
    assert_eq!(pick(&j, &bs), "b");
}

#[test]
fn a_command_goes_only_to_an_agent_that_allows_its_program() {
    let j = command_job("/usr/bin/huggingface-cli");
    let agent = |name, allow: &[&str]| B {
        programs: Some(allow.iter().map(|p| p.to_string()).collect()),
        ..b(name)
    };
    let bs = [
        b("url"),
        agent("a", &["/bin/true"]),
        agent("b", &["/usr/bin/huggingface-cli"]),
    ];
    assert_eq!(pick(&j, &bs), "b");
    let bs = [b("url"), agent("a", &["/bin/true"])];
    assert_eq!(
        pick(&j, &bs),
        "never: no backend can run this job: url: runs no commands (not an agent with --allow), so not \"/usr/bin/huggingface-cli\"; a: does not allow program \"/usr/bin/huggingface-cli\" (allows /bin/true)"
    );
    // An agent that has not said what it allows may: wait for it.
    let bs = [
        b("url"),
        B {
            programs: None,
            ..b("a")
        },
    ];
    assert_eq!(
        pick(&j, &bs),
        "wait: waiting to learn what the backends run (node classes, agents' programs)"
    );
}

fn explain(job: &Job, bs: &[(B, Standing)]) -> Outlook {
    let candidates: Vec<Candidate<'_>> = bs
        .iter()
        .map(|(b, _)| Candidate {
            name: b.name,
            priority: b.priority,
            tags: &b.tags,
            classes: b.classes.as_ref(),
            idle: b.idle,
            warm_models: &b.warm,
            last_used: b.last_used,
            blocked: b.blocked,
            slow: b.slow,
            programs: b.programs.as_deref(),
        })
        .collect();
    let standings: Vec<Standing> = bs.iter().map(|(_, s)| s.clone()).collect();
    outlook(job, &candidates, &standings, 1_000, &|t| format!("t{t}"))
}

fn waiting(o: Outlook) -> (WaitReason, Option<Millis>, String) {
    match o {
        Outlook::Wait(w) => (w.reason, w.until, w.message),
        other => panic!("not waiting: {other:?}"),
    }
}

#[test]
fn a_waiting_job_says_why_and_until_when() {
    let j = job(&[]);
    let offline = || Standing::Offline {
        why: Some("connection refused".into()),
    };
    assert_eq!(explain(&j, &[(b("a"), Standing::Free)]), Outlook::Ready);
    let mut backing_off = j.clone();
    backing_off.not_before = 1_500;
    assert_eq!(
        waiting(explain(&backing_off, &[(b("a"), Standing::Free)])),
        (
            WaitReason::Backoff,
            Some(1_500),
            "waiting out its retry backoff, until t1500".into()
        )
    );
    assert_eq!(
        waiting(explain(
            &j,
            &[(b("a"), Standing::Busy), (b("b"), offline())]
        ))
        .0,
        WaitReason::Busy
    );
    // The hold that lifts first, but never before the backoff ends.
    let held = [
        (b("a"), Standing::Blocked { until: 9_000 }),
        (b("b"), Standing::CircuitOpen { probe_at: 5_000 }),
        (b("c"), offline()),
    ];
    assert_eq!(
        waiting(explain(&j, &held)),
        (
            WaitReason::CircuitOpen,
            Some(5_000),
            "the circuit breaker of every backend that can run it and is free is open, until t5000"
                .into()
        )
    );
    assert_eq!(
        waiting(explain(&backing_off, &held[..1])),
        (
            WaitReason::Blocked,
            Some(9_000),
            "every backend that can run it and is free is blocked for this workflow, until t9000"
                .into()
        )
    );
    let Outlook::Wait(w) = explain(&j, &[(b("a"), offline()), (b("b"), Standing::Draining)]) else {
        panic!("waits")
    };
    assert_eq!((w.reason, w.until), (WaitReason::BackendOffline, None));
    assert_eq!(w.backends["a"], "offline (connection refused)");
    assert_eq!(w.backends["b"], "draining");
    assert_eq!(
        waiting(explain(&j, &[(b("a"), Standing::Draining)])).0,
        WaitReason::Draining
    );
    let unread = B {
        classes: None,
        ..b("a")
    };
    assert_eq!(
        waiting(explain(&j, &[(unread, Standing::Free)])).0,
        WaitReason::Capabilities
    );
    assert_eq!(
        waiting(explain(&job(&["sdxl"]), &[])),
        (
            WaitReason::NoBackend,
            None,
            "no backend with tag sdxl is known".into()
        )
    );
}

#[test]
fn a_job_no_backend_can_run_never_waits() {
    let j = job(&["sdxl"]);
    match explain(&j, &[(b("a"), Standing::Free), (b("b"), Standing::Busy)]) {
        Outlook::Never(e) => assert_eq!(
            e.message,
            "no backend can run this job: a: lacks tag sdxl; b: lacks tag sdxl"
        ),
        other => panic!("{other:?}"),
    }
    // A backend that can never run it is named beside the ones it waits for.
    let tagged = B {
        tags: vec!["sdxl".into()],
        ..b("b")
    };
    let Outlook::Wait(w) = explain(&j, &[(b("a"), Standing::Free), (tagged, Standing::Busy)])
    else {
        panic!("waits for b")
    };
    assert_eq!(w.reason, WaitReason::Busy);
    assert_eq!(w.backends["a"], "never: lacks tag sdxl");
    assert_eq!(w.backends["b"], "busy");
}
