//! `lrtune-dev bench-api` end to end: it starts a server of its own, measures an idle phase and a
//! training phase, and reports both. Latency figures depend on the machine, so these tests
//! check the report's shape and counts, never a threshold.

// The workspace's runner (tests/support/run.rs), without the rest of lrtune's harness.
#[allow(dead_code)]
#[path = "../../tests/support/run.rs"]
mod run;

use serde_json::Value;

use run::lrtune_dev;

fn latency_is_ordered(latency: &Value, what: &str) {
    let value = |key: &str| {
        latency[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}.{key} is not a number: {latency}"))
    };
    let ordered = [
        value("p50"),
        value("p90"),
        value("p99"),
        value("p99_9"),
        value("max"),
    ];
    assert!(ordered[0] >= 0.0, "{what}: {latency}");
    assert!(
        ordered.windows(2).all(|pair| pair[0] <= pair[1]),
        "{what}: percentiles out of order: {latency}"
    );
}

#[test]
fn bench_api_reports_an_idle_and_a_training_phase_with_every_request_answered() {
    let run = lrtune_dev(&[
        "bench-api",
        "--seconds",
        "1",
        "--rate",
        "50",
        "--connections",
        "8",
        "--json",
    ]);
    // 1 only says this machine's p99 was over 50 ms; 2 would be an error.
    assert!(run.code == 0 || run.code == 1, "{run}");
    let report: Value =
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {run}"));
    assert_eq!(report["rate"], 50.0, "{run}");
    assert_eq!(report["seconds"], 1.0, "{run}");
    assert_eq!(report["connections"], 8, "{run}");
    assert_eq!(report["max_p99_ms"], 50.0, "{run}");
    assert!(!report["cpu"].as_str().unwrap_or("").is_empty(), "{run}");
    assert!(report["cores"].as_u64().unwrap_or(0) >= 1, "{run}");
    assert_eq!(report["passed"], run.code == 0, "{run}");
    assert_eq!(
        report["failures"].as_array().map(Vec::is_empty),
        Some(run.code == 0),
        "{run}"
    );

    for name in ["idle", "training"] {
        let phase = &report["phases"][name];
        assert_eq!(phase["requests"], 50, "{name}: {run}");
        assert_eq!(phase["errors"], 0, "{name}: {run}");
        assert_eq!(phase["non_2xx"], 0, "{name}: {run}");
        assert_eq!(phase["failed"], 0, "{name}: {run}");
        assert_eq!(phase["first_error"], Value::Null, "{name}: {run}");
        assert!(
            phase["achieved_rate"].as_f64().unwrap_or(0.0) > 0.0,
            "{name}: {run}"
        );
        if !phase["open_connections"].is_null() {
            assert_eq!(phase["open_connections"], 8, "{name}: {run}");
        }
        latency_is_ordered(&phase["latency_ms"], name);
        latency_is_ordered(&phase["send_lag_ms"], name);

        let by_request = phase["by_request"].as_array().expect("by_request");
        let requests: Vec<&str> = by_request
            .iter()
            .map(|kind| kind["request"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            requests,
            [
                "GET /v1/jobs/{id}",
                "GET /v1/jobs?limit=20",
                "POST /v1/analyze",
                "GET /healthz"
            ],
            "{name}: {run}"
        );
        // 50 requests in equal shares: 13, 13, 12, 12.
        let counts: Vec<u64> = by_request
            .iter()
            .map(|kind| kind["requests"].as_u64().unwrap_or(0))
            .collect();
        assert_eq!(counts, [13, 13, 12, 12], "{name}: {run}");
        for kind in by_request {
            assert_eq!(kind["errors"], 0, "{name}: {run}");
            latency_is_ordered(&kind["latency_ms"], name);
        }
    }
    assert!(report["phases"]["idle"].get("training").is_none(), "{run}");
    let training = &report["phases"]["training"]["training"];
    let jobs = training["jobs"].as_array().expect("the training jobs");
    assert!(!jobs.is_empty(), "{run}");
    assert!(
        jobs.iter()
            .all(|id| id.as_str().is_some_and(|id| id.starts_with("job_"))),
        "{run}"
    );
    let fraction = training["running_fraction"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&fraction), "{run}");
}

#[test]
fn bench_api_refuses_a_rate_of_zero_with_exit_2() {
    let run = lrtune_dev(&["bench-api", "--rate", "0"]);
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("must be positive"), "{run}");
}
