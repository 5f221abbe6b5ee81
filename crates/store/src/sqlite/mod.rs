//! The embedded store: one SQLite file in the data dir, in WAL mode.
//!
//! Writes go to one writer task that owns the only write connection, so they are
//! serialised and event sequence numbers commit in order (`commit`). Reads use their
//! own pool and never block on a writer (WAL). The queries it shares with PostgreSQL
//! are in `sql`; the schema's versions are in `schema`.

mod commit;
mod schema;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};
use sqlx::SqlitePool;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use crate::sql::Sql;
use crate::writer::Writer;
use crate::Result;

pub use schema::SCHEMA_VERSION;

pub struct SqliteStore {
    writer: Writer,
    reader: SqlitePool,
    /// The write connection, for the rare writes outside jobs (tokens, backends,
    /// statistics, deliveries); they wait for it like any group of job writes.
    admin: SqlitePool,
}

impl SqliteStore {
    /// Open (creating if needed) `gantry.db` in `dir` and bring its schema up to date.
    pub async fn open(dir: &Path) -> Result<SqliteStore> {
        let options = SqliteConnectOptions::from_str("sqlite://gantry.db")?
            .filename(dir.join("gantry.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A 202 promises the job survives a power cut, not only a crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        schema::migrate(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore {
            admin: writer.clone(),
            writer: Writer::spawn(commit::Sqlite(writer)),
            reader,
        })
    }
}

impl Sql for SqliteStore {
    type Db = sqlx::Sqlite;

    // One write connection: the transaction's first write already holds the database's
    // write lock, which no other writer can take before the commit.
    const FOR_UPDATE: &'static str = "";

    // AUTOINCREMENT's own counter: the newest number handed out, even once purged; no
    // row before the first event.
    const LAST_SEQ: &'static str =
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)";

    const LEASES: bool = false;

    fn writer(&self) -> &Writer {
        &self.writer
    }

    fn reads(&self) -> &SqlitePool {
        &self.reader
    }

    fn writes(&self) -> &SqlitePool {
        &self.admin
    }

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }
}
