//! The database in trouble: another process holding the write lock past the busy timeout.
//! Requests that need it answer 503 with `Retry-After` instead of hanging or failing with a
//! 500, and service resumes once the trouble is gone.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

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
