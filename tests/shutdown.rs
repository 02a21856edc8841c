//! Graceful shutdown in-process: in-flight requests finish, serve() returns Ok, listeners close.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_request_completes_after_shutdown_is_triggered() {
    let origin = MockOrigin::start(|_| {
        Reply::ok("finished anyway")
            .cc("no-store")
            .delay(Duration::from_millis(500))
    })
    .await;
    let mut proxy = TestProxy::start(&origin.url(), &[]).await;
    let (addr, admin_addr) = (proxy.addr, proxy.admin_addr);

    let url = proxy.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url, &[]).await });
    origin.wait_hits("/slow", 1).await;

    proxy.trigger_shutdown();
    let resp = within("in-flight request", Duration::from_secs(10), in_flight)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "finished anyway");

    let result = proxy.wait_stopped().await;
    assert!(result.is_ok(), "serve() returned {result:?}");

    assert!(
        TcpStream::connect(addr).await.is_err(),
        "traffic listener still accepts after serve() returned"
    );
    assert!(
        TcpStream::connect(admin_addr).await.is_err(),
        "admin listener still accepts after serve() returned"
    );
}

#[tokio::test]
async fn idle_proxy_shuts_down_promptly() {
    let origin = MockOrigin::fixed("x", "no-store").await;
    let proxy = TestProxy::start(&origin.url(), &[]).await;
    assert_eq!(get(&proxy.url("/one"), &[]).await.status, 200);
    let addr = proxy.addr;
    let started = Instant::now();
    let result = proxy.shutdown().await;
    assert!(result.is_ok(), "serve() returned {result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "idle shutdown took {:?}",
        started.elapsed()
    );
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_bounds_the_wait_for_in_flight_requests() {
    let origin = MockOrigin::start(|_| Reply::ok("too late").delay(Duration::from_secs(10))).await;
    let mut proxy = TestProxy::start(&origin.url(), &[("SHUTDOWN_TIMEOUT", "300ms")]).await;

    let url = proxy.url("/very-slow");
    let in_flight = tokio::spawn(async move { get(&url, &[]).await });
    origin.wait_hits("/very-slow", 1).await;

    let started = Instant::now();
    proxy.trigger_shutdown();
    let result = proxy.wait_stopped().await;
    let took = started.elapsed();
    assert!(result.is_ok(), "serve() returned {result:?}");
    assert!(
        took < Duration::from_secs(3),
        "serve() took {took:?} with SHUTDOWN_TIMEOUT=300ms"
    );
    in_flight.abort();
}
