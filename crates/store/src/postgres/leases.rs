//! Backend leases on PostgreSQL (`Leases`): rows in `backend_leases` and `coordinators`
//! with expiry times on the database's clock (`clock_timestamp()`), so coordinators'
//! clocks never have to agree, and the dispatch log the group commit appends claims to.

use async_trait::async_trait;
use sqlx::Row;
use std::time::Duration;

use super::PgStore;
use crate::leases::{DispatchRecord, Lease, Leases};
use crate::Result;

#[async_trait]
impl Leases for PgStore {
    async fn heartbeat(&self, coordinator: &str, ttl: Duration) -> Result<Vec<String>> {
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

    async fn leave(&self, coordinator: &str) -> Result<()> {
        sqlx::query("DELETE FROM coordinators WHERE id = $1")
            .bind(coordinator)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn acquire_lease(
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

    async fn renew_lease(
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

    async fn release_lease(&self, backend: &str, coordinator: &str, token: i64) -> Result<()> {
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

    async fn leases(&self) -> Result<Vec<Lease>> {
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

    async fn dispatch_log(&self) -> Result<Vec<DispatchRecord>> {
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
