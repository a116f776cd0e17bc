//! `lrtune submit` and `lrtune check --server` against a real `lrtune serve`.

use crate::helpers::{assert_plot, github_outputs, path_string, read_json, write};
use crate::support::fixtures::tiny_spec;
use crate::support::process::Lrtune;
use crate::support::run::lrtune;

#[test]
fn check_against_a_server_exits_1_outside_and_0_inside_the_band() {
    let dir = tempfile::tempdir().unwrap();
    let server = Lrtune::serve(dir.path().join("x.db"), &[]);
    let spec = write(dir.path(), "spec.json", &tiny_spec().to_string());

    let output = path_string(&dir.path().join("low.json"));
    let plot = path_string(&dir.path().join("server.svg"));
    let run = lrtune(
        &[
            "check",
            &spec,
            "--lr",
            "1e-12",
            "--server",
            &server.address,
            "--output",
            &output,
            "--plot",
            &plot,
            "-q",
        ],
        &[],
    );
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stdout.contains("too low: 1e-12 is "), "{run}");
    let result = read_json(&output);
    let peak = result["recommendation"]["peak_lr"].as_f64().unwrap();
    assert_eq!(result["sweep"].as_array().unwrap().len(), 2);
    // The curve comes from GET /v1/jobs/{id}/curve.
    assert_plot(&plot, &["valley", "edge", "peak", "recommended band"]);

    let github = path_string(&dir.path().join("github_output"));
    let run = lrtune(
        &[
            "check",
            &spec,
            "--lr",
            &peak.to_string(),
            "--server",
            &server.address,
        ],
        &[("GITHUB_OUTPUT", &github)],
    );
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("is inside the band"), "{run}");
    assert!(run.stderr.contains("submitted job job_"), "{run}");
    let outputs = github_outputs(&github);
    assert_eq!(outputs[0], ("peak_lr".to_string(), peak.to_string()));
    assert_eq!(outputs[3], ("in_band".to_string(), "true".to_string()));

    let run = lrtune(
        &[
            "check",
            &spec,
            "--lr",
            &(peak * 1000.0).to_string(),
            "--server",
            &server.address,
            "-q",
        ],
        &[],
    );
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stdout.contains("above the band"), "{run}");
}

#[test]
fn submit_prints_the_job_id_and_with_wait_the_recommendation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Lrtune::serve(dir.path().join("x.db"), &[]);
    let spec = write(dir.path(), "spec.json", &tiny_spec().to_string());

    let run = lrtune(&["submit", &spec, "--server", &server.address], &[]);
    assert_eq!(run.code, 0, "{run}");
    let id = run.stdout.trim();
    assert!(id.starts_with("job_") && !id.contains('\n'), "{run}");

    let run = lrtune(
        &["submit", &spec, "--server", &server.address, "--json"],
        &[],
    );
    assert_eq!(run.code, 0, "{run}");
    let job: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(job["id"].as_str().unwrap().starts_with("job_"));
    assert_eq!(job["spec"]["batch_size"], 32);

    let run = lrtune(
        &["submit", &spec, "--server", &server.address, "--wait"],
        &[],
    );
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("recommended peak lr:"), "{run}");
    assert!(
        run.stdout.contains("pytorch: OneCycleLR(optimizer"),
        "{run}"
    );

    let run = lrtune(
        &[
            "submit",
            &spec,
            "--server",
            &server.address,
            "--wait",
            "--json",
            "-q",
        ],
        &[],
    );
    assert_eq!(run.code, 0, "{run}");
    let result: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(result["recommendation"]["source"], "sweep");
}

#[test]
fn submit_wait_on_a_race_prints_its_table_and_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let server = Lrtune::serve(dir.path().join("x.db"), &[]);
    let spec = write(
        dir.path(),
        "race.json",
        r#"{"kind": "compare", "data": {"builtin": "spirals", "samples": 512},
            "model": {"arch": "mlp", "hidden": [16]}, "batch_size": 32,
            "plan": {"epochs": 2}, "range_test": {"steps": 30},
            "sweep": {"count": 2, "epochs": 1},
            "recipes": ["sgd_one_cycle", "adam_constant"], "seeds": 1}"#,
    );
    let run = lrtune(
        &[
            "submit",
            &spec,
            "--server",
            &server.address,
            "--wait",
            "--json",
            "-q",
        ],
        &[],
    );
    assert_eq!(run.code, 0, "{run}");
    let result: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let names: Vec<&str> = result["recipes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|recipe| recipe["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sgd_one_cycle", "adam_constant"]);
    let verdict = result["verdict"].as_str().unwrap();
    assert!(!verdict.is_empty());

    let run = lrtune(
        &["submit", &spec, "--server", &server.address, "--wait", "-q"],
        &[],
    );
    assert_eq!(run.code, 0, "{run}");
    assert!(
        run.stdout
            .starts_with("race of 2 recipes, 1 seeds each, 24 steps per run"),
        "{run}"
    );
    assert!(run.stdout.contains("| 1 | "), "{run}");
    assert!(
        run.stdout.contains("| sgd_one_cycle | sgd | one_cycle |"),
        "{run}"
    );
    assert!(
        run.stdout.contains("| adam_constant | adam | constant |"),
        "{run}"
    );
}

#[test]
fn a_spec_the_server_refuses_exits_2_with_its_message_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = Lrtune::serve(dir.path().join("x.db"), &[]);
    let spec = write(
        dir.path(),
        "bad.json",
        r#"{"data": {"builtin": "spirals"}, "range_test": {"start_lr": 1, "end_lr": 0.5}}"#,
    );
    for args in [
        vec!["submit", &spec, "--server", &server.address],
        vec!["check", &spec, "--server", &server.address, "--lr", "0.01"],
    ] {
        let command = args[0];
        let run = lrtune(&args, &[]);
        assert_eq!(run.code, 2, "{command}: {run}");
        assert!(run.stderr.contains("422"), "{command}: {run}");
        assert!(
            run.stderr.contains("range_test.start_lr: "),
            "{command}: {run}"
        );
        assert!(run.stdout.is_empty(), "{command}: {run}");
    }
}

#[test]
fn a_job_that_fails_on_the_server_exits_2_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = Lrtune::serve(dir.path().join("x.db"), &[]);
    // Admitted at submit; only the run finds that one epoch of 40 rows in batches of 32 is
    // one step, too short for a OneCycle schedule.
    let spec = write(
        dir.path(),
        "spec.json",
        r#"{"data": {"builtin": "spirals", "samples": 50}, "batch_size": 32, "sweep": {"epochs": 1}}"#,
    );
    let run = lrtune(
        &[
            "check",
            &spec,
            "--lr",
            "0.01",
            "--server",
            &server.address,
            "-q",
        ],
        &[],
    );
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains(" failed: sweep.epochs: "), "{run}");
}

#[test]
fn an_unreachable_server_exits_2() {
    // A port that was free a moment ago and has nobody listening now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let spec = write(dir.path(), "spec.json", &tiny_spec().to_string());
    let address = format!("http://127.0.0.1:{port}");
    for args in [
        vec!["check", &spec, "--lr", "0.01", "--server", &address],
        vec!["submit", &spec, "--server", &address, "--wait"],
    ] {
        let run = lrtune(&args, &[]);
        assert_eq!(run.code, 2, "{run}");
        assert!(run.stderr.contains("cannot reach the server at"), "{run}");
    }
}

#[test]
fn a_server_with_a_token_needs_it_from_the_flag_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let server = Lrtune::serve(dir.path().join("x.db"), &["--api-token", "s3cret"]);
    let spec = write(dir.path(), "spec.json", &tiny_spec().to_string());
    let run = lrtune(&["submit", &spec, "--server", &server.address], &[]);
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("401"), "{run}");
    let run = lrtune(
        &[
            "submit",
            &spec,
            "--server",
            &server.address,
            "--token",
            "s3cret",
        ],
        &[],
    );
    assert_eq!(run.code, 0, "{run}");
    let run = lrtune(
        &["submit", &spec, "--server", &server.address],
        &[("LRTUNE_API_TOKEN", "s3cret")],
    );
    assert_eq!(run.code, 0, "{run}");
}

/// A bare HTTP/1.1 request to the test server (enough to list and cancel jobs from the side).
fn http(address: &str, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let host = address.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host).expect("the server accepts");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn a_job_canceled_while_check_waits_exits_2_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let server = Lrtune::serve(dir.path().join("x.db"), &[]);
    // Long enough to be canceled while it runs (tens of seconds if left alone).
    let spec = write(
        dir.path(),
        "long.json",
        r#"{"data": {"builtin": "spirals", "samples": 4096}, "model": {"arch": "mlp", "hidden": [64, 64]},
            "batch_size": 16, "range_test": {"steps": 5000, "end_lr": 0.01}, "sweep": {"count": 2, "epochs": 1}}"#,
    );
    let address = server.address.clone();
    let canceler = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let answer = http(&address, "GET", "/v1/jobs?status=running");
            if let Some(id) = answer
                .split("\"id\":\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
            {
                return http(&address, "POST", &format!("/v1/jobs/{id}/cancel"));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the job never showed up as running");
    });
    let run = lrtune(
        &[
            "check",
            &spec,
            "--lr",
            "0.01",
            "--server",
            &server.address,
            "-q",
        ],
        &[],
    );
    let cancel = canceler.join().unwrap();
    assert!(cancel.starts_with("HTTP/1.1 202"), "{cancel}");
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("was canceled"), "{run}");
}

/// The probe's hostile specs: each refused at submit (exit 2, the field named), none of them
/// allocating the model it describes.
#[test]
fn models_too_large_for_the_machine_are_refused_at_submit_and_the_server_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let server = Lrtune::serve(dir.path().join("x.db"), &["--max-job-memory", "1GiB"]);
    let cases = [
        (
            r#"{"arch": "mlp", "hidden": [1000000, 1000000]}"#,
            "spirals",
            "model",
        ),
        (
            r#"{"arch": "mlp", "hidden": [4611686018427387904]}"#,
            "spirals",
            "model",
        ),
        (
            r#"{"arch": "mlp", "hidden": [20000, 20000]}"#,
            "spirals",
            "model",
        ),
        (
            r#"{"arch": "cnn", "channels": [100000]}"#,
            "mnist10k",
            "model",
        ),
        (
            r#"{"arch": "cnn", "channels": [2000], "hidden": 1}"#,
            "mnist10k",
            "batch_size",
        ),
        (
            r#"{"arch": "transformer", "d_model": 65536}"#,
            "mnist10k",
            "model.arch",
        ),
    ];
    for (index, (model, builtin, field)) in cases.into_iter().enumerate() {
        let spec = format!(r#"{{"data": {{"builtin": "{builtin}"}}, "model": {model}}}"#);
        let path = write(dir.path(), &format!("hostile-{index}.json"), &spec);
        let run = lrtune(&["submit", &path, "--server", &server.address, "-q"], &[]);
        assert_eq!(run.code, 2, "{spec}: {run}");
        assert!(run.stderr.contains(field), "{spec}: {run}");
    }
    let peak = server.status_kb("VmHWM") * 1024;
    assert!(peak < 400 << 20, "the server's peak RSS was {peak} bytes");
}
