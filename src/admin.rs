//! The admin listener, separate from traffic. Routes (all JSON but `/metrics`):
//! - `GET /health` → 200 `{"status":"ok"}` (liveness; never needs the token).
//! - `GET /ready` → 200 `{"status":"ready"|"degraded","redis":"up"|"down"|"disabled"}` (PINGs Redis).
//! - `GET /stats` → counters, `hit_rate`, L1 size.
//! - `GET /metrics` → Prometheus text format.
//! - `POST /purge` `{"key"|"pattern"|"tags": ..., "soft": bool}` → what was removed.
//! - `GET /cache?key=K` → the stored entry's metadata; `DELETE /cache?key=K` → purge it.
//! - `POST /warm` `{"urls": [...], "host": "..."}` → each URL fetched through the cache.
//!
//! With `ADMIN_TOKEN` set, every route but `/health` needs `Authorization: Bearer <token>`.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;

use crate::config::AdminToken;
use crate::invalidate::{Purge, Selector};
use crate::proxy::PurgeOutcome;

use crate::metrics::{render_prometheus, MetricsSources};
use crate::proxy::body::ProxyBody;
use crate::proxy::Proxy;

/// Largest admin request body (a purge or warm-up list).
const MAX_BODY: usize = 1024 * 1024;

pub async fn handle(proxy: Proxy, request: Request<Incoming>) -> Response<ProxyBody> {
    let path = request.uri().path().to_owned();
    let path = path.as_str();
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
    let query_key = request.uri().query().and_then(key_param);
    match (request.method().clone(), path) {
        (Method::GET, "/ready") => ready(&proxy).await,
        (Method::GET, "/stats") => stats(&proxy),
        (Method::GET, "/metrics") => metrics(&proxy),
        (Method::POST, "/purge") => match read_body(request).await {
            Err(response) => response,
            Ok(body) => match Purge::from_json(&body) {
                Ok(purge) => purged(proxy.purge(purge).await),
                Err(error) => bad_request(&error.to_string()),
            },
        },
        (Method::GET, "/cache") => match query_key {
            None => bad_request("give the cache key: /cache?key=host/path?query"),
            Some(key) => match proxy.describe(&key).await {
                Some(description) => json(StatusCode::OK, &description),
                None => not_found(),
            },
        },
        (Method::DELETE, "/cache") => match query_key {
            None => bad_request("give the cache key: /cache?key=host/path?query"),
            Some(key) => {
                let purge = Purge {
                    selector: Selector::Key(key),
                    soft: false,
                };
                let outcome = proxy.purge(purge).await;
                if outcome.l1_removed + outcome.l2_removed == 0 {
                    not_found()
                } else {
                    purged(outcome)
                }
            }
        },
        (Method::POST, "/warm") => match read_body(request).await {
            Err(response) => response,
            Ok(body) => warm(&proxy, &body).await,
        },
        (_, "/ready" | "/stats" | "/metrics" | "/purge" | "/cache" | "/warm") => {
            method_not_allowed()
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &json!({"error": "no such admin route"}),
        ),
    }
}

/// Whether the request carries the admin token (always true when none is configured: the
/// configuration only allows that on a loopback address).
pub fn authorized(proxy: &Proxy, headers: &HeaderMap) -> bool {
    match &proxy.config().admin_token {
        None => true,
        Some(token) => bearer_matches(token, headers),
    }
}

/// Whether `Authorization: Bearer <token>` is present and right.
pub fn bearer_matches(token: &AdminToken, headers: &HeaderMap) -> bool {
    // The scheme is case-insensitive (RFC 9110 §11.1), followed by one or more spaces.
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
    else {
        return false;
    };
    match value.split_at_checked(7) {
        Some((scheme, presented)) if scheme.eq_ignore_ascii_case(b"bearer ") => {
            token.matches(presented.trim_ascii_start())
        }
        _ => false,
    }
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
            "origin_connections": s.origin_connections,
            "origin_idle_connections": s.origin_idle_connections,
            "origin_in_flight": s.origin_in_flight,
            "origin_waiting": s.origin_waiting,
            "origin_busy": s.origin_busy,
            "coalesced": s.coalesced,
            "coalesce_waiting": s.coalesce_waiting,
            "fills_in_flight": s.fills_in_flight,
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
            "l2_writes_overtaken": s.l2_writes_overtaken,
            "l2_failovers_followed": s.l2_failovers_followed,
            "l2_breaker_open": s.l2_breaker_open == 1,
            "purges_unpublished": s.purges_unpublished,
            "l2_purges_unfinished": s.l2_purges_unfinished,
        }),
    )
}

fn metrics(proxy: &Proxy) -> Response<ProxyBody> {
    let snapshot = proxy.stats();
    let text = render_prometheus(&MetricsSources {
        stats: &proxy.0.stats,
        snapshot: &snapshot,
        l2_latency: proxy.0.cache.l2().map(|l2| &l2.stats.latency),
        origin_latency: proxy.0.origin.latency(),
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

/// The answer to a purge, wherever it came from (admin API or the PURGE method).
pub fn purged(outcome: PurgeOutcome) -> Response<ProxyBody> {
    json(
        StatusCode::OK,
        &json!({
            "l1_removed": outcome.l1_removed,
            "l2_removed": outcome.l2_removed,
            "l2_pending": outcome.l2_pending,
            "broadcast": outcome.broadcast,
        }),
    )
}

async fn warm(proxy: &Proxy, body: &[u8]) -> Response<ProxyBody> {
    let request: serde_json::Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(error) => return bad_request(&format!("malformed JSON: {error}")),
    };
    if let Some(unknown) = request.as_object().and_then(|fields| {
        fields
            .keys()
            .find(|name| !["urls", "host"].contains(&name.as_str()))
    }) {
        // A misspelt field ("hosts", "url") would otherwise warm the wrong host or nothing.
        return bad_request(&format!(
            "unknown field {unknown:?}: /warm takes \"urls\" and optionally \"host\""
        ));
    }
    let Some(urls) = request.get("urls").and_then(serde_json::Value::as_array) else {
        return bad_request("give {\"urls\": [\"/path?query\", ...]} (and optionally \"host\")");
    };
    let urls: Option<Vec<&str>> = urls.iter().map(serde_json::Value::as_str).collect();
    let Some(urls) =
        urls.filter(|urls| !urls.is_empty() && urls.iter().all(|u| u.starts_with('/')))
    else {
        return bad_request("\"urls\" must be a non-empty list of paths starting with /");
    };
    let host = match request.get("host") {
        None => proxy
            .config()
            .origin
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default(),
        Some(serde_json::Value::String(host)) if !host.is_empty() => host.clone(),
        Some(_) => return bad_request("\"host\" must be a non-empty string"),
    };
    let mut results = Vec::with_capacity(urls.len());
    for url in urls {
        let (status, x_cache) = proxy.warm(&host, url).await;
        results.push(json!({"url": url, "status": status, "x_cache": x_cache}));
    }
    json(StatusCode::OK, &json!({ "results": results }))
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Response<ProxyBody>> {
    match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => Err(bad_request(&format!(
            "cannot read the request body: {error}"
        ))),
    }
}

/// The `key` parameter of `/cache`: everything after `key=` to the end of the query,
/// percent-decoded. A cache key often ends in a query of its own (`host/p?a=1&b=2`): pasted
/// unencoded, its `&` and `=` still belong to the key (they used to cut it at the first `&`).
fn key_param(query: &str) -> Option<String> {
    let value = match query.strip_prefix("key=") {
        Some(value) => value,
        None => query.split_once("&key=")?.1,
    };
    Some(percent_decode(value)).filter(|key| !key.is_empty())
}

/// `%XX` escapes decoded; `+` stays `+` (it is a literal character in a URL's path and query, as
/// the cache key holds them, not a form-encoded space).
fn percent_decode(text: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = if bytes[i] == b'%' && i + 2 < bytes.len() {
            hex(bytes[i + 1]).zip(hex(bytes[i + 2]))
        } else {
            None
        };
        match (escaped, bytes[i]) {
            (Some((high, low)), _) => {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
            (None, other) => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn bad_request(message: &str) -> Response<ProxyBody> {
    json(StatusCode::BAD_REQUEST, &json!({ "error": message }))
}

fn not_found() -> Response<ProxyBody> {
    json(StatusCode::NOT_FOUND, &json!({"error": "not found"}))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_keys_are_decoded() {
        assert_eq!(
            key_param("x=1&key=shared.test%2Fa%3Fb%3D1").as_deref(),
            Some("shared.test/a?b=1")
        );
        assert_eq!(
            key_param("key=shared.test/a?b=1&c=2").as_deref(),
            Some("shared.test/a?b=1&c=2")
        );
        assert_eq!(
            key_param("key=shared.test/search?q=a+b").as_deref(),
            Some("shared.test/search?q=a+b")
        );
        assert_eq!(key_param("key="), None);
        assert_eq!(key_param("monkey=x"), None);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz+b"), "a%zz+b");
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let token = AdminToken::for_tests("s3cret");
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            bearer_matches(&token, &headers)
        };
        assert!(with("Bearer s3cret"));
        assert!(with("bearer s3cret"));
        assert!(with("BEARER  s3cret"));
        assert!(!with("Bearer s3cre"));
        assert!(!with("Basic s3cret"));
        assert!(!with("Bearers3cret"));
    }
}
