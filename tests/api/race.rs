//! Recipe races (`kind: "compare"`) through the service: queued, run by a worker with live
//! race points, stored with the race's result, read back from `/curve`, and canceled.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

/// Two recipes, one seed, two epochs of 12 steps on 512 spirals: a couple of seconds.
fn tiny_race() -> Value {
    json!({
        "kind": "compare",
        "data": {"builtin": "spirals", "samples": 512},
        "model": {"arch": "mlp", "hidden": [16]},
        "batch_size": 32,
        "plan": {"epochs": 2},
        "range_test": {"steps": 30},
        "sweep": {"count": 2, "epochs": 1},
        "recipes": ["sgd_one_cycle", "adam_constant"],
        "seeds": 1,
        "target": 0.9
    })
}

/// The `(recipe, seed, step, val_loss)` of every point of the result's runs, in order.
fn result_points(result: &Value) -> Vec<(String, i64, i64, Value)> {
    let mut points = Vec::new();
    for recipe in result["recipes"].as_array().unwrap() {
        for run in recipe["runs"].as_array().unwrap() {
            for point in run["points"].as_array().unwrap() {
                points.push((
                    recipe["name"].as_str().unwrap().to_string(),
                    run["seed"].as_i64().unwrap(),
                    point["step"].as_i64().unwrap(),
                    point["val_loss"].clone(),
                ));
            }
        }
    }
    points
}

#[tokio::test]
async fn a_compare_job_runs_through_the_service_with_the_race_result_and_its_curve() {
    let app = spawn_app().await;
    let (status, queued) = json_of(app.post_json("/v1/jobs", &tiny_race()).await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    assert_eq!(queued["kind"], "compare");
    let id = queued["id"].as_str().unwrap();
    let job = app.wait_until_finished(id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let result = &job["result"];

    let recipes = result["recipes"].as_array().unwrap();
    let names: Vec<&str> = recipes
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sgd_one_cycle", "adam_constant"]);
    assert_eq!(
        (&recipes[0]["optimizer"], &recipes[0]["schedule"]),
        (&json!("sgd"), &json!("one_cycle"))
    );
    assert_eq!(
        (&recipes[1]["optimizer"], &recipes[1]["schedule"]),
        (&json!("adam"), &json!("constant"))
    );
    for recipe in recipes {
        assert!(recipe["lr"].as_f64().unwrap() > 0.0, "{recipe}");
        // One seed: the mean is the run's last point, its spread zero.
        let runs = recipe["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0]["seed"], 0);
        let points = runs[0]["points"].as_array().unwrap();
        let steps: Vec<i64> = points.iter().map(|p| p["step"].as_i64().unwrap()).collect();
        // 24 planned steps, evaluated after each one, plus the start.
        assert_eq!(steps, (0..=24).collect::<Vec<_>>(), "{recipe}");
        let last = points.last().unwrap();
        assert_eq!(recipe["final_val_loss"]["mean"], last["val_loss"]);
        assert_eq!(recipe["final_val_loss"]["std"], 0.0);
        assert_eq!(recipe["final_val_accuracy"]["mean"], last["val_accuracy"]);
        let accuracy = last["val_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{recipe}");
        assert!(points[1]["seconds"].as_f64().unwrap() > 0.0, "{recipe}");
        assert!(
            recipe.get("steps_to_target").is_some() && recipe.get("seconds_to_target").is_some()
        );
    }
    assert_eq!(result["target"]["metric"], "val_accuracy");
    assert!(result["target"]["value"].as_f64().unwrap() > 0.0);
    let ranking: BTreeSet<&str> = result["ranking"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap())
        .collect();
    assert_eq!(ranking, BTreeSet::from(["sgd_one_cycle", "adam_constant"]));
    assert!(!result["verdict"].as_str().unwrap().is_empty());
    let steps = result["timing"]["tune_steps"].as_i64().unwrap()
        + result["timing"]["race_steps"].as_i64().unwrap();
    assert_eq!(result["timing"]["race_steps"], 2 * 24);
    assert_eq!(job["progress"]["done"], steps);
    assert_eq!(job["progress"]["fraction"], 1.0);

    // The curve holds every point of the result's runs, as the worker streamed them.
    let (status, curve) = json_of(app.get(&format!("/v1/jobs/{id}/curve")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        curve["points"],
        json!([]),
        "a race stores no range-test curve"
    );
    let stored: Vec<(String, i64, i64, Value)> = curve["race_points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["recipe"].as_str().unwrap().to_string(),
                p["seed"].as_i64().unwrap(),
                p["step"].as_i64().unwrap(),
                p["val_loss"].clone(),
            )
        })
        .collect();
    assert_eq!(stored.len(), 2 * 25);
    assert_eq!(stored, result_points(result));

    // Each recipe's tune (a range test and two sweep runs), then the race's runs: trials
    // named by their recipe.
    let (status, listed) = json_of(app.get(&format!("/v1/jobs/{id}/trials")).await).await;
    assert_eq!(status, StatusCode::OK);
    let trials: Vec<(&str, &str, &str)> = listed["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["kind"].as_str().unwrap(),
                t["recipe"].as_str().unwrap(),
                t["status"].as_str().unwrap(),
            )
        })
        .collect();
    let tune = |recipe| {
        [
            ("range_test", recipe, "succeeded"),
            ("sweep", recipe, "succeeded"),
            ("sweep", recipe, "succeeded"),
        ]
    };
    let mut expected = Vec::new();
    expected.extend(tune("sgd_one_cycle"));
    expected.extend(tune("adam_constant"));
    expected.push(("race", "sgd_one_cycle", "succeeded"));
    expected.push(("race", "adam_constant", "succeeded"));
    assert_eq!(trials, expected, "{listed}");
    for (race, recipe) in listed["trials"].as_array().unwrap()[6..]
        .iter()
        .zip(["sgd_one_cycle", "adam_constant"])
    {
        assert_eq!(
            (race["steps"].as_i64(), race["steps_run"].as_i64()),
            (Some(24), Some(24))
        );
        let last = stored.iter().rev().find(|point| point.0 == recipe).unwrap();
        assert_eq!(race["val_loss"], last.3, "{race}");
    }

    let csv = app.get(&format!("/v1/jobs/{id}/curve?format=csv")).await;
    assert_eq!(csv.status(), StatusCode::OK);
    let text = csv.text().await.unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("recipe,seed,step,seconds,val_loss,val_accuracy")
    );
    assert_eq!(
        lines.next().unwrap().split(',').take(3).collect::<Vec<_>>(),
        ["sgd_one_cycle", "0", "0"]
    );
    assert_eq!(lines.count(), 2 * 25 - 1);
}

#[tokio::test]
async fn a_race_streams_its_points_live_over_events() {
    let (app, release) = spawn_gated_app().await;
    let id = app.submit(&tiny_race()).await;
    let response = app.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!(response.status(), StatusCode::OK);
    release.store(true, Ordering::SeqCst);
    let events = read_events(response, Duration::from_secs(60)).await;
    let race_points: Vec<&Value> = events
        .iter()
        .filter(|(name, _)| name == "race_point")
        .map(|(_, data)| data)
        .collect();
    assert_eq!(race_points.len(), 2 * 25, "{events:?}");
    assert_eq!(race_points[0]["recipe"], "sgd_one_cycle");
    assert_eq!(
        (&race_points[0]["seed"], &race_points[0]["step"]),
        (&json!(0), &json!(0))
    );
    assert_eq!(race_points[25]["recipe"], "adam_constant");
    assert_eq!(race_points[49]["step"], 24);
    for point in &race_points {
        assert!(point["val_loss"].as_f64().unwrap().is_finite(), "{point}");
        assert!(point["val_accuracy"].as_f64().is_some(), "{point}");
        assert!(point["seconds"].as_f64().unwrap() >= 0.0, "{point}");
    }
    assert!(
        events.iter().all(|(name, _)| name != "point"),
        "the recipes' range tests are not the job's curve"
    );
    assert!(
        events.iter().any(|(name, _)| name == "progress"),
        "{events:?}"
    );
    let (last_name, last) = events.last().unwrap();
    assert_eq!(last_name, "status");
    assert_eq!(last["status"], "succeeded");
    // What the stream sent is what /curve returns.
    let (_, curve) = json_of(app.get(&format!("/v1/jobs/{id}/curve")).await).await;
    assert_eq!(
        curve["race_points"].as_array().unwrap().len(),
        race_points.len()
    );
    assert_eq!(&curve["race_points"][49], race_points[49]);
}

#[tokio::test]
async fn a_running_race_stops_within_a_step_when_canceled() {
    let app = spawn_app().await;
    let mut spec = tiny_race();
    // Long enough that it is still racing when the cancel comes.
    spec["data"]["samples"] = json!(2048);
    spec["model"]["hidden"] = json!([256, 256]);
    spec["plan"]["epochs"] = json!(30);
    spec["budget"] = json!({"steps": 200});
    let id = app.submit(&spec).await;
    let started = Instant::now();
    let (planned, seen) = loop {
        let (_, curve) = json_of(app.get(&format!("/v1/jobs/{id}/curve")).await).await;
        let seen = curve["race_points"].as_array().unwrap().len();
        if seen > 0 {
            let job = app.job(&id).await;
            break (job["progress"]["total"].as_i64().unwrap(), seen);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no race point after a minute: {}",
            app.job(&id).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (status, body) = json_of(
        app.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let asked = Instant::now();
    let job = app
        .wait_for(
            &id,
            &["succeeded", "failed", "canceled"],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(job["status"], "canceled", "{job}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert!(job["result"].is_null(), "{job}");
    let done = job["progress"]["done"].as_i64().unwrap();
    assert!(done < planned, "stopped at {done} of {planned} steps");
    // The points measured before the cancel stay readable.
    let (_, curve) = json_of(app.get(&format!("/v1/jobs/{id}/curve")).await).await;
    let kept = curve["race_points"].as_array().unwrap().len();
    assert!(kept >= seen && kept < 2 * 26, "{kept} points kept");
    // The race run the cancel stopped ended with the job; no trial is left running.
    let (_, listed) = json_of(app.get(&format!("/v1/jobs/{id}/trials")).await).await;
    let statuses: Vec<&str> = listed["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert!(!statuses.contains(&"running"), "{listed}");
    assert_eq!(statuses.last(), Some(&"canceled"), "{listed}");
}

#[tokio::test]
async fn a_race_is_admitted_at_submit_naming_the_field_before_any_work() {
    let app = spawn_app().await;
    let cases = [
        // Full runs over the epochs limit: 2 recipes x 3 seeds x 40 epochs.
        (json!({"seeds": 3, "plan": {"epochs": 40}}), "seeds"),
        (json!({"seeds": 0}), "seeds"),
        (json!({"target": 1.5}), "target"),
        (json!({"recipes": ["no_such_recipe"]}), "recipes"),
        (
            json!({"model": {"arch": "mlp", "hidden": [20000, 20000]}}),
            "model",
        ),
    ];
    for (change, field) in cases {
        let mut spec = tiny_race();
        for (key, value) in change.as_object().unwrap() {
            spec[key] = value.clone();
        }
        let (status, body) = json_of(app.post_json("/v1/jobs", &spec).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{change}: {body}");
        let error = assert_error(&body, "invalid_spec");
        assert!(
            error["field"].as_str().unwrap().starts_with(field),
            "{change}: {body}"
        );
    }
    let (_, list) = json_of(app.get("/v1/jobs").await).await;
    assert_eq!(list["jobs"], json!([]), "nothing was queued: {list}");
}
