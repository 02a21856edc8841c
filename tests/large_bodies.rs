//! Large and streamed bodies: objects over CACHE_MAX_OBJECT_MB stream through unstored, bodies reach
//! the client before the origin finishes, and L1 stays within CACHE_SIZE_MB.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http_body_util::BodyExt;
use support::*;
use tokio::sync::Notify;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_large_body_streams_and_is_not_stored() {
    let origin = MockOrigin::start(|_| Reply::sized(2 * MIB, true).cc("max-age=60")).await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_MAX_OBJECT_MB", "1")]).await;
    let expected = pattern(2 * MIB);

    for round in 1..=2 {
        let r = get(&proxy.url("/big"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.x_cache(), "MISS", "round {round}");
        assert_eq!(r.body.len(), 2 * MIB);
        assert!(r.body == expected, "round {round}: body differs");
    }
    assert_eq!(
        origin.hits("/big"),
        2,
        "an oversized object must not be stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_length_body_growing_past_the_limit_is_not_stored() {
    let origin = MockOrigin::start(|r| match r.path.as_str() {
        "/small-chunked" => Reply::sized(100 * 1024, false).cc("max-age=60"),
        _ => Reply::sized(2 * MIB, false).cc("max-age=60"),
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_MAX_OBJECT_MB", "1")]).await;
    let expected = pattern(2 * MIB);

    for round in 1..=2 {
        let r = get(&proxy.url("/growing"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.x_cache(), "MISS", "round {round}");
        assert!(r.body == expected, "round {round}: body differs");
    }
    assert_eq!(origin.hits("/growing"), 2);

    // An unknown-length body under the limit is stored as usual.
    assert_eq!(
        get(&proxy.url("/small-chunked"), &[]).await.x_cache(),
        "MISS"
    );
    let r = get(&proxy.url("/small-chunked"), &[]).await;
    assert_eq!(r.x_cache(), "HIT-L1");
    assert!(r.body == pattern(100 * 1024));
    assert_eq!(origin.hits("/small-chunked"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_reach_the_client_before_the_origin_finishes() {
    let gate = Arc::new(Notify::new());
    let origin_gate = gate.clone();
    let origin = MockOrigin::start(move |_| {
        Reply::gated("first-chunk;", origin_gate.clone(), "rest-of-body").cc("max-age=60")
    })
    .await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let resp = request_streaming("GET", &proxy.url("/stream"), &[], empty()).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = BytesMut::new();
    while got.len() < "first-chunk;".len() {
        let frame = within(
            "first chunk while the origin holds the rest back",
            Duration::from_secs(5),
            body.frame(),
        )
        .await
        .expect("body ended early")
        .unwrap();
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    assert_eq!(&got[..], b"first-chunk;");

    gate.notify_one();
    let rest = within("rest of the body", Duration::from_secs(5), body.collect())
        .await
        .unwrap()
        .to_bytes();
    got.extend_from_slice(&rest);
    assert_eq!(&got[..], b"first-chunk;rest-of-body");

    // The teed copy was stored complete.
    let r = get(&proxy.url("/stream"), &[]).await;
    assert_eq!(r.x_cache(), "HIT-L1");
    assert_eq!(r.text(), "first-chunk;rest-of-body");
    assert_eq!(origin.hits("/stream"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_stays_within_cache_size() {
    let origin = MockOrigin::start(|_| Reply::sized(50 * 1024, true).cc("max-age=600")).await;
    let proxy = TestProxy::start(
        &origin.url(),
        &[("CACHE_SIZE_MB", "1"), ("CACHE_MAX_OBJECT_MB", "1")],
    )
    .await;
    let capacity = MIB as u64;
    assert_eq!(proxy.stats().l1_capacity_bytes, capacity);

    let mut max_seen = 0;
    for i in 0..200 {
        let r = get(&proxy.url(&format!("/obj/{i}")), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 50 * 1024);
        let stats = proxy.stats();
        assert!(
            stats.l1_bytes <= capacity,
            "after {} objects l1_bytes = {} > {capacity}",
            i + 1,
            stats.l1_bytes
        );
        max_seen = max_seen.max(stats.l1_bytes);
    }
    let stats = proxy.stats();
    assert_eq!(origin.total(), 200);
    assert_eq!(stats.l1_capacity_bytes, capacity);
    assert!(stats.l1_entries >= 1, "nothing kept in L1: {stats:?}");
    assert!(
        stats.l1_entries < 200,
        "everything kept in a 1 MiB L1: {stats:?}"
    );
    assert!(max_seen > 0, "L1 never accounted any bytes");
}

#[tokio::test]
async fn cache_size_zero_disables_l1() {
    let origin = MockOrigin::fixed("uncached", "max-age=60").await;
    let proxy = TestProxy::start(&origin.url(), &[("CACHE_SIZE_MB", "0")]).await;
    for _ in 0..2 {
        let r = get(&proxy.url("/zero"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "uncached");
        assert_eq!(r.x_cache(), "MISS");
    }
    assert_eq!(origin.hits("/zero"), 2);
    let stats = proxy.stats();
    assert_eq!(stats.l1_bytes, 0);
    assert_eq!(stats.l1_entries, 0);
}
