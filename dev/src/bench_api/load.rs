//! The load: the request mix, each connection's timeline, one request and its answer.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestKind {
    GetJob,
    ListJobs,
    Analyze,
    Health,
}

impl RequestKind {
    pub(super) const ALL: [RequestKind; 4] = [
        RequestKind::GetJob,
        RequestKind::ListJobs,
        RequestKind::Analyze,
        RequestKind::Health,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            RequestKind::GetJob => "GET /v1/jobs/{id}",
            RequestKind::ListJobs => "GET /v1/jobs?limit=20",
            RequestKind::Analyze => "POST /v1/analyze",
            RequestKind::Health => "GET /healthz",
        }
    }
}

/// Equal shares of each kind in a fixed shuffled order: every connection sends every kind, and
/// two runs send the same sequence.
pub(super) fn request_mix(requests: usize) -> Vec<RequestKind> {
    let mut kinds: Vec<RequestKind> = (0..requests)
        .map(|index| RequestKind::ALL[index % RequestKind::ALL.len()])
        .collect();
    kinds.shuffle(&mut rand::rngs::StdRng::seed_from_u64(14));
    kinds
}

/// A 100-point range-test curve for `/v1/analyze`: flat, a descent, a valley, then divergence.
pub(super) fn analyze_body() -> String {
    let points = 100;
    let lr: Vec<f64> = (0..points)
        .map(|step| 1e-6 * 1e7f64.powf(step as f64 / (points - 1) as f64))
        .collect();
    let loss: Vec<f64> = (0..points)
        .map(|step| {
            let x = step as f64 / (points - 1) as f64;
            let descent = 1.8 / (1.0 + (12.0 * (x - 0.45)).exp());
            let divergence = 40.0 * (x - 0.8).max(0.0).powi(2);
            0.5 + descent + divergence + 0.02 * (step as f64 * 1.7).sin()
        })
        .collect();
    serde_json::json!({ "lr": lr, "loss": loss }).to_string()
}

pub(super) enum Response {
    Ok,
    /// Not 2xx: the status, whether it said when to retry, and the start of the body.
    Status {
        status: u16,
        retry_after: bool,
        text: String,
    },
    /// No response: connection error or timeout.
    Failed(String),
}

pub(super) struct Sample {
    pub(super) kind: RequestKind,
    /// From the due time (or the actual send, when that was earlier) to the response's last
    /// byte.
    pub(super) latency: Duration,
    /// From the due time to the actual send, zero when sent early: the bench's own lateness (a
    /// connection still waiting on its previous response, a starved bench process).
    pub(super) send_lag: Duration,
    /// From the start of the timeline to the response's last byte.
    pub(super) done_at: Duration,
    pub(super) response: Response,
}

/// Opens `plan.connections` connections, then sends the plan's requests on its timeline.
///
/// Each connection is its own `reqwest::Client` used by one task with one request in flight, so
/// it holds exactly one keep-alive connection; all are opened (a `GET /healthz` each) before the
/// clock starts. Request i is due at i / rate seconds and goes to connection i mod N, as wrk2
/// does; latency counts from the due time, so a stalled server shows up as latency rather than
/// as a lower request rate. A sender wakes up to TIMER_SLACK early and then sends at once; its
/// latency then counts from the actual send.
pub(super) async fn measure(
    target: &Target,
    plan: &Plan,
    job_id: watch::Receiver<String>,
) -> anyhow::Result<PhaseReport> {
    let base = target.base_url.clone();
    let port = target.port;
    let clients = (0..plan.connections)
        .map(|_| one_connection_client())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let before = port.and_then(established_connections);
    // Any answer opens the connection (a server whose database is down answers 503).
    let warm_up = clients.iter().map(|client| {
        let url = format!("{base}/healthz");
        async move { client.get(&url).send().await?.bytes().await }
    });
    for result in futures_util::future::join_all(warm_up).await {
        result.context("opening the connections (GET /healthz)")?;
    }
    let open_connections = match (before, port.and_then(established_connections)) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };

    let kinds: Arc<[RequestKind]> = request_mix(plan.requests).into();
    let analyze: Arc<str> = analyze_body().into();
    let start = Instant::now() + TIMELINE_DELAY;
    let mut senders = Vec::with_capacity(plan.connections);
    for (connection, client) in clients.into_iter().enumerate() {
        let (kinds, analyze, base, job_id) =
            (kinds.clone(), analyze.clone(), base.clone(), job_id.clone());
        let (rate, requests, stride) = (plan.rate, plan.requests, plan.connections);
        senders.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(requests / stride + 1);
            for index in (connection..requests).step_by(stride) {
                let due = start + Duration::from_secs_f64(index as f64 / rate);
                tokio::time::sleep_until(due - TIMER_SLACK).await;
                let sent = Instant::now();
                let id = job_id.borrow().clone();
                let kind = kinds[index];
                let response = send(&client, &base, kind, &id, &analyze).await;
                let done = Instant::now();
                samples.push(Sample {
                    kind,
                    latency: done - sent.min(due),
                    send_lag: sent.saturating_duration_since(due),
                    done_at: done - start,
                    response,
                });
            }
            samples
        }));
    }
    let mut samples = Vec::with_capacity(plan.requests);
    for sender in senders {
        samples.extend(sender.await.context("a sender task panicked")?);
    }
    Ok(PhaseReport::of(&samples, open_connections))
}

pub(super) fn one_connection_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(1)
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .build()
        .context("building an HTTP client")
}

pub(super) async fn send(
    client: &reqwest::Client,
    base: &str,
    kind: RequestKind,
    job_id: &str,
    analyze: &str,
) -> Response {
    let request = match kind {
        RequestKind::GetJob => client.get(format!("{base}/v1/jobs/{job_id}")),
        RequestKind::ListJobs => client.get(format!("{base}/v1/jobs?limit=20")),
        RequestKind::Analyze => client
            .post(format!("{base}/v1/analyze"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(analyze.to_string()),
        RequestKind::Health => client.get(format!("{base}/healthz")),
    };
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return Response::Failed(format!("{}: {}", kind.label(), chain(&error))),
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .contains_key(reqwest::header::RETRY_AFTER);
    // The whole body: latency runs to its last byte.
    match response.bytes().await {
        Ok(_) if status.is_success() => Response::Ok,
        Ok(body) => Response::Status {
            status: status.as_u16(),
            retry_after,
            text: format!(
                "{}: {status}: {}",
                kind.label(),
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        },
        Err(error) => Response::Failed(format!("{}: {}", kind.label(), chain(&error))),
    }
}

/// An error with its causes ("error sending request" alone does not say what happened).
pub(super) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// Client sockets connected to this loopback port (Linux; `None` elsewhere). The difference
/// before and after opening a phase's connections shows that they are really open.
pub(super) fn established_connections(port: u16) -> Option<usize> {
    const ESTABLISHED: &str = "01";
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let count = table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields
                .get(2)
                .and_then(|address| address.rsplit_once(':'))
                .and_then(|(_, port)| u16::from_str_radix(port, 16).ok());
            remote_port == Some(port) && fields.get(3) == Some(&ESTABLISHED)
        })
        .count();
    Some(count)
}
