//! Purges on one instance: by key, glob pattern and surrogate tags, soft purges, the 400 cases,
//! GET/DELETE /cache, /warm, the PURGE method, surrogate header visibility, and L2 removal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::admin::*;
use support::binary::*;
use support::fleet::*;
use support::redis::RedisServer;
use support::*;

const TOKEN: &str = "purge-s3cret-token";
/// ADMIN_TOKEN, for the instances on Redis.
const ADMIN: &[(&str, &str)] = &[("ADMIN_TOKEN", TOKEN)];

/// A proxy with ADMIN_TOKEN set, plus `extra` settings.
async fn start(origin: &MockOrigin, extra: &[(&str, &str)]) -> TestProxy {
    start_with_token(&origin.url(), TOKEN, extra).await
}

/// An authorised admin request with an optional raw body.
async fn admin(proxy: &TestProxy, method: &str, path: &str, body: &str) -> Resp {
    authorized(proxy, TOKEN, method, path, body).await
}

/// POST /purge with `body`; asserts 200 and the reply's shape, returns the reply.
async fn purge(proxy: &TestProxy, body: Value) -> Value {
    purge_with(proxy, TOKEN, body).await
}

#[track_caller]
fn count(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field:?} missing or not a count in {v}"))
}

/// An origin answering `{path} v{n}` (n = the path's hit number), fresh for 300 s.
async fn versioned_origin() -> MockOrigin {
    MockOrigin::start(|r| Reply::ok(format!("{} v{}", r.path, r.hit)).cc("max-age=300")).await
}

/// Fills `paths` (MISS) and checks each is then HIT-L1.
async fn fill(proxy: &TestProxy, paths: &[&str]) {
    for path in paths {
        let r = sget(proxy, path).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "MISS"), "{path}");
        let r = sget(proxy, path).await;
        assert_eq!((r.status.as_u16(), r.x_cache()), (200, "HIT-L1"), "{path}");
    }
}

/// Asserts each of `paths` is still served from L1.
async fn still_cached(proxy: &TestProxy, paths: &[&str], why: &str) {
    for path in paths {
        let r = sget(proxy, path).await;
        assert_eq!(
            (r.status.as_u16(), r.x_cache()),
            (200, "HIT-L1"),
            "{path} must still be cached ({why})"
        );
    }
}

/// Asserts each of `paths` is gone: the next GET is a MISS that reaches the origin.
async fn gone(proxy: &TestProxy, origin: &MockOrigin, paths: &[&str], why: &str) {
    for path in paths {
        let before = origin.hits(path);
        let r = sget(proxy, path).await;
        assert_eq!(
            (r.status.as_u16(), r.x_cache()),
            (200, "MISS"),
            "{path} must be gone ({why})"
        );
        assert_eq!(
            origin.hits(path),
            before + 1,
            "{path}: origin not asked again"
        );
    }
}

async fn stats_json(proxy: &TestProxy) -> Value {
    let resp = admin(proxy, "GET", "/stats", "").await;
    assert_eq!(resp.status, 200);
    json_of(&resp)
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_purge_removes_exactly_that_key() {
    let origin = versioned_origin().await;
    let proxy = start(&origin, &[]).await;
    fill(&proxy, &["/k", "/k?x=1", "/k/deeper"]).await;

    let v = purge(&proxy, json!({"key": "shared.test/k"})).await;
    assert_eq!(count(&v, "l1_removed"), 1, "{v}");
    assert_eq!(count(&v, "l2_removed"), 0, "no Redis: {v}");
    // The origin counts /k and /k?x=1 together (per path): this is its third request for /k.
    let r = sget(&proxy, "/k").await;
    expect(&r, "MISS", "/k v3");
    assert_eq!(origin.hits("/k"), 3);
    still_cached(&proxy, &["/k?x=1", "/k/deeper"], "a key purge is exact").await;

    // A key with a query.
    let v = purge(&proxy, json!({"key": "shared.test/k?x=1"})).await;
    assert_eq!(count(&v, "l1_removed"), 1, "{v}");
    let r = sget(&proxy, "/k?x=1").await;
    assert_eq!(r.x_cache(), "MISS");

    // Purging what is not stored is no error.
    let v = purge(&proxy, json!({"key": "shared.test/never-stored"})).await;
    assert_eq!(count(&v, "l1_removed"), 0, "{v}");

    let stats = stats_json(&proxy).await;
    assert!(count(&stats, "purges") >= 3, "/stats {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_purge_matches_across_slashes() {
    let origin = versioned_origin().await;
    let proxy = start(&origin, &[]).await;
    fill(
        &proxy,
        &["/users/1", "/users/2/x", "/other", "/users", "/usersx/1"],
    )
    .await;

    let v = purge(&proxy, json!({"pattern": "shared.test/users/*"})).await;
    assert_eq!(count(&v, "l1_removed"), 2, "{v}");
    gone(&proxy, &origin, &["/users/1", "/users/2/x"], "matched").await;
    still_cached(&proxy, &["/other", "/users", "/usersx/1"], "not matched").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_with_a_leading_star_matches_any_host() {
    let origin = versioned_origin().await;
    let proxy = start(&origin, &[]).await;
    fill(
        &proxy,
        &[
            "/static/app.js",
            "/a/b/static/c.css",
            "/staticky",
            "/assets/app.js",
        ],
    )
    .await;
    let other = get(&proxy.url("/static/x.png"), &[("host", "other.test")]).await;
    assert_eq!(other.x_cache(), "MISS");

    let v = purge(&proxy, json!({"pattern": "*/static/*"})).await;
    assert_eq!(count(&v, "l1_removed"), 3, "{v}");
    gone(
        &proxy,
        &origin,
        &["/static/app.js", "/a/b/static/c.css"],
        "*/static/*",
    )
    .await;
    let other = get(&proxy.url("/static/x.png"), &[("host", "other.test")]).await;
    assert_eq!(
        other.x_cache(),
        "MISS",
        "other.test/static/x.png matches too"
    );
    still_cached(&proxy, &["/staticky", "/assets/app.js"], "not matched").await;
}

/// An origin tagging /ab with Surrogate-Key "a b", /cd with Cache-Tag "c, d", /bd with both
/// headers (b and d), and /none with nothing.
async fn tagging_origin() -> MockOrigin {
    MockOrigin::start(|r| {
        let reply = Reply::ok(format!("{} v{}", r.path, r.hit)).cc("max-age=300");
        match r.path.as_str() {
            "/ab" => reply.header("surrogate-key", "a b"),
            "/cd" => reply.header("cache-tag", "c, d"),
            "/bd" => reply.header("surrogate-key", "b").header("cache-tag", "d"),
            _ => reply,
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_purge_removes_only_tagged_entries() {
    let origin = tagging_origin().await;
    let proxy = start(&origin, &[]).await;
    let all = ["/ab", "/cd", "/bd", "/none"];
    fill(&proxy, &all).await;

    let v = purge(&proxy, json!({"tags": ["b"]})).await;
    assert_eq!(count(&v, "l1_removed"), 2, "{v}");
    gone(&proxy, &origin, &["/ab", "/bd"], "tagged b").await;
    still_cached(&proxy, &["/cd", "/none"], "not tagged b").await;

    // /ab and /bd are stored again by the GETs above.
    still_cached(&proxy, &["/ab", "/bd"], "refilled").await;
    let v = purge(&proxy, json!({"tags": ["d"]})).await;
    assert_eq!(count(&v, "l1_removed"), 2, "{v}");
    gone(&proxy, &origin, &["/cd", "/bd"], "tagged d").await;
    still_cached(&proxy, &["/ab", "/none"], "not tagged d").await;

    // Several tags: the union.
    let v = purge(&proxy, json!({"tags": ["a", "c", "no-such-tag"]})).await;
    assert_eq!(count(&v, "l1_removed"), 2, "{v}");
    gone(&proxy, &origin, &["/ab", "/cd"], "tagged a or c").await;
    still_cached(&proxy, &["/none", "/bd"], "tagged neither").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surrogate_headers_are_hidden_unless_asked_for() {
    let origin = tagging_origin().await;

    let proxy = start(&origin, &[]).await;
    for (path, x_cache) in [
        ("/ab", "MISS"),
        ("/ab", "HIT-L1"),
        ("/cd", "MISS"),
        ("/cd", "HIT-L1"),
    ] {
        let r = sget(&proxy, path).await;
        assert_eq!(r.x_cache(), x_cache, "{path}");
        assert_eq!(
            r.header("surrogate-key"),
            None,
            "{path} {x_cache}: {:?}",
            r.headers
        );
        assert_eq!(
            r.header("cache-tag"),
            None,
            "{path} {x_cache}: {:?}",
            r.headers
        );
    }

    let visible = start(&origin, &[("SURROGATE_HEADERS_VISIBLE", "true")]).await;
    for x_cache in ["MISS", "HIT-L1"] {
        let r = sget(&visible, "/ab").await;
        assert_eq!(r.x_cache(), x_cache);
        assert_eq!(
            r.header("surrogate-key"),
            Some("a b"),
            "{x_cache}: {:?}",
            r.headers
        );
        let r = sget(&visible, "/cd").await;
        assert_eq!(r.x_cache(), x_cache);
        assert_eq!(
            r.header("cache-tag"),
            Some("c, d"),
            "{x_cache}: {:?}",
            r.headers
        );
    }
}

/// An origin whose answers Vary on Accept-Encoding: `{path} {encoding} v{n}`, tagged `vary-tag`.
async fn vary_origin() -> MockOrigin {
    MockOrigin::start(|r| {
        let ae = r.header("accept-encoding").unwrap_or("none").to_string();
        Reply::ok(format!("{} {ae} v{}", r.path, r.hit))
            .cc("max-age=300")
            .header("vary", "Accept-Encoding")
            .header("surrogate-key", "vary-tag")
    })
    .await
}

const ENCODINGS: [&str; 2] = ["gzip", "identity"];

async fn vget(proxy: &TestProxy, path: &str, encoding: &str) -> Resp {
    get(
        &proxy.url(path),
        &[("host", HOST), ("accept-encoding", encoding)],
    )
    .await
}

/// Stores both variants of `path` and checks each is then HIT-L1.
async fn fill_variants(proxy: &TestProxy, path: &str) {
    for encoding in ENCODINGS {
        let r = vget(proxy, path, encoding).await;
        assert_eq!(r.x_cache(), "MISS", "{path} {encoding}");
        let r = vget(proxy, path, encoding).await;
        assert_eq!(r.x_cache(), "HIT-L1", "{path} {encoding}");
    }
}

async fn variants_gone(proxy: &TestProxy, path: &str, why: &str) {
    for encoding in ENCODINGS {
        let r = vget(proxy, path, encoding).await;
        assert_eq!(
            (r.status.as_u16(), r.x_cache()),
            (200, "MISS"),
            "{path} {encoding} must be gone ({why})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_variant_of_a_purged_url_goes() {
    let origin = vary_origin().await;
    let proxy = start(&origin, &[]).await;

    fill_variants(&proxy, "/v").await;
    let resp = admin(&proxy, "GET", "/cache?key=shared.test/v", "").await;
    assert_eq!(resp.status, 200, "{:?}", resp.text());
    let v = json_of(&resp);
    assert_eq!(v["variants"], 2, "{v}");
    let v = purge(&proxy, json!({"key": "shared.test/v"})).await;
    assert!(count(&v, "l1_removed") >= 1, "{v}");
    variants_gone(&proxy, "/v", "key purge").await;
    assert_eq!(origin.hits("/v"), 4);

    fill_variants(&proxy, "/vp/1").await;
    purge(&proxy, json!({"pattern": "shared.test/vp/*"})).await;
    variants_gone(&proxy, "/vp/1", "pattern purge").await;

    fill_variants(&proxy, "/vt").await;
    purge(&proxy, json!({"tags": ["vary-tag"]})).await;
    variants_gone(&proxy, "/vt", "tag purge").await;
}

// ---------------------------------------------------------------------------------------------
// Soft purges

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_inside_stale_while_revalidate_answers_stale_and_refreshes_once() {
    let origin = MockOrigin::start(|r| {
        Reply::ok(format!("v{}", r.hit)).cc("max-age=300, stale-while-revalidate=60")
    })
    .await;
    let proxy = start(&origin, &[]).await;
    expect(&sget(&proxy, "/soft").await, "MISS", "v1");
    expect(&sget(&proxy, "/soft").await, "HIT-L1", "v1");

    let v = purge(&proxy, json!({"key": "shared.test/soft", "soft": true})).await;
    let r = sget(&proxy, "/soft").await;
    expect(&r, "STALE", "v1");
    assert_eq!(
        json_of(&admin(&proxy, "GET", "/stats", "").await)["purges"],
        1,
        "{v}"
    );

    origin.wait_hits("/soft", 2).await;
    let deadline = Instant::now() + secs(10);
    loop {
        let r = sget(&proxy, "/soft").await;
        if r.text() == "v2" {
            assert_eq!(r.x_cache(), "HIT-L1", "the refreshed copy: {:?}", r.headers);
            break;
        }
        expect(&r, "STALE", "v1");
        assert!(
            Instant::now() < deadline,
            "the background refresh never landed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    expect(&sget(&proxy, "/soft").await, "HIT-L1", "v2");
    assert_eq!(origin.hits("/soft"), 2, "exactly one background refresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_keeps_stale_if_error_cover() {
    let origin = MockOrigin::start(|r| {
        if r.hit == 1 {
            Reply::ok("v1").cc("max-age=300, stale-if-error=60")
        } else {
            Reply::status(503, "down")
        }
    })
    .await;
    let proxy = start(&origin, &[]).await;
    expect(&sget(&proxy, "/sie").await, "MISS", "v1");
    purge(&proxy, json!({"key": "shared.test/sie", "soft": true})).await;
    let r = sget(&proxy, "/sie").await;
    expect(&r, "STALE", "v1");
    assert_eq!(
        origin.hits("/sie"),
        2,
        "the stale entry was tried at the origin first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_without_windows_revalidates_with_the_etag() {
    let origin = MockOrigin::start(|r| {
        Reply::ok(format!("{} body", r.path))
            .cc("max-age=300")
            .header("etag", "\"e1\"")
            .conditional()
    })
    .await;
    let proxy = start(&origin, &[]).await;
    expect(&sget(&proxy, "/etagged").await, "MISS", "/etagged body");
    expect(&sget(&proxy, "/etagged").await, "HIT-L1", "/etagged body");

    purge(&proxy, json!({"key": "shared.test/etagged", "soft": true})).await;
    let r = sget(&proxy, "/etagged").await;
    expect(&r, "REVALIDATED", "/etagged body");
    assert_eq!(origin.hits("/etagged"), 2);
    assert_eq!(
        origin.last_header("/etagged", "if-none-match").as_deref(),
        Some("\"e1\""),
        "the revalidation must be conditional"
    );
    expect(&sget(&proxy, "/etagged").await, "HIT-L1", "/etagged body");
    assert_eq!(origin.hits("/etagged"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_without_windows_or_validators_refetches() {
    let origin = versioned_origin().await;
    let proxy = start(&origin, &[]).await;
    expect(&sget(&proxy, "/plain").await, "MISS", "/plain v1");
    purge(&proxy, json!({"key": "shared.test/plain", "soft": true})).await;
    expect(&sget(&proxy, "/plain").await, "MISS", "/plain v2");
    expect(&sget(&proxy, "/plain").await, "HIT-L1", "/plain v2");
    assert_eq!(origin.hits("/plain"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_pattern_and_tag_purges_mark_stale() {
    let origin = MockOrigin::start(|r| {
        Reply::ok(format!("{} v{}", r.path, r.hit))
            .cc("max-age=300, stale-while-revalidate=60")
            .header("surrogate-key", "grp")
    })
    .await;
    let proxy = start(&origin, &[]).await;
    fill(&proxy, &["/sp/1", "/st/1"]).await;
    purge(&proxy, json!({"pattern": "shared.test/sp/*", "soft": true})).await;
    expect(&sget(&proxy, "/sp/1").await, "STALE", "/sp/1 v1");
    still_cached(&proxy, &["/st/1"], "outside the pattern").await;
    purge(&proxy, json!({"tags": ["grp"], "soft": true})).await;
    expect(&sget(&proxy, "/st/1").await, "STALE", "/st/1 v1");
}

// ---------------------------------------------------------------------------------------------
// Bad requests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_purge_requests_answer_400_and_purge_nothing() {
    let origin = MockOrigin::start(|r| {
        Reply::ok(format!("{} v{}", r.path, r.hit))
            .cc("max-age=300")
            // Tagged "notalist", so a string taken for a one-tag list would purge it.
            .header("surrogate-key", "notalist x")
    })
    .await;
    let proxy = start(&origin, &[]).await;
    fill(&proxy, &["/p400"]).await;

    let cases: [(&str, &str); 13] = [
        ("malformed JSON", r#"{"key": "shared.test/p400""#),
        ("not JSON at all", "key=shared.test/p400"),
        ("an empty body", ""),
        ("no selector", "{}"),
        ("only soft", r#"{"soft": true}"#),
        (
            "two selectors",
            r#"{"key": "shared.test/p400", "pattern": "*"}"#,
        ),
        (
            "three selectors",
            r#"{"key": "shared.test/p400", "pattern": "*", "tags": ["x"]}"#,
        ),
        ("an empty pattern", r#"{"pattern": ""}"#),
        ("an empty key", r#"{"key": ""}"#),
        ("an empty tags list", r#"{"tags": []}"#),
        ("tags not a list", r#"{"tags": "notalist"}"#),
        ("a number as key", r#"{"key": 5}"#),
        ("a number among the tags", r#"{"tags": ["x", 1]}"#),
    ];
    for (what, body) in cases {
        let resp = admin(&proxy, "POST", "/purge", body).await;
        assert_eq!(resp.status, 400, "{what} ({body}): {:?}", resp.text());
        let v = json_of(&resp);
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: 400 body {v}"
        );
        still_cached(&proxy, &["/p400"], what).await;
    }
    assert_eq!(origin.hits("/p400"), 1);
    assert_eq!(
        count(&stats_json(&proxy).await, "purges"),
        0,
        "no purge was applied"
    );
}

// ---------------------------------------------------------------------------------------------
// GET / DELETE /cache

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_metadata_for_a_stored_key() {
    let origin = MockOrigin::start(|r| {
        Reply::ok(format!("{} body", r.path))
            .cc("max-age=100, stale-while-revalidate=600")
            .header("surrogate-key", "alpha beta")
            .header("cache-tag", "gamma")
    })
    .await;
    let proxy = start(&origin, &[]).await;
    expect(&sget(&proxy, "/meta").await, "MISS", "/meta body");
    let before = unix_now();

    let resp = admin(&proxy, "GET", "/cache?key=shared.test/meta", "").await;
    assert_eq!(resp.status, 200, "{:?}", resp.text());
    let v = json_of(&resp);
    assert_eq!(v["key"], "shared.test/meta", "{v}");
    assert_eq!(v["tier"], "l1", "{v}");
    assert_eq!(v["status"], 200, "{v}");
    let stored_at = v["stored_at"]
        .as_i64()
        .unwrap_or_else(|| panic!("stored_at: {v}"));
    assert!(
        (before - 30..=before + 1).contains(&stored_at),
        "stored_at {stored_at}, now {before}"
    );
    let ttl = v["ttl"].as_i64().unwrap_or_else(|| panic!("ttl: {v}"));
    assert!((90..=100).contains(&ttl), "ttl {ttl}: {v}");
    let age = v["age"].as_i64().unwrap_or_else(|| panic!("age: {v}"));
    assert!((0..=10).contains(&age), "age {age}: {v}");
    assert_eq!(v["size"], "/meta body".len(), "{v}");
    assert_eq!(v["variants"], 1, "{v}");
    let mut tags: Vec<&str> = v["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("tags: {v}"))
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tags.sort_unstable();
    assert_eq!(tags, ["alpha", "beta", "gamma"], "{v}");

    // Stale: ttl goes negative, age keeps counting.
    proxy.advance(secs(150));
    let v = json_of(&admin(&proxy, "GET", "/cache?key=shared.test/meta", "").await);
    let ttl = v["ttl"].as_i64().unwrap_or_else(|| panic!("ttl: {v}"));
    assert!((-60..=-40).contains(&ttl), "stale ttl {ttl}: {v}");
    let age = v["age"].as_i64().unwrap_or_else(|| panic!("age: {v}"));
    assert!((150..=160).contains(&age), "age {age}: {v}");

    // A key with a query, percent-encoded in the admin URL.
    expect(&sget(&proxy, "/meta?x=1").await, "MISS", "/meta body");
    let resp = admin(&proxy, "GET", "/cache?key=shared.test%2Fmeta%3Fx%3D1", "").await;
    assert_eq!(resp.status, 200, "{:?}", resp.text());
    assert_eq!(json_of(&resp)["key"], "shared.test/meta?x=1");
    // Pasted unencoded, the key's own query keeps its `&` and `=`.
    expect(&sget(&proxy, "/meta?x=1&y=2").await, "MISS", "/meta body");
    let resp = admin(&proxy, "GET", "/cache?key=shared.test/meta?x=1&y=2", "").await;
    assert_eq!(resp.status, 200, "{:?}", resp.text());
    assert_eq!(json_of(&resp)["key"], "shared.test/meta?x=1&y=2");

    // Unknown keys.
    let resp = admin(&proxy, "GET", "/cache?key=shared.test/unknown", "").await;
    assert_eq!(resp.status, 404, "{:?}", resp.text());
    assert!(json_of(&resp)["error"].is_string());
    assert_eq!(origin.total(), 3, "/cache must not involve the origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cache_is_a_key_purge() {
    let origin = versioned_origin().await;
    let proxy = start(&origin, &[]).await;
    fill(&proxy, &["/del", "/keep"]).await;

    let resp = admin(&proxy, "DELETE", "/cache?key=shared.test/del", "").await;
    assert_eq!(resp.status, 200, "{:?}", resp.text());
    let v = json_of(&resp);
    assert_eq!(count(&v, "l1_removed"), 1, "{v}");
    assert!(
        v["l2_removed"].is_u64() && v["broadcast"].is_boolean(),
        "{v}"
    );
    gone(&proxy, &origin, &["/del"], "deleted").await;
    still_cached(&proxy, &["/keep"], "another key").await;

    let resp = admin(&proxy, "DELETE", "/cache?key=shared.test/never", "").await;
    assert_eq!(resp.status, 404, "{:?}", resp.text());
    assert!(json_of(&resp)["error"].is_string());
}

// ---------------------------------------------------------------------------------------------
// /warm

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_fetches_through_the_cache() {
    let origin = versioned_origin().await;
    let proxy = start(&origin, &[]).await;

    let resp = admin(
        &proxy,
        "POST",
        "/warm",
        &json!({"urls": ["/w/a", "/w/b?x=1"], "host": HOST}).to_string(),
    )
    .await;
    assert_eq!(resp.status, 200, "{:?}", resp.text());
    let v = json_of(&resp);
    let results = v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("results: {v}"));
    assert_eq!(results.len(), 2, "{v}");
    for (result, url) in results.iter().zip(["/w/a", "/w/b?x=1"]) {
        assert_eq!(result["url"], url, "{v}");
        assert_eq!(result["status"], 200, "{v}");
        assert_eq!(result["x_cache"], "MISS", "{v}");
    }
    expect(&sget(&proxy, "/w/a").await, "HIT-L1", "/w/a v1");
    expect(&sget(&proxy, "/w/b?x=1").await, "HIT-L1", "/w/b v1");
    assert_eq!((origin.hits("/w/a"), origin.hits("/w/b")), (1, 1));

    // Warming what is stored is a hit.
    let v = json_of(
        &admin(
            &proxy,
            "POST",
            "/warm",
            &json!({"urls": ["/w/a"], "host": HOST}).to_string(),
        )
        .await,
    );
    assert_eq!(v["results"][0]["x_cache"], "HIT-L1", "{v}");
    assert_eq!(origin.hits("/w/a"), 1);

    // Without "host": the host of ORIGIN_URL.
    let resp = admin(
        &proxy,
        "POST",
        "/warm",
        &json!({"urls": ["/w/c"]}).to_string(),
    )
    .await;
    assert_eq!(resp.status, 200, "{:?}", resp.text());
    assert_eq!(json_of(&resp)["results"][0]["x_cache"], "MISS");
    let origin_host = origin.addr.to_string();
    let r = get(&proxy.url("/w/c"), &[("host", &origin_host)]).await;
    expect(&r, "HIT-L1", "/w/c v1");
    assert_eq!(origin.hits("/w/c"), 1);

    // A misspelt field is refused, not ignored (it would warm the wrong host).
    let resp = admin(
        &proxy,
        "POST",
        "/warm",
        &json!({"urls": ["/w/d"], "hosts": HOST}).to_string(),
    )
    .await;
    assert_eq!(resp.status, 400, "{:?}", resp.text());
    let v = json_of(&resp);
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("hosts")),
        "{v}"
    );
    assert_eq!(origin.hits("/w/d"), 0);
}

// ---------------------------------------------------------------------------------------------
// PURGE method on the traffic port

async fn purge_method(proxy: &TestProxy, path: &str, auth: Option<&str>) -> Resp {
    let mut headers = vec![("host", HOST)];
    if let Some(auth) = auth {
        headers.push(("authorization", auth));
    }
    request("PURGE", &proxy.url(path), &headers, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_method_needs_the_token() {
    let origin = versioned_origin().await;
    let proxy = start(&origin, &[]).await;
    fill(&proxy, &["/pm", "/pm2"]).await;

    let wrong = format!("Bearer {TOKEN}-not");
    for auth in [None, Some(wrong.as_str()), Some(TOKEN)] {
        let resp = purge_method(&proxy, "/pm", auth).await;
        assert_eq!(resp.status, 401, "PURGE with {auth:?}: {:?}", resp.text());
        still_cached(&proxy, &["/pm"], "unauthorised PURGE").await;
    }
    assert_eq!(origin.hits("/pm"), 1, "PURGE must never reach the origin");

    let resp = purge_method(&proxy, "/pm", Some(&bearer(TOKEN))).await;
    assert_eq!(resp.status, 200, "{:?}", resp.text());
    let v = json_of(&resp);
    assert_eq!(count(&v, "l1_removed"), 1, "{v}");
    assert!(
        v["l2_removed"].is_u64() && v["broadcast"].is_boolean(),
        "{v}"
    );
    assert_eq!(origin.hits("/pm"), 1, "PURGE must never reach the origin");
    gone(&proxy, &origin, &["/pm"], "PURGE").await;
    still_cached(&proxy, &["/pm2"], "another URL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_method_without_an_admin_token_is_refused() {
    let origin = versioned_origin().await;
    // Loopback admin listener, no ADMIN_TOKEN: PURGE on the traffic port is never open.
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    fill(&proxy, &["/open"]).await;
    for auth in [None, Some("Bearer "), Some("Bearer anything")] {
        let resp = purge_method(&proxy, "/open", auth).await;
        assert_eq!(resp.status, 401, "PURGE with {auth:?}: {:?}", resp.text());
    }
    still_cached(&proxy, &["/open"], "refused PURGE").await;
    assert_eq!(origin.hits("/open"), 1);
}

// ---------------------------------------------------------------------------------------------
// With Redis: the L2 copy goes too

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_remove_the_l2_copy() {
    let redis = RedisServer::start();
    let origin = tagging_origin().await;
    let a = instance(&origin, &redis, ADMIN).await;
    let paths = ["/l2/key", "/l2/pat/1", "/l2/pat/2", "/ab", "/none"];
    for path in paths {
        let r = sget(&a, path).await;
        assert_eq!(r.x_cache(), "MISS", "{path}");
    }
    flush_l2(&a).await;
    for path in paths {
        assert_eq!(
            redis.cli(&["exists", &entry_key(path)]),
            "1",
            "{path}: keys {:?}",
            redis.keys()
        );
    }
    // A fresh instance sees the L2 copy (and reports it as such).
    let probe = instance(&origin, &redis, ADMIN).await;
    let resp = admin(&probe, "GET", "/cache?key=shared.test/l2/key", "").await;
    assert_eq!(resp.status, 200, "{:?}", resp.text());
    assert_eq!(json_of(&resp)["tier"], "l2");
    drop(probe);

    let v = purge(&a, json!({"key": "shared.test/l2/key"})).await;
    assert_eq!(count(&v, "l1_removed"), 1, "{v}");
    assert!(count(&v, "l2_removed") >= 1, "{v}");
    assert_eq!(redis.cli(&["exists", &entry_key("/l2/key")]), "0");

    let v = purge(&a, json!({"pattern": "shared.test/l2/pat/*"})).await;
    assert!(count(&v, "l2_removed") >= 2, "{v}");
    for path in ["/l2/pat/1", "/l2/pat/2"] {
        assert_eq!(redis.cli(&["exists", &entry_key(path)]), "0", "{path}");
    }

    let v = purge(&a, json!({"tags": ["a"]})).await;
    assert!(count(&v, "l2_removed") >= 1, "{v}");
    assert_eq!(redis.cli(&["exists", &entry_key("/ab")]), "0");
    assert_eq!(
        redis.cli(&["exists", &entry_key("/none")]),
        "1",
        "untagged entry kept"
    );

    // A second instance (empty L1) must miss every purged URL and hit the rest in L2.
    let b = instance(&origin, &redis, ADMIN).await;
    for path in ["/l2/key", "/l2/pat/1", "/l2/pat/2", "/ab"] {
        let before = origin.hits(path);
        let r = sget(&b, path).await;
        assert_eq!(r.x_cache(), "MISS", "{path} on B");
        assert_eq!(origin.hits(path), before + 1, "{path}");
    }
    assert_eq!(sget(&b, "/none").await.x_cache(), "HIT-L2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_remove_every_l2_variant() {
    let redis = RedisServer::start();
    let origin = vary_origin().await;
    let a = instance(&origin, &redis, ADMIN).await;
    for path in ["/l2v/key", "/l2v/pat/1", "/l2v/tag"] {
        for encoding in ENCODINGS {
            assert_eq!(vget(&a, path, encoding).await.x_cache(), "MISS");
        }
    }
    flush_l2(&a).await;
    let b = instance(&origin, &redis, ADMIN).await;
    for encoding in ENCODINGS {
        let r = vget(&b, "/l2v/key", encoding).await;
        assert_eq!(r.x_cache(), "HIT-L2", "{encoding}: both variants are in L2");
    }
    drop(b);

    purge(&a, json!({"key": "shared.test/l2v/key"})).await;
    purge(&a, json!({"pattern": "shared.test/l2v/pat/*"})).await;
    purge(&a, json!({"tags": ["vary-tag"]})).await;

    let leftovers: Vec<String> = redis
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("strata:e:") && k.contains("/l2v/"))
        // The Vary record of a tag-purged URL carries no tags of its own (its variants do, and
        // they are gone): it may stay.
        .filter(|k| k != "strata:e:shared.test/l2v/tag")
        .collect();
    // A fresh instance finds no variant of any purged URL.
    let c = instance(&origin, &redis, ADMIN).await;
    for path in ["/l2v/key", "/l2v/pat/1", "/l2v/tag"] {
        variants_gone(&c, path, "purged from L2").await;
    }
    // And no unreachable variant is left behind to occupy Redis until its TTL.
    assert!(
        leftovers.is_empty(),
        "entries of purged URLs left in L2 (before the refills): {leftovers:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// LOG_REDACT_KEYS covers the purge paths too (the real binary)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_log_no_keys_when_redacted() {
    const SECRET: &str = "purge-secret-91bd4e";
    let origin = versioned_origin().await;
    let listen = free_addr();
    let admin_addr = free_addr();
    let dir = scratch_dir("purge");
    let (out_path, err_path) = (dir.join("stdout.log"), dir.join("stderr.log"));
    let (origin_s, listen_s, admin_s) = (origin.url(), listen.to_string(), admin_addr.to_string());
    let mut child = strata(
        &[
            ("ORIGIN_URL", &origin_s),
            ("LISTEN_ADDR", &listen_s),
            ("ADMIN_ADDR", &admin_s),
            ("ADMIN_TOKEN", TOKEN),
            ("SHUTDOWN_TIMEOUT", "5s"),
            ("RUST_LOG", "strata=debug,info"),
            ("LOG_REDACT_KEYS", "true"),
        ],
        Stdio::from(std::fs::File::create(&out_path).unwrap()),
        Stdio::from(std::fs::File::create(&err_path).unwrap()),
    );
    wait_listening(&mut child, &[admin_addr, listen], &err_path).await;
    let path = format!("/{SECRET}/a");
    let key = format!("{listen}{path}");
    let auth = bearer(TOKEN);
    let admin_call = |method: &'static str, route: String, body: String| {
        let auth = auth.clone();
        async move {
            request(
                method,
                &format!("http://{admin_addr}{route}"),
                &[("authorization", auth.as_str())],
                body,
            )
            .await
        }
    };

    let url = format!("http://{listen}{path}");
    assert_eq!(get(&url, &[]).await.x_cache(), "MISS");
    let r = admin_call("GET", format!("/cache?key={key}"), String::new()).await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    let r = admin_call("POST", "/purge".into(), json!({"key": key}).to_string()).await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    assert_eq!(get(&url, &[]).await.x_cache(), "MISS");
    let r = request("PURGE", &url, &[("authorization", auth.as_str())], "").await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    assert_eq!(get(&url, &[]).await.x_cache(), "MISS");
    let r = admin_call(
        "POST",
        "/purge".into(),
        json!({"pattern": format!("*{SECRET}*"), "soft": true}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    let r = admin_call("DELETE", format!("/cache?key={key}"), String::new()).await;
    assert_eq!(r.status, 200, "{:?}", r.text());
    let r = admin_call(
        "POST",
        "/warm".into(),
        json!({"urls": [path.clone()]}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.text());

    sigterm_exits_0(&mut child).await;
    let logs = take_logs(&dir);
    assert!(
        !logs.contains(SECRET),
        "LOG_REDACT_KEYS=true, yet a key or path is in the logs:\n{logs}"
    );
    assert!(logs.contains("h:"), "no redacted key in the logs:\n{logs}");
}

/// Purges over more keys than one round trip takes (SCAN pages of 1,000, each page's UNLINKs in one
/// pipeline; tag members by 1,000): every matching key goes, each counted once, nothing else is
/// touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_of_many_l2_keys_take_them_all() {
    let redis = RedisServer::start();
    let origin = tagging_origin().await;
    let a = instance(&origin, &redis, ADMIN).await;
    // Hard purges never read the values, so plain strings stand in for entries.
    let seed = "for i = 1, tonumber(ARGV[1]) do \
                  redis.call('set', KEYS[1] .. i, 'x') \
                  if ARGV[2] ~= '' then redis.call('zadd', ARGV[2], 1e15, string.sub(KEYS[1], 10) .. i) end \
                end return 'OK'";
    let seeded = |prefix: &str, n: &str, tag_set: &str| {
        assert_eq!(redis.cli(&["eval", seed, "1", prefix, n, tag_set]), "OK");
    };
    seeded("strata:e:shared.test/bulk/", "2500", "");
    seeded("strata:e:shared.test/tagged/", "1600", "strata:tz:many");
    seeded("strata:e:shared.test/kept/", "10", "");
    let under = |prefix: &str| {
        redis
            .keys()
            .iter()
            .filter(|k| k.starts_with(prefix))
            .count()
    };
    assert_eq!(under("strata:e:shared.test/bulk/"), 2500);

    let v = purge(&a, json!({"pattern": "shared.test/bulk/*"})).await;
    assert_eq!(
        (count(&v, "l2_removed"), &v["l2_pending"]),
        (2500, &json!(false)),
        "{v}"
    );
    assert_eq!(under("strata:e:shared.test/bulk/"), 0);

    let v = purge(&a, json!({"tags": ["many"]})).await;
    assert_eq!(
        (count(&v, "l2_removed"), &v["l2_pending"]),
        (1600, &json!(false)),
        "{v}"
    );
    assert_eq!(under("strata:e:shared.test/tagged/"), 0);
    assert_eq!(
        redis.cli(&["exists", "strata:tz:many"]),
        "0",
        "the tag set goes too"
    );

    assert_eq!(under("strata:e:shared.test/kept/"), 10, "untouched");
    assert_eq!(a.stats().l2_errors, 0, "{:?}", a.stats());
}

/// A revalidated copy keeps its surrogate keys: a 304 that does not repeat them leaves the copy's
/// own, one that does replaces them; either way clients do not see them (SURROGATE_HEADERS_VISIBLE
/// is off), and a tag purge still finds the copy.
#[tokio::test]
async fn a_revalidated_copy_keeps_its_surrogate_keys() {
    let origin = MockOrigin::start(|r| {
        if r.header("if-none-match").is_some() {
            let reply = Reply::status(304, "")
                .header("etag", "\"r1\"")
                .cc("max-age=100");
            match r.path.as_str() {
                "/reval/renamed" => reply.header("surrogate-key", "renamed"),
                _ => reply,
            }
        } else {
            Reply::ok(format!("{} v{}", r.path, r.hit))
                .cc("max-age=100")
                .header("etag", "\"r1\"")
                .header("surrogate-key", "first")
        }
    })
    .await;
    let proxy = start(&origin, &[]).await;
    for (path, tag) in [("/reval/kept", "first"), ("/reval/renamed", "renamed")] {
        let body = format!("{path} v1");
        expect(&sget(&proxy, path).await, "MISS", &body);
        proxy.advance(secs(200));
        let r = sget(&proxy, path).await;
        expect(&r, "REVALIDATED", &body);
        assert_eq!(r.header("surrogate-key"), None, "{path}: {:?}", r.headers);
        let r = sget(&proxy, path).await;
        expect(&r, "HIT-L1", &body);
        assert_eq!(r.header("surrogate-key"), None, "{path}: {:?}", r.headers);
        assert_eq!(origin.hits(path), 2, "{path}");

        let v = purge(&proxy, json!({ "tags": [tag] })).await;
        assert_eq!(count(&v, "l1_removed"), 1, "{path}: {v}");
        expect(&sget(&proxy, path).await, "MISS", &format!("{path} v3"));
    }
}

/// A soft purge of a URL whose answers vary reaches its variants in L2: an instance with nothing in
/// L1 must not find them fresh there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_purge_reaches_every_l2_variant() {
    let redis = RedisServer::start();
    let origin = vary_origin().await;
    let a = instance(&origin, &redis, ADMIN).await;
    for encoding in ENCODINGS {
        assert_eq!(vget(&a, "/l2v/soft", encoding).await.x_cache(), "MISS");
    }
    flush_l2(&a).await;
    purge(&a, json!({"key": "shared.test/l2v/soft", "soft": true})).await;

    let c = instance(&origin, &redis, ADMIN).await;
    for encoding in ENCODINGS {
        let r = vget(&c, "/l2v/soft", encoding).await;
        assert_ne!(
            r.x_cache(),
            "HIT-L2",
            "{encoding}: a soft-purged variant served fresh"
        );
    }
}

/// A soft purge of a varying URL removes its vary record from Redis; when Redis does not take
/// that removal (writes held back past REDIS_TIMEOUT), the purge is reported unfinished and done
/// once Redis takes writes again, like any purge a store missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_purge_whose_record_removal_fails_is_retried() {
    let redis = RedisServer::start();
    let origin = vary_origin().await;
    let a = instance(
        &origin,
        &redis,
        &[("ADMIN_TOKEN", TOKEN), ("REDIS_TIMEOUT", "200ms")],
    )
    .await;
    for encoding in ENCODINGS {
        assert_eq!(vget(&a, "/l2v/held", encoding).await.x_cache(), "MISS");
    }
    flush_l2(&a).await;
    let record = entry_key("/l2v/held");
    assert_eq!(redis.cli(&["exists", &record]), "1");

    // Reads go on; the record's compare-and-delete (a script that writes) waits, and times out.
    assert_eq!(redis.cli(&["client", "pause", "10000", "write"]), "OK");
    let v = purge(&a, json!({"key": "shared.test/l2v/held", "soft": true})).await;
    assert_eq!(v["l2_pending"], true, "{v}");
    assert_eq!(redis.cli(&["client", "unpause"]), "OK");
    wait_until_for("the retry removes the record", secs(20), || {
        redis.cli(&["exists", &record]) == "0"
    })
    .await;
    wait_until("nothing owed any more", || {
        a.stats().l2_purges_unfinished == 0
    })
    .await;
}
