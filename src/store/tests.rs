//! One suite for both backends: every case runs on a SQLite file of its own and on a
//! PostgreSQL database of its own (see `scratch`), so that the two keep the same meaning.
//! Where a case needs "another process", it opens a second store on the same database.

use std::collections::BTreeSet;
use std::time::Duration;

use tempfile::TempDir;

use super::scratch::ScratchDatabase;
use super::*;
use crate::engine::data::Task;
use crate::engine::spec::JobKind;
use crate::engine::TrialKind;

struct TestDb {
    url: DatabaseUrl,
    _dir: Option<TempDir>,
    _scratch: Option<ScratchDatabase>,
}

impl TestDb {
    async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("a temporary directory");
        TestDb {
            url: dir.path().join("lrtune.db").into(),
            _dir: Some(dir),
            _scratch: None,
        }
    }

    async fn postgres() -> Option<TestDb> {
        let scratch = ScratchDatabase::create().await?;
        Some(TestDb {
            url: DatabaseUrl::parse(&scratch.url).expect("a postgres URL"),
            _dir: None,
            _scratch: Some(scratch),
        })
    }

    /// The one integer `sql` selects, read behind the store's back.
    async fn count(&self, sql: &str) -> i64 {
        use sqlx::{ConnectOptions, Connection};
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match &self.url {
            DatabaseUrl::Postgres(url) => {
                let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::query_scalar(sql)
                    .fetch_one(&mut connection)
                    .await
                    .unwrap()
            }
            DatabaseUrl::SqlitePath(path) => {
                let mut connection = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .connect()
                    .await
                    .unwrap();
                sqlx::query_scalar(sql)
                    .fetch_one(&mut connection)
                    .await
                    .unwrap()
            }
            DatabaseUrl::SqliteUrl(url) => {
                let mut connection = sqlx::SqliteConnection::connect(url).await.unwrap();
                sqlx::query_scalar(sql)
                    .fetch_one(&mut connection)
                    .await
                    .unwrap()
            }
        }
    }

    /// Runs `sql` on the database behind the store's back, as a damaged file or another
    /// version of lrtune could have written it (the tests' own SQL, with ids they made).
    async fn tamper(&self, sql: &str) {
        use sqlx::{ConnectOptions, Connection};
        match &self.url {
            DatabaseUrl::Postgres(url) => {
                let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut connection)
                    .await
                    .unwrap();
            }
            DatabaseUrl::SqlitePath(path) => {
                let mut connection = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .connect()
                    .await
                    .unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut connection)
                    .await
                    .unwrap();
            }
            DatabaseUrl::SqliteUrl(url) => {
                let mut connection = sqlx::SqliteConnection::connect(url).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut connection)
                    .await
                    .unwrap();
            }
        }
    }

    async fn open(&self) -> Store {
        Store::open(self.url.clone())
            .await
            .unwrap_or_else(|error| panic!("opening {}: {error}", self.url))
    }
}

macro_rules! store_suite {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = super::TestDb::sqlite().await;
                    super::$case(&db).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(db) = super::TestDb::postgres().await else { return };
                    super::$case(&db).await;
                }
            )*
        }
    };
}

store_suite!(
    jobs_are_listed_newest_first_in_pages_and_by_status,
    a_submit_beyond_max_queued_is_refused,
    a_claim_takes_the_oldest_queued_job_and_counts_the_attempt,
    concurrent_claims_from_two_processes_never_take_a_job_twice,
    points_and_sweep_runs_are_written_once_and_read_after_a_cursor,
    race_points_are_written_once_read_after_a_cursor_and_dropped_with_a_requeue,
    trials_are_written_as_they_start_and_end_once_and_dropped_with_a_requeue,
    a_database_from_before_trials_gets_the_table_and_its_jobs_read_back,
    a_requeue_at_shutdown_deletes_the_outputs_and_does_not_count_the_attempt,
    an_attempt_that_lost_its_job_cannot_write,
    an_expired_lease_is_queued_again_counting_the_attempt_then_failed_when_spent,
    two_processes_reaping_at_once_take_an_expired_job_exactly_once,
    a_heartbeat_renews_the_lease,
    cancels_stop_queued_jobs_and_flag_running_ones,
    failed_and_canceled_attempts_keep_their_points,
    datasets_keep_their_bytes_and_page_newest_first,
    kinds_formats_and_tasks_read_back_as_written_and_an_unknown_one_is_a_corrupt_row,
    weights_keep_their_bytes_and_tensor_shapes_and_page_newest_first,
    uploads_larger_than_a_part_read_back_whole_and_rows_stored_inline_still_read,
    an_upload_beyond_the_stored_bytes_quota_is_refused_until_a_delete_makes_room,
    concurrent_uploads_from_two_processes_never_overshoot_the_quota,
    an_upload_named_by_a_queued_or_running_job_is_kept_and_deleted_once_the_job_ends,
    changes_are_announced_to_the_process_that_made_them,
    health_is_ok_and_names_the_backend,
);

fn new_job(name: &str) -> NewJob {
    NewJob {
        id: new_id("job"),
        kind: JobKind::Tune,
        name: Some(name.into()),
        spec: format!(r#"{{"name": "{name}"}}"#),
    }
}

async fn submit(store: &Store, name: &str) -> JobRow {
    store
        .insert_job(new_job(name), 1000)
        .await
        .unwrap()
        .expect("queued")
}

fn point(step: i64) -> PointRow {
    PointRow::new(
        step as usize,
        0.001 * (step + 1) as f64,
        2.0 - 0.01 * step as f64,
        1.9,
    )
}

fn sweep_run(position: i64) -> SweepRunRow {
    SweepRunRow {
        position,
        peak_lr: 0.01 * (position + 1) as f64,
        seed: 0,
        steps: Some(40),
        val_loss: Some(0.5),
        val_accuracy: None,
        train_loss: Some(f64::INFINITY),
        diverged: position == 2,
        spiked: Some(position == 1),
    }
}

fn update(
    points: impl IntoIterator<Item = i64>,
    runs: impl IntoIterator<Item = i64>,
) -> ProgressUpdate {
    let points: Vec<PointRow> = points.into_iter().map(point).collect();
    ProgressUpdate {
        stage: Some("range_test".into()),
        done: points.last().map_or(0, |p| p.step + 1),
        total: 100,
        points,
        sweep_runs: runs.into_iter().map(sweep_run).collect(),
        race_points: Vec::new(),
        trials: Vec::new(),
    }
}

fn race_point(position: i64) -> RacePointRow {
    RacePointRow {
        position,
        recipe: if position < 3 {
            "adam_constant"
        } else {
            "sgd_one_cycle"
        }
        .into(),
        seed: 7,
        step: 10 * (position % 3),
        seconds: 0.25 * position as f64,
        val_loss: Some(2.0 - 0.1 * position as f64),
        val_accuracy: (position != 4).then_some(0.1 * position as f64),
    }
}

fn race_update(positions: impl IntoIterator<Item = i64>) -> ProgressUpdate {
    ProgressUpdate {
        stage: Some("race".into()),
        done: 3,
        total: 100,
        race_points: positions.into_iter().map(race_point).collect(),
        ..ProgressUpdate::default()
    }
}

const LEASE: Duration = Duration::from_secs(60);

/// A quota no test reaches.
const NO_QUOTA: i64 = i64::MAX;

async fn claim(store: &Store, worker: &str) -> JobRow {
    store
        .claim_job(worker, LEASE)
        .await
        .unwrap()
        .expect("a job to claim")
}

async fn jobs_are_listed_newest_first_in_pages_and_by_status(db: &TestDb) {
    let store = db.open().await;
    let mut ids = Vec::new();
    for index in 0..5 {
        ids.push(submit(&store, &format!("job-{index}")).await.id);
    }
    let running = claim(&store, "w@h").await;
    assert_eq!(running.id, ids[0], "the oldest is claimed first");

    let first = store
        .list_jobs(&ListFilter {
            status: None,
            limit: 2,
            before: None,
        })
        .await
        .unwrap();
    let names: Vec<_> = first.iter().map(|job| job.name.clone().unwrap()).collect();
    assert_eq!(names, ["job-4", "job-3"]);
    let rest = store
        .list_jobs(&ListFilter {
            status: None,
            limit: 10,
            before: Some(first[1].seq),
        })
        .await
        .unwrap();
    let names: Vec<_> = rest.iter().map(|job| job.name.clone().unwrap()).collect();
    assert_eq!(names, ["job-2", "job-1", "job-0"]);

    let queued = store
        .list_jobs(&ListFilter {
            status: Some(JobStatus::Queued),
            limit: 10,
            before: None,
        })
        .await
        .unwrap();
    assert_eq!(queued.len(), 4);
    assert!(queued.iter().all(|job| job.status == JobStatus::Queued));
    let counts = store.count_jobs_by_status().await.unwrap();
    assert_eq!(
        counts,
        [
            (JobStatus::Queued, 4),
            (JobStatus::Running, 1),
            (JobStatus::Succeeded, 0),
            (JobStatus::Failed, 0),
            (JobStatus::Canceled, 0),
        ]
    );

    let job = store.get_job(&ids[1]).await.unwrap().unwrap();
    assert_eq!(job.kind, JobKind::Tune);
    assert_eq!(job.spec, r#"{"name": "job-1"}"#);
    assert_eq!(job.attempts, 0);
    assert!(
        job.created_at.ends_with('Z') && job.created_at.len() == 24,
        "{}",
        job.created_at
    );
    assert!(store.get_job("job_missing").await.unwrap().is_none());
}

async fn a_submit_beyond_max_queued_is_refused(db: &TestDb) {
    let store = db.open().await;
    for index in 0..2 {
        assert!(store
            .insert_job(new_job(&format!("{index}")), 2)
            .await
            .unwrap()
            .is_some());
    }
    assert!(store
        .insert_job(new_job("third"), 2)
        .await
        .unwrap()
        .is_none());
    // A running job no longer counts against the queue.
    claim(&store, "w@h").await;
    assert!(store
        .insert_job(new_job("third"), 2)
        .await
        .unwrap()
        .is_some());
}

async fn a_claim_takes_the_oldest_queued_job_and_counts_the_attempt(db: &TestDb) {
    let store = db.open().await;
    let first = submit(&store, "first").await;
    let second = submit(&store, "second").await;
    let claimed = claim(&store, "w1@host-a").await;
    assert_eq!(claimed.id, first.id);
    assert_eq!(claimed.status, JobStatus::Running);
    assert_eq!(claimed.attempts, 1);
    assert_eq!(claimed.worker.as_deref(), Some("w1@host-a"));
    let (started, heartbeat, lease) = (
        claimed.started_at.clone().expect("started"),
        claimed.heartbeat_at.clone().expect("a heartbeat"),
        claimed.lease_until.clone().expect("a lease"),
    );
    assert_eq!(started, heartbeat);
    assert!(lease > heartbeat, "{lease} after {heartbeat}");
    assert_eq!(claim(&store, "w2@host-b").await.id, second.id);
    assert!(store.claim_job("w3@host-c", LEASE).await.unwrap().is_none());
}

async fn concurrent_claims_from_two_processes_never_take_a_job_twice(db: &TestDb) {
    let one = db.open().await;
    let other = db.open().await;
    let mut ids = BTreeSet::new();
    for index in 0..12 {
        ids.insert(submit(&one, &format!("{index}")).await.id);
    }
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let store = if worker % 2 == 0 {
            one.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut claimed = Vec::new();
            loop {
                match store.claim_job(&format!("w{worker}@h"), LEASE).await {
                    Ok(Some(job)) => claimed.push(job.id),
                    Ok(None) => return claimed,
                    // SQLite: two processes' writers may meet the busy timeout; try again.
                    Err(error) if error.is_unavailable() => continue,
                    Err(error) => panic!("{error}"),
                }
            }
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    assert_eq!(claimed.len(), 12, "{claimed:?}");
    assert_eq!(claimed.into_iter().collect::<BTreeSet<_>>(), ids);
}

async fn points_and_sweep_runs_are_written_once_and_read_after_a_cursor(db: &TestDb) {
    let store = db.open().await;
    submit(&store, "job").await;
    let job = claim(&store, "w@h").await;
    let attempt = job.attempt();
    assert_eq!(
        store
            .record_progress(&attempt, &update(0..3, []), LEASE)
            .await
            .unwrap(),
        Some(false)
    );
    // A write retried after its answer was lost: the stored points stay as they were.
    let mut retried = update(2..5, [0]);
    retried.points[0].lr = 99.0;
    assert_eq!(
        store
            .record_progress(&attempt, &retried, LEASE)
            .await
            .unwrap(),
        Some(false)
    );
    let row = store.get_job(&job.id).await.unwrap().unwrap();
    assert_eq!(
        (row.stage.as_deref(), row.progress_done, row.progress_total),
        (Some("range_test"), 5, 100)
    );
    // The rest come with the final write, in the same transaction as the status.
    let done = store
        .finish_attempt(
            &attempt,
            &FinalState::Succeeded {
                result: r#"{"ok": true}"#.into(),
                steps: 7,
            },
            &update(5..7, [1, 2]),
        )
        .await
        .unwrap();
    assert!(done);
    let curve = store.curve(&job.id, None).await.unwrap();
    assert_eq!(curve, (0..7).map(point).collect::<Vec<_>>());
    assert_eq!(
        store.curve(&job.id, Some(4)).await.unwrap(),
        vec![point(5), point(6)]
    );
    let runs = store.sweep_runs(&job.id, 0).await.unwrap();
    assert_eq!(runs, (0..3).map(sweep_run).collect::<Vec<_>>());
    assert_eq!(
        store.sweep_runs(&job.id, 2).await.unwrap(),
        vec![sweep_run(2)]
    );
    // A run stored before `spiked` was recorded reads back as not known.
    db.tamper(&format!(
        "UPDATE sweep_run SET spiked = NULL WHERE job_id = '{}' AND position = 1",
        job.id
    ))
    .await;
    let runs = store.sweep_runs(&job.id, 1).await.unwrap();
    assert_eq!(
        runs.iter().map(|run| run.spiked).collect::<Vec<_>>(),
        [None, Some(false)]
    );
    let row = store.get_job(&job.id).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Succeeded);
    assert_eq!(row.result.as_deref(), Some(r#"{"ok": true}"#));
    assert_eq!((row.progress_done, row.progress_total), (7, 7));
    assert!(row.finished_at.is_some());
    assert!(row.lease_until.is_none());
    // A finished job takes no more writes.
    assert_eq!(
        store
            .record_progress(&attempt, &update(7..8, []), LEASE)
            .await
            .unwrap(),
        None
    );
    let nan = PointRow::new(8, 1.0, f64::NAN, f64::NAN);
    assert_eq!((nan.loss, nan.smoothed), (None, None));
}

async fn race_points_are_written_once_read_after_a_cursor_and_dropped_with_a_requeue(db: &TestDb) {
    let store = db.open().await;
    submit(&store, "race").await;
    let job = claim(&store, "w@h").await;
    let attempt = job.attempt();
    assert_eq!(
        store
            .record_progress(&attempt, &race_update(0..3), LEASE)
            .await
            .unwrap(),
        Some(false)
    );
    // A retried write keeps what is stored.
    let mut retried = race_update(2..4);
    retried.race_points[0].seconds = 99.0;
    store
        .record_progress(&attempt, &retried, LEASE)
        .await
        .unwrap();
    assert_eq!(
        store.race_points(&job.id, 0).await.unwrap(),
        (0..4).map(race_point).collect::<Vec<_>>()
    );
    assert_eq!(
        store.race_points(&job.id, 3).await.unwrap(),
        vec![race_point(3)]
    );
    // The last points come with the final write; another job's points are its own.
    assert!(store
        .finish_attempt(
            &attempt,
            &FinalState::Succeeded {
                result: r#"{"ranking": []}"#.into(),
                steps: 9,
            },
            &race_update(4..6),
        )
        .await
        .unwrap());
    let stored = store.race_points(&job.id, 0).await.unwrap();
    assert_eq!(stored, (0..6).map(race_point).collect::<Vec<_>>());
    assert_eq!(stored[4].val_accuracy, None);
    assert!(store.curve(&job.id, None).await.unwrap().is_empty());

    submit(&store, "requeued").await;
    let other = claim(&store, "w@h").await;
    store
        .record_progress(&other.attempt(), &race_update(0..2), LEASE)
        .await
        .unwrap();
    assert_eq!(store.race_points(&other.id, 0).await.unwrap().len(), 2);
    assert!(store
        .finish_attempt(&other.attempt(), &FinalState::Requeue, &race_update(2..3))
        .await
        .unwrap());
    assert!(store.race_points(&other.id, 0).await.unwrap().is_empty());
    assert_eq!(store.race_points(&job.id, 0).await.unwrap().len(), 6);
}

fn trial(position: i64, status: TrialStatus) -> TrialUpdate {
    let finished = status != TrialStatus::Running;
    TrialUpdate {
        position,
        kind: if position == 0 {
            TrialKind::RangeTest
        } else {
            TrialKind::Sweep
        },
        lr: (position > 0).then_some(0.01 * position as f64),
        recipe: (position == 2).then(|| "adam_one_cycle".to_string()),
        seed: 7 + position,
        steps: 40,
        status,
        seconds: finished.then_some(1.5),
        steps_run: finished.then_some(40 - position),
        val_loss: (status == TrialStatus::Succeeded && position > 0).then_some(0.25),
        val_accuracy: None,
        diverged_at: (status == TrialStatus::Succeeded && position == 2).then_some(38),
    }
}

fn trial_update(trials: impl IntoIterator<Item = TrialUpdate>) -> ProgressUpdate {
    ProgressUpdate {
        stage: Some("sweep".into()),
        trials: trials.into_iter().collect(),
        ..ProgressUpdate::default()
    }
}

async fn trials_are_written_as_they_start_and_end_once_and_dropped_with_a_requeue(db: &TestDb) {
    use TrialStatus::{Canceled, Running, Succeeded};
    let store = db.open().await;
    submit(&store, "tune").await;
    let job = claim(&store, "w@h").await;
    let attempt = job.attempt();
    // The range test starts and ends, and a sweep run starts, in one write.
    let first = [trial(0, Running), trial(0, Succeeded), trial(1, Running)];
    store
        .record_progress(&attempt, &trial_update(first.clone()), LEASE)
        .await
        .unwrap();
    let stored = store.trials(&job.id).await.unwrap();
    assert_eq!(stored.len(), 2);
    let range = &stored[0];
    assert_eq!(
        (range.position, range.run, range.kind, range.status),
        (0, 1, TrialKind::RangeTest, Succeeded)
    );
    assert_eq!(range.worker.as_deref(), Some("w@h"));
    assert_eq!((range.seconds, range.steps_run), (Some(1.5), Some(40)));
    assert!(range.finished_at.as_deref() >= Some(range.started_at.as_str()));
    let running = &stored[1];
    assert_eq!(
        (running.status, running.lr, running.seed),
        (Running, Some(0.01), 8)
    );
    assert_eq!((running.finished_at.clone(), running.seconds), (None, None));
    assert_eq!(
        store.count_trials_by_status().await.unwrap(),
        vec![
            (Running, 1),
            (Succeeded, 1),
            (TrialStatus::Failed, 0),
            (Canceled, 0)
        ]
    );

    // A retried write (its first try committed) changes nothing: an ended trial stays ended.
    store
        .record_progress(&attempt, &trial_update(first), LEASE)
        .await
        .unwrap();
    assert_eq!(store.trials(&job.id).await.unwrap(), stored);

    // The last trials end with the attempt's final write.
    assert!(store
        .finish_attempt(
            &attempt,
            &FinalState::Canceled,
            &trial_update([trial(2, Running), trial(2, Succeeded), trial(1, Canceled)]),
        )
        .await
        .unwrap());
    let stored = store.trials(&job.id).await.unwrap();
    let statuses: Vec<TrialStatus> = stored.iter().map(|t| t.status).collect();
    assert_eq!(statuses, vec![Succeeded, Canceled, Succeeded]);
    assert_eq!(stored[2].recipe.as_deref(), Some("adam_one_cycle"));
    assert_eq!(
        (stored[2].val_loss, stored[2].diverged_at),
        (Some(0.25), Some(38))
    );
    assert_eq!(stored[1].val_loss, None);

    // A requeue drops the attempt's trials with its other outputs.
    submit(&store, "requeued").await;
    let other = claim(&store, "w@h").await;
    store
        .record_progress(&other.attempt(), &trial_update([trial(0, Running)]), LEASE)
        .await
        .unwrap();
    assert_eq!(store.trials(&other.id).await.unwrap().len(), 1);
    assert!(store
        .finish_attempt(&other.attempt(), &FinalState::Requeue, &trial_update([]))
        .await
        .unwrap());
    assert!(store.trials(&other.id).await.unwrap().is_empty());
    assert_eq!(store.trials(&job.id).await.unwrap().len(), 3);
}

async fn a_database_from_before_trials_gets_the_table_and_its_jobs_read_back(db: &TestDb) {
    let store = db.open().await;
    submit(&store, "old").await;
    let job = claim(&store, "w@h").await;
    assert!(store
        .finish_attempt(
            &job.attempt(),
            &FinalState::Succeeded {
                result: "{}".into(),
                steps: 6,
            },
            &update(0..4, [0, 1]),
        )
        .await
        .unwrap());
    store.close().await;
    // As the previous version left it: no trial table, its migration not applied.
    let version = match db.url {
        DatabaseUrl::Postgres(_) => 6,
        _ => 8,
    };
    db.tamper(&format!(
        "DROP TABLE trial; DELETE FROM _sqlx_migrations WHERE version = {version};"
    ))
    .await;
    let store = db.open().await;
    let row = store.get_job(&job.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (JobStatus::Succeeded, 1));
    assert_eq!(store.curve(&job.id, None).await.unwrap().len(), 4);
    assert_eq!(store.sweep_runs(&job.id, 0).await.unwrap().len(), 2);
    assert!(store.trials(&job.id).await.unwrap().is_empty());
    assert_eq!(db.count("SELECT count(*) FROM trial").await, 0);
}

async fn a_requeue_at_shutdown_deletes_the_outputs_and_does_not_count_the_attempt(db: &TestDb) {
    let store = db.open().await;
    submit(&store, "job").await;
    let job = claim(&store, "w@h").await;
    store
        .record_progress(&job.attempt(), &update(0..4, [0]), LEASE)
        .await
        .unwrap();
    assert!(store
        .finish_attempt(&job.attempt(), &FinalState::Requeue, &update(4..6, []))
        .await
        .unwrap());
    let row = store.get_job(&job.id).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Queued);
    assert_eq!(row.attempts, 0);
    assert_eq!(row.worker, None);
    assert!(store.curve(&job.id, None).await.unwrap().is_empty());
    assert!(store.sweep_runs(&job.id, 0).await.unwrap().is_empty());
    assert_eq!(claim(&store, "w@h").await.attempts, 1);
}

async fn an_attempt_that_lost_its_job_cannot_write(db: &TestDb) {
    let store = db.open().await;
    submit(&store, "job").await;
    let first = claim(&store, "w1@h").await;
    // Its lease runs out; another process queues it again and another worker takes it.
    expire_lease(&store, first.attempt()).await;
    let reaped = store.reap_expired(3).await.unwrap();
    assert_eq!(reaped.requeued, [first.id.as_str()]);
    let second = claim(&store, "w2@h").await;
    assert_eq!(second.attempts, 2);
    assert_eq!(second.worker.as_deref(), Some("w2@h"));

    assert_eq!(
        store
            .record_progress(&first.attempt(), &update(0..3, []), LEASE)
            .await
            .unwrap(),
        None
    );
    let finished = store
        .finish_attempt(
            &first.attempt(),
            &FinalState::Succeeded {
                result: "{}".into(),
                steps: 3,
            },
            &update(3..4, []),
        )
        .await
        .unwrap();
    assert!(!finished);
    assert!(store.curve(&first.id, None).await.unwrap().is_empty());
    let row = store.get_job(&first.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (JobStatus::Running, 2));
}

/// Lets a job's lease run out: a heartbeat with a lease of 50 ms, then a wait past it.
async fn expire_lease(store: &Store, attempt: Attempt) {
    let renewed = store
        .record_progress(
            &attempt,
            &ProgressUpdate::default(),
            Duration::from_millis(50),
        )
        .await
        .unwrap();
    assert_eq!(renewed, Some(false));
    tokio::time::sleep(Duration::from_millis(150)).await;
}

async fn an_expired_lease_is_queued_again_counting_the_attempt_then_failed_when_spent(db: &TestDb) {
    let store = db.open().await;
    submit(&store, "job").await;
    let job = claim(&store, "w@h").await;
    let mut progress = update(0..3, [0]);
    progress.done = 3;
    progress.total = 30;
    progress.trials = vec![trial(0, TrialStatus::Running)];
    store
        .record_progress(&job.attempt(), &progress, Duration::from_millis(1500))
        .await
        .unwrap();
    assert_eq!(
        store.reap_expired(2).await.unwrap(),
        ReapOutcome::default(),
        "not yet"
    );
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let reaped = store.reap_expired(2).await.unwrap();
    assert_eq!(reaped.requeued, [job.id.as_str()]);
    assert!(reaped.failed.is_empty());
    let row = store.get_job(&job.id).await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.attempts, row.worker),
        (JobStatus::Queued, 1, None)
    );
    assert!(
        store.curve(&job.id, None).await.unwrap().is_empty(),
        "partial curve deleted"
    );
    assert!(store.sweep_runs(&job.id, 0).await.unwrap().is_empty());
    assert!(store.trials(&job.id).await.unwrap().is_empty());

    let again = claim(&store, "w@h").await;
    assert_eq!(again.attempts, 2);
    let mut progress = update(0..5, []);
    progress.total = 30;
    progress.trials = vec![trial(0, TrialStatus::Running)];
    store
        .record_progress(&again.attempt(), &progress, Duration::from_millis(1500))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let reaped = store.reap_expired(2).await.unwrap();
    assert_eq!(reaped.failed, [job.id.as_str()]);
    let row = store.get_job(&job.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (JobStatus::Failed, 2));
    let error = row.error.expect("an error");
    assert_eq!(error.code, "worker_lost");
    assert_eq!(
        error.message,
        "the worker died while running this job (attempts: 2; last seen in stage range_test at \
         step 5 of 30; no heartbeat for 1.5 s); it may have been killed for running out of \
         memory: giving up"
    );
    assert!(row.finished_at.is_some());
    // The trial the worker died in ended with its job.
    let trials = store.trials(&job.id).await.unwrap();
    assert_eq!(trials.len(), 1);
    assert_eq!((trials[0].run, trials[0].status), (2, TrialStatus::Failed));
    assert!(trials[0].finished_at.is_some());
}

async fn two_processes_reaping_at_once_take_an_expired_job_exactly_once(db: &TestDb) {
    let one = db.open().await;
    let other = db.open().await;
    let mut expired = BTreeSet::new();
    for index in 0..4 {
        submit(&one, &format!("{index}")).await;
        let job = claim(&one, "w@h").await;
        one.record_progress(&job.attempt(), &update(0..2, []), Duration::from_millis(50))
            .await
            .unwrap();
        expired.insert(job.id);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let reap = |store: Store| {
        tokio::spawn(async move {
            loop {
                match store.reap_expired(3).await {
                    Ok(outcome) => return outcome,
                    Err(error) if error.is_unavailable() => continue,
                    Err(error) => panic!("{error}"),
                }
            }
        })
    };
    let (first, second) = (reap(one.clone()), reap(other.clone()));
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    let mut requeued: Vec<String> = first.requeued.into_iter().chain(second.requeued).collect();
    requeued.sort();
    assert_eq!(requeued, expired.into_iter().collect::<Vec<_>>());
    for id in &requeued {
        let row = one.get_job(id).await.unwrap().unwrap();
        assert_eq!((row.status, row.attempts), (JobStatus::Queued, 1));
    }
}

async fn a_heartbeat_renews_the_lease(db: &TestDb) {
    let store = db.open().await;
    submit(&store, "job").await;
    let job = claim(&store, "w@h").await;
    // Heartbeats 400 ms apart for 2 s keep a lease of 1 s, which each one renews.
    for _ in 0..5 {
        store
            .record_progress(
                &job.attempt(),
                &ProgressUpdate::default(),
                Duration::from_secs(1),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(store.reap_expired(3).await.unwrap(), ReapOutcome::default());
    }
    let row = store.get_job(&job.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (JobStatus::Running, 1));
    assert!(row.lease_until > row.heartbeat_at);
}

async fn cancels_stop_queued_jobs_and_flag_running_ones(db: &TestDb) {
    let store = db.open().await;
    let running = submit(&store, "running").await;
    let queued = submit(&store, "queued").await;
    let running = {
        let claimed = claim(&store, "w@h").await;
        assert_eq!(claimed.id, running.id);
        claimed
    };
    assert!(!store.cancel_queued(&running.id).await.unwrap());
    assert!(store.cancel_queued(&queued.id).await.unwrap());
    assert!(!store.cancel_queued(&queued.id).await.unwrap(), "only once");
    let row = store.get_job(&queued.id).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Canceled);
    assert!(row.finished_at.is_some());

    assert!(!store.request_cancel(&queued.id).await.unwrap());
    assert!(store.request_cancel(&running.id).await.unwrap());
    // The worker hears of it with its next heartbeat, from any process.
    let other = db.open().await;
    assert_eq!(
        other
            .record_progress(&running.attempt(), &ProgressUpdate::default(), LEASE)
            .await
            .unwrap(),
        Some(true)
    );
    assert!(store
        .finish_attempt(&running.attempt(), &FinalState::Canceled, &update(0..2, []))
        .await
        .unwrap());
    let row = store.get_job(&running.id).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Canceled);
    assert!(row.cancel_requested);
}

async fn failed_and_canceled_attempts_keep_their_points(db: &TestDb) {
    let store = db.open().await;
    submit(&store, "fails").await;
    let job = claim(&store, "w@h").await;
    store
        .record_progress(&job.attempt(), &update(0..2, []), LEASE)
        .await
        .unwrap();
    let error = JobError {
        code: "invalid_data".into(),
        message: "dataset ds_1: row 3".into(),
        field: Some("data".into()),
    };
    assert!(store
        .finish_attempt(
            &job.attempt(),
            &FinalState::Failed(error.clone()),
            &update(2..4, [])
        )
        .await
        .unwrap());
    let row = store.get_job(&job.id).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Failed);
    assert_eq!(row.error, Some(error));
    assert_eq!(row.progress_done, 4);
    assert_eq!(store.curve(&job.id, None).await.unwrap().len(), 4);
    // A finished job cannot change again.
    assert!(!store
        .finish_attempt(
            &job.attempt(),
            &FinalState::Canceled,
            &ProgressUpdate::default()
        )
        .await
        .unwrap());
}

async fn datasets_keep_their_bytes_and_page_newest_first(db: &TestDb) {
    let store = db.open().await;
    let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let mut stored = Vec::new();
    for index in 0..3 {
        let row = DatasetRow {
            id: new_id("ds"),
            name: Some(format!("set-{index}")),
            format: DataFormat::Npy,
            target: None,
            rows: 10 + index,
            features: 784,
            sample_shape: vec![1, 28, 28],
            classes: Some(10),
            vocabulary: None,
            task: Task::Classification,
            sha256: "ab".repeat(32),
            bytes: bytes.len() as i64,
            created_at: String::new(),
        };
        let inserted = store
            .insert_dataset(
                NewDataset {
                    row: row.clone(),
                    x: bytes.clone(),
                    y: Some(vec![index as u8; 10]),
                },
                NO_QUOTA,
            )
            .await
            .unwrap()
            .expect("stored");
        assert_eq!(
            DatasetRow {
                created_at: String::new(),
                ..inserted.clone()
            },
            row
        );
        assert!(inserted.created_at.ends_with('Z'));
        stored.push(inserted);
    }
    let loaded = store.load_dataset(&stored[1].id).await.unwrap().unwrap();
    assert_eq!(loaded.row, stored[1]);
    assert_eq!(loaded.x, bytes);
    assert_eq!(loaded.y, Some(vec![1; 10]));
    assert_eq!(
        store.get_dataset(&stored[2].id).await.unwrap().unwrap(),
        stored[2]
    );
    assert!(store.get_dataset("ds_missing").await.unwrap().is_none());

    let page = store.list_datasets(2, None).await.unwrap();
    let names: Vec<_> = page
        .iter()
        .map(|(_, row)| row.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["set-2", "set-1"]);
    let rest = store.list_datasets(2, Some(page[1].0)).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].1, stored[0]);
}

fn dataset(format: DataFormat, task: Task) -> NewDataset {
    NewDataset {
        row: DatasetRow {
            id: new_id("ds"),
            name: None,
            format,
            target: None,
            rows: 4,
            features: 1,
            sample_shape: vec![1],
            classes: None,
            vocabulary: None,
            task,
            sha256: "cd".repeat(32),
            bytes: 1,
            created_at: String::new(),
        },
        x: vec![1],
        y: None,
    }
}

fn corrupt_message(error: StoreError) -> String {
    match error {
        StoreError::Corrupt(message) => message,
        other => panic!("expected a corrupt row, got {other:?}"),
    }
}

async fn kinds_formats_and_tasks_read_back_as_written_and_an_unknown_one_is_a_corrupt_row(
    db: &TestDb,
) {
    let store = db.open().await;
    for kind in JobKind::ALL {
        let job = NewJob {
            kind,
            ..new_job(kind.as_str())
        };
        let inserted = store.insert_job(job, 100).await.unwrap().expect("queued");
        assert_eq!(inserted.kind, kind);
        assert_eq!(
            store.get_job(&inserted.id).await.unwrap().unwrap().kind,
            kind
        );
    }
    for (format, task) in DataFormat::ALL
        .into_iter()
        .zip(Task::ALL.into_iter().cycle())
    {
        let inserted = store
            .insert_dataset(dataset(format, task), NO_QUOTA)
            .await
            .unwrap()
            .expect("stored");
        let loaded = store.load_dataset(&inserted.id).await.unwrap().unwrap();
        assert_eq!((loaded.row.format, loaded.row.task), (format, task));
    }

    let job = submit(&store, "renamed kind").await;
    db.tamper(&format!(
        "UPDATE job SET kind = 'grid' WHERE id = '{}'",
        job.id
    ))
    .await;
    let message = corrupt_message(store.get_job(&job.id).await.unwrap_err());
    assert_eq!(message, r#"job.kind "grid" is not a known value"#);
    assert!(store
        .list_jobs(&ListFilter {
            limit: 100,
            ..ListFilter::default()
        })
        .await
        .is_err());

    let id = store
        .insert_dataset(dataset(DataFormat::Csv, Task::Regression), NO_QUOTA)
        .await
        .unwrap()
        .expect("stored")
        .id;
    // The format column has a CHECK constraint on both backends (dataset.rs tests its
    // conversion); the task has none.
    db.tamper(&format!(
        "UPDATE dataset SET task = 'auto' WHERE id = '{id}'"
    ))
    .await;
    let message = corrupt_message(store.get_dataset(&id).await.unwrap_err());
    assert_eq!(message, r#"dataset.task "auto" is not a known value"#);
    let message = corrupt_message(store.load_dataset(&id).await.err().expect("a corrupt row"));
    assert_eq!(message, r#"dataset.task "auto" is not a known value"#);
}

async fn weights_keep_their_bytes_and_tensor_shapes_and_page_newest_first(db: &TestDb) {
    let store = db.open().await;
    let data: Vec<u8> = (0..=255u8).cycle().take(50_000).collect();
    let mut stored = Vec::new();
    for index in 0..3 {
        let row = WeightsRow {
            id: new_id("weights"),
            name: Some(format!("w-{index}")),
            bytes: data.len() as i64,
            sha256: "cd".repeat(32),
            tensors: 2,
            shapes: vec![
                TensorShape {
                    name: "0.bias".into(),
                    shape: vec![16],
                },
                TensorShape {
                    name: "0.weight".into(),
                    shape: vec![16, 6 + index],
                },
            ],
            created_at: String::new(),
        };
        let inserted = store
            .insert_weights(
                NewWeights {
                    row: row.clone(),
                    data: data.clone(),
                },
                NO_QUOTA,
            )
            .await
            .unwrap()
            .expect("stored");
        assert_eq!(
            WeightsRow {
                created_at: String::new(),
                ..inserted.clone()
            },
            row
        );
        assert!(inserted.created_at.ends_with('Z'));
        stored.push(inserted);
    }
    let loaded = store.load_weights(&stored[1].id).await.unwrap().unwrap();
    assert_eq!(loaded.row, stored[1]);
    assert_eq!(loaded.data, data);
    assert_eq!(
        store.get_weights(&stored[2].id).await.unwrap().unwrap(),
        stored[2]
    );
    assert!(store
        .get_weights("weights_missing")
        .await
        .unwrap()
        .is_none());
    assert!(store
        .load_weights("weights_missing")
        .await
        .unwrap()
        .is_none());

    let page = store.list_weights(2, None).await.unwrap();
    let names: Vec<_> = page
        .iter()
        .map(|(_, row)| row.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["w-2", "w-1"]);
    let rest = store.list_weights(2, Some(page[1].0)).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].1, stored[0]);
}

async fn uploads_larger_than_a_part_read_back_whole_and_rows_stored_inline_still_read(db: &TestDb) {
    let store = db.open().await;
    // Two and a half parts of x, a part and a bit of y, two parts and a byte of weights.
    let x: Vec<u8> = (0..5 << 19).map(|i| (i * 7 % 256) as u8).collect();
    let y: Vec<u8> = (0..1_200_000).map(|i| (i % 13) as u8).collect();
    let mut new = dataset(DataFormat::Idx, Task::Classification);
    new.x = x.clone();
    new.y = Some(y.clone());
    new.row.bytes = (x.len() + y.len()) as i64;
    let stored = store.insert_dataset(new, NO_QUOTA).await.unwrap().unwrap();
    let loaded = store.load_dataset(&stored.id).await.unwrap().unwrap();
    assert_eq!(loaded.x, x);
    assert_eq!(loaded.y, Some(y));
    let csv = store
        .insert_dataset(dataset(DataFormat::Csv, Task::Regression), NO_QUOTA)
        .await
        .unwrap()
        .unwrap();
    let loaded = store.load_dataset(&csv.id).await.unwrap().unwrap();
    assert_eq!(loaded.x, dataset(DataFormat::Csv, Task::Regression).x);
    assert_eq!(loaded.y, None, "no y stays no y");

    let data: Vec<u8> = (0..(2 << 20) + 1).map(|i| (i % 251) as u8).collect();
    let mut new = weights(data.len() as i64);
    new.data = data.clone();
    let stored_weights = store.insert_weights(new, NO_QUOTA).await.unwrap().unwrap();
    let loaded = store
        .load_weights(&stored_weights.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded.data, data);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM weights_part WHERE weights_id = '{}'",
            stored_weights.id
        ))
        .await,
        3
    );

    // Rows an older lrtune wrote hold their bytes inline.
    let blob = match db.url {
        DatabaseUrl::Postgres(_) => "'\\x010203'::bytea",
        _ => "X'010203'",
    };
    db.tamper(&format!(
        "INSERT INTO weights (id, name, bytes, sha256, tensors, shapes, data, created_at)
         VALUES ('weights_inline', NULL, 3, 'ab', 1, '[{{\"name\":\"0.bias\",\"shape\":[3]}}]',
                 {blob}, '2026-01-01T00:00:00.000Z')"
    ))
    .await;
    let loaded = store.load_weights("weights_inline").await.unwrap().unwrap();
    assert_eq!(loaded.data, [1, 2, 3]);
    db.tamper(&format!(
        "INSERT INTO dataset (id, name, format, target, rows, features, sample_shape, classes,
             vocabulary, task, sha256, bytes, x, y, created_at)
         VALUES ('ds_inline', NULL, 'idx', NULL, 1, 3, '[3]', 2, NULL, 'classification',
                 'ab', 4, {blob}, {blob}, '2026-01-01T00:00:00.000Z')"
    ))
    .await;
    let loaded = store.load_dataset("ds_inline").await.unwrap().unwrap();
    assert_eq!((loaded.x, loaded.y), (vec![1, 2, 3], Some(vec![1, 2, 3])));

    // Deleting an upload deletes its parts.
    assert!(matches!(
        store.delete_weights(&stored_weights.id).await.unwrap(),
        Deletion::Deleted
    ));
    assert!(matches!(
        store.delete_dataset(&stored.id).await.unwrap(),
        Deletion::Deleted
    ));
    assert_eq!(db.count("SELECT count(*) FROM weights_part").await, 0);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM dataset_part WHERE dataset_id = '{}'",
            stored.id
        ))
        .await,
        0
    );
}

/// Weights of `bytes` bytes (as the quota counts them; the data is a few bytes).
fn weights(bytes: i64) -> NewWeights {
    NewWeights {
        row: WeightsRow {
            id: new_id("weights"),
            name: None,
            bytes,
            sha256: "ef".repeat(32),
            tensors: 1,
            shapes: vec![TensorShape {
                name: "0.weight".into(),
                shape: vec![2],
            }],
            created_at: String::new(),
        },
        data: vec![0; 8],
    }
}

/// A dataset of `bytes` bytes as the quota counts them.
fn dataset_of(bytes: i64) -> NewDataset {
    let mut dataset = dataset(DataFormat::Csv, Task::Regression);
    dataset.row.bytes = bytes;
    dataset
}

async fn an_upload_beyond_the_stored_bytes_quota_is_refused_until_a_delete_makes_room(db: &TestDb) {
    let store = db.open().await;
    assert_eq!(store.stored_bytes().await.unwrap(), 0);
    let first = store
        .insert_dataset(dataset_of(100), 250)
        .await
        .unwrap()
        .expect("within the quota");
    store
        .insert_weights(weights(100), 250)
        .await
        .unwrap()
        .expect("within the quota");
    assert_eq!(store.stored_bytes().await.unwrap(), 200);
    assert_eq!(
        store.insert_dataset(dataset_of(51), 250).await.unwrap(),
        None
    );
    assert_eq!(store.insert_weights(weights(51), 250).await.unwrap(), None);
    assert_eq!(store.stored_bytes().await.unwrap(), 200);
    let exactly = store
        .insert_weights(weights(50), 250)
        .await
        .unwrap()
        .expect("up to the quota itself");
    assert_eq!(store.stored_bytes().await.unwrap(), 250);

    assert_eq!(
        store.delete_dataset(&first.id).await.unwrap(),
        Deletion::Deleted
    );
    assert_eq!(
        store.delete_weights(&exactly.id).await.unwrap(),
        Deletion::Deleted
    );
    assert_eq!(store.stored_bytes().await.unwrap(), 100);
    assert!(store.get_dataset(&first.id).await.unwrap().is_none());
    assert!(store.load_weights(&exactly.id).await.unwrap().is_none());
    store
        .insert_dataset(dataset_of(150), 250)
        .await
        .unwrap()
        .expect("room again after the deletes");
    assert_eq!(
        store.delete_dataset(&first.id).await.unwrap(),
        Deletion::NotFound
    );
    assert_eq!(
        store.delete_weights("weights_missing").await.unwrap(),
        Deletion::NotFound
    );
}

async fn concurrent_uploads_from_two_processes_never_overshoot_the_quota(db: &TestDb) {
    let one = db.open().await;
    let other = db.open().await;
    let mut tasks = Vec::new();
    for upload in 0..10 {
        let store = if upload % 2 == 0 {
            one.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            loop {
                let stored = if upload % 3 == 0 {
                    store
                        .insert_weights(weights(100), 450)
                        .await
                        .map(|w| w.is_some())
                } else {
                    store
                        .insert_dataset(dataset_of(100), 450)
                        .await
                        .map(|d| d.is_some())
                };
                match stored {
                    Ok(stored) => return stored,
                    // SQLite: two processes' writers may meet the busy timeout; try again.
                    Err(error) if error.is_unavailable() => continue,
                    Err(error) => panic!("{error}"),
                }
            }
        }));
    }
    let mut stored = 0;
    for task in tasks {
        stored += usize::from(task.await.unwrap());
    }
    assert_eq!(stored, 4);
    assert_eq!(one.stored_bytes().await.unwrap(), 400);
}

async fn an_upload_named_by_a_queued_or_running_job_is_kept_and_deleted_once_the_job_ends(
    db: &TestDb,
) {
    let store = db.open().await;
    let train = store
        .insert_dataset(dataset_of(10), NO_QUOTA)
        .await
        .unwrap()
        .unwrap();
    let validation = store
        .insert_dataset(dataset_of(10), NO_QUOTA)
        .await
        .unwrap()
        .unwrap();
    let init = store
        .insert_weights(weights(10), NO_QUOTA)
        .await
        .unwrap()
        .unwrap();
    let unused = store
        .insert_weights(weights(10), NO_QUOTA)
        .await
        .unwrap()
        .unwrap();
    let spec = serde_json::json!({
        "data": {"dataset_id": train.id, "validation_dataset_id": validation.id},
        "init": {"weights": {"id": init.id}},
    });
    let job = store
        .insert_job(
            NewJob {
                spec: spec.to_string(),
                ..new_job("uses uploads")
            },
            100,
        )
        .await
        .unwrap()
        .expect("queued");
    let in_use = Deletion::InUse(vec![job.id.clone()]);
    assert_eq!(store.delete_dataset(&train.id).await.unwrap(), in_use);
    assert_eq!(store.delete_dataset(&validation.id).await.unwrap(), in_use);
    assert_eq!(store.delete_weights(&init.id).await.unwrap(), in_use);
    assert_eq!(
        store.delete_weights(&unused.id).await.unwrap(),
        Deletion::Deleted
    );

    let running = claim(&store, "w@h").await;
    assert_eq!(store.delete_dataset(&train.id).await.unwrap(), in_use);
    assert_eq!(store.delete_weights(&init.id).await.unwrap(), in_use);
    assert!(store
        .finish_attempt(
            &running.attempt(),
            &FinalState::Canceled,
            &ProgressUpdate::default()
        )
        .await
        .unwrap());
    assert_eq!(
        store.delete_dataset(&train.id).await.unwrap(),
        Deletion::Deleted
    );
    assert_eq!(
        store.delete_dataset(&validation.id).await.unwrap(),
        Deletion::Deleted
    );
    assert_eq!(
        store.delete_weights(&init.id).await.unwrap(),
        Deletion::Deleted
    );
    assert_eq!(store.stored_bytes().await.unwrap(), 0);
}

async fn changes_are_announced_to_the_process_that_made_them(db: &TestDb) {
    let store = db.open().await;
    let mut changes = store.subscribe();
    let job = submit(&store, "job").await;
    let claimed = claim(&store, "w@h").await;
    assert!(store.request_cancel(&job.id).await.unwrap());
    store
        .finish_attempt(
            &claimed.attempt(),
            &FinalState::Canceled,
            &ProgressUpdate::default(),
        )
        .await
        .unwrap();
    let expected = [
        Change::Queued,
        Change::Job(job.id.clone()),
        Change::CancelRequested(job.id.clone()),
        Change::Job(job.id.clone()),
        Change::Job(job.id.clone()),
    ];
    for want in expected {
        let got = tokio::time::timeout(Duration::from_secs(5), changes.recv())
            .await
            .expect("announced in time")
            .unwrap();
        assert_eq!(got, want);
    }
}

async fn health_is_ok_and_names_the_backend(db: &TestDb) {
    let store = db.open().await;
    store.check_health(Duration::from_secs(1)).await.unwrap();
    assert_eq!(store.backend(), db.url.backend());
}

/// PostgreSQL only: one process hears another's changes, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_another_process_hears_queued_jobs_and_cancels_at_once() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let api = db.open().await;
    let worker = db.open().await;
    let mut heard = worker.subscribe();
    let job = submit(&api, "job").await;
    let within = Duration::from_secs(2);
    let got = tokio::time::timeout(within, heard.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, Change::Queued);
    let claimed = claim(&worker, "w@h").await;
    assert_eq!(
        tokio::time::timeout(within, heard.recv())
            .await
            .unwrap()
            .unwrap(),
        Change::Job(job.id.clone())
    );
    assert!(api.request_cancel(&claimed.id).await.unwrap());
    assert_eq!(
        tokio::time::timeout(within, heard.recv())
            .await
            .unwrap()
            .unwrap(),
        Change::CancelRequested(job.id.clone())
    );
}

#[test]
fn database_urls_pick_the_backend_and_hide_the_password() {
    let sqlite = DatabaseUrl::parse("lrtune.db").unwrap();
    assert_eq!(sqlite, DatabaseUrl::SqlitePath("lrtune.db".into()));
    assert_eq!(sqlite.backend(), "sqlite");
    let url = DatabaseUrl::parse("sqlite:///var/lib/lrtune/jobs.db").unwrap();
    assert_eq!(url.backend(), "sqlite");
    for text in [
        "postgres://lrtune:s3cret@db:5432/lrtune",
        "postgresql://u:s3cret@db/x",
    ] {
        let postgres = DatabaseUrl::parse(text).unwrap();
        assert_eq!(postgres.backend(), "postgres");
        let shown = postgres.to_string();
        assert!(
            !shown.contains("s3cret") && shown.contains(":***@db"),
            "{shown}"
        );
        assert!(!format!("{postgres:?}").contains("s3cret"));
    }
    assert_eq!(
        DatabaseUrl::parse("postgres://postgres@127.0.0.1/test")
            .unwrap()
            .to_string(),
        "postgres://postgres@127.0.0.1/test"
    );
    let error = DatabaseUrl::parse("mysql://root@db/lrtune").unwrap_err();
    assert!(
        error.contains("\"mysql\"") && error.contains("postgres://"),
        "{error}"
    );
    assert!(DatabaseUrl::parse("  ").is_err());
}

#[test]
fn changes_survive_their_notify_payload() {
    for change in [
        Change::Queued,
        Change::Job("job_1".into()),
        Change::CancelRequested("job_2".into()),
        Change::Unknown,
    ] {
        assert_eq!(Change::decode(&change.encode()), change);
    }
    assert_eq!(Change::decode("garbage"), Change::Unknown);
}
