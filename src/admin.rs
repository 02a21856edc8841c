//! The admin listener, separate from traffic. Routes:
//! - `GET /health` → 200 `{"status":"ok"}` once serving (liveness).
//!
//! (Readiness, stats, metrics, purge and warm-up routes arrive with the invalidation milestone.)

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::proxy::body::ProxyBody;
use crate::proxy::Proxy;

pub async fn handle<B>(_proxy: Proxy, request: Request<B>) -> Response<ProxyBody> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/health") | (&Method::HEAD, "/health") => {
            json(StatusCode::OK, r#"{"status":"ok"}"#)
        }
        (_, "/health") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method not allowed"}"#,
        ),
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#),
    }
}

fn json(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::from(body));
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
