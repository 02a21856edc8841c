//! The admin listener: /health, and its separation from the traffic listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;

#[tokio::test]
async fn health_on_the_admin_listener() {
    let origin = MockOrigin::fixed("origin", "no-store").await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let resp = get(&proxy.admin_url("/health"), &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), r#"{"status":"ok"}"#);
    assert_eq!(origin.total(), 0, "/health must not involve the origin");
}

#[tokio::test]
async fn health_answers_even_when_the_origin_is_down() {
    let proxy = TestProxy::start(&refused_url(), &[]).await;
    let resp = get(&proxy.admin_url("/health"), &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), r#"{"status":"ok"}"#);
}

#[tokio::test]
async fn traffic_port_proxies_health_to_the_origin() {
    let origin = MockOrigin::start(|_| Reply::ok("origin's own health").cc("no-store")).await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;

    let resp = get(&proxy.url("/health"), &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "origin's own health");
    assert_eq!(origin.hits("/health"), 1);
}
