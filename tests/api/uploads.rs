//! Uploads cannot exhaust the server: a cap on uploads read at once (503 before the body is
//! read), a quota on the bytes stored (507), deletes that make room, names and error
//! messages of bounded size, and a body that stops arriving answered 408.

use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_LENGTH, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::helpers::*;
use crate::support::process::Lrtune;

/// A regression CSV of `rows` rows, every row the same width.
fn csv(rows: usize) -> String {
    let mut text = String::from("x1,x2,y\n");
    for row in 0..rows {
        text.push_str(&format!(
            "{:04},{:04},{:04}\n",
            row,
            row * 2 % 10000,
            row % 7
        ));
    }
    text
}

/// A body sent piece by piece, as the test sends the pieces.
fn streamed() -> (mpsc::Sender<std::io::Result<Vec<u8>>>, reqwest::Body) {
    let (sender, receiver) = mpsc::channel(4);
    (
        sender,
        reqwest::Body::wrap_stream(ReceiverStream::new(receiver)),
    )
}

#[tokio::test]
async fn an_upload_beyond_the_concurrent_limit_gets_503_with_retry_after_before_its_body_is_read() {
    let app = spawn_app_configured(|settings| settings.api.max_concurrent_uploads = 1).await;
    let url = format!("{}/v1/datasets?format=csv", app.address);
    let body = csv(50);

    // The first upload holds the only permit while its body trickles in.
    let (first_pieces, first_body) = streamed();
    let first = tokio::spawn(app.client.post(&url).body(first_body).send());
    first_pieces
        .send(Ok(body.as_bytes()[..20].to_vec()))
        .await
        .unwrap();

    // Once the first holds the permit (it may take a moment to reach its handler), a
    // complete upload is refused...
    let started = Instant::now();
    loop {
        let response = app.post_raw("/v1/datasets?format=csv", csv(10)).await;
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(started.elapsed() < Duration::from_secs(5), "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and so is one whose body never ends: the answer does not wait for the body.
    let (_pieces, endless) = streamed();
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        app.client.post(&url).body(endless).send(),
    )
    .await
    .expect("answered without its body")
    .unwrap();
    let retry_after = response.headers().get(RETRY_AFTER).cloned();
    let (status, second_body) = json_of(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{second_body}");
    assert_eq!(retry_after.unwrap(), "1");
    let error = assert_error(&second_body, "too_many_uploads");
    assert_eq!(
        error["message"],
        "1 uploads are already in progress (the limit): retry later"
    );

    // The first finishes and is stored; its permit is free again.
    first_pieces
        .send(Ok(body.as_bytes()[20..].to_vec()))
        .await
        .unwrap();
    drop(first_pieces);
    let (status, stored) = json_of(first.await.unwrap().unwrap()).await;
    assert_eq!(status, StatusCode::CREATED, "{stored}");
    assert_eq!(stored["rows"], 50);
    let (status, stored) = json_of(app.post_raw("/v1/datasets?format=csv", body).await).await;
    assert_eq!(status, StatusCode::CREATED, "{stored}");
}

#[tokio::test]
async fn an_upload_past_the_stored_bytes_quota_gets_507_until_a_delete_makes_room() {
    let body = csv(100);
    let quota = body.len() as u64 * 3 / 2;
    let app = spawn_app_configured(|settings| settings.api.max_stored_bytes = quota).await;
    let (status, first) =
        json_of(app.post_raw("/v1/datasets?format=csv", body.clone()).await).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");

    // Refused from its declared length, before its body is read.
    let (status, refused) =
        json_of(app.post_raw("/v1/datasets?format=csv", body.clone()).await).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{refused}");
    let error = assert_error(&refused, "storage_full");
    assert_eq!(
        error["message"],
        format!(
            "the server stores {len} bytes of datasets and weights; {len} more would pass its \
             quota of {quota} bytes: delete some (DELETE /v1/datasets/{{id}}, \
             DELETE /v1/weights/{{id}})",
            len = body.len()
        )
    );
    // Without a declared length, refused as it is stored.
    let (pieces, chunked) = streamed();
    pieces.send(Ok(body.clone().into_bytes())).await.unwrap();
    drop(pieces);
    let response = app
        .client
        .post(format!("{}/v1/datasets?format=csv", app.address))
        .body(chunked)
        .send()
        .await
        .unwrap();
    let (status, refused) = json_of(response).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{refused}");
    assert_error(&refused, "storage_full");
    let (_, list) = json_of(app.get("/v1/datasets").await).await;
    assert_eq!(list["datasets"].as_array().unwrap().len(), 1, "{list}");

    let id = first["id"].as_str().unwrap();
    let response = app
        .client
        .delete(format!("{}/v1/datasets/{id}", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(response.text().await.unwrap(), "");
    let (status, body_after) = json_of(app.get(&format!("/v1/datasets/{id}")).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body_after}");
    let (status, again) = json_of(
        app.client
            .delete(format!("{}/v1/datasets/{id}", app.address))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{again}");
    assert_eq!(
        assert_error(&again, "not_found")["message"],
        format!("dataset \"{id}\" not found")
    );

    let (status, stored) = json_of(app.post_raw("/v1/datasets?format=csv", body).await).await;
    assert_eq!(status, StatusCode::CREATED, "{stored}");
}

#[tokio::test]
async fn a_dataset_named_by_a_queued_or_running_job_cannot_be_deleted_until_the_job_ends() {
    let (app, release) = spawn_gated_app().await;
    let (status, dataset) = json_of(
        app.post_raw("/v1/datasets?format=csv&name=blobs", csv(200))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{dataset}");
    let id = dataset["id"].as_str().unwrap();
    let (status, validation) =
        json_of(app.post_raw("/v1/datasets?format=csv", csv(40)).await).await;
    assert_eq!(status, StatusCode::CREATED, "{validation}");
    let validation_id = validation["id"].as_str().unwrap();
    let mut spec = tiny_spec();
    spec["data"] = json!({"dataset_id": id, "validation_dataset_id": validation_id});
    spec["model"] = json!({"arch": "mlp", "hidden": [8]});
    spec["batch_size"] = json!(16);
    let job = app.submit(&spec).await;

    let delete = |id: String| {
        let request = app
            .client
            .delete(format!("{}/v1/datasets/{id}", app.address));
        async move { json_of(request.send().await.unwrap()).await }
    };
    for used in [id, validation_id] {
        let (status, refused) = delete(used.to_string()).await;
        assert_eq!(status, StatusCode::CONFLICT, "{refused}");
        assert_eq!(
            assert_error(&refused, "conflict")["message"],
            format!(
                "dataset {used} is used by queued or running jobs ({job}): cancel them or wait \
                 until they end"
            )
        );
    }
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    let finished = app.wait_until_finished(&job).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    for used in [id, validation_id] {
        let (status, body) = delete(used.to_string()).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    let (_, list) = json_of(app.get("/v1/datasets").await).await;
    assert_eq!(list["datasets"], json!([]));
}

#[tokio::test]
async fn upload_names_follow_the_rules_of_job_names() {
    let app = spawn_app().await;
    let weights = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/sequential/residual_mlp.safetensors"
    ))
    .unwrap();
    let long = "n".repeat(201);
    for (name, message) in [
        (long.as_str(), "must be at most 200 characters, got 201"),
        (
            "bell%07",
            "must not contain control characters, found U+0007 at character 5",
        ),
    ] {
        let (status, body) = json_of(
            app.post_raw(&format!("/v1/datasets?format=csv&name={name}"), csv(10))
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let error = assert_error(&body, "invalid_input");
        assert_eq!(
            (&error["field"], &error["message"]),
            (&json!("name"), &json!(message))
        );
        let (status, body) = json_of(
            app.post_raw(&format!("/v1/weights?name={name}"), weights.clone())
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let error = assert_error(&body, "invalid_input");
        assert_eq!(
            (&error["field"], &error["message"]),
            (&json!("name"), &json!(message))
        );
        // A job with that name gets the same answer.
        let (status, body) =
            json_of(app.post_json("/v1/jobs", &named(&urldecoded(name))).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let error = assert_error(&body, "invalid_spec");
        assert_eq!(
            (&error["field"], &error["message"]),
            (&json!("name"), &json!(message))
        );
    }
    let longest = "é".repeat(200);
    let (status, body) = json_of(
        app.post_raw(&format!("/v1/datasets?format=csv&name={longest}"), csv(10))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], longest);
}

fn urldecoded(name: &str) -> String {
    name.replace("%07", "\u{7}")
}

/// 60 MiB: the size the issue sent.
const HUGE: usize = 60 << 20;

#[tokio::test]
async fn a_60_mib_csv_cell_header_or_column_name_is_refused_with_an_error_under_1_kb() {
    let app = spawn_app().await;
    let value = "7".repeat(HUGE).replacen('7', "x", 1);
    let quoted_start = format!("\"x{}…\" ({HUGE} characters)", "7".repeat(199));
    let cases = [
        // A cell.
        (format!("a,b\n1,2\n3,{value}\n"), "b".to_string()),
        // A header of one column.
        (format!("{value}\n1\n2\n"), "csv".to_string()),
        // A column name, named by a bad cell below it.
        (
            format!("a,{value}\n1,2\n3,z\n"),
            format!("x{}…", "7".repeat(199)),
        ),
    ];
    for (index, (body, field)) in cases.into_iter().enumerate() {
        let response = app.post_raw("/v1/datasets?format=csv", body).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "case {index}");
        assert!(text.len() < 1024, "case {index}: {} bytes", text.len());
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        let error = assert_error(&body, "invalid_data");
        assert_eq!(error["field"], field.as_str(), "case {index}");
        let message = error["message"].as_str().unwrap();
        let expected = match index {
            0 => format!("row 3, column \"b\": {quoted_start} is not a number"),
            1 => format!(
                "csv: only one column ({quoted_start}); at least one feature column and a \
                 target column are needed"
            ),
            _ => format!("row 3, column {quoted_start}: \"z\" is not a number"),
        };
        assert_eq!(message, expected, "case {index}");
    }
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408() {
    let app = spawn_app_configured(|settings| {
        settings.api.connections.body_read_timeout = Duration::from_millis(500);
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_string();
    for (path, start) in [
        ("/v1/datasets?format=csv", "x1,x2,y\n1,2,3\n"),
        ("/v1/weights", "\u{8}\0\0\0"),
        ("/v1/jobs", "{\"data\": "),
    ] {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        let request =
            format!("POST {path} HTTP/1.1\r\nhost: test\r\ncontent-length: 1000\r\n\r\n{start}");
        stream.write_all(request.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("answered and closed")
            .unwrap();
        let waited = started.elapsed();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{path}: {answer}");
        assert!(
            answer.contains("\"code\":\"request_timeout\""),
            "{path}: {answer}"
        );
        assert!(
            waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
            "{path}: answered after {waited:?}"
        );
    }
    // A prompt client is served as before.
    let (status, _) = json_of(
        app.client
            .post(format!("{}/v1/datasets?format=csv", app.address))
            .header(CONTENT_LENGTH, csv(10).len())
            .body(csv(10))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
}

/// A safetensors file of one float tensor of `values` zeros, its header padded to 8 bytes
/// as the safetensors library writes it.
fn safetensors(values: usize) -> Vec<u8> {
    let mut header = format!(
        r#"{{"0.weight":{{"dtype":"F32","shape":[{values}],"data_offsets":[0,{}]}}}}"#,
        values * 4
    );
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.resize(file.len() + values * 4, 0);
    file
}

/// Sends 40 uploads of `file` at once; the count of each status, asserting that every one
/// is answered 201, 503 or 507.
async fn forty_at_once(
    server: &Lrtune,
    client: &reqwest::Client,
    file: &axum::body::Bytes,
) -> std::collections::BTreeMap<u16, usize> {
    let uploads: Vec<_> = (0..40)
        .map(|_| {
            let request = client.post(server.url("/v1/weights")).body(file.clone());
            tokio::spawn(async move {
                let response = request.send().await?;
                let status = response.status();
                let body = response.text().await?;
                Ok::<_, reqwest::Error>((status, body))
            })
        })
        .collect();
    let mut answers = std::collections::BTreeMap::new();
    for upload in uploads {
        let (status, body) = upload.await.unwrap().unwrap_or_else(|error| {
            panic!(
                "an upload got no answer: {error:?}; log:\n{}",
                server.log_text()
            )
        });
        assert!(
            [
                StatusCode::CREATED,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::INSUFFICIENT_STORAGE
            ]
            .contains(&status),
            "{status}: {body}"
        );
        *answers.entry(status.as_u16()).or_insert(0) += 1;
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_concurrent_60_mb_uploads_under_a_6_gb_address_space_are_each_answered_201_503_or_507(
) {
    // Room for three of the files.
    let mut server = Lrtune::serve_fresh_launch(&[
        "--workers",
        "0",
        "--max-stored-bytes",
        "180MiB",
        "--max-concurrent-uploads",
        "4",
    ])
    .prlimit(&["--as=6000000000"])
    .start();
    let file = axum::body::Bytes::from(safetensors(15_000_000));
    let client = reqwest::Client::new();
    let idle = server.status_kb("VmHWM");

    // One upload alone: what it costs above the idle server.
    let url = server.url("/v1/weights");
    let upload = || client.post(&url).body(file.clone());
    let (status, body) = json_of(upload().send().await.unwrap()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let one = server.status_kb("VmHWM");

    let started = Instant::now();
    let answers = forty_at_once(&server, &client, &file).await;
    let took = started.elapsed();
    let peak = server.status_kb("VmHWM");
    println!(
        "idle {} MB, after one 60 MB upload {} MB (+{} MB), after 40 at once {} MB; \
         answers {answers:?} in {:.1} s",
        idle / 1000,
        one / 1000,
        (one - idle) / 1000,
        peak / 1000,
        took.as_secs_f64()
    );
    assert!(server.is_alive(), "log:\n{}", server.log_text());
    let log = server.log_text();
    assert!(!log.contains("memory allocation"), "{log}");
    let created = answers.get(&201).copied().unwrap_or(0);
    assert!((1..=2).contains(&created), "{answers:?}");
    let (status, list) = json_of(
        client
            .get(server.url("/v1/weights?limit=100"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["weights"].as_array().unwrap().len(), 1 + created);
    if created == 2 {
        // Full: the next is refused from its declared length.
        let (status, body) = json_of(upload().send().await.unwrap()).await;
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    }
    // Measured here: one upload about 240 MB above the idle server (its body, the parse's
    // copy, SQLite's copy of the bound value and of the record), 40 at once about 0.6 GB.
    assert!(one - idle < 300_000, "one upload took {} kB", one - idle);
    assert!(peak < 2_000_000, "the uploads peaked at {peak} kB");
}
