use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

fn blobs_csv(rows: usize) -> String {
    let mut text = String::from("x1,x2,label\n");
    for row in 0..rows {
        let class = row % 2;
        let offset = if class == 0 { -2.0 } else { 2.0 };
        let jitter = (row as f64 * 0.37).sin();
        text.push_str(&format!(
            "{},{},{class}\n",
            offset + jitter,
            offset - jitter
        ));
    }
    text
}

#[tokio::test]
async fn a_csv_upload_is_described_and_a_job_runs_on_it() {
    let app = spawn_app().await;
    let response = app
        .post_raw(
            "/v1/datasets?format=csv&name=blobs&target=label",
            blobs_csv(300),
        )
        .await;
    let (status, dataset) = json_of(response).await;
    assert_eq!(status, StatusCode::CREATED, "{dataset}");
    assert_eq!(dataset["rows"], 300);
    assert_eq!(dataset["features"], 2);
    assert_eq!(dataset["classes"], 2);
    assert_eq!(dataset["task"], "classification");
    assert_eq!(dataset["name"], "blobs");
    let id = dataset["id"].as_str().unwrap();

    let (status, shown) = json_of(app.get(&format!("/v1/datasets/{id}")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["sha256"], dataset["sha256"]);
    let (_, list) = json_of(app.get("/v1/datasets").await).await;
    assert_eq!(list["datasets"][0]["id"], id);

    let mut spec = tiny_spec();
    spec["data"] = json!({"dataset_id": id});
    let job = app.submit(&spec).await;
    let job = app.wait_until_finished(&job).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["data"]["features"], 2);
}

#[tokio::test]
async fn a_csv_with_a_non_number_is_refused_naming_row_and_column() {
    let app = spawn_app().await;
    let body = "x1,x2,label\n1,2,0\n3,abc,1\n";
    let (status, body) = json_of(app.post_raw("/v1/datasets?format=csv", body).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "invalid_data");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("row 3") && message.contains("x2"),
        "{message}"
    );
    assert_eq!(error["field"], "x2");
}

#[tokio::test]
async fn a_ragged_csv_row_is_refused_naming_the_row() {
    let app = spawn_app().await;
    let body = "x1,x2,label\n1,2,0\n3,1\n";
    let (status, body) = json_of(app.post_raw("/v1/datasets?format=csv", body).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "invalid_data");
    assert!(
        error["message"].as_str().unwrap().contains("row 3"),
        "{body}"
    );
}

#[tokio::test]
async fn a_dataset_above_the_row_limit_is_a_422_naming_the_limit() {
    let app = spawn_app_configured(|settings| settings.api.max_dataset_rows = 100).await;
    let (status, body) = json_of(
        app.post_raw("/v1/datasets?format=csv", blobs_csv(150))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "limit_exceeded");
    assert!(error["message"].as_str().unwrap().contains("100"), "{body}");
}

/// Columns named c0, c1, ...; every cell 0.5 but the last, which alternates 0 and 1.
fn wide_csv(columns: usize, rows: usize) -> String {
    let names: Vec<String> = (0..columns).map(|column| format!("c{column}")).collect();
    let mut text = names.join(",");
    text.push('\n');
    for row in 0..rows {
        text.push_str(&"0.5,".repeat(columns - 1));
        text.push_str(if row % 2 == 0 { "0\n" } else { "1\n" });
    }
    text
}

#[tokio::test]
async fn a_csv_with_100000_columns_is_accepted_at_the_default_column_limit() {
    let app = spawn_app().await;
    let (status, dataset) = json_of(
        app.post_raw("/v1/datasets?format=csv", wide_csv(100_000, 4))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{dataset}");
    assert_eq!(dataset["features"], 99_999);
    assert_eq!(dataset["rows"], 4);
}

#[tokio::test]
async fn a_csv_above_the_column_limit_is_a_422_naming_the_limit_before_its_rows_are_read() {
    let app = spawn_app_configured(|settings| settings.api.max_dataset_columns = 1000).await;
    // The rows are not numbers: refusing by the limit shows they were never parsed.
    let mut body = wide_csv(1001, 0);
    body.push_str(&"abc,".repeat(1001));
    body.push('\n');
    let (status, body) = json_of(app.post_raw("/v1/datasets?format=csv", body).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "limit_exceeded");
    assert_eq!(
        error["message"],
        "1001 columns is above the limit of 1000 (max_dataset_columns)"
    );
    assert_eq!(error["field"], "columns");
}

#[tokio::test]
async fn a_duplicate_column_name_in_a_wide_header_is_refused_by_name() {
    let app = spawn_app().await;
    let body = wide_csv(100_000, 4).replacen("c99998,", "c5,", 1);
    let (status, body) = json_of(app.post_raw("/v1/datasets?format=csv", body).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = assert_error(&body, "invalid_data");
    assert_eq!(
        error["message"],
        "csv: the header names column \"c5\" twice"
    );
    assert_eq!(error["field"], "csv");
}

#[tokio::test]
async fn an_upload_above_the_byte_limit_is_a_413() {
    let app = spawn_app_configured(|settings| settings.api.max_upload_bytes = 1000).await;
    let (status, body) = json_of(
        app.post_raw("/v1/datasets?format=csv", blobs_csv(200))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&body, "payload_too_large");
}

#[tokio::test]
async fn an_upload_without_a_format_is_a_400() {
    let app = spawn_app().await;
    let (status, body) = json_of(app.post_raw("/v1/datasets", "a,b\n1,2\n").await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "bad_request");
}

#[tokio::test]
async fn idx_images_and_labels_upload_as_multipart_parts() {
    let app = spawn_app().await;
    let root = env!("CARGO_MANIFEST_DIR");
    let images = std::fs::read(format!("{root}/data/mnist10k-images-idx3-ubyte.gz")).unwrap();
    let labels = std::fs::read(format!("{root}/data/mnist10k-labels-idx1-ubyte.gz")).unwrap();
    let form = Form::new()
        .part("x", Part::bytes(images))
        .part("y", Part::bytes(labels));
    let (status, dataset) =
        json_of(app.post_multipart("/v1/datasets?format=idx", form).await).await;
    assert_eq!(status, StatusCode::CREATED, "{dataset}");
    assert_eq!(dataset["rows"], 10_000);
    assert_eq!(dataset["classes"], 10);
    assert_eq!(dataset["features"], 784);
}

#[tokio::test]
async fn a_multipart_upload_missing_its_y_part_is_a_400() {
    let app = spawn_app().await;
    let form = Form::new().part("x", Part::bytes(vec![0u8; 16]));
    let (status, body) = json_of(app.post_multipart("/v1/datasets?format=npy", form).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(assert_error(&body, "bad_request")["message"]
        .as_str()
        .unwrap()
        .contains('y'));
}

#[tokio::test]
async fn a_text_corpus_is_described_and_needs_a_transformer() {
    let app = spawn_app().await;
    let corpus = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    let (status, dataset) = json_of(
        app.post_raw("/v1/datasets?format=text", corpus.clone())
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{dataset}");
    assert_eq!(dataset["task"], "language_model");
    assert_eq!(dataset["rows"], corpus.chars().count());
    assert_eq!(dataset["vocabulary"], 28);
    let mut spec = tiny_spec();
    spec["data"] = json!({"dataset_id": dataset["id"]});
    let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(assert_error(&body, "invalid_input")["field"], "model.arch");
}

#[tokio::test]
async fn an_unknown_dataset_is_a_404() {
    let app = spawn_app().await;
    let (status, body) = json_of(app.get("/v1/datasets/ds_missing").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found");
}
