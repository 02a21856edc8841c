//! The leader's work for one key: ask the origin (conditionally when a stale copy has validators),
//! then either revalidate the stored copy (304), serve stale on failure, pass an uncacheable answer
//! through, or stream a cacheable answer to the client while a fill task keeps a copy for the cache.
//!
//! The fill task owns the origin body: a client that goes away does not stop the fill, so followers
//! still get their answer; a body that grows past `CACHE_MAX_OBJECT_MB` releases the followers at once
//! and keeps streaming.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::body::{BoxError, IdleTimeout, ProxyBody};
use super::respond::{self, Detail, Fwd};
use super::{headers, is_origin_failure, Proxy, Target};
use crate::cache::entry::Admission;
use crate::cache::policy::{admit, merge_not_modified, revalidation_matches};
use crate::cache::Entry;
use crate::coalesce::FlightPermit;

/// Chunks buffered between the fill task and a slow client before the origin read waits.
const CLIENT_CHANNEL_CHUNKS: usize = 16;

/// Request fields that belong to the client's own conditional or partial request, not to a fill.
const CLIENT_ONLY: [header::HeaderName; 6] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

impl Proxy {
    pub(super) async fn lead(
        &self,
        parts: Parts,
        target: &Target,
        stored: Option<Arc<Entry>>,
        permit: FlightPermit,
        fwd: Fwd,
    ) -> Response<ProxyBody> {
        let inner = &self.0;
        let policy_request = policy_request(&parts, &target.host);
        let mut upstream = copy_parts(&parts);
        for name in CLIENT_ONLY {
            upstream.headers.remove(name);
        }
        let revalidating = stored
            .as_ref()
            .filter(|entry| entry.has_validators())
            .cloned();
        if let Some(entry) = &revalidating {
            if let Some(etag) = &entry.etag {
                upstream.headers.insert(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(modified) = entry.headers.get(header::LAST_MODIFIED) {
                upstream
                    .headers
                    .insert(header::IF_MODIFIED_SINCE, modified.clone());
            }
        }

        let result = self
            .send_to_origin(upstream, ProxyBody::empty(), target)
            .await;
        let now = inner.clock.now();
        let stale_on_error = stored
            .as_ref()
            .filter(|entry| entry.may_serve_on_error(now));
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                permit.release();
                return match stale_on_error {
                    Some(entry) => respond::from_entry(
                        entry,
                        &parts.headers,
                        false,
                        now,
                        Detail::StaleIfError(None),
                    ),
                    None => self.origin_error(error, target),
                };
            }
        };
        let status = response.status();
        if is_origin_failure(status) {
            if let Some(entry) = stale_on_error {
                permit.release();
                drop(response);
                return respond::from_entry(
                    entry,
                    &parts.headers,
                    false,
                    now,
                    Detail::StaleIfError(Some(status)),
                );
            }
        }

        let (mut response_parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut response_parts.headers);

        if status == StatusCode::NOT_MODIFIED {
            if let Some(entry) = revalidating {
                if revalidation_matches(&entry.headers, &response_parts.headers) {
                    return self.revalidated(
                        &parts,
                        &policy_request,
                        target,
                        &entry,
                        &response_parts.headers,
                        permit,
                        fwd,
                    );
                }
                // A 304 for some other representation: ask again without validators, store nothing.
                permit.release();
                return self
                    .forward(copy_parts(&parts), ProxyBody::empty(), target, None, fwd)
                    .await;
            }
        }

        let admission = match admit(
            &policy_request,
            status,
            &response_parts.headers,
            now,
            &inner.config,
        ) {
            Ok(admission) => admission,
            Err(reason) => {
                permit.release();
                // The origin now answers this URL with something not to be stored: the old copy goes.
                if stored.is_some() && !is_origin_failure(status) {
                    self.invalidate(&target.key);
                }
                tracing::debug!(?reason, status = status.as_u16(), "response not stored");
                let response = Response::from_parts(response_parts, body);
                return self.pass_through(response, Detail::Miss { stored: false, fwd });
            }
        };
        let declared_length = response_parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|length| length > inner.config.max_object_bytes) {
            permit.release();
            let response = Response::from_parts(response_parts, body);
            return self.pass_through(response, Detail::Miss { stored: false, fwd });
        }

        let (tx, rx) = mpsc::channel(CLIENT_CHANNEL_CHUNKS);
        let fill = Fill {
            proxy: self.clone(),
            key: target.key.clone(),
            request_headers: parts.headers,
            status,
            headers: response_parts.headers.clone(),
            admission,
            response_time: now,
        };
        tokio::spawn(fill.run(body, tx, permit));

        headers::to_client(&mut response_parts.headers);
        respond::mark(
            &mut response_parts.headers,
            Detail::Miss { stored: true, fwd },
            None,
        );
        Response::from_parts(response_parts, ProxyBody::channel(rx))
    }

    /// The origin confirmed the stored copy (304): update its headers and freshness, store it again
    /// and answer the client with the full response.
    #[allow(clippy::too_many_arguments)]
    fn revalidated(
        &self,
        parts: &Parts,
        policy_request: &Parts,
        target: &Target,
        stale: &Entry,
        not_modified: &http::HeaderMap,
        permit: FlightPermit,
        fwd: Fwd,
    ) -> Response<ProxyBody> {
        let inner = &self.0;
        let now = inner.clock.now();
        let detail = Detail::Revalidated {
            forced: fwd == Fwd::Request,
        };
        let merged = merge_not_modified(&stale.headers, not_modified);
        match admit(policy_request, stale.status, &merged, now, &inner.config) {
            Ok(admission) => {
                let entry = Arc::new(Entry::new(
                    stale.status,
                    merged,
                    stale.body.clone(),
                    now,
                    admission,
                ));
                if permit.is_invalidated() {
                    permit.release();
                } else {
                    inner
                        .cache
                        .store(&target.key, entry.clone(), &parts.headers);
                    if entry.is_fresh(now) {
                        permit.complete(entry.clone());
                    } else {
                        permit.release();
                    }
                }
                respond::from_entry(&entry, &parts.headers, false, now, detail)
            }
            Err(_) => {
                permit.release();
                self.invalidate(&target.key);
                respond::from_entry(stale, &parts.headers, false, now, detail)
            }
        }
    }
}

/// A cacheable origin body on its way to the client and into the cache.
struct Fill {
    proxy: Proxy,
    key: String,
    request_headers: http::HeaderMap,
    status: StatusCode,
    headers: http::HeaderMap,
    admission: Admission,
    response_time: std::time::SystemTime,
}

impl Fill {
    async fn run(
        self,
        mut body: Incoming,
        tx: mpsc::Sender<Result<Bytes, BoxError>>,
        permit: FlightPermit,
    ) {
        let inner = &self.proxy.0;
        let idle = inner.origin.timeout();
        let max = inner.config.max_object_bytes;
        let mut client = ClientFeed::new(tx);
        let mut storing = Some(permit);
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut size: u64 = 0;
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Ok(None) => break,
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, "origin body failed; not stored");
                    drop(storing);
                    client.fail(error.into()).await;
                    return;
                }
                Err(_) => {
                    tracing::warn!(?idle, "origin body stalled; not stored");
                    drop(storing);
                    client.fail(IdleTimeout(idle).into()).await;
                    return;
                }
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers are not stored
            };
            if storing.is_some() {
                size += data.len() as u64;
                if size > max {
                    // Too big to store: followers go to the origin themselves, the client keeps streaming.
                    if let Some(permit) = storing.take() {
                        permit.release();
                    }
                    chunks = Vec::new();
                } else {
                    chunks.push(data.clone());
                }
            }
            if storing.is_some() {
                // The body is being kept anyway: a slow client must not slow the followers down.
                client.push(data);
            } else {
                client.send(data).await;
                if client.is_gone() {
                    return;
                }
            }
        }
        if let Some(permit) = storing {
            let body = concat(chunks, size);
            let entry = Arc::new(Entry::new(
                self.status,
                self.headers,
                body,
                self.response_time,
                self.admission,
            ));
            if permit.is_invalidated() {
                permit.release();
            } else {
                inner
                    .cache
                    .store(&self.key, entry.clone(), &self.request_headers);
                if entry.is_fresh(inner.clock.now()) {
                    permit.complete(entry);
                } else {
                    // Stored only for revalidation (no freshness): concurrent requests must ask the origin.
                    permit.release();
                }
            }
        }
        client.finish().await;
    }
}

/// The leader's client, fed without blocking the fill while the body is being stored (its backlog
/// shares the stored chunks, so it costs no extra memory), with backpressure otherwise.
struct ClientFeed {
    tx: Option<mpsc::Sender<Result<Bytes, BoxError>>>,
    backlog: std::collections::VecDeque<Bytes>,
}

impl ClientFeed {
    fn new(tx: mpsc::Sender<Result<Bytes, BoxError>>) -> Self {
        ClientFeed {
            tx: Some(tx),
            backlog: std::collections::VecDeque::new(),
        }
    }

    fn is_gone(&self) -> bool {
        self.tx.is_none()
    }

    /// Queues a chunk and hands over whatever the channel takes now.
    fn push(&mut self, data: Bytes) {
        if self.tx.is_none() {
            return;
        }
        self.backlog.push_back(data);
        while let (Some(tx), Some(chunk)) = (&self.tx, self.backlog.pop_front()) {
            match tx.try_send(Ok(chunk)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(Ok(chunk))) => {
                    self.backlog.push_front(chunk);
                    break;
                }
                Err(_) => {
                    self.tx = None;
                    self.backlog.clear();
                }
            }
        }
    }

    /// Sends a chunk after the backlog, waiting for the client.
    async fn send(&mut self, data: Bytes) {
        self.backlog.push_back(data);
        self.flush().await;
    }

    async fn flush(&mut self) {
        while let (Some(tx), Some(chunk)) = (&self.tx, self.backlog.pop_front()) {
            if tx.send(Ok(chunk)).await.is_err() {
                self.tx = None;
                self.backlog.clear();
            }
        }
    }

    /// Delivers the rest, then ends the body.
    async fn finish(mut self) {
        self.flush().await;
    }

    /// Delivers what arrived, then aborts the body so the client never sees a complete-looking one.
    async fn fail(mut self, error: BoxError) {
        self.flush().await;
        if let Some(tx) = &self.tx {
            let _ = tx.send(Err(error)).await;
        }
    }
}

fn concat(chunks: Vec<Bytes>, size: u64) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.into_iter().next().unwrap_or_default(),
        _ => {
            let mut joined = BytesMut::with_capacity(usize::try_from(size).unwrap_or(0));
            for chunk in chunks {
                joined.extend_from_slice(&chunk);
            }
            joined.freeze()
        }
    }
}

/// The request as the cache policy sees it: a GET for the path, the client's headers, and `Host`.
fn policy_request(parts: &Parts, host: &str) -> Parts {
    let mut request = copy_parts(parts);
    request.method = Method::GET;
    if let Some(pq) = parts.uri.path_and_query() {
        if let Ok(uri) = pq.as_str().parse() {
            request.uri = uri;
        }
    }
    if !request.headers.contains_key(header::HOST) {
        if let Ok(value) = HeaderValue::from_str(host) {
            request.headers.insert(header::HOST, value);
        }
    }
    request
}

/// `Parts` is not `Clone` (its extensions are not); requests going upstream need only these fields.
pub(super) fn copy_parts(parts: &Parts) -> Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}
