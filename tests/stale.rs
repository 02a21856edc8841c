//! Serving stale: stale-while-revalidate (directive and CACHE_GRACE) with one background refresh,
//! stale-if-error (directive and CACHE_STALE_IF_ERROR) on error statuses, refused connections and
//! timeouts, and the directives that forbid serving stale.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// Fires `n` concurrent GETs; every one must answer STALE with `body` in well under `limit`.
async fn expect_stale_at_once(
    proxy: &TestProxy,
    path: &str,
    n: usize,
    body: &str,
    limit: Duration,
) {
    let url: Arc<str> = proxy.url(path).into();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                (get(&url, &[]).await, started.elapsed())
            })
        })
        .collect();
    for t in tasks {
        let (resp, took) = within("stale GET", secs(10), t).await.unwrap();
        assert_eq!(resp.status, 200, "{path}");
        assert_eq!(resp.x_cache(), "STALE", "{path}");
        assert_eq!(resp.text(), body, "{path}");
        assert!(resp.age() >= 20, "{path}: Age {}", resp.age());
        assert!(took < limit, "{path}: stale answer took {took:?}");
    }
}

/// Polls until a GET answers `body` from L1, all while the refresh happens in the background.
async fn wait_for_refreshed(proxy: &TestProxy, path: &str, body: &str) {
    let deadline = Instant::now() + secs(10);
    loop {
        let resp = get(&proxy.url(path), &[]).await;
        assert_eq!(resp.status, 200);
        if resp.text() == body {
            assert_eq!(resp.x_cache(), "HIT-L1", "{path}: refreshed content");
            return;
        }
        assert_eq!(resp.x_cache(), "STALE", "{path}: while refreshing");
        assert!(Instant::now() < deadline, "{path}: refresh never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let origin = MockOrigin::start(|r| {
        let reply =
            Reply::ok(format!("v{}", r.hit.min(2))).cc("max-age=10, stale-while-revalidate=100");
        if r.hit == 1 {
            reply
        } else {
            reply.delay(secs(2))
        }
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    assert_eq!(get(&proxy.url("/swr"), &[]).await.x_cache(), "MISS");
    proxy.advance(secs(20));
    expect_stale_at_once(&proxy, "/swr", 10, "v1", Duration::from_millis(1000)).await;
    origin.wait_hits("/swr", 2).await;
    wait_for_refreshed(&proxy, "/swr", "v2").await;
    assert_eq!(origin.hits("/swr"), 2, "exactly one background refresh");
    assert!(proxy.stats().stale >= 10, "{:?}", proxy.stats());
    assert!(proxy.stats().refreshes >= 1, "{:?}", proxy.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_grace_is_a_proxy_wide_stale_while_revalidate() {
    let origin = MockOrigin::start(|r| {
        let reply = Reply::ok(format!("{}-v{}", r.path, r.hit.min(2))).cc("max-age=10");
        if r.hit > 1 && r.path == "/grace" {
            reply.delay(secs(2))
        } else {
            reply
        }
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_GRACE", "60s")]).await;

    assert_eq!(get(&proxy.url("/grace"), &[]).await.x_cache(), "MISS");
    assert_eq!(get(&proxy.url("/beyond"), &[]).await.x_cache(), "MISS");
    proxy.advance(secs(20));
    expect_stale_at_once(
        &proxy,
        "/grace",
        5,
        "/grace-v1",
        Duration::from_millis(1000),
    )
    .await;
    wait_for_refreshed(&proxy, "/grace", "/grace-v2").await;
    assert_eq!(origin.hits("/grace"), 2);

    // Past max-age + grace the request waits for the origin.
    proxy.advance(secs(60));
    let r = get(&proxy.url("/beyond"), &[]).await;
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(r.text(), "/beyond-v2");
    assert_eq!(origin.hits("/beyond"), 2);
}

#[tokio::test]
async fn stale_if_error_on_error_statuses() {
    let origin = MockOrigin::start(|r| match (r.path.as_str(), r.hit) {
        ("/sie", 1) => Reply::ok("sie-v1").cc("max-age=10, stale-if-error=100"),
        ("/sie", _) => Reply::status(503, "down"),
        (_, 1) => Reply::ok("env-v1").cc("max-age=10"),
        _ => Reply::status(500, "broken"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_STALE_IF_ERROR", "60s")]).await;

    assert_eq!(get(&proxy.url("/sie"), &[]).await.x_cache(), "MISS");
    assert_eq!(get(&proxy.url("/env"), &[]).await.x_cache(), "MISS");
    proxy.advance(secs(20));

    let r = get(&proxy.url("/sie"), &[]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "STALE"));
    assert_eq!(r.text(), "sie-v1");
    assert_eq!(origin.hits("/sie"), 2);

    let r = get(&proxy.url("/env"), &[]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "STALE"));
    assert_eq!(r.text(), "env-v1");
    assert_eq!(origin.hits("/env"), 2);

    // Past the stale-if-error window the error passes through.
    proxy.advance(secs(200));
    let r = get(&proxy.url("/sie"), &[]).await;
    assert_eq!(r.status, 503);
    assert_ne!(r.x_cache(), "STALE");
}

#[tokio::test]
async fn stale_if_error_when_the_origin_is_gone() {
    let mut origin =
        MockOrigin::start(|_| Reply::ok("remembered").cc("max-age=10, stale-if-error=100")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    assert_eq!(get(&proxy.url("/gone"), &[]).await.x_cache(), "MISS");

    origin.stop().await;
    proxy.advance(secs(20));
    let r = get(&proxy.url("/gone"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "STALE");
    assert_eq!(r.text(), "remembered");

    // Something never stored still fails as 502.
    let r = get(&proxy.url("/never"), &[]).await;
    assert_eq!(r.status, 502);
}

#[tokio::test]
async fn stale_if_error_on_origin_timeout() {
    let origin = MockOrigin::start(|r| {
        let reply = Reply::ok(format!("t{}", r.hit)).cc("max-age=10, stale-if-error=100");
        if r.hit == 1 {
            reply
        } else {
            reply.delay(secs(3))
        }
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("ORIGIN_TIMEOUT", "300ms")]).await;
    assert_eq!(get(&proxy.url("/timeout"), &[]).await.x_cache(), "MISS");
    proxy.advance(secs(20));

    let started = Instant::now();
    let r = get(&proxy.url("/timeout"), &[]).await;
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "STALE");
    assert_eq!(r.text(), "t1");
    assert!(took < secs(2), "stale-if-error after timeout took {took:?}");
}

#[tokio::test]
async fn must_revalidate_and_no_cache_are_never_served_stale() {
    let origin = MockOrigin::start(|r| {
        if r.hit > 1 {
            return Reply::status(503, "unavailable");
        }
        let reply = Reply::ok(format!("{}-v1", r.path));
        match r.path.as_str() {
            "/must" => reply
                .cc("max-age=10, must-revalidate, stale-while-revalidate=100, stale-if-error=100"),
            "/proxy" => reply.cc("max-age=10, proxy-revalidate, stale-if-error=100"),
            _ => reply.cc("no-cache, max-age=60").header("etag", "\"n1\""),
        }
    })
    .await;
    let proxy = TestProxy::start(
        &origin.url(),
        &[("CACHE_GRACE", "100s"), ("CACHE_STALE_IF_ERROR", "100s")],
    )
    .await;

    for path in ["/must", "/proxy", "/nocache"] {
        let r = get(&proxy.url(path), &[]).await;
        assert_eq!(r.status, 200, "{path}");
    }
    proxy.advance(secs(20));
    for path in ["/must", "/proxy", "/nocache"] {
        let r = get(&proxy.url(path), &[]).await;
        assert_eq!(r.status, 503, "{path} must not be served stale");
        assert_ne!(r.x_cache(), "STALE", "{path}");
        assert_eq!(r.text(), "unavailable", "{path}");
        assert_eq!(origin.hits(path), 2, "{path}");
    }
}
