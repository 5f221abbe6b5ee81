//! The `Store` conformance suite, run against every store kind (see `suite.rs`), and the
//! checks only one kind has: PostgreSQL's (several coordinators on one database) and
//! SQLite's (its schema version).

mod postgres;
mod sqlite;
mod suite;

use gantry_store::testing::FreshSchema;
use gantry_store::{PgStore, SqliteStore, Store};
use std::sync::Arc;

/// One test per check of the suite. `$make` opens `n` handles on one fresh store (as
/// several coordinators would), or `None` when that kind cannot be tested here. Checks
/// that write from several handles get all of them; SQLite has one writer, so it gives
/// one.
macro_rules! conformance {
    ($kind:ident, $make:path, $n:expr) => {
        mod $kind {
            use super::*;
            conformance!(@each $make, 1;
                a_job_round_trips_with_its_events,
                a_stale_version_is_refused_and_writes_nothing,
                every_transition_is_stored_as_applied,
                idempotency_keys_answer_the_existing_job,
                queue_order_is_priority_then_submission_and_pages_walk_back,
                finished_jobs_are_purged_with_their_events_and_deliveries_and_live_ones_kept,
                several_changes_commit_as_one_write_with_each_events_own_state,
                a_new_job_whose_id_is_taken_fails_alone
            );
            conformance!(@each $make, $n;
                concurrent_writes_share_commits_but_keep_their_own_outcomes,
                tokens_are_kept_by_hash_and_revoked_once,
                added_backends_are_kept_once_by_name_and_url,
                node_stats_add_up_and_filter,
                a_follower_of_the_sequence_never_skips_an_event
            );
        }
    };
    (@each $make:path, $n:expr; $($check:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some((_keep, stores)) = $make($n).await else {
                    return;
                };
                crate::suite::$check(stores).await;
            }
        )+
    };
}

/// What keeps a store's database alive for the test.
pub enum Keep {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Schema(#[allow(dead_code)] FreshSchema),
}

async fn sqlite(_n: usize) -> Option<(Keep, Vec<Arc<dyn Store>>)> {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).await.unwrap();
    Some((Keep::Dir(dir), vec![Arc::new(store)]))
}

pub async fn postgres(n: usize) -> Option<(Keep, Vec<Arc<dyn Store>>)> {
    let schema = FreshSchema::create().await?;
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..n {
        stores.push(Arc::new(PgStore::open(&schema.url).await.unwrap()));
    }
    Some((Keep::Schema(schema), stores))
}

conformance!(sqlite_store, sqlite, 1);
conformance!(postgres_store, postgres, 2);
