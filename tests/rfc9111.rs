//! RFC 9111 caching rules: what is stored, freshness, Age, Vary, request directives, validation and
//! invalidation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use support::*;

#[tokio::test]
async fn miss_then_hit_l1() {
    let origin = MockOrigin::fixed("cached body", "max-age=60").await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let first = get(&proxy.url("/a"), &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "cached body");
    assert_eq!(first.x_cache(), "MISS");
    let cs = first.cache_status();
    assert!(cs.starts_with("strata; "), "Cache-Status: {cs:?}");
    assert!(cs.contains("fwd=uri-miss"), "Cache-Status: {cs:?}");
    assert!(cs.contains("stored"), "Cache-Status: {cs:?}");

    let second = get(&proxy.url("/a"), &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.text(), "cached body");
    assert_eq!(second.x_cache(), "HIT-L1");
    let cs = second.cache_status();
    assert!(cs.starts_with("strata; "), "Cache-Status: {cs:?}");
    assert!(cs.contains("hit"), "Cache-Status: {cs:?}");
    assert!(second.age() <= 1, "Age {}", second.age());
    assert_eq!(origin.hits("/a"), 1);

    // The query string is part of the key.
    let third = get(&proxy.url("/a?x=1"), &[]).await;
    assert_eq!(third.x_cache(), "MISS");
    assert_eq!(origin.hits("/a"), 2);

    let stats = proxy.stats();
    assert!(stats.l1_hits >= 1, "{stats:?}");
    assert!(stats.hits >= 1, "{stats:?}");
    assert!(stats.misses >= 2, "{stats:?}");
    assert!(stats.l1_entries >= 2, "{stats:?}");
}

async fn assert_not_stored(
    proxy: &TestProxy,
    origin: &MockOrigin,
    path: &str,
    headers: &[(&str, &str)],
) {
    let before = origin.hits(path);
    for i in 1..=2 {
        let resp = get(&proxy.url(path), headers).await;
        assert_eq!(resp.status, 200, "{path}");
        assert_eq!(resp.x_cache(), "MISS", "{path} request {i}");
        assert!(
            !resp.cache_status().contains("stored"),
            "{path}: Cache-Status {:?}",
            resp.cache_status()
        );
    }
    assert_eq!(
        origin.hits(path),
        before + 2,
        "{path} should reach the origin twice"
    );
}

async fn assert_stored(
    proxy: &TestProxy,
    origin: &MockOrigin,
    path: &str,
    headers: &[(&str, &str)],
) {
    let before = origin.hits(path);
    let first = get(&proxy.url(path), headers).await;
    assert_eq!(first.status, 200, "{path}");
    assert_eq!(first.x_cache(), "MISS", "{path}");
    let second = get(&proxy.url(path), headers).await;
    assert_eq!(second.status, 200, "{path}");
    assert_eq!(second.x_cache(), "HIT-L1", "{path}");
    assert_eq!(second.body, first.body, "{path}");
    assert_eq!(
        origin.hits(path),
        before + 1,
        "{path} should reach the origin once"
    );
}

#[tokio::test]
async fn no_store_private_and_set_cookie_are_not_stored() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        "/no-store" => Reply::ok("x").cc("max-age=60, no-store"),
        "/private" => Reply::ok("x").cc("private, max-age=60"),
        // Directive names are case-insensitive (RFC 9111 §5.2).
        "/Private" => Reply::ok("x").cc("Private, max-age=60"),
        "/NO-STORE" => Reply::ok("x").cc("NO-STORE, max-age=60"),
        "/cookie" => Reply::ok("x").cc("max-age=60").header("set-cookie", "id=1"),
        "/cookie-public" => Reply::ok("x")
            .cc("public, max-age=60")
            .header("set-cookie", "id=1"),
        _ => Reply::status(404, "no"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    assert_not_stored(&proxy, &origin, "/no-store", &[]).await;
    assert_not_stored(&proxy, &origin, "/private", &[]).await;
    assert_not_stored(&proxy, &origin, "/Private", &[]).await;
    assert_not_stored(&proxy, &origin, "/NO-STORE", &[]).await;
    assert_not_stored(&proxy, &origin, "/cookie", &[]).await;
    assert_stored(&proxy, &origin, "/cookie-public", &[]).await;
}

#[tokio::test]
async fn authorization_requires_public_or_s_maxage() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        "/auth" => Reply::ok("secret").cc("max-age=60"),
        "/auth-public" => Reply::ok("shared").cc("public, max-age=60"),
        "/auth-smaxage" => Reply::ok("shared").cc("s-maxage=60"),
        // Two max-age lines (an application's and a front server's) say nothing about sharing.
        "/auth-twice" => Reply::ok("secret").cc("max-age=600").cc("max-age=300"),
        _ => Reply::status(404, "no"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let auth = [("authorization", "Bearer token")];
    assert_not_stored(&proxy, &origin, "/auth", &auth).await;
    assert_not_stored(&proxy, &origin, "/auth-twice", &auth).await;
    assert_stored(&proxy, &origin, "/auth-public", &auth).await;
    assert_stored(&proxy, &origin, "/auth-smaxage", &auth).await;
}

#[tokio::test]
async fn no_freshness_and_no_validator_is_not_stored() {
    let origin = MockOrigin::start(|_| Reply::ok("plain")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    assert_not_stored(&proxy, &origin, "/plain", &[]).await;
}

#[tokio::test]
async fn cache_max_age_gives_a_fallback_lifetime() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        "/no-store" => Reply::ok("x").cc("no-store"),
        _ => Reply::ok("plain"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_MAX_AGE", "60s")]).await;
    assert_stored(&proxy, &origin, "/plain", &[]).await;
    proxy.advance(secs(30));
    assert_eq!(get(&proxy.url("/plain"), &[]).await.x_cache(), "HIT-L1");
    proxy.advance(secs(40));
    assert_eq!(get(&proxy.url("/plain"), &[]).await.x_cache(), "MISS");
    assert_eq!(origin.hits("/plain"), 2);
    // The fallback never overrides an explicit no-store.
    assert_not_stored(&proxy, &origin, "/no-store", &[]).await;
}

#[tokio::test]
async fn s_maxage_beats_max_age_beats_expires() {
    let origin = MockOrigin::start(|r| {
        let now = SystemTime::now();
        let date = http_date(now);
        match r.path.as_str() {
            "/smaxage" => Reply::ok("s").cc("max-age=10, s-maxage=100"),
            "/maxage" => Reply::ok("m")
                .cc("max-age=100")
                .header("date", &date)
                .header("expires", &http_date(now + secs(10))),
            "/expires" => Reply::ok("e")
                .header("date", &date)
                .header("expires", &http_date(now + secs(100))),
            _ => Reply::status(404, "no"),
        }
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    for path in ["/smaxage", "/maxage", "/expires"] {
        assert_eq!(get(&proxy.url(path), &[]).await.x_cache(), "MISS", "{path}");
    }
    proxy.advance(secs(50));
    for path in ["/smaxage", "/maxage", "/expires"] {
        let resp = get(&proxy.url(path), &[]).await;
        assert_eq!(resp.x_cache(), "HIT-L1", "{path} at age 50 should be fresh");
        assert_eq!(origin.hits(path), 1, "{path}");
    }
    proxy.advance(secs(60));
    for path in ["/smaxage", "/maxage", "/expires"] {
        let resp = get(&proxy.url(path), &[]).await;
        assert_eq!(resp.x_cache(), "MISS", "{path} at age 110 should be stale");
        assert_eq!(origin.hits(path), 2, "{path}");
    }
}

#[tokio::test]
async fn age_header_grows_with_the_clock() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        "/age-in" => Reply::ok("aged").cc("max-age=100").header("age", "10"),
        _ => Reply::ok("young").cc("max-age=100"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    assert_eq!(get(&proxy.url("/age"), &[]).await.x_cache(), "MISS");
    let hit = get(&proxy.url("/age"), &[]).await;
    assert_eq!(hit.x_cache(), "HIT-L1");
    assert!(hit.age() <= 1, "Age {}", hit.age());
    proxy.advance(secs(30));
    let hit = get(&proxy.url("/age"), &[]).await;
    assert_eq!(hit.x_cache(), "HIT-L1");
    assert!((30..=31).contains(&hit.age()), "Age {}", hit.age());
    proxy.advance(secs(30));
    let hit = get(&proxy.url("/age"), &[]).await;
    assert!((60..=61).contains(&hit.age()), "Age {}", hit.age());

    // An Age received from the origin counts toward the entry's age.
    assert_eq!(get(&proxy.url("/age-in"), &[]).await.x_cache(), "MISS");
    let hit = get(&proxy.url("/age-in"), &[]).await;
    assert_eq!(hit.x_cache(), "HIT-L1");
    assert!((10..=11).contains(&hit.age()), "Age {}", hit.age());
    proxy.advance(secs(95));
    let resp = get(&proxy.url("/age-in"), &[]).await;
    assert_eq!(resp.x_cache(), "MISS", "age 105 > max-age 100");
    assert_eq!(origin.hits("/age-in"), 2);
}

#[tokio::test]
async fn vary_variants_are_stored_side_by_side() {
    let origin = MockOrigin::start(|r| {
        let ae = r.header("accept-encoding").unwrap_or("none").to_string();
        match r.path.as_str() {
            "/vary-star" => Reply::ok("star").cc("max-age=60").header("vary", "*"),
            _ => Reply::ok(format!("body-{ae}"))
                .cc("max-age=60")
                .header("vary", "Accept-Encoding"),
        }
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/vary");
    let gzip = [("accept-encoding", "gzip")];
    let identity = [("accept-encoding", "identity")];

    let r = get(&url, &gzip).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "body-gzip"));
    let r = get(&url, &identity).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "body-identity"));
    let r = get(&url, &gzip).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT-L1", "body-gzip"));
    let r = get(&url, &identity).await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT-L1", "body-identity")
    );
    assert_eq!(origin.hits("/vary"), 2);

    assert_not_stored(&proxy, &origin, "/vary-star", &[]).await;
}

/// Under `Vary: Cookie`, a signed-in user's `private` answer is not stored, and it does not hide
/// the stored anonymous variant either (the URL used to be marked "pass" for 10 s, replacing the
/// record through which its variants are found).
#[tokio::test]
async fn an_uncacheable_variant_leaves_the_stored_ones_reachable() {
    let origin = MockOrigin::varying_on_cookie().await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/home");
    let signed_in = [("cookie", "session=42")];

    assert_eq!(get(&url, &[]).await.x_cache(), "MISS");
    for round in 0..2 {
        let r = get(&url, &signed_in).await;
        assert_eq!(
            (r.x_cache(), r.text().as_str()),
            ("MISS", "yours"),
            "round {round}"
        );
        let r = get(&url, &[]).await;
        assert_eq!(
            (r.x_cache(), r.text().as_str()),
            ("HIT-L1", "everyone's"),
            "round {round}"
        );
    }
    assert_eq!(
        origin.hits("/home"),
        3,
        "one anonymous fill, two signed-in requests"
    );
}

/// An origin whose answers carry `Vary: vary` and name the `Accept-Encoding` lines it received.
async fn encoding_echo_origin(vary: &'static str) -> MockOrigin {
    MockOrigin::start(move |r| {
        let ae: Vec<&str> = r
            .headers
            .get_all("accept-encoding")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        Reply::ok(format!("body-{}", ae.join("|")))
            .cc("max-age=60")
            .header("vary", vary)
    })
    .await
}

/// `NORMALIZE_ACCEPT_ENCODING` (on by default): coding lists collapse to the set of br, gzip and zstd
/// the client accepts; the origin is asked with that class, and one variant serves the whole class.
#[tokio::test]
async fn accept_encoding_classes_share_variants() {
    let origin = encoding_echo_origin("Accept-Encoding").await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/classes");
    let expect = |r: &Resp, x_cache: &str, body: &str| {
        assert_eq!((r.x_cache(), r.text().as_str()), (x_cache, body));
    };

    // Chrome's list, then another spelling of the same class.
    let chrome = get(&url, &[("accept-encoding", "gzip, deflate, br, zstd")]).await;
    expect(&chrome, "MISS", "body-br, gzip, zstd");
    let same = [("accept-encoding", "zstd;q=1.0, br, gzip;q=0.9, deflate")];
    expect(&get(&url, &same).await, "HIT-L1", "body-br, gzip, zstd");
    // Safari's list is another class; a shorter spelling of it shares its variant.
    let safari = get(&url, &[("accept-encoding", "gzip, deflate, br")]).await;
    expect(&safari, "MISS", "body-br, gzip");
    expect(
        &get(&url, &[("accept-encoding", "BR,gzip")]).await,
        "HIT-L1",
        "body-br, gzip",
    );
    // Nothing the origin could compress with, or gzip refused: identity.
    let deflate = get(&url, &[("accept-encoding", "deflate")]).await;
    expect(&deflate, "MISS", "body-identity");
    let refused = [("accept-encoding", "gzip;q=0")];
    expect(&get(&url, &refused).await, "HIT-L1", "body-identity");
    // A client refusing identity goes to the origin as it spoke; no field at all stays absent.
    let strict = get(&url, &[("accept-encoding", "br, identity;q=0")]).await;
    expect(&strict, "MISS", "body-br, identity;q=0");
    expect(&get(&url, &[]).await, "MISS", "body-");
    assert_eq!(origin.hits("/classes"), 5);
}

#[tokio::test]
async fn accept_encoding_reaches_the_origin_as_sent_when_normalization_is_off() {
    let origin = encoding_echo_origin("Accept-Encoding").await;
    let proxy = TestProxy::start(&origin.url(), &[("NORMALIZE_ACCEPT_ENCODING", "off")]).await;
    let url = proxy.url("/as-sent");

    let r = get(&url, &[("accept-encoding", "gzip, deflate, br")]).await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("MISS", "body-gzip, deflate, br")
    );
    // RFC 9111 matching still applies: same codings in another order.
    let r = get(&url, &[("accept-encoding", "br, deflate, gzip")]).await;
    assert_eq!(r.x_cache(), "HIT-L1");
    // Without classes, a list without deflate is another variant.
    let r = get(&url, &[("accept-encoding", "gzip, br")]).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "body-gzip, br"));
    assert_eq!(origin.hits("/as-sent"), 2);
}

/// RFC 9111 §4.1: selecting fields match across whitespace, field-line splitting and normalizations
/// that keep their meaning (case and order of `Accept-Encoding` codings); a different set of codings,
/// or an absent field against an empty one, is another variant.
#[tokio::test]
async fn vary_matches_selecting_fields_as_normalized() {
    let origin = encoding_echo_origin("Accept-Encoding, Accept-Language").await;
    // RFC matching alone: the classes of NORMALIZE_ACCEPT_ENCODING would merge more (tested above).
    let proxy = TestProxy::start(&origin.url(), &[("NORMALIZE_ACCEPT_ENCODING", "false")]).await;
    let url = proxy.url("/vary-normal");

    let first = [
        ("accept-encoding", "gzip, br"),
        ("accept-language", "en-GB, fr;q=0.5"),
    ];
    let r = get(&url, &first).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "body-gzip, br"));
    let same_meaning: [&[(&str, &str)]; 3] = [
        &[
            ("accept-encoding", "br,GZIP"),
            ("accept-language", "en-gb,fr; q=0.5"),
        ],
        &[
            ("accept-encoding", "gzip"),
            ("accept-encoding", " br"),
            ("accept-language", "en-GB, fr;q=0.5"),
        ],
        &[
            ("accept-encoding", "gzip,,br"),
            ("accept-language", "EN-gb , fr;q=0.5"),
        ],
    ];
    for headers in same_meaning {
        let r = get(&url, headers).await;
        assert_eq!(
            (r.x_cache(), r.text().as_str()),
            ("HIT-L1", "body-gzip, br"),
            "{headers:?}"
        );
    }
    assert_eq!(origin.hits("/vary-normal"), 1);

    let other_variants: [&[(&str, &str)]; 4] = [
        // Another set of codings.
        &[
            ("accept-encoding", "gzip, br, zstd"),
            ("accept-language", "en-GB, fr;q=0.5"),
        ],
        // Language order may be a preference: kept.
        &[
            ("accept-encoding", "gzip, br"),
            ("accept-language", "fr;q=0.5, en-GB"),
        ],
        // No Accept-Encoding at all, then an empty one (identity only): two more variants.
        &[("accept-language", "en-GB, fr;q=0.5")],
        &[
            ("accept-encoding", ""),
            ("accept-language", "en-GB, fr;q=0.5"),
        ],
    ];
    for (n, headers) in other_variants.into_iter().enumerate() {
        let r = get(&url, headers).await;
        assert_eq!(r.x_cache(), "MISS", "{headers:?}");
        assert_eq!(origin.hits("/vary-normal"), n + 2);
        let r = get(&url, headers).await;
        assert_eq!(
            r.x_cache(),
            "HIT-L1",
            "{headers:?} stored as its own variant"
        );
    }
}

/// RFC 9110 §14: a stored 200 answers a single byte range with 206 (the bytes shared, not fetched
/// again), a range past the end with 416, and everything it may ignore with the full 200.
#[tokio::test]
async fn byte_ranges_are_answered_from_a_stored_response() {
    let body = pattern(1000);
    let origin = {
        let body = body.clone();
        MockOrigin::start(move |_| {
            Reply::ok(body.clone())
                .cc("max-age=60")
                .header("etag", "\"v1\"")
        })
        .await
    };
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/ranged");
    assert_eq!(get(&url, &[]).await.x_cache(), "MISS");

    for (range, first, last) in [
        ("bytes=0-99", 0, 99),
        ("bytes=-10", 990, 999),
        ("bytes=900-", 900, 999),
        ("bytes=995-5000", 995, 999),
    ] {
        let r = get(&url, &[("range", range)]).await;
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(r.x_cache(), "HIT-L1", "{range}");
        let expected_range = format!("bytes {first}-{last}/1000");
        assert_eq!(r.header("content-range"), Some(expected_range.as_str()));
        let expected_len = (last - first + 1).to_string();
        assert_eq!(r.header("content-length"), Some(expected_len.as_str()));
        assert!(r.body == body.slice(first..=last), "{range}: wrong bytes");
    }

    let r = get(&url, &[("range", "bytes=1000-")]).await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */1000"));
    assert!(r.body.is_empty());

    // If-Range with the stored strong tag: the part; with another tag: everything.
    let r = get(&url, &[("range", "bytes=0-9"), ("if-range", "\"v1\"")]).await;
    assert_eq!((r.status.as_u16(), r.body.len()), (206, 10));
    let full: [&[(&str, &str)]; 3] = [
        &[("range", "bytes=0-9"), ("if-range", "\"v0\"")],
        &[("range", "bytes=0-1, 5-6")],
        &[("range", "lines=1-2")],
    ];
    for headers in full {
        let r = get(&url, headers).await;
        assert_eq!(r.status, 200, "{headers:?}");
        assert!(r.body == body, "{headers:?}: the whole body");
        assert_eq!(r.header("content-range"), None);
    }
    // HEAD ignores Range.
    let r = request("HEAD", &url, &[("range", "bytes=0-9")], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1000"));
    assert_eq!(origin.hits("/ranged"), 1);
}

/// A range of something not stored yet fills the cache like a GET (the origin is asked for all of
/// it) and is cut from the fill's stream; later ranges are hits.
#[tokio::test]
async fn a_range_on_a_miss_fills_the_cache_and_gets_its_part() {
    let body = pattern(100_000);
    let origin = {
        let body = body.clone();
        MockOrigin::start(move |_| {
            Reply::chunks(
                body.chunks(7_000).map(Bytes::copy_from_slice).collect(),
                Duration::ZERO,
            )
            .header("content-length", "100000")
            .cc("max-age=60")
        })
        .await
    };
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let r = get(&proxy.url("/video"), &[("range", "bytes=10000-29999")]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (206, "MISS"));
    assert_eq!(r.header("content-range"), Some("bytes 10000-29999/100000"));
    assert_eq!(r.header("content-length"), Some("20000"));
    assert!(r.body == body.slice(10_000..30_000), "wrong bytes");
    assert_eq!(
        origin.last_header("/video", "range"),
        None,
        "the fill asks for the whole body"
    );

    let r = get(&proxy.url("/video"), &[("range", "bytes=-5")]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (206, "HIT-L1"));
    assert!(r.body == body.slice(99_995..));
    assert_eq!(origin.hits("/video"), 1);

    // Past the end on a miss: 416, and the body is stored all the same.
    let r = get(&proxy.url("/video2"), &[("range", "bytes=100000-")]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (416, "MISS"));
    assert_eq!(r.header("content-range"), Some("bytes */100000"));
    assert_eq!(r.header("via"), Some("1.1 strata"));
    assert!(r.body.is_empty());
    let r = get(&proxy.url("/video2"), &[]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (200, "HIT-L1"));
    assert!(r.body == body);
    assert_eq!(origin.hits("/video2"), 1);
}

/// What will not be stored, and `If-Range` on a miss, go to the origin with the client's `Range`.
#[tokio::test]
async fn ranges_of_what_is_not_stored_reach_the_origin() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        "/private" => Reply::ok(pattern(1000)).cc("no-store"),
        "/big" => Reply::ok(pattern(2 * 1024 * 1024)).cc("max-age=60"),
        _ => Reply::ok(pattern(1000))
            .cc("max-age=60")
            .header("etag", "\"v1\""),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_MAX_OBJECT_MB", "1")]).await;
    for path in ["/private", "/big"] {
        let r = get(&proxy.url(path), &[("range", "bytes=0-9")]).await;
        assert_eq!(r.status, 200, "{path}: this origin ignores Range");
        assert_eq!(
            origin.last_header(path, "range").as_deref(),
            Some("bytes=0-9"),
            "{path}: asked again with the client's Range"
        );
        assert_eq!(origin.hits(path), 2, "{path}: the whole, then the range");
        // The URL is passed now: the next range goes to the origin at once.
        get(&proxy.url(path), &[("range", "bytes=10-19")]).await;
        assert_eq!(
            origin.hits(path),
            3,
            "{path}: one request for the next range"
        );
    }
    // Preconditions and credentials: the origin judges them, so the request goes as it is.
    for (n, precondition) in [
        ("if-range", "\"v1\""),
        ("if-match", "\"v1\""),
        ("if-unmodified-since", "Tue, 24 Nov 2026 10:00:00 GMT"),
        ("authorization", "Bearer t"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = format!("/tagged-{n}");
        let r = get(&proxy.url(&path), &[("range", "bytes=0-9"), precondition]).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            origin.last_header(&path, precondition.0).as_deref(),
            Some(precondition.1)
        );
        assert_eq!(
            origin.last_header(&path, "range").as_deref(),
            Some("bytes=0-9")
        );
        assert_eq!(origin.hits(&path), 1, "{path}: no fill first");
    }
}

/// On a hit, `If-Match` and `If-Unmodified-Since` are judged against the stored response as the
/// origin would judge them: a client resuming a download of another version gets 412, never bytes
/// of this one to stitch onto its own.
#[tokio::test]
async fn preconditions_on_a_hit_are_judged_against_the_stored_response() {
    let origin = MockOrigin::start(|_| {
        Reply::ok("0123456789")
            .cc("max-age=60")
            .header("etag", "\"v2\"")
            .header("last-modified", "Tue, 24 Nov 2026 10:00:00 GMT")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/download");
    assert_eq!(get(&url, &[]).await.x_cache(), "MISS");

    let range = ("range", "bytes=0-3");
    for failing in [
        ("if-match", "\"v1\""),
        ("if-match", "W/\"v2\""),
        ("if-unmodified-since", "Mon, 23 Nov 2026 10:00:00 GMT"),
    ] {
        let r = get(&url, &[range, failing]).await;
        assert_eq!(
            (r.status.as_u16(), r.x_cache()),
            (412, "HIT-L1"),
            "{failing:?}"
        );
        assert!(r.body.is_empty(), "{failing:?}");
        let r = get(&url, &[failing]).await;
        assert_eq!(r.status.as_u16(), 412, "{failing:?} without Range");
    }
    for holding in [
        ("if-match", "\"v2\""),
        ("if-match", "*"),
        ("if-unmodified-since", "Tue, 24 Nov 2026 10:00:00 GMT"),
    ] {
        let r = get(&url, &[range, holding]).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (206, "0123"),
            "{holding:?}"
        );
    }
    assert_eq!(origin.hits("/download"), 1);
}

/// With nothing to store into, a range fetches no whole body: it goes to the origin as it is.
#[tokio::test]
async fn without_a_cache_ranges_go_to_the_origin() {
    let origin = MockOrigin::start(|_| Reply::ok(pattern(1000)).cc("max-age=60")).await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_SIZE_MB", "0")]).await;
    get(&proxy.url("/r"), &[("range", "bytes=0-9")]).await;
    assert_eq!(
        origin.last_header("/r", "range").as_deref(),
        Some("bytes=0-9")
    );
    assert_eq!(origin.hits("/r"), 1);
}

/// A stale copy answers a range at once; the background refresh asks for the whole body.
#[tokio::test]
async fn a_refresh_behind_a_stale_range_fetches_the_whole_body() {
    let origin =
        MockOrigin::start(|_| Reply::ok(pattern(1000)).cc("max-age=1, stale-while-revalidate=60"))
            .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    assert_eq!(get(&proxy.url("/swr"), &[]).await.x_cache(), "MISS");
    proxy.advance(Duration::from_secs(5));
    let r = get(&proxy.url("/swr"), &[("range", "bytes=0-9")]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (206, "STALE"));
    assert!(r.body == pattern(1000).slice(0..10));
    origin.wait_hits("/swr", 2).await;
    assert_eq!(origin.last_header("/swr", "range"), None);
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    let origin = MockOrigin::start(|_| Reply::ok(pattern(1234)).cc("max-age=60")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let get_resp = get(&proxy.url("/head"), &[]).await;
    assert_eq!(get_resp.x_cache(), "MISS");
    assert_eq!(get_resp.body.len(), 1234);

    let head = request("HEAD", &proxy.url("/head"), &[], "").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.x_cache(), "HIT-L1");
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("1234"));
    assert_eq!(origin.hits("/head"), 1);
}

#[tokio::test]
async fn request_no_cache_goes_to_the_origin() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        "/nc-etag" => Reply::ok("tagged")
            .cc("max-age=60")
            .header("etag", "\"t1\"")
            .conditional(),
        _ => Reply::ok(format!("plain-{}", r.hit)).cc("max-age=60"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let no_cache = [("cache-control", "no-cache")];

    assert_eq!(get(&proxy.url("/nc"), &[]).await.text(), "plain-1");
    let r = get(&proxy.url("/nc"), &no_cache).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "plain-2");
    assert_eq!(origin.hits("/nc"), 2);

    // With a validator stored, the request is revalidated.
    assert_eq!(get(&proxy.url("/nc-etag"), &[]).await.x_cache(), "MISS");
    let r = get(&proxy.url("/nc-etag"), &no_cache).await;
    assert_eq!(origin.hits("/nc-etag"), 2);
    assert_eq!(
        origin.last_header("/nc-etag", "if-none-match").as_deref(),
        Some("\"t1\"")
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "tagged");
    assert_eq!(r.x_cache(), "REVALIDATED");
    assert!(
        r.cache_status().contains("fwd-status=304"),
        "{:?}",
        r.cache_status()
    );
}

#[tokio::test]
async fn request_max_age_and_min_fresh() {
    let origin = MockOrigin::start(|r| Reply::ok(format!("v{}", r.hit)).cc("max-age=100")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/rq");

    assert_eq!(get(&url, &[]).await.text(), "v1");
    proxy.advance(secs(30));
    // Age 30, 70 s of freshness left.
    let r = get(&url, &[("cache-control", "max-age=60")]).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT-L1", "v1"));
    let r = get(&url, &[("cache-control", "min-fresh=10")]).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT-L1", "v1"));
    assert_eq!(origin.hits("/rq"), 1);

    let r = get(&url, &[("cache-control", "min-fresh=80")]).await;
    assert_eq!(
        r.text(),
        "v2",
        "min-fresh=80 with 70 s left must go to the origin"
    );
    assert_eq!(origin.hits("/rq"), 2);

    proxy.advance(secs(30));
    let r = get(&url, &[("cache-control", "max-age=10")]).await;
    assert_eq!(r.text(), "v3", "max-age=10 at age 30 must go to the origin");
    assert_eq!(origin.hits("/rq"), 3);
}

#[tokio::test]
async fn request_max_stale() {
    let origin = MockOrigin::start(|r| Reply::ok(format!("v{}", r.hit)).cc("max-age=10")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/stale-ok");

    assert_eq!(get(&url, &[]).await.text(), "v1");
    proxy.advance(secs(30)); // stale by 20 s
    let r = get(&url, &[("cache-control", "max-stale=60")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "v1");
    assert!(
        r.x_cache() == "STALE" || r.x_cache() == "HIT-L1",
        "X-Cache {:?}",
        r.x_cache()
    );
    assert_eq!(origin.hits("/stale-ok"), 1);

    let r = get(&url, &[("cache-control", "max-stale=5")]).await;
    assert_eq!(r.text(), "v2");
    assert_eq!(origin.hits("/stale-ok"), 2);
}

#[tokio::test]
async fn only_if_cached() {
    let origin = MockOrigin::fixed("here", "max-age=60").await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let oic = [("cache-control", "only-if-cached")];

    let r = get(&proxy.url("/absent"), &oic).await;
    assert_eq!(r.status, 504);
    assert_eq!(
        origin.total(),
        0,
        "only-if-cached must not reach the origin"
    );

    get(&proxy.url("/present"), &[]).await;
    let r = get(&proxy.url("/present"), &oic).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "HIT-L1");
    assert_eq!(r.text(), "here");
    assert_eq!(origin.total(), 1);
}

#[tokio::test]
async fn stale_entry_revalidated_with_etag() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        "/changed" => Reply::ok(format!("content-{}", r.hit))
            .cc("max-age=10")
            .header("etag", &format!("\"c{}\"", r.hit))
            .conditional(),
        _ => Reply::ok("etag-body")
            .cc("max-age=10")
            .header("etag", "\"v1\"")
            .conditional(),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/etag");

    assert_eq!(get(&url, &[]).await.x_cache(), "MISS");
    assert_eq!(get(&proxy.url("/changed"), &[]).await.text(), "content-1");
    proxy.advance(secs(20));

    let r = get(&url, &[]).await;
    assert_eq!(origin.hits("/etag"), 2);
    assert_eq!(
        origin.last_header("/etag", "if-none-match").as_deref(),
        Some("\"v1\"")
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "etag-body");
    assert_eq!(r.x_cache(), "REVALIDATED");
    let cs = r.cache_status();
    assert!(cs.starts_with("strata; "), "Cache-Status {cs:?}");
    assert!(cs.contains("fwd-status=304"), "Cache-Status {cs:?}");

    // The 304 renewed the entry's freshness.
    let r = get(&url, &[]).await;
    assert_eq!(r.x_cache(), "HIT-L1");
    assert_eq!(r.text(), "etag-body");
    assert_eq!(origin.hits("/etag"), 2);

    // A stale entry answered with new content is a MISS carrying the new body, then a HIT.
    let r = get(&proxy.url("/changed"), &[]).await;
    assert_eq!(
        origin.last_header("/changed", "if-none-match").as_deref(),
        Some("\"c1\"")
    );
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "content-2"));
    let r = get(&proxy.url("/changed"), &[]).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT-L1", "content-2"));
}

/// The origin confirms a stale copy with a 304 whose fields differ from the stored ones: second
/// and later answers say `max-age=100` and `X-Refreshed`, and for `/turned-private` also `private`.
async fn refreshing_origin() -> MockOrigin {
    MockOrigin::start(|r| {
        let reply = Reply::ok("stored body")
            .header("etag", "\"v1\"")
            .conditional();
        match (r.hit, r.path.as_str()) {
            (1, _) => reply.cc("max-age=10"),
            (_, "/turned-private") => reply
                .cc("private, max-age=100")
                .header("x-refreshed", "yes"),
            // Hop-by-hop fields of the 304 describe the origin's connection, not the answer.
            _ => reply
                .cc("max-age=100")
                .header("x-refreshed", "yes")
                .header("connection", "x-hop")
                .header("x-hop", "origin only"),
        }
    })
    .await
}

/// Stores `path` from [`refreshing_origin`], lets it go stale, and asks for it again with
/// `headers`: the origin confirms it with a 304. Returns the answer (and what must outlive it).
async fn confirmed_by_a_304(path: &str, headers: &[(&str, &str)]) -> (MockOrigin, TestProxy, Resp) {
    let origin = refreshing_origin().await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url(path);
    assert_eq!(get(&url, &[]).await.x_cache(), "MISS");
    proxy.advance(secs(20));

    let r = get(&url, headers).await;
    assert_eq!(origin.hits(path), 2);
    assert_eq!(
        (r.status.as_u16(), r.x_cache()),
        (200, "REVALIDATED"),
        "{path}"
    );
    assert_eq!(r.text(), "stored body");
    (origin, proxy, r)
}

#[tokio::test]
async fn a_304_answered_to_a_request_that_stores_nothing_updates_the_answer() {
    // RFC 9111 §4.3.4: the fields of a 304 replace the stored ones. A request with no-store
    // revalidates the stale copy without storing: its answer still carries the 304's fields and
    // the 304's age, not the stale copy's Cache-Control and Age.
    let (_origin, _proxy, r) =
        confirmed_by_a_304("/confirmed", &[("cache-control", "no-store")]).await;
    assert_eq!(r.header("cache-control"), Some("max-age=100"));
    assert_eq!(r.header("x-refreshed"), Some("yes"));
    assert_eq!(r.header("age"), Some("0"));
    assert_eq!(r.header("x-hop"), None, "a hop-by-hop field of the 304");
}

#[tokio::test]
async fn a_304_that_forbids_storing_still_updates_the_answer() {
    // The 304 makes the response private: the copy is not stored again, and the answer is
    // private too (a downstream cache must not keep it).
    let (_origin, proxy, r) = confirmed_by_a_304("/turned-private", &[]).await;
    assert_eq!(r.header("cache-control"), Some("private, max-age=100"));
    assert_eq!(r.header("x-refreshed"), Some("yes"));
    let r = get(&proxy.url("/turned-private"), &[]).await;
    assert_eq!(r.x_cache(), "MISS", "not stored again");
}

#[tokio::test]
async fn stale_entry_revalidated_with_last_modified() {
    let last_modified = http_date(SystemTime::now() - secs(3600));
    let lm = last_modified.clone();
    let origin = MockOrigin::start(move |_| {
        Reply::ok("lm-body")
            .cc("max-age=10")
            .header("last-modified", &lm)
            .conditional()
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/lm");

    assert_eq!(get(&url, &[]).await.x_cache(), "MISS");
    proxy.advance(secs(20));
    let r = get(&url, &[]).await;
    assert_eq!(origin.hits("/lm"), 2);
    assert_eq!(
        origin.last_header("/lm", "if-modified-since"),
        Some(last_modified)
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "lm-body");
    assert_eq!(r.x_cache(), "REVALIDATED");
    assert!(
        r.cache_status().contains("fwd-status=304"),
        "{:?}",
        r.cache_status()
    );
    assert_eq!(get(&url, &[]).await.x_cache(), "HIT-L1");
    assert_eq!(origin.hits("/lm"), 2);
}

#[tokio::test]
async fn client_conditionals_on_a_fresh_entry_get_304() {
    let last_modified = http_date(SystemTime::now() - secs(3600));
    let lm = last_modified.clone();
    let origin = MockOrigin::start(move |_| {
        Reply::ok("conditional body")
            .cc("max-age=60")
            .header("etag", "\"c1\"")
            .header("last-modified", &lm)
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/cond");
    assert_eq!(get(&url, &[]).await.x_cache(), "MISS");

    let r = get(&url, &[("if-none-match", "\"c1\"")]).await;
    assert_eq!(r.status, 304);
    assert_eq!(r.x_cache(), "HIT-L1");
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some("\"c1\""));

    let r = get(&url, &[("if-none-match", "\"other\"")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "conditional body");

    let r = get(&url, &[("if-modified-since", &last_modified)]).await;
    assert_eq!(r.status, 304);
    assert_eq!(r.x_cache(), "HIT-L1");
    assert!(r.body.is_empty());

    assert_eq!(origin.hits("/cond"), 1);
}

#[tokio::test]
async fn if_modified_since_without_last_modified_compares_with_date() {
    // RFC 9111 §4.3.2: with no Last-Modified stored, the stored Date stands for it.
    let origin = MockOrigin::start(|_| Reply::ok("dated body").cc("max-age=60")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/dated");
    let first = get(&url, &[]).await;
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(first.header("last-modified"), None);
    let Some(date) = first.header("date").map(str::to_string) else {
        panic!("the origin's answer has no Date: {:?}", first.headers)
    };

    let r = get(&url, &[("if-modified-since", &date)]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (304, "HIT-L1"));
    assert!(r.body.is_empty());
    let before = "Thu, 01 Jan 1998 00:00:00 GMT";
    let r = get(&url, &[("if-modified-since", before)]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "dated body"));
    assert_eq!(origin.hits("/dated"), 1);
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_url() {
    let origin = MockOrigin::start(|r| match r.method.as_str() {
        "GET" => Reply::ok(format!("{}#{}", r.path, r.hit)).cc("max-age=60"),
        "DELETE" => Reply::status(204, ""),
        _ => Reply::ok("done"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let path = format!("/inv-{}", method.to_ascii_lowercase());
        let url = proxy.url(&path);
        assert_eq!(get(&url, &[]).await.x_cache(), "MISS", "{path}");
        assert_eq!(get(&url, &[]).await.x_cache(), "HIT-L1", "{path}");

        let r = request(method, &url, &[], "payload").await;
        assert!(r.status.is_success(), "{method} {path}: {}", r.status);
        assert_eq!(r.x_cache(), "BYPASS", "{method} {path}");

        let r = get(&url, &[]).await;
        assert_eq!(r.x_cache(), "MISS", "{path} after {method}");
        assert_eq!(r.text(), format!("{path}#3"), "{path} after {method}");
    }
}

#[tokio::test]
async fn a_busy_write_endpoint_does_not_stop_other_fills_from_being_stored() {
    // Each successful POST invalidates its URL, and a fill that a purge overtook is not stored.
    // Thousands of writes to one URL are one purge as far as other URLs are concerned: a slow
    // fill elsewhere, under way meanwhile, is still stored.
    writes_during_a_slow_fill(|_| "/events".to_string()).await;
}

#[tokio::test]
async fn writes_to_thousands_of_urls_do_not_stop_other_fills_from_being_stored() {
    // The same with each POST to a URL of its own (an API's /orders/{id}): more distinct purges
    // than the log kept before (4,096) during one fill.
    writes_during_a_slow_fill(|n| format!("/orders/{n}")).await;
}

/// 5,000 successful POSTs, the n-th to `path(n)`, while the first fill of /slow is held; that
/// fill is then stored.
async fn writes_during_a_slow_fill(path: fn(usize) -> String) {
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let held = gate.clone();
    let origin = MockOrigin::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/slow") if r.hit == 1 => {
            Reply::gated("v1", held.clone(), " body").cc("max-age=60")
        }
        ("GET", _) => Reply::ok(format!("v{} body", r.hit)).cc("max-age=60"),
        _ => Reply::ok("done"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let slow_url = proxy.url("/slow");
    let slow = tokio::spawn(async move { get(&slow_url, &[]).await });
    origin.wait_hits("/slow", 1).await;
    for n in 0..5_000 {
        let url = proxy.url(&path(n));
        assert_eq!(request("POST", &url, &[], "x").await.status, 200);
    }
    gate.notify_one();
    let first = slow.await.unwrap();
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(first.text(), "v1 body");

    let r = get(&proxy.url("/slow"), &[]).await;
    assert_eq!(r.x_cache(), "HIT-L1", "the slow fill was stored");
    assert_eq!(r.text(), "v1 body");
    assert_eq!(origin.hits("/slow"), 1);
}

#[tokio::test]
async fn unsafe_methods_invalidate_same_host_location_but_not_on_error() {
    let origin = MockOrigin::start(|r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", _) => Reply::ok(format!("{}#{}", r.path, r.hit)).cc("max-age=60"),
        ("POST", "/create") => Reply::status(201, "created")
            .header("location", "/loc-target")
            .header(
                "content-location",
                &format!("http://{}/cl-target", r.header("host").unwrap_or("")),
            ),
        ("POST", "/create-elsewhere") => {
            Reply::status(201, "created").header("location", "http://other.example/other-target")
        }
        ("POST", _) => Reply::status(500, "boom").header("location", "/err-location"),
        _ => Reply::status(405, "no"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    for path in [
        "/loc-target",
        "/cl-target",
        "/other-target",
        "/err",
        "/err-location",
    ] {
        get(&proxy.url(path), &[]).await;
        assert_eq!(
            get(&proxy.url(path), &[]).await.x_cache(),
            "HIT-L1",
            "{path}"
        );
    }

    let r = request("POST", &proxy.url("/create"), &[], "x").await;
    assert_eq!(r.status, 201);
    let r = get(&proxy.url("/loc-target"), &[]).await;
    assert_eq!(r.x_cache(), "MISS", "Location target should be invalidated");
    let r = get(&proxy.url("/cl-target"), &[]).await;
    assert_eq!(
        r.x_cache(),
        "MISS",
        "Content-Location target should be invalidated"
    );

    let r = request("POST", &proxy.url("/create-elsewhere"), &[], "x").await;
    assert_eq!(r.status, 201);
    let r = get(&proxy.url("/other-target"), &[]).await;
    assert_eq!(
        r.x_cache(),
        "HIT-L1",
        "a Location on another host must not invalidate"
    );

    let r = request("POST", &proxy.url("/err"), &[], "x").await;
    assert_eq!(r.status, 500);
    let r = get(&proxy.url("/err"), &[]).await;
    assert_eq!(r.x_cache(), "HIT-L1", "an error answer must not invalidate");
    assert_eq!(r.text(), "/err#1");
    let r = get(&proxy.url("/err-location"), &[]).await;
    assert_eq!(
        r.x_cache(),
        "HIT-L1",
        "an error answer must not invalidate its Location"
    );
}

#[tokio::test]
async fn repeated_headers_survive_a_hit() {
    let origin = MockOrigin::start(|_| {
        Reply::ok("multi")
            .cc("public, max-age=60")
            .header("set-cookie", "a=1; Path=/")
            .header("set-cookie", "b=2; Path=/")
            .header("x-multi", "one")
            .header("x-multi", "two")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/multi");

    let miss = get(&url, &[]).await;
    assert_eq!(miss.x_cache(), "MISS");
    assert_eq!(miss.all("set-cookie"), ["a=1; Path=/", "b=2; Path=/"]);
    let hit = get(&url, &[]).await;
    assert_eq!(hit.x_cache(), "HIT-L1");
    assert_eq!(hit.all("set-cookie"), ["a=1; Path=/", "b=2; Path=/"]);
    assert_eq!(hit.all("x-multi"), ["one", "two"]);
    assert_eq!(origin.hits("/multi"), 1);
}

/// A field the request's `Connection` header names never reaches the origin (RFC 9110 §7.6.1), so
/// it does not select a variant either: otherwise `Connection: accept-language` would store the
/// default page under `Accept-Language: fr` for every French reader.
#[tokio::test]
async fn connection_options_do_not_select_a_variant() {
    let origin = MockOrigin::start(|r| {
        let language = r.header("accept-language").unwrap_or("default").to_string();
        Reply::ok(format!("page in {language}"))
            .cc("max-age=300")
            .header("vary", "Accept-Language")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    let url = proxy.url("/lang");

    let hidden = [("accept-language", "fr"), ("connection", "accept-language")];
    let r = get(&url, &hidden).await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("MISS", "page in default")
    );
    let r = get(&url, &[("accept-language", "fr")]).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("MISS", "page in fr"));
    let r = get(&url, &[("accept-language", "fr")]).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT-L1", "page in fr"));
    // The first answer was stored as what it is: the variant without the field.
    let r = get(&url, &[]).await;
    assert_eq!(
        (r.x_cache(), r.text().as_str()),
        ("HIT-L1", "page in default")
    );
    assert_eq!(origin.hits("/lang"), 2);
}
