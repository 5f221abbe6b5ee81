//! What only the PostgreSQL store has: versioned migrations shared by coordinators, and
//! event numbers that never commit out of order across coordinators.

use crate::suite::job;
use gantry_core::{transition, EventKind, Input, Policy};
use gantry_store::testing::FreshSchema;
use gantry_store::{Error, PgStore, Store};
use sqlx::Connection;
use std::time::{Duration, Instant};

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
            Error::SchemaTooNew {
                found: 99,
                known: 1
            }
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
    assert_eq!(versions, [1]);
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
             WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE event_counter%'",
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
