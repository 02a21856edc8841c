//! The real `strata` binary as a child process: spawning it with a clean environment, waiting for
//! its listeners, and bounded waits for it to exit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::secs;

/// Kills the child if a test fails before it exits.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Spawns the binary with only PATH and `vars` in its environment, stdin closed.
pub fn strata(vars: &[(&str, &str)], stdout: Stdio, stderr: Stdio) -> Running {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    Running(cmd.spawn().expect("spawn strata"))
}

/// Waits (blocking, bounded by `limit`) for the binary to exit.
pub fn wait_exit(child: &mut Running, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "strata did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A unique scratch directory `strata-{tag}-PID-NANOS` under the temp dir, created.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("strata-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits (bounded, 15 s in all) until each of `addrs` accepts connections; fails the test with
/// the binary's stderr (read from `err_path`) if it exits first.
pub async fn wait_listening(child: &mut Running, addrs: &[SocketAddr], err_path: &Path) {
    let deadline = Instant::now() + secs(15);
    for &addr in addrs {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                child.0.try_wait().unwrap().is_none(),
                "strata exited early; stderr: {}",
                std::fs::read_to_string(err_path).unwrap_or_default()
            );
            assert!(Instant::now() < deadline, "strata never listened on {addr}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Sends SIGTERM to the binary (`kill -TERM`), asserting `kill` succeeded.
pub fn send_sigterm(child: &Running) {
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
}

/// Sends SIGTERM and asserts the binary exits with status 0 within 10 s.
pub async fn sigterm_exits_0(child: &mut Running) {
    send_sigterm(child);
    let deadline = Instant::now() + secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "strata ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

/// The binary's `stdout.log` then `stderr.log` from `dir`, concatenated; `dir` is removed.
pub fn take_logs(dir: &Path) -> String {
    let logs = format!(
        "{}{}",
        std::fs::read_to_string(dir.join("stdout.log")).unwrap(),
        std::fs::read_to_string(dir.join("stderr.log")).unwrap()
    );
    let _ = std::fs::remove_dir_all(dir);
    logs
}
