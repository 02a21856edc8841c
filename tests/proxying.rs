//! Proxying: header rules both ways, request bodies, h2c, WebSocket upgrades and origin/client errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let origin = MockOrigin::start(|_| {
        Reply::ok("hello")
            .cc("no-store")
            .header("connection", "X-Origin-Hop")
            .header("x-origin-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("upgrade", "foo/1")
            .header("trailer", "X-Trailing")
            .header("x-end-to-end", "kept")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let resp = get(
        &proxy.url("/hop"),
        &[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "X-Client-Trailing"),
            ("x-client-end-to-end", "kept"),
        ],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "hello");

    // Request side: what the origin received.
    let seen = origin.last_headers("/hop").expect("origin saw /hop");
    for name in [
        "x-secret-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
    ] {
        assert!(
            !seen.contains_key(name),
            "origin received hop-by-hop {name}: {seen:?}"
        );
    }
    if let Some(conn) = origin.last_header("/hop", "connection") {
        assert!(
            !conn.to_ascii_lowercase().contains("x-secret-hop"),
            "origin received Connection: {conn}"
        );
    }
    assert_eq!(
        origin.last_header("/hop", "x-client-end-to-end").as_deref(),
        Some("kept")
    );

    // Response side: what the client received.
    for name in [
        "x-origin-hop",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "trailer",
    ] {
        assert!(
            resp.header(name).is_none(),
            "client received hop-by-hop {name}: {:?}",
            resp.headers
        );
    }
    for conn in resp.all("connection") {
        assert!(
            !conn.to_ascii_lowercase().contains("x-origin-hop"),
            "client received Connection: {conn}"
        );
    }
    assert_eq!(resp.header("x-end-to-end"), Some("kept"));
}

#[tokio::test]
async fn via_forwarded_and_host_headers() {
    let origin = MockOrigin::start(|_| Reply::ok("fwd").cc("no-store")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let resp = get(
        &proxy.url("/fwd"),
        &[("host", "example.test"), ("x-forwarded-for", "10.0.0.1")],
    )
    .await;
    assert_eq!(resp.status, 200);
    let via = resp.all("via").join(", ");
    assert!(via.contains("strata"), "response Via: {via:?}");

    assert_eq!(
        origin.last_header("/fwd", "host").as_deref(),
        Some("example.test")
    );
    let via = origin.last_header("/fwd", "via").unwrap_or_default();
    assert!(via.contains("strata"), "request Via: {via:?}");
    let xff = origin
        .last_header("/fwd", "x-forwarded-for")
        .unwrap_or_default();
    let hops: Vec<&str> = xff.split(',').map(str::trim).collect();
    assert_eq!(hops, ["10.0.0.1", "127.0.0.1"], "X-Forwarded-For: {xff:?}");
    assert_eq!(
        origin.last_header("/fwd", "x-forwarded-proto").as_deref(),
        Some("http")
    );
    assert_eq!(
        origin.last_header("/fwd", "x-forwarded-host").as_deref(),
        Some("example.test")
    );

    // Without a client X-Forwarded-For the proxy starts one; a present X-Forwarded-Proto is kept,
    // while X-Forwarded-Host is always the keyed host (see the test below).
    get(
        &proxy.url("/fwd2"),
        &[
            ("host", "second.test"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "public.example"),
        ],
    )
    .await;
    assert_eq!(
        origin.last_header("/fwd2", "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        origin.last_header("/fwd2", "x-forwarded-proto").as_deref(),
        Some("https")
    );
    assert_eq!(
        origin.last_header("/fwd2", "x-forwarded-host").as_deref(),
        Some("second.test")
    );
    assert_eq!(
        origin.last_header("/fwd2", "host").as_deref(),
        Some("second.test")
    );
}

/// An origin that builds its links from `X-Forwarded-Host` (as frameworks behind a proxy do) cannot
/// be made to store one client's host in everyone's copy: the field it gets is the keyed host.
#[tokio::test]
async fn a_client_x_forwarded_host_cannot_poison_the_stored_answer() {
    let origin = MockOrigin::start(|r| {
        let host = r.header("x-forwarded-host").unwrap_or_default();
        Reply::ok(format!("<a href=\"http://{host}/next\">")).cc("max-age=60")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let attack = get(
        &proxy.url("/page"),
        &[("host", "shop.test"), ("x-forwarded-host", "evil.test")],
    )
    .await;
    assert_eq!(attack.x_cache(), "MISS");
    let victim = get(&proxy.url("/page"), &[("host", "shop.test")]).await;
    assert_eq!(victim.x_cache(), "HIT-L1");
    assert_eq!(victim.text(), "<a href=\"http://shop.test/next\">");
}

#[tokio::test]
async fn an_origin_varying_on_x_forwarded_proto_keeps_http_and_https_apart() {
    // The README's advice for origins behind a TLS-terminating load balancer: a redirect to https
    // stored for an http request is never served to an https one, and the reverse.
    let origin = MockOrigin::start(|r| {
        let reply = match r.header("x-forwarded-proto") {
            Some("https") => Reply::ok(format!("page #{}", r.hit)),
            _ => Reply::status(301, "").header("location", "https://example.test/page"),
        };
        reply.cc("max-age=60").header("vary", "X-Forwarded-Proto")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/page");
    let http = [("x-forwarded-proto", "http")];
    let https = [("x-forwarded-proto", "https")];

    let r = get(&url, &http).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (301, "MISS"));
    let r = get(&url, &https).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"));
    assert_eq!(r.text(), "page #2");
    let r = get(&url, &https).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "HIT-L1"));
    let r = get(&url, &http).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (301, "HIT-L1"));
    assert_eq!(origin.hits("/page"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_is_streamed_to_origin() {
    let origin = MockOrigin::start(|_| Reply::echo()).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let first = Bytes::from(vec![b'a'; 32 * 1024]);
    let second = Bytes::from(vec![b'b'; 100 * 1024]);
    let (tx, body) = chan_body();
    let url = proxy.url("/echo");
    let call = tokio::spawn(async move { request_body("POST", &url, &[], body).await });

    tx.send(first.clone()).await.unwrap();
    // The origin must see the first chunk while the client still holds the rest back.
    wait_until("origin to receive the first request-body chunk", || {
        origin.req_body_bytes() >= first.len()
    })
    .await;
    assert_eq!(origin.hits("/echo"), 1);
    tx.send(second.clone()).await.unwrap();
    drop(tx);

    let resp = within("POST /echo", Duration::from_secs(10), call)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.x_cache(), "BYPASS");
    let mut expected = first.to_vec();
    expected.extend_from_slice(&second);
    assert_eq!(resp.body.len(), expected.len());
    assert!(resp.body == expected, "echoed body differs");
    assert!(origin.last_body("/echo").unwrap() == expected);
}

#[tokio::test]
async fn fixed_length_post_body_reaches_origin() {
    let origin = MockOrigin::start(|_| Reply::echo()).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let body = pattern(300 * 1024);
    let resp = request("PUT", &proxy.url("/put"), &[], body.clone()).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.x_cache(), "BYPASS");
    assert!(resp.body == body);
    let seen = origin.last_headers("/put").unwrap();
    assert_eq!(seen.get("content-length").unwrap(), "307200");
}

#[tokio::test]
async fn h2c_prior_knowledge_client_works() {
    let origin = MockOrigin::start(|_| Reply::ok("over h2").cc("max-age=60")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let resp = h2_get(proxy.addr, "/h2", &[]).await;
    assert_eq!(resp.version, http::Version::HTTP_2);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "over h2");
    assert_eq!(resp.x_cache(), "MISS");

    let resp = h2_get(proxy.addr, "/h2", &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "over h2");
    assert_eq!(resp.x_cache(), "HIT-L1");
    assert_eq!(origin.hits("/h2"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let origin = MockOrigin::start(|_| Reply::upgrade_echo()).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    within("websocket exchange", Duration::from_secs(10), async {
        let (mut stream, head) = open_websocket(&proxy).await;
        assert!(head.contains("upgrade: websocket"), "response head: {head}");
        assert!(head.contains("x-cache: bypass"), "response head: {head}");

        for msg in [&b"hello-ws"[..], &b"second message"[..]] {
            stream.write_all(msg).await.unwrap();
            let mut echoed = vec![0u8; msg.len()];
            stream.read_exact(&mut echoed).await.unwrap();
            assert_eq!(echoed, msg);
        }
    })
    .await;

    let upgrade = origin.last_header("/ws", "upgrade").unwrap_or_default();
    assert!(
        upgrade.eq_ignore_ascii_case("websocket"),
        "origin Upgrade: {upgrade:?}"
    );
    let conn = origin.last_header("/ws", "connection").unwrap_or_default();
    assert!(
        conn.to_ascii_lowercase().contains("upgrade"),
        "origin Connection: {conn:?}"
    );
}

/// Opens a WebSocket through `proxy`: the client's end of the tunnel and the 101 head, lowercased.
async fn open_websocket(proxy: &TestProxy) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.unwrap();
        assert!(n > 0, "connection closed in response head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "response head: {head}");
    (stream, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websocket_is_closed_after_tunnel_idle_timeout() {
    let origin = MockOrigin::start(|_| Reply::upgrade_echo()).await;
    let idle = Duration::from_millis(300);
    let proxy = TestProxy::start(&origin.url(), &[("TUNNEL_IDLE_TIMEOUT", "300ms")]).await;

    within("idle websocket closed", Duration::from_secs(10), async {
        let (mut stream, _) = open_websocket(&proxy).await;
        // Strata cannot have carried the message (or its echo) before it was sent: measured from
        // here, the tunnel's quiet time is a lower bound that always holds.
        let sent = Instant::now();
        stream.write_all(b"only message").await.unwrap();
        let mut echoed = [0u8; 12];
        stream.read_exact(&mut echoed).await.unwrap();
        let mut rest = Vec::new();
        let closed = stream.read_to_end(&mut rest).await;
        assert!(
            closed.is_ok()
                || closed.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the idle tunnel should end"
        );
        assert!(rest.is_empty(), "unexpected bytes: {rest:?}");
        assert!(
            sent.elapsed() >= idle,
            "closed {:?} after the last message, before TUNNEL_IDLE_TIMEOUT",
            sent.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn refused_origin_is_502() {
    let proxy = TestProxy::start(&refused_url(), &[]).await;
    let resp = get(&proxy.url("/down"), &[]).await;
    assert_eq!(resp.status, 502);
    assert!(!resp.body.is_empty(), "502 should carry a text body");
}

#[tokio::test]
async fn slow_origin_is_504_after_origin_timeout() {
    let origin = MockOrigin::start(|_| Reply::ok("late").delay(Duration::from_secs(2))).await;
    let proxy = TestProxy::start(&origin.url(), &[("ORIGIN_TIMEOUT", "200ms")]).await;
    let started = Instant::now();
    let resp = get(&proxy.url("/slow"), &[]).await;
    let elapsed = started.elapsed();
    assert_eq!(resp.status, 504);
    assert!(!resp.body.is_empty(), "504 should carry a text body");
    assert!(
        elapsed < Duration::from_millis(1500),
        "504 took {elapsed:?}, ORIGIN_TIMEOUT is 200ms"
    );
}

/// GETs `url`, whose origin sends `head;`, then stalls 1.5 s before `tail`: with ORIGIN_TIMEOUT
/// 400ms the body must be cut off (an error or a short body), well before the stall ends.
async fn assert_stall_cut_off(url: &str, what: &str) {
    let started = Instant::now();
    let resp = request_streaming("GET", url, &[], empty()).await;
    assert_eq!(resp.status(), 200);
    let outcome = within(
        what,
        Duration::from_secs(5),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await;
    if let Ok(body) = outcome {
        assert_ne!(
            &body.to_bytes()[..],
            b"head;tail",
            "the body survived a gap longer than ORIGIN_TIMEOUT"
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "cut-off took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_timeout_bounds_body_gaps_not_the_whole_body() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        // Five gaps of 100 ms: one second in all, each gap well under ORIGIN_TIMEOUT.
        "/trickle" => Reply::chunks(
            (0..6).map(|i| Bytes::from(format!("part{i};"))).collect(),
            Duration::from_millis(100),
        )
        .cc("max-age=60"),
        // A gap of 1.5 s in the middle of the body.
        _ if r.hit == 1 => Reply::chunks(
            vec![Bytes::from("head;"), Bytes::from("tail")],
            Duration::from_millis(1500),
        )
        .cc("max-age=60"),
        _ => Reply::ok("whole").cc("max-age=60"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("ORIGIN_TIMEOUT", "400ms")]).await;

    let r = get(&proxy.url("/trickle"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "part0;part1;part2;part3;part4;part5;");
    let r = get(&proxy.url("/trickle"), &[]).await;
    assert_eq!(r.x_cache(), "HIT-L1");
    assert_eq!(r.text(), "part0;part1;part2;part3;part4;part5;");

    // The stalled body is cut off (the client sees an error or a short body) and not stored.
    assert_stall_cut_off(&proxy.url("/stall"), "stalled body to be cut off").await;
    let r = get(&proxy.url("/stall"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "whole", "a cut-off body must not be stored");
    assert_eq!(origin.hits("/stall"), 2);
}

/// Uncacheable answers stream straight through (no fill task): the same per-gap deadline applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_timeout_bounds_gaps_in_passed_through_bodies() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        // Six gaps of 100 ms: 600 ms in all, longer than ORIGIN_TIMEOUT, each gap well under it.
        "/trickle" => Reply::chunks(
            (0..7).map(|i| Bytes::from(format!("part{i};"))).collect(),
            Duration::from_millis(100),
        )
        .cc("no-store"),
        _ => Reply::chunks(
            vec![Bytes::from("head;"), Bytes::from("tail")],
            Duration::from_millis(1500),
        )
        .cc("no-store"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("ORIGIN_TIMEOUT", "400ms")]).await;

    for _ in 0..2 {
        let r = get(&proxy.url("/trickle"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "part0;part1;part2;part3;part4;part5;part6;");
    }

    assert_stall_cut_off(
        &proxy.url("/stall"),
        "stalled pass-through body to be cut off",
    )
    .await;
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    let origin = MockOrigin::start(|_| Reply::ok("fine").cc("no-store")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    for raw in [
        &b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n"[..],
        &b"NOT A REQUEST LINE\r\n\r\n"[..],
    ] {
        let (out, closed) = raw_exchange(proxy.addr, raw).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "answer to {:?}: {text:?}",
            String::from_utf8_lossy(raw)
        );
        assert!(closed, "connection left open after a malformed request");
    }

    // Binary garbage: a 400 or a closed connection, never a hang.
    let garbage = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\xff\xfe garbage \r\n\r\n";
    let (out, closed) = raw_exchange(proxy.addr, garbage).await;
    assert!(closed, "connection left open after garbage");
    let text = String::from_utf8_lossy(&out);
    assert!(
        out.is_empty() || text.starts_with("HTTP/1.1 4"),
        "answer to garbage: {text:?}"
    );

    assert_eq!(origin.total(), 0, "malformed requests reached the origin");
    let resp = get(&proxy.url("/after"), &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "fine");
}

/// Origin connections are kept alive and reused: sequential requests share one connection, and a
/// burst opens no more connections than it has requests in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_connections_are_kept_alive_and_reused() {
    let origin = MockOrigin::fixed("fresh every time", "no-store").await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    for _ in 0..20 {
        let r = get(&proxy.url("/pass"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "fresh every time");
    }
    assert_eq!(origin.total(), 20);
    assert_eq!(
        origin.connections(),
        1,
        "one kept-alive connection carries them all"
    );
    let stats = proxy.stats();
    assert_eq!(stats.origin_connections, 1);
    assert_eq!(stats.origin_idle_connections, 1);

    for (response, _) in concurrent_gets(&proxy.url("/pass"), 8).await {
        assert_eq!(response.status, 200);
    }
    assert!(
        origin.connections() <= 8,
        "{} connections",
        origin.connections()
    );
    assert_eq!(
        proxy.stats().origin_connections as usize,
        origin.connections()
    );
}

/// An origin whose `/held/*` answers stream ten chunks 150 ms apart (about 1.5 s in flight, never
/// idle for an ORIGIN_TIMEOUT of 500 ms or more), everything else at once; all uncacheable.
async fn trickling_origin() -> MockOrigin {
    MockOrigin::start(|r| {
        if r.path.starts_with("/held/") {
            let chunks = (0..10).map(|i| Bytes::from(format!("{i};"))).collect();
            Reply::chunks(chunks, Duration::from_millis(150)).cc("no-store")
        } else {
            Reply::ok("quick").cc("no-store")
        }
    })
    .await
}

/// GETs of /held/0 and /held/1 on `proxy`, running; returns once the origin has both.
async fn hold_two_slots(
    proxy: &TestProxy,
    origin: &MockOrigin,
) -> Vec<tokio::task::JoinHandle<Resp>> {
    let held: Vec<_> = (0..2)
        .map(|i| {
            let url = proxy.url(&format!("/held/{i}"));
            tokio::spawn(async move { get(&url, &[]).await })
        })
        .collect();
    wait_until("the origin has both held requests", || {
        origin.hits("/held/0") == 1 && origin.hits("/held/1") == 1
    })
    .await;
    held
}

/// ORIGIN_MAX_CONNS bounds the requests in flight to the origin: past it a request waits for a
/// slot and goes out when one frees (on a kept connection: the origin sees no third), or gets 503
/// with Retry-After when none frees within ORIGIN_TIMEOUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_max_conns_bounds_the_requests_in_flight() {
    let origin = trickling_origin().await;
    let proxy = TestProxy::start(
        &origin.url(),
        &[("ORIGIN_MAX_CONNS", "2"), ("ORIGIN_TIMEOUT", "5s")],
    )
    .await;
    let held = hold_two_slots(&proxy, &origin).await;
    assert_eq!(proxy.stats().origin_in_flight, 2, "{:?}", proxy.stats());
    let url = proxy.url("/third");
    let third = tokio::spawn(async move { get(&url, &[]).await });
    wait_until("the third request waits for a slot", || {
        proxy.stats().origin_waiting == 1
    })
    .await;
    assert_eq!(origin.hits("/third"), 0, "went out past the limit");
    for (i, answer) in held.into_iter().enumerate() {
        let r = within("a held request", secs(10), answer).await.unwrap();
        assert_eq!((r.status.as_u16(), r.text().len()), (200, 20), "/held/{i}");
    }
    let r = within("the third request", secs(10), third).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "quick"));
    assert_eq!(origin.connections(), 2, "two connections carried all three");
    let s = proxy.stats();
    assert_eq!((s.origin_waiting, s.origin_busy), (0, 0), "{s:?}");
    wait_until("every slot given back", || {
        proxy.stats().origin_in_flight == 0
    })
    .await;

    // No slot frees within ORIGIN_TIMEOUT: 503, and the origin never sees the request.
    let origin = trickling_origin().await;
    let proxy = TestProxy::start(
        &origin.url(),
        &[("ORIGIN_MAX_CONNS", "2"), ("ORIGIN_TIMEOUT", "500ms")],
    )
    .await;
    let held = hold_two_slots(&proxy, &origin).await;
    let r = get(&proxy.url("/turned-away"), &[]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(origin.hits("/turned-away"), 0);
    assert_eq!(proxy.stats().origin_busy, 1, "{:?}", proxy.stats());
    // The origin's latency is the two held answers' (their heads came at once): the 503's wait
    // for a slot was Strata's queue, not time at the origin.
    let metrics = get(&proxy.admin_url("/metrics"), &[]).await.text();
    let answers_timed = metrics
        .lines()
        .find_map(|line| line.strip_prefix("strata_origin_duration_seconds_count "))
        .map(str::trim);
    assert_eq!(answers_timed, Some("2"), "{metrics}");
    for answer in held {
        let r = within("a held request", secs(10), answer).await.unwrap();
        assert_eq!(r.status, 200);
    }
    let r = get(&proxy.url("/after"), &[]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "quick"));
}

/// ORIGIN_MAX_IDLE bounds the connections kept open between requests: after a burst of eight, two
/// stay and the others are closed; with 0, every request gets a connection of its own that is closed
/// after its response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_max_idle_bounds_the_kept_connections() {
    let origin = MockOrigin::start(|_| {
        Reply::ok("slow")
            .cc("no-store")
            .delay(Duration::from_millis(200))
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("ORIGIN_MAX_IDLE", "2")]).await;
    // The first answer (no-store) marks the URL for passing: the burst is not coalesced.
    assert_eq!(get(&proxy.url("/burst"), &[]).await.status, 200);
    for (response, _) in concurrent_gets(&proxy.url("/burst"), 8).await {
        assert_eq!(response.status, 200);
    }
    // Eight at once need eight connections (fewer only if one started after another had ended).
    assert!(
        origin.connections() > 2,
        "{} connections",
        origin.connections()
    );
    wait_until("all but two origin connections closed", || {
        origin.open_connections() == 2
    })
    .await;
    assert_eq!(proxy.stats().origin_idle_connections, 2);

    let origin = MockOrigin::fixed("each its own", "no-store").await;
    let proxy = TestProxy::start(&origin.url(), &[("ORIGIN_MAX_IDLE", "0")]).await;
    for _ in 0..3 {
        let r = get(&proxy.url("/alone"), &[]).await;
        assert_eq!(r.text(), "each its own");
    }
    assert_eq!(origin.connections(), 3);
    assert_eq!(proxy.stats().origin_idle_connections, 0);
    wait_until("every origin connection closed", || {
        origin.open_connections() == 0
    })
    .await;
}

/// An origin that answers `Connection: close` gets a new connection for every request, and a closed
/// connection is never handed out again.
#[tokio::test]
async fn connections_the_origin_closes_are_not_reused() {
    let origin = MockOrigin::start(|_| {
        Reply::ok("bye")
            .cc("no-store")
            .header("connection", "close")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    for _ in 0..3 {
        let r = get(&proxy.url("/closing"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "bye");
    }
    assert_eq!(origin.connections(), 3);
    assert_eq!(proxy.stats().origin_idle_connections, 0);
}

/// When the origin drops its idle keep-alive connections (its keep-alive timeout, a restart), the
/// pool notices and the next request opens a new connection instead of failing.
#[tokio::test]
async fn pooled_connections_the_origin_dropped_are_replaced() {
    let origin = MockOrigin::fixed("still here", "no-store").await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    assert_eq!(get(&proxy.url("/a"), &[]).await.status, 200);
    assert_eq!(proxy.stats().origin_idle_connections, 1);

    origin.drop_connections().await;
    wait_until("the pool to notice the closed connection", || {
        proxy.stats().origin_idle_connections == 0
    })
    .await;
    let r = get(&proxy.url("/b"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "still here");
    assert_eq!(origin.connections(), 2);
    assert_eq!(proxy.stats().origin_errors, 0);
}

/// A kept-alive connection idle for longer than `ORIGIN_IDLE_TIMEOUT` is closed by Strata, not
/// reused (origins and load balancers drop quiet connections; a request sent on one as it goes
/// fails), and the next request opens a new one.
#[tokio::test]
async fn origin_connections_idle_past_the_timeout_are_closed() {
    let origin = MockOrigin::fixed("still here", "no-store").await;
    let proxy = TestProxy::start(&origin.url(), &[("ORIGIN_IDLE_TIMEOUT", "300ms")]).await;
    let first_sent = Instant::now();
    assert_eq!(get(&proxy.url("/a"), &[]).await.status, 200);

    wait_until("the idle connection to expire", || {
        proxy.stats().origin_idle_connections == 0
    })
    .await;
    assert!(
        first_sent.elapsed() >= Duration::from_millis(300),
        "closed after {:?}, before ORIGIN_IDLE_TIMEOUT",
        first_sent.elapsed()
    );
    let r = get(&proxy.url("/b"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "still here");
    assert_eq!(origin.connections(), 2);
    assert_eq!(proxy.stats().origin_connections, 2);
    assert_eq!(proxy.stats().origin_errors, 0);
}

/// A response whose client left before its end leaves unread bytes on the origin connection: that
/// connection is closed, never pooled, and the next request gets a clean one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_read_origin_connection_is_closed_not_pooled() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let origin_gate = gate.clone();
    let origin = MockOrigin::start(move |r| match r.path.as_str() {
        "/long" => Reply::gated("first;", origin_gate.clone(), "rest").cc("no-store"),
        _ => Reply::ok("clean").cc("no-store"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /long HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("first;") {
        let n = within(
            "the first part of the body",
            CLIENT_TIMEOUT,
            client.read(&mut buf),
        )
        .await
        .unwrap();
        assert!(
            n > 0,
            "proxy closed early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    drop(client);
    wait_until("the half-read origin connection to close", || {
        origin.open_connections() == 0
    })
    .await;
    assert_eq!(proxy.stats().origin_idle_connections, 0);

    let r = get(&proxy.url("/next"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "clean");
    assert_eq!(origin.connections(), 2);
    gate.notify_waiters();
}

/// `OPTIONS *` asks about the server, not a path: it reaches the origin in asterisk-form, also when
/// ORIGIN_URL has a path prefix (which only applies to paths).
#[tokio::test]
async fn options_asterisk_reaches_the_origin_as_asterisk() {
    let origin = MockOrigin::start(|_| Reply::status(204, "")).await;
    let proxy = TestProxy::start(&format!("{}/app", origin.url()), &[]).await;

    let (answer, _closed) = raw_exchange(
        proxy.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let requests = origin.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].0, http::Method::OPTIONS);
    assert_eq!(requests[0].1.to_string(), "*");
}

/// CONNECT and TRACE never reach the origin: 405 with `Allow`. OPTIONS with `Max-Forwards: 0` is
/// answered by Strata as its final recipient; with a larger value it goes on, one lower
/// (RFC 9110 §7.6.2).
#[tokio::test]
async fn trace_is_refused_and_options_counts_max_forwards() {
    let origin = MockOrigin::start(|_| Reply::status(204, "")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let trace = request("TRACE", &proxy.url("/t"), &[], Bytes::new()).await;
    assert_eq!(trace.status, 405);
    let allow = trace.header("allow").unwrap_or_default();
    assert!(
        allow.contains("GET") && !allow.contains("TRACE"),
        "{allow:?}"
    );
    let (connect, _closed) = raw_exchange(
        proxy.addr,
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    let connect = String::from_utf8_lossy(&connect).to_ascii_lowercase();
    assert!(
        connect.starts_with("http/1.1 405") && connect.contains("\r\nallow: "),
        "{connect}"
    );

    let here = request(
        "OPTIONS",
        &proxy.url("/o"),
        &[("max-forwards", "0")],
        Bytes::new(),
    )
    .await;
    assert_eq!(here.status, 200);
    assert!(here.header("allow").is_some_and(|a| a.contains("OPTIONS")));
    assert_eq!(origin.total(), 0, "neither reached the origin");

    let on = request(
        "OPTIONS",
        &proxy.url("/o"),
        &[("max-forwards", "3")],
        Bytes::new(),
    )
    .await;
    assert_eq!(on.status, 204);
    assert_eq!(
        origin.last_header("/o", "max-forwards").as_deref(),
        Some("2")
    );
}

/// An origin may close a long-idle kept-alive connection just as a request goes out on it. A GET
/// without a body is idempotent and is sent once more on a new connection; a POST never is.
/// (The wait is the condition under test: only connections idle for 1 s or more are replayed.)
#[tokio::test]
async fn a_get_is_replayed_when_a_long_idle_connection_fails_under_it() {
    let origin = MockOrigin::start(|r| match r.hit {
        2 => Reply::fail(), // closes the kept-alive connection without an answer
        _ => Reply::ok("answer").cc("no-store"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    assert_eq!(get(&proxy.url("/get"), &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let r = get(&proxy.url("/get"), &[]).await;
    assert_eq!(r.status, 200, "the failed GET is sent again");
    assert_eq!(r.text(), "answer");
    assert_eq!(origin.hits("/get"), 3);
    assert_eq!(origin.connections(), 2);
}

#[tokio::test]
async fn a_post_is_never_replayed() {
    let origin = MockOrigin::start(|r| match r.hit {
        2 => Reply::fail(),
        _ => Reply::ok("created"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let r = request("POST", &proxy.url("/post"), &[], Bytes::from("one")).await;
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let r = request("POST", &proxy.url("/post"), &[], Bytes::from("two")).await;
    assert_eq!(r.status, 502, "a POST that went out is not sent twice");
    assert_eq!(origin.hits("/post"), 2);
}

/// An origin written by hand, for answers hyper would not send: `answer(path, n)` gives the raw
/// bytes of the n-th answer (0-based, over all connections), written after each request head (the
/// tests' requests carry no body). Connections stay open; counts connections and requests.
struct RawOrigin {
    addr: std::net::SocketAddr,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl RawOrigin {
    async fn start(answer: impl Fn(&str, usize) -> Vec<u8> + Send + Sync + 'static) -> RawOrigin {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (accepted, answered) = (connections.clone(), requests.clone());
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (answered, answer) = (answered.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("/");
                        let n = answered.fetch_add(1, Ordering::SeqCst);
                        if stream.write_all(&answer(path, n)).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RawOrigin {
            addr,
            connections,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A chunked answer that ends in trailers is complete at its trailers: it is stored (the trailers
/// are not) and served whole from the cache, passed through whole, and its origin connection goes
/// back to the pool, so every request here travels on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_answers_with_trailers_are_stored_passed_and_keep_their_connection() {
    // hyper as an origin sends trailers only to a client that asked with `TE: trailers`, which a
    // proxy does not forward (it is hop-by-hop): this one always sends them.
    let origin = RawOrigin::start(|path, _| {
        let cache_control = if path.starts_with("/cached") {
            "max-age=60"
        } else {
            "no-store"
        };
        format!(
            "HTTP/1.1 200 OK\r\ncache-control: {cache_control}\r\n\
             transfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
             5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc123\r\n\r\n"
        )
        .into_bytes()
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let idle_again = |proxy: &TestProxy| proxy.stats().origin_idle_connections == 1;

    let first = get(&proxy.url("/cached"), &[]).await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (200, "MISS"));
    assert_eq!(first.text(), "hello world");
    wait_until(
        "the connection back in the pool after a stored answer",
        || idle_again(&proxy),
    )
    .await;
    let hit = get(&proxy.url("/cached"), &[]).await;
    assert_eq!(hit.x_cache(), "HIT-L1");
    assert_eq!(hit.text(), "hello world");
    assert_eq!(hit.header("content-length"), Some("11"));
    assert!(
        hit.header("x-checksum").is_none(),
        "trailers are not stored"
    );

    for _ in 0..2 {
        let passed = get(&proxy.url("/passed"), &[]).await;
        assert_eq!(passed.status, 200);
        assert_eq!(passed.text(), "hello world");
        wait_until(
            "the connection back in the pool after a passed answer",
            || idle_again(&proxy),
        )
        .await;
    }
    assert_eq!(origin.requests(), 3);
    assert_eq!(origin.connections(), 1, "{:?}", proxy.stats());
    assert_eq!(proxy.stats().origin_connections, 1);
}

/// An origin answer with both `Transfer-Encoding: chunked` and a `Content-Length` is read as
/// chunked (RFC 9112 §6.3), and the length beside it goes: it would otherwise frame the client's
/// copy, cut to its 3 bytes, while the cache stored all 5. A transfer coding the client cannot be
/// told of is a 502, and that connection is not used again.
#[tokio::test]
async fn an_origin_answer_framed_twice_is_read_as_chunked_and_an_unknown_coding_is_a_502() {
    let origin = RawOrigin::start(|path, _| {
        let (cache_control, coding) = match path {
            "/cached" => ("max-age=60", "chunked"),
            "/passed" => ("no-store", "chunked"),
            _ => ("max-age=60", "gzip, chunked"),
        };
        format!(
            "HTTP/1.1 200 OK\r\ncache-control: {cache_control}\r\n\
             transfer-encoding: {coding}\r\ncontent-length: 3\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        )
        .into_bytes()
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    for (path, x_cache) in [
        ("/cached", "MISS"),
        ("/cached", "HIT-L1"),
        ("/passed", "MISS"),
    ] {
        let r = get(&proxy.url(path), &[]).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, x_cache), "{path}");
        assert_eq!(r.text(), "hello", "{path} {x_cache}");
        assert_ne!(r.header("content-length"), Some("3"), "{path} {x_cache}");
    }
    let before = origin.connections();
    let coded = get(&proxy.url("/coded"), &[]).await;
    assert_eq!(coded.status, 502, "{:?}", coded.headers);
    assert_eq!(proxy.stats().origin_errors, 1);
    assert_eq!(get(&proxy.url("/passed"), &[]).await.text(), "hello");
    assert_eq!(
        origin.connections(),
        before + 1,
        "the refused connection was closed"
    );
}

/// Only a connection that went away is the keep-alive race a replay is for: a malformed answer on
/// a long-idle connection is the origin's answer, and the GET is not sent twice.
/// (The wait is the condition under test, as above.)
#[tokio::test]
async fn a_malformed_answer_on_a_long_idle_connection_is_not_replayed() {
    let origin = RawOrigin::start(|_, n| {
        let answer: &[u8] = if n == 0 {
            b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 2\r\n\r\nok"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: many\r\n\r\n"
        };
        answer.to_vec()
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    assert_eq!(get(&proxy.url("/get"), &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let r = get(&proxy.url("/get"), &[]).await;
    assert_eq!(r.status, 502, "{:?}", r.headers);
    assert_eq!(origin.requests(), 2, "sent once, not replayed");
}

/// ORIGIN_TIMEOUT counts from the request body's last chunk: an upload that takes longer than it,
/// chunk by chunk, reaches the origin and gets its answer; one that stalls longer than it gets 504.
/// (The client's pauses are what is under test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_an_origin_timeout_but_a_stalled_one_is() {
    let origin = MockOrigin::start(|_| Reply::echo()).await;
    let proxy = TestProxy::start(&origin.url(), &[("ORIGIN_TIMEOUT", "1s")]).await;

    let (tx, body) = chan_body();
    let url = proxy.url("/upload");
    let call = tokio::spawn(async move { request_body("POST", &url, &[], body).await });
    let started = Instant::now();
    for n in 0..4u8 {
        tx.send(Bytes::from(vec![b'a' + n; 1024])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    drop(tx);
    let r = within("the slow upload", secs(10), call).await.unwrap();
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "the upload outlasted ORIGIN_TIMEOUT"
    );
    assert_eq!(r.status, 200, "{:?}", r.headers);
    assert_eq!(r.body.len(), 4 * 1024);

    let (tx, body) = chan_body();
    let url = proxy.url("/upload");
    let call = tokio::spawn(async move { request_body("POST", &url, &[], body).await });
    tx.send(Bytes::from_static(b"first chunk, then nothing"))
        .await
        .unwrap();
    let r = within("the stalled upload", secs(10), call).await.unwrap();
    assert_eq!(r.status, 504, "{:?}", r.headers);
    drop(tx);
}
