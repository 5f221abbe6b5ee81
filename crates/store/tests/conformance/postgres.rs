//! What only the PostgreSQL store has: versioned migrations shared by coordinators, and
//! event numbers that never commit out of order across coordinators.

use crate::suite::job;
use gantry_core::{transition, EventKind, Input, Policy};
use gantry_store::testing::FreshSchema;
use gantry_store::{Error, Fence, Leases, PgStore, Store};
use sqlx::Connection;
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test]
async fn reopening_keeps_everything_and_a_newer_schema_is_refused() {
    let Some(schema) = FreshSchema::create().await else {
        return;
    };
    let j = job(None, 0, 5);
    {
        let store = PgStore::open(&schema.url).await.unwrap();
        store.create_job(&j, "h").await.unwrap();
    }
    let store = PgStore::open(&schema.url).await.unwrap();
    assert_eq!(store.job(&j.id).await.unwrap().unwrap(), j);
    sqlx::query("UPDATE gantry_schema SET version = 99")
        .execute(store.pool())
        .await
        .unwrap();
    let err = PgStore::open(&schema.url).await.err().unwrap();
    assert!(
        matches!(
            err,
            Error::SchemaTooNew { found: 99, known } if known == gantry_store::PG_SCHEMA_VERSION
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_starting_together_migrate_once() {
    let Some(schema) = FreshSchema::create().await else {
        return;
    };
    let opened = futures_util::future::join_all((0..4).map(|_| PgStore::open(&schema.url))).await;
    for store in opened {
        store.unwrap();
    }
    let mut conn = sqlx::PgConnection::connect(&schema.url).await.unwrap();
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM gantry_schema")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(versions, [gantry_store::PG_SCHEMA_VERSION]);
}

/// A coordinator paused between taking its event numbers and committing (SIGSTOP, a
/// long fsync) must hold back every later number: a follower never sees N+1 before N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_commit_holds_back_every_later_event_number() {
    let Some(schema) = FreshSchema::create().await else {
        return;
    };
    let store = std::sync::Arc::new(PgStore::open(&schema.url).await.unwrap());
    let j = job(None, 0, 5);
    let Ok(gantry_store::Created::New(first)) = store.create_job(&j, "h").await else {
        panic!("not created")
    };

    // Another coordinator's group, stopped after numbering its event.
    let mut paused = sqlx::PgConnection::connect(&schema.url).await.unwrap();
    let mut tx = paused.begin().await.unwrap();
    let taken: i64 = sqlx::query_scalar("UPDATE event_counter SET last = last + 1 RETURNING last")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(taken, first.seq + 1);
    let late = serde_json::to_string(&EventKind::Late {
        attempt: None,
        input: "paused".into(),
    })
    .unwrap();
    sqlx::query(
        "INSERT INTO events (seq, job_id, at, state, data) VALUES ($1, $2, 6, 'queued', $3)",
    )
    .bind(taken)
    .bind(j.id.as_str())
    .bind(&late)
    .execute(&mut *tx)
    .await
    .unwrap();

    // This coordinator writes meanwhile: its commit must wait for the paused one.
    let c = transition(&j, Input::Cancel, 7, &Policy::default()).unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { store.update_job(&c.job, &c.events).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut probe = sqlx::PgConnection::connect(&schema.url).await.unwrap();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE '%UPDATE event_counter SET last = last + $1 RETURNING last%'",
        )
        .fetch_one(&mut probe)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            !writer.is_finished(),
            "the write committed past a paused commit"
        );
        assert!(
            Instant::now() < deadline,
            "the writer never reached the counter"
        );
        tokio::task::yield_now().await;
    }
    let visible = store.events_since(first.seq, 10).await.unwrap();
    assert!(visible.is_empty(), "{visible:?}");
    assert!(!writer.is_finished());

    tx.commit().await.unwrap();
    let written = writer.await.unwrap().unwrap();
    assert_eq!(written[0].seq, taken + 1);
    let seqs: Vec<i64> = store
        .events_since(first.seq, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [taken, taken + 1]);
}

fn fence(backend: &str, owner: &str, token: i64, claim: bool) -> Fence {
    Fence {
        backend: backend.into(),
        owner: owner.into(),
        token,
        claim,
    }
}

/// A coordinator paused past its lease (SIGSTOP) comes back to find every write about
/// that backend refused by the token, checked in the writing statement itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_fences_every_write_about_its_backend() {
    let Some(schema) = FreshSchema::create().await else {
        return;
    };
    let a = PgStore::open(&schema.url).await.unwrap();
    let b = PgStore::open(&schema.url).await.unwrap();
    let ttl = Duration::from_millis(300);
    let t1 = a.acquire_lease("gpu", "A", ttl).await.unwrap().unwrap();
    assert_eq!(t1, 1);
    assert_eq!(b.acquire_lease("gpu", "B", ttl).await.unwrap(), None);
    assert!(a.renew_lease("gpu", "A", t1, ttl).await.unwrap());

    let j = job(None, 0, 5);
    a.create_job(&j, "h").await.unwrap();
    let dispatched = transition(
        &j,
        Input::Dispatch {
            backend: "gpu".into(),
            prompt_id: "p".into(),
        },
        6,
        &Policy::default(),
    )
    .unwrap();
    a.update_job_fenced(
        &dispatched.job,
        &dispatched.events,
        &fence("gpu", "A", t1, true),
    )
    .await
    .unwrap();
    let submitted = transition(
        &dispatched.job,
        Input::Submitted { attempt: 1 },
        7,
        &Policy::default(),
    )
    .unwrap();
    a.update_job_fenced(
        &submitted.job,
        &submitted.events,
        &fence("gpu", "A", t1, false),
    )
    .await
    .unwrap();

    // A stops renewing; B takes the backend as soon as the lease expires.
    let deadline = Instant::now() + Duration::from_secs(30);
    let t2 = loop {
        if let Some(t) = b.acquire_lease("gpu", "B", ttl).await.unwrap() {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "the lapsed lease was never taken over"
        );
        tokio::task::yield_now().await;
    };
    assert_eq!(t2, t1 + 1);
    assert!(!a.renew_lease("gpu", "A", t1, ttl).await.unwrap());

    let started = transition(
        &submitted.job,
        Input::Started { attempt: 1 },
        8,
        &Policy::default(),
    )
    .unwrap();
    let err = a
        .update_job_fenced(&started.job, &started.events, &fence("gpu", "A", t1, false))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Fenced { backend, token: 1, .. } if backend == "gpu"),
        "{err}"
    );
    assert_eq!(a.job(&j.id).await.unwrap().unwrap(), submitted.job);
    // Even a lease A owned under the new token's number is no lease of A's.
    let err = a
        .update_job_fenced(&started.job, &started.events, &fence("gpu", "A", t2, false))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Fenced { .. }), "{err}");
    b.update_job_fenced(&started.job, &started.events, &fence("gpu", "B", t2, false))
        .await
        .unwrap();
    assert_eq!(b.job(&j.id).await.unwrap().unwrap(), started.job);

    let log = a.dispatch_log().await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].backend.as_str(), log[0].owner.as_str(), log[0].token),
        ("gpu", "A", 1)
    );
    let leases = b.leases().await.unwrap();
    assert_eq!(leases[0].owner.as_deref(), Some("B"));
    b.release_lease("gpu", "B", t2).await.unwrap();
    assert_eq!(
        a.acquire_lease("gpu", "A", ttl).await.unwrap(),
        Some(t2 + 1)
    );
}

/// Two coordinators claiming one job: the second skips the row the first holds and is
/// told at once, rather than waiting on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_skips_a_job_another_coordinator_holds() {
    let Some(schema) = FreshSchema::create().await else {
        return;
    };
    let store = PgStore::open(&schema.url).await.unwrap();
    let ttl = Duration::from_secs(30);
    let token = store.acquire_lease("gpu", "A", ttl).await.unwrap().unwrap();
    let j = job(None, 0, 5);
    store.create_job(&j, "h").await.unwrap();

    let mut other = sqlx::PgConnection::connect(&schema.url).await.unwrap();
    let mut tx = other.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(j.id.as_str())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let dispatched = transition(
        &j,
        Input::Dispatch {
            backend: "gpu".into(),
            prompt_id: "p".into(),
        },
        6,
        &Policy::default(),
    )
    .unwrap();
    let claim = fence("gpu", "A", token, true);
    let err = store
        .update_job_fenced(&dispatched.job, &dispatched.events, &claim)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    tx.rollback().await.unwrap();
    store
        .update_job_fenced(&dispatched.job, &dispatched.events, &claim)
        .await
        .unwrap();
    assert_eq!(store.dispatch_log().await.unwrap().len(), 1);
}
