//! Real processes for the fault tests: `lrtune serve` and `lrtune worker` children whose logs
//! the test reads, signals sent to them, a PostgreSQL server of the test's own (`initdb` and
//! `pg_ctl` from Debian's PostgreSQL, in a temporary folder, on a free port, as the `postgres`
//! user) that a test may stop and restart, and a tmpfs the test fills or removes files from.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// True when this test run must not skip a test whose tools are missing (CI sets `CI`).
pub fn required() -> bool {
    std::env::var_os("CI")
        .is_some_and(|value| !value.is_empty() && value != "0" && value != "false")
}

/// The `lrtune-dev` binary (the developers' tools: `bench-api`), which cargo builds into the
/// same folder as `lrtune` when it tests the workspace (`cargo test` at the root).
pub fn lrtune_dev_binary() -> PathBuf {
    let lrtune = Path::new(env!("CARGO_BIN_EXE_lrtune"));
    let dev = lrtune.with_file_name(format!("lrtune-dev{}", std::env::consts::EXE_SUFFIX));
    assert!(
        dev.is_file(),
        "{} is missing: this test runs `lrtune-dev bench-api`; run the tests from the \
         workspace root (`cargo test`), or build it first (`cargo build -p lrtune-dev`)",
        dev.display()
    );
    dev
}

/// An `lrtune` child process, killed (SIGKILL) when dropped; its standard error (the log) goes
/// to a file the test can read.
pub struct Lrtune {
    child: Child,
    log: PathBuf,
    /// The first line it printed: the API's address, or the worker's name.
    pub first_line: String,
}

impl Lrtune {
    /// Starts `lrtune ARGS` with its log in `log` and waits for its first line.
    pub fn start(args: &[&str], log: &Path) -> Lrtune {
        let log_file = std::fs::File::create(log).expect("the log file can be created");
        let mut child = Command::new(env!("CARGO_BIN_EXE_lrtune"))
            .args(args)
            .env_remove("LRTUNE_API_TOKEN")
            .env_remove("LRTUNE_DB")
            .env("LRTUNE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("the lrtune binary starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut first_line = String::new();
        BufReader::new(stdout)
            .read_line(&mut first_line)
            .expect("the process prints a first line");
        let process = Lrtune {
            child,
            log: log.to_path_buf(),
            first_line: first_line.trim().to_string(),
        };
        assert!(
            !process.first_line.is_empty(),
            "lrtune {args:?} printed nothing; its log:\n{}",
            process.log_text()
        );
        process
    }

    /// `lrtune serve --addr 127.0.0.1:0 --db DB EXTRA...`, and its base URL.
    pub fn serve(db: &str, extra: &[&str], log: &Path) -> (Lrtune, String) {
        let mut args = vec!["serve", "--addr", "127.0.0.1:0", "--db", db];
        args.extend_from_slice(extra);
        let process = Lrtune::start(&args, log);
        let address = process
            .first_line
            .strip_prefix("lrtune listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {:?}", process.first_line))
            .to_string();
        (process, address)
    }

    /// `lrtune worker --name NAME --db DB EXTRA...`.
    pub fn worker(db: &str, name: &str, extra: &[&str], log: &Path) -> Lrtune {
        let mut args = vec!["worker", "--name", name, "--db", db];
        args.extend_from_slice(extra);
        Lrtune::start(&args, log)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("the signal is sent");
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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
    /// A new server, started; `None` (with a note) when PostgreSQL's binaries are not
    /// installed and this run may skip (never under CI).
    pub fn start() -> Option<Postgres> {
        let bin = match Command::new("pg_config").arg("--bindir").output() {
            Ok(output) if output.status.success() => {
                PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
            }
            _ => PathBuf::from("/usr/lib/postgresql/15/bin"),
        };
        if !bin.join("initdb").is_file() || !bin.join("pg_ctl").is_file() {
            assert!(
                !required(),
                "initdb and pg_ctl are needed (Debian's postgresql package): not in {}",
                bin.display()
            );
            eprintln!("SKIPPED: no initdb/pg_ctl in {}", bin.display());
            return None;
        }
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
        Some(postgres)
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
    /// A tmpfs of `size` (`8m`), or `None` with a note where mounting is not allowed and this
    /// run may skip (never under CI).
    pub fn mount(size: &str) -> Option<Tmpfs> {
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
            Ok(output) if output.status.success() => Some(Tmpfs { path, _dir: dir }),
            other => {
                let why = match other {
                    Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_string(),
                    Err(error) => error.to_string(),
                };
                assert!(!required(), "a tmpfs could not be mounted: {why}");
                eprintln!("SKIPPED: a tmpfs could not be mounted (run as root): {why}");
                None
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
