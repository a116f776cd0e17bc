use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

/// The `state_dict()` of PyTorch's residual MLP golden network: 6 inputs, 3 classes.
fn golden_weights() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/sequential/residual_mlp.safetensors"
    );
    std::fs::read(path).expect("the golden weights")
}

/// PyTorch's `residual_mlp` golden case (tests/golden/sequential.json): its layer list,
/// reference rows and eval-mode loss.
fn golden_case() -> Value {
    let golden: Value =
        serde_json::from_str(include_str!("../golden/sequential.json")).expect("golden parses");
    golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|case| case["name"] == "residual_mlp")
        .unwrap()
        .clone()
}

/// The case's 10 reference rows as a validation CSV, and training rows of every class (so
/// that the classes keep their indices), both with six features.
fn golden_csvs(case: &Value) -> (String, String) {
    let header = "a,b,c,d,e,f,label\n";
    let row = |values: &[f64], label: u64| {
        let cells: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
        format!("{},{label}\n", cells.join(","))
    };
    let x: Vec<f64> = case["x"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut validation = String::from(header);
    for (values, label) in x.chunks(6).zip(case["y"].as_array().unwrap()) {
        validation.push_str(&row(values, label.as_u64().unwrap()));
    }
    let mut train = String::from(header);
    for index in 0..60u64 {
        let values: Vec<f64> = (0..6u64)
            .map(|f| ((index * 7 + f * 3) % 11) as f64 / 5.0 - 1.0)
            .collect();
        train.push_str(&row(&values, index % 3));
    }
    (train, validation)
}

#[tokio::test]
async fn uploaded_pytorch_weights_are_described_and_a_job_starts_from_them() {
    let app = spawn_app().await;
    let file = golden_weights();
    let (status, weights) = json_of(
        app.post_raw("/v1/weights?name=residual", file.clone())
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{weights}");
    assert_eq!(weights["name"], "residual");
    assert_eq!(weights["bytes"], file.len());
    assert_eq!(weights["sha256"].as_str().unwrap().len(), 64);
    let shapes = weights["shapes"].as_array().unwrap();
    assert_eq!(weights["tensors"], shapes.len());
    let names: Vec<&str> = shapes.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"1.0.weight"), "{names:?}");
    assert!(names.windows(2).all(|pair| pair[0] < pair[1]), "{names:?}");
    let first = shapes.iter().find(|t| t["name"] == "0.weight").unwrap();
    assert_eq!(first["shape"], json!([8, 6]));
    let id = weights["id"].as_str().unwrap();
    assert!(id.starts_with("weights_"), "{id}");

    let (status, shown) = json_of(app.get(&format!("/v1/weights/{id}")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown, weights);
    let (status, list) = json_of(app.get("/v1/weights?limit=5").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["weights"][0]["id"], id);
    assert!(list["next_cursor"].is_null());

    let case = golden_case();
    let (train, validation) = golden_csvs(&case);
    let mut dataset_ids = Vec::new();
    for csv in [train, validation] {
        let (status, dataset) = json_of(
            app.post_raw("/v1/datasets?format=csv&target=label", csv)
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{dataset}");
        dataset_ids.push(dataset["id"].clone());
    }
    let spec = json!({
        "kind": "range_test",
        "data": {"dataset_id": dataset_ids[0], "validation_dataset_id": dataset_ids[1]},
        "normalize": "none",
        "model": {"arch": "sequential", "layers": case["layers"]},
        "init": {"weights": {"id": id}},
        "batch_size": 10,
        "range_test": {"steps": 20}
    });
    let job = app.submit(&spec).await;
    let job = app.wait_until_finished(&job).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // The job starts where PyTorch's network is on the reference rows.
    let initial = job["result"]["initial_val_loss"].as_f64().unwrap();
    let want = case["eval_loss"].as_f64().unwrap();
    assert!(
        (initial - want).abs() <= 1e-4 * want,
        "initial_val_loss {initial} vs PyTorch's {want}"
    );

    // The stored shapes are checked at submit: a narrower network cannot take them.
    let mut narrower = spec.clone();
    narrower["model"]["layers"][0]["out"] = json!(4);
    narrower["model"]["layers"][1]["layers"][1]["out"] = json!(4);
    narrower["model"]["layers"][3]["layers"][0]["out"] = json!(4);
    let (status, body) = json_of(app.post_json("/v1/jobs", &narrower).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let error = assert_error(&body, "invalid_spec");
    assert_eq!(error["field"], "init.weights", "{body}");
    assert_eq!(
        error["message"],
        "tensor \"0.weight\" has shape [8, 6], but the model's is [4, 6]"
    );
}

/// A safetensors file written out by hand: the header's length, the header, the data.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

/// f32 tensors in order, named and shaped, with `values` for all of them back to back.
fn f32_file(tensors: &[(&str, &[u64])], values: &[f32]) -> Vec<u8> {
    let mut offset = 0;
    let entries: Vec<String> = tensors
        .iter()
        .map(|(name, shape)| {
            let bytes = 4 * shape.iter().product::<u64>();
            let entry = format!(
                r#""{name}": {{"dtype": "F32", "shape": {shape:?}, "data_offsets": [{offset}, {}]}}"#,
                offset + bytes
            );
            offset += bytes;
            entry
        })
        .collect();
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    safetensors(&format!("{{{}}}", entries.join(", ")), &data)
}

/// Issue 29: weights that did not fit the layer list were accepted (202) and failed in the
/// worker, although their shapes were stored at upload. Each is a 422 at submit naming the
/// tensor, and nothing is queued.
#[tokio::test]
async fn weights_that_do_not_fit_the_layer_list_are_refused_at_submit_naming_the_tensor() {
    let app = spawn_app().await;
    // spirals: 2 features, 3 classes.
    let mut spec = tiny_spec();
    spec["model"] = json!({"arch": "sequential", "layers": [
        {"type": "linear", "out": 4}, {"type": "relu"}, {"type": "linear", "out": 3}]});
    let fits: [(&str, &[u64]); 4] = [
        ("0.weight", &[4, 2]),
        ("0.bias", &[4]),
        ("2.weight", &[3, 4]),
        ("2.bias", &[3]),
    ];
    let upload = |tensors: Vec<(&'static str, &'static [u64])>| {
        let values = vec![
            0.25f32;
            tensors
                .iter()
                .map(|(_, s)| s.iter().product::<u64>())
                .sum::<u64>() as usize
        ];
        let file = f32_file(&tensors, &values);
        let app = &app;
        async move {
            let (status, weights) = json_of(app.post_raw("/v1/weights", file).await).await;
            assert_eq!(status, StatusCode::CREATED, "{weights}");
            weights["id"].as_str().unwrap().to_string()
        }
    };
    let mut misshaped = fits.to_vec();
    misshaped[2] = ("2.weight", &[3, 5]);
    let mut extra = fits.to_vec();
    extra.push(("4.weight", &[7]));
    for (tensors, message) in [
        (
            misshaped,
            "tensor \"2.weight\" has shape [3, 5], but the model's is [3, 4]",
        ),
        (
            fits[..3].to_vec(),
            "the weights have no tensor \"2.bias\" (shape [3]); they must be the state_dict() \
             of the equivalent torch.nn.Sequential",
        ),
        (
            extra,
            "the weights have 1 tensor(s) the model does not, first \"4.weight\" (shape [7]): \
             is the layer list the same as the PyTorch model's?",
        ),
    ] {
        spec["init"] = json!({"weights": {"id": upload(tensors).await}});
        let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let error = assert_error(&body, "invalid_spec");
        assert_eq!(error["field"], "init.weights");
        assert_eq!(error["message"], message);
    }
    let (_, jobs) = json_of(app.get("/v1/jobs").await).await;
    assert_eq!(jobs["jobs"], json!([]), "nothing was queued");

    spec["init"] = json!({"weights": {"id": upload(fits.to_vec()).await}});
    let job = app.submit(&spec).await;
    let job = app.wait_until_finished(&job).await;
    assert_eq!(job["status"], "succeeded", "{job}");
}

/// Issue 29: NaN weights failed later as "the range test gave no suggestion", a tensor named
/// twice kept one of them silently, and a dimension of 2^64 - 1 was shown as -1.
#[tokio::test]
async fn weights_with_non_finite_values_or_a_tensor_named_twice_are_refused_at_upload() {
    let app = spawn_app().await;
    let nan = f32_file(
        &[("0.bias", &[2]), ("0.weight", &[2, 3])],
        &[0.0, 1.0, 0.5, 0.5, 0.5, 0.5, f32::NAN, 0.5],
    );
    let twice = safetensors(
        r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#,
        &1f32.to_le_bytes(),
    );
    for (file, message) in [
        (
            nan,
            "tensor \"0.weight\" holds NaN at [1, 1]: weights must be finite 32-bit floats",
        ),
        (twice, "the safetensors header names tensor \"w\" twice"),
    ] {
        let (status, body) = json_of(app.post_raw("/v1/weights", file).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let error = assert_error(&body, "invalid_data");
        assert_eq!(error["field"], "body");
        assert_eq!(error["message"], message);
    }
    let (_, list) = json_of(app.get("/v1/weights").await).await;
    assert_eq!(list["weights"], json!([]));

    let empty = safetensors(
        r#"{"w": {"dtype": "F32", "shape": [0, 18446744073709551615], "data_offsets": [0, 0]}}"#,
        &[],
    );
    let (status, weights) = json_of(app.post_raw("/v1/weights", empty).await).await;
    assert_eq!(status, StatusCode::CREATED, "{weights}");
    let want = json!([{"name": "w", "shape": [0, 18446744073709551615u64]}]);
    assert_eq!(weights["shapes"], want);
    let id = weights["id"].as_str().unwrap();
    let (_, shown) = json_of(app.get(&format!("/v1/weights/{id}")).await).await;
    assert_eq!(shown["shapes"], want, "as read back from the store");
}

#[tokio::test]
async fn a_body_that_is_not_safetensors_is_a_422_naming_the_body() {
    let app = spawn_app().await;
    for body in [&b"not a safetensors file"[..], &[0xff; 16][..], &b""[..]] {
        let (status, error) = json_of(app.post_raw("/v1/weights", body.to_vec()).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
        assert_eq!(error["error"]["field"], "body", "{error}");
    }
    let (_, list) = json_of(app.get("/v1/weights").await).await;
    assert_eq!(list["weights"], json!([]));
}

#[tokio::test]
async fn unknown_weights_are_a_404_and_a_job_naming_them_is_a_422() {
    let app = spawn_app().await;
    let (status, body) = json_of(app.get("/v1/weights/weights_missing").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found");

    let mut spec = tiny_spec();
    spec["model"] = json!({"arch": "sequential", "layers": [
        {"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear", "out": 2}]});
    spec["init"] = json!({"weights": {"id": "weights_missing"}});
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "invalid_input");
    assert_eq!(error["field"], "init.weights.id");

    spec["init"] = json!({"weights": {"id": "weights_missing", "path": "w.safetensors"}});
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(assert_error(&body, "invalid_spec")["field"], "init.weights");
}

#[tokio::test]
async fn weights_a_queued_or_running_job_starts_from_cannot_be_deleted_until_it_ends() {
    let (app, release) = spawn_gated_app().await;
    let (status, weights) = json_of(app.post_raw("/v1/weights", golden_weights()).await).await;
    assert_eq!(status, StatusCode::CREATED, "{weights}");
    let id = weights["id"].as_str().unwrap();
    let case = golden_case();
    let (train, _) = golden_csvs(&case);
    let (status, dataset) = json_of(
        app.post_raw("/v1/datasets?format=csv&target=label", train)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{dataset}");
    let spec = json!({
        "kind": "range_test",
        "data": {"dataset_id": dataset["id"]},
        "normalize": "none",
        "model": {"arch": "sequential", "layers": case["layers"]},
        "init": {"weights": {"id": id}},
        "batch_size": 10,
        "range_test": {"steps": 20}
    });
    let job = app.submit(&spec).await;
    let delete = || async {
        let response = app
            .client
            .delete(format!("{}/v1/weights/{id}", app.address))
            .send()
            .await
            .unwrap();
        json_of(response).await
    };
    let (status, refused) = delete().await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(
        assert_error(&refused, "conflict")["message"],
        format!(
            "weights {id} is used by queued or running jobs ({job}): cancel them or wait until \
             they end"
        )
    );
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    let finished = app.wait_until_finished(&job).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let (status, body) = delete().await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = json_of(app.get(&format!("/v1/weights/{id}")).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = delete().await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        assert_error(&body, "not_found")["message"],
        format!("weights \"{id}\" not found")
    );
}
