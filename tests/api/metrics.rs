//! `/metrics` stays small whatever clients send (every label from a closed set), and can be
//! closed to requests without the token.

use std::time::Instant;

use lrtune::http::startup::Application;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// One request line an attacker or a broken script could send: an invented method (now
/// and then a standard one) on an invented path, or on a route that exists.
fn random_request(rng: &mut impl Rng) -> String {
    let method = match rng.random_range(0..10) {
        0 => "GET".to_string(),
        1 => "DELETE".to_string(),
        _ => format!("X{:07}", rng.random_range(0..10_000_000)),
    };
    let word = format!("{:x}", rng.random::<u64>());
    let path = match rng.random_range(0..5) {
        0 => format!("/v1/{word}"),
        1 => format!("/v1/jobs/{word}"),
        2 => format!("/{word}/{word}"),
        3 => "/healthz".to_string(),
        _ => format!("/v1/jobs/{word}/events?x={word}"),
    };
    format!("{method} {path} HTTP/1.1\r\nhost: test\r\n\r\n")
}

/// How many whole responses `buffer` holds from its start, and where the last ends. Every
/// answer here has a `content-length`.
fn complete_responses(buffer: &[u8]) -> (usize, usize) {
    let (mut count, mut at) = (0, 0);
    while let Some(head_end) = find(&buffer[at..], b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buffer[at..at + head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map_or(0, |value| value.trim().parse().expect("a length"));
        let end = at + head_end + 4 + length;
        if end > buffer.len() {
            break;
        }
        count += 1;
        at = end;
    }
    (count, at)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Sends `count` random requests pipelined in batches on one connection, reading every
/// answer.
async fn flood(address: String, count: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut stream = TcpStream::connect(&address).await.unwrap();
    let mut sent = 0;
    let mut buffer = Vec::new();
    while sent < count {
        let batch = (count - sent).min(200);
        let requests: String = (0..batch).map(|_| random_request(&mut rng)).collect();
        stream.write_all(requests.as_bytes()).await.unwrap();
        let mut answered = 0;
        while answered < batch {
            let mut chunk = [0; 64 * 1024];
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(
                read > 0,
                "the server closed after {} requests",
                sent + answered
            );
            buffer.extend_from_slice(&chunk[..read]);
            let (complete, end) = complete_responses(&buffer);
            answered += complete;
            buffer.drain(..end);
        }
        sent += batch;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_requests_with_invented_methods_and_paths_leave_metrics_under_100_kb() {
    let app = spawn_app().await;
    let address = app.address.trim_start_matches("http://").to_string();
    let started = Instant::now();
    let floods: Vec<_> = (0..4)
        .map(|seed| tokio::spawn(flood(address.clone(), 12_500, seed)))
        .collect();
    for flood in floods {
        flood.await.unwrap();
    }
    let took = started.elapsed();

    let response = app.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    println!(
        "50,000 requests in {:.1} s; /metrics is {} bytes",
        took.as_secs_f64(),
        text.len()
    );
    assert!(text.len() < 100_000, "/metrics is {} bytes", text.len());
    let counted: f64 = text
        .lines()
        .filter(|line| line.starts_with("lrtune_http_requests_total{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(counted, 50_000.0, "{text}");
    assert!(text.contains(r#"method="other""#), "{text}");
    assert!(!text.contains(r#"method="X"#), "{text}");
    let routes: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|line| line.split("route=\"").nth(1)?.split('"').next())
        .collect();
    let expected = [
        "/healthz",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "unmatched",
    ];
    assert_eq!(routes, expected.into_iter().collect(), "{text}");
}

#[tokio::test]
async fn metrics_need_the_token_when_the_server_is_told_so() {
    let app = spawn_app_configured(|settings| {
        settings.api.api_token = Some("s3cret".into());
        settings.api.metrics_token_required = true;
    })
    .await;
    let url = format!("{}/metrics", app.address);
    let (status, body) = json_of(app.client.get(&url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_error(&body, "unauthorized");
    let response = app
        .client
        .get(&url)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.unwrap().contains("lrtune_jobs{"));
    // A load balancer's health check needs no token.
    let response = app
        .client
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // Without the option, /metrics stays open as before.
    let open =
        spawn_app_configured(|settings| settings.api.api_token = Some("s3cret".into())).await;
    let response = open
        .client
        .get(format!("{}/metrics", open.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn requiring_the_token_for_metrics_without_a_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = lrtune::http::startup::Settings {
        db: dir.path().join("lrtune.db").into(),
        ..Default::default()
    };
    settings.api.addr = "127.0.0.1:0".into();
    settings.api.metrics_token_required = true;
    let error = Application::build(settings)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert_eq!(
        error,
        "--metrics-token-required needs a token: set --api-token"
    );
}
