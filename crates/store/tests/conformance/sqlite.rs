//! What only the SQLite store has: its schema's version in `PRAGMA user_version`.

use crate::suite::job;
use gantry_store::{Error, SqliteStore, Store};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

#[tokio::test]
async fn reopening_keeps_everything_and_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let j = job(None, 0, 5);
    {
        let store = SqliteStore::open(dir.path()).await.unwrap();
        store.create_job(&j, "h").await.unwrap();
    }
    let store = SqliteStore::open(dir.path()).await.unwrap();
    assert_eq!(store.job(&j.id).await.unwrap().unwrap(), j);
    assert_eq!(store.events_since(0, 10).await.unwrap().len(), 1);
    drop(store);
    let raw = SqlitePool::connect_with(
        SqliteConnectOptions::new().filename(dir.path().join("gantry.db")),
    )
    .await
    .unwrap();
    sqlx::raw_sql("PRAGMA user_version = 99")
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;
    let err = SqliteStore::open(dir.path()).await.err().unwrap();
    assert!(
        matches!(
            err,
            Error::SchemaTooNew { found: 99, known } if known == gantry_store::SQLITE_SCHEMA_VERSION
        ),
        "{err}"
    );
}
