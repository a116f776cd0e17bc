//! The database in trouble: another process holding the write lock past the busy timeout, or
//! a damaged file. Requests that need it answer 503 with `Retry-After` instead of hanging or
//! failing with a 500, `/healthz` says why, and service resumes once the trouble is gone.

use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sqlx::{ConnectOptions, Connection, Row};

use crate::helpers::*;

#[tokio::test]
async fn a_submit_while_another_process_holds_the_write_lock_is_a_503_then_a_202() {
    let app = spawn_app().await;
    let earlier = app.submit(&tiny_spec()).await;
    app.wait_until_finished(&earlier).await;

    let lock = ForeignWriteLock::take(&app.db_path).await;
    let started = Instant::now();
    let response = app.post_json("/v1/jobs", &tiny_spec()).await;
    let waited = started.elapsed();
    assert_eq!(response.headers()["retry-after"], "2");
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error = assert_error(&body, "unavailable");
    assert_eq!(
        error["message"],
        "the database is unavailable (database is locked): retry later"
    );
    // The busy timeout (2 s), not the 10 s it used to be, nor a hang.
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "answered after {waited:?}"
    );
    // Reads need no write lock (WAL): they keep working.
    assert_eq!(app.job(&earlier).await["status"], "succeeded");

    lock.release().await;
    let id = app.submit(&tiny_spec()).await;
    assert_eq!(app.wait_until_finished(&id).await["status"], "succeeded");
}

#[tokio::test]
async fn healthz_names_the_lock_while_another_process_holds_it_and_is_ok_after() {
    let app = spawn_app().await;
    let (status, body) = json_of(app.get("/healthz").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        serde_json::json!({"status": "ok", "database": "sqlite"})
    );

    let lock = ForeignWriteLock::take(&app.db_path).await;
    let started = Instant::now();
    let response = app.get("/healthz").await;
    // As every 503 of the API, it says when to try again.
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    let (status, body) = json_of(response).await;
    assert!(started.elapsed() < Duration::from_secs(3), "healthz hung");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        serde_json::json!({
            "status": "unavailable",
            "database": "sqlite",
            "reason": "database is locked"
        })
    );

    lock.release().await;
    let (status, body) = json_of(app.get("/healthz").await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok");
}

/// The realistic damage is to a file the server already has open (start-up on a garbage file
/// fails: the migrations cannot read it). Everything is first checkpointed into the main file,
/// so that no page survives in the WAL, then every page after the 100-byte header is
/// overwritten. The pool's connections may still answer from their page caches; the health
/// check reads from the file.
#[tokio::test]
async fn healthz_is_503_when_the_database_file_is_damaged() {
    let app = spawn_app().await;
    let id = app.submit(&tiny_spec()).await;
    app.wait_until_finished(&id).await;
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);

    let mut connection = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&app.db_path)
        .connect()
        .await
        .unwrap();
    let checkpoint = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(checkpoint.get::<i64, _>(0), 0, "the checkpoint was blocked");
    connection.close().await.unwrap();
    let length = std::fs::metadata(&app.db_path).unwrap().len();
    assert!(length > 4096, "the database has more than one page");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&app.db_path)
        .unwrap();
    file.seek(SeekFrom::Start(100)).unwrap();
    file.write_all(&vec![0xA5; length as usize - 100]).unwrap();
    file.sync_all().unwrap();

    let (status, body) = json_of(app.get("/healthz").await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["database"], "sqlite");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(
        ["database disk image is malformed", "file is not a database"].contains(&reason),
        "{body}"
    );
}
