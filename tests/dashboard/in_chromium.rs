//! The dashboard in a real headless Chromium against the real `lrtune serve`: the job list, a
//! job's page with its charts, the submit and upload forms, the token prompt, and no errors in
//! the browser console. Screenshots are left in `target/dashboard-screenshots/`. Without
//! Chromium these tests fail (see tests/support).

use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;

use crate::server::Server;
use crate::support::browser::{screenshot_dir, Browser, Page};
use crate::support::fixtures::named;

/// The browser tests run one at a time: two cores, and timing-sensitive waits.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_BROWSER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fails with every console error, uncaught exception and failed load the page has had,
/// except those `expected` (substrings) accounts for.
fn assert_no_console_errors(page: &mut Page, expected: &[&str]) {
    let problems: Vec<String> = page
        .problems()
        .into_iter()
        .filter(|problem| !expected.iter().any(|allowed| problem.contains(allowed)))
        .collect();
    assert!(problems.is_empty(), "browser console: {problems:#?}");
}

/// A learning rate as the dashboard writes it (`format.js`'s `lr`): `1.2e-3`, `1.2` for 1 to 10.
fn sci(value: f64, digits: usize) -> String {
    let text = format!("{value:.*e}", digits - 1);
    text.strip_suffix("e0").map_or(text.clone(), str::to_string)
}

/// The elements that reach past `width` CSS pixels (none, on a page that fits).
fn too_wide(page: &mut Page, width: u32) -> serde_json::Value {
    page.eval(&format!(
        "[...document.querySelectorAll('body *')]
            .filter(node => node.getBoundingClientRect().right > {width} + 0.5)
            .map(node => node.tagName + '#' + node.id + '.' + node.className)"
    ))
}

const LONG: Duration = Duration::from_secs(30);

#[test]
fn the_job_list_shows_a_finished_job_with_its_peak_learning_rate() {
    let _one = lock();
    let server = Server::start(None);
    let job = server.finished_job(&named("listed"));
    let id = job["id"].as_str().unwrap();
    let peak = job["result"]["recommendation"]["peak_lr"].as_f64().unwrap();

    let browser = Browser::launch();
    let mut page = browser.page();
    page.viewport(1280, 900, false);
    page.navigate(&format!("{}/", server.address));
    let row = format!("#jobs-body tr[data-job-id='{id}']");
    page.wait_for(
        &format!("document.querySelector(\"{row}[data-status='succeeded']\")"),
        LONG,
    );
    assert_eq!(page.text(&format!("{row} .name-cell a")), "listed");
    assert_eq!(page.text(&format!("{row} .peak-lr")), sci(peak, 2));
    assert_eq!(page.text(&format!("{row} .status")), "succeeded");
    assert_eq!(page.text(&format!("{row} td.col-kind")), "tune");
    page.screenshot(&screenshot_dir().join("index-1280.png"));
    page.viewport(390, 844, true);
    page.wait_for("document.documentElement.clientWidth === 390", LONG);
    page.screenshot(&screenshot_dir().join("index-390.png"));
    assert_eq!(too_wide(&mut page, 390), json!([]), "the list fits a phone");
    assert_eq!(
        page.eval("(w => w.scrollWidth <= w.clientWidth)(document.querySelector('.table-wrap'))"),
        true,
        "the job table needs no sideways scrolling on a phone"
    );
    assert_no_console_errors(&mut page, &[]);
}

#[test]
fn the_job_page_draws_its_charts_and_shows_the_recommended_peak() {
    let _one = lock();
    let server = Server::start(None);
    let mut spec = named("charted");
    // Enough steps for the loss to diverge, so the early stop is drawn too.
    spec["range_test"] = json!({"steps": 100, "start_lr": 1e-5, "end_lr": 100});
    spec["sweep"] = json!({"count": 4, "epochs": 1});
    let job = server.finished_job(&spec);
    let id = job["id"].as_str().unwrap();
    let recommendation = &job["result"]["recommendation"];
    let peak = recommendation["peak_lr"].as_f64().unwrap();

    let browser = Browser::launch();
    let mut page = browser.page();
    page.viewport(1280, 900, false);
    page.navigate(&format!("{}/jobs/{id}", server.address));
    page.wait_for(
        "document.body.dataset.loaded === 'true' && document.querySelector('#schedule-chart canvas')",
        LONG,
    );
    for chart in ["#range-chart", "#sweep-chart", "#schedule-chart"] {
        assert_eq!(
            page.count(&format!("{chart} canvas")),
            1,
            "{chart} is drawn"
        );
    }
    assert_eq!(page.text("#rec-peak"), sci(peak, 3));
    assert_eq!(page.text("#job-status"), "succeeded");
    assert_eq!(
        page.text("#rec-pytorch"),
        recommendation["pytorch"].as_str().unwrap()
    );
    assert_eq!(
        page.text("#rec-fastai"),
        recommendation["fastai"].as_str().unwrap()
    );
    let suggestions = &job["result"]["range_test"]["suggestions"];
    for name in ["valley", "steepest", "minimum", "edge"] {
        let value = suggestions[name].as_f64().unwrap();
        assert_eq!(
            page.text(&format!("tr[data-suggestion='{name}'] td.num")),
            sci(value, 2),
            "the {name} suggestion"
        );
    }
    let warnings = recommendation["warnings"].as_array().unwrap().len() as u64;
    assert_eq!(page.count("#rec-warnings li"), warnings);
    assert!(page.text("#schedule-empty").contains("steps"));
    // A finished job offers no cancel button.
    assert_eq!(
        page.eval("document.getElementById('cancel-button').hidden"),
        true
    );
    page.screenshot(&screenshot_dir().join("job-1280.png"));

    page.viewport(390, 844, true);
    page.wait_for(
        "document.documentElement.clientWidth === 390 && \
         document.querySelector('#range-chart canvas').getBoundingClientRect().right <= 390",
        LONG,
    );
    page.screenshot(&screenshot_dir().join("job-390.png"));
    assert_eq!(
        too_wide(&mut page, 390),
        json!([]),
        "the job page fits a phone"
    );
    assert_no_console_errors(&mut page, &[]);
}

#[test]
fn a_queued_job_is_followed_live_and_a_running_one_can_be_canceled_from_its_page() {
    let _one = lock();
    let server = Server::start(None);
    // One worker: `slow` runs (for minutes, unless canceled) while `next` waits in the queue.
    let mut slow = named("slow");
    slow["data"]["samples"] = json!(4096);
    slow["model"]["hidden"] = json!([256, 256]);
    slow["range_test"]["steps"] = json!(5000);
    let mut next = named("next");
    next["data"]["samples"] = json!(4096);
    next["model"]["hidden"] = json!([128, 128]);
    next["range_test"]["steps"] = json!(2500);
    let (status, slow) = server.json("POST", "/v1/jobs", Some(&slow));
    assert_eq!(status, 202);
    let (status, next) = server.json("POST", "/v1/jobs", Some(&next));
    assert_eq!(status, 202);
    let (slow_id, next_id) = (slow["id"].as_str().unwrap(), next["id"].as_str().unwrap());

    let browser = Browser::launch();
    // `next`'s page, opened while it is queued: nothing to draw yet.
    let mut waiting = browser.page();
    waiting.navigate(&format!("{}/jobs/{next_id}", server.address));
    waiting.wait_for(
        "document.getElementById('job-status').textContent === 'queued'",
        LONG,
    );
    assert_eq!(waiting.count("#range-chart canvas"), 0);
    assert_eq!(
        waiting.eval("document.getElementById('cancel-button').hidden"),
        false
    );

    // `slow`'s page draws its curve as it runs; its cancel button stops it.
    let mut running = browser.page();
    running.navigate(&format!("{}/jobs/{slow_id}", server.address));
    running.wait_for(
        "document.getElementById('job-status').textContent === 'running' &&          document.querySelector('#range-chart canvas') &&          document.getElementById('job-progress-text').textContent.includes('step')",
        LONG,
    );
    running.viewport(1280, 900, false);
    running.screenshot(&screenshot_dir().join("job-running-1280.png"));
    running.eval("document.getElementById('cancel-button').click()");
    running.wait_for(
        "document.getElementById('job-status').textContent === 'canceled'",
        LONG,
    );
    running.wait_for("document.getElementById('cancel-button').hidden", LONG);
    waiting.activate();

    // `next` starts; its page, never reloaded, draws the curve while it runs (from the event
    // stream: the page read no points before), then shows the result.
    waiting.wait_for(
        "document.getElementById('job-status').textContent === 'running' &&          document.querySelector('#range-chart canvas')",
        LONG,
    );
    waiting.wait_for(
        "document.body.dataset.loaded === 'true' && document.querySelector('#schedule-chart canvas')",
        Duration::from_secs(60),
    );
    let job = server.wait_for_job(next_id, LONG);
    let peak = job["result"]["recommendation"]["peak_lr"].as_f64().unwrap();
    assert_eq!(waiting.text("#rec-peak"), sci(peak, 3));
    assert_eq!(waiting.count("#sweep-chart canvas"), 1);
    let (_, canceled) = server.json("GET", &format!("/v1/jobs/{slow_id}"), None);
    assert_eq!(canceled["status"], "canceled");
    assert_no_console_errors(&mut waiting, &[]);
    assert_no_console_errors(&mut running, &[]);
}

#[test]
fn a_race_is_drawn_live_then_shows_its_table_target_and_verdict() {
    let _one = lock();
    let server = Server::start(None);
    // Two recipes, one seed: a few seconds of racing, so the page sees it run.
    let spec = json!({
        "name": "race",
        "kind": "compare",
        "data": {"builtin": "spirals", "samples": 2048},
        "model": {"arch": "mlp", "hidden": [128, 128]},
        "batch_size": 32,
        "plan": {"epochs": 12},
        "range_test": {"steps": 30},
        "sweep": {"count": 2, "epochs": 1},
        "budget": {"steps": 200},
        "recipes": ["sgd_one_cycle", "adam_constant"],
        "seeds": 1,
        "target": 0.9
    });
    let (status, job) = server.json("POST", "/v1/jobs", Some(&spec));
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();

    let browser = Browser::launch();
    let mut page = browser.page();
    page.viewport(1280, 900, false);
    page.navigate(&format!("{}/jobs/{id}", server.address));
    // The race section replaces the tune's charts.
    page.wait_for(
        "!document.getElementById('race').hidden && \
         [...document.querySelectorAll('.tune-only')].every(section => section.hidden)",
        LONG,
    );
    // Drawn from the event stream while the job runs.
    page.wait_for(
        "document.getElementById('job-status').textContent === 'running' && \
         document.querySelector('#race-chart canvas') && \
         document.getElementById('race-empty').hidden",
        Duration::from_secs(60),
    );
    assert!(
        page.eval("document.getElementById('race-verdict').hidden") == true,
        "no verdict before the race ends"
    );
    page.screenshot(&screenshot_dir().join("race-running-1280.png"));

    let job = server.wait_for_job(&id, Duration::from_secs(120));
    let result = &job["result"];
    page.wait_for(
        "document.body.dataset.loaded === 'true' && \
         !document.getElementById('race-verdict').hidden",
        LONG,
    );
    assert_eq!(page.count("#race-chart canvas"), 1);
    assert_eq!(page.text("#job-status"), "succeeded");
    assert_eq!(
        page.text("#race-verdict"),
        result["verdict"].as_str().unwrap()
    );
    let target = result["target"]["value"].as_f64().unwrap();
    assert!(
        page.text("#race-target")
            .contains(&format!("{:.2} %", target * 100.0)),
        "{}",
        page.text("#race-target")
    );
    // One row per recipe, best first, with the result's numbers.
    let ranking: Vec<&str> = result["ranking"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap())
        .collect();
    assert_eq!(
        page.eval("[...document.querySelectorAll('#race-body tr')].map(row => row.dataset.recipe)"),
        json!(ranking)
    );
    for recipe in result["recipes"].as_array().unwrap() {
        let row = format!(
            "#race-body tr[data-recipe='{}']",
            recipe["name"].as_str().unwrap()
        );
        assert_eq!(
            page.text(&format!("{row} td.lr")),
            sci(recipe["lr"].as_f64().unwrap(), 3)
        );
        let accuracy = &recipe["final_val_accuracy"];
        assert_eq!(
            page.text(&format!("{row} td.final-accuracy")),
            format!(
                "{:.2} % ± {:.2}",
                accuracy["mean"].as_f64().unwrap() * 100.0,
                accuracy["std"].as_f64().unwrap() * 100.0
            )
        );
        let steps = match recipe["steps_to_target"].as_u64() {
            Some(steps) => steps.to_string(),
            None => "never".to_string(),
        };
        assert_eq!(page.text(&format!("{row} td.steps-to-target")), steps);
    }
    // Every recipe is a series of the one chart; the x axis switches to seconds.
    let legend = "[...document.querySelectorAll('#race-chart .u-legend .u-series th')].map(cell => cell.textContent.trim())";
    assert_eq!(
        page.eval(legend),
        json!(["step", "sgd_one_cycle", "adam_constant"])
    );
    page.eval("document.getElementById('race-x-seconds').click()");
    page.wait_for(
        "document.getElementById('race-x-seconds').getAttribute('aria-pressed') === 'true'",
        LONG,
    );
    assert_eq!(
        page.eval(legend),
        json!(["seconds", "sgd_one_cycle", "adam_constant"])
    );
    assert_eq!(page.count("#race-chart canvas"), 1);
    page.screenshot(&screenshot_dir().join("race-1280.png"));
    assert_no_console_errors(&mut page, &[]);
}

#[test]
fn a_job_submitted_from_the_form_appears_in_the_list_and_finishes() {
    let _one = lock();
    let server = Server::start(None);
    let browser = Browser::launch();
    let mut page = browser.page();
    page.viewport(1280, 900, false);
    page.navigate(&format!("{}/", server.address));
    page.wait_for(
        "document.getElementById('jobs-updated').textContent !== ''",
        LONG,
    );
    page.eval(
        "(() => {
            const set = (selector, value) => {
                const input = document.querySelector(selector);
                input.value = value;
                input.dispatchEvent(new Event('input'));
            };
            set('#f-name', 'from-the-form');
            set('[data-path=\"range_test.steps\"]', '40');
            set('[data-path=\"sweep.count\"]', '2');
        })()",
    );
    // The fields and the JSON spec stay in step.
    let spec: serde_json::Value = serde_json::from_str(
        page.eval("document.getElementById('spec-json').value")
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(spec["name"], "from-the-form");
    assert_eq!(spec["range_test"]["steps"], 40);
    assert_eq!(spec["sweep"]["count"], 2);
    assert_eq!(spec["data"]["builtin"], "spirals");

    page.eval("document.getElementById('submit-button').click()");
    page.wait_for("!document.getElementById('submit-ok').hidden", LONG);
    page.wait_for(
        "[...document.querySelectorAll('#jobs-body tr')].some(row => \
           row.querySelector('.name-cell a').textContent === 'from-the-form' && \
           row.dataset.status === 'succeeded' && /e-?\\d/.test(row.querySelector('.peak-lr').textContent))",
        Duration::from_secs(60),
    );
    let (_, list) = server.json("GET", "/v1/jobs", None);
    let jobs = list["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["name"], "from-the-form");
    assert_eq!(jobs[0]["spec"]["range_test"]["steps"], 40);
    assert_no_console_errors(&mut page, &[]);
}

#[test]
fn an_invalid_spec_from_the_form_shows_the_servers_message_and_field() {
    let _one = lock();
    let server = Server::start(None);
    let browser = Browser::launch();
    let mut page = browser.page();
    page.navigate(&format!("{}/", server.address));
    page.wait_for(
        "document.getElementById('jobs-updated').textContent !== ''",
        LONG,
    );
    page.eval(
        "(() => {
            const input = document.querySelector('[data-path=\"range_test.start_lr\"]');
            input.value = '100';
            input.dispatchEvent(new Event('input'));
            document.getElementById('submit-button').click();
        })()",
    );
    page.wait_for("!document.getElementById('submit-error').hidden", LONG);
    let message = page.text("#submit-error");
    assert!(message.contains("end_lr"), "{message}");
    assert!(message.contains("range_test.start_lr"), "{message}");
    assert_eq!(
        page.eval("document.querySelector('[data-path=\"range_test.start_lr\"]').classList.contains('invalid')"),
        true
    );
    let (_, list) = server.json("GET", "/v1/jobs", None);
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0);
    assert_no_console_errors(&mut page, &["status of 422"]);
}

#[test]
fn a_csv_upload_with_a_bad_cell_shows_its_row_and_column_and_a_good_one_is_offered() {
    let _one = lock();
    let server = Server::start(None);
    let bad = server.dir.path().join("bad.csv");
    std::fs::write(&bad, "a,b,label\n1,2,0\n3,x,1\n").unwrap();
    let good = server.dir.path().join("good.csv");
    let mut rows = String::from("x1,x2,label\n");
    for i in 0..200 {
        let (a, b) = ((i * 37 % 100) as f64 / 100.0, (i * 61 % 100) as f64 / 100.0);
        rows.push_str(&format!("{a},{b},{}\n", u8::from(a + b > 1.0)));
    }
    std::fs::write(&good, rows).unwrap();

    let browser = Browser::launch();
    let mut page = browser.page();
    page.navigate(&format!("{}/", server.address));
    page.wait_for(
        "document.getElementById('jobs-updated').textContent !== ''",
        LONG,
    );
    page.set_file("#u-file", &bad);
    page.eval("document.getElementById('upload-button').click()");
    page.wait_for("!document.getElementById('upload-error').hidden", LONG);
    let message = page.text("#upload-error");
    assert!(message.contains("row 3"), "{message}");
    assert!(message.contains("column \"b\""), "{message}");

    page.set_file("#u-file", &good);
    page.eval("document.getElementById('upload-button').click()");
    page.wait_for("!document.getElementById('upload-ok').hidden", LONG);
    assert!(page.text("#upload-ok").contains("200 rows"));
    page.wait_for("document.getElementById('preset').value === 'csv'", LONG);
    let spec: serde_json::Value = serde_json::from_str(
        page.eval("document.getElementById('spec-json').value")
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let (_, datasets) = server.json("GET", "/v1/datasets", None);
    assert_eq!(spec["data"]["dataset_id"], datasets["datasets"][0]["id"]);
    assert_no_console_errors(&mut page, &["status of 422"]);
}

#[test]
fn with_a_token_the_dashboard_asks_for_it_once_and_keeps_it() {
    let _one = lock();
    let server = Server::start(Some("s3cret"));
    let job = server.finished_job(&named("guarded"));
    let id = job["id"].as_str().unwrap();

    let browser = Browser::launch();
    let mut page = browser.page();
    page.navigate(&format!("{}/", server.address));
    page.wait_for("document.querySelector('dialog.token-dialog[open]')", LONG);
    page.eval(
        "(() => {
            const dialog = document.querySelector('dialog.token-dialog');
            dialog.querySelector('input').value = 's3cret';
            dialog.querySelector('button[value=ok]').click();
        })()",
    );
    page.wait_for(
        &format!("document.querySelector(\"tr[data-job-id='{id}']\")"),
        LONG,
    );
    assert_eq!(page.eval("localStorage.getItem('lrtune.token')"), "s3cret");

    // Another page of the same browser: no second question.
    page.navigate(&format!("{}/jobs/{id}", server.address));
    page.wait_for("document.body.dataset.loaded === 'true'", LONG);
    assert_eq!(page.count("dialog.token-dialog"), 0);
    assert!(page.text("#rec-peak").contains('e'));
    assert_no_console_errors(&mut page, &["status of 401"]);
}

#[test]
fn the_harness_records_console_errors_and_uncaught_exceptions() {
    let _one = lock();
    let server = Server::start(None);
    let browser = Browser::launch();
    let mut page = browser.page();
    page.navigate(&format!("{}/", server.address));
    page.eval("console.error('seen by the harness')");
    page.eval("setTimeout(() => { throw new Error('thrown in a timer'); }, 0)");
    page.wait_for("true", LONG);
    std::thread::sleep(Duration::from_millis(300));
    let problems = page.problems();
    assert!(
        problems
            .iter()
            .any(|problem| problem == "console.error: seen by the harness"),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|problem| problem.starts_with("uncaught: Error: thrown in a timer")),
        "{problems:#?}"
    );
}
