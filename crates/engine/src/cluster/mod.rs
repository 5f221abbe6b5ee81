//! Several coordinators on one PostgreSQL database: who drives which backend, and how
//! every coordinator hears what the others commit.
//!
//! Each backend is driven by the one coordinator holding its lease (`lease_loop`): it
//! renews its leases every third of the lease, takes free or expired ones up to its fair
//! share of the backends among the live coordinators, and gives extras back when a
//! coordinator joins. Every write about a backend carries the lease's fencing token,
//! checked by the store in the writing statement, so a coordinator that lost a lease
//! (paused, partitioned) changes nothing about that backend. A lease gained starts a
//! driver that first adopts the attempts the database says are running there.
//!
//! The event tail (`tail_loop`) is the one publisher of persisted events in this mode:
//! woken by LISTEN/NOTIFY (and every second, in case a notification is lost), it reads
//! the event rows in sequence and puts them on the local bus, so every coordinator's
//! streams show the whole farm in one order. It also carries out what another
//! coordinator's change asks of this one: a job queued elsewhere joins the local queue
//! index, a cancel requested elsewhere stops the attempt on a backend driven here.

pub mod loops;

use gantry_store::{Event, Leases, PgStore};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// This coordinator's place in a farm of several.
pub struct Cluster {
    /// The shared store, for what only PostgreSQL does (LISTEN/NOTIFY, the event tail).
    pub store: Arc<PgStore>,
    /// Backend leases and coordinator heartbeats (the same store, by what it must do).
    pub leases: Arc<dyn Leases>,
    /// This coordinator's id, unique among the live ones.
    pub id: String,
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// Wakes the lease loop at once (a write was refused by its fence).
    pub check: Notify,
    /// Sequence numbers this coordinator wrote and the tail has not passed yet: the tail
    /// publishes them but does not act on them again.
    pub(crate) local: Mutex<HashSet<i64>>,
    /// The running driver of each backend leased here, with what stops it.
    pub(crate) drivers: Mutex<HashMap<String, (CancellationToken, JoinHandle<()>)>>,
    /// Writes the store refused because their lease was gone.
    pub fenced_writes: std::sync::atomic::AtomicU64,
}

impl Cluster {
    pub fn new(store: Arc<PgStore>, id: String, lease: Duration) -> Cluster {
        Cluster {
            leases: store.clone(),
            store,
            id,
            lease,
            check: Notify::new(),
            local: Mutex::new(HashSet::new()),
            drivers: Mutex::new(HashMap::new()),
            fenced_writes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Remember events this coordinator committed (the tail will publish them).
    pub fn wrote(&self, events: &[Event]) {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local.extend(events.iter().map(|e| e.seq));
    }

    pub(crate) fn was_local(&self, seq: i64) -> bool {
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&seq)
    }
}
