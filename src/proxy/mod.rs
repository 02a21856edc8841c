//! The request path: decide from the cache, go to the origin when needed, answer the client.
//!
//! Flow for GET/HEAD: `Proxy::plan` decides without waiting; a fresh hit is answered inside the
//! service call, with no request future at all (a request without cache headers costs one L1 lookup
//! and one instant compared). Otherwise the request's directives and conditionals are honoured, and
//! what has to wait becomes one boxed future for its path. Misses are
//! coalesced per key ([`crate::coalesce`]); the leader streams the origin's answer to its client while
//! a fill task keeps a copy for the cache (`fill`), after asking the Redis L2 and taking the
//! fleet-wide lock. Other methods pass through and invalidate. What the admin API drives (purge,
//! describe, warm) lives in `manage`.

pub mod body;
pub mod encoding;
mod fill;
pub mod headers;
mod manage;
pub mod origin;
pub mod respond;
pub mod tunnel;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use http::header;
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use crate::cache::key::{cache_key, request_host};
use crate::cache::policy::{merge_not_modified, revalidation_matches};
use crate::cache::policy::{needs_full_evaluation, RequestDirectives, CONDITIONAL_REQUEST_FIELDS};
use crate::cache::tiered::L1Lookup;
use crate::cache::{Cache, CacheStatus, Entry};
use crate::clock::Clock;
use crate::coalesce::{Coalescer, FlightPermit, Join, Waited};
use crate::config::Config;
use crate::invalidate::{Pending, Purge, PurgeLog, Selector};
use crate::metrics::{Stats, StatsSnapshot};
use body::ProxyBody;
use origin::{Origin, OriginBody, OriginError};
use respond::{Detail, Fwd};

/// What a purge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeOutcome {
    pub l1_removed: u64,
    pub l2_removed: u64,
    /// Whether some L2 store did not take it yet (it gets it, and it is published again, when the
    /// store answers).
    pub l2_pending: bool,
    /// Whether it was published to the other instances.
    pub broadcast: bool,
}

/// Strata could not start (the origin client could not be built).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot build the origin client: {0}")]
    OriginClient(#[from] std::io::Error),
    #[error("cannot build the Redis client: {0}")]
    Redis(#[from] fred::error::Error),
}

pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) cache: Cache,
    pub(crate) coalescer: Arc<Coalescer>,
    pub(crate) origin: Origin,
    pub(crate) stats: Stats,
    pub(crate) clock: Clock,
    pub(crate) purge_log: Arc<PurgeLog>,
    /// Purges applied here that Redis has not published yet.
    pub(crate) pending: Pending,
    /// Per L2 store, purges it did not fully take; done there when it answers again.
    pub(crate) unfinished: Vec<Pending>,
    /// This process on the invalidation channel (its own messages are not applied twice).
    pub(crate) instance: String,
    /// Whether a subscriber has listened to the invalidation channel yet (start-up waits for it).
    pub(crate) subscribed: tokio::sync::watch::Sender<bool>,
    /// Invalidations by unsafe methods still on their way to Redis and the other instances; a
    /// clean shutdown waits for them (see [`Proxy::flush_l2`]).
    pub(crate) invalidations_under_way: tokio::sync::watch::Sender<usize>,
}

/// A running proxy's shared state; cheap to clone.
#[derive(Clone)]
pub struct Proxy(pub(crate) Arc<Inner>);

/// What a request is, once its host is known.
#[derive(Clone)]
pub(crate) struct Target {
    /// The cache key: the host lowercased, then path and query.
    pub(crate) key: String,
    /// The host's length at the start of `key`.
    host_len: usize,
    /// The host as the client spelled it, kept only when that differs from its lowercase form
    /// (the usual lowercase host is read from `key`, without a copy of its own).
    spelled: Option<String>,
    pub(crate) peer: SocketAddr,
}

impl Target {
    pub(crate) fn new(host: &str, uri: &Uri, peer: SocketAddr) -> Target {
        let key = cache_key(host, uri);
        let spelled = (key.get(..host.len()) != Some(host)).then(|| host.to_owned());
        Target {
            key,
            host_len: host.len(),
            spelled,
            peer,
        }
    }

    /// The request's host, as the client sent it.
    pub(crate) fn host(&self) -> &str {
        self.spelled
            .as_deref()
            .or_else(|| self.key.get(..self.host_len))
            .unwrap_or_default()
    }
}

/// What a request's access line names.
struct LogLine<'a> {
    method: &'a Method,
    uri: &'a Uri,
    host: Option<&'a http::HeaderValue>,
}

impl<'a> LogLine<'a> {
    fn of(method: &'a Method, uri: &'a Uri, headers: &'a http::HeaderMap) -> LogLine<'a> {
        LogLine {
            method,
            uri,
            host: headers.get(header::HOST),
        }
    }
}

/// The same, owned: taken before a request that has to wait is consumed.
struct Logged {
    method: Method,
    uri: Uri,
    host: Option<http::HeaderValue>,
}

impl Logged {
    fn of(line: &LogLine<'_>) -> Logged {
        Logged {
            method: line.method.clone(),
            uri: line.uri.clone(),
            host: line.host.cloned(),
        }
    }

    fn line(&self) -> LogLine<'_> {
        LogLine {
            method: &self.method,
            uri: &self.uri,
            host: self.host.as_ref(),
        }
    }
}

/// What `Proxy::plan` decided for a GET or HEAD.
enum Plan {
    /// Answered at once: from the cache, or refused; with the status to count it under (known
    /// here, so the hit path need not read it back from the answer's `X-Cache`).
    Answer(Response<ProxyBody>, CacheStatus),
    /// Answered after a wait.
    Wait(Wait),
}

/// What a GET or HEAD that cannot be answered at once waits for.
enum Wait {
    /// The origin, for this request alone (see `forward`).
    Forward {
        stored: Option<Arc<Entry>>,
        fwd: Fwd,
    },
    /// A miss or a stale entry to revalidate: one leader per key goes to the origin.
    Coalesce {
        stored: Option<Arc<Entry>>,
        fwd: Fwd,
    },
    /// `only-if-cached`, nothing in L1: L2 is asked.
    OnlyIfCached(RequestDirectives),
}

/// The future a request's service call returns: ready at once, or the boxed wait.
pub enum Answer {
    Ready(std::future::Ready<Result<Response<ProxyBody>, Infallible>>),
    Later(Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>),
}

impl Answer {
    fn ready(response: Response<ProxyBody>) -> Answer {
        Answer::Ready(std::future::ready(Ok(response)))
    }
}

impl Future for Answer {
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Answer::Ready(ready) => Pin::new(ready).poll(cx),
            Answer::Later(work) => work.as_mut().poll(cx).map(Ok),
        }
    }
}

pin_project_lite::pin_project! {
    /// A waiting answer, counted and logged when it is ready (a named future rather than an
    /// async block, which would store `work` twice).
    struct Accounted<F> {
        #[pin]
        work: F,
        proxy: Proxy,
        started: Instant,
        // Boxed: the access line's facts take 152 bytes. Without them a coalesced follower's
        // boxed future stays within the 1,032 bytes that glibc's per-thread cache serves (a test
        // below holds it there); past that, its allocation took 580 instructions instead of 355
        // (callgrind, 64 clients).
        logged: Option<Box<Logged>>,
    }
}

impl<F: Future<Output = Response<ProxyBody>>> Future for Accounted<F> {
    type Output = Response<ProxyBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<ProxyBody>> {
        let this = self.project();
        let response = std::task::ready!(this.work.poll(cx));
        let logged = this.logged.take();
        let status = cache_status_of(&response);
        this.proxy.account(
            &response,
            status,
            *this.started,
            logged.as_deref().map(Logged::line),
        );
        Poll::Ready(response)
    }
}

impl Proxy {
    pub fn new(config: Config) -> Result<Proxy, StartError> {
        let origin = Origin::new(&config)?;
        let purge_log = Arc::new(PurgeLog::default());
        let cache = Cache::new(&config, purge_log.clone())?;
        let stores = cache.l2().map_or(0, |l2| l2.store_count());
        let proxy = Proxy(Arc::new(Inner {
            cache,
            coalescer: Coalescer::new(config.lock_timeout),
            origin,
            stats: Stats::default(),
            clock: Clock::default(),
            purge_log,
            pending: Pending::default(),
            unfinished: (0..stores).map(|_| Pending::default()).collect(),
            instance: instance_name(),
            subscribed: tokio::sync::watch::Sender::new(false),
            invalidations_under_way: tokio::sync::watch::Sender::new(0),
            config,
        }));
        proxy.start_broadcast();
        Ok(proxy)
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// The wall clock used for freshness; tests advance it.
    pub fn clock(&self) -> &Clock {
        &self.0.clock
    }

    pub fn stats(&self) -> StatsSnapshot {
        let mut snapshot = self.0.stats.snapshot();
        let l1 = self.0.cache.l1();
        snapshot.l1_bytes = l1.weight();
        snapshot.l1_entries = l1.len();
        snapshot.l1_capacity_bytes = l1.capacity();
        snapshot.l1_evictions = l1.evictions();
        snapshot.origin_connections = self.0.origin.connections_opened();
        snapshot.origin_idle_connections = self.0.origin.idle_connections();
        snapshot.origin_in_flight = self.0.origin.in_flight();
        snapshot.origin_waiting = self.0.origin.waiting();
        snapshot.origin_busy = self.0.origin.busy();
        snapshot.coalesce_waiting = self.0.coalescer.waiting();
        snapshot.fills_in_flight = self.0.coalescer.in_flight_count();
        if let Some(l2) = self.0.cache.l2() {
            let get =
                |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            snapshot.l2_errors = get(&l2.stats.errors);
            snapshot.l2_timeouts = get(&l2.stats.timeouts);
            snapshot.l2_writes = get(&l2.stats.writes);
            snapshot.l2_dropped_writes = get(&l2.stats.dropped_writes);
            snapshot.l2_corrupt = get(&l2.stats.corrupt);
            snapshot.l2_writes_overtaken = get(&l2.stats.overtaken_writes);
            snapshot.l2_failovers_followed = get(&l2.stats.failovers_followed);
            snapshot.l2_breaker_open = u64::from(l2.breaker_open());
        }
        snapshot.purges_unpublished = self.0.pending.waiting() as u64;
        snapshot.l2_purges_unfinished = self
            .0
            .unfinished
            .iter()
            .map(Pending::waiting)
            .sum::<usize>() as u64;
        snapshot
    }

    /// `None` without an L2; otherwise whether Redis answers a PING now.
    pub async fn redis_reachable(&self) -> Option<bool> {
        match self.0.cache.l2() {
            Some(l2) => Some(l2.ping().await),
            None => None,
        }
    }

    /// Gives Redis a moment to connect, and this instance a moment to start listening for
    /// invalidations, before traffic is served (at most `patience` in all); Strata serves either way.
    pub async fn await_l2_startup(&self, patience: std::time::Duration) {
        let Some(l2) = self.0.cache.l2() else { return };
        let deadline = tokio::time::Instant::now() + patience;
        if !l2.await_startup(patience).await {
            return;
        }
        // Then the invalidation channel: what L1 holds when the first subscription comes is
        // flushed (a purge may have gone unheard), and every L2 read under way discarded.
        let mut subscribed = self.0.subscribed.subscribe();
        let listening = subscribed.wait_for(|subscribed| *subscribed);
        if tokio::time::timeout_at(deadline, listening).await.is_err() {
            tracing::warn!(
                "not yet listening for invalidations: serving; L1 is flushed once listening"
            );
        }
    }

    /// Waits until the invalidations under way have reached Redis and the other instances, and
    /// every queued L2 write has been attempted (tests, and a clean shutdown).
    pub async fn flush_l2(&self) {
        let mut under_way = self.0.invalidations_under_way.subscribe();
        // The sender lives in `self`: the wait cannot fail.
        let _ = under_way.wait_for(|count| *count == 0).await;
        if let Some(l2) = self.0.cache.l2() {
            l2.flush().await;
        }
    }

    /// Answers one client request. Never fails: every problem becomes an HTTP answer.
    ///
    /// What can be answered without waiting (a fresh hit, a refusal) is answered here, in the
    /// call, and no request future is built at all; only what has to wait (the origin, Redis, a
    /// coalesced fill) becomes a boxed future sized for that one path.
    pub fn answer(&self, request: Request<Incoming>, peer: SocketAddr) -> Answer {
        let started = Instant::now();
        let logging = tracing::enabled!(target: "strata::access", tracing::Level::INFO);
        let target = match Self::target_of(&request, peer) {
            Ok(target) => target,
            Err(reason) => {
                let refusal = respond::text(StatusCode::BAD_REQUEST, reason, Detail::Bypass);
                let line = logging
                    .then(|| LogLine::of(request.method(), request.uri(), request.headers()));
                self.account(&refusal, CacheStatus::Bypass, started, line);
                return Answer::ready(refusal);
            }
        };
        if !is_plain_read(&request) {
            let logged = logging.then(|| {
                Logged::of(&LogLine::of(
                    request.method(),
                    request.uri(),
                    request.headers(),
                ))
            });
            let proxy = self.clone();
            return self.later(started, logged, async move {
                proxy.route_other(request, target).await
            });
        }
        let (mut parts, _empty_body) = request.into_parts();
        headers::drop_connection_options(&mut parts.headers);
        if self.0.config.normalize_accept_encoding {
            encoding::normalize(&mut parts.headers);
        }
        let found = self.0.cache.lookup(&target.key, &parts.headers);
        let plan = self.plan(&parts, &target, found);
        let line = logging.then(|| LogLine::of(&parts.method, &parts.uri, &parts.headers));
        let wait = match plan {
            Plan::Answer(response, status) => {
                self.account(&response, status, started, line);
                return Answer::ready(response);
            }
            Plan::Wait(wait) => wait,
        };
        let logged = line.as_ref().map(Logged::of);
        let proxy = self.clone();
        match wait {
            Wait::Forward { stored, fwd } => self.later(started, logged, async move {
                proxy
                    .forward(parts, ProxyBody::empty(), &target, stored, fwd)
                    .await
            }),
            Wait::Coalesce { stored, fwd } => self.later(
                started,
                logged,
                proxy.fetch_coalesced(parts, target, stored, fwd),
            ),
            Wait::OnlyIfCached(directives) => self.later(started, logged, async move {
                proxy.only_if_cached(&parts, &target, &directives).await
            }),
        }
    }

    /// Counts an answer and writes its access line.
    fn account(
        &self,
        response: &Response<ProxyBody>,
        status: CacheStatus,
        started: Instant,
        line: Option<LogLine<'_>>,
    ) {
        let elapsed = started.elapsed();
        self.0.stats.count(status);
        if status == CacheStatus::HitL1 {
            self.0.stats.hit_latency.observe(elapsed);
        }
        if let Some(LogLine { method, uri, host }) = line {
            let host = host
                .and_then(|h| h.to_str().ok())
                .or_else(|| uri.authority().map(|a| a.as_str()))
                .unwrap_or_default();
            crate::telemetry::access(&crate::telemetry::AccessRecord {
                method: method.as_str(),
                host,
                path: &crate::telemetry::loggable(uri.path(), self.0.config.log_redact_keys),
                status: response.status().as_u16(),
                x_cache: status.as_str(),
                duration: elapsed,
            });
        }
    }

    /// An answer that has to wait: `work`, boxed, then counted and logged like any other.
    fn later(
        &self,
        started: Instant,
        logged: Option<Logged>,
        work: impl Future<Output = Response<ProxyBody>> + Send + 'static,
    ) -> Answer {
        Answer::Later(Box::pin(Accounted {
            work,
            proxy: self.clone(),
            started,
            logged: logged.map(Box::new),
        }))
    }

    /// The request's host and cache key, or why it names no single valid host (a 400).
    fn target_of(request: &Request<Incoming>, peer: SocketAddr) -> Result<Target, &'static str> {
        // Two Host fields let the key and the origin disagree about the host (cache poisoning).
        let mut hosts = request.headers().get_all(header::HOST).iter();
        if hosts.next().is_some() && hosts.next().is_some() {
            return Err("400 Bad Request: several Host fields\n");
        }
        let Some(host) = request_host(request.uri(), request.headers()) else {
            return Err("400 Bad Request: missing or invalid Host\n");
        };
        Ok(Target::new(host, request.uri(), peer))
    }

    /// Everything but a plain GET or HEAD: PURGE, WebSocket upgrades, CONNECT, other methods.
    async fn route_other(
        &self,
        mut request: Request<Incoming>,
        target: Target,
    ) -> Response<ProxyBody> {
        if request.method().as_str() == "PURGE" {
            return self.purge_method(&request, target).await;
        }
        let websocket = if request.method() == Method::GET {
            headers::upgrade_requested(request.headers())
        } else {
            None
        };
        if let Some(protocol) = websocket {
            let on_client_upgrade = hyper::upgrade::on(&mut request);
            return Box::pin(self.upgrade(request, target, protocol, on_client_upgrade)).await;
        }
        match *request.method() {
            // A reverse proxy is no tunnel: CONNECT would let clients reach arbitrary hosts.
            Method::CONNECT => respond::method_not_allowed("405 Method Not Allowed: CONNECT\n"),
            // TRACE would echo to the client what the load balancer and Strata added to its
            // request (as nginx, and Apache's `TraceEnable off`, refuse it).
            Method::TRACE => respond::method_not_allowed("405 Method Not Allowed: TRACE\n"),
            // RFC 9110 §7.6.2: OPTIONS with Max-Forwards: 0 is answered here, as its final
            // recipient; a larger value goes on one lower.
            Method::OPTIONS => match headers::take_a_forward(request.headers_mut()) {
                Some(0) => respond::options_here(),
                _ => self.pass_unsafe(request, target).await,
            },
            // Other methods, and a GET or HEAD with a body (not what its URL names): passed
            // through, body and all.
            _ => self.pass_unsafe(request, target).await,
        }
    }

    /// GET and HEAD: answer from the cache when RFC 9111 allows, else from the origin.
    async fn cached(&self, parts: Parts, target: Target) -> Response<ProxyBody> {
        let found = self.0.cache.lookup(&target.key, &parts.headers);
        match self.plan(&parts, &target, found) {
            Plan::Answer(response, _) => response,
            Plan::Wait(Wait::Forward { stored, fwd }) => {
                Box::pin(self.forward(parts, ProxyBody::empty(), &target, stored, fwd)).await
            }
            Plan::Wait(Wait::Coalesce { stored, fwd }) => {
                Box::pin(self.clone().fetch_coalesced(parts, target, stored, fwd)).await
            }
            Plan::Wait(Wait::OnlyIfCached(directives)) => {
                Box::pin(self.only_if_cached(&parts, &target, &directives)).await
            }
        }
    }

    /// What RFC 9111 makes of a GET or HEAD and what L1 holds for it, decided without waiting.
    fn plan(&self, parts: &Parts, target: &Target, found: L1Lookup) -> Plan {
        let inner = &self.0;
        let now = inner.clock.now();
        let head = parts.method == Method::HEAD;
        let stored = found.entry;

        let directives = request_directives(&parts.headers);
        if let Some(entry) = &stored {
            if !directives.no_cache && satisfies(entry, &directives, now) {
                return Plan::Answer(
                    respond::from_entry(entry, &parts.headers, head, now, Detail::Hit),
                    Detail::Hit.cache_status(),
                );
            }
            let client_tolerates_stale =
                directives.max_age.is_none() && directives.min_fresh.is_none();
            if !directives.no_cache
                && client_tolerates_stale
                && !entry.is_fresh(now)
                && entry.may_serve_while_revalidating(now)
            {
                self.refresh_in_background(parts, target, entry.clone());
                let detail = Detail::StaleWhileRevalidate;
                return Plan::Answer(
                    respond::from_entry(entry, &parts.headers, head, now, detail),
                    detail.cache_status(),
                );
            }
        }
        if directives.only_if_cached {
            if stored.is_none() {
                return Plan::Wait(Wait::OnlyIfCached(directives));
            }
            return Plan::Answer(not_in_cache(), CacheStatus::Miss);
        }

        let fwd = match (&stored, directives.no_cache) {
            (_, true) => Fwd::Request,
            (Some(_), false) => Fwd::Stale,
            (None, false) if found.vary_miss => Fwd::VaryMiss,
            (None, false) => Fwd::UriMiss,
        };
        let client_conditional = parts.headers.contains_key(header::IF_NONE_MATCH)
            || parts.headers.contains_key(header::IF_MODIFIED_SINCE);
        // These go to the origin as they are, neither coalesced nor stored: a HEAD carries no body to
        // store, no-store forbids storing, a conditional on a cold key wants the origin's own 304,
        // and some ranges are better left to the origin (see `range_for_the_origin`). Other ranges
        // fill like a GET (the fill asks for the whole body) and are cut from it.
        if head
            || self.range_for_the_origin(&parts.headers)
            || directives.no_store
            || (client_conditional && stored.is_none())
        {
            return Plan::Wait(Wait::Forward { stored, fwd });
        }
        if stored.is_none() && found.pass_until.is_some_and(|until| now < until) {
            return Plan::Wait(Wait::Forward { stored: None, fwd });
        }
        Plan::Wait(Wait::Coalesce { stored, fwd })
    }

    /// A `Range` request that goes to the origin as it is rather than filling the cache: with
    /// `If-Range`, `If-Match` or `If-Unmodified-Since` (only the origin can judge them against what
    /// it has now, and a 206 must not mix versions), with `Authorization` (its answer is rarely
    /// storable, and filling would fetch the whole body for nothing), or when nothing can be
    /// stored at all (`CACHE_SIZE_MB=0` without L2).
    fn range_for_the_origin(&self, request: &http::HeaderMap) -> bool {
        request.contains_key(header::RANGE)
            && ([
                header::IF_RANGE,
                header::IF_MATCH,
                header::IF_UNMODIFIED_SINCE,
                header::AUTHORIZATION,
            ]
            .iter()
            .any(|name| request.contains_key(name))
                || !(self.0.cache.l1().enabled() || self.0.cache.l2().is_some()))
    }

    /// `only-if-cached` with nothing usable in L1: L2 may have it; else 504 (RFC 9111 §5.2.1.7).
    async fn only_if_cached(
        &self,
        parts: &Parts,
        target: &Target,
        directives: &RequestDirectives,
    ) -> Response<ProxyBody> {
        let since = self.0.purge_log.generation();
        let purged = |entry: &Entry| self.0.purge_log.overtaken(since, &target.key, &entry.tags);
        if let Some(found) = self
            .0
            .cache
            .lookup_l2(&target.key, &parts.headers, purged)
            .await
        {
            let now = self.0.clock.now();
            if satisfies(&found, directives, now) {
                let head = parts.method == Method::HEAD;
                return respond::from_entry(&found, &parts.headers, head, now, Detail::HitL2);
            }
        }
        not_in_cache()
    }

    /// A miss (or a stale entry that must be revalidated): one leader per key goes to the origin.
    async fn fetch_coalesced(
        self,
        parts: Parts,
        target: Target,
        stored: Option<Arc<Entry>>,
        fwd: Fwd,
    ) -> Response<ProxyBody> {
        let inner = &self.0;
        // Two rounds: a follower handed another variant of the URL tries once more (and may lead),
        // within one CACHE_LOCK_TIMEOUT in all, as documented.
        let deadline = tokio::time::Instant::now() + inner.config.lock_timeout;
        for _ in 0..2 {
            let joined_at = inner.clock.now();
            let follower = match inner
                .coalescer
                .join(&target.key, inner.purge_log.generation())
            {
                // Boxed: inline, the leader's state would make every follower's future larger.
                Join::Leader(permit) => {
                    return Box::pin(
                        self.lead_detached(parts, target, stored, permit, fwd, deadline),
                    )
                    .await
                }
                Join::Follower(follower) => follower,
            };
            let waited = follower.wait(deadline).await;
            let now = inner.clock.now();
            // Read after the wait: held across it, they would make every follower's future
            // larger (see `Accounted`).
            let directives = request_directives(&parts.headers);
            match waited {
                // The leader's copy may be older than this request accepts (its `max-age`,
                // `min-fresh`), or, for a request with `no-cache`, not the origin's answer to a
                // request made after it arrived (a leader may answer from Redis): such a request
                // asks the origin itself.
                Waited::Stored(entry)
                    if entry.matches_variant(&parts.headers)
                        && satisfies(&entry, &directives, now)
                        && (!directives.no_cache || entry.response_time >= joined_at) =>
                {
                    Stats::incr(&inner.stats.coalesced);
                    return respond::from_entry(
                        &entry,
                        &parts.headers,
                        false,
                        now,
                        Detail::Coalesced,
                    );
                }
                Waited::Stored(entry) if !entry.matches_variant(&parts.headers) => continue,
                Waited::Stored(_) => break,
                Waited::Failed => {
                    // The origin just failed the leader: a copy we may serve on error beats asking again.
                    if let Some(entry) = stored.as_ref().filter(|e| e.may_serve_on_error(now)) {
                        return respond::from_entry(
                            entry,
                            &parts.headers,
                            false,
                            now,
                            Detail::StaleIfError(None),
                        );
                    }
                    break;
                }
                Waited::Released | Waited::TimedOut => break,
            }
        }
        // The leader's answer was not cacheable, it failed, or it took longer than CACHE_LOCK_TIMEOUT.
        let fwd = if stored.is_some() { Fwd::Stale } else { fwd };
        // Boxed: most followers never get here, and an inline forward() would make every
        // coalesced request's future (moved on each poll set-up) several KB larger.
        Box::pin(self.forward(parts, ProxyBody::empty(), &target, stored, fwd)).await
    }

    /// Runs the leader's fetch as a task of its own: a client that disconnects or resets its stream
    /// while the origin is thinking must not cancel the fill its followers wait for.
    async fn lead_detached(
        &self,
        parts: Parts,
        target: Target,
        stored: Option<Arc<Entry>>,
        permit: FlightPermit,
        fwd: Fwd,
        wait_until: tokio::time::Instant,
    ) -> Response<ProxyBody> {
        let proxy = self.clone();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let response = proxy
                .lead(parts, &target, stored, permit, fwd, wait_until)
                .await;
            // If the client is gone, the response is dropped here; its fill task keeps storing.
            let _ = tx.send(response);
        });
        rx.await.unwrap_or_else(|_| {
            respond::text(
                StatusCode::BAD_GATEWAY,
                "502 Bad Gateway: the origin fetch failed\n",
                Detail::Miss { stored: false, fwd },
            )
        })
    }

    /// Goes to the origin for this request alone and stores nothing. A stored copy with validators
    /// lets the origin answer 304 instead of the whole body; one inside its stale-if-error window
    /// covers origin failures.
    async fn forward(
        &self,
        mut parts: Parts,
        body: ProxyBody,
        target: &Target,
        stored: Option<Arc<Entry>>,
        fwd: Fwd,
    ) -> Response<ProxyBody> {
        let inner = &self.0;
        let head = parts.method == Method::HEAD;
        // Only an answer from the stored copy needs the request's headers afterwards.
        let request_headers = match &stored {
            Some(_) => parts.headers.clone(),
            None => http::HeaderMap::new(),
        };
        let revalidating = stored
            .as_ref()
            .filter(|entry| {
                parts.method == Method::GET
                    && entry.has_validators()
                    && !asks_for_itself(&parts.headers)
            })
            .cloned();
        let plain = revalidating.as_ref().map(|_| fill::copy_parts(&parts));
        if let Some(entry) = &revalidating {
            fill::add_validators(&mut parts.headers, entry);
        }
        let result = self.send_to_origin(parts, body, target).await;
        let now = inner.clock.now();
        if let (Ok(response), Some(entry), Some(plain)) = (&result, &revalidating, plain) {
            if response.status() == StatusCode::NOT_MODIFIED {
                if revalidation_matches(&entry.headers, response.headers()) {
                    let detail = Detail::Revalidated {
                        forced: fwd == Fwd::Request,
                    };
                    // Not stored again on this path, but answered with the fields the 304
                    // updated (RFC 9111 §4.3.4): new freshness, no stale copy's `Age`.
                    let mut not_modified = response.headers().clone();
                    headers::strip_hop_by_hop(&mut not_modified);
                    let mut merged = merge_not_modified(&entry.headers, &not_modified);
                    self.hide_surrogate_headers(&mut merged);
                    let answer = entry.revalidated_copy(&merged, now);
                    return respond::from_entry(&answer, &request_headers, head, now, detail);
                }
                // A 304 for some other representation: ask once more, without our validators.
                return Box::pin(self.forward(plain, ProxyBody::empty(), target, None, fwd)).await;
            }
        }
        let stale = stored.filter(|entry| entry.may_serve_on_error(now));
        match (result, stale) {
            (Ok(response), Some(entry)) if is_origin_failure(response.status()) => {
                let detail = Detail::StaleIfError(Some(response.status()));
                respond::from_entry(&entry, &request_headers, head, now, detail)
            }
            (Ok(response), _) => self.pass_through(response, Detail::Miss { stored: false, fwd }),
            (Err(_), Some(entry)) => respond::from_entry(
                &entry,
                &request_headers,
                head,
                now,
                Detail::StaleIfError(None),
            ),
            (Err(error), None) => self.origin_error(error, target),
        }
    }

    /// Other methods (and GET/HEAD with a body): streamed both ways, never cached; a non-error answer to an unsafe method
    /// invalidates the URL and same-host `Location`/`Content-Location` (RFC 9111 §4.4).
    async fn pass_unsafe(&self, request: Request<Incoming>, target: Target) -> Response<ProxyBody> {
        let (parts, body) = request.into_parts();
        let unsafe_method = !matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        let response = match self
            .send_to_origin(parts, ProxyBody::client(body), &target)
            .await
        {
            Ok(response) => response,
            Err(error) => return self.origin_error(error, &target),
        };
        let status = response.status();
        if unsafe_method && (status.is_success() || status.is_redirection()) {
            self.invalidate(&target.key);
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                let related = response
                    .headers()
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| same_host_key(v, target.host()));
                if let Some(key) = related {
                    self.invalidate(&key);
                }
            }
        }
        self.pass_through(response, Detail::Bypass)
    }

    /// Removes every stored response for a URL, and keeps a fill under way from storing its result.
    pub(crate) fn invalidate(&self, key: &str) {
        let purge = Purge {
            selector: Selector::Key(key.to_string()),
            soft: false,
        };
        let now = self.0.clock.now();
        crate::invalidate::purge_here(&self.0, &purge, now);
        if self.0.cache.l2().is_none() {
            return;
        }
        // L2 and the other instances off the response path, counted until done: the shutdown
        // waits for them, or the fleet would keep what this instance's last writes changed.
        let counted = UnderWay::count(self.clone());
        tokio::spawn(async move {
            counted.0.purge_beyond_l1(&purge, now).await;
        });
    }

    /// WebSocket and other protocol switches: forwarded with their `Upgrade`, then both upgraded
    /// connections are spliced together.
    async fn upgrade(
        &self,
        request: Request<Incoming>,
        target: Target,
        protocol: http::HeaderValue,
        on_client_upgrade: hyper::upgrade::OnUpgrade,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = request.into_parts();
        let mut upstream_headers = std::mem::take(&mut parts.headers);
        headers::to_origin(
            &mut upstream_headers,
            parts.version,
            target.peer.ip(),
            target.host(),
        );
        upstream_headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        upstream_headers.insert(header::UPGRADE, protocol);
        let uri = match self.0.origin.uri_for(parts.uri.path_and_query()) {
            Ok(uri) => uri,
            Err(_) => {
                return respond::text(
                    StatusCode::BAD_REQUEST,
                    "400 Bad Request: invalid path\n",
                    Detail::Bypass,
                )
            }
        };
        let mut upstream = Request::new(ProxyBody::client(body));
        *upstream.method_mut() = parts.method;
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = upstream_headers;
        Stats::incr(&self.0.stats.origin_requests);
        let mut response = match self.0.origin.send(upstream).await {
            Ok(response) => response,
            Err(error) => return self.origin_error(error, &target),
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return self.pass_through(response, Detail::Bypass);
        }
        let on_origin_upgrade = hyper::upgrade::on(&mut response);
        let idle = self.0.config.tunnel_idle_timeout;
        tokio::spawn(async move {
            match (on_client_upgrade.await, on_origin_upgrade.await) {
                (Ok(client), Ok(origin)) => {
                    let client = TokioIo::new(client);
                    let origin = TokioIo::new(origin);
                    match tunnel::splice(client, origin, idle).await {
                        Ok(tunnel::Ended::Closed { .. }) => {}
                        Ok(tunnel::Ended::Idle) => {
                            tracing::debug!(?idle, "upgraded connection idle; closed");
                        }
                        Err(error) => tracing::debug!(%error, "upgraded connection ended"),
                    }
                }
                (client, origin) => {
                    tracing::warn!(
                        client_ok = client.is_ok(),
                        origin_ok = origin.is_ok(),
                        "protocol upgrade failed"
                    );
                }
            }
        });
        let (mut parts, _) = response.into_parts();
        let upgrade = parts.headers.get(header::UPGRADE).cloned();
        headers::to_client(&mut parts.headers);
        parts.headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        if let Some(upgrade) = upgrade {
            parts.headers.insert(header::UPGRADE, upgrade);
        }
        respond::mark(&mut parts.headers, Detail::Bypass, None);
        Response::from_parts(parts, ProxyBody::empty())
    }

    /// Sends a client's request (its headers made fit for the origin) with the given body.
    pub(crate) async fn send_to_origin(
        &self,
        mut parts: Parts,
        body: ProxyBody,
        target: &Target,
    ) -> Result<Response<OriginBody>, OriginError> {
        let uri = self
            .0
            .origin
            .uri_for(parts.uri.path_and_query())
            .map_err(|e| OriginError::Failed(e.to_string()))?;
        headers::to_origin(
            &mut parts.headers,
            parts.version,
            target.peer.ip(),
            target.host(),
        );
        let mut upstream = Request::new(body);
        *upstream.method_mut() = parts.method;
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = parts.headers;
        Stats::incr(&self.0.stats.origin_requests);
        self.0.origin.send(upstream).await
    }

    /// An origin answer streamed to the client as it arrives.
    pub(crate) fn pass_through(
        &self,
        response: Response<OriginBody>,
        detail: Detail,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        headers::to_client(&mut parts.headers);
        self.hide_surrogate_headers(&mut parts.headers);
        respond::mark(&mut parts.headers, detail, None);
        Response::from_parts(parts, ProxyBody::origin(body, self.0.origin.timeout()))
    }

    pub(crate) fn origin_error(&self, error: OriginError, target: &Target) -> Response<ProxyBody> {
        // Busy is Strata's own limit, counted apart (`origin_busy`) and not logged per request:
        // under saturation that would be a line per refused request.
        if matches!(error, OriginError::Busy(_)) {
            tracing::debug!(host = %target.host(), %error, "no origin slot");
        } else {
            Stats::incr(&self.0.stats.origin_errors);
            tracing::warn!(host = %target.host(), %error, "origin failed");
        }
        match error {
            OriginError::Timeout(_) => respond::text(
                StatusCode::GATEWAY_TIMEOUT,
                "504 Gateway Timeout: the origin did not answer in time\n",
                Detail::Miss {
                    stored: false,
                    fwd: Fwd::UriMiss,
                },
            ),
            OriginError::Busy(_) => {
                let mut busy = respond::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503 Service Unavailable: the origin has ORIGIN_MAX_CONNS requests in flight\n",
                    Detail::Miss {
                        stored: false,
                        fwd: Fwd::UriMiss,
                    },
                );
                busy.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("1"),
                );
                busy
            }
            OriginError::Unreachable(_) | OriginError::Failed(_) => respond::text(
                StatusCode::BAD_GATEWAY,
                "502 Bad Gateway: the origin could not be reached\n",
                Detail::Miss {
                    stored: false,
                    fwd: Fwd::UriMiss,
                },
            ),
        }
    }

    /// Starts the one background revalidation of a stale entry (unless a fill is already under way).
    fn refresh_in_background(&self, parts: &Parts, target: &Target, stale: Arc<Entry>) {
        let inner = &self.0;
        let Join::Leader(permit) = inner
            .coalescer
            .join(&target.key, inner.purge_log.generation())
        else {
            return;
        };
        Stats::incr(&inner.stats.refreshes);
        let proxy = self.clone();
        let parts = refresh_request(parts);
        let target = target.clone();
        // Detached from the client that triggered it; bounded by ORIGIN_TIMEOUT inside `lead`.
        tokio::spawn(async move {
            let wait_until = tokio::time::Instant::now() + proxy.0.config.lock_timeout;
            let response = proxy
                .lead(parts, &target, Some(stale), permit, Fwd::Stale, wait_until)
                .await;
            // Nobody reads this answer; the fill task behind it keeps storing on its own.
            drop(response);
        });
    }
}

/// One invalidation under way, counted in `Inner::invalidations_under_way` from its creation to
/// its drop: made before the task is spawned and moved into it, so a task that ends, is
/// cancelled, or is dropped before it ever ran still counts itself out.
struct UnderWay(Proxy);

impl UnderWay {
    fn count(proxy: Proxy) -> UnderWay {
        proxy
            .0
            .invalidations_under_way
            .send_modify(|count| *count += 1);
        UnderWay(proxy)
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        self.0
             .0
            .invalidations_under_way
            .send_modify(|count| *count = count.saturating_sub(1));
    }
}

/// This process's name on the invalidation channel: pid and start time, unique enough for a fleet.
fn instance_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}", std::process::id(), nanos)
}

/// The request's cache directives. Most requests carry no cache directives and no conditionals:
/// nothing to parse, and `satisfies` comes down to "fresh".
pub(super) fn request_directives(headers: &http::HeaderMap) -> RequestDirectives {
    if needs_full_evaluation(headers) {
        RequestDirectives::parse(headers)
    } else {
        RequestDirectives::default()
    }
}

/// Whether a stored entry satisfies the request's own directives (RFC 9111 §5.2.1).
pub(super) fn satisfies(entry: &Entry, directives: &RequestDirectives, now: SystemTime) -> bool {
    if directives
        .max_age
        .is_some_and(|max_age| entry.age(now) > max_age)
    {
        return false;
    }
    if directives
        .min_fresh
        .is_some_and(|min_fresh| entry.ttl_secs(now) < i64::try_from(min_fresh).unwrap_or(i64::MAX))
    {
        return false;
    }
    if entry.is_fresh(now) {
        return true;
    }
    match directives.max_stale {
        None => false,
        Some(_) if !entry.honours_max_stale => false,
        Some(None) => true,
        Some(Some(limit)) => entry.staleness(now).as_secs() <= limit,
    }
}

/// A GET or HEAD without a body that asks for no protocol switch: what the cache answers.
fn is_plain_read(request: &Request<Incoming>) -> bool {
    match *request.method() {
        Method::HEAD => http_body::Body::is_end_stream(request.body()),
        Method::GET => {
            http_body::Body::is_end_stream(request.body())
                && headers::upgrade_requested(request.headers()).is_none()
        }
        _ => false,
    }
}

/// The 504 of `only-if-cached` when no stored response may serve (RFC 9111 §5.2.1.7).
fn not_in_cache() -> Response<ProxyBody> {
    respond::text(
        StatusCode::GATEWAY_TIMEOUT,
        "504 Gateway Timeout: not in cache (only-if-cached)\n",
        Detail::Miss {
            stored: false,
            fwd: Fwd::UriMiss,
        },
    )
}

/// The request is conditional or partial on its own account: its answer is the origin's to give.
fn asks_for_itself(headers: &http::HeaderMap) -> bool {
    CONDITIONAL_REQUEST_FIELDS
        .iter()
        .any(|name| headers.contains_key(name))
}

/// 500, 502, 503 and 504: the answers stale-if-error may hide.
fn is_origin_failure(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

fn cache_status_of(response: &Response<ProxyBody>) -> CacheStatus {
    match response
        .headers()
        .get(headers::X_CACHE)
        .map(|v| v.as_bytes())
    {
        Some(b"HIT-L1") => CacheStatus::HitL1,
        Some(b"HIT-L2") => CacheStatus::HitL2,
        Some(b"STALE") => CacheStatus::Stale,
        Some(b"REVALIDATED") => CacheStatus::Revalidated,
        Some(b"BYPASS") => CacheStatus::Bypass,
        _ => CacheStatus::Miss,
    }
}

/// The GET a background refresh sends, built from the request that found the entry stale.
fn refresh_request(parts: &Parts) -> Parts {
    let (mut fresh, ()) = Request::new(()).into_parts();
    fresh.method = Method::GET;
    fresh.uri = parts.uri.clone();
    fresh.version = parts.version;
    fresh.headers = parts.headers.clone();
    // The refresh is for the cache, not for this client's range or preconditions.
    for name in CONDITIONAL_REQUEST_FIELDS {
        fresh.headers.remove(name);
    }
    fresh
}

/// The cache key a `Location`/`Content-Location` value points to, when it is on the same host.
fn same_host_key(location: &str, host: &str) -> Option<String> {
    let uri: Uri = location.parse().ok()?;
    match uri.authority() {
        Some(authority) if authority.as_str().eq_ignore_ascii_case(host) => {
            Some(cache_key(host, &uri))
        }
        Some(_) => None,
        None if location.starts_with('/') => Some(cache_key(host, &uri)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A coalesced follower's answer is one allocation of `Accounted` around `fetch_coalesced`:
    /// at most 1,032 bytes, glibc's per-thread cache serves it in a few dozen instructions, past
    /// that it takes the arena's slower path, for most requests of a hot key. Everything held
    /// across the follower's wait counts: it had grown to 1,112 bytes unnoticed.
    #[test]
    fn a_coalesced_followers_future_fits_glibcs_per_thread_cache() {
        let Ok(config) = Config::from_vars([("ORIGIN_URL", "http://127.0.0.1:9")]) else {
            panic!("test configuration");
        };
        let Ok(proxy) = Proxy::new(config) else {
            panic!("proxy");
        };
        let (parts, ()) = Request::new(()).into_parts();
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let target = Target::new("shop.test", &Uri::from_static("/a"), peer);
        let work = proxy
            .clone()
            .fetch_coalesced(parts, target, None, Fwd::UriMiss);
        let accounted = Accounted {
            work,
            proxy,
            started: Instant::now(),
            logged: None,
        };
        let size = std::mem::size_of_val(&accounted);
        assert!(size <= 1032, "{size} bytes");
    }

    #[test]
    fn a_target_keeps_the_host_as_spelled() {
        let uri = Uri::from_static("/a?b");
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let plain = Target::new("shop.test:8080", &uri, peer);
        assert_eq!(
            (plain.host(), plain.key.as_str()),
            ("shop.test:8080", "shop.test:8080/a?b")
        );
        assert!(
            plain.spelled.is_none(),
            "a lowercase host is read from the key"
        );
        let mixed = Target::new("Shop.Test", &uri, peer);
        assert_eq!(
            (mixed.host(), mixed.key.as_str()),
            ("Shop.Test", "shop.test/a?b")
        );
    }

    #[test]
    fn related_locations_stay_on_the_same_host() {
        assert_eq!(
            same_host_key("/a?b=1", "h.test"),
            Some("h.test/a?b=1".to_string())
        );
        assert_eq!(
            same_host_key("http://H.test/a", "h.test"),
            Some("h.test/a".to_string())
        );
        assert_eq!(same_host_key("http://other.test/a", "h.test"), None);
        assert_eq!(same_host_key("relative", "h.test"), None);
    }
}
