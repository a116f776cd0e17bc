//! Slow and idle clients cannot take the server's connections: the real binary under a small
//! file limit, a slowloris against it, and a prompt client's health checks meanwhile.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::process::Lrtune;

/// One slowloris connection after another until `until`, as the tool does it: a request
/// line, then one header line every `every`, never the blank line that ends the headers; at
/// the next tick after the server closes one (or refuses it), a new connection. Returns how
/// many connections it opened.
async fn slowloris(address: String, every: Duration, until: Instant) -> usize {
    let mut opened = 0;
    let mut first = true;
    while Instant::now() < until {
        if !std::mem::take(&mut first) {
            tokio::time::sleep(every).await;
        }
        let Ok(mut stream) = TcpStream::connect(&address).await else {
            continue;
        };
        opened += 1;
        let mut line = b"GET /healthz HTTP/1.1\r\nhost: test\r\n".to_vec();
        while Instant::now() < until {
            if stream.write_all(&line).await.is_err() {
                break;
            }
            let mut byte = [0];
            match tokio::time::timeout(every, stream.read(&mut byte)).await {
                // Closed (or answered, which a request without its blank line never is).
                Ok(_) => break,
                Err(_) => line = b"x-slow: 1\r\n".to_vec(),
            }
        }
    }
    opened
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_of_300_connections_under_a_file_limit_of_256_leaves_healthz_answering_within_1_s(
) {
    let mut server = Lrtune::serve_fresh_launch(&["--workers", "0", "--header-read-timeout", "2"])
        .prlimit(&["--nofile=256"])
        .start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["256", "256"],
        "{files}"
    );

    let until = Instant::now() + Duration::from_secs(6);
    let attack: Vec<_> = (0..300)
        .map(|_| {
            tokio::spawn(slowloris(
                server.host_port().to_string(),
                Duration::from_millis(500),
                until,
            ))
        })
        .collect();
    // A fresh connection for every check, as a load balancer's.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut slowest = Duration::ZERO;
    let mut checks = 0;
    while Instant::now() + Duration::from_millis(300) < until {
        let started = Instant::now();
        let response = client.get(server.url("/healthz")).send().await;
        let took = started.elapsed();
        let response = response.unwrap_or_else(|error| {
            panic!(
                "check {checks} failed after {took:?}: {error:?}; log:\n{}",
                server.log_text()
            )
        });
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "check {checks}: {body}");
        assert!(
            took < Duration::from_secs(1),
            "check {checks} took {took:?}"
        );
        slowest = slowest.max(took);
        checks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut opened = 0;
    for connections in attack {
        opened += connections.await.unwrap();
    }
    println!(
        "{checks} health checks during a slowloris of 300 ({opened} connections opened): \
         slowest {slowest:?}"
    );
    assert!(opened >= 300, "{opened}");
    assert!(server.is_alive());
    let log = server.log_text();
    assert!(!log.contains("Too many open files"), "{log}");
}

/// Reads until the server closes the connection, at most 5 s: what it sent and when it
/// closed.
async fn until_closed(stream: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
        .await
        .expect("closed within 5 s")
        .ok();
    (received, Instant::now())
}

#[tokio::test]
async fn a_connection_slow_to_send_its_headers_or_idle_after_a_response_is_closed_after_the_header_timeout(
) {
    let server = Lrtune::serve_fresh(&["--workers", "0", "--header-read-timeout", "1"]);

    // Headers sent a line at a time, every 200 ms, never finished.
    let mut slow = TcpStream::connect(server.host_port()).await.unwrap();
    let opened = Instant::now();
    let (read, mut write) = slow.split();
    let trickle = async move {
        write
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\n")
            .await
            .unwrap();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if write.write_all(b"x-slow: 1\r\n").await.is_err() {
                break;
            }
        }
    };
    let mut read = read;
    let closed = async {
        let mut received = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut received)).await;
        (received, Instant::now())
    };
    let (_, (received, closed_at)) = tokio::join!(trickle, closed);
    let after = closed_at - opened;
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "closed after {after:?}"
    );
    let received = String::from_utf8_lossy(&received);
    assert!(
        received.is_empty() || received.starts_with("HTTP/1.1 408"),
        "{received}"
    );

    // A whole request is answered; the connection then idles and is closed as well.
    let mut idle = TcpStream::connect(server.host_port()).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let answered = Instant::now();
    let (received, closed_at) = until_closed(&mut idle).await;
    let received = String::from_utf8_lossy(&received);
    assert!(received.starts_with("HTTP/1.1 200 OK"), "{received}");
    let after = closed_at - answered;
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "idle connection closed after {after:?}"
    );
}
