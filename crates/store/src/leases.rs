//! Leases: which coordinator drives each backend, when several share one database.
//!
//! A backend is driven by the one coordinator holding its lease. Each takeover hands out
//! a fencing token one more than any before it; every write about the backend carries
//! it (`Fence`, checked by `Store::update_job_fenced` in the writing statement), so a
//! coordinator whose lease lapsed changes nothing. Coordinators say they are alive with
//! heartbeats, so each can take its fair share. `PgStore` implements it; the embedded
//! store has one coordinator and no leases.

use async_trait::async_trait;
use std::time::Duration;

use crate::Result;

/// Who drives a backend, as the database has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub backend: String,
    /// None once released.
    pub owner: Option<String>,
    pub token: i64,
    /// Milliseconds left before it expires (negative once expired), on the database's clock.
    pub remaining_ms: i64,
}

/// One claim of a job for a backend, as committed with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchRecord {
    pub n: i64,
    pub backend: String,
    pub owner: String,
    pub token: i64,
    pub job_id: String,
    /// Microseconds since the Unix epoch, on the database's clock.
    pub at_us: i64,
}

/// Backend leases, coordinator heartbeats and the log of claims made under leases.
/// Every time is the database's clock, so coordinators' clocks never have to agree.
#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Say this coordinator is alive for `ttl`; answers the live coordinators, sorted.
    async fn heartbeat(&self, coordinator: &str, ttl: Duration) -> Result<Vec<String>>;

    /// Say this coordinator is gone (a clean shutdown), so others rebalance at once.
    async fn leave(&self, coordinator: &str) -> Result<()>;

    /// Take `backend` if nobody holds it (never leased, released, or expired): answers
    /// the new fencing token, one more than any before it.
    async fn acquire_lease(
        &self,
        backend: &str,
        coordinator: &str,
        ttl: Duration,
    ) -> Result<Option<i64>>;

    /// Extend a lease this coordinator still holds; false when it lapsed or was taken
    /// (a lapsed lease is never revived: it is acquired anew, with a new token).
    async fn renew_lease(
        &self,
        backend: &str,
        coordinator: &str,
        token: i64,
        ttl: Duration,
    ) -> Result<bool>;

    /// Give a lease up, so another coordinator may take it at once.
    async fn release_lease(&self, backend: &str, coordinator: &str, token: i64) -> Result<()>;

    /// Every backend's lease, by backend name.
    async fn leases(&self) -> Result<Vec<Lease>>;

    /// Every claim committed, in commit order per backend (by `n` within one backend's
    /// lease, since claims are fenced by it).
    async fn dispatch_log(&self) -> Result<Vec<DispatchRecord>>;
}
