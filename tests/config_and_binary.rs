//! Configuration: Config::from_vars parsing, and the real binary's exit codes, /health and SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use strata::config::Config;
use support::binary::{scratch_dir, send_sigterm, strata, take_logs, wait_exit, wait_listening};
use support::{free_addr, get, refused_url, secs, wait_until, within, MockOrigin, Reply};

/// Runs the binary with `vars` (plus free listen/admin ports), expects exit status 2 and returns
/// its stderr.
fn expect_exit_2(vars: &[(&str, &str)]) -> String {
    let listen = free_addr().to_string();
    let admin = free_addr().to_string();
    let mut all: Vec<(&str, &str)> = vec![("LISTEN_ADDR", &listen), ("ADMIN_ADDR", &admin)];
    all.extend_from_slice(vars);
    let mut child = strata(&all, Stdio::null(), Stdio::piped());
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(
        status.code(),
        Some(2),
        "exit status {status:?}, stderr: {stderr}"
    );
    stderr
}

#[test]
fn non_numeric_cache_size_exits_2_naming_it() {
    let origin = refused_url();
    let stderr = expect_exit_2(&[("ORIGIN_URL", &origin), ("CACHE_SIZE_MB", "abc")]);
    assert!(stderr.contains("CACHE_SIZE_MB"), "stderr: {stderr}");
}

#[test]
fn invalid_log_filter_exits_2_naming_it() {
    let origin = refused_url();
    let stderr = expect_exit_2(&[("ORIGIN_URL", &origin), ("RUST_LOG", "strata=verbose")]);
    assert!(stderr.contains("RUST_LOG"), "stderr: {stderr}");
}

#[test]
fn non_http_origin_exits_2_naming_it() {
    let stderr = expect_exit_2(&[("ORIGIN_URL", "ftp://x")]);
    assert!(stderr.contains("ORIGIN_URL"), "stderr: {stderr}");
}

#[test]
fn missing_origin_exits_2_naming_it() {
    let stderr = expect_exit_2(&[]);
    assert!(stderr.contains("ORIGIN_URL"), "stderr: {stderr}");
}

#[test]
fn bad_duration_exits_2_naming_it() {
    let origin = refused_url();
    let stderr = expect_exit_2(&[("ORIGIN_URL", &origin), ("ORIGIN_TIMEOUT", "soon")]);
    assert!(stderr.contains("ORIGIN_TIMEOUT"), "stderr: {stderr}");
}

/// One HTTP/1.1 GET over a plain socket; None while nothing listens yet.
fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

#[test]
fn binary_serves_health_and_exits_0_on_sigterm() {
    serves_health_and_exits_0_on_sigterm(&[]);
}

/// WORKER_THREADS=1 runs everything on the main thread (the current-thread scheduler: no worker
/// threads); 3 starts three workers. Either way the binary serves and stops.
#[test]
fn worker_threads_set_the_threads_that_serve() {
    let one = serves_health_and_exits_0_on_sigterm(&[("WORKER_THREADS", "1")]);
    assert_eq!(one, 0, "worker threads with WORKER_THREADS=1");
    let three = serves_health_and_exits_0_on_sigterm(&[("WORKER_THREADS", "3")]);
    assert_eq!(three, 3, "worker threads with WORKER_THREADS=3");
}

/// The runtime's worker threads in process `pid` (Linux's /proc; tokio names them).
fn worker_thread_count(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.trim() == "tokio-rt-worker")
        })
        .count()
}

/// Starts the binary with `extra` settings, expects /health 200 and a 502 from the traffic
/// listener (the origin refuses), then exit status 0 after SIGTERM. Returns how many runtime
/// worker threads the process had while serving.
fn serves_health_and_exits_0_on_sigterm(extra: &[(&str, &str)]) -> usize {
    let listen = free_addr();
    let admin = free_addr();
    let origin = refused_url();
    let (listen_s, admin_s) = (listen.to_string(), admin.to_string());
    let mut vars = vec![
        ("ORIGIN_URL", origin.as_str()),
        ("LISTEN_ADDR", &listen_s),
        ("ADMIN_ADDR", &admin_s),
        ("SHUTDOWN_TIMEOUT", "5s"),
    ];
    vars.extend_from_slice(extra);
    let mut child = strata(&vars, Stdio::null(), Stdio::null());

    let deadline = Instant::now() + Duration::from_secs(15);
    let (status, body) = loop {
        if let Some(answer) = try_get(admin, "/health") {
            break answer;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "strata exited before serving /health"
        );
        assert!(Instant::now() < deadline, "/health never answered");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 200);
    // The body may be chunked on the wire; the JSON object must be there verbatim.
    assert!(body.contains(r#"{"status":"ok"}"#), "body: {body:?}");

    // The traffic listener is up too (the origin is down, so a 502).
    let (status, _) = try_get(listen, "/anything").expect("traffic listener answers");
    assert_eq!(status, 502);
    let threads = worker_thread_count(child.0.id());

    send_sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status:?}"
    );
    threads
}

#[test]
fn durations_parse_in_operator_units() {
    let config = Config::from_vars([
        ("ORIGIN_URL", "http://127.0.0.1:1"),
        ("ORIGIN_TIMEOUT", "250ms"),
        ("CACHE_GRACE", "30s"),
        ("CACHE_STALE_IF_ERROR", "5m"),
        ("SHUTDOWN_TIMEOUT", "1h"),
        ("CACHE_LOCK_TIMEOUT", "1s"),
        ("CACHE_MAX_AGE", "2m"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.origin_timeout, Duration::from_millis(250));
    assert_eq!(config.grace, Duration::from_secs(30));
    assert_eq!(config.stale_if_error, Duration::from_secs(300));
    assert_eq!(config.shutdown_timeout, Duration::from_secs(3600));
    assert_eq!(config.lock_timeout, Duration::from_secs(1));
    assert_eq!(config.fallback_max_age, Some(Duration::from_secs(120)));
}

#[test]
fn from_vars_errors_name_the_variable() {
    let cases: [(&[(&str, &str)], &str); 15] = [
        (
            &[("ORIGIN_URL", "http://o"), ("CACHE_SIZE_MB", "abc")],
            "CACHE_SIZE_MB",
        ),
        (&[("ORIGIN_URL", "ftp://x")], "ORIGIN_URL"),
        (&[], "ORIGIN_URL"),
        (
            &[("ORIGIN_URL", "http://o"), ("ORIGIN_TIMEOUT", "soon")],
            "ORIGIN_TIMEOUT",
        ),
        (
            &[("ORIGIN_URL", "http://o"), ("CACHE_GRACE", "forever")],
            "CACHE_GRACE",
        ),
        (
            &[("ORIGIN_URL", "http://o"), ("TUNNEL_IDLE_TIMEOUT", "0s")],
            "TUNNEL_IDLE_TIMEOUT",
        ),
        (
            &[("ORIGIN_URL", "http://o"), ("ORIGIN_IDLE_TIMEOUT", "0s")],
            "ORIGIN_IDLE_TIMEOUT",
        ),
        (
            &[("ORIGIN_URL", "http://o"), ("ORIGIN_MAX_IDLE", "many")],
            "ORIGIN_MAX_IDLE",
        ),
        (
            &[("ORIGIN_URL", "http://o"), ("ORIGIN_MAX_IDLE", "100000")],
            "ORIGIN_MAX_IDLE",
        ),
        (
            &[("ORIGIN_URL", "http://o"), ("ORIGIN_MAX_CONNS", "-1")],
            "ORIGIN_MAX_CONNS",
        ),
        (
            &[("ORIGIN_URL", "http://o"), ("ORIGIN_MAX_CONNS", "2000000")],
            "ORIGIN_MAX_CONNS",
        ),
        (
            &[("ORIGIN_URL", "http://o"), ("CLIENT_HEADER_TIMEOUT", "0s")],
            "CLIENT_HEADER_TIMEOUT",
        ),
        (
            &[("ORIGIN_URL", "http://o"), ("WORKER_THREADS", "many")],
            "WORKER_THREADS",
        ),
        (
            &[("ORIGIN_URL", "http://o"), ("WORKER_THREADS", "5000")],
            "WORKER_THREADS",
        ),
        (
            &[
                ("ORIGIN_URL", "http://o"),
                ("NORMALIZE_ACCEPT_ENCODING", "sometimes"),
            ],
            "NORMALIZE_ACCEPT_ENCODING",
        ),
    ];
    for (vars, name) in cases {
        match Config::from_vars(vars.iter().copied()) {
            Ok(_) => panic!("{vars:?} accepted"),
            Err(e) => assert!(e.to_string().contains(name), "{vars:?}: {e}"),
        }
    }
}

#[test]
fn from_vars_defaults_and_sizes() {
    let config = Config::from_vars([("ORIGIN_URL", "https://example.com/prefix")])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.cache_size_bytes, 256 * 1024 * 1024);
    assert_eq!(config.max_object_bytes, 8 * 1024 * 1024);
    assert_eq!(config.lock_timeout, Duration::from_secs(5));
    assert!(config.normalize_accept_encoding);
    assert_eq!(config.origin_timeout, Duration::from_secs(30));
    assert_eq!(config.grace, Duration::ZERO);
    assert_eq!(config.stale_if_error, Duration::ZERO);
    assert_eq!(config.fallback_max_age, None);
    assert_eq!(config.worker_threads, None);
    assert_eq!(config.client_header_timeout, Duration::from_secs(30));

    let config = Config::from_vars([
        ("ORIGIN_URL", "http://o"),
        ("CACHE_SIZE_MB", "0"),
        ("WORKER_THREADS", "4"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.cache_size_bytes, 0);
    assert_eq!(config.worker_threads, Some(4));
}

#[test]
fn bad_redis_url_exits_2_naming_it() {
    let origin = refused_url();
    let stderr = expect_exit_2(&[("ORIGIN_URL", &origin), ("REDIS_URL", "ftp://x")]);
    assert!(stderr.contains("REDIS_URL"), "stderr: {stderr}");
}

#[test]
fn from_vars_rejects_bad_redis_settings_naming_them() {
    let cases: [(&str, &str); 5] = [
        ("REDIS_URL", "ftp://x"),
        ("REDIS_URL", "not a url"),
        ("REDIS_DB", "abc"),
        ("REDIS_TIMEOUT", "soon"),
        ("REDIS_POOL_SIZE", "many"),
    ];
    for (name, value) in cases {
        let vars = [
            ("ORIGIN_URL", "http://o"),
            ("REDIS_ENABLED", "true"),
            (name, value),
        ];
        match Config::from_vars(vars) {
            Ok(_) => panic!("{name}={value:?} accepted"),
            Err(e) => assert!(e.to_string().contains(name), "{name}={value:?}: {e}"),
        }
    }
}

/// A stdout nobody reads (a stalled log collector: the pipe fills at 64 KiB) does not stop Strata:
/// a thousand requests that each log a warning (the origin refuses connections) are all answered,
/// and /health still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_stdout_does_not_stop_strata() {
    let dir = scratch_dir("stalled-log");
    let err_path = dir.join("stderr.log");
    let (listen, admin) = (free_addr(), free_addr());
    let (origin, listen_s, admin_s) = (refused_url(), listen.to_string(), admin.to_string());
    // The read end stays in `child` and is never read.
    let mut child = strata(
        &[
            ("ORIGIN_URL", &origin),
            ("LISTEN_ADDR", &listen_s),
            ("ADMIN_ADDR", &admin_s),
        ],
        Stdio::piped(),
        Stdio::from(std::fs::File::create(&err_path).unwrap()),
    );
    wait_listening(&mut child, &[listen, admin], &err_path).await;
    let url = format!("http://{listen}/refused");
    for n in 0..1000 {
        let r = within(
            "a request while stdout is blocked",
            secs(10),
            get(&url, &[]),
        )
        .await;
        assert_eq!(r.status, 502, "request {n}");
    }
    let health = get(&format!("http://{admin}/health"), &[]).await;
    assert_eq!(health.status, 200);
    send_sigterm(&child);
    // Exits although its last lines cannot be written (it waits for them 2 s at most).
    let status = wait_exit(&mut child, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM while start-up still waits for Redis (here one that accepts connections and never
/// answers, so the wait lasts its 2 s) stops Strata with status 0: the handlers are installed
/// before the listeners are bound. It used to die of the signal.
#[test]
fn sigterm_while_starting_up_exits_0() {
    let silent_redis = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let redis_url = format!("redis://{}", silent_redis.local_addr().unwrap());
    let dir = scratch_dir("starting");
    let listen = free_addr();
    let (origin, listen_s, admin_s) = (refused_url(), listen.to_string(), free_addr().to_string());
    let mut child = strata(
        &[
            ("ORIGIN_URL", &origin),
            ("LISTEN_ADDR", &listen_s),
            ("ADMIN_ADDR", &admin_s),
            ("REDIS_URL", &redis_url),
        ],
        Stdio::from(std::fs::File::create(dir.join("stdout.log")).unwrap()),
        Stdio::from(std::fs::File::create(dir.join("stderr.log")).unwrap()),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
        assert!(child.0.try_wait().unwrap().is_none(), "strata exited early");
        assert!(Instant::now() < deadline, "strata never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    send_sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let logs = take_logs(&dir);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status:?}; logs: {logs}"
    );
    assert!(
        logs.contains("stopped while starting up"),
        "the signal came after start-up: {logs}"
    );
}

/// A second SIGTERM while Strata drains (SHUTDOWN_TIMEOUT 60 s, a request the origin answers in
/// 30 s) closes the remaining connections at once and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain() {
    let origin = MockOrigin::start(|_| {
        Reply::ok("late")
            .cc("no-store")
            .delay(Duration::from_secs(30))
    })
    .await;
    let dir = scratch_dir("drain");
    let (out_path, err_path) = (dir.join("stdout.log"), dir.join("stderr.log"));
    let listen = free_addr();
    let (origin_s, listen_s, admin_s) = (origin.url(), listen.to_string(), free_addr().to_string());
    let mut child = strata(
        &[
            ("ORIGIN_URL", &origin_s),
            ("LISTEN_ADDR", &listen_s),
            ("ADMIN_ADDR", &admin_s),
            ("SHUTDOWN_TIMEOUT", "60s"),
        ],
        Stdio::from(std::fs::File::create(&out_path).unwrap()),
        Stdio::from(std::fs::File::create(&err_path).unwrap()),
    );
    wait_listening(&mut child, &[listen], &err_path).await;
    let url = format!("http://{listen}/slow");
    let in_flight = tokio::spawn(async move { get(&url, &[]).await });
    origin.wait_hits("/slow", 1).await;

    send_sigterm(&child);
    let logs = || {
        std::fs::read_to_string(&out_path).unwrap_or_default()
            + &std::fs::read_to_string(&err_path).unwrap_or_default()
    };
    wait_until("strata draining", || logs().contains("shutting down")).await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "exited before the drain"
    );
    // Well before the origin answers (30 s) or SHUTDOWN_TIMEOUT (60 s).
    send_sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status:?}; logs: {}",
        logs()
    );
    in_flight.abort();
    let _ = take_logs(&dir);
}
