//! Headless Chromium (Debian's `chromium`, never a downloaded browser) through `headless_chrome`:
//! pages, JavaScript evaluated in them, screenshots, file inputs, and every console error,
//! uncaught exception and failed load collected.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use headless_chrome::protocol::cdp::types::Event;
use headless_chrome::protocol::cdp::{Emulation, Network, Page as Cdp, DOM};
use headless_chrome::{LaunchOptions, Tab};
use serde_json::{json, Value};
use tempfile::TempDir;

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the screenshots are left for people to look at.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("dashboard-screenshots")
}

/// The browser binary (`LRTUNE_CHROMIUM`, else Debian's). Fails the test when it is missing.
pub fn chromium() -> PathBuf {
    let path = std::env::var_os("LRTUNE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(CHROMIUM));
    assert!(
        path.exists(),
        "{} is missing: the dashboard tests need Debian's chromium (apt-get install chromium; \
         .ci/run installs it) or LRTUNE_CHROMIUM=PATH; `cargo test -- --skip in_chromium` \
         leaves them out",
        path.display()
    );
    path
}

/// A browser of its own, with a fresh profile; closed when dropped.
pub struct Browser {
    browser: headless_chrome::Browser,
    _profile: TempDir,
}

impl Browser {
    pub fn launch() -> Browser {
        let profile = tempfile::tempdir().expect("a profile directory");
        let options = LaunchOptions {
            headless: true,
            sandbox: false,
            enable_gpu: false,
            window_size: Some((1280, 900)),
            path: Some(chromium()),
            user_data_dir: Some(profile.path().to_path_buf()),
            args: [
                "--disable-quic",
                "--no-default-browser-check",
                "--disable-component-update",
                "--mute-audio",
                "--hide-scrollbars",
            ]
            .map(OsStr::new)
            .to_vec(),
            // The tests poll a page for up to minutes; the connection must outlive the waits.
            idle_browser_timeout: Duration::from_secs(600),
            ..LaunchOptions::default()
        };
        let browser = headless_chrome::Browser::new(options).expect("chromium starts");
        Browser {
            browser,
            _profile: profile,
        }
    }

    /// A new tab with its console, exceptions and network failures recorded.
    pub fn page(&self) -> Page {
        let tab = self.browser.new_tab().expect("a new tab");
        tab.set_default_timeout(CALL_TIMEOUT);
        tab.enable_runtime().expect("Runtime.enable");
        tab.enable_log().expect("Log.enable");
        tab.call_method(Network::Enable {
            max_total_buffer_size: None,
            max_resource_buffer_size: None,
            max_post_data_size: None,
            report_direct_socket_traffic: None,
            enable_durable_messages: None,
        })
        .expect("Network.enable");
        let problems = Arc::new(Mutex::new(Vec::new()));
        let recorded = problems.clone();
        tab.add_event_listener(Arc::new(move |event: &Event| {
            if let Some(problem) = problem(event) {
                recorded
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(problem);
            }
        }))
        .expect("an event listener");
        Page { tab, problems }
    }
}

/// A console error, an uncaught exception, an error logged or a failed load, as a line.
fn problem(event: &Event) -> Option<String> {
    match event {
        Event::RuntimeConsoleAPICalled(called) => {
            let params = serde_json::to_value(&called.params).ok()?;
            if params["type"] != "error" {
                return None;
            }
            let args: Vec<String> = params["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|arg| {
                    arg["value"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| arg["description"].as_str().map(str::to_string))
                        .unwrap_or_else(|| arg.to_string())
                })
                .collect();
            Some(format!("console.error: {}", args.join(" ")))
        }
        Event::RuntimeExceptionThrown(thrown) => {
            let details = &thrown.params.exception_details;
            let text = details
                .exception
                .as_ref()
                .and_then(|exception| exception.description.clone())
                .unwrap_or_else(|| details.text.clone());
            Some(format!("uncaught: {text}"))
        }
        Event::LogEntryAdded(added) => {
            let entry = serde_json::to_value(&added.params.entry).ok()?;
            (entry["level"] == "error").then(|| {
                format!(
                    "log: {} {}",
                    entry["text"].as_str().unwrap_or(""),
                    entry["url"].as_str().unwrap_or("")
                )
            })
        }
        Event::NetworkLoadingFailed(failed) if failed.params.canceled != Some(true) => {
            Some(format!("load failed: {}", failed.params.error_text))
        }
        _ => None,
    }
}

pub struct Page {
    tab: Arc<Tab>,
    problems: Arc<Mutex<Vec<String>>>,
}

impl Page {
    pub fn navigate(&mut self, url: &str) {
        self.tab.navigate_to(url).expect("Page.navigate");
        self.wait_for(
            &format!(
                "location.href === {} && document.readyState === 'complete'",
                json!(url)
            ),
            Duration::from_secs(20),
        );
    }

    /// Evaluates an expression (awaiting a promise) and returns its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        // By value: `Tab::evaluate` asks for a handle, which has no value for arrays.
        let evaluated = self
            .tab
            .call_method(headless_chrome::protocol::cdp::Runtime::Evaluate {
                expression: expression.to_string(),
                return_by_value: Some(true),
                await_promise: Some(true),
                generate_preview: None,
                silent: None,
                include_command_line_api: None,
                user_gesture: None,
                object_group: None,
                context_id: None,
                throw_on_side_effect: None,
                timeout: None,
                disable_breaks: None,
                repl_mode: None,
                allow_unsafe_eval_blocked_by_csp: None,
                unique_context_id: None,
                serialization_options: None,
            })
            .unwrap_or_else(|error| panic!("evaluating `{expression}`: {error}"));
        if let Some(details) = evaluated.exception_details {
            panic!("evaluating `{expression}` threw: {details:?}");
        }
        evaluated.result.value.unwrap_or(Value::Null)
    }

    /// Polls `condition` (a JavaScript expression) until it is true.
    pub fn wait_for(&mut self, condition: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let probe = format!(
            "(() => {{ try {{ return Boolean({condition}); }} catch (e) {{ return false; }} }})()"
        );
        loop {
            if self.eval(&probe) == Value::Bool(true) {
                return;
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body ? document.body.innerText.slice(0, 2000) : ''");
                panic!(
                    "waited {timeout:?} for `{condition}`\nproblems: {:#?}\npage text:\n{}",
                    self.problems(),
                    text.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn text(&mut self, selector: &str) -> String {
        let value = self.eval(&format!(
            "(document.querySelector({}) || {{}}).textContent || ''",
            json!(selector)
        ));
        value.as_str().unwrap_or("").trim().to_string()
    }

    pub fn count(&mut self, selector: &str) -> u64 {
        self.eval(&format!(
            "document.querySelectorAll({}).length",
            json!(selector)
        ))
        .as_u64()
        .unwrap_or(0)
    }

    /// Brings the tab to the front (a background tab gets no animation frames).
    pub fn activate(&mut self) {
        self.tab.bring_to_front().expect("Page.bringToFront");
    }

    /// Sets the viewport in CSS pixels (`mobile` for a phone).
    pub fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.tab
            .call_method(Emulation::SetDeviceMetricsOverride {
                width,
                height,
                device_scale_factor: 1.0,
                mobile,
                scale: None,
                screen_width: None,
                screen_height: None,
                position_x: None,
                position_y: None,
                dont_set_visible_size: None,
                screen_orientation: None,
                viewport: None,
                display_feature: None,
                device_posture: None,
            })
            .expect("Emulation.setDeviceMetricsOverride");
    }

    /// A PNG of the whole page at the current width.
    pub fn screenshot(&mut self, path: &Path) {
        let metrics = self
            .tab
            .call_method(Cdp::GetLayoutMetrics(None))
            .expect("Page.getLayoutMetrics");
        let width = metrics.css_layout_viewport.client_width as f64;
        let height = metrics.css_content_size.height.min(6000.0);
        let bytes = self
            .tab
            .call_method(Cdp::CaptureScreenshot {
                format: Some(Cdp::CaptureScreenshotFormatOption::Png),
                quality: None,
                clip: Some(Cdp::Viewport {
                    x: 0.0,
                    y: 0.0,
                    width,
                    height,
                    scale: 1.0,
                }),
                from_surface: None,
                capture_beyond_viewport: Some(true),
                optimize_for_speed: None,
            })
            .expect("Page.captureScreenshot")
            .data;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(bytes)
            .expect("base64 PNG");
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("the screenshot folder");
        std::fs::write(path, bytes).expect("the screenshot is written");
    }

    /// Runs `script` in every document the page loads from now on, before the page's own.
    pub fn before_load(&mut self, script: &str) {
        self.tab
            .call_method(Cdp::AddScriptToEvaluateOnNewDocument {
                source: script.to_string(),
                world_name: None,
                include_command_line_api: None,
                run_immediately: None,
            })
            .expect("Page.addScriptToEvaluateOnNewDocument");
    }

    /// Puts a file into an `<input type=file>`.
    pub fn set_file(&mut self, selector: &str, file: &Path) {
        let element = self.tab.find_element(selector).expect("the file input");
        self.tab
            .call_method(DOM::SetFileInputFiles {
                files: vec![file.display().to_string()],
                node_id: None,
                backend_node_id: Some(element.backend_node_id),
                object_id: None,
            })
            .expect("DOM.setFileInputFiles");
    }

    /// Console errors, uncaught exceptions and failed loads so far.
    pub fn problems(&mut self) -> Vec<String> {
        self.problems
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}
