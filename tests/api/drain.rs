//! Shutdown as SIGTERM starts it: during the grace period the server still accepts
//! connections but answers new requests 503 with `Retry-After`; event streams opened before
//! follow their job to its end (or back to the queue) and then the server stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::helpers::*;

#[tokio::test]
async fn an_event_stream_open_at_shutdown_follows_its_job_to_succeeded_within_the_grace() {
    let release = Arc::new(AtomicBool::new(false));
    let runner = GatedRunner {
        release: release.clone(),
    };
    let mut app = spawn_app_with(
        |settings| settings.queue.grace = Duration::from_secs(30),
        Arc::new(runner),
    )
    .await;
    let id = app.submit(&tiny_spec()).await;
    app.wait_for(&id, &["running"], Duration::from_secs(10))
        .await;
    let stream = app.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!(stream.status(), StatusCode::OK);

    app.signal_stop();
    app.wait_until_draining().await;
    release.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let events = read_events(stream, Duration::from_secs(30)).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the stream never ended"
    );

    let statuses: Vec<&str> = events
        .iter()
        .filter(|(name, _)| name == "status")
        .map(|(_, data)| data["status"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(statuses, ["running", "succeeded"], "{events:?}");
    let points = events.iter().filter(|(name, _)| name == "point").count();
    assert_eq!(
        points, 30,
        "every point of the range test, sent after SIGTERM"
    );

    app.stop().await.expect("a clean shutdown");
    let store = lrtune::store::Store::open(&app.db_path).await.unwrap();
    let job = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(job.status, lrtune::store::JobStatus::Succeeded);
}

#[tokio::test]
async fn a_request_during_the_grace_period_is_a_503_with_retry_after_not_a_refused_connection() {
    let release = Arc::new(AtomicBool::new(false));
    let runner = GatedRunner {
        release: release.clone(),
    };
    let mut app = spawn_app_with(
        |settings| settings.queue.grace = Duration::from_secs(30),
        Arc::new(runner),
    )
    .await;
    let id = app.submit(&tiny_spec()).await;
    app.wait_for(&id, &["running"], Duration::from_secs(10))
        .await;

    app.signal_stop();
    app.wait_until_draining().await;
    // A client of its own: a new connection, so the listener is proven to still accept.
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/v1/jobs", app.address))
        .json(&tiny_spec())
        .send()
        .await
        .expect("the connection is accepted");
    assert_eq!(response.headers()["retry-after"], "5");
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_error(&body, "shutting_down");
    let response = client
        .get(format!("{}/v1/jobs/{id}", app.address))
        .send()
        .await
        .expect("the connection is accepted");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let health = client
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(
        health
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let (status, body) = json_of(health).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        serde_json::json!({
            "status": "shutting_down",
            "database": "sqlite",
            "reason": "the server is shutting down"
        })
    );

    release.store(true, Ordering::SeqCst);
    app.stop().await.expect("a clean shutdown");
    let store = lrtune::store::Store::open(&app.db_path).await.unwrap();
    let job = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(job.status, lrtune::store::JobStatus::Succeeded);
    let listening = client.get(format!("{}/healthz", app.address)).send().await;
    assert!(
        listening.is_err(),
        "the server still answers after it stopped"
    );
}

#[tokio::test]
async fn an_event_stream_whose_job_outlives_the_grace_ends_with_queued() {
    let mut app = spawn_app_with(
        |settings| settings.queue.grace = Duration::from_millis(300),
        Arc::new(FaultyRunner),
    )
    .await;
    let id = app.submit(&named("endless")).await;
    app.wait_for(&id, &["running"], Duration::from_secs(10))
        .await;
    let stream = app.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!(stream.status(), StatusCode::OK);

    app.signal_stop();
    let started = Instant::now();
    let events = read_events(stream, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the stream never ended"
    );
    let (name, data) = events.last().expect("events");
    assert_eq!(name, "status", "{events:?}");
    assert_eq!(data["status"], "queued", "{events:?}");
    let statuses = events.iter().filter(|(name, _)| name == "status").count();
    assert_eq!(statuses, 2, "running, then queued: {events:?}");

    app.stop().await.expect("a clean shutdown");
    let store = lrtune::store::Store::open(&app.db_path).await.unwrap();
    let job = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(job.status, lrtune::store::JobStatus::Queued);
    assert_eq!(job.attempts, 0);
}
