//! Running the binary with a deadline, and a server on a free port that dies with the test.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A tiny tune job: a 30-step range test and two one-epoch sweep runs, well under a second.
pub const TINY_TUNE: &str = r#"{
    "data": {"builtin": "spirals", "samples": 512},
    "model": {"arch": "mlp", "hidden": [16]},
    "batch_size": 32,
    "plan": {"epochs": 2},
    "range_test": {"steps": 30},
    "sweep": {"count": 2, "epochs": 1}
}"#;

/// No command of these tests takes anywhere near this long.
const COMMAND_DEADLINE: Duration = Duration::from_secs(180);

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `lrtune` with these arguments and extra environment, killing it past the deadline.
pub fn lrtune(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lrtune"));
    command
        .args(args)
        .env_remove("LRTUNE_API_TOKEN")
        .env_remove("GITHUB_OUTPUT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("the lrtune binary starts");
    let stdout = read_in_background(child.stdout.take().expect("stdout"));
    let stderr = read_in_background(child.stderr.take().expect("stderr"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting on lrtune") {
            break status;
        }
        if started.elapsed() > COMMAND_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lrtune {args:?} ran past {COMMAND_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        code: status.code().unwrap_or(-1),
        stdout: stdout
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_default(),
        stderr: stderr
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_default(),
    }
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let _ = sender.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    receiver
}

/// `lrtune serve` on a free port with its own database; killed when dropped.
pub struct Server {
    child: Child,
    pub address: String,
}

impl Server {
    /// Peak resident memory of the server process so far (`VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server's /proc status");
        let line = status
            .lines()
            .find(|line| line.starts_with("VmHWM:"))
            .expect("a VmHWM line");
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_server(dir: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lrtune"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .arg("--db")
        .arg(dir.join("x.db"))
        .args(extra)
        .env_remove("LRTUNE_API_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the lrtune binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = sender.send(line);
    });
    let line = match receiver.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not print its address within a minute");
        }
    };
    let Some(address) = line.trim().strip_prefix("lrtune listening on ") else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("unexpected first line from the server: {line:?}");
    };
    Server {
        address: address.to_string(),
        child,
    }
}

/// Writes a file in the test's folder and gives its path as a string.
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing a test file");
    path_string(&path)
}

pub fn path_string(path: &Path) -> String {
    path.to_str().expect("a UTF-8 temporary path").to_string()
}

pub fn read_json(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}\n{text}"))
}

/// The `key=value` lines of a `$GITHUB_OUTPUT` file.
pub fn github_outputs(path: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

/// Checks that an SVG plot exists and draws a curve and the given labels.
pub fn assert_plot(path: &str, labels: &[&str]) {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    assert!(
        svg.starts_with("<svg"),
        "{path} is not an SVG: {}",
        &svg[..svg.len().min(200)]
    );
    let longest_line = svg
        .split("<polyline")
        .skip(1)
        .map(|element| {
            let points = element
                .split("points=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("");
            points.split_whitespace().count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        longest_line >= 20,
        "{path} has no curve of 20 or more points (longest polyline: {longest_line})"
    );
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter_map(|element| element.split_once('>'))
        .filter_map(|(_, rest)| rest.split("</text>").next())
        .map(str::trim)
        .collect();
    for label in labels {
        assert!(
            texts.iter().any(|text| text.starts_with(label)),
            "{path} has no text starting with {label:?}; its texts: {texts:?}"
        );
    }
}
