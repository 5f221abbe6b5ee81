//! The conformance suite of the `Store` trait: what every store must do, whatever is
//! under it. Each check takes a fresh, empty store; `conformance!` in main.rs runs them
//! all against one kind of store (SQLite now; Postgres joins with issue 6).

use gantry_core::{
    transition, EventKind, Input, Job, JobId, JobSpec, JobState, Millis, Policy, Timeouts, Workflow,
};
use gantry_store::{Created, Error, JobFilter, Store};
use std::sync::Arc;

pub fn job(key: Option<&str>, priority: i32, now: Millis) -> Job {
    let workflow = Workflow::parse(&serde_json::json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8}}
    }))
    .unwrap();
    Job::new(
        JobId::random(),
        JobSpec {
            workflow,
            priority,
            max_attempts: 3,
            tags: vec![],
            timeouts: Timeouts::default(),
            idempotency_key: key.map(String::from),
            metadata: Default::default(),
        },
        now,
    )
}

pub async fn a_job_round_trips_with_its_events(store: Arc<dyn Store>) {
    let j = job(None, 0, 5);
    let Created::New(first) = store.create_job(&j, "h").await.unwrap() else {
        panic!("not new")
    };
    assert_eq!(first.kind, EventKind::Queued { priority: 0 });
    assert_eq!(store.job(&j.id).await.unwrap().unwrap(), j);
    let applied = transition(
        &j,
        Input::Dispatch {
            backend: "a".into(),
            prompt_id: "p".into(),
        },
        9,
        &Policy::default(),
    )
    .unwrap();
    let events = store
        .update_job(&applied.job, &applied.events)
        .await
        .unwrap();
    assert_eq!(events[0].seq, first.seq + 1);
    assert_eq!(events[0].state, JobState::Running);
    assert_eq!(store.job(&j.id).await.unwrap().unwrap(), applied.job);
    let all = store.job_events(&j.id, 0).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(store.running_jobs().await.unwrap().len(), 1);
}

pub async fn a_stale_version_is_refused_and_writes_nothing(store: Arc<dyn Store>) {
    let j = job(None, 0, 5);
    store.create_job(&j, "h").await.unwrap();
    let a = transition(&j, Input::Cancel, 6, &Policy::default()).unwrap();
    let b = transition(
        &j,
        Input::Dispatch {
            backend: "a".into(),
            prompt_id: "p".into(),
        },
        6,
        &Policy::default(),
    )
    .unwrap();
    store.update_job(&a.job, &a.events).await.unwrap();
    let err = store.update_job(&b.job, &b.events).await.unwrap_err();
    assert!(matches!(err, Error::Conflict { expected: 1, .. }), "{err}");
    let stored = store.job(&j.id).await.unwrap().unwrap();
    assert_eq!(stored.state, JobState::Cancelled);
    assert_eq!(store.job_events(&j.id, 0).await.unwrap().len(), 2);
}

pub async fn concurrent_writes_share_commits_but_keep_their_own_outcomes(store: Arc<dyn Store>) {
    // Many writers at once, so groups form; in each pair of racing updates exactly
    // one must win even when both land in the same transaction.
    let jobs: Vec<Job> = (0..200).map(|i| job(None, 0, i)).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for j in jobs.clone() {
        let store = store.clone();
        tasks.spawn(async move {
            store.create_job(&j, "h").await.unwrap();
            let a = transition(&j, Input::Cancel, 6, &Policy::default()).unwrap();
            let b = transition(
                &j,
                Input::Dispatch {
                    backend: "a".into(),
                    prompt_id: "p".into(),
                },
                6,
                &Policy::default(),
            )
            .unwrap();
            let (ra, rb) = tokio::join!(
                store.update_job(&a.job, &a.events),
                store.update_job(&b.job, &b.events)
            );
            assert!(ra.is_ok() != rb.is_ok(), "one of two racing updates wins");
            let err = ra.err().or(rb.err()).unwrap();
            assert!(matches!(err, Error::Conflict { .. }), "{err}");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    // Every event committed once, numbered without gaps.
    let events = store.events_since(0, 10_000).await.unwrap();
    assert_eq!(events.len(), 400);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as i64 + 1);
    }
    for j in &jobs {
        let stored = store.job(&j.id).await.unwrap().unwrap();
        assert_eq!(stored.version, 2);
        assert_eq!(store.job_events(&j.id, 0).await.unwrap().len(), 2);
    }
}

pub async fn idempotency_keys_answer_the_existing_job(store: Arc<dyn Store>) {
    let j = job(Some("k"), 0, 5);
    store.create_job(&j, "h1").await.unwrap();
    let again = job(Some("k"), 0, 6);
    match store.create_job(&again, "h1").await.unwrap() {
        Created::Existing { job, same_request } => {
            assert_eq!(job.id, j.id);
            assert!(same_request);
        }
        Created::New(_) => panic!("created twice"),
    }
    match store.create_job(&again, "h2").await.unwrap() {
        Created::Existing { same_request, .. } => assert!(!same_request),
        Created::New(_) => panic!("created twice"),
    }
    let page = store
        .list_jobs(&JobFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), 1);
}

pub async fn queue_order_is_priority_then_submission_and_pages_walk_back(store: Arc<dyn Store>) {
    let low = job(None, 0, 1);
    let high = job(None, 5, 2);
    let low2 = job(None, 0, 3);
    for j in [&low, &high, &low2] {
        store.create_job(j, "h").await.unwrap();
    }
    let order: Vec<JobId> = store
        .queued_jobs(10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(order, [high.id.clone(), low.id.clone(), low2.id.clone()]);

    let first = store
        .list_jobs(&JobFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(first.jobs.len(), 2);
    assert_eq!(first.jobs[0].id, low2.id);
    let second = store
        .list_jobs(&JobFilter {
            limit: 2,
            before: first.next,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(second.jobs.len(), 1);
    assert_eq!(second.jobs[0].id, low.id);
    assert_eq!(second.next, None);
    let queued = store
        .list_jobs(&JobFilter {
            state: Some(JobState::Running),
            limit: 10,
            before: None,
        })
        .await
        .unwrap();
    assert!(queued.jobs.is_empty());
}
