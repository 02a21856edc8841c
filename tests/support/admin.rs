//! Admin API clients: bearer-authorised requests on a [`TestProxy`]'s admin listener, JSON replies
//! and purges. Each test file keeps its own token and passes it in.

use serde_json::Value;

use super::{request, Resp, TestProxy};

/// A proxy in front of `origin_url` with `ADMIN_TOKEN=token`, plus `extra` settings.
pub async fn start_with_token(origin_url: &str, token: &str, extra: &[(&str, &str)]) -> TestProxy {
    let mut vars: Vec<(&str, &str)> = vec![("ADMIN_TOKEN", token)];
    vars.extend_from_slice(extra);
    TestProxy::start(origin_url, &vars).await
}

/// `Bearer {token}`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An admin request; `auth` is the whole Authorization value (None: no header), and a body is sent
/// as JSON.
pub async fn admin_request(
    proxy: &TestProxy,
    method: &str,
    path: &str,
    body: Option<&str>,
    auth: Option<&str>,
) -> Resp {
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(auth) = auth {
        headers.push(("authorization", auth));
    }
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    request(
        method,
        &proxy.admin_url(path),
        &headers,
        body.unwrap_or("").to_string(),
    )
    .await
}

/// An admin request authorised with `token`; a non-empty `body` is sent as JSON.
pub async fn authorized(
    proxy: &TestProxy,
    token: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Resp {
    let body = (!body.is_empty()).then_some(body);
    admin_request(proxy, method, path, body, Some(&bearer(token))).await
}

/// An authorised GET on the admin listener.
pub async fn admin_get(proxy: &TestProxy, token: &str, path: &str) -> Resp {
    authorized(proxy, token, "GET", path, "").await
}

/// The body parsed as JSON (panics with the body when it is not JSON).
#[track_caller]
pub fn json_of(resp: &Resp) -> Value {
    serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", resp.text()))
}

/// POST /purge with `body`, authorised with `token`; asserts 200 and the reply's shape, returns
/// the reply.
pub async fn purge_with(proxy: &TestProxy, token: &str, body: Value) -> Value {
    let resp = authorized(proxy, token, "POST", "/purge", &body.to_string()).await;
    assert_eq!(resp.status, 200, "purge {body}: {:?}", resp.text());
    let v = json_of(&resp);
    assert!(
        v["l1_removed"].is_u64() && v["l2_removed"].is_u64() && v["broadcast"].is_boolean(),
        "purge {body}: reply {v}"
    );
    v
}
