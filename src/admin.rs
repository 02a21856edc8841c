//! The admin listener, separate from traffic. Routes (all JSON but `/metrics`):
//! - `GET /health` → 200 `{"status":"ok"}` (liveness; never needs the token).
//! - `GET /ready` → 200 `{"status":"ready"|"degraded","redis":"up"|"down"|"disabled"}` (PINGs Redis).
//! - `GET /stats` → counters, `hit_rate`, L1 size.
//! - `GET /metrics` → Prometheus text format.
//!
//! With `ADMIN_TOKEN` set, every route but `/health` needs `Authorization: Bearer <token>`.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::metrics::{render_prometheus, MetricsSources};
use crate::proxy::body::ProxyBody;
use crate::proxy::Proxy;

pub async fn handle<B>(proxy: Proxy, request: Request<B>) -> Response<ProxyBody> {
    let path = request.uri().path();
    if path == "/health" {
        return match *request.method() {
            Method::GET | Method::HEAD => json(StatusCode::OK, &json!({"status": "ok"})),
            _ => method_not_allowed(),
        };
    }
    if !authorized(&proxy, request.headers()) {
        let mut response = json(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "missing or wrong admin token (Authorization: Bearer <ADMIN_TOKEN>)"}),
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    match (request.method(), path) {
        (&Method::GET, "/ready") => ready(&proxy).await,
        (&Method::GET, "/stats") => stats(&proxy),
        (&Method::GET, "/metrics") => metrics(&proxy),
        (_, "/ready" | "/stats" | "/metrics") => method_not_allowed(),
        _ => json(
            StatusCode::NOT_FOUND,
            &json!({"error": "no such admin route"}),
        ),
    }
}

/// Whether the request carries the admin token (always true when none is configured: the
/// configuration only allows that on a loopback address).
pub fn authorized(proxy: &Proxy, headers: &HeaderMap) -> bool {
    let Some(token) = &proxy.config().admin_token else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|presented| token.matches(presented))
}

async fn ready(proxy: &Proxy) -> Response<ProxyBody> {
    let redis = match proxy.redis_reachable().await {
        None => "disabled",
        Some(true) => "up",
        Some(false) => "down",
    };
    let status = if redis == "down" { "degraded" } else { "ready" };
    // Still 200 when degraded: Redis is an accelerator, this instance serves without it.
    json(StatusCode::OK, &json!({"status": status, "redis": redis}))
}

fn stats(proxy: &Proxy) -> Response<ProxyBody> {
    let s = proxy.stats();
    let answered_from_cache = s.hits + s.stale;
    let lookups = answered_from_cache + s.misses + s.revalidated;
    let hit_rate = if lookups == 0 {
        0.0
    } else {
        answered_from_cache as f64 / lookups as f64
    };
    json(
        StatusCode::OK,
        &json!({
            "hits": s.hits,
            "l1_hits": s.l1_hits,
            "l2_hits": s.l2_hits,
            "misses": s.misses,
            "stale": s.stale,
            "revalidated": s.revalidated,
            "bypass": s.bypass,
            "hit_rate": hit_rate,
            "l1_bytes": s.l1_bytes,
            "l1_capacity_bytes": s.l1_capacity_bytes,
            "l1_entries": s.l1_entries,
            "l1_evictions": s.l1_evictions,
            "origin_requests": s.origin_requests,
            "origin_errors": s.origin_errors,
            "coalesced": s.coalesced,
            "refreshes": s.refreshes,
            "purges": s.purges,
            "invalidations_sent": s.invalidations_sent,
            "invalidations_received": s.invalidations_received,
            "invalidations_applied": s.invalidations_applied,
            "pubsub_reconnects": s.pubsub_reconnects,
            "l2_errors": s.l2_errors,
            "l2_timeouts": s.l2_timeouts,
            "l2_writes": s.l2_writes,
            "l2_dropped_writes": s.l2_dropped_writes,
            "l2_corrupt": s.l2_corrupt,
            "l2_breaker_open": s.l2_breaker_open == 1,
        }),
    )
}

fn metrics(proxy: &Proxy) -> Response<ProxyBody> {
    let snapshot = proxy.stats();
    let text = render_prometheus(&MetricsSources {
        stats: &proxy.0.stats,
        snapshot: &snapshot,
        l2_latency: proxy.0.cache.l2().map(|l2| &l2.stats.latency),
    });
    let mut response = Response::new(ProxyBody::full(text.into()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn method_not_allowed() -> Response<ProxyBody> {
    json(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"error": "method not allowed"}),
    )
}

/// A JSON answer.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(value.to_string().into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
