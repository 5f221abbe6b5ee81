//! Backend leases on PostgreSQL: rows in `backend_leases` and `coordinators` with expiry
//! times on the database's clock, and the dispatch log the group commit appends claims to.

use sqlx::Row;
use std::time::Duration;

use super::PgStore;
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

/// Leases: one coordinator drives a backend at a time. Every time is the database's
/// clock (`clock_timestamp()`), so coordinators' clocks never have to agree.
impl PgStore {
    /// Say this coordinator is alive for `ttl`; answers the live coordinators, sorted.
    pub async fn heartbeat(&self, coordinator: &str, ttl: Duration) -> Result<Vec<String>> {
        sqlx::query(
            "INSERT INTO coordinators (id, expires_at) \
             VALUES ($1, clock_timestamp() + $2 * interval '1 millisecond') \
             ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
        )
        .bind(coordinator)
        .bind(ttl.as_millis() as i64)
        .execute(&self.pool)
        .await?;
        Ok(sqlx::query_scalar(
            "SELECT id FROM coordinators WHERE expires_at > clock_timestamp() ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Say this coordinator is gone (a clean shutdown), so others rebalance at once.
    pub async fn leave(&self, coordinator: &str) -> Result<()> {
        sqlx::query("DELETE FROM coordinators WHERE id = $1")
            .bind(coordinator)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Take `backend` if nobody holds it (never leased, released, or expired): answers
    /// the new fencing token, one more than any before it.
    pub async fn acquire_lease(
        &self,
        backend: &str,
        coordinator: &str,
        ttl: Duration,
    ) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "INSERT INTO backend_leases (backend, owner, token, expires_at) \
             VALUES ($1, $2, 1, clock_timestamp() + $3 * interval '1 millisecond') \
             ON CONFLICT (backend) DO UPDATE SET owner = EXCLUDED.owner, \
                 token = backend_leases.token + 1, expires_at = EXCLUDED.expires_at \
             WHERE backend_leases.owner IS NULL OR backend_leases.expires_at <= clock_timestamp() \
             RETURNING token",
        )
        .bind(backend)
        .bind(coordinator)
        .bind(ttl.as_millis() as i64)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Extend a lease this coordinator still holds; false when it lapsed or was taken
    /// (a lapsed lease is never revived: it is acquired anew, with a new token).
    pub async fn renew_lease(
        &self,
        backend: &str,
        coordinator: &str,
        token: i64,
        ttl: Duration,
    ) -> Result<bool> {
        let renewed = sqlx::query(
            "UPDATE backend_leases SET expires_at = clock_timestamp() + $4 * interval '1 millisecond' \
             WHERE backend = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp()",
        )
        .bind(backend)
        .bind(coordinator)
        .bind(token)
        .bind(ttl.as_millis() as i64)
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Give a lease up, so another coordinator may take it at once.
    pub async fn release_lease(&self, backend: &str, coordinator: &str, token: i64) -> Result<()> {
        sqlx::query(
            "UPDATE backend_leases SET owner = NULL, expires_at = clock_timestamp() \
             WHERE backend = $1 AND owner = $2 AND token = $3",
        )
        .bind(backend)
        .bind(coordinator)
        .bind(token)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn leases(&self) -> Result<Vec<Lease>> {
        let rows = sqlx::query(
            "SELECT backend, owner, token, \
             (EXTRACT(EPOCH FROM (expires_at - clock_timestamp())) * 1000)::int8 AS remaining_ms \
             FROM backend_leases ORDER BY backend",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Lease {
                    backend: r.try_get("backend")?,
                    owner: r.try_get("owner")?,
                    token: r.try_get("token")?,
                    remaining_ms: r.try_get("remaining_ms")?,
                })
            })
            .collect()
    }

    /// Every claim committed, in commit order per backend (by `n` within one backend's
    /// lease, since claims are fenced by it).
    pub async fn dispatch_log(&self) -> Result<Vec<DispatchRecord>> {
        let rows = sqlx::query(
            "SELECT n, backend, owner, token, job_id, \
             (EXTRACT(EPOCH FROM at) * 1000000)::int8 AS at_us FROM dispatch_log ORDER BY n",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DispatchRecord {
                    n: r.try_get("n")?,
                    backend: r.try_get("backend")?,
                    owner: r.try_get("owner")?,
                    token: r.try_get("token")?,
                    job_id: r.try_get("job_id")?,
                    at_us: r.try_get("at_us")?,
                })
            })
            .collect()
    }
}
