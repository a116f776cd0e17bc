use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_tiny_job_is_accepted_runs_and_succeeds_with_one_point_per_step() {
    let app = spawn_app().await;
    let response = app.post_json("/v1/jobs", &tiny_spec()).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let (_, body) = json_of(response).await;
    assert_eq!(body["status"], "queued");
    assert_eq!(
        location,
        format!("/v1/jobs/{}", body["id"].as_str().unwrap())
    );
    // Defaults are filled in.
    assert_eq!(body["spec"]["range_test"]["start_lr"], 1e-7);

    let id = body["id"].as_str().unwrap();
    let job = app.wait_until_finished(id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1);
    assert!(job["result"]["recommendation"]["peak_lr"].as_f64().unwrap() > 0.0);
    assert!(job["finished_at"].is_string() && job["started_at"].is_string());
    let total = job["result"]["timing"]["total_steps"].as_i64().unwrap();
    assert_eq!(job["progress"]["done"], total);
    assert_eq!(job["progress"]["fraction"], 1.0);

    let (status, curve) = json_of(app.get(&format!("/v1/jobs/{id}/curve")).await).await;
    assert_eq!(status, StatusCode::OK);
    let steps_run = job["result"]["range_test"]["steps_run"].as_u64().unwrap() as usize;
    let steps: Vec<u64> = curve["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (0..steps_run as u64).collect::<Vec<_>>());
    assert_eq!(curve["sweep_runs"].as_array().unwrap().len(), 2);
    for run in curve["sweep_runs"].as_array().unwrap() {
        assert!(run["spiked"].is_boolean(), "{run}");
    }

    // Every training run is a trial: the range test, then the sweep's runs in order.
    let (status, listed) = json_of(app.get(&format!("/v1/jobs/{id}/trials")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["job_id"], id);
    let trials = listed["trials"].as_array().unwrap();
    let kinds: Vec<&str> = trials.iter().map(|t| t["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["range_test", "sweep", "sweep"], "{listed}");
    for (index, trial) in trials.iter().enumerate() {
        assert_eq!(trial["index"], index, "{trial}");
        assert_eq!(trial["status"], "succeeded", "{trial}");
        assert_eq!(trial["attempt"], 1, "{trial}");
        assert_eq!(trial["worker"], job["worker"], "{trial}");
        assert!(trial["seconds"].as_f64().unwrap() > 0.0, "{trial}");
        assert!(trial["finished_at"].is_string(), "{trial}");
    }
    let range = &trials[0];
    assert_eq!(range["lr"], serde_json::Value::Null);
    assert_eq!(range["steps"], job["spec"]["range_test"]["steps"]);
    assert_eq!(range["steps_run"], steps_run);
    for (trial, run) in trials[1..]
        .iter()
        .zip(curve["sweep_runs"].as_array().unwrap())
    {
        assert_eq!(trial["lr"], run["peak_lr"], "{trial} {run}");
        assert_eq!(trial["seed"], run["seed"], "{trial} {run}");
        assert_eq!(trial["steps"], run["steps"], "{trial} {run}");
        assert_eq!(trial["val_loss"], run["val_loss"], "{trial} {run}");
        assert_eq!(trial["steps_run"], run["steps"], "{trial} {run}");
        assert_eq!(trial["diverged_at"], serde_json::Value::Null, "{trial}");
    }

    let csv = app.get(&format!("/v1/jobs/{id}/curve?format=csv")).await;
    assert_eq!(csv.status(), StatusCode::OK);
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let text = csv.text().await.unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("step,lr,loss,smoothed"));
    assert_eq!(lines.count(), steps_run);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_400_in_the_error_shape() {
    let app = spawn_app().await;
    let (status, body) = json_of(app.post_raw("/v1/jobs", "{\"data\": ").await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "invalid_json");
}

#[tokio::test]
async fn an_unknown_field_is_a_422_naming_it() {
    let app = spawn_app().await;
    let mut spec = tiny_spec();
    spec["range_test"]["start"] = json!(0.1);
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "invalid_spec");
    assert_eq!(error["field"], "range_test.start");
}

#[tokio::test]
async fn a_layer_list_that_does_not_fit_the_data_is_a_422_naming_the_layer() {
    let app = spawn_app().await;
    let mut spec = tiny_spec();
    spec["model"] = json!({"arch": "sequential", "layers": [
        {"type": "linear", "out": 8},
        {"type": "residual", "layers": [{"type": "conv2d", "out": 2, "kernel": 3}]},
        {"type": "linear", "out": 3}]});
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "invalid_spec");
    assert_eq!(error["field"], "model.layers[1].layers[0]");
    assert_eq!(
        error["message"],
        "conv2d needs [channels, height, width], but its input is [8]"
    );

    // A list that fits is queued.
    spec["model"]["layers"][1] = json!({"type": "residual", "layers": [
        {"type": "layer_norm"}, {"type": "linear", "out": 8}, {"type": "gelu"}]});
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    // Initial weights from a file are for `lrtune run`: the server reads no local paths.
    spec["init"] = json!({"weights": {"path": "w.safetensors"}});
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "invalid_input");
    assert_eq!(error["field"], "init.weights.path");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("POST /v1/weights"),
        "{body}"
    );
}

#[tokio::test]
async fn a_range_test_with_min_lr_above_max_lr_is_rejected() {
    let app = spawn_app().await;
    let mut spec = tiny_spec();
    spec["range_test"]["start_lr"] = json!(1.0);
    spec["range_test"]["end_lr"] = json!(0.1);
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(assert_error(&body, "invalid_spec")["field"]
        .as_str()
        .unwrap()
        .starts_with("range_test"));
}

#[tokio::test]
async fn range_test_steps_above_the_limit_are_a_422_naming_the_limit() {
    let app = spawn_app_configured(|settings| settings.limits.max_range_steps = 25).await;
    let (status, body) = json_of(app.post_json("/v1/jobs", &tiny_spec()).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "invalid_spec");
    assert_eq!(error["field"], "range_test.steps");
    assert!(error["message"].as_str().unwrap().contains("25"), "{body}");
}

#[tokio::test]
async fn a_sweep_above_the_limit_is_a_422_naming_the_limit() {
    let app = spawn_app_configured(|settings| settings.limits.max_sweep_epochs = 1).await;
    let (status, body) = json_of(app.post_json("/v1/jobs", &tiny_spec()).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "invalid_spec");
    assert!(
        error["field"].as_str().unwrap().starts_with("sweep"),
        "{body}"
    );
}

#[tokio::test]
async fn a_model_above_the_parameter_limit_is_a_422_naming_the_limit() {
    let app = spawn_app_configured(|settings| settings.limits.max_parameters = 50).await;
    let (status, body) = json_of(app.post_json("/v1/jobs", &tiny_spec()).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "invalid_spec");
    assert_eq!(error["field"], "model");
    // spirals: 2 features -> 16 hidden -> 3 classes.
    assert_eq!(
        error["message"],
        "99 parameters is above the limit of 50 (max_parameters): use a smaller model"
    );
}

#[tokio::test]
async fn a_job_on_a_missing_dataset_is_a_422_naming_data_dataset_id() {
    let app = spawn_app().await;
    let mut spec = tiny_spec();
    spec["data"] = json!({"dataset_id": "ds_nope"});
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        assert_error(&body, "invalid_input")["field"],
        "data.dataset_id"
    );
}

#[tokio::test]
async fn the_server_never_reads_a_local_path_from_a_spec() {
    let app = spawn_app().await;
    let mut spec = tiny_spec();
    spec["data"] = json!({"path": "/etc/passwd.csv"});
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(assert_error(&body, "invalid_input")["field"], "data.path");
}

#[tokio::test]
async fn a_full_queue_is_a_429_that_says_when_to_retry() {
    let app = spawn_app_configured(|settings| {
        settings.workers = 0;
        settings.api.max_queued = 2;
    })
    .await;
    app.submit(&tiny_spec()).await;
    app.submit(&tiny_spec()).await;
    let response = app.post_json("/v1/jobs", &tiny_spec()).await;
    assert_eq!(response.headers()["retry-after"], "10");
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(assert_error(&body, "queue_full")["message"]
        .as_str()
        .unwrap()
        .contains('2'));
}

#[tokio::test]
async fn an_unknown_job_is_a_404_on_every_route() {
    let app = spawn_app().await;
    for path in [
        "/v1/jobs/job_missing",
        "/v1/jobs/job_missing/curve",
        "/v1/jobs/job_missing/trials",
        "/v1/jobs/job_missing/events",
    ] {
        let (status, body) = json_of(app.get(path).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_error(&body, "not_found");
    }
    let (status, body) = json_of(
        app.post_json("/v1/jobs/job_missing/cancel", &json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found");
}

#[tokio::test]
async fn jobs_are_listed_newest_first_with_a_cursor_and_a_status_filter() {
    let app = spawn_app_configured(|settings| settings.workers = 0).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.submit(&tiny_spec()).await);
    }
    let (status, page) = json_of(app.get("/v1/jobs?limit=2").await).await;
    assert_eq!(status, StatusCode::OK);
    let first: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["id"].as_str().unwrap())
        .collect();
    assert_eq!(first, vec![ids[2].as_str(), ids[1].as_str()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, rest) = json_of(app.get(&format!("/v1/jobs?limit=2&cursor={cursor}")).await).await;
    assert_eq!(rest["jobs"][0]["id"], ids[0].as_str());
    assert!(rest["next_cursor"].is_null());

    let (_, queued) = json_of(app.get("/v1/jobs?status=queued").await).await;
    assert_eq!(queued["jobs"].as_array().unwrap().len(), 3);
    let (_, done) = json_of(app.get("/v1/jobs?status=succeeded").await).await;
    assert!(done["jobs"].as_array().unwrap().is_empty());
    let (status, body) = json_of(app.get("/v1/jobs?status=sleeping").await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "bad_request");
}

#[tokio::test]
async fn a_queued_job_is_canceled_at_once_and_a_second_cancel_is_a_409() {
    let app = spawn_app_configured(|settings| settings.workers = 0).await;
    let id = app.submit(&tiny_spec()).await;
    let (status, body) = json_of(
        app.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["status"], "canceled");
    // It never ran: no trial.
    let (status, listed) = json_of(app.get(&format!("/v1/jobs/{id}/trials")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["trials"], json!([]));
    assert_eq!(listed["status"], "canceled");
    let (status, body) = json_of(
        app.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_error(&body, "conflict");
}

#[tokio::test]
async fn a_running_job_stops_within_a_step_of_a_cancel() {
    let app = spawn_app_with(|_| {}, Arc::new(FaultyRunner)).await;
    let id = app.submit(&named("endless")).await;
    app.wait_for(&id, &["running"], Duration::from_secs(10))
        .await;
    let (status, _) = json_of(
        app.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let job = app
        .wait_for(
            &id,
            &["canceled", "failed", "succeeded"],
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(job["status"], "canceled", "{job}");
    let (status, _) = json_of(
        app.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_finished_job_cannot_be_canceled() {
    let app = spawn_app().await;
    let id = app.submit(&tiny_spec()).await;
    app.wait_until_finished(&id).await;
    let (status, body) = json_of(
        app.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_error(&body, "conflict");
}

#[tokio::test]
async fn a_panicking_job_fails_with_its_message_and_the_worker_goes_on() {
    let app = spawn_app_with(|_| {}, Arc::new(FaultyRunner)).await;
    let boom = app.submit(&named("boom")).await;
    let fine = app.submit(&tiny_spec()).await;
    let job = app.wait_until_finished(&boom).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "panic");
    assert!(job["error"]["message"]
        .as_str()
        .unwrap()
        .contains("injected failure in job boom"));
    assert_eq!(app.wait_until_finished(&fine).await["status"], "succeeded");
}

#[tokio::test]
async fn events_stream_progress_points_sweep_runs_and_the_final_status() {
    let (app, release) = spawn_gated_app().await;
    let id = app.submit(&tiny_spec()).await;
    let response = app.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    release.store(true, Ordering::SeqCst);
    let events = read_events(response, Duration::from_secs(30)).await;
    let names: BTreeSet<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    for expected in ["status", "progress", "point", "sweep_run", "trial"] {
        assert!(
            names.contains(expected),
            "no {expected} event in {events:?}"
        );
    }
    let points = events.iter().filter(|(name, _)| name == "point").count();
    assert_eq!(points, 30);
    // Each trial's last event says it succeeded (one that started and ended between two
    // reads of the store is sent once, ended).
    let mut last_status = Vec::new();
    for (_, trial) in events.iter().filter(|(name, _)| name == "trial") {
        let index = trial["index"].as_u64().unwrap() as usize;
        if last_status.len() <= index {
            last_status.resize(index + 1, String::new());
        }
        last_status[index] = trial["status"].as_str().unwrap().to_string();
    }
    assert_eq!(last_status, ["succeeded"; 3], "{events:?}");
    let (last_name, last) = events.last().unwrap();
    assert_eq!(last_name, "status");
    assert_eq!(last["status"], "succeeded");
}

#[tokio::test]
async fn a_finished_job_streams_its_final_status_and_the_stream_ends() {
    let app = spawn_app().await;
    let id = app.submit(&tiny_spec()).await;
    app.wait_until_finished(&id).await;
    let response = app.get(&format!("/v1/jobs/{id}/events")).await;
    let events = read_events(response, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "status");
    assert_eq!(events[0].1["status"], "succeeded");
}

#[tokio::test]
async fn shutdown_puts_a_job_still_running_after_the_grace_back_in_the_queue() {
    let mut app = spawn_app_with(
        |settings| settings.queue.grace = Duration::from_millis(300),
        Arc::new(FaultyRunner),
    )
    .await;
    let id = app.submit(&named("endless")).await;
    app.wait_for(&id, &["running"], Duration::from_secs(10))
        .await;
    let db = app.db_path.clone();
    app.stop().await.expect("a clean shutdown");
    let store = lrtune::store::Store::open(&db).await.unwrap();
    let job = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(job.status, lrtune::store::JobStatus::Queued);
    assert_eq!(job.attempts, 0);
}
