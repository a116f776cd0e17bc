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

/// The elements that reach past `width` CSS pixels, leaving out what lies inside a box that
/// scrolls sideways (a wide table in its `.table-wrap`), which is reached by scrolling, and
/// inside a closed `<details>`, which is not drawn (Chromium may keep its box from an earlier,
/// wider layout).
fn too_wide_outside_scrollers(page: &mut Page, width: u32) -> serde_json::Value {
    page.eval(&format!(
        "[...document.querySelectorAll('body *')]
            .filter(node => node.getBoundingClientRect().right > {width} + 0.5)
            .filter(node => !node.closest('details:not([open]) > :not(summary)'))
            .filter(node => {{
                for (let box = node.parentElement; box; box = box.parentElement) {{
                    if (['auto', 'scroll'].includes(getComputedStyle(box).overflowX)) return false;
                }}
                return true;
            }})
            .map(node => node.tagName + '#' + node.id + '.' + node.className)"
    ))
}

/// Checks a `mean ± std` cell as the dashboard writes it (`format.js`'s `plusMinus`): `unit`
/// after the mean, the std to at most two significant figures, both to the same decimals and
/// each within half a unit of that last decimal of the result's numbers; `± <0.001` for a std
/// too small to show.
fn assert_plus_minus(cell: &str, mean: f64, std: f64, unit: &str) {
    let (mean_text, std_text) = cell
        .split_once(" ± ")
        .unwrap_or_else(|| panic!("{cell:?} has no spread"));
    let mean_text = mean_text
        .strip_suffix(unit)
        .unwrap_or_else(|| panic!("{cell:?} has no {unit:?}"));
    let decimals = |text: &str| text.split_once('.').map_or(0, |(_, after)| after.len());
    let places = decimals(mean_text);
    let half_unit = 0.5 * 10f64.powi(-(places as i32)) * (1.0 + 1e-9);
    let shown: f64 = mean_text.parse().unwrap_or_else(|_| panic!("{cell:?}"));
    assert!(
        (shown - mean).abs() <= half_unit,
        "{cell:?} for a mean of {mean}"
    );
    assert_eq!(
        decimals(std_text),
        places,
        "{cell:?}: the std to the mean's decimals"
    );
    if let Some(bound) = std_text.strip_prefix('<') {
        let bound: f64 = bound.parse().unwrap_or_else(|_| panic!("{cell:?}"));
        assert!(
            std > 0.0 && std < bound / 2.0,
            "{cell:?} for a std of {std}"
        );
        return;
    }
    let digits: String = std_text.chars().filter(char::is_ascii_digit).collect();
    let figures = digits.trim_start_matches('0').len();
    assert!(figures <= 2, "{cell:?}: the std to two figures at most");
    let shown: f64 = std_text.parse().unwrap_or_else(|_| panic!("{cell:?}"));
    assert!(
        (shown - std).abs() <= half_unit,
        "{cell:?} for a std of {std}"
    );
}

/// The race chart's y scale and the values it plots from each recipe's quarter-way evaluation
/// on (its second, at the least): the first quarter is where every recipe climbs from chance.
const RACE_Y_RANGE: &str = "(() => {
    const u = document.getElementById('race-chart').uplot;
    const later = u.data.slice(1).flatMap(values => {
        const finite = values.filter(Number.isFinite);
        return finite.slice(Math.max(1, Math.ceil((finite.length - 1) / 4)));
    });
    return {
        min: u.scales.y.min, max: u.scales.y.max, log: u.scales.y.distr === 3,
        low: Math.min(...later), high: Math.max(...later),
    };
})()";

/// Puts the race chart's cursor at `fraction` of its width (none: off the chart) and answers
/// the legend's value cells, the x first.
fn race_legend_at(page: &mut Page, fraction: Option<f64>) -> Vec<String> {
    let (left, top) = match fraction {
        Some(fraction) => (
            format!("u.over.clientWidth * {fraction}"),
            "u.over.clientHeight / 2".to_string(),
        ),
        None => ("-10".to_string(), "-10".to_string()),
    };
    let values = page.eval(&format!(
        "(() => {{
            const u = document.getElementById('race-chart').uplot;
            u.setCursor({{left: {left}, top: {top}}});
            return [...document.querySelectorAll('#race-chart .u-legend .u-series .u-value')]
                .map(cell => cell.textContent.trim());
        }})()"
    ));
    serde_json::from_value(values).expect("the legend's texts")
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
    // Every training run is listed: the range test first, then the sweep's runs, all done.
    let (_, trials) = server.json("GET", &format!("/v1/jobs/{id}/trials"), None);
    let count = trials["trials"].as_array().unwrap().len();
    assert!(count >= 5, "{trials}");
    assert_eq!(page.count("#trials-body tr"), count as u64);
    assert_eq!(
        page.count("#trials-body tr[data-status='succeeded']"),
        count as u64
    );
    assert_eq!(
        page.text("#trials-body tr:first-child td:nth-child(2)"),
        "range test"
    );
    assert_eq!(
        page.text("#trials-summary"),
        format!("{count} trials: {count} done")
    );
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
    // The trials table scrolls sideways in its box, like the race's.
    assert_eq!(
        too_wide_outside_scrollers(&mut page, 390),
        json!([]),
        "the job page fits a phone"
    );
    assert_no_console_errors(&mut page, &[]);
}

#[test]
fn the_sweep_names_the_stability_edge_and_the_unstable_candidates_that_finished() {
    let _one = lock();
    let server = Server::start(None);
    let mut spec = named("edged");
    // A peak of 1,000 diverges: the stability edge, whatever else turns out unstable.
    spec["sweep"] = json!({"candidates": [0.01, 0.1, 1000.0], "epochs": 1});
    let job = server.finished_job(&spec);
    let id = job["id"].as_str().unwrap();
    let result = &job["result"];
    let recommendation = &result["recommendation"];
    let edge = recommendation["stability_edge_lr"].as_f64().unwrap();
    assert!(edge <= 1000.0, "{recommendation}");
    let reason = recommendation["stability_edge_reason"].as_str().unwrap();
    let mut unstable: Vec<f64> = result["sweep"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["unstable"] == json!(true) && c["val_loss"].is_f64())
        .map(|c| c["peak_lr"].as_f64().unwrap())
        .collect();
    unstable.sort_by(f64::total_cmp);
    unstable.dedup();
    let mut expected = format!(
        "Stability edge {} ({}, dashed): the peaks at or above it are unstable, and the recommendation keeps a margin below it.",
        sci(edge, 2),
        reason.replace('_', " ")
    );
    if !unstable.is_empty() {
        let peaks: Vec<String> = unstable.iter().map(|&peak| sci(peak, 2)).collect();
        expected.push_str(&format!(
            " Unstable, finished (orange): {}.",
            peaks.join(", ")
        ));
    }

    let browser = Browser::launch();
    let mut page = browser.page();
    page.viewport(1280, 900, false);
    page.navigate(&format!("{}/jobs/{id}", server.address));
    page.wait_for(
        "document.body.dataset.loaded === 'true' && document.querySelector('#sweep-chart canvas')",
        LONG,
    );
    assert_eq!(page.text("#sweep-unstable"), expected);
    assert_eq!(
        page.eval("document.getElementById('sweep-unstable').hidden"),
        false
    );
    // The diverged peak is named under the chart, not plotted.
    assert!(
        page.text("#sweep-empty").contains("1.0e3"),
        "{}",
        page.text("#sweep-empty")
    );
    assert_no_console_errors(&mut page, &[]);

    // A job's note is there exactly when its result has an edge.
    let calm = server.finished_job(&named("calm"));
    page.navigate(&format!(
        "{}/jobs/{}",
        server.address,
        calm["id"].as_str().unwrap()
    ));
    page.wait_for("document.body.dataset.loaded === 'true'", LONG);
    assert_eq!(
        page.eval("document.getElementById('sweep-unstable').hidden"),
        json!(calm["result"]["recommendation"]["stability_edge_lr"].is_null())
    );
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
    // Its range test is a trial, shown running on this process's worker.
    running.wait_for(
        "document.getElementById('trials-summary').textContent === '1 trial: 0 done · 1 running on 1 worker' &&          document.querySelector(\"#trials-body tr[data-status='running']\")",
        LONG,
    );
    running.viewport(1280, 900, false);
    running.screenshot(&screenshot_dir().join("job-running-1280.png"));
    running.eval("document.getElementById('cancel-button').click()");
    running.wait_for(
        "document.getElementById('job-status').textContent === 'canceled'",
        LONG,
    );
    running.wait_for(
        "document.getElementById('trials-summary').textContent === '1 trial: 0 done · 1 canceled'",
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
    // The seven recipes of examples/race-mnist.json, two of them untuned challengers, with
    // two seeds each (so that the table has a spread to show, and its longest names), on a
    // small problem: seconds of racing, so the page sees it run.
    let recipes = [
        "sgd_one_cycle",
        "adam_constant",
        "adam_plateau",
        "sgd_warm_restarts",
        "adamw_warmup_cosine",
        "prodigy",
        "schedule_free_adamw",
    ];
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
        "recipes": recipes,
        "seeds": 2,
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
        // Prodigy's multiplier with the step size d it found (mean over seeds).
        let lr = sci(recipe["lr"].as_f64().unwrap(), 3);
        let lr = match recipe["final_d"]["mean"].as_f64() {
            Some(d) => format!("{lr}\n(d {})", sci(d, 3)),
            None => lr,
        };
        assert_eq!(page.text(&format!("{row} td.lr")), lr);
        // Mean ± std over the seeds, the std rounded to the mean's decimals.
        for (cell, stat, scale, unit) in [
            ("final-loss", &recipe["final_val_loss"], 1.0, ""),
            ("final-accuracy", &recipe["final_val_accuracy"], 100.0, " %"),
        ] {
            let text = page.text(&format!("{row} td.{cell}"));
            match (stat["mean"].as_f64(), stat["std"].as_f64()) {
                (Some(mean), Some(std)) => {
                    assert_plus_minus(&text, mean * scale, std * scale, unit)
                }
                _ => assert_eq!(text, "diverged", "{cell}"),
            }
        }
        let steps = match recipe["steps_to_target"].as_u64() {
            Some(steps) => steps.to_string(),
            None => "never".to_string(),
        };
        assert_eq!(page.text(&format!("{row} td.steps-to-target")), steps);
        // How each recipe got its learning rate: the tuning's steps, or untuned.
        let tuning = match (recipe["tuned"].as_bool(), recipe["tune_steps"].as_u64()) {
            (Some(false), _) => "untuned".to_string(),
            (Some(true), Some(steps)) => format!(
                "{} steps",
                lrtune::engine::compare::thousands(steps as usize)
            ),
            other => panic!("{row}: tuned and tune_steps missing: {other:?}"),
        };
        assert_eq!(page.text(&format!("{row} td.tuning")), tuning, "{row}");
    }
    assert_eq!(page.text("#race-head-row th.tuning"), "Tuning");
    assert!(
        page.text("#race-body tr[data-recipe='prodigy'] td.lr")
            .starts_with("1.00\n(d "),
        "prodigy shows the d it found"
    );

    // Every recipe is a series of the one chart; the x axis switches to seconds.
    let legend = "[...document.querySelectorAll('#race-chart .u-legend .u-series th')].map(cell => cell.textContent.trim())";
    let mut labels = vec!["step"];
    labels.extend(recipes);
    assert_eq!(page.eval(legend), json!(labels));
    check_race_chart(&mut page, "steps at 1280 px");
    page.eval("document.getElementById('race-x-seconds').click()");
    page.wait_for(
        "document.getElementById('race-x-seconds').getAttribute('aria-pressed') === 'true'",
        LONG,
    );
    labels[0] = "seconds";
    assert_eq!(page.eval(legend), json!(labels));
    assert_eq!(page.count("#race-chart canvas"), 1);
    check_race_chart(&mut page, "seconds at 1280 px");
    // The table fits the card: no column cut off, no sideways scrolling on a desktop.
    assert_eq!(
        page.eval(
            "(w => [w.scrollWidth, w.clientWidth])(document.querySelector('.race-table-wrap'))"
        )
        .as_array()
        .map(|sizes| sizes[0].as_f64() <= sizes[1].as_f64()),
        Some(true),
        "the race table fits at 1280 px"
    );
    assert_eq!(
        too_wide(&mut page, 1280),
        json!([]),
        "the race page fits at 1280 px"
    );
    race_legend_at(&mut page, Some(0.6));
    page.screenshot(&screenshot_dir().join("race-1280.png"));

    // The loss instead of the accuracy: on a log axis, its legend in plain numbers.
    page.eval("document.getElementById('race-y-val_loss').click()");
    page.wait_for(
        "document.getElementById('race-y-val_loss').getAttribute('aria-pressed') === 'true'",
        LONG,
    );
    assert_eq!(page.eval(&format!("{RACE_Y_RANGE}.log")), true);
    check_race_chart(&mut page, "loss against seconds at 1280 px");
    race_legend_at(&mut page, Some(0.6));
    page.screenshot(&screenshot_dir().join("race-loss-1280.png"));
    page.eval("document.getElementById('race-y-val_accuracy').click()");

    // A phone: the chart follows the width, the page fits, the table scrolls sideways in its
    // box with its header and the recipe column in view, and its last column can be reached.
    page.eval("document.getElementById('race-x-step').click()");
    page.viewport(390, 844, true);
    page.wait_for(
        "document.documentElement.clientWidth === 390 && \
         document.querySelector('#race-chart canvas').getBoundingClientRect().right <= 390 && \
         document.getElementById('race-x-step').getAttribute('aria-pressed') === 'true'",
        LONG,
    );
    page.screenshot(&screenshot_dir().join("race-390.png"));
    assert_eq!(
        too_wide_outside_scrollers(&mut page, 390),
        json!([]),
        "the race page fits a phone"
    );
    check_race_chart(&mut page, "steps at 390 px");
    let table = page.eval(
        "(() => {
            const wrap = document.querySelector('.race-table-wrap');
            const box = wrap.getBoundingClientRect();
            const fits = wrap.scrollWidth <= wrap.clientWidth;
            wrap.scrollLeft = wrap.scrollWidth;
            const head = document.getElementById('race-head-row');
            const last = head.lastElementChild.getBoundingClientRect();
            const recipe = document.querySelector('#race-body td.recipe').getBoundingClientRect();
            return {
                fits,
                scrolls: getComputedStyle(wrap).overflowX === 'auto',
                // Within a pixel: scroll offsets are whole pixels, the box's edges are not.
                inside: box.right <= 390 && last.right <= box.right + 1 && last.left >= box.left,
                header_shown: head.getBoundingClientRect().top >= box.top && head.getBoundingClientRect().height > 0,
                recipe_held: Math.abs(recipe.left - box.left) < 1.5,
            };
        })()",
    );
    assert!(
        table["fits"] == true || table["scrolls"] == true,
        "the table fits or scrolls: {table}"
    );
    for key in ["inside", "header_shown", "recipe_held"] {
        assert_eq!(table[key], true, "{key}: {table}");
    }
    page.screenshot(&screenshot_dir().join("race-390-table-scrolled.png"));
    assert_no_console_errors(&mut page, &[]);

    // A race stored before untuned recipes existed does not say how each recipe was tuned:
    // its table has no "Tuning" column, and still fits.
    let mut tuned = browser.page();
    tuned.before_load(
        "(() => {
            const original = window.fetch;
            window.fetch = async (...args) => {
                const response = await original(...args);
                if (!/^\\/v1\\/jobs\\/[^/]+$/.test(new URL(response.url).pathname)) return response;
                const job = await response.json();
                (job.result ? job.result.recipes : []).forEach((recipe) => {
                    delete recipe.tuned;
                    delete recipe.tune_steps;
                });
                return new Response(JSON.stringify(job), {status: response.status, headers: response.headers});
            };
        })()",
    );
    tuned.viewport(1280, 900, false);
    tuned.navigate(&format!("{}/jobs/{id}", server.address));
    tuned.wait_for(
        "document.body.dataset.loaded === 'true' && document.querySelector('#race-body tr')",
        LONG,
    );
    assert_eq!(tuned.count("#race-head-row th.tuning"), 0);
    assert_eq!(tuned.count("#race-body td.tuning"), 0);
    assert_eq!(
        tuned.eval(
            "(w => w.scrollWidth <= w.clientWidth)(document.querySelector('.race-table-wrap'))"
        ),
        true,
        "an older race's table fits at 1280 px"
    );
    tuned.screenshot(&screenshot_dir().join("race-older-1280.png"));
    assert_no_console_errors(&mut tuned, &[]);
}

/// The race chart's y axis is zoomed to the curves from a quarter of the way on (the
/// accuracy's within 0 to 1, the loss's on a log scale), and its legend shows each recipe's
/// value at the hovered step and its last one away from the chart.
fn check_race_chart(page: &mut Page, what: &str) {
    let range = page.eval(RACE_Y_RANGE);
    let number = |key: &str| {
        range[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: {range}"))
    };
    let (min, max) = (number("min"), number("max"));
    let accuracy = range["log"] == false;
    assert!(
        min > 0.0 && (!accuracy || max - min < 1.0),
        "{what}: the axis is zoomed in from 0 to 1, or a log axis: {range}"
    );
    assert!(
        min <= number("low") && number("high") <= max,
        "{what}: every value from a quarter of the way on is in view: {range}"
    );
    // An accuracy as `98.12 %`, a loss as a plain number.
    let readable = |text: &str| {
        if !accuracy {
            return text.parse::<f64>().is_ok_and(|value| value > 0.0);
        }
        text.strip_suffix(" %")
            .and_then(|number| number.parse::<f64>().ok())
            .is_some_and(|value| (0.0..=100.0).contains(&value))
    };
    for fraction in [0.3, 0.6, 0.95] {
        let values = race_legend_at(page, Some(fraction));
        assert!(
            values[0].parse::<f64>().is_ok(),
            "{what}: the legend names the hovered x: {values:?}"
        );
        assert!(
            values.len() > 1 && values[1..].iter().all(|value| readable(value)),
            "{what}: the legend shows every recipe's value at the cursor: {values:?}"
        );
    }
    let values = race_legend_at(page, None);
    assert_eq!(values[0], "last", "{what}: {values:?}");
    assert!(
        values[1..].iter().all(|value| readable(value)),
        "{what}: away from the chart, the legend shows the last values: {values:?}"
    );
}

#[test]
fn a_mean_and_its_spread_are_shown_to_the_same_decimals() {
    let _one = lock();
    let server = Server::start(None);
    let browser = Browser::launch();
    let mut page = browser.page();
    page.navigate(&format!("{}/", server.address));
    // `format.js`'s rule, in the browser that runs it.
    let cases = [
        (0.1521, 0.0001429, "", "0.1521 ± 0.0001"),
        (0.1521, 0.0312, "", "0.152 ± 0.031"),
        (0.1521, 0.0, "", "0.1521 ± 0.0000"),
        (0.1521, 2e-7, "", "0.1521 ± <0.0001"),
        (98.1234, 0.0512, " %", "98.12 % ± 0.05"),
        (97.5, 1.25, " %", "97.5 % ± 1.3"),
        (1234.5, 12.3, "", "1235 ± 12"),
        (2.345, f64::NAN, "", "2.345"),
    ];
    for (mean, std, unit, expected) in cases {
        let std = if std.is_nan() {
            json!(null)
        } else {
            json!(std)
        };
        let text = page.eval(&format!(
            "import('/js/format.js').then(format => format.plusMinus({mean}, {std}, {}))",
            json!(unit)
        ));
        assert_eq!(text, expected, "{mean} ± {std}");
    }
    assert_eq!(
        page.eval("import('/js/format.js').then(format => format.plusMinus(null, 0.1))"),
        "–"
    );
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
            // Another optimizer starts from its own defaults: SGD's momentum goes.
            const optimizer = document.querySelector('[data-path=\"optimizer.name\"]');
            optimizer.value = 'schedule_free_adamw';
            optimizer.dispatchEvent(new Event('change'));
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
    assert_eq!(
        spec["optimizer"],
        serde_json::json!({"name": "schedule_free_adamw"})
    );

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
    assert_eq!(jobs[0]["spec"]["optimizer"]["name"], "schedule_free_adamw");
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
