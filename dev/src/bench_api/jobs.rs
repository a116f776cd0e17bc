//! The bench's own jobs: the warm-up job, and one kept running through the training phase;
//! and the `lrtune serve` it starts.

use super::*;

/// The bench's own requests (submit, poll, cancel), on a connection of their own and not
/// measured.
pub(super) struct Control {
    pub(super) http: reqwest::Client,
    pub(super) base: String,
}

pub(super) struct JobState {
    pub(super) status: String,
    pub(super) error: Option<String>,
}

impl JobState {
    pub(super) fn describe(&self) -> String {
        match &self.error {
            Some(error) => format!("{}: {error}", self.status),
            None => self.status.clone(),
        }
    }
}

impl Control {
    pub(super) fn new(base: &str) -> anyhow::Result<Control> {
        Ok(Control {
            http: one_connection_client()?,
            base: base.to_string(),
        })
    }

    pub(super) async fn submit(&self, spec: &str) -> anyhow::Result<String> {
        let response = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(spec.to_string())
            .send()
            .await
            .context("POST /v1/jobs")?;
        let status = response.status();
        let body: Value = response.json().await.context("POST /v1/jobs: reading")?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("POST /v1/jobs answered {status}: {body}");
        }
        match body["id"].as_str() {
            Some(id) => Ok(id.to_string()),
            None => bail!("POST /v1/jobs answered without an id: {body}"),
        }
    }

    /// The id of the newest job, if there is one.
    pub(super) async fn newest_job(&self) -> anyhow::Result<Option<String>> {
        let response = self
            .http
            .get(format!("{}/v1/jobs?limit=1", self.base))
            .send()
            .await
            .context("GET /v1/jobs")?;
        let status = response.status();
        let body: Value = response.json().await.context("GET /v1/jobs: reading")?;
        if !status.is_success() {
            bail!("GET /v1/jobs answered {status}: {body}");
        }
        Ok(body["jobs"][0]["id"].as_str().map(str::to_string))
    }

    pub(super) async fn job(&self, id: &str) -> anyhow::Result<JobState> {
        let response = self
            .http
            .get(format!("{}/v1/jobs/{id}", self.base))
            .send()
            .await
            .with_context(|| format!("GET /v1/jobs/{id}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("GET /v1/jobs/{id}: reading"))?;
        if !status.is_success() {
            bail!("GET /v1/jobs/{id} answered {status}: {body}");
        }
        Ok(JobState {
            status: body["status"].as_str().unwrap_or("").to_string(),
            error: body["error"]["message"].as_str().map(str::to_string),
        })
    }

    /// Polls the job until `waiting(status)` is false.
    pub(super) async fn wait_while(
        &self,
        id: &str,
        waiting: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<JobState> {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id).await?;
            if !waiting(&job.status) || is_finished(&job.status) {
                return Ok(job);
            }
            if Instant::now() > deadline {
                bail!("job {id} was still {} after {timeout:?}", job.status);
            }
            tokio::time::sleep(JOB_POLL).await;
        }
    }

    /// Stops the job; one that already finished is fine (409).
    pub(super) async fn cancel(&self, id: &str) -> anyhow::Result<()> {
        let response = self
            .http
            .post(format!("{}/v1/jobs/{id}/cancel", self.base))
            .send()
            .await
            .with_context(|| format!("POST /v1/jobs/{id}/cancel"))?;
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::CONFLICT {
            Ok(())
        } else {
            let body = response.text().await.unwrap_or_default();
            bail!("POST /v1/jobs/{id}/cancel answered {status}: {body}")
        }
    }
}

pub(super) fn is_finished(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "canceled")
}

/// Submits the training job and returns its id once a worker runs it.
pub(super) async fn start_training(control: &Control) -> anyhow::Result<String> {
    for _ in 0..3 {
        let id = control.submit(TRAINING_JOB).await?;
        let job = control
            .wait_while(&id, |status| status == "queued", JOB_START_TIMEOUT)
            .await?;
        match job.status.as_str() {
            "running" => return Ok(id),
            // Finished between two polls: only on a machine far faster than this job expects.
            "succeeded" => continue,
            _ => bail!("the training job {id} ended {}", job.describe()),
        }
    }
    bail!("the training job finished three times before it could be seen running")
}

/// How much of the training phase a job was seen running, and which jobs ran.
#[derive(Default)]
pub(super) struct Coverage {
    pub(super) jobs: Vec<String>,
    pub(super) polls: usize,
    pub(super) running: usize,
}

impl Coverage {
    pub(super) fn report(&self) -> TrainingReport {
        TrainingReport {
            jobs: self.jobs.clone(),
            running_fraction: if self.polls == 0 {
                0.0
            } else {
                round3(self.running as f64 / self.polls as f64)
            },
        }
    }
}

/// Checks the job every KEEPER_POLL and submits another when it has finished, until dropped
/// (the phase is over). Returns only on an error: a job that failed or was canceled.
pub(super) async fn keep_training(
    control: &Control,
    current: &watch::Sender<String>,
    coverage: &mut Coverage,
) -> anyhow::Error {
    coverage.jobs.push(current.borrow().clone());
    loop {
        let id = current.borrow().clone();
        let job = match control.job(&id).await {
            Ok(job) => job,
            Err(error) => return error.context("following the training job"),
        };
        coverage.polls += 1;
        match job.status.as_str() {
            "running" => coverage.running += 1,
            "queued" => {}
            "succeeded" => match control.submit(TRAINING_JOB).await {
                Ok(next) => {
                    coverage.jobs.push(next.clone());
                    current.send_replace(next);
                }
                Err(error) => return error.context("submitting the next training job"),
            },
            _ => return anyhow::anyhow!("the training job {id} ended {}", job.describe()),
        }
        tokio::time::sleep(KEEPER_POLL).await;
    }
}

/// `lrtune serve` on a free loopback port with a fresh database; killed when dropped.
pub(super) struct ServerProcess {
    pub(super) child: Child,
    pub(super) address: SocketAddr,
    pub(super) base_url: String,
}

impl ServerProcess {
    pub(super) fn start(lrtune: &Path, scratch: &Path) -> anyhow::Result<ServerProcess> {
        let static_dir = scratch.join("static");
        std::fs::create_dir(&static_dir)
            .with_context(|| format!("creating {}", static_dir.display()))?;
        let log_path = scratch.join("server.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut child = Command::new(lrtune)
            .args(["serve", "--addr", "127.0.0.1:0", "--db"])
            .arg(scratch.join("bench.db"))
            .arg("--static-dir")
            .arg(&static_dir)
            .env_remove("LRTUNE_API_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} serve", lrtune.display()))?;
        let stdout = child.stdout.take();
        // From here on a failure kills the child (Drop).
        let mut server = ServerProcess {
            child,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            base_url: String::new(),
        };
        let stdout = stdout.context("lrtune serve's standard output")?;
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok).unwrap_or_default();
            let _ = sender.send(first);
            // Keep reading so that a later line can never block the server on a full pipe.
            lines.for_each(drop);
        });
        let line = receiver
            .recv_timeout(SERVER_START_TIMEOUT)
            .unwrap_or_default();
        let Some(url) = line.trim().strip_prefix("lrtune listening on ") else {
            bail!(
                "lrtune serve did not start (first line {line:?}); its log:\n{}",
                log_tail(&log_path)
            );
        };
        let address: SocketAddr = url
            .strip_prefix("http://")
            .and_then(|address| address.parse().ok())
            .with_context(|| format!("lrtune serve printed an address that is not one: {url}"))?;
        if !address.ip().is_loopback() {
            bail!("lrtune serve listens on {address}, not on loopback");
        }
        server.address = address;
        server.base_url = format!("http://{address}");
        Ok(server)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
