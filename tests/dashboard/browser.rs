//! Headless Chromium (Debian's `chromium`, never a downloaded browser) driven over the DevTools
//! protocol: one page, JavaScript evaluated in it, screenshots, file inputs, and every console
//! error, uncaught exception and failed load collected.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tempfile::TempDir;
use tungstenite::{Message, WebSocket};

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Where the screenshots are left for people to look at.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("dashboard-screenshots")
}

/// The browser binary, or `None` (with a note) when it is missing outside CI. In CI a missing
/// browser fails the test: `.ci/run` installs it.
pub fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("LRTUNE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(CHROMIUM));
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{} is missing: the dashboard tests need Debian's chromium (apt-get install chromium; .ci/run installs it)",
            path.display()
        );
    }
    eprintln!(
        "note: skipping a dashboard test: {} is missing (apt-get install chromium)",
        path.display()
    );
    None
}

pub struct Browser {
    child: Child,
    port: u16,
    /// The browser's own DevTools WebSocket path.
    browser_path: String,
    _profile: TempDir,
}

impl Browser {
    pub fn launch(binary: &Path) -> Browser {
        let profile = tempfile::tempdir().expect("a profile directory");
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--mute-audio",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().expect("chromium's stderr");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Keep draining so chromium never blocks on a full pipe.
                let _ = sender.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        let (port, browser_path) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = receiver.recv_timeout(left) else {
                let _ = child.kill();
                panic!(
                    "chromium printed no DevTools address in 30 s:\n{}",
                    seen.join("\n")
                );
            };
            // `DevTools listening on ws://127.0.0.1:PORT/devtools/browser/UUID`
            if let Some(rest) = line.split("DevTools listening on ws://127.0.0.1:").nth(1) {
                let (port, path) = rest.split_once('/').expect("a DevTools path");
                let port = port.parse::<u16>().expect("a DevTools port");
                break (port, format!("/{path}"));
            }
            seen.push(line);
        };
        Browser {
            child,
            port,
            browser_path,
            _profile: profile,
        }
    }

    /// A new tab with its console, exceptions and network failures recorded.
    pub fn page(&self) -> Page {
        let mut browser = Connection::open(self.port, &self.browser_path);
        let created = browser.call("Target.createTarget", json!({"url": "about:blank"}));
        let target = created["targetId"]
            .as_str()
            .expect("a target id")
            .to_string();
        let mut connection = Connection::open(self.port, &format!("/devtools/page/{target}"));
        for domain in [
            "Page.enable",
            "Runtime.enable",
            "Log.enable",
            "Network.enable",
        ] {
            connection.call(domain, json!({}));
        }
        Page { connection }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Connection {
    socket: WebSocket<TcpStream>,
    next_id: u64,
    /// Console errors, uncaught exceptions and failed loads, in order.
    problems: Vec<String>,
}

impl Connection {
    fn open(port: u16, path: &str) -> Connection {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("DevTools WebSocket");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a read timeout");
        let url = format!("ws://127.0.0.1:{port}{path}");
        let (socket, _) = tungstenite::client(url.as_str(), stream).expect("a DevTools handshake");
        // Short reads from here on: `call` keeps its own deadline, `drain` stops when idle.
        socket
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("a read timeout");
        Connection {
            socket,
            next_id: 0,
            problems: Vec::new(),
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::text(request.to_string()))
            .unwrap_or_else(|e| panic!("sending {method}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                Instant::now() < deadline,
                "no DevTools answer to {method} in 30 s"
            );
            let message = match self.socket.read() {
                Ok(message) => message,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => panic!("reading the DevTools answer to {method}: {e}"),
            };
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
            if value["id"].as_u64() == Some(id) {
                if let Some(error) = value.get("error") {
                    panic!("{method} failed: {error}");
                }
                return value["result"].clone();
            }
            self.record(&value);
        }
    }

    fn record(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str() {
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
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
                self.problems
                    .push(format!("console.error: {}", args.join(" ")));
            }
            Some("Runtime.exceptionThrown") => {
                let details = &params["exceptionDetails"];
                let text = details["exception"]["description"]
                    .as_str()
                    .or(details["text"].as_str())
                    .unwrap_or("an exception");
                self.problems.push(format!("uncaught: {text}"));
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
                let entry = &params["entry"];
                self.problems.push(format!(
                    "log: {} {}",
                    entry["text"].as_str().unwrap_or(""),
                    entry["url"].as_str().unwrap_or("")
                ));
            }
            Some("Network.loadingFailed") if params["canceled"] != true => {
                self.problems.push(format!(
                    "load failed: {}",
                    params["errorText"].as_str().unwrap_or("")
                ));
            }
            _ => {}
        }
    }

    /// Reads the events that came in since the last call.
    fn drain(&mut self) {
        while let Ok(Message::Text(text)) = self.socket.read() {
            if let Ok(value) = serde_json::from_str::<Value>(text.as_str()) {
                self.record(&value);
            }
        }
    }
}

pub struct Page {
    connection: Connection,
}

impl Page {
    pub fn navigate(&mut self, url: &str) {
        self.connection.call("Page.navigate", json!({"url": url}));
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
        let result = self.connection.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(details) = result.get("exceptionDetails") {
            panic!("evaluating `{expression}` threw: {details}");
        }
        result["result"]["value"].clone()
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
                    self.connection.problems,
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
        self.connection.call("Page.bringToFront", json!({}));
    }

    /// Sets the viewport in CSS pixels (`mobile` for a phone).
    pub fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.connection.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        );
    }

    /// A PNG of the whole page at the current width.
    pub fn screenshot(&mut self, path: &Path) {
        let metrics = self.connection.call("Page.getLayoutMetrics", json!({}));
        let width = metrics["cssLayoutViewport"]["clientWidth"]
            .as_f64()
            .unwrap_or(1280.0);
        let height = metrics["cssContentSize"]["height"]
            .as_f64()
            .unwrap_or(900.0)
            .min(6000.0);
        let shot = self.connection.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true,
                   "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}),
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("the screenshot folder");
        std::fs::write(path, bytes).expect("the screenshot is written");
    }

    /// Puts a file into an `<input type=file>`.
    pub fn set_file(&mut self, selector: &str, file: &Path) {
        let document = self.connection.call("DOM.getDocument", json!({}));
        let root = document["root"]["nodeId"].clone();
        let node = self.connection.call(
            "DOM.querySelector",
            json!({"nodeId": root, "selector": selector}),
        );
        self.connection.call(
            "DOM.setFileInputFiles",
            json!({"nodeId": node["nodeId"], "files": [file.display().to_string()]}),
        );
    }

    /// Console errors, uncaught exceptions and failed loads so far.
    pub fn problems(&mut self) -> Vec<String> {
        self.connection.drain();
        self.connection.problems.clone()
    }
}
