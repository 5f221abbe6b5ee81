//! The `Store` conformance suite, run against every store kind (see `suite.rs`).

mod suite;

use gantry_store::{SqliteStore, Store};
use std::sync::Arc;

/// One test per check of the suite, each on a fresh store made by `$make`.
macro_rules! conformance {
    ($kind:ident, $make:expr) => {
        mod $kind {
            use super::*;
            conformance!(@each $make;
                a_job_round_trips_with_its_events,
                a_stale_version_is_refused_and_writes_nothing,
                concurrent_writes_share_commits_but_keep_their_own_outcomes,
                idempotency_keys_answer_the_existing_job,
                queue_order_is_priority_then_submission_and_pages_walk_back
            );
        }
    };
    (@each $make:expr; $($check:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (_keep, store) = $make.await;
                crate::suite::$check(store).await;
            }
        )+
    };
}

async fn sqlite() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).await.unwrap();
    (dir, Arc::new(store))
}

conformance!(sqlite_store, sqlite());
