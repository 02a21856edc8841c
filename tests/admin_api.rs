//! The admin API: bearer-token auth and the loopback rule, /ready, /stats, /metrics, and
//! LOG_REDACT_KEYS in the real binary's logs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use strata::config::Config;
use support::admin::*;
use support::binary::*;
use support::fleet::sget;
use support::redis::RedisServer;
use support::*;

const TOKEN: &str = "admin-s3cret-token";

/// A proxy in front of `origin` with ADMIN_TOKEN set, plus `extra` settings.
async fn start(origin: &str, extra: &[(&str, &str)]) -> TestProxy {
    start_with_token(origin, TOKEN, extra).await
}

#[track_caller]
fn assert_json_content_type(resp: &Resp) {
    let ct = resp.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "Content-Type {ct:?}, headers {:?}",
        resp.headers
    );
}

#[track_caller]
fn expect(resp: &Resp, x_cache: &str) {
    assert_eq!(
        (resp.status.as_u16(), resp.x_cache()),
        (200, x_cache),
        "headers: {:?}",
        resp.headers
    );
}

// ---------------------------------------------------------------------------------------------
// Authentication

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_but_health_needs_the_token() {
    let origin =
        MockOrigin::start(|r| Reply::ok(format!("body of {}", r.path)).cc("max-age=300")).await;
    let proxy = start(&origin.url(), &[]).await;
    expect(&sget(&proxy, "/guarded").await, "MISS");

    let routes: [(&str, &str, Option<&str>); 7] = [
        ("GET", "/ready", None),
        ("GET", "/stats", None),
        ("GET", "/metrics", None),
        ("POST", "/purge", Some(r#"{"key":"shared.test/guarded"}"#)),
        ("GET", "/cache?key=shared.test/guarded", None),
        ("DELETE", "/cache?key=shared.test/guarded", None),
        (
            "POST",
            "/warm",
            Some(r#"{"urls":["/warmed-without-auth"],"host":"shared.test"}"#),
        ),
    ];
    let wrong = format!("Bearer {TOKEN}x");
    let bad_auths: [(&str, Option<&str>); 4] = [
        ("no Authorization", None),
        ("a wrong token", Some(wrong.as_str())),
        ("the token without Bearer", Some(TOKEN)),
        ("another scheme", Some("Basic YWRtaW46YWRtaW4=")),
    ];
    for (method, path, body) in routes {
        for (what, auth) in bad_auths {
            let resp = admin_request(&proxy, method, path, body, auth).await;
            assert_eq!(
                resp.status,
                401,
                "{method} {path} with {what}: {:?}",
                resp.text()
            );
            let v = json_of(&resp);
            assert!(
                v["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{method} {path} with {what}: 401 body {v}"
            );
        }
    }

    // Nothing an unauthorised request asked for happened.
    expect(&sget(&proxy, "/guarded").await, "HIT-L1");
    assert_eq!(origin.hits("/guarded"), 1);
    assert_eq!(origin.hits("/warmed-without-auth"), 0);

    // /health needs no token, with or without one.
    for auth in [None, Some("Bearer wrong")] {
        let resp = admin_request(&proxy, "GET", "/health", None, auth).await;
        assert_eq!(resp.status, 200, "/health with {auth:?}");
        assert_eq!(json_of(&resp)["status"], "ok");
    }

    // The right token opens the read-only routes.
    for path in ["/ready", "/stats", "/metrics"] {
        let resp = admin_get(&proxy, TOKEN, path).await;
        assert_eq!(
            resp.status,
            200,
            "GET {path} with the token: {:?}",
            resp.text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_admin_without_a_token_is_open() {
    let origin = MockOrigin::fixed("open", "max-age=60").await;
    // TestProxy binds the admin listener on 127.0.0.1: no ADMIN_TOKEN is needed there.
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    for path in ["/health", "/ready", "/stats", "/metrics"] {
        let resp = get(&proxy.admin_url(path), &[]).await;
        assert_eq!(resp.status, 200, "GET {path}: {:?}", resp.text());
    }
}

#[test]
fn config_refuses_a_public_admin_address_without_a_token() {
    for addr in ["0.0.0.0:0", "0.0.0.0:9090", "[::]:9090", "192.0.2.10:9090"] {
        match Config::from_vars([("ORIGIN_URL", "http://127.0.0.1:1"), ("ADMIN_ADDR", addr)]) {
            Ok(_) => panic!("ADMIN_ADDR={addr} without ADMIN_TOKEN accepted"),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("ADMIN_TOKEN") && msg.contains("ADMIN_ADDR"),
                    "ADMIN_ADDR={addr}: the error must name ADMIN_TOKEN and ADMIN_ADDR: {msg}"
                );
            }
        }
    }
    // With a token a public address is fine; a loopback address needs none.
    let accepted: [&[(&str, &str)]; 4] = [
        &[("ADMIN_ADDR", "0.0.0.0:0"), ("ADMIN_TOKEN", TOKEN)],
        &[("ADMIN_ADDR", "127.0.0.1:0")],
        &[("ADMIN_ADDR", "[::1]:9090")],
        &[],
    ];
    for vars in accepted {
        let mut all = vec![("ORIGIN_URL", "http://127.0.0.1:1")];
        all.extend_from_slice(vars);
        if let Err(e) = Config::from_vars(all) {
            panic!("{vars:?} rejected: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary

#[test]
fn binary_exits_2_for_a_public_admin_address_without_a_token() {
    let listen = free_addr().to_string();
    let admin = format!("0.0.0.0:{}", free_addr().port());
    let origin = refused_url();
    let mut child = strata(
        &[
            ("ORIGIN_URL", &origin),
            ("LISTEN_ADDR", &listen),
            ("ADMIN_ADDR", &admin),
        ],
        Stdio::null(),
        Stdio::piped(),
    );
    let status = wait_exit(&mut child, secs(10));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(
        status.code(),
        Some(2),
        "exit status {status:?}, stderr: {stderr}"
    );
    assert!(
        stderr.contains("ADMIN_TOKEN") && stderr.contains("ADMIN_ADDR"),
        "stderr must name ADMIN_TOKEN and ADMIN_ADDR: {stderr}"
    );
}

/// Runs the binary with LOG_REDACT_KEYS=`redact` in front of `origin`, requests `path` twice
/// (MISS then HIT), stops it with SIGTERM and returns stdout + stderr.
async fn logs_of_a_run(origin: &MockOrigin, redact: &str, format: &str, path: &str) -> String {
    let listen = free_addr();
    let admin_addr = free_addr();
    let dir = scratch_dir(&format!("admin-{redact}-{format}"));
    let out_path = dir.join("stdout.log");
    let err_path = dir.join("stderr.log");
    let (listen_s, admin_s, origin_s) = (listen.to_string(), admin_addr.to_string(), origin.url());
    let mut child = strata(
        &[
            ("ORIGIN_URL", &origin_s),
            ("LISTEN_ADDR", &listen_s),
            ("ADMIN_ADDR", &admin_s),
            ("SHUTDOWN_TIMEOUT", "5s"),
            // Strata's debug lines too: no log line may show the path.
            ("RUST_LOG", "strata=debug,info"),
            ("LOG_FORMAT", format),
            ("LOG_REDACT_KEYS", redact),
        ],
        Stdio::from(std::fs::File::create(&out_path).unwrap()),
        Stdio::from(std::fs::File::create(&err_path).unwrap()),
    );

    // Wait (bounded) for both listeners.
    wait_listening(&mut child, &[admin_addr, listen], &err_path).await;
    let url = format!("http://{listen}{path}");
    let r = get(&url, &[]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    let r = get(&url, &[]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "HIT-L1"));

    sigterm_exits_0(&mut child).await;
    take_logs(&dir)
}

/// True when `text` contains `h:` followed by exactly 12 lowercase hex digits.
fn has_key_hash(text: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices("h:").any(|(at, _)| {
        let hex = &bytes[at + 2..];
        hex.len() >= 12
            && hex[..12]
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            && !hex.get(12).is_some_and(|b| b.is_ascii_hexdigit())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_redact_keys_hides_paths_in_the_binary_logs() {
    const SECRET: &str = "redact-me-7f3a9c";
    let origin = MockOrigin::fixed("private", "max-age=60").await;
    let path = format!("/{SECRET}/profile");

    for format in ["text", "json"] {
        let logs = logs_of_a_run(&origin, "true", format, &path).await;
        assert!(
            !logs.contains(SECRET),
            "LOG_REDACT_KEYS=true, LOG_FORMAT={format}, yet the path is in the logs:\n{logs}"
        );
        assert!(
            has_key_hash(&logs),
            "LOG_REDACT_KEYS=true, LOG_FORMAT={format}: no `h:<12 hex>` in the logs:\n{logs}"
        );
    }

    let logs = logs_of_a_run(&origin, "false", "text", &path).await;
    assert!(
        logs.contains(SECRET),
        "LOG_REDACT_KEYS=false: the access log must show the path:\n{logs}"
    );
    // One access line per answer, whether it waited for the origin or came straight from L1.
    for x_cache in ["MISS", "HIT-L1"] {
        let lines = logs
            .lines()
            .filter(|l| {
                l.contains("strata::access") && l.contains(&format!("x_cache=\"{x_cache}\""))
            })
            .count();
        assert_eq!(lines, 1, "one access line with X-Cache {x_cache}:\n{logs}");
    }
    assert_eq!(origin.hits(&path), 3, "one MISS per run");
}

// ---------------------------------------------------------------------------------------------
// /ready

/// GET /ready: (HTTP status, "status", "redis").
async fn ready(proxy: &TestProxy) -> (u16, String, String) {
    let resp = admin_get(proxy, TOKEN, "/ready").await;
    assert_json_content_type(&resp);
    let v = json_of(&resp);
    (
        resp.status.as_u16(),
        v["status"].as_str().unwrap_or("<missing>").to_string(),
        v["redis"].as_str().unwrap_or("<missing>").to_string(),
    )
}

/// Polls /ready until it answers `want` (bounded by `limit`).
async fn wait_ready(proxy: &TestProxy, want: (u16, &str, &str), limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let got = ready(proxy).await;
        if (got.0, got.1.as_str(), got.2.as_str()) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/ready never answered {want:?} within {limit:?}; last {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_redis() {
    let mut redis = RedisServer::start();
    let origin = MockOrigin::fixed("r", "max-age=60").await;
    let url = redis.url();
    let proxy = start(
        &origin.url(),
        &[("REDIS_URL", &url), ("REDIS_TIMEOUT", "2s")],
    )
    .await;
    assert_eq!(ready(&proxy).await, (200, "ready".into(), "up".into()));

    redis.kill();
    wait_ready(&proxy, (200, "degraded", "down"), secs(10)).await;
    // Traffic is still served while degraded.
    expect(&sget(&proxy, "/while-degraded").await, "MISS");

    redis.restart();
    wait_ready(&proxy, (200, "ready", "up"), secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_without_redis_is_ready_and_disabled() {
    let origin = MockOrigin::fixed("r", "max-age=60").await;
    let proxy = start(&origin.url(), &[]).await;
    assert_eq!(
        ready(&proxy).await,
        (200, "ready".into(), "disabled".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_with_unreachable_redis_at_start_is_degraded() {
    let origin = MockOrigin::fixed("r", "max-age=60").await;
    let refused = format!("redis://{}", free_addr());
    let proxy = start(&origin.url(), &[("REDIS_URL", &refused)]).await;
    wait_ready(&proxy, (200, "degraded", "down"), secs(10)).await;
}

// ---------------------------------------------------------------------------------------------
// /stats

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_reports_every_counter() {
    let origin = MockOrigin::fixed("stats body", "max-age=60").await;
    let proxy = start(&origin.url(), &[]).await;
    expect(&sget(&proxy, "/counted").await, "MISS");
    expect(&sget(&proxy, "/counted").await, "HIT-L1");

    let resp = admin_get(&proxy, TOKEN, "/stats").await;
    assert_eq!(resp.status, 200);
    assert_json_content_type(&resp);
    let v = json_of(&resp);
    assert!(v.is_object(), "/stats: {v}");
    let int = |name: &str| -> u64 {
        v[name]
            .as_u64()
            .unwrap_or_else(|| panic!("/stats field {name:?} missing or not a count: {v}"))
    };
    for name in [
        "hits",
        "misses",
        "l1_hits",
        "l2_hits",
        "stale",
        "l1_bytes",
        "l1_entries",
        "origin_requests",
        "coalesced",
        "coalesce_waiting",
        "fills_in_flight",
        "purges",
        "l2_failovers_followed",
        "purges_unpublished",
        "l2_purges_unfinished",
        "l2_writes_overtaken",
        "origin_in_flight",
        "origin_waiting",
        "origin_busy",
    ] {
        int(name);
    }
    assert!(int("hits") >= 1, "{v}");
    assert!(int("l1_hits") >= 1, "{v}");
    assert!(int("misses") >= 1, "{v}");
    assert_eq!(int("l2_hits"), 0, "no Redis: {v}");
    assert!(int("l1_entries") >= 1, "{v}");
    assert!(int("l1_bytes") >= "stats body".len() as u64, "{v}");
    assert!(int("origin_requests") >= 1, "{v}");
    assert_eq!(int("purges"), 0, "{v}");
    let hit_rate = v["hit_rate"]
        .as_f64()
        .unwrap_or_else(|| panic!("hit_rate missing or not a number: {v}"));
    assert!(
        hit_rate > 0.0 && hit_rate < 1.0,
        "one hit and one miss: hit_rate {hit_rate}"
    );

    // The JSON agrees with the in-process snapshot.
    let s = proxy.stats();
    assert_eq!(int("misses"), s.misses, "{v} vs {s:?}");
    assert_eq!(int("l1_hits"), s.l1_hits, "{v} vs {s:?}");
    assert_eq!(int("l1_entries"), s.l1_entries, "{v} vs {s:?}");
}

// ---------------------------------------------------------------------------------------------
// /metrics

/// The value of the first sample of `name` whose labels include every `k="v"` in `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (label_part, value_part) = if let Some(inner) = rest.strip_prefix('{') {
                let (inner, after) = inner.split_once('}')?;
                (inner, after)
            } else if rest.starts_with(' ') {
                ("", rest)
            } else {
                return None;
            };
            let all = labels
                .iter()
                .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")));
            if !all {
                return None;
            }
            value_part.split_whitespace().next()?.parse().ok()
        })
}

/// Every `le` bucket value of histogram `name`, in order.
fn buckets(text: &str, name: &str) -> Vec<(String, f64)> {
    let prefix = format!("{name}_bucket{{");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(prefix.as_str())?;
            let (labels, value) = rest.split_once('}')?;
            let le = labels
                .split(',')
                .find_map(|l| l.trim().strip_prefix("le="))?
                .trim_matches('"')
                .to_string();
            Some((le, value.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_with_every_family() {
    let origin = MockOrigin::fixed("metrics body", "max-age=60").await;
    let proxy = start(&origin.url(), &[]).await;
    expect(&sget(&proxy, "/measured").await, "MISS");
    expect(&sget(&proxy, "/measured").await, "HIT-L1");

    let resp = admin_get(&proxy, TOKEN, "/metrics").await;
    assert_eq!(resp.status, 200);
    let ct = resp.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "Content-Type {ct:?}"
    );
    let text = resp.text();

    let families: [(&str, &str); 28] = [
        ("strata_requests_total", "counter"),
        ("strata_hit_duration_seconds", "histogram"),
        ("strata_l2_duration_seconds", "histogram"),
        ("strata_origin_duration_seconds", "histogram"),
        ("strata_l1_bytes", "gauge"),
        ("strata_l1_entries", "gauge"),
        ("strata_l1_evictions_total", "counter"),
        ("strata_l2_errors_total", "counter"),
        ("strata_l2_timeouts_total", "counter"),
        ("strata_l2_breaker_open", "gauge"),
        ("strata_l2_dropped_writes_total", "counter"),
        ("strata_l2_writes_overtaken_total", "counter"),
        ("strata_coalesced_total", "counter"),
        ("strata_coalesce_waiting", "gauge"),
        ("strata_fills_in_flight", "gauge"),
        ("strata_refreshes_total", "counter"),
        ("strata_l2_writes_total", "counter"),
        ("strata_origin_requests_total", "counter"),
        ("strata_invalidations_sent_total", "counter"),
        ("strata_invalidations_received_total", "counter"),
        ("strata_invalidations_applied_total", "counter"),
        ("strata_pubsub_reconnects_total", "counter"),
        ("strata_purges_total", "counter"),
        ("strata_purges_unpublished", "gauge"),
        ("strata_l2_purges_unfinished", "gauge"),
        ("strata_origin_in_flight", "gauge"),
        ("strata_origin_waiting", "gauge"),
        ("strata_origin_busy_total", "counter"),
    ];
    for (family, kind) in families {
        let help = format!("# HELP {family} ");
        assert!(
            text.lines().any(|l| l.starts_with(&help)),
            "no `# HELP {family}` line in:\n{text}"
        );
        let type_line = format!("# TYPE {family} {kind}");
        assert!(
            text.lines().any(|l| l.trim_end() == type_line),
            "no `{type_line}` line in:\n{text}"
        );
    }

    let requests = |x_cache: &str| sample(&text, "strata_requests_total", &[("x_cache", x_cache)]);
    assert!(
        requests("HIT-L1").is_some_and(|v| v >= 1.0),
        "strata_requests_total{{x_cache=\"HIT-L1\"}} after a hit: {:?}\n{text}",
        requests("HIT-L1")
    );
    assert!(
        requests("MISS").is_some_and(|v| v >= 1.0),
        "strata_requests_total{{x_cache=\"MISS\"}} after a miss: {:?}\n{text}",
        requests("MISS")
    );
    assert!(
        sample(&text, "strata_origin_requests_total", &[]).is_some_and(|v| v >= 1.0),
        "strata_origin_requests_total\n{text}"
    );
    assert!(
        sample(&text, "strata_l1_entries", &[]).is_some_and(|v| v >= 1.0),
        "strata_l1_entries\n{text}"
    );
    assert!(
        sample(&text, "strata_l1_bytes", &[]).is_some_and(|v| v > 0.0),
        "strata_l1_bytes\n{text}"
    );
    assert_eq!(
        sample(&text, "strata_l2_breaker_open", &[]),
        Some(0.0),
        "strata_l2_breaker_open without Redis\n{text}"
    );

    for histogram in [
        "strata_hit_duration_seconds",
        "strata_origin_duration_seconds",
    ] {
        let b = buckets(&text, histogram);
        assert!(b.len() >= 2, "{histogram}: buckets {b:?}\n{text}");
        let (last_le, last) = b.last().unwrap().clone();
        assert_eq!(last_le, "+Inf", "{histogram}: last bucket {b:?}");
        assert!(
            b.windows(2).all(|w| w[0].1 <= w[1].1),
            "{histogram}: buckets not cumulative {b:?}"
        );
        let count = sample(&text, &format!("{histogram}_count"), &[])
            .unwrap_or_else(|| panic!("no {histogram}_count\n{text}"));
        let sum = sample(&text, &format!("{histogram}_sum"), &[])
            .unwrap_or_else(|| panic!("no {histogram}_sum\n{text}"));
        assert!(count >= 1.0, "{histogram}_count {count}");
        assert_eq!(last, count, "{histogram}: +Inf bucket vs _count");
        assert!((0.0..60.0).contains(&sum), "{histogram}_sum {sum}");
    }
}
