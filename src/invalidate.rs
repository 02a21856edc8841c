//! Purges: what to take out of the cache (one key, a glob over keys, or surrogate keys), hard or soft
//! (marked stale, Fastly's semantics); the log that keeps a fill which began before a matching purge
//! from storing its result after it; and the broadcast that takes every purge to every instance.
//!
//! Broadcast: each purge is numbered and published atomically (`INCR` + `PUBLISH` in one script) on
//! `{prefix}invalidate`. Pub/sub is at-most-once, so an instance that sees a gap in the numbers, a
//! subscriber reconnect, or its receiver lagging flushes its L1 (L2 stays the truth). The receive
//! loop is ours: fred's own helpers end silently on lag. A purge that cannot be published (Redis
//! down) is applied locally, answered `"broadcast": false`, and re-applied to L2 and published when
//! Redis returns. A purge some L2 store did not fully take (down, slow, a failed call) is done there
//! when the store answers again, then applied to L1 and published once more: while the store held
//! the old copy, any instance may have put it back in its L1.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, SystemTime};

use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::cache::l2::{Retraction, SentWrite};
use crate::metrics::Stats;
use crate::proxy::{Inner, Proxy};

/// Distinct pattern and tag purges remembered for the generation check; a fill older than the
/// newest one forgotten is refused. A purge repeated takes one place.
const LOG_CAPACITY: usize = 4096;
/// Distinct URLs whose key purge is remembered, as a hash each (a few MB at most): every
/// successful write request invalidates its URL, and an API written to at many URLs must not
/// push the log past what its slowest fill needs, or that fill is refused.
const KEY_LOG_CAPACITY: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Selector {
    /// One cache key (`host/path?query`), all its variants.
    Key(String),
    /// A glob over cache keys where `*` spans any characters, `/` included.
    Pattern(String),
    /// Entries carrying any of these surrogate keys.
    Tags(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purge {
    pub selector: Selector,
    /// Mark stale instead of removing: stale-while-revalidate and stale-if-error still apply.
    pub soft: bool,
}

/// A purge request that cannot be applied; the message says why (answered with 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PurgeError(pub String);

fn bad(message: &str) -> PurgeError {
    PurgeError(message.to_string())
}

impl Purge {
    /// Parses `{"key": ...}` | `{"pattern": ...}` | `{"tags": [...]}` with an optional `"soft": bool`.
    /// Anything else is refused as a whole: nothing is ever half-applied.
    pub fn from_json(body: &[u8]) -> Result<Purge, PurgeError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| PurgeError(format!("malformed JSON: {e}")))?;
        let object = value.as_object().ok_or_else(|| {
            bad("expected a JSON object with one of \"key\", \"pattern\", \"tags\"")
        })?;
        if let Some(unknown) = object
            .keys()
            .find(|k| !matches!(k.as_str(), "key" | "pattern" | "tags" | "soft"))
        {
            return Err(PurgeError(format!("unknown field {unknown:?}")));
        }
        let soft = match object.get("soft") {
            None => false,
            Some(serde_json::Value::Bool(soft)) => *soft,
            Some(_) => return Err(bad("\"soft\" must be true or false")),
        };
        let selectors: Vec<&str> = ["key", "pattern", "tags"]
            .into_iter()
            .filter(|name| object.contains_key(*name))
            .collect();
        let selector = match selectors.as_slice() {
            [] => {
                return Err(bad(
                    "no selector: give one of \"key\", \"pattern\", \"tags\"",
                ))
            }
            ["key"] => Selector::Key(non_empty_string(object.get("key"), "key")?),
            ["pattern"] => Selector::Pattern(non_empty_string(object.get("pattern"), "pattern")?),
            ["tags"] => {
                let tags = object
                    .get("tags")
                    .and_then(serde_json::Value::as_array)
                    .ok_or_else(|| bad("\"tags\" must be a list of strings"))?;
                if tags.is_empty() {
                    return Err(bad("\"tags\" is empty"));
                }
                let tags = tags
                    .iter()
                    .map(|t| match t.as_str() {
                        Some(tag) if !tag.trim().is_empty() => Ok(tag.trim().to_string()),
                        _ => Err(bad("\"tags\" must be non-empty strings")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Selector::Tags(tags)
            }
            several => {
                return Err(PurgeError(format!(
                    "several selectors ({}): give exactly one",
                    several.join(", ")
                )))
            }
        };
        Ok(Purge { selector, soft })
    }

    /// A hard purge of every key: what a queue that overflowed, or a missed invalidation, stands for.
    pub fn everything() -> Purge {
        Purge {
            selector: Selector::Pattern("*".into()),
            soft: false,
        }
    }

    /// Whether an entry stored under `key` (the URL's primary key) with `tags` is concerned.
    pub fn matches(&self, key: &str, tags: &[String]) -> bool {
        self.selector.matches(key, tags)
    }
}

impl Selector {
    /// Whether an entry stored under `key` (the URL's primary key) with `tags` is selected.
    pub fn matches(&self, key: &str, tags: &[String]) -> bool {
        match self {
            Selector::Key(purged) => purged == key,
            Selector::Pattern(pattern) => glob_match(pattern, key),
            Selector::Tags(purged) => purged.iter().any(|tag| tags.contains(tag)),
        }
    }
}

fn non_empty_string(value: Option<&serde_json::Value>, name: &str) -> Result<String, PurgeError> {
    match value.and_then(serde_json::Value::as_str) {
        Some(text) if !text.is_empty() => Ok(text.to_string()),
        Some(_) => Err(PurgeError(format!("\"{name}\" is empty"))),
        None => Err(PurgeError(format!("\"{name}\" must be a string"))),
    }
}

/// Glob match where `*` matches any run of characters (including `/`) and everything else is
/// literal. Linear-time two-pointer algorithm: no backtracking blow-up on hostile patterns.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star_pi, star_ti)) = star {
            pi = star_pi + 1;
            ti = star_ti + 1;
            star = Some((star_pi, star_ti + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Recent purges, numbered, so that a fill can ask "was I overtaken by a purge that concerns me?"
#[derive(Default)]
pub struct PurgeLog {
    generation: AtomicU64,
    // std Mutex: held for a record or a scan of the purges newer than one fill, never across an
    // .await.
    recent: Mutex<Recent>,
}

/// What the log remembers. Only whether a purge matching an entry came after a fill began
/// matters, so of a selector recorded several times only the latest record is kept: a write-heavy
/// URL (each successful POST invalidates it) takes one place instead of pushing every other purge
/// out, which would make every fill under way look overtaken. Key purges, the many, are looked up
/// by their URL's hash; patterns and tags, the few, are matched one by one.
#[derive(Default)]
struct Recent {
    /// Pattern and tag purges, each once, at the generation it was last recorded, oldest first.
    purges: VecDeque<(u64, Selector)>,
    /// Where each of them is in `purges` (by generation).
    latest: HashMap<Selector, u64>,
    /// Each purged URL's hash and the generation of its latest purge. A collision can only make a
    /// fill look overtaken, which is safe.
    keys: HashMap<u64, u64>,
    /// The records of `keys` in the order they were made, oldest first; a record made stale by a
    /// later purge of the same URL is skipped, and swept out when they pile up.
    key_order: VecDeque<(u64, u64)>,
    hasher: std::hash::RandomState,
    /// The generation of the newest purge forgotten (capacity): a fill from before it may have
    /// been overtaken by it.
    forgotten_through: u64,
}

impl Recent {
    fn key_hash(&self, key: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    fn record_key(&mut self, key: &str, generation: u64) {
        let hash = self.key_hash(key);
        self.keys.insert(hash, generation);
        self.key_order.push_back((generation, hash));
        if self.key_order.len() > 2 * self.keys.len() + 1024 {
            let keys = &self.keys;
            self.key_order
                .retain(|(generation, hash)| keys.get(hash) == Some(generation));
        }
        while self.keys.len() > KEY_LOG_CAPACITY {
            let Some((generation, hash)) = self.key_order.pop_front() else {
                break;
            };
            if self.keys.get(&hash) == Some(&generation) {
                self.keys.remove(&hash);
                self.forgotten_through = self.forgotten_through.max(generation);
            }
        }
    }

    fn record_other(&mut self, selector: &Selector, generation: u64) {
        if let Some(previous) = self.latest.insert(selector.clone(), generation) {
            // Sorted by generation: found by bisection; most often near the back.
            if let Ok(at) = self
                .purges
                .binary_search_by_key(&previous, |(generation, _)| *generation)
            {
                self.purges.remove(at);
            }
        }
        if self.purges.len() >= LOG_CAPACITY {
            if let Some((forgotten, selector)) = self.purges.pop_front() {
                self.latest.remove(&selector);
                self.forgotten_through = self.forgotten_through.max(forgotten);
            }
        }
        self.purges.push_back((generation, selector.clone()));
    }
}

impl PurgeLog {
    /// The generation a fill starting now remembers.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Logs a purge; returns its generation (fills that began before it remember a lower one).
    pub fn record(&self, purge: &Purge) -> u64 {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        match &purge.selector {
            Selector::Key(key) => recent.record_key(key, generation),
            other => recent.record_other(other, generation),
        }
        generation
    }

    /// Whether a purge recorded after `since` concerns `key`/`tags`. A fill from before a purge
    /// the log has forgotten is treated as overtaken (refusing to store is always safe). Looks at
    /// the pattern and tag purges newer than `since` only.
    pub fn overtaken(&self, since: u64, key: &str, tags: &[String]) -> bool {
        if self.generation() == since {
            return false;
        }
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.forgotten_through > since
            || recent
                .keys
                .get(&recent.key_hash(key))
                .is_some_and(|purged| *purged > since)
            || recent
                .purges
                .iter()
                .rev()
                .take_while(|(generation, _)| *generation > since)
                .any(|(_, selector)| selector.matches(key, tags))
    }
}

/// Purges waiting for Redis; past this the oldest are replaced by one purge of everything (safe:
/// L1s refill from L2 and the origin).
const PENDING_CAPACITY: usize = 10_000;
/// How often purges Redis missed (not published, or not done on a store) are tried again.
const RETRY_EVERY: Duration = Duration::from_millis(250);
/// The longest pause between tries of a store that answers but keeps failing a purge (the pause
/// doubles from `RETRY_EVERY` on each failed round): a retry may scan a large keyspace.
const RETRY_PAUSE_LIMIT: Duration = Duration::from_secs(30);
/// The longest pause while the store does not answer at all (a `PING` costs nothing): once it is
/// back, and its breaker lets reads through again, it may serve what it owes until the retry
/// gets there, so the retry must not lag far behind.
const DOWN_PAUSE_LIMIT: Duration = Duration::from_secs(1);

/// What travels on the channel, after the sequence number.
#[derive(Serialize, Deserialize)]
struct Message {
    /// The publishing instance (it applied the purge already).
    from: String,
    purge: Purge,
    /// Published again (after a store that missed it took it, or after writes it overtook were
    /// taken back): receivers apply it to L1 again, but do not take back writes for it once more.
    #[serde(default)]
    again: bool,
}

/// Purges applied locally that Redis (or one of its stores) has not taken yet, in order.
#[derive(Default)]
pub struct Pending {
    // std Mutex: held to push or take, never across an .await.
    purges: Mutex<VecDeque<Purge>>,
}

impl Pending {
    /// Queues a purge, unless the same one already waits behind the front (a retry that failed
    /// again). The front may be under way, and what it missed since began must be done after it.
    fn push(&self, purge: Purge) {
        let mut purges = self.purges.lock().unwrap_or_else(|p| p.into_inner());
        if purges.iter().skip(1).any(|queued| *queued == purge) {
            return;
        }
        if purges.len() >= PENDING_CAPACITY {
            purges.clear();
            purges.push_back(Purge::everything());
            tracing::warn!(
                "too many purges waiting for Redis: everything will be purged when it returns"
            );
        }
        purges.push_back(purge);
    }

    fn front(&self) -> Option<Purge> {
        self.purges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .front()
            .cloned()
    }

    /// Removes `published` from the front, if it is still there: an overflow since it was read
    /// replaced the queue with a purge of everything, which must stay.
    fn pop(&self, published: &Purge) {
        let mut purges = self.purges.lock().unwrap_or_else(|p| p.into_inner());
        if purges.front() == Some(published) {
            purges.pop_front();
        }
    }

    /// Moves `failed` from the front to the back, if it is still in front: purges commute, and the
    /// ones behind it must not wait for one the store keeps refusing.
    fn requeue(&self, failed: &Purge) {
        let mut purges = self.purges.lock().unwrap_or_else(|p| p.into_inner());
        if purges.front() == Some(failed) {
            if let Some(purge) = purges.pop_front() {
                purges.push_back(purge);
            }
        }
    }

    /// How many purges wait.
    pub fn waiting(&self) -> usize {
        self.purges.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Applies a purge to this instance: logged first (a fill under way, or an L2 read, checks the log
/// before it keeps what it got), then taken out of L1. Returns how many L1 entries it concerned.
pub(crate) fn purge_here(inner: &Inner, purge: &Purge, now: SystemTime) -> u64 {
    log_and_purge_l1(inner, purge, now).1
}

/// [`purge_here`]'s work: the purge's generation in the log, and how many L1 entries it concerned.
fn log_and_purge_l1(inner: &Inner, purge: &Purge, now: SystemTime) -> (u64, u64) {
    let generation = inner.purge_log.record(purge);
    (generation, inner.cache.purge_l1(purge, now))
}

/// [`purge_here`] for another instance's purge, heard of for the first time; then the L2 writes
/// of this instance's fills that it may have undone are retracted: that instance deleted on Redis
/// before it announced the purge, and a write of ours that landed in between undid it. (A write
/// still on its way when a purge is logged checks again once it landed; one that landed before a
/// purge made here was deleted by it.)
fn purge_heard(inner: &Inner, purge: &Purge, now: SystemTime) {
    let (generation, _) = log_and_purge_l1(inner, purge, now);
    if let Some(l2) = inner.cache.l2() {
        l2.retract_overtaken(purge, generation);
    }
}

/// Carries out the L2's retractions one after another (see `L2::retract_overtaken`).
async fn retract(inner: Weak<Inner>, mut retractions: mpsc::UnboundedReceiver<Retraction>) {
    while let Some(retraction) = retractions.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        take_back(&inner, retraction).await;
    }
}

/// Deletes the writes a purge overtook that L2 still holds as they were written; a store that did
/// not answer gets the purge itself again, as any purge it missed (see `retry_store`). If any was
/// deleted, the purge is applied here again and published again: meanwhile any instance may have
/// taken such a value into its L1.
async fn take_back(inner: &Inner, Retraction { writes, purge }: Retraction) {
    let Some(l2) = inner.cache.l2() else { return };
    let (deleted, failed) = l2.take_back(writes).await;
    let stores: BTreeSet<usize> = failed.iter().map(SentWrite::store).collect();
    for store in stores {
        tracing::warn!(
            store,
            "a Redis store did not answer while writes a purge overtook were taken back; it gets the purge again when it answers"
        );
        owe(inner, store, &purge);
    }
    if deleted == 0 {
        return;
    }
    tracing::info!(
        deleted,
        "L2 values fetched before a purge and stored after it were deleted; the purge is published again"
    );
    apply_and_publish_again(inner, purge).await;
}

/// Queues a purge for store `index`, which did not take it: done there when it answers again (see
/// `retry_store`).
fn owe(inner: &Inner, index: usize, purge: &Purge) {
    if let Some(queue) = inner.unfinished.get(index) {
        queue.push(purge.clone());
    }
}

/// Applies a purge here again and publishes it again (receivers apply it to L1, nothing more):
/// while a Redis store held what it purges, any instance may have put that back in its L1.
async fn apply_and_publish_again(inner: &Inner, purge: Purge) {
    purge_here(inner, &purge, inner.clock.now());
    if !publish(inner, &purge, true).await {
        inner.pending.push(purge);
    }
}

/// Applies a purge to every L2 store; a store it did not fully reach is queued to get it when it
/// answers again (see `retry_store`). Returns how many entries it concerned and whether a
/// store still owes it.
pub(crate) async fn purge_l2(inner: &Inner, purge: &Purge, now: SystemTime) -> (u64, bool) {
    let outcome = inner.cache.purge_l2(purge, now).await;
    for &index in &outcome.unfinished {
        tracing::warn!(
            store = index,
            "a Redis store did not take a purge; it gets it again when it answers"
        );
        owe(inner, index, purge);
    }
    (outcome.concerned, !outcome.unfinished.is_empty())
}

impl Proxy {
    /// Publishes a purge this instance applied; `false` when Redis could not take it (it is queued
    /// and published when Redis returns).
    pub(crate) async fn broadcast(&self, purge: &Purge) -> bool {
        let inner = &self.0;
        if inner.cache.l2().is_none() {
            return false;
        }
        let published = publish(inner, purge, false).await;
        if !published {
            inner.pending.push(purge.clone());
        }
        published
    }

    /// Starts the subscriber of every store, the retry of unpublished purges, and per store the
    /// retry of the purges it missed.
    pub(crate) fn start_broadcast(&self) {
        let Some(l2) = self.0.cache.l2() else { return };
        let channel = l2.channel();
        for client in l2.subscribers() {
            tokio::spawn(subscribe(
                std::sync::Arc::downgrade(&self.0),
                client,
                channel.clone(),
            ));
        }
        tokio::spawn(retry_unpublished(std::sync::Arc::downgrade(&self.0)));
        if let Some(retractions) = l2.take_retractions() {
            tokio::spawn(retract(std::sync::Arc::downgrade(&self.0), retractions));
        }
        for index in 0..self.0.unfinished.len() {
            tokio::spawn(retry_store(std::sync::Arc::downgrade(&self.0), index));
        }
    }
}

/// Publishes a purge; `again` when it was published before.
async fn publish(inner: &Inner, purge: &Purge, again: bool) -> bool {
    let Some(l2) = inner.cache.l2() else {
        return false;
    };
    let message = Message {
        from: inner.instance.clone(),
        purge: purge.clone(),
        again,
    };
    let Ok(payload) = serde_json::to_string(&message) else {
        return false;
    };
    let published = l2.publish(&payload).await.is_some();
    if published {
        Stats::incr(&inner.stats.invalidations_sent);
    }
    published
}

/// Every `RETRY_EVERY`, the purges not published.
async fn retry_unpublished(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(RETRY_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        publish_unpublished(&inner).await;
    }
}

/// The purges store `index` missed, in a task of its own: a long retry (a pattern over a large
/// keyspace) on one store holds up neither the others nor the publishing. After a round in which
/// the store failed, the pause before the next doubles, up to `RETRY_PAUSE_LIMIT`.
async fn retry_store(inner: Weak<Inner>, index: usize) {
    let mut pause = RETRY_EVERY;
    loop {
        tokio::time::sleep(pause).await;
        let Some(inner) = inner.upgrade() else { return };
        pause = match finish_unfinished(&inner, index).await {
            Round::Done => RETRY_EVERY,
            Round::StoreDown => (pause * 2).min(DOWN_PAUSE_LIMIT),
            Round::PurgeFailed => (pause * 2).min(RETRY_PAUSE_LIMIT),
        };
    }
}

/// How a round of owed purges ended.
enum Round {
    /// Nothing owed any more (for now).
    Done,
    /// The store did not answer `PING`.
    StoreDown,
    /// The store answered, but a purge failed there again.
    PurgeFailed,
}

/// One round over the purges store `index` missed, once it answers `PING`: each is done there, then
/// applied to this L1 again and published again, since while the store held the old copy, this or
/// another instance may have put it back in its L1 (a read that began after the purge was logged
/// is not refused). A purge that fails again goes to the back of the queue and ends the round.
async fn finish_unfinished(inner: &Inner, index: usize) -> Round {
    let (Some(l2), Some(queue)) = (inner.cache.l2(), inner.unfinished.get(index)) else {
        return Round::Done;
    };
    if queue.waiting() == 0 {
        return Round::Done;
    }
    if !l2.store_answers(index).await {
        return Round::StoreDown;
    }
    // Each purge waiting now, once (those queued meanwhile wait for the next round).
    for _ in 0..queue.waiting() {
        let Some(purge) = queue.front() else { break };
        if l2
            .retry_purge(index, &purge, inner.clock.now())
            .await
            .is_err()
        {
            queue.requeue(&purge);
            return Round::PurgeFailed;
        }
        queue.pop(&purge);
        apply_and_publish_again(inner, purge).await;
        tracing::info!(
            store = index,
            "a purge a Redis store missed is now done there, and published again"
        );
    }
    Round::Done
}

/// Publishes, in order, the purges Redis missed, after applying each to L2 (which was down too).
async fn publish_unpublished(inner: &Inner) {
    // L2 first, then the others' L1s: published first, another instance could refill its L1 from
    // the copy still in L2.
    while let Some(purge) = inner.pending.front() {
        let Some(l2) = inner.cache.l2() else { break };
        if !l2.ping().await {
            break;
        }
        purge_l2(inner, &purge, inner.clock.now()).await;
        if !publish(inner, &purge, false).await {
            break;
        }
        inner.pending.pop(&purge);
        tracing::info!("a purge made while Redis was away is now published");
    }
}

/// One store's subscriber: (re)subscribes whenever its connection is (re)established and applies
/// what other instances publish. Anything that may have lost a message flushes L1.
async fn subscribe(inner: Weak<Inner>, client: fred::clients::Client, channel: String) {
    let mut messages = client.message_rx();
    let mut reconnects = client.reconnect_rx();
    let mut first = true;
    let mut pause = RETRY_EVERY;
    loop {
        if inner.strong_count() == 0 {
            return;
        }
        if client.wait_for_connect().await.is_err()
            || client.subscribe(channel.as_str()).await.is_err()
            || !listening(&client, &channel).await
        {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_PAUSE_LIMIT);
            continue;
        }
        pause = RETRY_EVERY;
        // A connection event that came before this subscription is this subscription.
        while reconnects.try_recv().is_ok() {}
        match inner.upgrade() {
            // Counted once L1 is flushed: what waits for this number finds it done.
            Some(inner) if !first => {
                flush_l1(&inner, "the invalidation subscriber reconnected");
                Stats::incr(&inner.stats.pubsub_reconnects);
            }
            Some(inner) => {
                first = false;
                // Requests served before this subscription (Redis late or unreachable at start-up)
                // filled L1 while purges published meanwhile went unheard.
                if !inner.cache.l1().is_empty() {
                    flush_l1(
                        &inner,
                        "the invalidation subscriber connected after L1 was filled",
                    );
                }
                Stats::incr(&inner.stats.pubsub_reconnects);
                inner.subscribed.send_replace(true);
            }
            None => return,
        }
        let mut last_seq: Option<u64> = None;
        loop {
            tokio::select! {
                message = messages.recv() => {
                    let Some(inner) = inner.upgrade() else { return };
                    match message {
                        Ok(message) => {
                            if let Some(text) = message.value.as_str() {
                                receive(&inner, &text, &mut last_seq);
                            }
                        }
                        Err(RecvError::Lagged(missed)) => {
                            flush_l1(&inner, &format!("the invalidation receiver lagged ({missed} messages)"));
                        }
                        Err(RecvError::Closed) => return,
                    }
                }
                reconnected = reconnects.recv() => {
                    if matches!(reconnected, Err(RecvError::Closed)) {
                        return;
                    }
                    break; // subscribe again on the new connection
                }
            }
        }
    }
}

/// Whether the subscriber's connection really listens now. fred reports a SUBSCRIBE that Redis
/// refused (an ACL user without `+subscribe` or without the channel) as done; a connection that
/// listens answers PING with an array (RESP2's subscribed form), one that does not with `PONG`. A
/// cluster client may send the PING to another node than its subscription's: trusted as it is.
async fn listening(client: &fred::clients::Client, channel: &str) -> bool {
    if client.is_clustered() {
        return true;
    }
    match client.ping::<fred::types::Value>(None).await {
        Ok(fred::types::Value::Array(_)) => true,
        Ok(_) => {
            tracing::warn!(
                channel,
                "Redis refused to subscribe this instance to the invalidation channel (an ACL? the user needs +subscribe and the channel); purges of other instances go unheard until it does"
            );
            false
        }
        Err(_) => false,
    }
}

/// Applies one published purge (unless it is ours) and checks the numbering for gaps.
fn receive(inner: &Inner, text: &str, last_seq: &mut Option<u64>) {
    let Some((seq, payload)) = text.split_once(' ') else {
        return;
    };
    let (Ok(seq), Ok(message)) = (seq.parse::<u64>(), serde_json::from_str::<Message>(payload))
    else {
        tracing::warn!("unreadable message on the invalidation channel; ignored");
        return;
    };
    if let Some(last) = *last_seq {
        // Saturating: anyone who may PUBLISH can send u64::MAX, and an overflow here (a panic in
        // debug builds) would end this subscriber, and every purge after it would go unheard.
        if seq > last.saturating_add(1) {
            flush_l1(
                inner,
                &format!("invalidations {}..{} were missed", last + 1, seq - 1),
            );
        } else if seq <= last {
            // The counter started over (its key was evicted or deleted, Redis lost its data):
            // what was published in between cannot be told, and later gaps must still show.
            flush_l1(
                inner,
                &format!("the invalidation sequence restarted ({seq} after {last})"),
            );
        }
    }
    *last_seq = Some(seq);
    if message.from == inner.instance {
        return;
    }
    Stats::incr(&inner.stats.invalidations_received);
    if message.again {
        purge_here(inner, &message.purge, inner.clock.now());
    } else {
        purge_heard(inner, &message.purge, inner.clock.now());
    }
    Stats::incr(&inner.stats.invalidations_applied);
}

fn flush_l1(inner: &Inner, why: &str) {
    tracing::warn!(
        why,
        "flushing L1: an invalidation may have been missed (L2 stays the truth)"
    );
    inner.purge_log.record(&Purge::everything());
    inner.cache.l1().clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Purge {
        Purge {
            selector: Selector::Key(k.into()),
            soft: false,
        }
    }

    #[test]
    fn messages_from_instances_that_do_not_say_again_are_first_announcements(
    ) -> Result<(), serde_json::Error> {
        let older: Message = serde_json::from_str(
            r#"{"from":"a","purge":{"selector":{"Key":"h/k"},"soft":false}}"#,
        )?;
        assert!(!older.again);
        assert_eq!(older.purge, key("h/k"));
        let again = Message {
            from: "b".into(),
            purge: key("h/k"),
            again: true,
        };
        let text = serde_json::to_string(&again)?;
        assert!(serde_json::from_str::<Message>(&text)?.again);
        Ok(())
    }

    #[test]
    fn a_published_purge_leaves_the_queue_only_if_still_in_front() {
        let pending = Pending::default();
        pending.push(key("first"));
        let published = pending.front();
        assert_eq!(published, Some(key("first")));
        // While it was being published, the queue overflowed into a purge of everything.
        for n in 0..PENDING_CAPACITY {
            pending.push(key(&n.to_string()));
        }
        let everything = Purge::everything();
        assert_eq!(pending.front(), Some(everything.clone()));
        pending.pop(&key("first"));
        assert_eq!(pending.front(), Some(everything.clone()), "kept");
        pending.pop(&everything);
        assert_ne!(pending.front(), Some(everything));
    }

    #[test]
    fn a_purge_waiting_behind_the_front_is_not_queued_twice() {
        let pending = Pending::default();
        pending.push(key("a"));
        pending.push(key("b"));
        pending.push(key("b"));
        assert_eq!(pending.waiting(), 2, "b waits already");
        // The front may be under way: the same purge again must run after it.
        pending.push(key("a"));
        assert_eq!(pending.waiting(), 3);
        pending.push(key("a"));
        assert_eq!(pending.waiting(), 3, "a waits behind the front now");
        pending.push(Purge {
            soft: true,
            ..key("b")
        });
        assert_eq!(pending.waiting(), 4, "a soft purge is another purge");
    }

    #[test]
    fn a_purge_that_failed_again_goes_to_the_back() {
        let pending = Pending::default();
        pending.push(key("refused"));
        pending.push(key("next"));
        pending.requeue(&key("refused"));
        assert_eq!(pending.front(), Some(key("next")));
        pending.requeue(&key("refused"));
        assert_eq!(pending.front(), Some(key("next")), "only the front moves");
        assert_eq!(pending.waiting(), 2);
    }

    #[test]
    fn globs_span_slashes() {
        assert!(glob_match(
            "api.example.com/users/*",
            "api.example.com/users/1/posts?x=1"
        ));
        assert!(glob_match("*/static/*", "cdn.test/static/app.js"));
        assert!(!glob_match("*/static/*", "cdn.test/staticx"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*", ""));
        // Hostile pattern stays linear.
        let text = "a".repeat(10_000);
        assert!(!glob_match("*a*a*a*a*a*a*a*a*b", &text));
    }

    #[test]
    fn bodies_are_validated_whole() {
        let ok = |body: &str| Purge::from_json(body.as_bytes());
        assert_eq!(
            ok(r#"{"key":"h/a","soft":true}"#),
            Ok(Purge {
                selector: Selector::Key("h/a".into()),
                soft: true
            })
        );
        assert_eq!(
            ok(r#"{"tags":["a"," b "]}"#).map(|p| p.selector),
            Ok(Selector::Tags(vec!["a".into(), "b".into()]))
        );
        for bad_body in [
            "{",
            "[]",
            "{}",
            r#"{"key":"a","pattern":"b"}"#,
            r#"{"pattern":""}"#,
            r#"{"key":""}"#,
            r#"{"tags":[]}"#,
            r#"{"tags":"a"}"#,
            r#"{"tags":[1]}"#,
            r#"{"key":1}"#,
            r#"{"key":"a","soft":"yes"}"#,
            r#"{"key":"a","extra":1}"#,
        ] {
            assert!(ok(bad_body).is_err(), "{bad_body}");
        }
    }

    #[test]
    fn log_finds_purges_that_overtook_a_fill() {
        let log = PurgeLog::default();
        let start = log.generation();
        assert!(!log.overtaken(start, "h/a", &[]));
        log.record(&Purge {
            selector: Selector::Pattern("h/x*".into()),
            soft: false,
        });
        assert!(!log.overtaken(start, "h/a", &[]));
        assert!(log.overtaken(start, "h/xyz", &[]));
        log.record(&Purge {
            selector: Selector::Tags(vec!["t".into()]),
            soft: false,
        });
        assert!(log.overtaken(start, "h/a", &["t".into()]));
        assert!(!log.overtaken(log.generation(), "h/a", &["t".into()]));
    }

    #[test]
    fn a_purge_repeated_past_the_capacity_forgets_nothing() {
        let log = PurgeLog::default();
        log.record(&key("h/b"));
        let start = log.generation();
        log.record(&key("h/c"));
        for _ in 0..LOG_CAPACITY + 10 {
            log.record(&key("h/a"));
        }
        let mid = log.generation() - 1;
        assert!(log.overtaken(start, "h/a", &[]));
        assert!(log.overtaken(start, "h/c", &[]), "h/c is still remembered");
        assert!(
            !log.overtaken(start, "h/b", &[]),
            "h/b came before the fill"
        );
        assert!(!log.overtaken(start, "h/x", &[]), "nothing was forgotten");
        assert!(log.overtaken(mid, "h/a", &[]), "its latest record counts");
        assert!(!log.overtaken(mid, "h/c", &[]));
    }

    #[test]
    fn a_fill_older_than_a_forgotten_purge_is_overtaken() {
        let log = PurgeLog::default();
        let start = log.generation();
        for n in 0..KEY_LOG_CAPACITY + 1 {
            log.record(&key(&format!("h/{n}")));
        }
        // h/0 was forgotten: a fill from before it cannot know whether it concerned it.
        assert!(log.overtaken(start, "h/unrelated", &[]));
        let after_first = start + 1;
        assert!(!log.overtaken(after_first, "h/unrelated", &[]));
        assert!(log.overtaken(after_first, "h/1", &[]));

        let log = PurgeLog::default();
        let start = log.generation();
        for n in 0..LOG_CAPACITY + 1 {
            log.record(&Purge {
                selector: Selector::Pattern(format!("h/{n}/*")),
                soft: false,
            });
        }
        assert!(log.overtaken(start, "h/unrelated", &[]));
        assert!(!log.overtaken(start + 1, "h/unrelated", &[]));
    }

    /// An API written to at thousands of URLs during one slow fill (each write purges its URL)
    /// leaves that fill storable, and still finds the URLs it purged.
    #[test]
    fn many_distinct_key_purges_do_not_refuse_other_fills() {
        let log = PurgeLog::default();
        let start = log.generation();
        for n in 0..20_000 {
            log.record(&key(&format!("h/orders/{n}")));
        }
        log.record(&Purge {
            selector: Selector::Tags(vec!["t".into()]),
            soft: false,
        });
        assert!(!log.overtaken(start, "h/slow", &[]));
        assert!(log.overtaken(start, "h/orders/7", &[]));
        assert!(log.overtaken(start, "h/slow", &["t".into()]));
        // One URL written to over and over: its stale records are swept, not kept.
        for _ in 0..10_000 {
            log.record(&key("h/hot"));
        }
        let recent = log.recent.lock().unwrap_or_else(|p| p.into_inner());
        assert!(recent.key_order.len() <= 2 * recent.keys.len() + 1025);
        assert_eq!(recent.forgotten_through, 0);
    }
}
