//! The real `lrtune serve` binary on a free port with its own database, started from an empty
//! folder (so the dashboard must come from the binary), and a small HTTP client for its API.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::support::process::Lrtune;

pub struct Server {
    _process: Lrtune,
    /// `http://127.0.0.1:PORT`
    pub address: String,
    port: u16,
    token: Option<String>,
    pub dir: TempDir,
}

impl Server {
    pub fn start(token: Option<&str>) -> Server {
        Server::start_with(token, &[])
    }

    /// With more `lrtune serve` arguments.
    pub fn start_with(token: Option<&str>, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut extra = args.to_vec();
        if let Some(token) = token {
            extra.extend(["--api-token", token]);
        }
        let process = Lrtune::serve_launch(dir.path().join("x.db"), &extra)
            .current_dir(dir.path())
            .start();
        Server {
            address: process.address.clone(),
            port: process.port(),
            _process: process,
            token: token.map(str::to_string),
            dir,
        }
    }

    /// One request; answers the status, the headers (lowercased names) and the body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        self.request_with(method, path, body, "")
    }

    /// `extra` is more header lines, each ending in `\r\n`.
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        extra: &str,
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("the server");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("a read timeout");
        let body = body.map(Value::to_string).unwrap_or_default();
        let auth = self
            .token
            .as_ref()
            .map(|token| format!("Authorization: Bearer {token}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}{extra}\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("the request is sent");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("a response");
        let split = response
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .expect("a header block");
        let head = String::from_utf8_lossy(&response[..split]).to_string();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_lowercase(), value.trim().to_string()))
            .collect();
        let mut body = response[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"))
        {
            body = dechunk(&body);
        }
        (status, headers, body)
    }

    pub fn json(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let (status, _, bytes) = self.request(method, path, body);
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    /// Submits a job through the API and waits (bounded) until it has succeeded.
    pub fn finished_job(&self, spec: &Value) -> Value {
        let (status, job) = self.json("POST", "/v1/jobs", Some(spec));
        assert_eq!(status, 202, "the job is queued: {job}");
        let id = job["id"].as_str().expect("a job id").to_string();
        self.wait_for_job(&id, Duration::from_secs(60))
    }

    pub fn wait_for_job(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, job) = self.json("GET", &format!("/v1/jobs/{id}"), None);
            match job["status"].as_str() {
                Some("succeeded") => return job,
                Some("failed" | "canceled") => panic!("job {id} did not succeed: {job}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "job {id} still not done: {job}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&body[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = end + 2;
        out.extend_from_slice(&body[start..(start + size).min(body.len())]);
        body = &body[(start + size + 2).min(body.len())..];
    }
}
