//! Several Strata instances sharing one Redis: every request carries the same Host so that all
//! instances compute the same cache keys, plus the small helpers the L2, purge and invalidation
//! tests share.

use super::redis::RedisServer;
use super::{get, secs, within, MockOrigin, Resp, TestProxy};

/// Every request is sent with this Host so that all instances compute the same cache key (the key
/// is host + path, and each instance listens on its own port).
pub const HOST: &str = "shared.test";

/// REDIS_TIMEOUT for the tests that assert what L2 holds rather than how fast it answers: a
/// loaded 2-core CI box can stall one 50 ms call, which would turn an expected HIT-L2 into a MISS.
pub const PATIENT_REDIS_TIMEOUT: &str = "2s";

/// The Redis key of the entry for `path` under the default prefix.
pub fn entry_key(path: &str) -> String {
    format!("strata:e:{HOST}{path}")
}

/// A Strata instance with `REDIS_URL=redis_url`, and `REDIS_TIMEOUT=redis_timeout` unless `extra`
/// sets one.
pub async fn instance_at(
    origin: &MockOrigin,
    redis_url: &str,
    redis_timeout: &str,
    extra: &[(&str, &str)],
) -> TestProxy {
    let mut vars: Vec<(&str, &str)> = vec![("REDIS_URL", redis_url)];
    if !extra.iter().any(|(k, _)| *k == "REDIS_TIMEOUT") {
        vars.push(("REDIS_TIMEOUT", redis_timeout));
    }
    vars.extend_from_slice(extra);
    TestProxy::start(&origin.url(), &vars).await
}

/// A Strata instance on `redis` (REDIS_URL), with [`PATIENT_REDIS_TIMEOUT`] unless `extra` sets
/// one.
pub async fn instance(
    origin: &MockOrigin,
    redis: &RedisServer,
    extra: &[(&str, &str)],
) -> TestProxy {
    instance_at(origin, &redis.url(), PATIENT_REDIS_TIMEOUT, extra).await
}

/// Waits (bounded) until every L2 write `proxy` queued so far has been attempted.
pub async fn flush_l2(proxy: &TestProxy) {
    within("flush_l2", secs(15), proxy.proxy.flush_l2()).await;
}

/// GET `path` on `proxy` for the shared host.
pub async fn sget(proxy: &TestProxy, path: &str) -> Resp {
    sget_with(proxy, path, &[]).await
}

/// GET `path` on `proxy` for the shared host, with further `headers`.
pub async fn sget_with(proxy: &TestProxy, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut all = vec![("host", HOST)];
    all.extend_from_slice(headers);
    get(&proxy.url(path), &all).await
}

/// Asserts status 200, the X-Cache value and the body.
#[track_caller]
pub fn expect(resp: &Resp, x_cache: &str, body: &str) {
    assert_eq!(
        (resp.status.as_u16(), resp.x_cache(), resp.text().as_str()),
        (200, x_cache, body),
        "headers: {:?}",
        resp.headers
    );
}
