//! The CLI's side of the HTTP API (`submit`, `check --server`): submit a spec, follow a job's
//! server-sent events until it finishes, fetch its result and curve. Blocking calls on a small
//! single-threaded tokio runtime; every server error is turned into its message and field.

use std::time::Duration;

use anyhow::{bail, Context};
use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::StreamExt;
use serde::Deserialize;

use crate::engine::CurvePoint;

/// How long to wait for a TCP connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The server sends an SSE keep-alive every 10 s, so a minute of silence means it is gone.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Reconnections to the event stream before giving up on a job (a server restart drops it).
const STREAM_RETRIES: usize = 5;

pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
}

/// A job as `GET /v1/jobs/{id}` shows it, reduced to what the CLI reads.
#[derive(Debug, Clone, Deserialize)]
pub struct RemoteJob {
    pub id: String,
    #[serde(default)]
    pub kind: String,
    pub status: String,
    #[serde(default)]
    pub error: Option<RemoteError>,
    #[serde(default)]
    pub result: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RemoteError {
    #[serde(default)]
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub field: Option<String>,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) if !field.is_empty() => write!(f, "{field}: {}", self.message),
            _ => write!(f, "{}", self.message),
        }
    }
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: RemoteError,
}

/// What a job's event stream reports, as the progress bar needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum JobUpdate {
    Progress {
        stage: Option<String>,
        done: u64,
        total: u64,
    },
    Status(String),
}

#[derive(Deserialize)]
struct ProgressData {
    stage: Option<String>,
    done: u64,
    total: u64,
}

#[derive(Deserialize)]
struct StatusData {
    status: String,
}

#[derive(Deserialize)]
struct RemoteCurve {
    points: Vec<RemotePoint>,
}

#[derive(Deserialize)]
struct RemotePoint {
    step: usize,
    lr: f64,
    loss: Option<f64>,
    smoothed: Option<f64>,
}

pub fn is_finished(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "canceled")
}

impl Client {
    pub fn new(server: &str, token: Option<String>) -> anyhow::Result<Client> {
        let base = server.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--server must be an http:// or https:// URL, got {server:?}");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("lrtune/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("setting up the HTTP client")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        Ok(Client {
            base,
            token: token.filter(|token| !token.is_empty()),
            http,
            runtime,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request and decodes a 2xx JSON answer; anything else becomes an error with
    /// the server's message and field.
    async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<T> {
        let response = request
            .send()
            .await
            .map_err(|error| self.transport_error(error))?;
        let response = self.check_status(response, what).await?;
        let body = response
            .bytes()
            .await
            .with_context(|| format!("{what}: reading the answer"))?;
        serde_json::from_slice(&body)
            .with_context(|| format!("{what}: the server's answer is not the expected JSON"))
    }

    async fn check_status(
        &self,
        response: reqwest::Response,
        what: &str,
    ) -> anyhow::Result<reqwest::Response> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        match serde_json::from_slice::<ErrorEnvelope>(&body) {
            Ok(envelope) => {
                let error = envelope.error;
                let code = if error.code.is_empty() {
                    String::new()
                } else {
                    format!(" {}", error.code)
                };
                bail!("{what}: the server answered {status}{code}: {error}")
            }
            Err(_) => {
                let text = String::from_utf8_lossy(&body);
                bail!("{what}: the server answered {status}: {}", text.trim())
            }
        }
    }

    fn transport_error(&self, error: reqwest::Error) -> anyhow::Error {
        if error.is_connect() || error.is_timeout() {
            anyhow::anyhow!("cannot reach the server at {}: {error:#}", self.base)
        } else {
            anyhow::anyhow!("talking to the server at {}: {error:#}", self.base)
        }
    }

    /// `POST /v1/jobs` with the spec as written (the server validates it): the job, and the
    /// server's whole answer.
    pub fn submit(&self, spec_json: &str) -> anyhow::Result<(RemoteJob, serde_json::Value)> {
        let request = self
            .request(reqwest::Method::POST, "/v1/jobs")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(spec_json.to_string());
        let body: serde_json::Value = self
            .runtime
            .block_on(self.send_json(request, "submitting the job"))?;
        let job = serde_json::from_value(body.clone())
            .context("submitting the job: the server's answer has no job id")?;
        Ok((job, body))
    }

    /// The range-test curve; a missing (non-finite) loss comes back as NaN.
    pub fn curve(&self, id: &str) -> anyhow::Result<Vec<CurvePoint>> {
        let request = self.request(reqwest::Method::GET, &format!("/v1/jobs/{id}/curve"));
        let curve: RemoteCurve = self
            .runtime
            .block_on(self.send_json(request, &format!("reading the curve of job {id}")))?;
        Ok(curve
            .points
            .into_iter()
            .map(|point| CurvePoint {
                step: point.step,
                lr: point.lr,
                loss: point.loss.unwrap_or(f64::NAN),
                smoothed: point.smoothed.unwrap_or(f64::NAN),
            })
            .collect())
    }

    /// Follows `GET /v1/jobs/{id}/events` until the job has finished, then returns the job as
    /// `GET /v1/jobs/{id}` shows it. A dropped stream is opened again a few times.
    pub fn wait(
        &self,
        id: &str,
        on_update: &mut dyn FnMut(JobUpdate),
    ) -> anyhow::Result<RemoteJob> {
        self.runtime.block_on(async {
            let mut last_error = None;
            for _ in 0..=STREAM_RETRIES {
                match self.follow(id, on_update).await {
                    Ok(()) => {}
                    Err(error) => last_error = Some(error),
                }
                let request = self.request(reqwest::Method::GET, &format!("/v1/jobs/{id}"));
                let job: RemoteJob = self
                    .send_json(request, &format!("reading job {id}"))
                    .await?;
                if is_finished(&job.status) {
                    return Ok(job);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            match last_error {
                Some(error) => Err(error.context(format!("following job {id}"))),
                None => bail!("the event stream of job {id} kept ending before the job finished"),
            }
        })
    }

    /// Reads one event stream until a final `status` event or the end of the stream.
    async fn follow(&self, id: &str, on_update: &mut dyn FnMut(JobUpdate)) -> anyhow::Result<()> {
        let response = self
            .request(reqwest::Method::GET, &format!("/v1/jobs/{id}/events"))
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|error| self.transport_error(error))?;
        let response = self
            .check_status(response, &format!("following job {id}"))
            .await?;
        let mut events = response.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(EventStreamError::Transport(error)) => return Err(self.transport_error(error)),
                Err(error) => bail!("the event stream of job {id} is unreadable: {error}"),
            };
            if let Some(update) = decode_event(&event.event, &event.data) {
                let finished = matches!(&update, JobUpdate::Status(status) if is_finished(status));
                on_update(update);
                if finished {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

fn decode_event(event: &str, data: &str) -> Option<JobUpdate> {
    match event {
        "progress" => serde_json::from_str::<ProgressData>(data)
            .ok()
            .map(|progress| JobUpdate::Progress {
                stage: progress.stage,
                done: progress.done,
                total: progress.total,
            }),
        "status" => serde_json::from_str::<StatusData>(data)
            .ok()
            .map(|status| JobUpdate::Status(status.status)),
        _ => None,
    }
}

/// A finished job's result in the shape its kind gives (a tune's, or a race's), or why it has
/// none.
pub fn finished_as<T: serde::de::DeserializeOwned>(job: &RemoteJob) -> anyhow::Result<T> {
    match job.status.as_str() {
        "succeeded" => {
            let value = job
                .result
                .clone()
                .with_context(|| format!("job {} succeeded but has no result", job.id))?;
            serde_json::from_value(value)
                .with_context(|| format!("job {}: the result is not in the expected shape", job.id))
        }
        "failed" => match &job.error {
            Some(error) => bail!("job {} failed: {error}", job.id),
            None => bail!("job {} failed", job.id),
        },
        "canceled" => bail!("job {} was canceled", job.id),
        other => bail!("job {} has not finished (status {other})", job.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::JobResult;

    #[test]
    fn events_split_across_chunks_are_read_and_keep_alives_skipped() {
        let chunks: [&'static [u8]; 2] = [
            b"event: progress\ndata: {\"stage\":null,",
            b"\"done\":3,\"total\":9}\n\n:\n\nevent: status\r\ndata: {\"status\":\"succeeded\"}\r\n\r\n",
        ];
        let stream = futures_util::stream::iter(chunks.map(Ok::<_, std::convert::Infallible>));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let events: Vec<(String, String)> = runtime.block_on(
            stream
                .eventsource()
                .map(|event| {
                    let event = event.expect("a well-formed event");
                    (event.event, event.data)
                })
                .collect(),
        );
        assert_eq!(events.len(), 2);
        assert_eq!(
            decode_event(&events[0].0, &events[0].1),
            Some(JobUpdate::Progress {
                stage: None,
                done: 3,
                total: 9
            })
        );
        assert_eq!(
            decode_event(&events[1].0, &events[1].1),
            Some(JobUpdate::Status("succeeded".to_string()))
        );
    }

    #[test]
    fn a_failed_job_reports_its_error_and_field() {
        let job = RemoteJob {
            id: "job_1".to_string(),
            kind: "tune".to_string(),
            status: "failed".to_string(),
            error: Some(RemoteError {
                code: "invalid_spec".to_string(),
                message: "is larger than the data".to_string(),
                field: Some("batch_size".to_string()),
            }),
            result: None,
        };
        let error = finished_as::<JobResult>(&job).unwrap_err().to_string();
        assert_eq!(
            error,
            "job job_1 failed: batch_size: is larger than the data"
        );
    }
}
