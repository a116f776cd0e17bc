use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn with_a_token_every_v1_request_needs_it_and_the_rest_stays_open() {
    let app = spawn_app_configured(|settings| settings.api.api_token = Some("s3cret".into())).await;
    let url = |path: &str| format!("{}{path}", app.address);
    let anonymous = app.client.get(url("/v1/jobs")).send().await.unwrap();
    let (status, body) = json_of(anonymous).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_error(&body, "unauthorized");
    let wrong = app
        .client
        .post(url("/v1/jobs"))
        .bearer_auth("guess")
        .json(&tiny_spec())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.get("/v1/jobs").await.status(), StatusCode::OK);
    for open in ["/healthz", "/metrics", "/openapi.json"] {
        let response = app.client.get(url(open)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{open}");
    }
}

#[tokio::test]
async fn without_a_token_v1_is_open() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(format!("{}/v1/jobs", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_json_body_above_the_limit_is_a_413() {
    let app = spawn_app_configured(|settings| settings.api.max_json_bytes = 256).await;
    let mut spec = tiny_spec();
    spec["name"] = json!("x".repeat(1000));
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(assert_error(&body, "payload_too_large")["message"]
        .as_str()
        .unwrap()
        .contains("256"));
}

/// Issue 29: serde_json keeps the last of two equal keys, so `{"kind": "compare", "kind":
/// "tune"}` ran a tune. Every JSON body is read by one parser, which refuses them.
#[tokio::test]
async fn a_key_given_twice_in_a_json_body_is_a_422_naming_it() {
    let app = spawn_app().await;
    for (path, body, field, key) in [
        (
            "/v1/jobs",
            r#"{"kind": "compare", "data": {"builtin": "spirals"}, "kind": "tune"}"#,
            "kind",
            "kind",
        ),
        (
            "/v1/jobs",
            r#"{"data": {"builtin": "spirals", "samples": 512, "samples": 600}}"#,
            "data.samples",
            "samples",
        ),
        (
            "/v1/jobs",
            r#"{"data": {"builtin": "mnist10k"}, "model": {"arch": "sequential", "layers": [
                {"type": "flatten"}, {"type": "linear", "out": 10, "out": 12}]}}"#,
            "model.layers[1].out",
            "out",
        ),
        (
            "/v1/schedules",
            r#"{"schedule": "one_cycle", "max_lr": 0.1, "max_lr": 1.0, "total_steps": 10}"#,
            "max_lr",
            "max_lr",
        ),
        (
            "/v1/analyze",
            r#"{"curve": [], "curve": []}"#,
            "curve",
            "curve",
        ),
    ] {
        let (status, error) = json_of(app.post_raw(path, body).await).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path} {body}: {error}"
        );
        let error = assert_error(&error, "duplicate_key");
        assert_eq!(error["field"], field, "{body}");
        assert_eq!(
            error["message"],
            format!("the key \"{key}\" is given twice in one object")
        );
    }
    let (_, jobs) = json_of(app.get("/v1/jobs").await).await;
    assert_eq!(jobs["jobs"], json!([]), "nothing was queued");
}

#[tokio::test]
async fn health_is_ok_and_metrics_count_jobs_and_requests() {
    let app = spawn_app().await;
    let (status, body) = json_of(app.get("/healthz").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    let id = app.submit(&tiny_spec()).await;
    app.wait_until_finished(&id).await;
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("lrtune_jobs{status=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(text.contains("lrtune_job_duration_seconds_count{status=\"succeeded\"} 1"));
    assert!(
        text.contains("lrtune_trials{status=\"succeeded\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("lrtune_trials{status=\"running\"} 0"),
        "{text}"
    );
    assert!(text.contains("lrtune_steps_total"));
    assert!(
        text.contains(
            "lrtune_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"202\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn the_openapi_document_lists_every_endpoint_and_swagger_ui_is_served() {
    let app = spawn_app().await;
    let (status, doc) = json_of(app.get("/openapi.json").await).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/curve",
        "/v1/jobs/{id}/events",
        "/v1/jobs/{id}/cancel",
        "/v1/datasets",
        "/v1/datasets/{id}",
        "/v1/weights",
        "/v1/weights/{id}",
        "/v1/analyze",
        "/v1/schedules",
        "/healthz",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    let docs = app.get("/docs/").await;
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger"));
}

#[tokio::test]
async fn the_openapi_document_gives_every_v1_operation_a_503_and_says_when_to_retry() {
    let app = spawn_app().await;
    let (_, doc) = json_of(app.get("/openapi.json").await).await;
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths.iter().filter(|(path, _)| path.starts_with("/v1/")) {
        for (method, operation) in item.as_object().unwrap() {
            let unavailable = &operation["responses"]["503"];
            assert_eq!(
                unavailable["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{method} {path}"
            );
            assert_eq!(
                unavailable["headers"]["Retry-After"]["schema"]["type"], "integer",
                "{method} {path}"
            );
            operations += 1;
        }
    }
    assert!(operations >= 10, "{operations} operations under /v1");
    let queue_full = &doc["paths"]["/v1/jobs"]["post"]["responses"]["429"];
    assert!(
        queue_full["headers"]["Retry-After"].is_object(),
        "{queue_full}"
    );
    let health = &doc["paths"]["/healthz"]["get"]["responses"];
    assert_eq!(
        health["503"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Health"
    );
}

#[tokio::test]
async fn analyze_reads_a_curve_and_names_a_bad_field() {
    let app = spawn_app().await;
    let lr: Vec<f64> = (0..50).map(|i| 1e-5 * 1.3f64.powi(i)).collect();
    let loss: Vec<f64> = (0..50)
        .map(|i| {
            let x = i as f64 / 49.0;
            2.0 - 1.5 * (x * 3.0).min(1.0) + if x > 0.8 { 20.0 * (x - 0.8) } else { 0.0 }
        })
        .collect();
    let (status, body) = json_of(
        app.post_json("/v1/analyze", &json!({"lr": lr, "loss": loss}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["suggestions"]["valley"].as_f64().is_some(), "{body}");
    let (status, body) = json_of(
        app.post_json("/v1/analyze", &json!({"lr": lr, "loss": [1.0]}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(assert_error(&body, "invalid_spec")["field"], "loss");
    let (status, body) = json_of(
        app.post_json("/v1/analyze", &json!({"lr": "x", "loss": []}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(assert_error(&body, "invalid_input")["field"], "lr");
}

#[tokio::test]
async fn schedules_give_one_value_per_step_and_name_a_bad_parameter() {
    let app = spawn_app().await;
    let (status, body) = json_of(
        app.post_json(
            "/v1/schedules",
            &json!({"kind": "one_cycle", "max_lr": 0.01, "total_steps": 100}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["lr"].as_array().unwrap().len(), 100);
    assert_eq!(body["momentum"].as_array().unwrap().len(), 100);
    let (status, body) = json_of(
        app.post_json(
            "/v1/schedules",
            &json!({"kind": "one_cycle", "max_lr": 0.01, "total_steps": 100, "pct_start": 2.0}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(assert_error(&body, "invalid_input")["field"], "pct_start");
    let (status, body) = json_of(
        app.post_json(
            "/v1/schedules",
            &json!({"kind": "one_cycle", "max_lr": 0.01, "total_steps": 100, "bogus": 1}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_error(&body, "invalid_input");
    let (status, body) = json_of(
        app.post_json(
            "/v1/schedules",
            &json!({"kind": "one_cycle", "max_lr": 0.01, "total_steps": 1_000_000}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
}

#[tokio::test]
async fn reduce_on_plateau_cosine_and_step_schedules_are_served_with_pytorchs_numbers() {
    let app = spawn_app().await;
    // Patience 1, factor 0.5: the second step without a new best (the fourth metric) halves it.
    let (status, body) = json_of(
        app.post_json(
            "/v1/schedules",
            &json!({"kind": "reduce_on_plateau", "lr": 0.1, "mode": "min", "factor": 0.5,
                    "patience": 1, "metrics": [1.0, 0.8, 0.9, 0.85, 0.7]}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["lr"], json!([0.1, 0.1, 0.1, 0.05, 0.05]));
    let (status, body) = json_of(
        app.post_json(
            "/v1/schedules",
            &json!({"kind": "reduce_on_plateau", "lr": 0.1, "factor": 2.0, "metrics": [1.0]}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(assert_error(&body, "invalid_input")["field"], "factor");
    let (status, body) = json_of(
        app.post_json(
            "/v1/schedules",
            &json!({"kind": "reduce_on_plateau", "lr": 0.1, "metrics": [1.0, "x"]}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // serde buffers a tagged enum's content, so a type error inside it carries no path (as for
    // every kind); the message still says what was wrong.
    let message = assert_error(&body, "invalid_input")["message"].to_string();
    assert!(message.contains("expected f64"), "{message}");

    let (status, body) = json_of(
        app.post_json(
            "/v1/schedules",
            &json!({"kind": "step", "lr": 0.1, "step_size": 2, "gamma": 0.5, "steps": 5}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["lr"], json!([0.1, 0.1, 0.05, 0.05, 0.025]));
    assert!(body["momentum"].is_null());
    let (status, body) = json_of(
        app.post_json(
            "/v1/schedules",
            &json!({"kind": "cosine", "lr": 0.1, "T_max": 2, "steps": 3}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let lr: Vec<f64> = serde_json::from_value(body["lr"].clone()).unwrap();
    assert_eq!(lr.len(), 3);
    assert_eq!(lr[0], 0.1);
    assert!(
        (lr[1] - 0.05).abs() < 1e-15 && lr[2].abs() < 1e-15,
        "{lr:?}"
    );
    let (status, body) = json_of(
        app.post_json(
            "/v1/schedules",
            &json!({"kind": "cosine", "lr": 0.1, "T_max": 0, "steps": 3}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(assert_error(&body, "invalid_input")["field"], "T_max");
}

#[tokio::test]
async fn an_unknown_v1_route_is_a_404_in_the_error_shape() {
    let app = spawn_app().await;
    let (status, body) = json_of(app.get("/v1/nothing").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found");
}

#[tokio::test]
async fn the_openapi_document_describes_deletes_and_every_refusal_of_an_upload() {
    let app = spawn_app().await;
    let (_, doc) = json_of(app.get("/openapi.json").await).await;
    for path in ["/v1/datasets/{id}", "/v1/weights/{id}"] {
        let responses = doc["paths"][path]["delete"]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("no DELETE {path}"));
        for status in ["204", "404", "409", "503"] {
            assert!(responses.contains_key(status), "DELETE {path}: no {status}");
        }
    }
    for path in ["/v1/datasets", "/v1/weights"] {
        let responses = &doc["paths"][path]["post"]["responses"];
        for status in ["201", "408", "413", "422", "503", "507"] {
            assert!(responses[status].is_object(), "POST {path}: no {status}");
        }
        assert!(
            responses["503"]["headers"]["Retry-After"].is_object(),
            "POST {path}: {}",
            responses["503"]
        );
        assert_eq!(
            responses["507"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody"
        );
    }
    assert!(doc["paths"]["/metrics"]["get"]["responses"]["401"].is_object());
}
