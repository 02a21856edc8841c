//! A real `redis-server` child process on a free local port, for the L2 tests (never a mock).
//!
//! The binaries come from PATH, else from `target/test-deps/redis` where `tests/run.sh` unpacks
//! Debian's packages when it cannot install them. Neither: the test fails and says what to run.
//! Only std::process here (the tests' tokio has no `process` feature); every wait is bounded.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a server (or a sentinel) may take to answer PING after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many free ports to try when another process grabs the one we picked first.
const PORT_ATTEMPTS: usize = 5;

/// Where the Redis binaries are, and the library path they need (set only for the local unpack).
#[derive(Debug, Clone)]
struct Binaries {
    server: PathBuf,
    cli: PathBuf,
    ld_library_path: Option<OsString>,
}

fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(locate_binaries)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn locate_binaries() -> Binaries {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-deps/redis");
    let local_bin = local.join("usr/bin");
    let (server, cli) = match (on_path("redis-server"), on_path("redis-cli")) {
        (Some(server), Some(cli)) => (server, cli),
        _ => {
            let server = local_bin.join("redis-server");
            let cli = local_bin.join("redis-cli");
            assert!(
                server.is_file() && cli.is_file(),
                "redis-server and redis-cli are needed by the L2 tests and are neither on PATH nor \
                 in {}: run `bash tests/run.sh` (it installs or unpacks them), or install Redis",
                local_bin.display()
            );
            (server, cli)
        }
    };
    // Binaries unpacked by tests/run.sh need their shared libraries (jemalloc, lzf) from the same
    // unpack; a system Redis does not.
    let ld_library_path = if server.starts_with(&local) {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(local.join("usr/lib"))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.is_dir()
                            && p.file_name()
                                .is_some_and(|n| n.to_string_lossy().ends_with("-linux-gnu"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH") {
            dirs.extend(std::env::split_paths(&existing));
        }
        Some(std::env::join_paths(dirs).expect("LD_LIBRARY_PATH entries"))
    } else {
        None
    };
    Binaries {
        server,
        cli,
        ld_library_path,
    }
}

fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    if let Some(ld) = &binaries().ld_library_path {
        cmd.env("LD_LIBRARY_PATH", ld);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A unique, not yet existing directory `strata-{kind}-...` under the system temp dir.
pub(super) fn unique_dir(kind: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "strata-{kind}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ))
}

/// The last 20 lines of `dir/log_name` ("" when it cannot be read).
fn log_tail(dir: &Path, log_name: &str) -> String {
    let log = std::fs::read_to_string(dir.join(log_name)).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Kills `child` (if any) and waits until it has exited.
pub(super) fn kill_and_wait(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        // Child::kill is SIGKILL on Unix: no shutdown save, no goodbye to clients.
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Waits (bounded by [`START_TIMEOUT`]) until `ping` succeeds for the freshly spawned `child`, a
/// `what` (e.g. "redis-server") on `port` logging to `dir/log_name` with its stderr in
/// `dir/stderr.log`. Err (process reaped) if it exits or never answers.
pub(super) fn await_pong(
    what: &str,
    port: u16,
    dir: &Path,
    log_name: &str,
    child: Child,
    ping: impl Fn() -> bool,
) -> Result<Child, String> {
    let mut child = Some(child);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ping() {
            return Ok(child.take().expect("the child is still there"));
        }
        let exited = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            let stderr = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            return Err(format!(
                "{what} on port {port} exited with {status}; stderr: {stderr}; log:\n{}",
                log_tail(dir, log_name)
            ));
        }
        if Instant::now() >= deadline {
            kill_and_wait(&mut child);
            return Err(format!(
                "{what} on port {port} did not answer PING within {START_TIMEOUT:?}; log:\n{}",
                log_tail(dir, log_name)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free local port other than Redis' default 6379 (bound, then released).
fn free_port() -> u16 {
    loop {
        let port = super::free_addr().port();
        if port != 6379 {
            return port;
        }
    }
}

/// A `redis-server` process owned by a test: killed and its directory removed on drop.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// An ephemeral server: no RDB snapshots, no AOF.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// A server with extra `--option value` arguments; they replace the defaults they name
    /// (e.g. `&["--appendonly", "yes", "--appendfsync", "always"]` for durability tests).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = unique_dir("redis");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut server = RedisServer {
            port: 0,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        // Between releasing a free port and Redis binding it another process may take it: try a
        // few ports before giving up.
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start after {PORT_ATTEMPTS} attempts: {last_error}");
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server's working directory (RDB/AOF files, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn args(&self) -> Vec<String> {
        let dir = self.dir.to_string_lossy().into_owned();
        let log = self.dir.join("redis.log").to_string_lossy().into_owned();
        let port = self.port.to_string();
        let defaults: [(&str, &str); 7] = [
            ("--save", ""),
            ("--appendonly", "no"),
            ("--bind", "127.0.0.1"),
            ("--port", &port),
            ("--dir", &dir),
            ("--logfile", &log),
            ("--daemonize", "no"),
        ];
        let mut args = Vec::new();
        for (name, value) in defaults {
            if !self.extra.iter().any(|a| a == name) {
                args.push(name.to_string());
                args.push(value.to_string());
            }
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Spawns the server on `self.port` and waits for PONG; Err (process reaped) if it exits or
    /// never answers.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let child = command(&binaries().server)
            .args(self.args())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                File::create(self.dir.join("stderr.log")).map_err(|e| e.to_string())?,
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", binaries().server.display()));
        let child = await_pong(
            "redis-server",
            self.port,
            &self.dir,
            "redis.log",
            child,
            || self.ping(),
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// The `--requirepass` this server was started with, if any.
    fn password(&self) -> Option<&str> {
        let at = self.extra.iter().position(|a| a == "--requirepass")?;
        self.extra.get(at + 1).map(String::as_str)
    }

    /// redis-cli aimed at this server (authenticated when it has a password).
    fn cli_command(&self) -> Command {
        let mut cmd = command(&binaries().cli);
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(password) = self.password() {
            cmd.args(["-a", password, "--no-auth-warning"]);
        }
        cmd
    }

    /// True when `redis-cli PING` answers PONG.
    pub fn ping(&self) -> bool {
        self.cli_command()
            .arg("ping")
            .stderr(Stdio::null())
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "PONG")
            .unwrap_or(false)
    }

    /// Runs `redis-cli -h 127.0.0.1 -p PORT [-a PASSWORD] args...` and returns its stdout, trimmed.
    /// Options such as `-n DB` may lead `args`.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self
            .cli_command()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", binaries().cli.display()));
        assert!(
            out.status.success(),
            "redis-cli {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Every key in database 0 (SCAN, not KEYS), sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .cli(&["--scan"])
            .lines()
            .map(str::to_string)
            .filter(|k| !k.is_empty())
            .collect();
        keys.sort();
        keys
    }

    fn reap(&mut self) {
        kill_and_wait(&mut self.child);
    }

    /// SIGKILLs the server and waits until the process has exited.
    pub fn kill(&mut self) {
        assert!(self.child.is_some(), "redis-server is not running");
        self.reap();
    }

    /// Starts the server again on the same port and directory and waits for PONG (kills it first
    /// if it still runs).
    pub fn restart(&mut self) {
        self.reap();
        // The port was ours a moment ago; a stray connect in TIME_WAIT does not block the bind, but
        // give a slow kernel a few tries anyway.
        let mut last_error = String::new();
        for _ in 0..3 {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
        }
        panic!(
            "redis-server did not restart on port {}: {last_error}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.reap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
