//! Admission: a job is refused at submit, naming the field, when it cannot run on its data or
//! costs more than the limits allow; the worker checks again before it loads or builds
//! anything, and a job refused there fails with the reason instead of being retried.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use lrtune::engine::spec::JobKind;
use lrtune::store::{NewJob, Store};

/// Submits a spec and returns the 422's field and message.
async fn refused(app: &TestApp, spec: Value) -> (String, String) {
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{spec}: {body}");
    let error = assert_error(&body, "invalid_spec");
    (
        error["field"].as_str().unwrap().to_string(),
        error["message"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn models_too_large_to_build_are_refused_at_submit_before_anything_is_allocated() {
    let app = spawn_app().await;
    let cases = [
        (
            json!({"arch": "mlp", "hidden": [1000000, 1000000]}),
            "spirals",
        ),
        (json!({"arch": "mlp", "hidden": [20000, 20000]}), "spirals"),
        (json!({"arch": "cnn", "channels": [100000]}), "mnist10k"),
    ];
    for (model, builtin) in cases {
        let spec = json!({"data": {"builtin": builtin}, "model": model});
        let (field, message) = refused(&app, spec).await;
        assert_eq!(field, "model", "{message}");
        assert!(
            message.contains("above the limit of 20000000 (max_parameters)"),
            "{message}"
        );
    }
    let (status, body) = json_of(app.get("/v1/jobs").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["jobs"], json!([]), "nothing was queued");
}

/// Issue 29: these layer lists planned as tiny models because `side + 2 * padding` and
/// `out_h * out_w` wrapped at 64 bits, so each was accepted (202) and hung a worker forever,
/// on both backends. Each is a 422 naming the layer and its field.
#[tokio::test]
async fn layer_sizes_that_overflow_64_bits_are_refused_at_submit_naming_the_field() {
    let app = spawn_app().await;
    let conv = |padding: u64| json!({"type": "conv2d", "out": 1, "kernel": 1, "padding": padding});
    let wrapped = "conv2d's output size overflows: padding 4611686018427387904 makes its output \
                   [1, 9223372036854775836, 9223372036854775836], more values than a 64-bit size \
                   holds";
    let past = "conv2d's output size overflows: padding 9223372036854775808 on both sides of its \
                input [1, 28, 28] is more than a 64-bit size holds";
    let pool = json!({"type": "adaptive_avg_pool2d"});
    for backend in ["native", "candle"] {
        for (first, message) in [
            (vec![conv(1 << 62)], wrapped),
            (vec![conv(1 << 62), pool.clone()], wrapped),
            (vec![conv(1 << 63)], past),
        ] {
            let mut layers = first;
            layers.extend([
                json!({"type": "flatten"}),
                json!({"type": "linear", "out": 10}),
            ]);
            let spec = json!({
                "data": {"builtin": "mnist10k"},
                "backend": backend,
                "model": {"arch": "sequential", "layers": layers}
            });
            let (field, got) = refused(&app, spec).await;
            assert_eq!(field, "model.layers[0].padding", "{backend}: {got}");
            assert_eq!(got, message, "{backend}");
        }
    }
    // A preset has no layer list to name: its overflow names the model.
    let spec = json!({
        "data": {"builtin": "spirals"},
        "model": {"arch": "mlp", "hidden": [9223372036854775808u64]}
    });
    let (field, message) = refused(&app, spec).await;
    assert_eq!(field, "model");
    assert_eq!(
        message,
        "linear's parameter count overflows: its weight of 9223372036854775808 x 2 and bias of \
         9223372036854775808, more than a 64-bit count holds"
    );
    let (status, body) = json_of(app.get("/v1/jobs").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["jobs"], json!([]), "nothing was queued");
}

#[tokio::test]
async fn a_job_above_the_memory_limit_is_refused_naming_what_dominates_it() {
    let app = spawn_app_configured(|settings| settings.limits.max_job_memory = 256 << 20).await;
    // A few thousand parameters, but 28x28x2000 activations and im2col patches per image.
    let spec = json!({
        "data": {"builtin": "mnist10k"},
        "model": {"arch": "cnn", "channels": [2000], "hidden": 1}
    });
    let (field, message) = refused(&app, spec).await;
    assert_eq!(field, "batch_size");
    assert!(
        message.contains("above the limit of 256.0 MiB (max_job_memory)"),
        "{message}"
    );
    // The default MNIST MLP fits easily.
    let (status, body) = json_of(
        app.post_json("/v1/jobs", &json!({"data": {"builtin": "mnist10k"}}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test]
async fn specs_that_cannot_run_on_a_builtin_are_refused_at_submit() {
    let app = spawn_app().await;
    let cases = [
        (
            json!({"data": {"builtin": "mnist10k"}, "batch_size": 1000000000000u64}),
            "batch_size",
            "1000000000000 is more than the 8000 training rows: use at most 8000",
        ),
        (
            json!({"data": {"builtin": "blobs"}, "model": {"arch": "cnn"}}),
            "model.arch",
            "a cnn needs image data (channels x height x width), but each sample here has shape [16]: use \"mlp\" or \"linear\"",
        ),
        (
            json!({"data": {"builtin": "mnist10k"}, "model": {"arch": "transformer"}}),
            "model.arch",
            "a transformer is a character language model: give it text data (an uploaded text dataset or a .txt path)",
        ),
        (
            json!({"data": {"builtin": "sine"}, "task": "classification"}),
            "task",
            "the data is a regression task, not classification: use \"auto\"",
        ),
        (
            json!({"data": {"builtin": "mnist10k"}, "model": {"arch": "cnn", "channels": [8, 8, 8, 8, 8, 8]}}),
            "model.channels[4]",
            "too many convolutions for 28x28 images: each halves the size; use at most 4",
        ),
    ];
    for (spec, field, message) in cases {
        assert_eq!(
            refused(&app, spec).await,
            (field.to_string(), message.to_string())
        );
    }
    if !cfg!(feature = "cuda") {
        let spec = json!({"data": {"builtin": "spirals"}, "device": "cuda"});
        assert_eq!(refused(&app, spec).await.0, "device");
    }
    let spec = json!({"data": {"builtin": "spirals"}, "name": "x".repeat(201)});
    assert_eq!(
        refused(&app, spec).await,
        (
            "name".to_string(),
            "must be at most 200 characters, got 201".to_string()
        )
    );
}

#[tokio::test]
async fn specs_that_cannot_run_on_an_uploaded_dataset_are_refused_at_submit() {
    let app = spawn_app().await;
    let mut csv = String::from("a,b,y\n");
    for row in 0..50 {
        csv.push_str(&format!("{row},{},{}\n", row % 7, row % 2));
    }
    let (status, dataset) = json_of(
        app.post_raw("/v1/datasets?format=csv&task=classification", csv)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{dataset}");
    let id = dataset["id"].as_str().unwrap();
    let on = |extra: Value| {
        let mut spec = json!({"data": {"dataset_id": id}});
        for (key, value) in extra.as_object().unwrap() {
            spec[key] = value.clone();
        }
        spec
    };
    // 50 rows, 10 of them for validation.
    let (field, message) = refused(&app, on(json!({"batch_size": 41}))).await;
    assert_eq!(
        (field.as_str(), message.as_str()),
        (
            "batch_size",
            "41 is more than the 40 training rows: use at most 40"
        )
    );
    let (field, _) = refused(&app, on(json!({"model": {"arch": "cnn"}, "batch_size": 8}))).await;
    assert_eq!(field, "model.arch");
    let (field, message) = refused(&app, on(json!({"task": "regression", "batch_size": 8}))).await;
    assert_eq!(field, "task");
    assert!(
        message.starts_with("the data is a classification task"),
        "{message}"
    );

    let (status, corpus) = json_of(
        app.post_raw("/v1/datasets?format=text", "short corpus".to_string())
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{corpus}");
    let spec = json!({
        "data": {"dataset_id": corpus["id"]},
        "model": {"arch": "transformer", "context": 64}
    });
    let (field, message) = refused(&app, spec).await;
    assert_eq!(field, "data.dataset_id");
    assert!(
        message.ends_with("text: 12 characters make 0 windows; a context of 64 needs at least 129 characters for 2"),
        "{message}"
    );
}

#[tokio::test]
async fn a_job_the_worker_refuses_fails_with_the_reason_and_is_not_retried() {
    let app = spawn_app_configured(|settings| settings.limits.max_parameters = 50).await;
    // Written straight to the store, as another process with other limits could have.
    let spec = tiny_spec();
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let mut canonical = lrtune::engine::JobSpec::from_value(spec).unwrap();
    canonical.name = Some("written elsewhere".into());
    let store = Store::open(&app.db_path).await.unwrap();
    let row = store
        .insert_job(
            NewJob {
                id: "job_admission".into(),
                kind: JobKind::Tune,
                name: canonical.name.clone(),
                spec: serde_json::to_string(&canonical).unwrap(),
            },
            100,
        )
        .await
        .unwrap()
        .expect("queued");
    let job = app.wait_until_finished(&row.id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    assert_eq!(job["error"]["code"], "invalid_spec");
    assert_eq!(job["error"]["field"], "model");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("parameters is above the limit of 50 (max_parameters)"),
        "{message}"
    );
    assert_eq!(job["progress"]["stage"], Value::Null, "nothing ran");
}

#[tokio::test]
async fn a_job_queued_before_a_limit_was_lowered_runs_without_its_spec_being_checked_again() {
    // The spec's checks ran at submit; the worker reads the stored spec back without running
    // them again, so a limit lowered since (30 range-test steps above 25) does not fail it.
    let app = spawn_app_configured(|settings| settings.limits.max_range_steps = 25).await;
    let spec = tiny_spec();
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "range_test.steps");
    let queued = lrtune::engine::ValidSpec::from_value(spec, &Default::default()).unwrap();
    let store = Store::open(&app.db_path).await.unwrap();
    let row = store
        .insert_job(
            NewJob {
                id: "job_before_the_limit".into(),
                kind: queued.kind,
                name: None,
                spec: serde_json::to_string(&queued).unwrap(),
            },
            100,
        )
        .await
        .unwrap()
        .expect("queued");
    let job = app.wait_until_finished(&row.id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["spec"]["range_test"]["steps"], 30, "{job}");
}
