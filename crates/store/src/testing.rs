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
                if let Ok(mut conn) = sqlx::PgConnection::connect(&base).await {
                    // A test that left a transaction open must not hang the run.
                    let _ = sqlx::raw_sql("SET lock_timeout = '10s'")
                        .execute(&mut conn)
                        .await;
                    let _ = sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&mut conn)
                        .await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = done.join();
    }
}
