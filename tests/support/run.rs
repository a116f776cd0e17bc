//! Running the workspace's binaries as a user would, with a deadline: `lrtune ARGS` (and
//! `lrtune-dev ARGS` from dev/tests, which includes this file alone).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// No command of these tests takes anywhere near this long.
const COMMAND_DEADLINE: Duration = Duration::from_secs(180);

/// A binary of the workspace in the folder cargo built this test into (`target/debug/`): both
/// `lrtune` and `lrtune-dev` are there when the tests run from the root (`cargo test`), which
/// builds both default members first.
pub fn binary(name: &str) -> PathBuf {
    let test = std::env::current_exe().expect("the test binary's path");
    // target/PROFILE/deps/TEST-HASH
    let profile = test
        .parent()
        .and_then(Path::parent)
        .expect("the test binary sits in target/PROFILE/deps");
    let path = profile.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: run the tests from the workspace root (`cargo test` builds lrtune and \
         lrtune-dev), or build it first (`cargo build -p {name}`)",
        path.display()
    );
    path
}

/// The `lrtune` binary: cargo's own for lrtune's tests, else the one beside this test.
pub fn lrtune_binary() -> PathBuf {
    option_env!("CARGO_BIN_EXE_lrtune").map_or_else(|| binary("lrtune"), PathBuf::from)
}

/// The `lrtune-dev` binary (the developers' tools: `bench-api`).
pub fn lrtune_dev_binary() -> PathBuf {
    option_env!("CARGO_BIN_EXE_lrtune-dev").map_or_else(|| binary("lrtune-dev"), PathBuf::from)
}

/// What a command did.
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

/// `lrtune ARGS` with extra environment.
pub fn lrtune(args: &[&str], env: &[(&str, &str)]) -> Output {
    run(&lrtune_binary(), args, env, None)
}

/// `lrtune ARGS` with `stdin` written to its standard input.
pub fn lrtune_with_stdin(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    run(&lrtune_binary(), args, env, Some(stdin))
}

/// `lrtune-dev ARGS`.
pub fn lrtune_dev(args: &[&str]) -> Output {
    run(&lrtune_dev_binary(), args, &[], None)
}

/// Runs `program ARGS` without the caller's token or GitHub output file, killing it past the
/// deadline.
pub fn run(program: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_remove("LRTUNE_API_TOKEN")
        .env_remove("GITHUB_OUTPUT")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("{} starts: {error}", program.display()));
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).expect("writing stdin");
    }
    let stdout = read_in_background(child.stdout.take().expect("stdout"));
    let stderr = read_in_background(child.stderr.take().expect("stderr"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting on the command") {
            break status;
        }
        if started.elapsed() > COMMAND_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} ran past {COMMAND_DEADLINE:?}",
                program.display()
            );
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
