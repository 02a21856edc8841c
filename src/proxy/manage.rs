//! Operations the admin API (and the `PURGE` method) drive on a running proxy: purge, describe a
//! stored entry, warm a URL through the cache.

use std::net::SocketAddr;
use std::time::SystemTime;

use http::{header, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use super::body::ProxyBody;
use super::respond::{self, Detail};
use super::{cache_status_of, headers, Proxy, PurgeOutcome, Target};
use crate::cache::l1::Slot;
use crate::invalidate::{Purge, Selector};
use crate::metrics::Stats;

impl Proxy {
    /// The stored response for a cache key, as the admin API shows it (`GET /cache`).
    pub async fn describe(&self, key: &str) -> Option<serde_json::Value> {
        let inner = &self.0;
        let now = inner.clock.now();
        let (tier, entry, variants) = match inner.cache.l1().get(key) {
            Some(Slot::Entry(entry)) => ("l1", entry, 1),
            Some(Slot::Vary(_)) => {
                let prefix = format!("{key}\u{0}");
                let found = inner
                    .cache
                    .l1()
                    .entries_where(|storage_key, _| storage_key.starts_with(&prefix));
                let first = found.first()?.1.clone();
                ("l1", first, found.len())
            }
            Some(Slot::Pass(_)) | None => match inner.cache.l2()?.get(key).await? {
                Slot::Entry(entry) => ("l2", entry, 1),
                Slot::Vary(record) => {
                    let names: Vec<&str> = record.names.iter().map(|n| n.as_str()).collect();
                    return Some(
                        serde_json::json!({"key": key, "tier": "l2", "vary": names, "variants": null}),
                    );
                }
                Slot::Pass(_) => return None,
            },
        };
        let stored_at = entry
            .response_time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let vary: Vec<&str> = entry
            .variant
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        Some(serde_json::json!({
            "key": key,
            "tier": tier,
            "status": entry.status.as_u16(),
            "stored_at": stored_at,
            "ttl": entry.ttl_secs(now),
            "age": entry.age(now),
            "size": entry.body.len(),
            "variants": variants,
            "vary": vary,
            "tags": entry.tags,
            "fresh": entry.is_fresh(now),
        }))
    }

    /// Fetches one URL through the normal cache path (`POST /warm`): (status, X-Cache).
    pub async fn warm(&self, host: &str, path_and_query: &str) -> (u16, String) {
        let (Ok(uri), Ok(host_value)) = (
            path_and_query.parse::<Uri>(),
            http::HeaderValue::from_str(host),
        ) else {
            return (400, "-".to_string());
        };
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = Method::GET;
        parts.headers.insert(header::HOST, host_value);
        let target = Target::new(host, &uri, SocketAddr::from(([127, 0, 0, 1], 0)));
        parts.uri = uri;
        let response = self.cached(parts, target).await;
        self.0.stats.count(cache_status_of(&response));
        let status = response.status().as_u16();
        let x_cache = response
            .headers()
            .get(headers::X_CACHE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        // Reading the body lets the fill finish (it is stored as the body completes).
        let deadline = self.0.config.origin_timeout.saturating_mul(2);
        let _ = tokio::time::timeout(
            deadline,
            http_body_util::BodyExt::collect(response.into_body()),
        )
        .await;
        (status, x_cache)
    }

    /// `PURGE /path` on the traffic port (Varnish/Squid convention): a key purge of that URL, only
    /// with the admin token (never open, even when the admin listener is on loopback without one).
    pub(super) async fn purge_method(
        &self,
        request: &Request<Incoming>,
        target: Target,
    ) -> Response<ProxyBody> {
        let token_ok = self
            .0
            .config
            .admin_token
            .as_ref()
            .is_some_and(|token| crate::admin::bearer_matches(token, request.headers()));
        if !token_ok {
            let mut response = crate::admin::json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "PURGE needs Authorization: Bearer <ADMIN_TOKEN>"}),
            );
            respond::mark(response.headers_mut(), Detail::Bypass, None);
            return response;
        }
        let soft = request
            .headers()
            .get("soft-purge")
            .is_some_and(|v| v.as_bytes() == b"1" || v.as_bytes().eq_ignore_ascii_case(b"true"));
        let outcome = self
            .purge(Purge {
                selector: Selector::Key(target.key),
                soft,
            })
            .await;
        let mut response = crate::admin::purged(outcome);
        respond::mark(response.headers_mut(), Detail::Bypass, None);
        response
    }

    /// Applies a purge (admin API, PURGE method) to L1 and every L2 store.
    pub async fn purge(&self, purge: Purge) -> PurgeOutcome {
        let inner = &self.0;
        Stats::incr(&inner.stats.purges);
        let now = inner.clock.now();
        let l1_removed = crate::invalidate::purge_here(inner, &purge, now);
        PurgeOutcome {
            l1_removed,
            ..self.purge_beyond_l1(&purge, now).await
        }
    }

    /// A purge already logged and applied to this L1 goes to every L2 store, then to the other
    /// instances, in that order: told first, another instance could refill its L1 from the copy
    /// still in L2. A store that did not take it gets it later (`invalidate::purge_l2`).
    pub(crate) async fn purge_beyond_l1(&self, purge: &Purge, now: SystemTime) -> PurgeOutcome {
        let (l2_removed, l2_pending) = crate::invalidate::purge_l2(&self.0, purge, now).await;
        PurgeOutcome {
            l1_removed: 0,
            l2_removed,
            l2_pending,
            broadcast: self.broadcast(purge).await,
        }
    }
}
