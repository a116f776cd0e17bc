//! Throwaway PostgreSQL databases for tests: each test creates its own (so tests run in
//! parallel without seeing each other's jobs) and drops it when done. The server is the one
//! `LRTUNE_TEST_POSTGRES` names (an administrative URL; default: the local server's `test`
//! database as `postgres`). When it cannot be reached, tests fail under `CI` and are skipped
//! with a note elsewhere.

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
    /// A new, empty database; `None` (after a note on stderr) when the server cannot be
    /// reached and `CI` is not set. Panics under `CI`: there a missing server is a failure.
    pub async fn create() -> Option<ScratchDatabase> {
        let admin_url =
            std::env::var("LRTUNE_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string());
        let admin: PgConnectOptions = admin_url
            .parse()
            .unwrap_or_else(|error| panic!("LRTUNE_TEST_POSTGRES={admin_url}: {error}"));
        let mut connection = match connect(&admin).await {
            Ok(connection) => connection,
            Err(error) if std::env::var_os("CI").is_none() => {
                eprintln!(
                    "note: skipped: no PostgreSQL at {admin_url} ({error}); set \
                     LRTUNE_TEST_POSTGRES to run the PostgreSQL tests"
                );
                return None;
            }
            Err(error) => panic!("PostgreSQL is required in CI: {admin_url}: {error}"),
        };
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
        Some(ScratchDatabase { url, name, admin })
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
