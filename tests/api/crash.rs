//! The real binary, killed with SIGKILL in the middle of a job, then started again on the
//! same database: no job is lost, none is half written.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use sqlx::Row;

use crate::helpers::json_of;
use crate::support::fixtures::long_job;
use crate::support::process::Lrtune;

/// `lrtune serve` on `db`, its lease short so that a killed one's job is soon taken again.
fn start_server(db: &Path, extra: &[&str]) -> Lrtune {
    let mut flags = vec!["--stale-after", "1"];
    flags.extend_from_slice(extra);
    Lrtune::serve(db, &flags)
}

/// Long enough (a few seconds) to be killed in the middle of.
fn job_spec(index: usize) -> Value {
    let mut spec = long_job(&format!("crash-{index}"));
    spec["plan"]["epochs"] = json!(2);
    spec
}

async fn get(client: &reqwest::Client, server: &Lrtune, path: &str) -> Value {
    let response = client
        .get(format!("{}{path}", server.address))
        .send()
        .await
        .expect("the server answers");
    json_of(response).await.1
}

#[tokio::test]
async fn a_server_killed_mid_job_finishes_every_job_after_a_restart_with_one_point_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lrtune.db");
    let client = reqwest::Client::new();

    let mut server = start_server(&db, &[]);
    let mut ids = Vec::new();
    for index in 0..3 {
        let response = client
            .post(format!("{}/v1/jobs", server.address))
            .json(&job_spec(index))
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    // Kill it once the first job is running and part of its curve is in the database.
    let started = Instant::now();
    loop {
        let job = get(&client, &server, &format!("/v1/jobs/{}", ids[0])).await;
        let curve = get(&client, &server, &format!("/v1/jobs/{}/curve", ids[0])).await;
        let stored = curve["points"].as_array().map_or(0, Vec::len);
        if job["status"] == "running" && stored > 0 {
            break;
        }
        assert_ne!(
            job["status"], "succeeded",
            "the first job ended before the kill"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "{job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    drop(server);

    let server = start_server(&db, &[]);
    let started = Instant::now();
    let mut jobs = Vec::new();
    for id in &ids {
        loop {
            let job = get(&client, &server, &format!("/v1/jobs/{id}")).await;
            let status = job["status"].as_str().unwrap_or_default().to_string();
            if ["succeeded", "failed", "canceled"].contains(&status.as_str()) {
                jobs.push(job);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "job {id} is still {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for job in &jobs {
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    assert_eq!(jobs[0]["attempts"], 2, "the killed job ran twice");
    assert_eq!(jobs[1]["attempts"], 1);

    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    for (id, job) in ids.iter().zip(&jobs) {
        let steps_run = job["result"]["range_test"]["steps_run"].as_i64().unwrap();
        let curve = get(&client, &server, &format!("/v1/jobs/{id}/curve")).await;
        let steps: Vec<i64> = curve["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|point| point["step"].as_i64().unwrap())
            .collect();
        assert_eq!(steps, (0..steps_run).collect::<Vec<_>>(), "job {id}");

        let row = sqlx::query(
            "SELECT count(*) AS points, count(DISTINCT step) AS steps, min(step) AS first,
                    max(step) AS last, count(DISTINCT run) AS runs, max(run) AS run
             FROM curve_point WHERE job_id = ?",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(row.get::<i64, _>("points"), steps_run, "job {id}");
        assert_eq!(row.get::<i64, _>("steps"), steps_run);
        assert_eq!(row.get::<i64, _>("first"), 0);
        assert_eq!(row.get::<i64, _>("last"), steps_run - 1);
        assert_eq!(row.get::<i64, _>("runs"), 1, "points of one attempt only");
        assert_eq!(
            row.get::<i64, _>("run"),
            job["attempts"].as_i64().unwrap(),
            "the points are the last attempt's"
        );
    }
    pool.close().await;
}

#[tokio::test]
async fn sigterm_lets_the_running_job_finish_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lrtune.db");
    let client = reqwest::Client::new();
    let mut server = start_server(&db, &["--grace", "60"]);
    let response = client
        .post(format!("{}/v1/jobs", server.address))
        .json(&job_spec(0))
        .send()
        .await
        .unwrap();
    let (_, body) = json_of(response).await;
    let id = body["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    while get(&client, &server, &format!("/v1/jobs/{id}")).await["status"] != "running" {
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.signal(Signal::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(60))
        .expect("an exit within 60 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    let store = lrtune::store::Store::open(&db).await.unwrap();
    let job = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(job.status, lrtune::store::JobStatus::Succeeded);
}

#[tokio::test]
async fn a_job_whose_worker_keeps_dying_fails_with_the_stage_it_died_in() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lrtune.db");
    let client = reqwest::Client::new();
    let flags = ["--max-attempts", "1"];

    let mut server = start_server(&db, &flags);
    let response = client
        .post(format!("{}/v1/jobs", server.address))
        .json(&job_spec(0))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    loop {
        let job = get(&client, &server, &format!("/v1/jobs/{id}")).await;
        if job["progress"]["stage"] == "range_test" && job["progress"]["done"].as_i64() > Some(0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    drop(server);

    // Its one attempt is spent: the restarted server fails it instead of running it again.
    let server = start_server(&db, &flags);
    let started = Instant::now();
    let job = loop {
        let job = get(&client, &server, &format!("/v1/jobs/{id}")).await;
        if job["status"] != "running" && job["status"] != "queued" {
            break job;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    assert_eq!(job["error"]["code"], "worker_lost", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "the worker died while running this job (attempts: 1; last seen in stage range_test at step "
        ),
        "{message}"
    );
    assert!(
        message.ends_with(
            "; no heartbeat for 1.0 s); it may have been killed for running out of memory: giving up"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn a_race_killed_mid_run_is_queued_again_and_keeps_only_the_last_attempts_points() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lrtune.db");
    let client = reqwest::Client::new();
    let spec = json!({
        "name": "crash-race",
        "kind": "compare",
        "data": {"builtin": "spirals", "samples": 2048},
        "model": {"arch": "mlp", "hidden": [128, 128]},
        "batch_size": 32,
        "plan": {"epochs": 8},
        "range_test": {"steps": 30},
        "sweep": {"count": 2, "epochs": 1},
        "budget": {"steps": 200},
        "recipes": ["sgd_one_cycle", "adam_constant"],
        "seeds": 1
    });

    let mut server = start_server(&db, &[]);
    let response = client
        .post(format!("{}/v1/jobs", server.address))
        .json(&spec)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    // Killed once part of the race is in the database.
    let started = Instant::now();
    loop {
        let curve = get(&client, &server, &format!("/v1/jobs/{id}/curve")).await;
        if curve["race_points"].as_array().map_or(0, Vec::len) > 0 {
            break;
        }
        let job = get(&client, &server, &format!("/v1/jobs/{id}")).await;
        assert_ne!(job["status"], "succeeded", "the race ended before the kill");
        assert!(started.elapsed() < Duration::from_secs(60), "{job}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    drop(server);

    let server = start_server(&db, &[]);
    let started = Instant::now();
    let job = loop {
        let job = get(&client, &server, &format!("/v1/jobs/{id}")).await;
        if ["succeeded", "failed", "canceled"].contains(&job["status"].as_str().unwrap_or_default())
        {
            break job;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2, "the killed race ran twice");
    let expected: usize = job["result"]["recipes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|recipe| recipe["runs"].as_array().unwrap())
        .map(|run| run["points"].as_array().unwrap().len())
        .sum();
    assert_eq!(expected, 2 * 26);
    let curve = get(&client, &server, &format!("/v1/jobs/{id}/curve")).await;
    assert_eq!(curve["race_points"].as_array().unwrap().len(), expected);

    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let row = sqlx::query(
        "SELECT count(*) AS points, min(position) AS first, max(position) AS last,
                count(DISTINCT run) AS runs, max(run) AS run
         FROM race_point WHERE job_id = ?",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("points"), expected as i64);
    assert_eq!(row.get::<i64, _>("first"), 0);
    assert_eq!(row.get::<i64, _>("last"), expected as i64 - 1);
    assert_eq!(row.get::<i64, _>("runs"), 1, "points of one attempt only");
    assert_eq!(
        row.get::<i64, _>("run"),
        2,
        "the points are the second attempt's"
    );
    pool.close().await;
}
