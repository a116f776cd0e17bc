//! Faults under a running server, with real processes: the SQLite file's disk filled up, the
//! file made read-only or removed, PostgreSQL restarted and stopped mid-run, a worker frozen
//! past its lease. An accepted job (202) is never lost, no request gets a 500 or hangs, the
//! service recovers without a restart, SIGTERM always ends the process in time, and a job ends
//! with exactly one result and one set of points.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Connection, Row};

use crate::helpers::json_of;
use crate::support::fixtures::small_job;
use crate::support::process::{Lrtune, Postgres, Tmpfs};
use crate::support::run::lrtune_dev_binary;

/// A job of ten seconds or so: a long range test (a point every step) on the digits.
fn long_job(name: &str) -> Value {
    json!({
        "name": name,
        "data": {"builtin": "mnist10k"},
        "model": {"arch": "mlp", "hidden": [256, 256]},
        "batch_size": 64,
        "plan": {"epochs": 1},
        "range_test": {"steps": 2500, "end_lr": 0.05},
        "sweep": {"count": 2, "epochs": 1}
    })
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(base: &str) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            base: base.to_string(),
        }
    }

    /// The status, the `Retry-After` header and the body.
    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Option<String>, Value) {
        let response = request.send().await.expect("the server answers");
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        let (status, body) = json_of(response).await;
        (status, retry_after, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (status, _, body) = self
            .send(self.http.get(format!("{}{path}", self.base)))
            .await;
        (status, body)
    }

    async fn submit(&self, spec: &Value) -> (StatusCode, Option<String>, Value) {
        self.send(self.http.post(format!("{}/v1/jobs", self.base)).json(spec))
            .await
    }

    async fn submit_ok(&self, spec: &Value) -> String {
        let (status, _, body) = self.submit(spec).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    async fn job(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn wait_running_with_points(&self, id: &str, within: Duration) {
        let started = Instant::now();
        loop {
            let job = self.job(id).await;
            let (_, curve) = self.get(&format!("/v1/jobs/{id}/curve")).await;
            let points = curve["points"].as_array().map_or(0, Vec::len);
            if job["status"] == "running" && points > 0 {
                return;
            }
            assert_ne!(job["status"], "succeeded", "the job ended too soon: {job}");
            assert!(started.elapsed() < within, "the job did not start: {job}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_finished(&self, id: &str, within: Duration) -> Value {
        let started = Instant::now();
        loop {
            let (status, job) = self.get(&format!("/v1/jobs/{id}")).await;
            if status == StatusCode::OK
                && ["succeeded", "failed", "canceled"].contains(&job["status"].as_str().unwrap())
            {
                return job;
            }
            assert!(started.elapsed() < within, "job {id} did not finish: {job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Counts of answers by status code, for the note and the assertions.
fn tally(statuses: &[StatusCode]) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for status in statuses {
        *counts.entry(status.as_u16()).or_default() += 1;
    }
    counts
}

async fn integrity_check(db: &std::path::Path) -> String {
    let mut connection = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let verdict: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    connection.close().await.unwrap();
    verdict
}

/// The stored curve of a finished job is steps 0..steps_run, once each, from its last attempt.
async fn assert_sqlite_curve_written_once(db: &std::path::Path, job: &Value) {
    let steps_run = job["result"]["range_test"]["steps_run"].as_i64().unwrap();
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let row = sqlx::query(
        "SELECT count(*) AS points, count(DISTINCT step) AS steps, min(step) AS first,
                max(step) AS last, max(run) AS run, count(DISTINCT run) AS runs
         FROM curve_point WHERE job_id = ?",
    )
    .bind(job["id"].as_str().unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("points"), steps_run, "{job}");
    assert_eq!(row.get::<i64, _>("steps"), steps_run);
    assert_eq!(row.get::<i64, _>("first"), 0);
    assert_eq!(row.get::<i64, _>("last"), steps_run - 1);
    assert_eq!(row.get::<i64, _>("runs"), 1);
    assert_eq!(row.get::<i64, _>("run"), job["attempts"].as_i64().unwrap());
    pool.close().await;
}

/// As root: a tmpfs of its own, and `chattr +i` (see tests/support).
mod as_root {
    use super::*;

    #[tokio::test]
    async fn a_full_disk_loses_no_accepted_job_names_the_cause_and_recovers_once_space_is_freed() {
        let disk = Tmpfs::mount("8m");
        let db = disk.path.join("lrtune.db");
        let db_arg = db.to_str().unwrap().to_string();
        let flags = ["--grace", "2", "--stale-after", "3"];
        let mut server = Lrtune::serve(&db_arg, &flags);
        let base = server.address.clone();
        let api = Api::new(&base);

        let running = api.submit_ok(&long_job("running-while-full")).await;
        api.wait_running_with_points(&running, Duration::from_secs(60))
            .await;
        let filled = disk.fill("filler");
        assert!(filled > 0, "the disk had room to fill");

        // Every submit is answered: 202 (committed), or a 507 (or 503) that names the full disk.
        let mut statuses = Vec::new();
        let mut accepted = Vec::new();
        for index in 0..50 {
            let (status, retry_after, body) =
                api.submit(&small_job(&format!("full-{index}"))).await;
            statuses.push(status);
            match status {
                StatusCode::ACCEPTED => accepted.push(body["id"].as_str().unwrap().to_string()),
                StatusCode::INSUFFICIENT_STORAGE => {
                    assert_eq!(body["error"]["code"], "disk_full", "{body}");
                    let message = body["error"]["message"].as_str().unwrap();
                    assert!(message.contains("disk is full"), "{message}");
                    assert!(!message.contains("locked"), "{message}");
                    assert!(retry_after.is_some(), "a 507 says when to try again");
                }
                other => panic!("submit {index} on a full disk answered {other}: {body}"),
            }
        }
        let submits = tally(&statuses);
        eprintln!("submits on a full disk, by status: {submits:?}");
        assert!(
            submits.get(&507).copied().unwrap_or(0) >= 40,
            "the disk is full, so (nearly) every submit is refused: {submits:?}"
        );
        // An upload is refused the same way (or stored, when the write-ahead log still had a free
        // page for it, as a few of the submits were).
        let (status, _, body) = api
            .send(
                api.http
                    .post(format!("{base}/v1/datasets?format=csv&name=full"))
                    .body("a,b,label\n1,2,0\n3,4,1\n"),
            )
            .await;
        match status {
            StatusCode::CREATED => assert_eq!(body["name"], "full"),
            StatusCode::INSUFFICIENT_STORAGE => assert_eq!(body["error"]["code"], "disk_full"),
            other => panic!("an upload on a full disk answered {other}: {body}"),
        }
        // Health says why.
        let (status, health) = api.get("/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
        assert!(
            health["reason"].as_str().unwrap().contains("disk full"),
            "{health}"
        );
        // Reads go on.
        assert_eq!(api.job(&running).await["id"], running.as_str());

        // Space freed: service within 5 s, no restart.
        std::fs::remove_file(disk.path.join("filler")).unwrap();
        let freed = Instant::now();
        let recovered = loop {
            let (health, _) = api.get("/healthz").await;
            let (status, _, body) = api.submit(&small_job("after-freeing")).await;
            if health == StatusCode::OK && status == StatusCode::ACCEPTED {
                accepted.push(body["id"].as_str().unwrap().to_string());
                break freed.elapsed();
            }
            assert!(
                freed.elapsed() < Duration::from_secs(5),
                "no recovery 5 s after freeing space: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!("recovered {recovered:?} after the space was freed");
        // The job that ran through it succeeds, with each of its points once.
        let job = api.wait_finished(&running, Duration::from_secs(180)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_sqlite_curve_written_once(&db, &job).await;
        for id in &accepted {
            assert_eq!(
                api.wait_finished(id, Duration::from_secs(120)).await["status"],
                "succeeded"
            );
        }

        // Full again with a job running: SIGTERM still ends the process within the grace
        // period (2 s; the runtime's last 0.2 s and the process's exit aside).
        let interrupted = api.submit_ok(&long_job("interrupted")).await;
        api.wait_running_with_points(&interrupted, Duration::from_secs(60))
            .await;
        disk.fill("filler");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let signaled = Instant::now();
        server.signal(Signal::SIGTERM);
        let exited = server.wait_exit(Duration::from_secs(20));
        let took = signaled.elapsed();
        assert!(
            exited.is_some(),
            "still running {took:?} after SIGTERM:\n{}",
            server.log_text()
        );
        eprintln!("exited {took:?} after SIGTERM on a full disk");
        assert!(took < Duration::from_millis(2500), "{took:?}");
        drop(server);

        // After a restart (with space again), every accepted job is there, and the interrupted
        // one runs again to the end.
        std::fs::remove_file(disk.path.join("filler")).unwrap();
        let server = Lrtune::serve(&db_arg, &flags);
        let api = Api::new(&server.address);
        for id in accepted.iter().chain([&running, &interrupted]) {
            let (status, job) = api.get(&format!("/v1/jobs/{id}")).await;
            assert_eq!(status, StatusCode::OK, "accepted job {id} was lost: {job}");
        }
        let job = api
            .wait_finished(&interrupted, Duration::from_secs(180))
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_sqlite_curve_written_once(&db, &job).await;
        drop(server);
        assert_eq!(integrity_check(&db).await, "ok");
    }

    #[tokio::test]
    async fn a_database_file_made_read_only_or_removed_under_the_server_gets_503s_and_a_red_health()
    {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("lrtune.db");
        let db_arg = db.to_str().unwrap().to_string();
        let mut server = Lrtune::serve(&db_arg, &[]);
        let api = Api::new(&server.address);
        let earlier = api.submit_ok(&small_job("before")).await;
        assert_eq!(
            api.wait_finished(&earlier, Duration::from_secs(60)).await["status"],
            "succeeded"
        );

        // Read-only: immutable, so that not even root may write it.
        let immutable = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&db)
            .status()
            .is_ok_and(|status| status.success());
        assert!(
            immutable,
            "chattr +i is needed (as root, on ext4) for the read-only case; \
         `cargo test -- --skip as_root` leaves the root-only tests out"
        );
        {
            let (status, retry_after, body) = api.submit(&small_job("read-only")).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert_eq!(retry_after.as_deref(), Some("2"));
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("is read-only"), "{message}");
            let (status, health) = api.get("/healthz").await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
            assert!(health["reason"].as_str().unwrap().contains("read-only"));
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&db)
                .status();
            let id = api.submit_ok(&small_job("writable-again")).await;
            assert_eq!(
                api.wait_finished(&id, Duration::from_secs(60)).await["status"],
                "succeeded"
            );
        }

        // Removed: SQLite would go on writing to the unlinked file, lost at the next start.
        std::fs::remove_file(&db).unwrap();
        let mut statuses = Vec::new();
        for index in 0..5 {
            let (status, retry_after, body) =
                api.submit(&small_job(&format!("gone-{index}"))).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert_eq!(retry_after.as_deref(), Some("2"));
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("was removed or replaced"), "{message}");
            statuses.push(status);
        }
        let (status, health) = api.get("/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
        assert!(server.is_alive(), "no panic, no exit");
        let log = server.log_text();
        assert!(
            log.contains("was removed or replaced while the server had it open"),
            "a clear log line: {log}"
        );
        assert!(!log.contains("panicked"), "{log}");
        eprintln!(
            "submits with the file removed, by status: {:?}",
            tally(&statuses)
        );

        server.signal(Signal::SIGTERM);
        assert!(server.wait_exit(Duration::from_secs(15)).is_some());
    }
}

/// A tune of a few seconds (a range test, then a sweep of three candidates).
fn tune_job(name: &str) -> Value {
    json!({
        "name": name,
        "data": {"builtin": "spirals", "samples": 4096},
        "model": {"arch": "mlp", "hidden": [128, 128]},
        "batch_size": 32,
        "plan": {"epochs": 1},
        "range_test": {"steps": 3000, "end_lr": 0.05},
        "sweep": {"count": 3, "epochs": 1}
    })
}

/// The stored curve of each finished job is steps 0..steps_run, once each, from its last
/// attempt only, and its sweep runs are the result's.
async fn assert_postgres_outputs_written_once(url: &str, jobs: &[Value]) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    for job in jobs {
        let id = job["id"].as_str().unwrap();
        let steps_run = job["result"]["range_test"]["steps_run"].as_i64().unwrap();
        let row = sqlx::query(
            "SELECT count(*) AS points, count(DISTINCT step) AS steps, min(step) AS first,
                    max(step) AS last, count(DISTINCT run) AS runs, max(run) AS run
             FROM curve_point WHERE job_id = $1",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(row.get::<i64, _>("points"), steps_run, "{job}");
        assert_eq!(row.get::<i64, _>("steps"), steps_run, "{job}");
        assert_eq!(row.get::<i64, _>("first"), 0);
        assert_eq!(row.get::<i64, _>("last"), steps_run - 1);
        assert_eq!(
            row.get::<i64, _>("runs"),
            1,
            "points of one attempt only: {job}"
        );
        assert_eq!(row.get::<i64, _>("run"), job["attempts"].as_i64().unwrap());
        let sweep_runs: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sweep_run WHERE job_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            sweep_runs as usize,
            job["result"]["sweep"].as_array().unwrap().len(),
            "{job}"
        );
    }
    pool.close().await;
}

/// On PostgreSQL servers of the tests' own (initdb and pg_ctl; see tests/support).
mod on_postgres {
    use super::*;

    #[tokio::test]
    async fn a_postgres_restart_and_a_10_s_outage_mid_run_lose_nothing_and_answer_only_503_meanwhile(
    ) {
        let postgres = Postgres::start();
        let url = postgres.url();
        let lease = ["--stale-after", "3"];
        let mut api_process = Lrtune::serve(&url, &["--workers", "0", "--stale-after", "3"]);
        let base = api_process.address.clone();
        let mut workers = [
            Lrtune::worker(&url, "one", &lease),
            Lrtune::worker(&url, "two", &lease),
        ];
        let api = Api::new(&base);
        let mut ids = Vec::new();
        for index in 0..10 {
            ids.push(api.submit_ok(&tune_job(&format!("outage-{index}"))).await);
        }
        api.wait_running_with_points(&ids[0], Duration::from_secs(60))
            .await;

        // The API's latency benchmark at 200 requests/s all through the restart and the outage.
        let load = std::process::Command::new(lrtune_dev_binary())
            .args([
                "bench-api",
                "--server",
                &base,
                "--rate",
                "200",
                "--seconds",
                "22",
            ])
            .args(["--connections", "32", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("bench-api starts");
        tokio::time::sleep(Duration::from_secs(2)).await;

        postgres.restart_fast();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let running_at_outage: Vec<(String, usize)> = {
            let mut running = Vec::new();
            for id in &ids {
                let job = api.job(id).await;
                if job["status"] == "running" {
                    let (_, curve) = api.get(&format!("/v1/jobs/{id}/curve")).await;
                    running.push((id.clone(), curve["points"].as_array().map_or(0, Vec::len)));
                }
            }
            running
        };
        postgres.stop();
        let stopped = Instant::now();
        // While it is down: a write is a 503 with Retry-After, and health says why.
        let (status, retry_after, body) = api.submit(&tune_job("during-outage")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "unavailable");
        assert_eq!(retry_after.as_deref(), Some("2"));
        let (status, health) = api.get("/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
        assert_eq!(health["status"], "unavailable");
        tokio::time::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed())).await;

        postgres.start_again();
        let back = Instant::now();
        let first_2xx = loop {
            let (status, _) = api.get("/v1/jobs?limit=1").await;
            if status.is_success() {
                break back.elapsed();
            }
            assert!(
                back.elapsed() < Duration::from_secs(5),
                "no 2xx within 5 s: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The jobs running at the outage write again (their buffered points at once), or were
        // queued again when their lease ran out.
        let mut last_flushed = Duration::ZERO;
        for (id, points_before) in &running_at_outage {
            loop {
                let job = api.job(id).await;
                let (_, curve) = api.get(&format!("/v1/jobs/{id}/curve")).await;
                let points = curve["points"].as_array().map_or(0, Vec::len);
                if points > *points_before || job["status"] != "running" {
                    last_flushed = last_flushed.max(back.elapsed());
                    break;
                }
                assert!(back.elapsed() < Duration::from_secs(30), "{job}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        eprintln!(
            "database back: first 2xx after {first_2xx:?}, running jobs writing again after \
         {last_flushed:?}"
        );

        let mut jobs = Vec::new();
        for id in &ids {
            let job = api.wait_finished(id, Duration::from_secs(300)).await;
            assert_eq!(job["status"], "succeeded", "{job}");
            assert!(job["attempts"].as_i64().unwrap() <= 2, "{job}");
            jobs.push(job);
        }
        assert_postgres_outputs_written_once(&url, &jobs).await;
        let attempts: Vec<i64> = jobs
            .iter()
            .map(|j| j["attempts"].as_i64().unwrap())
            .collect();
        eprintln!("attempts per job: {attempts:?}");

        let output = load.wait_with_output().expect("bench-api ends");
        let report: Value = serde_json::from_slice(&output.stdout).expect("bench-api prints JSON");
        let phase = &report["phases"]["server"];
        eprintln!("load through the outage, by status: {}", phase["by_status"]);
        assert_eq!(report["passed"], true, "{report}");
        assert_eq!(phase["unavailable_without_retry_after"], 0);
        let by_status = phase["by_status"].as_object().unwrap();
        assert!(
            by_status
                .keys()
                .all(|status| status == "2xx" || status == "503"),
            "{by_status:?}"
        );
        assert!(
            by_status["503"].as_u64().unwrap_or(0) > 0,
            "the outage was seen"
        );
        assert_eq!(output.status.code(), Some(0));

        assert!(api_process.is_alive(), "the API exited");
        for worker in &mut workers {
            assert!(worker.is_alive(), "a worker exited:\n{}", worker.log_text());
        }
    }

    #[tokio::test]
    async fn a_worker_frozen_past_its_lease_loses_the_job_to_another_and_its_late_writes_are_refused(
    ) {
        let postgres = Postgres::start();
        let url = postgres.url();
        let stale_after = Duration::from_secs(2);
        let lease = ["--stale-after", "2"];
        let api_process = Lrtune::serve(&url, &["--workers", "0", "--stale-after", "2"]);
        let workers = [
            Lrtune::worker(&url, "one", &lease),
            Lrtune::worker(&url, "two", &lease),
        ];
        let api = Api::new(&api_process.address);
        let id = api.submit_ok(&long_job("frozen")).await;
        api.wait_running_with_points(&id, Duration::from_secs(60))
            .await;
        let first = api.job(&id).await;
        let frozen_name = first["worker"].as_str().unwrap().to_string();
        let (frozen, other_name) = if frozen_name.starts_with("one@") {
            (&workers[0], "two@")
        } else {
            (&workers[1], "one@")
        };

        frozen.signal(Signal::SIGSTOP);
        tokio::time::sleep(stale_after * 3).await;
        let taken = api.job(&id).await;
        frozen.signal(Signal::SIGCONT);
        assert_eq!(taken["attempts"], 2, "requeued and claimed again: {taken}");
        assert_ne!(taken["worker"], frozen_name.as_str(), "{taken}");

        let job = api.wait_finished(&id, Duration::from_secs(300)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 2);
        assert!(
            job["worker"].as_str().unwrap().starts_with(other_name),
            "{job}"
        );
        assert_postgres_outputs_written_once(&url, std::slice::from_ref(&job)).await;

        // The woken worker said once that its writes were refused, dropped the job and went back
        // to claiming (it is alive and runs the next job if it gets it).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let frozen_log = frozen.log_text();
        assert_eq!(
            frozen_log.matches("its writes are refused").count(),
            1,
            "{frozen_log}"
        );
        let next = [
            api.submit_ok(&small_job("after-1")).await,
            api.submit_ok(&small_job("after-2")).await,
            api.submit_ok(&small_job("after-3")).await,
        ];
        for id in &next {
            assert_eq!(
                api.wait_finished(id, Duration::from_secs(60)).await["status"],
                "succeeded"
            );
        }
    }
}
