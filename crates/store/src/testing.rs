//! For tests and benchmarks of gantry's crates: a fresh PostgreSQL schema per test, on
//! the database that `GANTRY_TEST_POSTGRES_URL` names, dropped when the test ends.

use sqlx::Connection;

/// The variable that names the test database.
pub const POSTGRES_URL_VAR: &str = "GANTRY_TEST_POSTGRES_URL";

/// A schema of its own for one test; `url` connects to it.
pub struct FreshSchema {
    base: String,
    pub schema: String,
    pub url: String,
}

impl FreshSchema {
    /// A new, empty schema, or `None` (saying so on stderr) when the variable is unset.
    pub async fn create() -> Option<FreshSchema> {
        let Ok(base) = std::env::var(POSTGRES_URL_VAR) else {
            eprintln!("{POSTGRES_URL_VAR} is not set: this Postgres test is skipped");
            return None;
        };
        Some(FreshSchema::create_on(&base).await)
    }

    /// A new, empty schema on the database `base` names (benchmarks name their own).
    pub async fn create_on(base: &str) -> FreshSchema {
        let base = base.to_owned();
        let schema = format!(
            "gantry_test_{}",
            gantry_core::JobId::random().as_str().replace('-', "")
        );
        let mut conn = sqlx::PgConnection::connect(&base)
            .await
            .unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR}={base}: cannot connect: {e}"));
        sqlx::raw_sql(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cannot create schema {schema}: {e}"));
        // The schema is made; a connection that does not close cleanly is dropped anyway.
        let _ = conn.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options[search_path]={schema}");
        FreshSchema { base, schema, url }
    }
}

impl Drop for FreshSchema {
    fn drop(&mut self) {
        let (base, schema) = (self.base.clone(), self.schema.clone());
        // Drop runs inside the test's runtime: clean up on a thread with its own.
        let done = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                // A schema left behind costs only space: say so, and let the test pass.
                let mut conn = match sqlx::PgConnection::connect(&base).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        eprintln!("test schema {schema} left behind: cannot connect: {e}");
                        return;
                    }
                };
                // A test that left a transaction open must not hang the run; without the
                // limit the drop below only waits longer.
                let _ = sqlx::raw_sql("SET lock_timeout = '10s'")
                    .execute(&mut conn)
                    .await;
                if let Err(e) = sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .execute(&mut conn)
                    .await
                {
                    eprintln!("test schema {schema} left behind: {e}");
                }
                // The connection ends with this runtime either way.
                let _ = conn.close().await;
            });
        });
        // A panic of the clean-up thread has already been printed; a drop cannot fail.
        let _ = done.join();
    }
}

/// Every claim was made under a lease with one owner per (backend, token), and each
/// backend's tokens never go back in commit order: no two coordinators drove one backend
/// at once. Answers how many claims there were, or what broke the rule.
pub fn check_dispatch_log(log: &[crate::DispatchRecord]) -> Result<usize, String> {
    let mut owner_of: std::collections::HashMap<(&str, i64), &str> = Default::default();
    let mut last: std::collections::HashMap<&str, i64> = Default::default();
    for r in log {
        let owner = *owner_of
            .entry((r.backend.as_str(), r.token))
            .or_insert(r.owner.as_str());
        if owner != r.owner {
            return Err(format!(
                "{} was claimed for by {owner} and {} under token {}",
                r.backend, r.owner, r.token
            ));
        }
        let before = last.entry(r.backend.as_str()).or_insert(r.token);
        if r.token < *before {
            return Err(format!(
                "{}: a claim under token {} after one under {before}",
                r.backend, r.token
            ));
        }
        *before = r.token;
    }
    Ok(log.len())
}

#[cfg(test)]
mod tests {
    use super::check_dispatch_log;
    use crate::DispatchRecord;

    fn claim(n: i64, backend: &str, owner: &str, token: i64) -> DispatchRecord {
        DispatchRecord {
            n,
            backend: backend.into(),
            owner: owner.into(),
            token,
            job_id: format!("j{n}"),
            at_us: n,
        }
    }

    #[test]
    fn a_dispatch_log_with_two_drivers_at_once_is_refused() {
        let good = [
            claim(1, "a", "c1", 1),
            claim(2, "b", "c2", 1),
            claim(3, "a", "c2", 2),
        ];
        assert_eq!(check_dispatch_log(&good), Ok(3));
        let shared = [claim(1, "a", "c1", 1), claim(2, "a", "c2", 1)];
        assert!(check_dispatch_log(&shared)
            .unwrap_err()
            .contains("c1 and c2"));
        let back = [claim(1, "a", "c2", 2), claim(2, "a", "c1", 1)];
        assert!(check_dispatch_log(&back)
            .unwrap_err()
            .contains("after one under 2"));
    }
}
