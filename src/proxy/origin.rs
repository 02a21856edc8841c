//! The origin client: keep-alive HTTP/1.1 connections (http or https) to the one origin, pooled
//! here, the origin's URL prefix, and the deadline to response headers.
//!
//! Strata talks to exactly one origin, so the pool is a single stack of idle connections rather
//! than the general keyed pool of hyper-util's client: a request takes the most recently used idle
//! connection (warm in the origin's caches too), and the connection goes back to the stack when the
//! response body has been read to its end. Nothing is spawned per request; a connection costs one
//! task for its lifetime.
//!
//! `ORIGIN_MAX_CONNS` bounds the requests in flight to the origin (so the connections open to it:
//! a new one is opened only when every kept one is busy). A request takes a slot before it goes
//! out, and gives it back when its connection goes back to the pool or is closed (its response read
//! or dropped); without a free slot a request waits up to `ORIGIN_TIMEOUT`, then fails as
//! [`OriginError::Busy`] (503). An upgraded (WebSocket) connection gives its slot back at once.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower_service::Service;

use super::body::ProxyBody;
use super::headers;
use crate::config::Config;
use crate::metrics::Histogram;

/// How long a request waits for a returned connection that is not ready yet (see `checkout`).
const BUSY_GRACE: Duration = Duration::from_millis(50);
/// A kept-alive connection idle this long may be closed by the origin just as a request goes out
/// on it (origins' keep-alive timeouts are seconds: Node and Apache 5 s). A bodiless GET or HEAD
/// sent on such a connection is kept so that it can be sent once more on a new connection.
const REPLAY_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Why the origin gave no response. Maps to 502 (unreachable, broken) or 504 (too slow).
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("origin unreachable: {0}")]
    Unreachable(String),
    #[error("origin did not answer within {0:?}")]
    Timeout(Duration),
    #[error("origin request failed: {0}")]
    Failed(String),
    #[error("ORIGIN_MAX_CONNS requests stayed in flight to the origin for {0:?}")]
    Busy(Duration),
}

pub struct Origin {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/` of `ORIGIN_URL`: where the connector connects.
    connect_to: Uri,
    /// `ORIGIN_URL`'s authority, the `Host` of a request that somehow has none.
    authority: HeaderValue,
    idle: Arc<IdlePool>,
    /// Connections opened so far (with `idle_connections`, how well keep-alive works).
    opened: AtomicU64,
    /// The path of `ORIGIN_URL` without its trailing slash ("" when none).
    prefix: String,
    timeout: Duration,
    /// Requests waiting for a slot now.
    waiting: AtomicU64,
    /// Requests that found no slot within `ORIGIN_TIMEOUT`.
    busy: AtomicU64,
    /// Time to response headers, from when the request could go out (its slot taken).
    latency: Histogram,
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
        let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
        let scheme = config.origin.scheme().cloned().unwrap_or(Scheme::HTTP);
        let authority: Authority = config
            .origin
            .authority()
            .cloned()
            .ok_or_else(|| invalid("ORIGIN_URL has no host"))?;
        let connect_to = Uri::builder()
            .scheme(scheme)
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|_| invalid("ORIGIN_URL is not a valid URL"))?;
        let authority = HeaderValue::from_str(authority.as_str())
            .map_err(|_| invalid("ORIGIN_URL has an invalid host"))?;
        let prefix = config.origin.path().trim_end_matches('/').to_string();
        // An idle connection older than ORIGIN_IDLE_TIMEOUT is closed rather than reused: origins
        // and load balancers in between drop quiet connections after a while, and a request sent
        // on one of those as they do fails.
        // At most ORIGIN_MAX_IDLE are kept, the most recently used (see `checkin`).
        let idle = Arc::new(IdlePool::new(
            config.origin_idle_timeout,
            config.origin_max_idle,
            config.origin_max_conns,
        ));
        IdlePool::sweep_in_background(&idle);
        Ok(Origin {
            connector,
            connect_to,
            authority,
            idle,
            opened: AtomicU64::new(0),
            prefix,
            timeout: config.origin_timeout,
            waiting: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            latency: Histogram::default(),
        })
    }

    /// The request target sent to the origin (origin-form) for a client's path and query.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        if self.prefix.is_empty() {
            // Shares the client's bytes: no copy, no parse.
            return Ok(
                path_and_query.map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()))
            );
        }
        let pq = path_and_query.map_or("/", PathAndQuery::as_str);
        if pq == "*" {
            return Ok(Uri::from_static("*")); // `OPTIONS *` names the server, not a path
        }
        Uri::try_from(format!("{}{}", self.prefix, pq)).map_err(Into::into)
    }

    /// Sends a request, waiting at most `ORIGIN_TIMEOUT` for the response headers (after the
    /// request body's last chunk, when it has one).
    pub async fn send(
        &self,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<OriginBody>, OriginError> {
        if !request.headers().contains_key(header::HOST) {
            request
                .headers_mut()
                .insert(header::HOST, self.authority.clone());
        }
        let slot = self.take_slot().await?;
        // From here: the wait for a slot is Strata's queue, not the origin's slowness.
        let started = Instant::now();
        let result = self.send_in_slot(request, slot).await;
        self.latency.observe(started.elapsed());
        result
    }

    /// [`Origin::send`] once the request has its slot.
    async fn send_in_slot(
        &self,
        request: Request<ProxyBody>,
        slot: Option<Slot>,
    ) -> Result<Response<OriginBody>, OriginError> {
        let upload = request.body().upload_progress();
        let exchange = self.exchange(request, slot);
        let Some(upload) = upload else {
            return match tokio::time::timeout(self.timeout, exchange).await {
                Err(_) => Err(OriginError::Timeout(self.timeout)),
                Ok(result) => result,
            };
        };
        // With a request body, the deadline counts from the body's last progress: while the client
        // uploads, each chunk moves it on; once the body is sent, the origin has `ORIGIN_TIMEOUT`.
        let mut exchange = std::pin::pin!(exchange);
        loop {
            let deadline = tokio::time::Instant::from_std(upload.last() + self.timeout);
            match tokio::time::timeout_at(deadline, exchange.as_mut()).await {
                Ok(result) => return result,
                Err(_) if upload.last() + self.timeout > std::time::Instant::now() => {}
                Err(_) => return Err(OriginError::Timeout(self.timeout)),
            }
        }
    }

    /// Under `ORIGIN_MAX_CONNS`, a free slot at once or the first one freed within
    /// `ORIGIN_TIMEOUT`.
    async fn take_slot(&self) -> Result<Option<Slot>, OriginError> {
        let Some((_, slots)) = &self.idle.slots else {
            return Ok(None);
        };
        let slot = || Some(Slot(Some(self.idle.clone())));
        if let Ok(permit) = slots.try_acquire() {
            permit.forget();
            return Ok(slot());
        }
        let _waiting = Waiting::new(&self.waiting);
        match tokio::time::timeout(self.timeout, slots.acquire()).await {
            Ok(Ok(permit)) => {
                permit.forget();
                Ok(slot())
            }
            // Timed out (the semaphore is never closed).
            _ => {
                self.busy.fetch_add(1, Ordering::Relaxed);
                Err(OriginError::Busy(self.timeout))
            }
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Requests waiting for a slot under `ORIGIN_MAX_CONNS` now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Requests in flight to the origin now, when `ORIGIN_MAX_CONNS` counts them (else 0).
    pub fn in_flight(&self) -> u64 {
        self.idle.slots.as_ref().map_or(0, |(max, slots)| {
            max.saturating_sub(slots.available_permits()) as u64
        })
    }

    /// Time to the origin's response headers, the wait for a slot left out.
    pub fn latency(&self) -> &Histogram {
        &self.latency
    }

    /// Requests that found no slot within `ORIGIN_TIMEOUT` (answered 503) since start.
    pub fn busy(&self) -> u64 {
        self.busy.load(Ordering::Relaxed)
    }

    /// Connections to the origin opened since start.
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Kept-alive connections waiting for a request now (not those the origin has since closed).
    pub fn idle_connections(&self) -> u64 {
        let idle = self.idle.lock();
        idle.iter()
            .filter(|entry| !entry.sender.is_closed())
            .count() as u64
    }

    async fn exchange(
        &self,
        mut request: Request<ProxyBody>,
        slot: Option<Slot>,
    ) -> Result<Response<OriginBody>, OriginError> {
        let mut fresh_only = false;
        loop {
            let pooled = if fresh_only {
                None
            } else {
                self.idle.checkout().await
            };
            let (mut sender, reused, mut replay) = match pooled {
                Some((sender, idle_for)) => {
                    let replay = (idle_for >= REPLAY_AFTER_IDLE)
                        .then(|| replayable_copy(&request))
                        .flatten();
                    (sender, true, replay)
                }
                // Boxed: the connector's future is large and rarely needed; inline, every
                // request's future would carry (and move) its space.
                None => (Box::pin(self.connect()).await?, false, None),
            };
            match sender.try_send_request(request).await {
                Ok(mut response) => {
                    // Refused, the connection goes with `sender`: its framing cannot be trusted.
                    headers::settle_response_framing(response.headers_mut())
                        .map_err(OriginError::Failed)?;
                    return Ok(self.wrap(response, sender, slot));
                }
                Err(mut error) => match (error.take_message(), replay.take()) {
                    // The origin closed a kept-alive connection before our request went out on it
                    // (its idle timeout met our reuse): nothing was sent, so another connection may
                    // carry it. A fresh connection failing this way is a real failure.
                    (Some(unsent), _) if reused => request = unsent,
                    // It went out, and the long-idle connection failed under it: a GET or HEAD
                    // without a body is idempotent (RFC 9110 §9.2.2), so it is sent once more, on
                    // a new connection.
                    (None, Some(copy)) if connection_dropped(error.error()) => {
                        tracing::debug!(error = %error.error(), "idle origin connection failed; sending again");
                        request = copy;
                        fresh_only = true;
                    }
                    _ => return Err(OriginError::Failed(error_chain(&error.into_error()))),
                },
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<ProxyBody>, OriginError> {
        let io = self
            .connector
            .clone()
            .call(self.connect_to.clone())
            .await
            .map_err(|e| OriginError::Unreachable(error_chain(&*e)))?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| OriginError::Failed(error_chain(&e)))?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            // Upgrades: a 101 answer hands the connection to the WebSocket splice.
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "origin connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn wrap(
        &self,
        response: Response<Incoming>,
        sender: SendRequest<ProxyBody>,
        slot: Option<Slot>,
    ) -> Response<OriginBody> {
        // After a 101 the connection belongs to the upgraded protocol, never to the pool (and its
        // slot is given back here).
        let reusable = response.status() != StatusCode::SWITCHING_PROTOCOLS;
        let (parts, body) = response.into_parts();
        let mut body = OriginBody {
            body,
            connection: reusable.then(|| {
                // From here the checkin holds the slot, if there is one.
                if let Some(slot) = slot {
                    slot.hand_over();
                }
                Checkin {
                    pool: Arc::downgrade(&self.idle),
                    sender,
                }
            }),
        };
        if body.body.is_end_stream() {
            body.release(); // no body to read (HEAD, 204, 304): the connection is free now
        }
        Response::from_parts(parts, body)
    }
}

/// An origin response body. When it has been read to its end, its connection goes back to the
/// pool; dropped before that, the connection is closed (its unread rest would poison the next
/// response).
pub struct OriginBody {
    body: Incoming,
    /// Under `ORIGIN_MAX_CONNS`, this holds the request's slot.
    connection: Option<Checkin>,
}

impl OriginBody {
    /// The response was read to its end: the connection goes back to the pool.
    fn release(&mut self) {
        if let Some(checkin) = self.connection.take() {
            if let Some(pool) = checkin.pool.upgrade() {
                // The connection first: a request woken by the slot finds it in the pool instead
                // of opening another.
                pool.checkin(checkin.sender);
                pool.give_back_slot();
            }
        }
    }

    /// The response cannot be read to its end (an error, dropped early): the connection closes.
    fn discard(&mut self) {
        if let Some(checkin) = self.connection.take() {
            if let Some(pool) = checkin.pool.upgrade() {
                pool.give_back_slot();
            }
        }
    }
}

impl Body for OriginBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            // Trailers end a chunked body, and readers stop there (hyper's server drops the body
            // after them): by then hyper has finished reading the response.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => this.release(),
            Poll::Ready(Some(Err(_))) => this.discard(),
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for OriginBody {
    fn drop(&mut self) {
        // A reader may stop at `is_end_stream` without polling for the end: the body is complete.
        if self.body.is_end_stream() {
            self.release();
        } else {
            self.discard();
        }
    }
}

/// One request's `ORIGIN_MAX_CONNS` slot until its response arrives: given back if dropped before
/// (an error, a cancelled request), else handed over to the response's [`Checkin`]. (Response
/// bodies do not carry a permit of their own: every answer would be a word larger.)
struct Slot(Option<Arc<IdlePool>>);

impl Slot {
    fn hand_over(mut self) {
        self.0 = None;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.give_back_slot();
        }
    }
}

/// Counts a request among those waiting for a slot while it waits (cancelled included).
struct Waiting<'a>(&'a AtomicU64);

impl Waiting<'_> {
    fn new(waiting: &AtomicU64) -> Waiting<'_> {
        waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Checkin {
    pool: Weak<IdlePool>,
    sender: SendRequest<ProxyBody>,
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

/// Idle connections, oldest first (each comes back at the end with the time it came back, so the
/// stack stays sorted by `since`), how long one may stay, and how many may.
struct IdlePool {
    idle: Mutex<Vec<Idle>>,
    timeout: Duration,
    capacity: usize,
    /// `ORIGIN_MAX_CONNS` and a permit per free slot (taken permits are forgotten and added back).
    slots: Option<(usize, Semaphore)>,
}

impl IdlePool {
    fn new(timeout: Duration, capacity: usize, max_conns: Option<usize>) -> IdlePool {
        IdlePool {
            idle: Mutex::new(Vec::new()),
            timeout,
            capacity,
            slots: max_conns.map(|max| (max, Semaphore::new(max))),
        }
    }

    fn give_back_slot(&self) {
        if let Some((_, slots)) = &self.slots {
            slots.add_permits(1);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used connection that can take a request now, and how long it sat idle.
    /// Closed ones are dropped. A connection comes back when its response has been read, which can
    /// be a moment before its task is ready for the next request: without a ready one, the newest
    /// busy one gets `BUSY_GRACE` to become ready, and is closed if it does not (still sending a
    /// request body the origin answered without reading: not worth keeping).
    async fn checkout(&self) -> Option<(SendRequest<ProxyBody>, Duration)> {
        let now = Instant::now();
        let busy = {
            let mut idle = self.lock();
            self.expire(&mut idle, now);
            if let Some(ready) = idle.iter().rposition(|entry| entry.sender.is_ready()) {
                let entry = idle.remove(ready);
                return Some((entry.sender, now.saturating_duration_since(entry.since)));
            }
            idle.retain(|entry| !entry.sender.is_closed());
            idle.pop()?
        };
        let mut sender = busy.sender;
        let ready = Box::pin(tokio::time::timeout(BUSY_GRACE, sender.ready())).await;
        let idle_for = now.saturating_duration_since(busy.since);
        ready
            .is_ok_and(|ready| ready.is_ok())
            .then_some((sender, idle_for))
    }

    fn checkin(&self, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        // Read under the lock, so that the stack stays sorted by `since`.
        let now = Instant::now();
        self.expire(&mut idle, now);
        if idle.len() >= self.capacity {
            // Connections the origin closed (its keep-alive timeout) must not crowd out live ones.
            idle.retain(|entry| !entry.sender.is_closed());
        }
        if self.capacity == 0 {
            return; // dropped: closed
        }
        if idle.len() >= self.capacity {
            // The oldest goes: it is the nearest to the origin's keep-alive timeout.
            idle.remove(0);
        }
        idle.push(Idle { sender, since: now });
    }

    /// Drops (closes) connections idle for longer than the timeout: a prefix of the stack.
    fn expire(&self, idle: &mut Vec<Idle>, now: Instant) {
        let expired = |entry: &Idle| now.saturating_duration_since(entry.since) > self.timeout;
        if idle.first().is_some_and(expired) {
            let fresh = idle.partition_point(expired);
            idle.drain(..fresh);
        }
    }

    /// Closes expired connections while no traffic comes to do it, until the pool is dropped.
    fn sweep_in_background(pool: &Arc<IdlePool>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime (a configuration check): requests expire connections themselves
        };
        // At least 10 ms: `interval` panics on zero, which a timeout of a few nanoseconds gives.
        let every = (pool.timeout / 3).max(Duration::from_millis(10));
        let pool = Arc::downgrade(pool);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let mut idle = pool.lock();
                pool.expire(&mut idle, Instant::now());
                idle.retain(|entry| !entry.sender.is_closed());
            }
        });
    }
}

/// Whether a request failed because its connection went away (closed or reset by the origin),
/// rather than because of what the origin answered (a malformed or oversized head): only the
/// former is the keep-alive race a replay is for.
fn connection_dropped(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() || error.is_closed() || error.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = cause.source();
    }
    false
}

/// A copy of a bodiless GET or HEAD, to send again if its connection fails under it.
fn replayable_copy(request: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    let idempotent = matches!(*request.method(), http::Method::GET | http::Method::HEAD);
    if !idempotent || !request.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(ProxyBody::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
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
