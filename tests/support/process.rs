//! Real processes: the one launcher of `lrtune serve` and `lrtune worker` children (API and
//! worker processes, on SQLite or PostgreSQL) whose logs the test reads and which it signals,
//! a PostgreSQL server of the test's own (`initdb` and `pg_ctl` from Debian's PostgreSQL, in a
//! temporary folder, on a free port, as the `postgres` user) that a test may stop and restart,
//! and a tmpfs the test fills or removes files from.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use super::run::lrtune_binary;

/// How long a process may take to print its first line (its address, or its name).
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A real `lrtune` child process (`serve` or `worker`), killed (SIGKILL) when dropped. Its
/// standard error (the log) goes to a file in a folder of its own, which also holds the
/// database of [`Lrtune::serve_fresh`].
pub struct Lrtune {
    child: Child,
    dir: TempDir,
    /// The first line it printed: the API's address, or the worker's name.
    pub first_line: String,
    /// `http://127.0.0.1:PORT` for `serve`; empty for a worker.
    pub address: String,
}

/// How to start one: `Lrtune::launch(ARGS)`, then options, then `start()`.
pub struct Launch<'a> {
    args: Vec<OsString>,
    prlimit: &'a [&'a str],
    current_dir: Option<&'a Path>,
    /// `--db` a SQLite file in the process's folder.
    fresh_db: bool,
}

impl Launch<'_> {
    /// Under `prlimit` with these options (`--nofile=256`).
    pub fn prlimit<'b>(self, options: &'b [&'b str]) -> Launch<'b>
    where
        Self: 'b,
    {
        Launch {
            prlimit: options,
            ..self
        }
    }

    /// In this working directory (the dashboard tests start from an empty folder).
    pub fn current_dir<'b>(self, dir: &'b Path) -> Launch<'b>
    where
        Self: 'b,
    {
        Launch {
            current_dir: Some(dir),
            ..self
        }
    }

    /// Starts it and waits for its first line.
    pub fn start(self) -> Lrtune {
        let dir = tempfile::tempdir().expect("a folder for the process");
        let log = std::fs::File::create(dir.path().join("lrtune.log")).expect("the log file");
        let mut command = if self.prlimit.is_empty() {
            Command::new(lrtune_binary())
        } else {
            let mut command = Command::new("prlimit");
            command.args(self.prlimit).arg("--").arg(lrtune_binary());
            command
        };
        command.args(&self.args);
        if self.fresh_db {
            command.arg("--db").arg(dir.path().join("lrtune.db"));
        }
        command
            .env_remove("LRTUNE_API_TOKEN")
            .env_remove("LRTUNE_DB")
            .env_remove("LRTUNE_STATIC_DIR")
            .env("LRTUNE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(current_dir) = self.current_dir {
            command.current_dir(current_dir);
        }
        let mut child = command.spawn().expect("the lrtune binary starts");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok).unwrap_or_default();
            let _ = sender.send(first);
            // Keep reading, so that a later line never blocks the process on a full pipe.
            lines.for_each(drop);
        });
        let first_line = receiver.recv_timeout(START_TIMEOUT).unwrap_or_default();
        let mut process = Lrtune {
            child,
            dir,
            first_line: first_line.trim().to_string(),
            address: String::new(),
        };
        if process.first_line.is_empty() {
            let _ = process.child.kill();
            let _ = process.child.wait();
            panic!(
                "lrtune {:?} printed nothing in {START_TIMEOUT:?}; its log:\n{}",
                self.args,
                process.log_text()
            );
        }
        if let Some(address) = process.first_line.strip_prefix("lrtune listening on ") {
            process.address = address.to_string();
        }
        process
    }
}

impl Lrtune {
    /// `lrtune ARGS`, to be given options before `start()`.
    pub fn launch<S: AsRef<OsStr>>(args: &[S]) -> Launch<'static> {
        Launch {
            args: args.iter().map(|arg| arg.as_ref().to_owned()).collect(),
            prlimit: &[],
            current_dir: None,
            fresh_db: false,
        }
    }

    /// `lrtune ARGS`, started.
    pub fn start<S: AsRef<OsStr>>(args: &[S]) -> Lrtune {
        Lrtune::launch(args).start()
    }

    /// `lrtune serve --addr 127.0.0.1:0 --db DB EXTRA...`: `address` is its base URL.
    pub fn serve(db: impl AsRef<OsStr>, extra: &[&str]) -> Lrtune {
        Lrtune::serve_launch(db, extra).start()
    }

    /// The same, to be given options before `start()`.
    pub fn serve_launch(db: impl AsRef<OsStr>, extra: &[&str]) -> Launch<'static> {
        let mut launch = Lrtune::launch(&["serve", "--addr", "127.0.0.1:0", "--db"]);
        launch.args.push(db.as_ref().to_owned());
        launch.args.extend(extra.iter().map(OsString::from));
        launch
    }

    /// `lrtune serve` on a SQLite file of its own (`db_path`).
    pub fn serve_fresh(extra: &[&str]) -> Lrtune {
        Lrtune::serve_fresh_launch(extra).start()
    }

    /// The same, to be given options before `start()`.
    pub fn serve_fresh_launch(extra: &[&str]) -> Launch<'static> {
        let mut launch = Lrtune::launch(&["serve", "--addr", "127.0.0.1:0"]);
        launch.args.extend(extra.iter().map(OsString::from));
        launch.fresh_db = true;
        launch
    }

    /// `lrtune worker --name NAME --db DB EXTRA...`.
    pub fn worker(db: &str, name: &str, extra: &[&str]) -> Lrtune {
        let mut args = vec!["worker", "--name", name, "--db", db];
        args.extend_from_slice(extra);
        Lrtune::start(&args)
    }

    /// The SQLite file of a `serve_fresh` server.
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("lrtune.db")
    }

    /// `127.0.0.1:PORT`, for a raw TCP connection.
    pub fn host_port(&self) -> &str {
        self.address
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("not a server: {:?}", self.first_line))
    }

    pub fn port(&self) -> u16 {
        self.host_port()
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("a port in the address")
    }

    /// The base URL followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("the signal is sent");
    }

    /// SIGKILL, and the exit reaped.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("the child is reaped");
    }

    /// Its exit status, waiting at most `within` for it.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("the child can be waited on") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_alive(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("the child can be waited on")
            .is_none()
    }

    /// What it wrote to its standard error so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lrtune.log")).unwrap_or_default()
    }

    /// A line of the process's /proc status (`VmHWM`, `VmRSS`), in kB.
    pub fn status_kb(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the process is alive");
        status
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {status}"))
    }
}

impl Drop for Lrtune {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on the loopback interface (free when this returns).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// A PostgreSQL server of the test's own: `initdb` in a temporary folder, `pg_ctl` to start,
/// stop and restart it on a free port. Stopped (immediately) when dropped.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// A new server, started. Fails the test when PostgreSQL's binaries are not installed.
    pub fn start() -> Postgres {
        let bin = match Command::new("pg_config").arg("--bindir").output() {
            Ok(output) if output.status.success() => {
                PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
            }
            _ => PathBuf::from("/usr/lib/postgresql/15/bin"),
        };
        assert!(
            bin.join("initdb").is_file() && bin.join("pg_ctl").is_file(),
            "initdb and pg_ctl are needed (Debian's postgresql package; .ci/run installs it), \
             not in {}; `cargo test -- --skip on_postgres` leaves the PostgreSQL tests out",
            bin.display()
        );
        let dir = tempfile::tempdir().expect("a temporary folder");
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        let postgres = Postgres {
            bin,
            data,
            log,
            port: free_port(),
            _dir: dir,
        };
        postgres.own_folder();
        postgres.run(
            "initdb",
            &[
                "-D",
                path_str(&postgres.data),
                "--auth=trust",
                "--username=postgres",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ],
        );
        postgres.pg_ctl(&["start", "-w", "-t", "60"]);
        postgres
    }

    /// The folder belongs to `postgres` when this runs as root (PostgreSQL refuses to run as
    /// root).
    fn own_folder(&self) {
        if !is_root() {
            return;
        }
        let parent = self.data.parent().expect("the data folder has a parent");
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres", path_str(parent)])
            .status()
            .expect("chown runs");
        assert!(status.success(), "chown postgres {}", parent.display());
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let mut command = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        let output = command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| panic!("{tool} runs: {error}"));
        assert!(
            output.status.success(),
            "{tool} {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn pg_ctl(&self, action: &[&str]) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories= -c fsync=off \
             -c max_connections=100",
            self.port
        );
        let mut args = vec!["-D", path_str(&self.data), "-l", path_str(&self.log)];
        args.extend_from_slice(&["-o", &options]);
        args.extend_from_slice(action);
        self.run("pg_ctl", &args);
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m fast`: every connection is cut, the server is back at once.
    pub fn restart_fast(&self) {
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"]);
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]);
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "60"]);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pid_file = self.data.join("postmaster.pid");
        if pid_file.exists() {
            let args = ["-D", path_str(&self.data), "stop", "-m", "immediate", "-w"];
            let program = self.bin.join("pg_ctl");
            let _ = if is_root() {
                Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .arg(&program)
                    .args(args)
                    .output()
            } else {
                Command::new(&program).args(args).output()
            };
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// A tmpfs of its own, mounted on a temporary folder (as root), unmounted when dropped. A
/// small one fills up as a real disk does.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// A tmpfs of `size` (`8m`). Fails the test where mounting is not allowed (as a user
    /// other than root).
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).expect("the mount point");
        let output = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0777"),
                "tmpfs",
            ])
            .arg(&path)
            .output();
        match output {
            Ok(output) if output.status.success() => Tmpfs { path, _dir: dir },
            other => {
                let why = match other {
                    Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_string(),
                    Err(error) => error.to_string(),
                };
                panic!(
                    "a tmpfs could not be mounted (the fault tests run as root, as CI does): \
                     {why}; `cargo test -- --skip as_root` leaves them out"
                );
            }
        }
    }

    /// Fills the file system with `name` until it refuses more; returns the bytes written.
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path.join(name)).expect("the filler file");
        let chunk = vec![0u8; 16 * 1024];
        let mut written = 0u64;
        // Then byte by byte, so that not even a page is left.
        for size in [chunk.len(), 512, 1] {
            while file.write_all(&chunk[..size]).is_ok() {
                written += size as u64;
            }
        }
        let _ = file.sync_all();
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
