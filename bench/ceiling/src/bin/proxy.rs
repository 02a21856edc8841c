//! The pass-through ceiling: a minimal hyper reverse proxy that sends every request to the origin
//! over hyper-util's pooled client and streams the answer back, with no cache, no header rewriting
//! and no checks. It is what the pass-through path of any proxy built on Strata's stack (hyper,
//! hyper-util, tokio) costs at least.
//!   strata-proxy-ceiling 127.0.0.1:18011 127.0.0.1:18000

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use strata_bench_servers::{listen_addr, serve, Scheduler};

fn main() {
    let origin = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "127.0.0.1:18000".into());
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    serve(
        listen_addr(),
        Scheduler::LikeStrata,
        move |request: Request<Incoming>| {
            let client = client.clone();
            let origin = origin.clone();
            async move {
                let (mut parts, body) = request.into_parts();
                let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
                parts.uri = match Uri::try_from(format!("http://{origin}{path}")) {
                    Ok(uri) => uri,
                    Err(_) => return bad_gateway(),
                };
                match client.request(Request::from_parts(parts, body)).await {
                    Ok(response) => response.map(Either::Left),
                    Err(_) => bad_gateway(),
                }
            }
        },
    );
}

type Either = http_body_util::Either<Incoming, http_body_util::Empty<bytes::Bytes>>;

fn bad_gateway() -> Response<Either> {
    let mut response = Response::new(Either::Right(http_body_util::Empty::new()));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
