//! Throwaway PostgreSQL databases for tests: each test creates its own (so tests run in
//! parallel without seeing each other's jobs) and drops it when done. The server is the one
//! `LRTUNE_TEST_POSTGRES` names (an administrative URL; default: the local server's `test`
//! database as `postgres`). When it cannot be reached the test fails, saying so: a PostgreSQL
//! test never passes without running (the policy is in tests/support/mod.rs). The store suite
//! uses this file as `store::scratch` (cfg(test)); the integration tests include it by path.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

/// The server tests use unless `LRTUNE_TEST_POSTGRES` says otherwise.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A database of its own, dropped (with its connections ended) when this is dropped.
pub struct ScratchDatabase {
    /// The database's URL, for `Store::open` or `--db`.
    pub url: String,
    name: String,
    admin: PgConnectOptions,
}

impl ScratchDatabase {
    /// [`ScratchDatabase::new`] for the store suite, whose callers take an `Option`: always
    /// `Some`.
    pub async fn create() -> Option<ScratchDatabase> {
        Some(ScratchDatabase::new().await)
    }

    /// A new, empty database. Panics when the server cannot be reached.
    pub async fn new() -> ScratchDatabase {
        let admin_url =
            std::env::var("LRTUNE_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string());
        let admin: PgConnectOptions = admin_url
            .parse()
            .unwrap_or_else(|error| panic!("LRTUNE_TEST_POSTGRES={admin_url}: {error}"));
        let mut connection = connect(&admin).await.unwrap_or_else(|error| {
            panic!(
                "this test needs PostgreSQL, and there is none at {admin_url} ({error}): start \
                 one (Debian's postgresql) or name one with LRTUNE_TEST_POSTGRES; \
                 `cargo test -- --skip on_postgres` leaves the PostgreSQL tests out"
            )
        });
        let name = format!(
            "lrtune_test_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        // A name of our own making, not input: safe to put in the statement.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut connection)
            .await
            .unwrap_or_else(|error| panic!("creating the test database {name}: {error}"));
        let _ = connection.close().await;
        let url = admin.clone().database(&name).to_url_lossy().to_string();
        ScratchDatabase { url, name, admin }
    }
}

async fn connect(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(Duration::from_secs(5), options.connect()).await {
        Ok(connected) => connected,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

impl Drop for ScratchDatabase {
    /// Drops the database from a thread of its own (a drop cannot await), ending any
    /// connection a test left open.
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = self.admin.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to drop the test database");
            runtime.block_on(async move {
                let mut connection = connect(&admin).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut connection)
                .await?;
                connection.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("note: the test database {} was not dropped", self.name);
        }
    }
}
