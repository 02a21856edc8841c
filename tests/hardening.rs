//! Hardening: the request's host as the origin sees it, GET bodies, hostile freshness values,
//! directives that forbid serving stale, invalidation only for the response's own reasons,
//! coalescing under origin failure and leader cancellation, `Cache-Status` chaining, non-WebSocket
//! upgrades, a leader client that stops reading, and connections that never send a request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MIB: usize = 1024 * 1024;

/// A response read off a raw HTTP/1.1 connection.
#[derive(Debug)]
struct RawResp {
    status: u16,
    /// Header lines as (lowercased name, value), in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` on a fresh connection and reads one response (Content-Length, chunked, or up to
/// the close), all within 5 s.
async fn raw_request(addr: std::net::SocketAddr, request: &[u8]) -> RawResp {
    within("raw HTTP/1.1 exchange", secs(5), async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        read_response(&mut stream).await
    })
    .await
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await.unwrap_or(0);
    buf.extend_from_slice(&chunk[..n]);
    n > 0
}

async fn read_response(stream: &mut TcpStream) -> RawResp {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        assert!(
            read_more(stream, &mut buf).await,
            "connection closed inside the response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut rest = buf[head_end + 4..].to_vec();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if status == 304 || status == 204 || status / 100 == 1 {
        Vec::new()
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().unwrap();
        while rest.len() < len {
            assert!(read_more(stream, &mut rest).await, "body cut short");
        }
        rest.truncate(len);
        rest
    } else if find("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
                    break pos;
                }
                assert!(read_more(stream, &mut rest).await, "chunked body cut short");
            };
            let size_line = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_line:?}"));
            while rest.len() < line_end + 2 + size + 2 {
                assert!(read_more(stream, &mut rest).await, "chunk cut short");
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break body;
            }
        }
    } else {
        while read_more(stream, &mut rest).await {}
        rest
    };
    RawResp {
        status,
        headers,
        body,
    }
}

// 1 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_gets_the_host_the_cache_key_uses() {
    let origin = MockOrigin::start(|r| {
        Reply::ok(format!("for {}", r.header("host").unwrap_or("?"))).cc("max-age=60")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    // Absolute-form request line naming victim.test, Host saying evil.test.
    let r = raw_request(
        proxy.addr,
        b"GET http://victim.test/p HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        origin.last_header("/p", "host").as_deref(),
        Some("victim.test"),
        "the origin must get the host the cache key was built from"
    );
    assert_eq!(r.text(), "for victim.test");
    // What was stored under victim.test/p is the origin's answer for victim.test.
    let r = get(&proxy.url("/p"), &[("host", "victim.test")]).await;
    assert_eq!(r.x_cache(), "HIT-L1");
    assert_eq!(r.text(), "for victim.test");
    assert_eq!(origin.hits("/p"), 1);

    // Two Host fields: refused, never forwarded.
    let forwarded = proxy.stats().origin_requests;
    let r = raw_request(
        proxy.addr,
        b"GET /dup-host HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "two Host fields: {r:?}");
    assert_eq!(
        origin.hits("/dup-host"),
        0,
        "a request with two Host fields reached the origin"
    );
    assert_eq!(
        proxy.stats().origin_requests,
        forwarded,
        "a request with two Host fields was forwarded"
    );

    // h2c: the :authority is the host.
    let r = h2_get_url(proxy.addr, "http://a.test/h2-host", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(
        origin.last_header("/h2-host", "host").as_deref(),
        Some("a.test")
    );
    assert_eq!(r.text(), "for a.test");
}

// 2 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_a_body_is_passed_through_and_not_stored() {
    let origin = MockOrigin::start(|r| {
        Reply::ok(format!("body=[{}]", String::from_utf8_lossy(&r.body))).cc("max-age=60")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let r = within(
        "GET with a body",
        secs(3),
        request("GET", &proxy.url("/gb"), &[], "hello"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "body=[hello]");
    assert_eq!(r.x_cache(), "BYPASS");
    assert_eq!(origin.last_body("/gb").as_deref(), Some(&b"hello"[..]));
    assert_eq!(
        origin.last_header("/gb", "content-length").as_deref(),
        Some("5")
    );

    // The answer to the GET with a body was not stored for the bodyless GET.
    let r = get(&proxy.url("/gb"), &[]).await;
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(r.text(), "body=[]");
    assert_eq!(origin.hits("/gb"), 2);
    assert_eq!(get(&proxy.url("/gb"), &[]).await.x_cache(), "HIT-L1");

    // The same over a raw connection: answered, not hanging, body forwarded.
    let started = Instant::now();
    let r = raw_request(
        proxy.addr,
        b"GET /gb-raw HTTP/1.1\r\nHost: raw.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(started.elapsed() < secs(3), "took {:?}", started.elapsed());
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-cache"), Some("BYPASS"));
    assert_eq!(r.text(), "body=[hello]");
    assert_eq!(origin.last_body("/gb-raw").as_deref(), Some(&b"hello"[..]));
}

// 3 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_freshness_values_do_not_break_anything() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        "/huge-max-age" => Reply::ok("huge max-age").cc("max-age=99999999999999999999999"),
        "/huge-swr" => Reply::ok(format!("swr-{}", r.hit))
            .cc("max-age=1, stale-while-revalidate=18446744073709551615"),
        "/huge-age" => Reply::ok("aged")
            .cc("max-age=60")
            .header("age", "18446744073709551615")
            .header("etag", "\"a1\"")
            .conditional(),
        _ => Reply::ok("plain").cc("max-age=60"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let mut first_cache_status = Vec::new();
    for path in ["/huge-max-age", "/huge-swr", "/huge-age"] {
        let r = get(&proxy.url(path), &[]).await;
        assert_eq!(r.status, 200, "{path}");
        first_cache_status.push((path, r.cache_status().to_string()));
    }

    // max-age past any integer is "very long" (RFC 9111 §1.2.2: take it as 2^31), not zero.
    // Checked at the end, so the rest of the scenario runs either way.
    let r = get(&proxy.url("/huge-max-age"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "huge max-age");
    let huge_max_age_second = r.x_cache().to_string();
    let r = get(&proxy.url("/huge-swr"), &[]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "HIT-L1"));
    assert_eq!(r.text(), "swr-1");
    // An Age beyond max-age: stored for revalidation, revalidated with its ETag.
    let r = get(&proxy.url("/huge-age"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "aged");
    assert_eq!(r.x_cache(), "REVALIDATED");
    assert_eq!(
        origin.last_header("/huge-age", "if-none-match").as_deref(),
        Some("\"a1\"")
    );

    // Inside the (capped) stale-while-revalidate window.
    proxy.advance(secs(10));
    let r = get(&proxy.url("/huge-swr"), &[]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "STALE"));
    assert_eq!(r.text(), "swr-1");
    origin.wait_hits("/huge-swr", 2).await;

    // A century later every window is over: still answers, no panic.
    proxy.advance(secs(100 * 365 * 86_400));
    for path in ["/huge-max-age", "/huge-swr", "/huge-age", "/other"] {
        let r = get(&proxy.url(path), &[]).await;
        assert_eq!(r.status, 200, "{path} after a century");
        assert!(!r.body.is_empty(), "{path}");
    }

    for (path, cs) in &first_cache_status {
        assert!(cs.contains("stored"), "{path}: first Cache-Status {cs:?}");
    }
    assert_eq!(
        huge_max_age_second, "HIT-L1",
        "max-age=99999999999999999999999 should be stored and fresh (RFC 9111 §1.2.2: 2^31)"
    );
}

// 4 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_revalidate_is_fresh_but_never_served_stale() {
    let origin = MockOrigin::start(|r| {
        Reply::ok(format!("pr-v{}", r.hit)).cc("max-age=60, proxy-revalidate")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_GRACE", "30s")]).await;
    let url = proxy.url("/pr");

    let r = get(&url, &[]).await;
    assert_eq!(r.x_cache(), "MISS");
    assert!(
        r.cache_status().contains("stored"),
        "{:?}",
        r.cache_status()
    );
    let r = get(&url, &[]).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT-L1", "pr-v1"));
    proxy.advance(secs(30));
    let r = get(&url, &[]).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT-L1", "pr-v1"));
    assert_eq!(origin.hits("/pr"), 1);

    // Age 61 > max-age 60; CACHE_GRACE=30s must not apply.
    proxy.advance(secs(31));
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.x_cache(), "STALE", "proxy-revalidate served stale");
    assert_eq!(r.text(), "pr-v2");
    assert_eq!(origin.hits("/pr"), 2);
}

// 5 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_max_stale_is_not_honoured_for_s_maxage() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        "/s" => Reply::ok(format!("s-v{}", r.hit)).cc("s-maxage=10"),
        _ => Reply::ok(format!("m-v{}", r.hit)).cc("max-age=10"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    for path in ["/s", "/m"] {
        assert_eq!(get(&proxy.url(path), &[]).await.x_cache(), "MISS", "{path}");
    }
    proxy.advance(secs(20));
    let max_stale = [("cache-control", "max-stale=3600")];

    // s-maxage implies proxy-revalidate: the client's max-stale does not loosen it.
    let r = get(&proxy.url("/s"), &max_stale).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "s-v2", "s-maxage entry served stale");
    assert_ne!(r.x_cache(), "STALE");
    assert_eq!(origin.hits("/s"), 2);

    // The same request for a max-age entry is answered from the cache.
    let r = get(&proxy.url("/m"), &max_stale).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "m-v1");
    assert!(
        r.x_cache() == "HIT-L1" || r.x_cache() == "STALE",
        "X-Cache {:?}",
        r.x_cache()
    );
    assert_eq!(origin.hits("/m"), 1);
}

// 6 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_star_matches_a_stored_response_without_etag() {
    let origin = MockOrigin::fixed("no etag here", "max-age=60").await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/star");

    assert_eq!(get(&url, &[]).await.x_cache(), "MISS");
    let r = get(&url, &[("if-none-match", "*")]).await;
    assert_eq!(r.status, 304);
    assert_eq!(r.x_cache(), "HIT-L1");
    assert!(r.body.is_empty());
    assert_eq!(origin.hits("/star"), 1);
}

// 7 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_max_age_headers_are_never_served_stale() {
    let origin = MockOrigin::start(|r| match (r.path.as_str(), r.hit) {
        (_, 1) => Reply::ok(format!("{}-v1", r.path))
            .cc("max-age=10")
            .cc("max-age=20"),
        ("/dup-err", _) => Reply::status(503, "down"),
        _ => Reply::ok(format!("{}-v{}", r.path, r.hit))
            .cc("max-age=10")
            .cc("max-age=20"),
    })
    .await;
    let proxy = TestProxy::start(
        &origin.url(),
        &[("CACHE_GRACE", "60s"), ("CACHE_STALE_IF_ERROR", "60s")],
    )
    .await;
    for path in ["/dup", "/dup-err"] {
        let r = get(&proxy.url(path), &[]).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"), "{path}");
    }
    proxy.advance(secs(25));

    let r = get(&proxy.url("/dup"), &[]).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.x_cache(), "STALE", "conflicting max-age served stale");
    assert_eq!(r.text(), "/dup-v2");
    assert_eq!(origin.hits("/dup"), 2);

    let r = get(&proxy.url("/dup-err"), &[]).await;
    assert_ne!(
        r.x_cache(),
        "STALE",
        "conflicting max-age served stale on error"
    );
    assert_eq!(r.status, 503);
    assert_eq!(origin.hits("/dup-err"), 2);
}

// 8 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_response_itself_invalidates_a_stored_copy() {
    let mut origin = MockOrigin::start(|r| match (r.path.as_str(), r.hit) {
        ("/a", 1) => Reply::ok("a-v1")
            .cc("public, max-age=1")
            .header("etag", "\"v1\""),
        // Fine to store for the public, but this request carried Authorization.
        ("/a", _) => Reply::ok("a-private").cc("max-age=1"),
        ("/b", 1) => Reply::ok("b-v1").cc("max-age=1").header("etag", "\"b1\""),
        // The origin now says: do not store this URL.
        _ => Reply::ok("b-v2").cc("no-store"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_STALE_IF_ERROR", "1h")]).await;
    for path in ["/a", "/b"] {
        let r = get(&proxy.url(path), &[]).await;
        assert_eq!(r.x_cache(), "MISS", "{path}");
        assert!(r.cache_status().contains("stored"), "{path}");
    }
    let entries = proxy.stats().l1_entries;
    assert!(entries >= 2, "{:?}", proxy.stats());
    proxy.advance(secs(5));

    // Not storable because of the request's Authorization: the stored /a stays.
    let r = get(
        &proxy.url("/a"),
        &[("authorization", "Bearer x"), ("cache-control", "no-cache")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "a-private");
    assert_ne!(r.x_cache(), "HIT-L1");
    assert_eq!(origin.hits("/a"), 2);
    assert_eq!(
        origin.last_header("/a", "authorization").as_deref(),
        Some("Bearer x")
    );
    assert_eq!(
        proxy.stats().l1_entries,
        entries,
        "a request-specific reason dropped the stored /a: {:?}",
        proxy.stats()
    );

    // no-store from the origin: the stored /b goes.
    let r = get(&proxy.url("/b"), &[("cache-control", "no-cache")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "b-v2");
    assert_eq!(origin.hits("/b"), 2);
    // The stored /b is gone: a plain GET (which a fresh-enough copy would have answered) reaches
    // the origin. (The L1 slot count is no measure: a hit-for-miss marker takes the entry's place.)
    let r = get(&proxy.url("/b"), &[("cache-control", "max-stale=3600")]).await;
    assert_eq!(r.text(), "b-v2");
    assert_ne!(r.x_cache(), "HIT-L1");
    assert_ne!(r.x_cache(), "STALE");
    assert_eq!(origin.hits("/b"), 3, "no-store should remove the stored /b");

    origin.stop().await;
    let r = get(&proxy.url("/a"), &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.x_cache()),
        (200, "STALE"),
        "the kept /a should cover the origin outage"
    );
    assert_eq!(r.text(), "a-v1");
    let r = get(&proxy.url("/b"), &[]).await;
    assert_eq!(r.status, 502, "/b was removed: nothing to serve stale");
    assert_ne!(r.x_cache(), "STALE");
}

/// The same for a revalidation: a 304 to a request with Authorization cannot refresh the shared
/// copy (the answer is not stored for that request), but the copy stays for everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_for_an_authorized_request_keeps_the_shared_copy() {
    let origin = MockOrigin::start(|r| {
        Reply::ok("shared body")
            .cc(if r.hit == 1 {
                "public, max-age=1"
            } else {
                "max-age=60"
            })
            .header("etag", "\"s1\"")
            .conditional()
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    assert_eq!(get(&proxy.url("/shared"), &[]).await.x_cache(), "MISS");
    proxy.advance(secs(5));

    let r = get(&proxy.url("/shared"), &[("authorization", "Bearer x")]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "REVALIDATED"));
    assert_eq!(r.text(), "shared body");
    // Still stored (stale): the next plain request revalidates it instead of fetching it whole.
    let r = get(&proxy.url("/shared"), &[]).await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("REVALIDATED", "shared body")
    );
    assert_eq!(
        origin.last_header("/shared", "if-none-match").as_deref(),
        Some("\"s1\"")
    );
    assert_eq!(origin.hits("/shared"), 3);
}

// 9 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_requests_share_a_stale_copy_when_the_origin_fails() {
    let origin = MockOrigin::start(|r| {
        if r.hit == 1 {
            Reply::ok("old body")
                .cc("max-age=1, stale-if-error=3600")
                .header("etag", "\"e1\"")
        } else {
            Reply::fail().delay(secs(1))
        }
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_LOCK_TIMEOUT", "5s")]).await;
    assert_eq!(get(&proxy.url("/sie"), &[]).await.x_cache(), "MISS");
    proxy.advance(secs(10));

    let results = concurrent_gets(&proxy.url("/sie"), 10).await;
    for (resp, took) in &results {
        assert_eq!(resp.status, 200);
        assert_eq!(resp.x_cache(), "STALE");
        assert_eq!(resp.text(), "old body");
        assert!(
            *took < Duration::from_millis(3000),
            "a request took {took:?} (lock timeout 5 s, origin fails after 1 s)"
        );
    }
    let fetches = origin.hits("/sie") - 1;
    assert!(
        (1..=2).contains(&fetches),
        "origin saw {fetches} requests for the stale key; coalescing should send 1 (2 at most)"
    );
}

// 10 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_leader_does_not_cancel_the_fill() {
    let origin = MockOrigin::start(|_| {
        Reply::ok("filled despite the leader")
            .cc("max-age=60")
            .delay(Duration::from_millis(500))
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/cancel");

    let mut leader = TcpStream::connect(proxy.addr).await.unwrap();
    leader
        .write_all(format!("GET /cancel HTTP/1.1\r\nHost: {}\r\n\r\n", proxy.addr).as_bytes())
        .await
        .unwrap();
    origin.wait_hits("/cancel", 1).await;

    let followers = {
        let url = url.clone();
        tokio::spawn(async move { concurrent_gets(&url, 5).await })
    };
    // The leader's client goes away while the origin is still thinking.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(leader);

    let followers = within("followers", secs(10), followers).await.unwrap();
    for (resp, took) in &followers {
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "filled despite the leader");
        assert_eq!(resp.x_cache(), "HIT-L1");
        assert!(*took < secs(3), "a follower took {took:?}");
    }
    assert_eq!(
        origin.hits("/cancel"),
        1,
        "the cancelled leader's fill must serve the followers"
    );
    let r = get(&url, &[]).await;
    assert_eq!(r.x_cache(), "HIT-L1");
    assert_eq!(r.text(), "filled despite the leader");
    assert_eq!(origin.hits("/cancel"), 1);
}

// 11 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_followers_revalidate_instead_of_refetching() {
    let origin = MockOrigin::start(|_| {
        Reply::ok("the full no-cache body")
            .cc("no-cache")
            .header("etag", "\"v1\"")
            .conditional()
            .delay(Duration::from_millis(300))
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/n");

    let r = get(&url, &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        r.cache_status().contains("stored"),
        "{:?}",
        r.cache_status()
    );

    let results = concurrent_gets(&url, 5).await;
    for (resp, _) in &results {
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "the full no-cache body");
    }
    let requests: Vec<_> = origin
        .requests()
        .into_iter()
        .filter(|(_, uri, _)| uri.path() == "/n")
        .collect();
    assert!(requests.len() >= 2, "{} origin requests", requests.len());
    assert!(requests[0].2.get("if-none-match").is_none());
    for (i, (_, _, headers)) in requests.iter().enumerate().skip(1) {
        assert_eq!(
            headers
                .get("if-none-match")
                .map(|v| v.to_str().unwrap().to_string())
                .as_deref(),
            Some("\"v1\""),
            "origin request {} was not conditional: the origin sent the full body again",
            i + 1
        );
    }
}

// 12 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cache_status_stays_first() {
    let origin = MockOrigin::start(|_| {
        Reply::ok("chained")
            .cc("max-age=60")
            .header("cache-status", "upstream; hit")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    for expected in ["MISS", "HIT-L1"] {
        let r = get(&proxy.url("/cs"), &[]).await;
        assert_eq!(r.x_cache(), expected);
        let members: Vec<String> = r
            .all("cache-status")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        let upstream = members.iter().position(|m| m.starts_with("upstream"));
        let strata: Vec<usize> = members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.starts_with("strata"))
            .map(|(i, _)| i)
            .collect();
        assert!(upstream.is_some(), "{expected}: members {members:?}");
        assert_eq!(strata.len(), 1, "{expected}: members {members:?}");
        assert!(
            upstream.unwrap() < strata[0],
            "{expected}: upstream member must come first: {members:?}"
        );
        assert_eq!(strata[0], members.len() - 1, "{expected}: {members:?}");
    }
}

// 13 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_requests_are_not_tunnelled() {
    let origin = MockOrigin::start(|_| Reply::ok("plain answer").cc("no-store")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let r = raw_request(
        proxy.addr,
        b"GET /up HTTP/1.1\r\nHost: up.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "plain answer");
    assert!(r.header("upgrade").is_none(), "{r:?}");
    assert_ne!(r.header("x-cache"), Some("BYPASS"), "{r:?}");

    let seen = origin.last_headers("/up").expect("origin saw /up");
    assert!(
        !seen.contains_key("upgrade"),
        "origin got Upgrade: {seen:?}"
    );
    assert!(
        !seen.contains_key("http2-settings"),
        "origin got HTTP2-Settings: {seen:?}"
    );
    for conn in seen.get_all("connection") {
        assert!(
            !conn
                .to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("upgrade"),
            "origin got Connection: {conn:?}"
        );
    }
}

// 14 ------------------------------------------------------------------------------------------

/// Far bigger than what lies between a fill and a client that stopped reading: the socket buffers
/// (Linux autotunes the send buffer up to 4 MiB), hyper's write buffer and the fill's channel. A
/// fill that waited for its client was measured to stall past ~8 MiB on loopback (and absorbed 7 MiB
/// without stalling), so a 4 MiB body could not catch the regression.
const BIG: usize = 24 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_client_that_stops_reading_does_not_hold_up_the_fill() {
    let origin = MockOrigin::start(|_| Reply::sized(BIG, true).cc("max-age=60")).await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_MAX_OBJECT_MB", "32")]).await;
    let expected = pattern(BIG);

    // The leader: a small receive window, reads a few KB and then nothing more.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let mut stalled = socket.connect(proxy.addr).await.unwrap();
    stalled
        .write_all(format!("GET /big HTTP/1.1\r\nHost: {}\r\n\r\n", proxy.addr).as_bytes())
        .await
        .unwrap();
    within("first bytes for the stalled client", secs(5), async {
        let mut got = 0;
        let mut buf = [0u8; 1024];
        while got < 4 * 1024 {
            let n = stalled.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed early");
            got += n;
        }
    })
    .await;

    let started = Instant::now();
    let r = within(
        "second client while the leader's client stalls",
        secs(3),
        get(&proxy.url("/big"), &[]),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), BIG);
    assert!(r.body == expected, "body differs");
    assert_eq!(r.x_cache(), "HIT-L1");
    assert!(took < secs(3), "second client took {took:?}");

    let r = get(&proxy.url("/big"), &[]).await;
    assert_eq!(r.x_cache(), "HIT-L1");
    assert!(r.body == expected);
    assert_eq!(origin.hits("/big"), 1);
    drop(stalled);
}

/// Reads until the server closes `stream`; how long that took from `since`.
async fn closed_by_the_server(stream: &mut TcpStream, since: Instant) -> Duration {
    within("the server closing the connection", secs(10), async {
        let mut chunk = [0u8; 4096];
        while stream.read(&mut chunk).await.unwrap_or(0) > 0 {}
        since.elapsed()
    })
    .await
}

/// CLIENT_HEADER_TIMEOUT runs from the moment a connection is accepted: one that sends nothing,
/// stops inside the HTTP/2 preface, or opens HTTP/2 and sends no request is closed (hyper's own
/// header timer starts only once the protocol is known), while a connection that sent a request in
/// time is served.
#[tokio::test]
async fn connections_without_a_request_are_closed_after_the_header_timeout() {
    let origin = MockOrigin::fixed("served", "max-age=60").await;
    let proxy = TestProxy::start(&origin.url(), &[("CLIENT_HEADER_TIMEOUT", "1s")]).await;
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const H2_EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    let openings: [(&str, Vec<u8>); 3] = [
        ("nothing", Vec::new()),
        ("half the HTTP/2 preface", H2_PREFACE[..10].to_vec()),
        (
            "an HTTP/2 connection without a request",
            [H2_PREFACE, H2_EMPTY_SETTINGS].concat(),
        ),
    ];
    for (what, opening) in openings {
        let since = Instant::now();
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(&opening).await.unwrap();
        let took = closed_by_the_server(&mut stream, since).await;
        assert!(
            took >= Duration::from_millis(900),
            "{what}: closed after {took:?}, before the timeout"
        );
    }

    let r = raw_request(proxy.addr, b"GET /in-time HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!((r.status, r.text().as_str()), (200, "served"));
}

// 15 ------------------------------------------------------------------------------------------

/// Request heads are limited to 64 KiB on both protocols (nginx allows 32 KiB by default): a larger
/// one never reaches the origin (431, or the connection closed while the client still sends it),
/// a 40 KiB one does. hyper's own limits were about 400 KiB on HTTP/1.1 and 16 KiB on HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_are_limited_to_64_kib_on_both_protocols() {
    let origin = MockOrigin::fixed("served", "no-store").await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let fits = "a".repeat(40 * 1024);
    assert_eq!(
        get(&proxy.url("/fits"), &[("x-big", &fits)]).await.status,
        200
    );
    assert_eq!(
        h2_get(proxy.addr, "/fits", &[("x-big", &fits)])
            .await
            .status,
        200
    );

    let too_big = "a".repeat(100 * 1024);
    let head = format!("GET /big HTTP/1.1\r\nHost: x\r\nX-Big: {too_big}\r\n\r\n");
    let answer = within("the HTTP/1.1 refusal", secs(5), async {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        // The server may close before it has read all of it.
        let _ = stream.write_all(head.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        answer
    })
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );

    let refused = within("the HTTP/2 refusal", secs(5), async {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get(format!("http://{}/big", proxy.addr))
            .version(http::Version::HTTP_2)
            .header("x-big", too_big.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        send.send_request(request).await.map(|r| r.status())
    })
    .await;
    if let Ok(status) = refused {
        assert_eq!(status, 431);
    }
    assert_eq!(
        origin.total(),
        2,
        "only the heads that fit reached the origin"
    );
}
