//! Scale-out with real processes: `lrtune serve --workers 0` API replicas and `lrtune worker`
//! processes sharing one database (PostgreSQL of its own per test, created and dropped by
//! the test; one SQLite file for processes on one host). A worker killed with SIGKILL loses
//! no job and leaves no duplicate point; a cancel and the event stream reach across
//! processes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Row;

use crate::helpers::{json_of, read_events};
use crate::support::fixtures::{long_job, small_job};
use crate::support::process::Lrtune;
use crate::support::scratch::ScratchDatabase;

/// `lrtune serve --workers 0`: an API replica; `address` is its base URL.
fn api(db: &str) -> Lrtune {
    Lrtune::serve(db, &["--workers", "0", "--stale-after", "2"])
}

/// `lrtune worker --name NAME`, with its metrics on a free port (the URL it answers).
fn worker(db: &str, name: &str) -> (Lrtune, String) {
    let process = Lrtune::worker(
        db,
        name,
        &["--stale-after", "2", "--metrics-addr", "127.0.0.1:0"],
    );
    let metrics = process
        .first_line
        .split(" metrics on ")
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected first line {:?}", process.first_line))
        .to_string();
    assert!(
        process
            .first_line
            .starts_with(&format!("lrtune worker {name}@")),
        "{}",
        process.first_line
    );
    (process, metrics)
}

struct Client {
    http: reqwest::Client,
}

impl Client {
    fn new() -> Client {
        Client {
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, base: &str, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("the server answers");
        json_of(response).await
    }

    async fn submit(&self, base: &str, spec: &Value) -> String {
        let response = self
            .http
            .post(format!("{base}/v1/jobs"))
            .json(spec)
            .send()
            .await
            .expect("the server answers");
        let (status, body) = json_of(response).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["id"].as_str().expect("an id").to_string()
    }

    async fn job(&self, base: &str, id: &str) -> Value {
        let (status, body) = self.get(base, &format!("/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn wait_until(
        &self,
        base: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let job = self.job(base, id).await;
            if done(&job) {
                return job;
            }
            assert!(
                started.elapsed() < timeout,
                "job {id} after {timeout:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_until_finished(&self, base: &str, id: &str, timeout: Duration) -> Value {
        self.wait_until(base, id, timeout, |job| {
            ["succeeded", "failed", "canceled"].contains(&job["status"].as_str().unwrap_or(""))
        })
        .await
    }

    /// Submits a long job, cancels it once it runs, and asserts that it stopped as canceled
    /// within 2 s of the request; returns the job.
    async fn cancel_a_running_long_job(&self, base: &str) -> Value {
        let id = self.submit(base, &long_job("long")).await;
        self.wait_until(base, &id, Duration::from_secs(60), |job| {
            job["status"] == "running" && job["progress"]["done"].as_i64() > Some(10)
        })
        .await;
        let asked = Instant::now();
        let response = self
            .http
            .post(format!("{base}/v1/jobs/{id}/cancel"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let job = self
            .wait_until_finished(base, &id, Duration::from_secs(10))
            .await;
        let took = asked.elapsed();
        assert_eq!(job["status"], "canceled", "{job}");
        assert!(
            took < Duration::from_secs(2),
            "the worker stopped after {took:?}"
        );
        // The trial it was in (its range test) ended with it, on its worker.
        let listed: Value = self
            .http
            .get(format!("{base}/v1/jobs/{id}/trials"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let trials = listed["trials"].as_array().unwrap();
        assert_eq!(trials.len(), 1, "{listed}");
        assert_eq!(trials[0]["kind"], "range_test", "{listed}");
        assert_eq!(trials[0]["status"], "canceled", "{listed}");
        assert_eq!(trials[0]["worker"], job["worker"], "{listed}");
        job
    }
}

/// Asserts that a finished job's stored curve is exactly steps 0..steps_run, from its last
/// attempt only, and its sweep runs are the result's.
async fn assert_written_once(pool: &sqlx::PgPool, job: &Value) {
    let id = job["id"].as_str().unwrap();
    let steps_run = job["result"]["range_test"]["steps_run"]
        .as_i64()
        .unwrap_or_else(|| panic!("no steps_run: {job}"));
    let row = sqlx::query(
        "SELECT count(*) AS points, count(DISTINCT step) AS steps, min(step) AS first,
                max(step) AS last, count(DISTINCT run) AS runs, max(run) AS run
         FROM curve_point WHERE job_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("points"), steps_run, "job {id}");
    assert_eq!(
        row.get::<i64, _>("steps"),
        steps_run,
        "job {id}: duplicate steps"
    );
    assert_eq!(row.get::<i64, _>("first"), 0);
    assert_eq!(row.get::<i64, _>("last"), steps_run - 1);
    assert_eq!(
        row.get::<i64, _>("runs"),
        1,
        "job {id}: points of one attempt only"
    );
    assert_eq!(row.get::<i64, _>("run"), job["attempts"].as_i64().unwrap());
    let sweep: i64 = sqlx::query_scalar("SELECT count(*) FROM sweep_run WHERE job_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    let expected = job["result"]["sweep"].as_array().map_or(0, Vec::len) as i64;
    assert_eq!(sweep, expected, "job {id}: sweep runs");
    // Its trials, the range test and each sweep run, are the last attempt's alone, all ended,
    // all on the worker that finished the job.
    let trials = sqlx::query(
        "SELECT count(*) AS trials, count(DISTINCT run) AS runs, max(run) AS run,
                count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                count(DISTINCT worker) AS workers, max(worker) AS worker
         FROM trial WHERE job_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        trials.get::<i64, _>("trials"),
        1 + expected,
        "job {id}: trials"
    );
    assert_eq!(trials.get::<i64, _>("succeeded"), 1 + expected, "job {id}");
    assert_eq!(
        trials.get::<i64, _>("runs"),
        1,
        "job {id}: one attempt's trials"
    );
    assert_eq!(
        trials.get::<i64, _>("run"),
        job["attempts"].as_i64().unwrap()
    );
    assert_eq!(trials.get::<i64, _>("workers"), 1, "job {id}");
    assert_eq!(
        trials.get::<Option<String>, _>("worker").as_deref(),
        job["worker"].as_str(),
        "job {id}"
    );
}

/// On a PostgreSQL database of each test's own (see tests/support).
mod on_postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_killed_mid_job_loses_nothing_every_job_succeeds_once_with_one_point_per_step()
    {
        let db = ScratchDatabase::new().await;
        let client = Client::new();
        let replica = api(&db.url);
        let base = replica.address.clone();
        let mut workers: Vec<Option<Lrtune>> = ["w1", "w2", "w3"]
            .into_iter()
            .map(|name| Some(worker(&db.url, name).0))
            .collect();

        let mut ids = vec![client.submit(&base, &long_job("victim")).await];
        for index in 1..20 {
            ids.push(
                client
                    .submit(&base, &small_job(&format!("job-{index}")))
                    .await,
            );
        }
        // Kill the worker running the long job once part of its curve is stored.
        let running = client
            .wait_until(&base, &ids[0], Duration::from_secs(60), |job| {
                job["status"] == "running" && job["progress"]["done"].as_i64() > Some(50)
            })
            .await;
        let worker_name = running["worker"].as_str().expect("a worker").to_string();
        let index = ["w1@", "w2@", "w3@"]
            .iter()
            .position(|prefix| worker_name.starts_with(prefix))
            .unwrap_or_else(|| panic!("unknown worker {worker_name}"));
        let mut victim = workers[index].take().expect("alive");
        victim.kill();
        drop(victim);

        let mut jobs = Vec::new();
        for id in &ids {
            jobs.push(
                client
                    .wait_until_finished(&base, id, Duration::from_secs(180))
                    .await,
            );
        }
        for job in &jobs {
            assert_eq!(job["status"], "succeeded", "{job}");
            let attempts = job["attempts"].as_i64().unwrap();
            assert!((1..=2).contains(&attempts), "{job}");
        }
        assert_eq!(
            jobs[0]["attempts"], 2,
            "the killed job ran again: {}",
            jobs[0]
        );
        assert_ne!(
            jobs[0]["worker"], worker_name,
            "another worker finished the killed job"
        );
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        for job in &jobs {
            assert_written_once(&pool, job).await;
        }
        let succeeded: i64 =
            sqlx::query_scalar("SELECT count(*) FROM job WHERE status = 'succeeded'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(succeeded, 20);
        pool.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_through_an_api_replica_stops_a_job_in_a_worker_process_within_two_seconds() {
        let db = ScratchDatabase::new().await;
        let client = Client::new();
        let replica = api(&db.url);
        let base = replica.address.clone();
        let (_worker, _) = worker(&db.url, "canceler");
        let job = client.cancel_a_running_long_job(&base).await;
        assert!(job["progress"]["done"].as_i64().unwrap() < 3000, "{job}");
        assert!(
            job["worker"].as_str().unwrap().starts_with("canceler@"),
            "{job}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_from_an_api_replica_follow_a_job_in_a_worker_process_to_its_end() {
        let db = ScratchDatabase::new().await;
        let client = Client::new();
        let replica = api(&db.url);
        let base = replica.address.clone();
        let (_worker, metrics) = worker(&db.url, "streamer");
        let mut spec = small_job("streamed");
        spec["range_test"]["steps"] = json!(200);
        let id = client.submit(&base, &spec).await;
        let response = client
            .http
            .get(format!("{base}/v1/jobs/{id}/events"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let events = read_events(response, Duration::from_secs(60)).await;
        let job = client.job(&base, &id).await;
        assert_eq!(job["status"], "succeeded", "{job}");

        let statuses: Vec<&str> = events
            .iter()
            .filter(|(name, _)| name == "status")
            .map(|(_, data)| data["status"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(statuses.last(), Some(&"succeeded"), "{events:?}");
        assert!(statuses.contains(&"running"), "{events:?}");
        let steps: Vec<i64> = events
            .iter()
            .filter(|(name, _)| name == "point")
            .map(|(_, data)| data["step"].as_i64().unwrap())
            .collect();
        let steps_run = job["result"]["range_test"]["steps_run"].as_i64().unwrap();
        assert_eq!(steps, (0..steps_run).collect::<Vec<_>>());
        let sweep_runs = events
            .iter()
            .filter(|(name, _)| name == "sweep_run")
            .count();
        assert_eq!(sweep_runs, job["result"]["sweep"].as_array().unwrap().len());
        let progress = events.iter().filter(|(name, _)| name == "progress").count();
        assert!(progress >= 2, "progress while it ran: {events:?}");

        // The worker's own metrics: the job it finished, and the store's counts.
        let text = client
            .http
            .get(format!("{metrics}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            text.contains("lrtune_jobs{status=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lrtune_job_duration_seconds_count{status=\"succeeded\"} 1"),
            "{text}"
        );
        let (status, health) = client.get(&metrics, "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(health, json!({"status": "ok", "database": "postgres"}));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_api_replicas_on_one_database_list_the_same_jobs() {
        let db = ScratchDatabase::new().await;
        let client = Client::new();
        let first = api(&db.url);
        let second = api(&db.url);
        let (one, other) = (first.address.clone(), second.address.clone());
        let mut ids = BTreeSet::new();
        for index in 0..3 {
            ids.insert(client.submit(&one, &small_job(&format!("a-{index}"))).await);
            ids.insert(
                client
                    .submit(&other, &small_job(&format!("b-{index}")))
                    .await,
            );
        }
        let (status, listed_one) = client.get(&one, "/v1/jobs?limit=100").await;
        assert_eq!(status, StatusCode::OK);
        let (_, listed_other) = client.get(&other, "/v1/jobs?limit=100").await;
        assert_eq!(listed_one, listed_other);
        let listed: BTreeSet<String> = listed_one["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|job| job["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(listed, ids);
        for id in &ids {
            assert_eq!(client.job(&one, id).await["status"], "queued");
            assert_eq!(client.job(&other, id).await["status"], "queued");
        }
        for base in [&one, &other] {
            let (status, health) = client.get(base, "/healthz").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(health, json!({"status": "ok", "database": "postgres"}));
            let text = client
                .http
                .get(format!("{base}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(text.contains("lrtune_jobs{status=\"queued\"} 6"), "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_on_the_api_sqlite_file_runs_streams_and_cancels_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lrtune.db");
    let db = db.to_str().unwrap();
    let client = Client::new();
    let replica = api(db);
    let base = replica.address.clone();
    let (_worker, _) = worker(db, "local");

    let id = client.submit(&base, &small_job("streamed")).await;
    let response = client
        .http
        .get(format!("{base}/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    let events = read_events(response, Duration::from_secs(60)).await;
    let (last_name, last) = events.last().expect("events");
    assert_eq!(
        (last_name.as_str(), &last["status"]),
        ("status", &json!("succeeded"))
    );
    let points = events.iter().filter(|(name, _)| name == "point").count();
    let job = client.job(&base, &id).await;
    assert_eq!(
        points as i64,
        job["result"]["range_test"]["steps_run"].as_i64().unwrap()
    );
    assert!(
        job["worker"].as_str().unwrap().starts_with("local@"),
        "{job}"
    );

    client.cancel_a_running_long_job(&base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker_its_unfinished_job_goes_back_to_the_queue_uncounted() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lrtune.db");
    let db = db.to_str().unwrap();
    let client = Client::new();
    let replica = api(db);
    let base = replica.address.clone();
    let mut worker = Lrtune::worker(db, "drained", &["--grace", "0.3"]);
    let id = client.submit(&base, &long_job("long")).await;
    client
        .wait_until(&base, &id, Duration::from_secs(60), |job| {
            job["status"] == "running" && job["progress"]["done"].as_i64() > Some(10)
        })
        .await;
    worker.signal(Signal::SIGTERM);
    let status = worker
        .wait_exit(Duration::from_secs(10))
        .expect("an exit within 10 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    let job = client.job(&base, &id).await;
    assert_eq!(job["status"], "queued", "{job}");
    assert_eq!(job["attempts"], 0, "{job}");
    assert_eq!(job["worker"], Value::Null, "{job}");
    let (_, curve) = client.get(&base, &format!("/v1/jobs/{id}/curve")).await;
    assert_eq!(curve["points"], json!([]), "the partial curve is gone");
}

/// Threads of the process named as rayon's compute pool names them.
fn compute_threads(process: &Lrtune) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", process.pid())).expect("/proc");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("lrtune-compute"))
        .count()
}

#[test]
fn a_worker_trains_on_as_many_compute_threads_as_threads_asks() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lrtune.db");
    let db = db.to_str().unwrap();
    for threads in [1, 3] {
        let worker = Lrtune::worker(db, "threads", &["--threads", &threads.to_string()]);
        // The pool is built as the worker starts; its threads may take a moment to show.
        let deadline = Instant::now() + Duration::from_secs(10);
        while compute_threads(&worker) != threads && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(compute_threads(&worker), threads);
    }
}
