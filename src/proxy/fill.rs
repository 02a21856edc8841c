//! The leader's work for one key: ask the origin (conditionally when a stale copy has validators),
//! then either revalidate the stored copy (304), serve stale on failure, pass an uncacheable answer
//! through, or stream a cacheable answer to the client while a fill task keeps a copy for the cache.
//!
//! The fill task owns the origin body: a client that goes away does not stop the fill, so followers
//! still get their answer; a body that grows past `CACHE_MAX_OBJECT_MB` releases the followers at once
//! and keeps streaming.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::body::{BoxError, ChannelItem, IdleTimeout, ProxyBody};
use super::origin::OriginBody;
use super::respond::{self, Detail, Fwd};
use super::{headers, is_origin_failure, request_directives, satisfies, Proxy, Target};
use crate::cache::entry::{detach_body, Admission};
use crate::cache::l2::{Lock, LockToken, L2};
use crate::cache::policy::{
    admit, byte_range, forbids_storing, later, merge_not_modified, revalidation_matches,
    NotStorable, RangeAnswer, Validators, CACHE_TAG, CONDITIONAL_REQUEST_FIELDS, SURROGATE_KEY,
};
use crate::cache::Entry;
use crate::coalesce::FlightPermit;

/// How long a URL whose answer could not be stored goes straight to the origin (hit-for-miss).
const PASS_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// How often an instance waiting for another instance's fill looks in L2.
const FLEET_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// The fleet-wide fill lock, when this fill holds one. Released explicitly after the result is in
/// L2; a fill that ends any other way drops it, and the drop releases it in the background.
pub(super) struct FleetLock {
    held: Option<(Arc<L2>, LockToken)>,
}

impl FleetLock {
    fn none() -> Self {
        FleetLock { held: None }
    }

    fn held(l2: Arc<L2>, token: LockToken) -> Self {
        FleetLock {
            held: Some((l2, token)),
        }
    }

    fn is_held(&self) -> bool {
        self.held.is_some()
    }

    async fn release(mut self) {
        if let Some((l2, token)) = self.held.take() {
            l2.unlock(token).await;
        }
    }
}

impl Drop for FleetLock {
    fn drop(&mut self) {
        if let Some((l2, token)) = self.held.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { l2.unlock(token).await });
            }
        }
    }
}

/// Chunks buffered between the fill task and a slow client before the origin read waits.
const CLIENT_CHANNEL_CHUNKS: usize = 16;

impl Proxy {
    /// The leader's work. With an L2: a fresh copy another instance stored answers at once
    /// (`HIT-L2`); otherwise the fleet-wide lock decides which instance goes to the origin, and the
    /// others wait for its result in L2.
    ///
    /// `wait_until` ends the wait for another instance's fill: the request's CACHE_LOCK_TIMEOUT,
    /// part of which it may have spent following a local fill already.
    pub(super) async fn lead(
        &self,
        parts: Parts,
        target: &Target,
        mut stored: Option<Arc<Entry>>,
        permit: FlightPermit,
        fwd: Fwd,
        wait_until: Instant,
    ) -> Response<ProxyBody> {
        let inner = &self.0;
        let arrived = inner.clock.now();
        let Some(l2) = inner.cache.l2().cloned() else {
            return self
                .fetch_as_leader(parts, target, stored, permit, fwd, FleetLock::none())
                .await;
        };
        // A request's own no-cache wants the origin's word, not another instance's copy; its
        // max-age and min-fresh bound how old a copy it accepts (RFC 9111 §5.2.1.1, §5.2.1.3).
        let directives = request_directives(&parts.headers);
        if fwd != Fwd::Request {
            let since = permit.purge_generation();
            let purged = |entry: &Entry| inner.purge_log.overtaken(since, &target.key, &entry.tags);
            if let Some(found) = inner
                .cache
                .lookup_l2(&target.key, &parts.headers, purged)
                .await
            {
                let now = inner.clock.now();
                if found.is_fresh(now) && satisfies(&found, &directives, now) {
                    permit.complete(found.clone());
                    return respond::from_entry(&found, &parts.headers, false, now, Detail::HitL2);
                }
                // Stale in L2 too: still good for revalidation and stale-if-error, if newer than ours.
                if stored
                    .as_ref()
                    .is_none_or(|own| found.response_time > own.response_time)
                {
                    stored = Some(found);
                }
            }
        }
        let lock = match l2.lock(&target.key, inner.config.lock_timeout).await {
            Lock::Acquired(token) => FleetLock::held(l2.clone(), token),
            Lock::Unavailable => FleetLock::none(),
            Lock::Held => {
                // Another instance's result must be newer than ours; for a request with
                // no-cache, newer than the request itself (not a copy made before it came).
                let mut newer_than = stored.as_ref().map(|entry| entry.response_time);
                if fwd == Fwd::Request {
                    newer_than = newer_than.max(Some(arrived));
                }
                if let Some(entry) = self
                    .await_fleet_fill(
                        &l2,
                        target,
                        &parts.headers,
                        newer_than,
                        permit.purge_generation(),
                        wait_until,
                    )
                    .await
                {
                    let now = inner.clock.now();
                    if satisfies(&entry, &directives, now) {
                        permit.complete(entry.clone());
                        return respond::from_entry(
                            &entry,
                            &parts.headers,
                            false,
                            now,
                            Detail::HitL2,
                        );
                    }
                }
                // The other instance stored nothing usable (or took too long): fetch ourselves.
                FleetLock::none()
            }
        };
        self.fetch_as_leader(parts, target, stored, permit, fwd, lock)
            .await
    }

    /// Another instance holds the fill lock: poll L2 for its result until the lock goes away or
    /// `CACHE_LOCK_TIMEOUT` passes.
    async fn await_fleet_fill(
        &self,
        l2: &L2,
        target: &Target,
        request_headers: &http::HeaderMap,
        newer_than: Option<std::time::SystemTime>,
        purge_generation: u64,
        deadline: Instant,
    ) -> Option<Arc<Entry>> {
        let inner = &self.0;
        let purged = |entry: &Entry| {
            inner
                .purge_log
                .overtaken(purge_generation, &target.key, &entry.tags)
        };
        loop {
            tokio::time::sleep(FLEET_POLL).await;
            // The lock first, L2 second: the holder writes its result before it unlocks, so a lock
            // seen gone means the result (if any) is already readable. Looked at the other way
            // round, a fill that finished between the two reads would look like one that failed.
            let still_locked = l2.is_locked(&target.key).await == Some(true);
            if let Some(entry) = inner
                .cache
                .lookup_l2(&target.key, request_headers, purged)
                .await
            {
                let newer = newer_than.is_none_or(|t| entry.response_time > t);
                if newer && entry.is_fresh(inner.clock.now()) {
                    return Some(entry);
                }
            }
            if !still_locked || Instant::now() >= deadline {
                return None;
            }
        }
    }

    async fn fetch_as_leader(
        &self,
        parts: Parts,
        target: &Target,
        stored: Option<Arc<Entry>>,
        permit: FlightPermit,
        fwd: Fwd,
        lock: FleetLock,
    ) -> Response<ProxyBody> {
        let inner = &self.0;
        let policy_request = policy_request(&parts, target.host());
        let mut upstream = copy_parts(&parts);
        for name in CONDITIONAL_REQUEST_FIELDS {
            upstream.headers.remove(name);
        }
        let revalidating = stored
            .as_ref()
            .filter(|entry| entry.has_validators())
            .cloned();
        if let Some(entry) = &revalidating {
            add_validators(&mut upstream.headers, entry);
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
                permit.fail();
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
                permit.fail();
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
                    return self
                        .revalidated(
                            &parts,
                            &policy_request,
                            target,
                            &entry,
                            &response_parts.headers,
                            permit,
                            fwd,
                            lock,
                        )
                        .await;
                }
                // A 304 for some other representation: ask again without validators, store nothing.
                // The fleet waits on the lock for a result: none is coming.
                permit.release();
                drop(lock);
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
                if is_origin_failure(status) {
                    permit.fail();
                } else {
                    permit.release();
                }
                // The origin now marks this URL not to be stored: the old copy goes. Reasons that
                // belong to this request alone (its Authorization, a Set-Cookie) leave it in place.
                let response_says_no = forbids_storing(&response_parts.headers);
                if stored.is_some() && response_says_no {
                    self.invalidate(&target.key);
                }
                // Whatever this URL answers next time is as likely not storable: let the next
                // requests skip coalescing and L2 for a while (reasons of this request alone don't count).
                let about_the_response = response_says_no
                    || matches!(reason, NotStorable::NeverReusable | NotStorable::VaryStar);
                if about_the_response && (stored.is_none() || response_says_no) {
                    inner
                        .cache
                        .mark_pass(&target.key, &parts.headers, later(now, PASS_FOR));
                }
                tracing::debug!(?reason, status = status.as_u16(), "response not stored");
                if asked_for_a_range(&parts.headers, status) {
                    // Nothing will be stored: the fleet need not wait on the lock meanwhile.
                    drop((body, lock));
                    return self
                        .range_from_origin(parts, target, stored.is_none(), now, fwd)
                        .await;
                }
                let response = Response::from_parts(response_parts, body);
                return self.pass_through(response, Detail::Miss { stored: false, fwd });
            }
        };
        self.hide_surrogate_headers(&mut response_parts.headers);
        let declared_length = response_parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|length| length > inner.config.max_object_bytes) {
            permit.release();
            if stored.is_none() {
                inner
                    .cache
                    .mark_pass(&target.key, &parts.headers, later(now, PASS_FOR));
            }
            if asked_for_a_range(&parts.headers, status) {
                drop((body, lock));
                return self
                    .range_from_origin(parts, target, stored.is_none(), now, fwd)
                    .await;
            }
            let response = Response::from_parts(response_parts, body);
            return self.pass_through(response, Detail::Miss { stored: false, fwd });
        }
        // A byte range of what is being stored: cut from the fill's stream (RFC 9110 §14). Without
        // a declared length there is no `Content-Range` to send, and the full 200 is allowed.
        let range = match declared_length {
            Some(length) if asked_for_a_range(&parts.headers, status) => {
                byte_range(&parts.headers, Validators::default(), length)
            }
            _ => RangeAnswer::Full,
        };

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
        tokio::spawn(fill.run(body, tx, permit, lock));

        headers::to_client(&mut response_parts.headers);
        let stored = inner.cache.l1().enabled();
        let (status, body) = match (range, declared_length) {
            (RangeAnswer::Part { first, last }, Some(length)) => {
                respond::describe_part(&mut response_parts.headers, first, last, length);
                (
                    StatusCode::PARTIAL_CONTENT,
                    ProxyBody::channel_range(rx, first, last),
                )
            }
            (RangeAnswer::Unsatisfiable, Some(length)) => {
                // The fill stores the body all the same; this client gets none of it.
                drop(rx);
                response_parts.headers = respond::unsatisfiable_range_fields(length);
                headers::to_client(&mut response_parts.headers);
                (StatusCode::RANGE_NOT_SATISFIABLE, ProxyBody::empty())
            }
            _ => (response_parts.status, ProxyBody::channel(rx)),
        };
        response_parts.status = status;
        respond::mark(
            &mut response_parts.headers,
            Detail::Miss { stored, fwd },
            None,
        );
        Response::from_parts(response_parts, body)
    }

    /// The fill's answer will not be stored, so the client's range is better asked of the origin
    /// than cut from a whole body fetched for nothing: the request goes again with its `Range`, and
    /// (when nothing is stored for the URL) the URL is passed for a while, so that its next ranges
    /// go there at once instead of paying two origin requests each.
    async fn range_from_origin(
        &self,
        parts: Parts,
        target: &Target,
        nothing_stored: bool,
        now: std::time::SystemTime,
        fwd: Fwd,
    ) -> Response<ProxyBody> {
        if nothing_stored {
            self.0
                .cache
                .mark_pass(&target.key, &parts.headers, later(now, PASS_FOR));
        }
        self.forward(parts, ProxyBody::empty(), target, None, fwd)
            .await
    }

    /// The origin confirmed the stored copy (304): update its headers and freshness, store it again
    /// and answer the client with the full response.
    #[allow(clippy::too_many_arguments)]
    async fn revalidated(
        &self,
        parts: &Parts,
        policy_request: &Parts,
        target: &Target,
        stale: &Entry,
        not_modified: &http::HeaderMap,
        permit: FlightPermit,
        fwd: Fwd,
        lock: FleetLock,
    ) -> Response<ProxyBody> {
        let inner = &self.0;
        let now = inner.clock.now();
        let detail = Detail::Revalidated {
            forced: fwd == Fwd::Request,
        };
        let mut merged = merge_not_modified(&stale.headers, not_modified);
        let admitted = admit(policy_request, stale.status, &merged, now, &inner.config);
        self.hide_surrogate_headers(&mut merged);
        match admitted {
            Ok(mut admission) => {
                // The stored headers lost their surrogate keys when the copy was stored (unless
                // they are visible): a 304 that does not name them again keeps the copy's own.
                let renamed = not_modified.contains_key(SURROGATE_KEY)
                    || not_modified.contains_key(CACHE_TAG);
                if !renamed {
                    admission.tags = stale.tags.clone();
                }
                let entry = Arc::new(Entry::new(
                    stale.status,
                    &merged,
                    stale.body.clone(),
                    now,
                    admission,
                ));
                self.settle(&target.key, &entry, &parts.headers, permit, lock)
                    .await;
                respond::from_entry(&entry, &parts.headers, false, now, detail)
            }
            Err(_) => {
                permit.release();
                // As for a 200 (see `fetch_as_leader`): the origin now marks the URL not to be
                // stored, and the copy goes; a reason of this request alone (its Authorization)
                // leaves the shared copy in place.
                if forbids_storing(&merged) {
                    self.invalidate(&target.key);
                }
                // Answered with the 304's fields all the same (its `private`, `no-store`).
                let answer = stale.revalidated_copy(&merged, now);
                respond::from_entry(&answer, &parts.headers, false, now, detail)
            }
        }
    }
}

impl Proxy {
    /// Stores a fill's result and hands it to the followers, unless an invalidation overtook it.
    /// Store first, check the purge log second: a purge logged after the permit's generation either
    /// comes before this check (seen here) or purges what was stored. A fill holding the
    /// fleet-wide lock writes L2 before releasing it, so waiting instances find the result.
    async fn settle(
        &self,
        key: &str,
        entry: &Arc<Entry>,
        request_headers: &http::HeaderMap,
        permit: FlightPermit,
        lock: FleetLock,
    ) {
        let inner = &self.0;
        let now = inner.clock.now();
        let since = permit.purge_generation();
        // A fill that outlived the lock age and was superseded keeps its older answer out of
        // Redis, where it would replace the newer fill's (the last write wins there); this
        // instance's L1 weighs the two (see `Cache::holds_newer`).
        let superseded = permit.superseded();
        let stored = if lock.is_held() && !superseded {
            inner
                .cache
                .store_now(key, entry.clone(), request_headers, now, since)
                .await
        } else {
            inner
                .cache
                .store(key, entry.clone(), request_headers, now, since, !superseded)
        };
        lock.release().await;
        if inner.purge_log.overtaken(since, key, &entry.tags) {
            // A purge that concerns this response arrived while it was being fetched: what was
            // just stored must not outlive it (an in-flight request never undoes a purge). L2
            // checks its write against the same log (see `cache::l2`). Nothing stored (a more
            // recent copy was there, from a fill that reopened the key): that copy stays.
            if stored {
                inner.cache.l1().remove(key);
            }
            permit.release();
        } else if entry.is_fresh(inner.clock.now()) {
            permit.complete(entry.clone());
        } else {
            // Stored only for revalidation (no freshness): concurrent requests must ask the origin.
            permit.release();
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
        mut body: OriginBody,
        tx: mpsc::Sender<ChannelItem>,
        permit: FlightPermit,
        mut lock: FleetLock,
    ) {
        let inner = &self.proxy.0;
        let idle = inner.origin.timeout();
        let max = inner.config.max_object_bytes;
        let mut client = ClientFeed::new(tx, idle);
        let mut storing = Some(permit);
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut size: u64 = 0;
        loop {
            let deadline = Instant::now() + idle;
            let frame = client
                .feed_while(tokio::time::timeout_at(deadline, body.frame()))
                .await;
            let frame = match frame {
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
                    // So do other instances waiting on the fleet-wide lock, now rather than when
                    // this stream ends or their CACHE_LOCK_TIMEOUT passes (dropped, it is released
                    // in the background).
                    drop(std::mem::replace(&mut lock, FleetLock::none()));
                    chunks = Vec::new();
                } else {
                    chunks.push(data.clone());
                }
            }
            if storing.is_some() {
                // The body is being kept anyway: a slow client must not slow the followers down.
                client.queue(data);
            } else {
                client.send(data).await;
                if client.is_gone() {
                    return;
                }
            }
        }
        if let Some(permit) = storing {
            let body = detach_body(chunks, usize::try_from(size).unwrap_or(0));
            let entry = Arc::new(Entry::new(
                self.status,
                &self.headers,
                body,
                self.response_time,
                self.admission,
            ));
            self.proxy
                .settle(&self.key, &entry, &self.request_headers, permit, lock)
                .await;
        }
        client.finish().await;
    }
}

/// The leader's client. While the body is being stored the fill never waits for it: chunks queue
/// in a backlog that shares the stored `Bytes` (no extra memory) and is handed over whenever the
/// client takes it. Otherwise sends apply backpressure. A client that takes nothing for the stall
/// limit is dropped, and its body ends in an error, never looking complete.
struct ClientFeed {
    tx: Option<mpsc::Sender<ChannelItem>>,
    backlog: VecDeque<Bytes>,
    stall: Duration,
}

impl ClientFeed {
    fn new(tx: mpsc::Sender<ChannelItem>, stall: Duration) -> Self {
        ClientFeed {
            tx: Some(tx),
            backlog: VecDeque::new(),
            stall,
        }
    }

    fn is_gone(&self) -> bool {
        self.tx.is_none()
    }

    fn close(&mut self) {
        self.tx = None;
        self.backlog.clear();
    }

    fn queue(&mut self, data: Bytes) {
        if self.tx.is_some() {
            self.backlog.push_back(data);
        }
    }

    /// Awaits `next` (the origin's next frame) while handing the backlog to the client.
    async fn feed_while<F: Future>(&mut self, next: F) -> F::Output {
        tokio::pin!(next);
        loop {
            let sender = match &self.tx {
                Some(tx) if !self.backlog.is_empty() => tx.clone(),
                _ => return next.await,
            };
            tokio::select! {
                biased;
                output = &mut next => return output,
                reserved = sender.reserve() => match reserved {
                    Ok(slot) => {
                        if let Some(chunk) = self.backlog.pop_front() {
                            slot.send(Ok(Some(chunk)));
                        }
                    }
                    Err(_) => self.close(),
                },
            }
        }
    }

    /// Sends a chunk after the backlog, waiting for the client (at most the stall limit per chunk).
    async fn send(&mut self, data: Bytes) {
        self.queue(data);
        self.flush().await;
    }

    async fn flush(&mut self) {
        while let Some(chunk) = self.backlog.pop_front() {
            let Some(tx) = &self.tx else { return };
            match tokio::time::timeout(self.stall, tx.send(Ok(Some(chunk)))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => self.close(),
                Err(_) => {
                    tracing::warn!(stall = ?self.stall, "client stopped reading; dropping it");
                    self.close();
                }
            }
        }
    }

    /// Delivers the rest, then marks the body complete.
    async fn finish(mut self) {
        self.flush().await;
        if let Some(tx) = &self.tx {
            let _ = tokio::time::timeout(self.stall, tx.send(Ok(None))).await;
        }
    }

    /// Delivers what arrived, then ends the body with an error.
    async fn fail(mut self, error: BoxError) {
        self.flush().await;
        if let Some(tx) = &self.tx {
            let _ = tokio::time::timeout(self.stall, tx.send(Err(error))).await;
        }
    }
}

/// Whether the client asked for a byte range of what the origin answered with `status` (the fill
/// asks for the whole body, so only a 200 has ranges to cut).
fn asked_for_a_range(request: &http::HeaderMap, status: StatusCode) -> bool {
    status == StatusCode::OK && request.contains_key(header::RANGE)
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

impl Proxy {
    /// Surrogate keys are for this cache, not for clients (unless `SURROGATE_HEADERS_VISIBLE`).
    pub(super) fn hide_surrogate_headers(&self, headers: &mut http::HeaderMap) {
        // A scan of the names is cheaper than hashing two custom names when neither is there.
        if self.0.config.surrogate_headers_visible
            || !headers
                .keys()
                .any(|name| name == SURROGATE_KEY || name == CACHE_TAG)
        {
            return;
        }
        headers.remove(SURROGATE_KEY);
        headers.remove(CACHE_TAG);
    }
}

/// Asks the origin for a 304 if the stored copy is still current.
pub(super) fn add_validators(headers: &mut http::HeaderMap, entry: &Entry) {
    if let Some(etag) = &entry.etag {
        headers.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = entry.headers.get(header::LAST_MODIFIED) {
        headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
    }
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
