//! Test support: an in-process mock origin, an in-process Strata launcher, small HTTP clients, and
//! real `redis-server` processes ([`redis`]).
//!
//! Nothing here sleeps and hopes: waits are on counters polled against a deadline, and every network
//! await is wrapped in a timeout so a broken proxy fails a test instead of hanging it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod binary;
pub mod fleet;
pub mod redis;
pub mod topology;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

/// Upper bound for any single client exchange in the tests.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Bodies

/// A body fed through a channel: lets a test (or the mock origin) send chunks when it decides to.
pub struct ChanBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A streamed body of unknown length and the sender that feeds it (drop the sender to end it).
pub fn chan_body() -> (mpsc::Sender<Bytes>, TestBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, ChanBody { rx }.boxed())
}

pub fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub fn empty() -> TestBody {
    Empty::<Bytes>::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Deterministic body content of `len` bytes, so large bodies can be compared byte for byte.
pub fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

// ---------------------------------------------------------------------------------------------
// Mock origin

/// What the mock origin saw of one request; handed to the test's handler.
#[derive(Debug, Clone)]
pub struct ReqInfo {
    pub method: Method,
    pub uri: Uri,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// 1-based number of this request among the requests for the same path.
    pub hit: usize,
}

impl ReqInfo {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How the body of a reply is produced.
#[derive(Clone)]
pub enum ReplyBody {
    Fixed(Bytes),
    /// Chunks sent one after another with `delay` between them; no Content-Length.
    Chunks {
        chunks: Vec<Bytes>,
        delay: Duration,
    },
    /// `len` bytes of [`pattern`], streamed in 64 KiB chunks, with or without Content-Length.
    Sized {
        len: usize,
        content_length: bool,
    },
    /// `first` at once, then `rest` only after `gate` was notified; no Content-Length.
    Gated {
        first: Bytes,
        gate: Arc<Notify>,
        rest: Bytes,
    },
    /// 101 Switching Protocols, then the upgraded connection echoes what it reads.
    UpgradeEcho,
    /// The request body sent back.
    Echo,
}

/// The mock origin's answer to one request, built by the test's handler.
#[derive(Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: ReplyBody,
    /// Wait this long before sending the response head.
    pub delay: Duration,
    /// Drop the connection (after `delay`) instead of answering.
    pub fail: bool,
    /// Answer 304 when If-None-Match matches this reply's ETag or If-Modified-Since equals its
    /// Last-Modified.
    pub conditional: bool,
}

impl Reply {
    pub fn new(status: u16, body: ReplyBody) -> Reply {
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: Vec::new(),
            body,
            delay: Duration::ZERO,
            fail: false,
            conditional: false,
        }
    }

    /// 200 with a fixed body.
    pub fn ok(body: impl Into<Bytes>) -> Reply {
        Reply::new(200, ReplyBody::Fixed(body.into()))
    }

    /// Any status with a fixed body.
    pub fn status(status: u16, body: impl Into<Bytes>) -> Reply {
        Reply::new(status, ReplyBody::Fixed(body.into()))
    }

    /// Drop the connection without answering.
    pub fn fail() -> Reply {
        let mut r = Reply::ok("");
        r.fail = true;
        r
    }

    pub fn chunks(chunks: Vec<Bytes>, delay: Duration) -> Reply {
        Reply::new(200, ReplyBody::Chunks { chunks, delay })
    }

    pub fn sized(len: usize, content_length: bool) -> Reply {
        Reply::new(
            200,
            ReplyBody::Sized {
                len,
                content_length,
            },
        )
    }

    pub fn gated(first: impl Into<Bytes>, gate: Arc<Notify>, rest: impl Into<Bytes>) -> Reply {
        Reply::new(
            200,
            ReplyBody::Gated {
                first: first.into(),
                gate,
                rest: rest.into(),
            },
        )
    }

    pub fn upgrade_echo() -> Reply {
        Reply::new(101, ReplyBody::UpgradeEcho)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    }

    pub fn echo() -> Reply {
        Reply::new(200, ReplyBody::Echo)
    }

    /// Appends a header (repeat the call for repeated headers).
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Shorthand for a Cache-Control header.
    pub fn cc(self, value: &str) -> Reply {
        self.header("cache-control", value)
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    pub fn failing(mut self) -> Reply {
        self.fail = true;
        self
    }

    pub fn conditional(mut self) -> Reply {
        self.conditional = true;
        self
    }

    fn get_header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn matches_conditional(&self, req: &ReqInfo) -> bool {
        if let (Some(etag), Some(inm)) = (self.get_header("etag"), req.header("if-none-match")) {
            let strip = |s: &str| s.trim().trim_start_matches("W/").to_string();
            let etag = strip(etag);
            return inm.split(',').any(|t| t.trim() == "*" || strip(t) == etag);
        }
        if let (Some(lm), Some(ims)) = (
            self.get_header("last-modified"),
            req.header("if-modified-since"),
        ) {
            return lm.trim() == ims.trim();
        }
        false
    }
}

type Handler = Arc<dyn Fn(&ReqInfo) -> Reply + Send + Sync>;

#[derive(Default)]
struct Record {
    hits: HashMap<String, usize>,
    last_headers: HashMap<String, HeaderMap>,
    last_body: HashMap<String, Bytes>,
    log: Vec<(Method, Uri, HeaderMap)>,
}

struct OriginState {
    handler: RwLock<Handler>,
    record: Mutex<Record>,
    total: AtomicUsize,
    req_body_bytes: AtomicUsize,
    accepted: AtomicUsize,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

/// An in-process hyper origin (HTTP/1.1 and h2c) that counts and records requests.
pub struct MockOrigin {
    pub addr: SocketAddr,
    state: Arc<OriginState>,
    accept: Option<JoinHandle<()>>,
}

impl MockOrigin {
    pub async fn start<F>(handler: F) -> MockOrigin
    where
        F: Fn(&ReqInfo) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(OriginState {
            handler: RwLock::new(Arc::new(handler)),
            record: Mutex::new(Record::default()),
            total: AtomicUsize::new(0),
            req_body_bytes: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let accept_state = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // Without this, a streamed body's later writes wait on delayed ACKs (~40 ms each).
                let _ = stream.set_nodelay(true);
                accept_state.accepted.fetch_add(1, Ordering::SeqCst);
                let conn_state = accept_state.clone();
                let task = tokio::spawn(async move {
                    let svc_state = conn_state.clone();
                    let svc = service_fn(move |req| handle(svc_state.clone(), req));
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
                let mut conns = accept_state.conns.lock().unwrap();
                conns.retain(|c| !c.is_finished());
                conns.push(task);
            }
        });
        MockOrigin {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// Origin answering every request 200 with `body` and the given Cache-Control.
    pub async fn fixed(body: &'static str, cache_control: &'static str) -> MockOrigin {
        MockOrigin::start(move |_| Reply::ok(body).cc(cache_control)).await
    }

    /// Origin answering under `Vary: Cookie`: `yours` (`private`) to a request with a cookie, as
    /// for a signed-in user, and `everyone's` (`public`) to one without; both `max-age=60`.
    pub async fn varying_on_cookie() -> MockOrigin {
        MockOrigin::start(|r| {
            let reply = if r.header("cookie").is_some() {
                Reply::ok("yours").cc("private, max-age=60")
            } else {
                Reply::ok("everyone's").cc("public, max-age=60")
            };
            reply.header("vary", "Cookie")
        })
        .await
    }

    /// Origin that holds back its first answer for a path: `v1` goes out at once, ` body` only
    /// once `gate` is notified. Later answers are `v{n} body` at once. `shape` sets the rest of
    /// every answer (Cache-Control, other fields).
    pub async fn first_answer_held(gate: &Arc<Notify>, shape: fn(Reply) -> Reply) -> MockOrigin {
        let gate = gate.clone();
        MockOrigin::start(move |r| {
            shape(if r.hit == 1 {
                Reply::gated("v1", gate.clone(), " body")
            } else {
                Reply::ok(format!("v{} body", r.hit))
            })
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the handler for requests arriving from now on.
    pub fn set_handler<F>(&self, handler: F)
    where
        F: Fn(&ReqInfo) -> Reply + Send + Sync + 'static,
    {
        *self.state.handler.write().unwrap() = Arc::new(handler);
    }

    /// Requests received for `path` (counted when their head arrives).
    pub fn hits(&self, path: &str) -> usize {
        self.state
            .record
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Request-body bytes received so far, over all requests (updated frame by frame).
    pub fn req_body_bytes(&self) -> usize {
        self.state.req_body_bytes.load(Ordering::SeqCst)
    }

    pub fn last_headers(&self, path: &str) -> Option<HeaderMap> {
        self.state
            .record
            .lock()
            .unwrap()
            .last_headers
            .get(path)
            .cloned()
    }

    /// Header of the last request for `path`, all values joined with ", ".
    pub fn last_header(&self, path: &str, name: &str) -> Option<String> {
        let headers = self.last_headers(path)?;
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        if values.is_empty() {
            None
        } else {
            Some(values.join(", "))
        }
    }

    pub fn last_body(&self, path: &str) -> Option<Bytes> {
        self.state
            .record
            .lock()
            .unwrap()
            .last_body
            .get(path)
            .cloned()
    }

    /// Every request seen, in arrival order.
    pub fn requests(&self) -> Vec<(Method, Uri, HeaderMap)> {
        self.state.record.lock().unwrap().log.clone()
    }

    /// Waits (bounded) until `path` has seen at least `n` requests.
    pub async fn wait_hits(&self, path: &str, n: usize) {
        wait_until(&format!("origin hits for {path} >= {n}"), || {
            self.hits(path) >= n
        })
        .await;
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Connections still open now.
    pub fn open_connections(&self) -> usize {
        let conns = self.state.conns.lock().unwrap();
        conns.iter().filter(|c| !c.is_finished()).count()
    }

    /// Closes every open connection (as an origin's keep-alive timeout does) and keeps listening.
    pub async fn drop_connections(&self) {
        let conns: Vec<JoinHandle<()>> = std::mem::take(&mut *self.state.conns.lock().unwrap());
        for c in &conns {
            c.abort();
        }
        for c in conns {
            let _ = c.await;
        }
    }

    /// Stops the origin: the listener is closed (new connections are refused) and every open
    /// connection is dropped.
    pub async fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        let conns: Vec<JoinHandle<()>> = std::mem::take(&mut *self.state.conns.lock().unwrap());
        for c in &conns {
            c.abort();
        }
        for c in conns {
            let _ = c.await;
        }
    }
}

impl Drop for MockOrigin {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        if let Ok(conns) = self.state.conns.lock() {
            for c in conns.iter() {
                c.abort();
            }
        }
    }
}

async fn handle(
    state: Arc<OriginState>,
    mut req: Request<Incoming>,
) -> Result<Response<TestBody>, BoxError> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let path = req.uri().path().to_string();
    let hit = {
        let mut rec = state.record.lock().unwrap();
        let n = rec.hits.entry(path.clone()).or_insert(0);
        *n += 1;
        let n = *n;
        rec.last_headers.insert(path.clone(), req.headers().clone());
        rec.log.push((
            req.method().clone(),
            req.uri().clone(),
            req.headers().clone(),
        ));
        n
    };
    state.total.fetch_add(1, Ordering::SeqCst);

    let (parts, mut body) = req.into_parts();
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            state.req_body_bytes.fetch_add(data.len(), Ordering::SeqCst);
            buf.extend_from_slice(&data);
        }
    }
    let body = buf.freeze();
    state
        .record
        .lock()
        .unwrap()
        .last_body
        .insert(path.clone(), body.clone());

    let info = ReqInfo {
        method: parts.method,
        uri: parts.uri,
        path,
        headers: parts.headers,
        body,
        hit,
    };
    let handler = state.handler.read().unwrap().clone();
    let reply = handler(&info);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    if reply.fail {
        return Err("mock origin: dropping the connection".into());
    }

    let not_modified = reply.conditional && reply.matches_conditional(&info);
    let mut builder = Response::builder().status(if not_modified {
        StatusCode::NOT_MODIFIED
    } else {
        reply.status
    });
    for (name, value) in &reply.headers {
        if not_modified && name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        builder = builder.header(name.as_str(), value.as_str());
    }
    if not_modified {
        return Ok(builder.body(empty())?);
    }

    let body = match reply.body {
        ReplyBody::Fixed(b) => full(b),
        ReplyBody::Echo => full(info.body.clone()),
        ReplyBody::Chunks { chunks, delay } => {
            let (tx, body) = chan_body();
            tokio::spawn(async move {
                for (i, chunk) in chunks.into_iter().enumerate() {
                    if i > 0 && !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    if tx.send(chunk).await.is_err() {
                        return;
                    }
                }
            });
            body
        }
        ReplyBody::Sized {
            len,
            content_length,
        } => {
            if content_length {
                builder = builder.header("content-length", len.to_string());
            }
            let data = pattern(len);
            let (tx, body) = chan_body();
            tokio::spawn(async move {
                let mut off = 0;
                while off < len {
                    let end = (off + 64 * 1024).min(len);
                    if tx.send(data.slice(off..end)).await.is_err() {
                        return;
                    }
                    off = end;
                }
            });
            body
        }
        ReplyBody::Gated { first, gate, rest } => {
            let (tx, body) = chan_body();
            tokio::spawn(async move {
                if tx.send(first).await.is_err() {
                    return;
                }
                gate.notified().await;
                let _ = tx.send(rest).await;
            });
            body
        }
        ReplyBody::UpgradeEcho => {
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 4096];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                                let _ = io.flush().await;
                            }
                        }
                    }
                }
            });
            empty()
        }
    };
    Ok(builder.body(body)?)
}

/// A URL nobody listens on: a port bound then released.
pub fn refused_url() -> String {
    format!("http://{}", free_addr())
}

/// A free local address (bound, then released).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// `n` seconds.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Polls `cond` every 10 ms until it holds; panics after 10 s.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    wait_until_for(what, Duration::from_secs(10), &mut cond).await;
}

pub async fn wait_until_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `fut`, failing the test if it takes longer than `limit`.
pub async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy under test

/// A Strata instance served in-process on ephemeral ports.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub proxy: strata::Proxy,
    shutdown_tx: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestProxy {
    /// Starts a proxy in front of `origin_url`; `extra` are further (VARIABLE, value) settings.
    pub async fn start(origin_url: &str, extra: &[(&str, &str)]) -> TestProxy {
        let mut vars: Vec<(&str, &str)> = vec![("ORIGIN_URL", origin_url)];
        if !extra.iter().any(|(k, _)| *k == "SHUTDOWN_TIMEOUT") {
            vars.push(("SHUTDOWN_TIMEOUT", "5s"));
        }
        vars.extend_from_slice(extra);
        let config = strata::config::Config::from_vars(vars)
            .unwrap_or_else(|e| panic!("config rejected: {e}"));
        let proxy = strata::Proxy::new(config).unwrap_or_else(|e| panic!("Proxy::new: {e}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(strata::server::serve(
            proxy.clone(),
            listener,
            admin,
            async move {
                let _ = shutdown_rx.await;
            },
        ));
        TestProxy {
            addr,
            admin_addr,
            proxy,
            shutdown_tx: Some(shutdown_tx),
            handle: Some(handle),
        }
    }

    /// `http://ADDR{path}` on the traffic listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `http://ADMIN{path}` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// Moves the proxy's cache clock forward.
    pub fn advance(&self, by: Duration) {
        self.proxy.clock().advance(by);
    }

    pub fn stats(&self) -> strata::metrics::StatsSnapshot {
        self.proxy.stats()
    }

    /// Resolves the shutdown future without waiting for serve() to return.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
    }

    /// Waits (bounded, 15 s) for serve() to return and yields its result.
    pub async fn wait_stopped(&mut self) -> std::io::Result<()> {
        let handle = self.handle.take().expect("serve already awaited");
        within("serve() to return", Duration::from_secs(15), handle)
            .await
            .expect("serve task panicked")
    }

    /// Triggers graceful shutdown and waits for serve() to return.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.trigger_shutdown();
        self.wait_stopped().await
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.trigger_shutdown();
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// A fully read response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// First value of a header, if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// All values of a header, in order.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    /// The X-Cache header ("" when absent).
    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("")
    }

    /// The Cache-Status header ("" when absent).
    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }

    /// The Age header as an integer (panics when absent or malformed).
    pub fn age(&self) -> u64 {
        let age = self
            .header("age")
            .unwrap_or_else(|| panic!("no Age header in {:?}", self.headers));
        age.trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad Age {age:?}"))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn build_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: TestBody,
) -> Request<TestBody> {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(url);
    for (name, value) in headers {
        req = req.header(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    req.body(body).unwrap()
}

async fn collect(resp: Response<Incoming>) -> Resp {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .unwrap_or_else(|e| panic!("reading response body: {e}"))
        .to_bytes();
    Resp {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

/// Sends a request over HTTP/1.1 (fresh connection) and returns the response head without reading
/// the body.
pub async fn request_streaming(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: TestBody,
) -> Response<Incoming> {
    let client: Client<_, TestBody> = Client::builder(TokioExecutor::new()).build_http();
    let req = build_request(method, url, headers, body);
    within(
        &format!("{method} {url} response head"),
        CLIENT_TIMEOUT,
        client.request(req),
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"))
}

/// Sends a request with the given body over HTTP/1.1 and reads the whole response.
pub async fn request_body(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: TestBody,
) -> Resp {
    let what = format!("{method} {url}");
    within(&what, CLIENT_TIMEOUT, async {
        let resp = request_streaming(method, url, headers, body).await;
        collect(resp).await
    })
    .await
}

/// Sends a request over HTTP/1.1 and reads the whole response.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let body: Bytes = body.into();
    let body = if body.is_empty() { empty() } else { full(body) };
    request_body(method, url, headers, body).await
}

/// GET over HTTP/1.1.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Resp {
    request("GET", url, headers, Bytes::new()).await
}

/// GET over HTTP/2 with prior knowledge (h2c).
pub async fn h2_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    h2_get_url(addr, &format!("http://{addr}{path}"), headers).await
}

/// GET over HTTP/2 with prior knowledge (h2c), connecting to `addr` but sending `url` as the
/// request target: its authority becomes `:authority` (e.g. `http://a.test/x`).
pub async fn h2_get_url(addr: SocketAddr, url: &str, headers: &[(&str, &str)]) -> Resp {
    within(&format!("h2c GET {url}"), CLIENT_TIMEOUT, async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = build_request("GET", url, headers, empty());
        *req.version_mut() = Version::HTTP_2;
        let resp = send
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("h2c GET {url}: {e:?}"));
        collect(resp).await
    })
    .await
}

/// Runs `n` concurrent GETs of `url`; returns each response with the time it took.
pub async fn concurrent_gets(url: &str, n: usize) -> Vec<(Resp, Duration)> {
    let url: Arc<str> = url.into();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let resp = get(&url, &[]).await;
                (resp, started.elapsed())
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(within("concurrent GET", secs(20), t).await.unwrap());
    }
    out
}

/// Writes raw bytes to `addr` and reads until the peer closes the connection or 5 s pass
/// (whichever comes first); returns what was read.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let closed = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (out, closed)
}

// ---------------------------------------------------------------------------------------------
// Dates

/// Formats an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!("{weekday}, {day:02} {mon} {year} {hh:02}:{mm:02}:{ss:02} GMT")
}
