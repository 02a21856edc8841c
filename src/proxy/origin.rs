//! The origin client: pooled keep-alive connections (http or https), the origin's URL prefix, and
//! the deadline to response headers.

use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::ProxyBody;
use crate::config::Config;

/// Why the origin gave no response. Maps to 502 (unreachable, broken) or 504 (too slow).
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("origin unreachable: {0}")]
    Unreachable(String),
    #[error("origin did not answer within {0:?}")]
    Timeout(Duration),
    #[error("origin request failed: {0}")]
    Failed(String),
}

pub struct Origin {
    client: Client<HttpsConnector<HttpConnector>, ProxyBody>,
    scheme: Scheme,
    authority: Authority,
    /// The path of `ORIGIN_URL` without its trailing slash ("" when none).
    prefix: String,
    timeout: Duration,
}

impl Origin {
    pub fn new(config: &Config) -> std::io::Result<Origin> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.origin_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()?
            .https_or_http()
            // HTTP/1.1 only: over h2 the origin would see `:authority` (ORIGIN_URL's host) and a
            // different `Host` (the client's), which RFC 9113 §8.3.1 forbids and servers route apart.
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector);
        let scheme = config.origin.scheme().cloned().unwrap_or(Scheme::HTTP);
        let authority = config.origin.authority().cloned().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "ORIGIN_URL has no host")
        })?;
        let prefix = config.origin.path().trim_end_matches('/').to_string();
        Ok(Origin {
            client,
            scheme,
            authority,
            prefix,
            timeout: config.origin_timeout,
        })
    }

    /// The origin URL for a client's path and query.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = path_and_query.map_or("/", PathAndQuery::as_str);
        let joined;
        let pq = if self.prefix.is_empty() {
            pq
        } else {
            joined = format!("{}{}", self.prefix, pq);
            &joined
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }

    /// Sends a request, waiting at most `ORIGIN_TIMEOUT` for the response headers.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, OriginError> {
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => Err(OriginError::Timeout(self.timeout)),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) if e.is_connect() => Err(OriginError::Unreachable(error_chain(&e))),
            Ok(Err(e)) => Err(OriginError::Failed(error_chain(&e))),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
