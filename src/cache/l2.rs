//! L2: the shared Redis tier (fred). An accelerator, never a dependency: every call has a deadline
//! and any failure is a miss; a circuit breaker per store skips Redis while it is down; writes go
//! through a bounded queue off the response path; a value that does not decode is a miss and is
//! deleted.
//!
//! `REDIS_URL` may list several stores: the first whose breaker admits traffic serves reads and
//! writes, so Strata moves down the list when a store fails and back up when it recovers.
//!
//! A purge must not be undone by a fill that fetched the old response before it: a fill's write is
//! checked against the purge log right before it is sent and again once it landed, and for a while
//! this instance remembers what it wrote, so that a purge it hears of only later (another
//! instance's, done on Redis before the write landed) can take the write back.
//!
//! fred's defaults would hurt here (no command timeout, commands queued while disconnected, no
//! reconnection): every command carries fail-fast options with `REDIS_TIMEOUT`, an outer
//! `tokio::time::timeout` backs them, and the client reconnects with exponential backoff forever.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::clients::{Pipeline, Pool, WithOptions};
use fred::interfaces::{
    ClientLike, KeysInterface, LuaInterface, SetsInterface, SortedSetsInterface,
};
use fred::types::config::Options;
use fred::types::config::ReconnectPolicy;
use fred::types::scan::Scanner;
use fred::types::ExpireOptions;
use fred::types::{Builder, Expiration, SetOptions, Value};
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};

use super::codec::{self, CodecError};
use super::key::primary_key;
use super::l1::Slot;
use super::sentinel::Watch;
use crate::config::RedisConfig;
use crate::invalidate::{Purge, PurgeLog, Selector};

/// Consecutive failures after which a store is skipped for [`BREAKER_COOLDOWN`].
const BREAKER_THRESHOLD: u32 = 5;
/// How long an open breaker skips its store before one request probes it again.
const BREAKER_COOLDOWN: Duration = Duration::from_secs(1);
/// How long closing one client may take when the L2 goes.
const QUIT_LIMIT: Duration = Duration::from_secs(2);
/// L2 writes waiting for Redis, per lane; past this a write is dropped (and counted), never awaited.
const WRITE_QUEUE: usize = 256;
/// Writes run in this many lanes at once, each with its own queue of `WRITE_QUEUE` (fred pipelines
/// their commands on its connections). A key always takes the same lane, so writes to one key land
/// in the order they were queued.
const WRITE_LANES: usize = 8;

/// Numbers and publishes an invalidation atomically, so messages arrive in sequence order.
const PUBLISH_SCRIPT: &str = "local seq = redis.call('incr', KEYS[1]); redis.call('publish', ARGV[1], seq .. ' ' .. ARGV[2]); return seq";

/// How long one store may take over one purge (SCANs of a large keyspace included) while the
/// purge's reply waits.
const PURGE_DEADLINE: Duration = Duration::from_secs(10);
/// The same for a purge a store missed, done again in the background: a pattern over a keyspace
/// too large to SCAN within `PURGE_DEADLINE` must still finish some time.
const PURGE_RETRY_DEADLINE: Duration = Duration::from_secs(120);
/// Keys each SCAN call looks at (its COUNT), and tag members a purge takes per round trip.
const PURGE_BATCH: usize = 1000;
/// Soft purges rewrite entries one by one (GET, SET): this many at once.
const SOFT_PURGE_CONCURRENCY: usize = 16;
/// How long this instance remembers an entry it wrote to L2, so that a purge it hears of later can
/// take the write back ([`L2::take_back`]): longer than a purge takes from its deletions on Redis to
/// its announcement here (a pattern purge SCANs for up to `PURGE_DEADLINE` before it is published).
const SENT_WRITES_KEPT: Duration = Duration::from_secs(60);
/// At most this many writes are remembered; the oldest go first (a few MB at most).
const SENT_WRITES_CAPACITY: usize = 16_384;
/// Writes taken back at once.
const TAKE_BACK_CONCURRENCY: usize = 16;
/// Deletes KEYS[1] only while its value's SHA-1 is ARGV[1]: the copy this instance wrote, not one
/// stored since (by any instance), nor one a soft purge marked stale since.
pub const DELETE_IF_DIGEST_SCRIPT: &str = "local v = redis.call('get', KEYS[1]); if v and redis.sha1hex(v) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";
/// Rewrites KEYS[1] to ARGV[2], keeping its TTL, only while its value's SHA-1 is still ARGV[1]: a soft
/// purge read the entry, marked it stale and writes it back, and must not replace a copy another
/// instance stored in between.
pub const SET_IF_DIGEST_SCRIPT: &str = "local v = redis.call('get', KEYS[1]); if v and redis.sha1hex(v) == ARGV[1] then redis.call('set', KEYS[1], ARGV[2], 'KEEPTTL'); return 1 else return 0 end";
/// A tag set outlives the entries it names by at least this much (it is small; an expired set would
/// let a tag purge miss live entries).
const TAG_SET_MIN_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long after its entry's expiry a name stays in a tag's index: more than instances' clocks
/// differ by (see `index_tags`).
const TAG_PRUNE_MARGIN_MS: u64 = 60_000;

/// Deletes KEYS[1] only while it still holds ARGV[1]: a lock that expired and was taken by another
/// instance must not be released by us, and a corrupt entry's deletion must not take the good
/// entry a refill wrote since it was read.
const COMPARE_AND_DELETE_SCRIPT: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

#[derive(Debug, Default)]
pub struct L2Stats {
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub writes: AtomicU64,
    pub dropped_writes: AtomicU64,
    pub corrupt: AtomicU64,
    /// Fill writes a purge overtook: not sent (the purge was logged first), or deleted again after
    /// they landed (it was logged while they were on their way, or heard of afterwards).
    pub overtaken_writes: AtomicU64,
    /// Sentinel failovers followed on their announcement (`+switch-master`).
    pub failovers_followed: AtomicU64,
    /// Duration of lookups (`GET`), whatever their outcome.
    pub latency: crate::metrics::Histogram,
}

/// Skips a failing store for a while, then lets one request probe it.
#[derive(Debug)]
struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the store is skipped; 0 when closed.
    open_until: AtomicU64,
    epoch: Instant,
}

impl Breaker {
    fn new() -> Self {
        Breaker {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn cooldown_ms() -> u64 {
        u64::try_from(BREAKER_COOLDOWN.as_millis()).unwrap_or(1000)
    }

    /// Whether a call may go to this store now. When the cooldown has passed, exactly one caller
    /// wins the probe; the others keep skipping until it reports.
    fn admits(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now_ms();
        now >= until
            && self
                .open_until
                .compare_exchange(
                    until,
                    now + Self::cooldown_ms(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("Redis store recovered; L2 in use again");
        }
    }

    fn failure(&self) {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= BREAKER_THRESHOLD {
            let until = self.now_ms() + Self::cooldown_ms();
            if self.open_until.swap(until, Ordering::AcqRel) == 0 {
                tracing::warn!(
                    failures,
                    "Redis store failing; skipping it (circuit breaker open)"
                );
            }
        }
    }
}

struct Store {
    pool: Pool,
    breaker: Breaker,
    /// A dedicated connection for the invalidation channel (a subscribed connection can run
    /// nothing else).
    subscriber: fred::clients::Client,
    /// Behind Sentinel: the listeners for failover announcements.
    sentinels: Option<Watch>,
}

enum Write {
    Put {
        key: String,
        slot: Slot,
        ttl: Duration,
        /// The purge generation when the fill began.
        since: u64,
    },
    /// Deletes the key only while it still holds `value`.
    DeleteIfUnchanged { key: String, value: Bytes },
}

impl Write {
    fn key(&self) -> &str {
        match self {
            Write::Put { key, .. } | Write::DeleteIfUnchanged { key, .. } => key,
        }
    }
}

/// Why a Redis call gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallFailed {
    /// No answer (in time, or the connection broke): the command may still have been carried out.
    Unanswered,
    /// Refused (an error reply, not sent at all): not carried out.
    Refused,
}

/// Outcome of asking for the cross-instance fill lock.
pub enum Lock {
    /// We hold it; release with [`L2::unlock`].
    Acquired(LockToken),
    /// Another instance is filling this key.
    Held,
    /// Redis cannot say: proceed without the fleet-wide lock.
    Unavailable,
}

/// What a purge did on the L2 stores.
#[derive(Debug, Default)]
pub struct L2Purge {
    /// Entries removed (soft: marked stale).
    pub concerned: u64,
    /// Stores the purge did not fully reach (an error, a timeout): it must be done there again.
    pub unfinished: Vec<usize>,
}

/// A purge did not reach every key it concerns on a store.
#[derive(Debug)]
pub struct Unfinished;

/// Where a surrogate key's entries are named: the sorted set this version writes, or the plain set
/// of an earlier one (purged until it expires).
enum TagIndex {
    Sorted(String),
    Legacy(String),
}

impl TagIndex {
    fn key(&self) -> &str {
        match self {
            TagIndex::Sorted(key) | TagIndex::Legacy(key) => key,
        }
    }
}

/// The slowest link to Redis a write is given time for, in bytes per second (about 0.5 Gbit/s).
const SLOWEST_LINK_BYTES_PER_SEC: u64 = 64 * 1024 * 1024;

/// REDIS_TIMEOUT, plus the time a value of `len` bytes takes over the slowest link counted on.
fn write_deadline(timeout: Duration, len: usize) -> Duration {
    let len = u64::try_from(len).unwrap_or(u64::MAX);
    timeout + Duration::from_micros(len.saturating_mul(1_000_000) / SLOWEST_LINK_BYTES_PER_SEC)
}

/// Now as Unix milliseconds, the scores of the tag index.
fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// One page of a purge's SCAN. fred asks for the next page when a page is dropped; this asks for it
/// only on [`ScanPage::next`], and cancels the SCAN when dropped without it.
struct ScanPage<S: Scanner>(Option<S>);

impl<S: Scanner> ScanPage<S> {
    fn take_results(&mut self) -> Option<S::Page> {
        self.0.as_mut().and_then(Scanner::take_results)
    }

    fn next(mut self) {
        if let Some(page) = self.0.take() {
            page.next();
        }
    }
}

impl ScanPage<fred::types::scan::ScanResult> {
    fn take_keys(&mut self) -> Vec<String> {
        self.take_results()
            .unwrap_or_default()
            .iter()
            .filter_map(|key| key.as_str().map(str::to_owned))
            .collect()
    }
}

/// A page of a tag index's members: a plain set's (SSCAN) or a sorted set's (ZSCAN, scores
/// left out).
trait IndexPage {
    fn into_members(self) -> Vec<String>;
}

impl IndexPage for Vec<Value> {
    fn into_members(self) -> Vec<String> {
        self.into_iter().filter_map(Value::into_string).collect()
    }
}

impl IndexPage for Vec<(Value, f64)> {
    fn into_members(self) -> Vec<String> {
        self.into_iter()
            .filter_map(|(member, _score)| member.into_string())
            .collect()
    }
}

impl<S: Scanner> ScanPage<S>
where
    S::Page: IndexPage,
{
    fn take_members(&mut self) -> Vec<String> {
        self.take_results()
            .map(IndexPage::into_members)
            .unwrap_or_default()
    }
}

impl<S: Scanner> Drop for ScanPage<S> {
    fn drop(&mut self) {
        if let Some(page) = self.0.take() {
            page.cancel();
        }
    }
}

/// A value this instance wrote to L2 from a fill (an entry or a vary record), as much as it takes
/// to recognise it there.
#[derive(Debug, Clone)]
pub struct SentWrite {
    store: usize,
    /// The storage key (a URL's, or one of its variants').
    key: String,
    tags: Vec<String>,
    /// The purge generation when the fill began.
    since: u64,
    /// SHA-1 of the value written, in hex.
    digest: String,
    at: Instant,
}

impl SentWrite {
    /// The store it went to (its position in `REDIS_URL`'s list).
    pub fn store(&self) -> usize {
        self.store
    }
}

/// Writes of fills that a purge overtook after they were sent: to be deleted from L2 if still
/// there as written, and then the purge announced again (see `crate::invalidate`).
pub struct Retraction {
    pub writes: Vec<SentWrite>,
    pub purge: Purge,
}

pub struct LockToken {
    key: String,
    owner: String,
    store: usize,
}

pub struct L2 {
    stores: Vec<Store>,
    prefix: String,
    timeout: Duration,
    options: Options,
    max_body: u64,
    /// The write lanes' queues.
    writes: Vec<mpsc::Sender<Write>>,
    /// Picks a key's lane.
    lanes: std::hash::RandomState,
    queued: AtomicU64,
    drained: Notify,
    lock_counter: AtomicU64,
    instance: String,
    /// Purges logged here, which a fill's write must not undo.
    purges: Arc<PurgeLog>,
    /// Values written lately (see [`L2::retract_overtaken`]).
    sent: Mutex<SentWrites>,
    retractions: mpsc::UnboundedSender<Retraction>,
    /// The receiving end, until the invalidation side takes it ([`L2::take_retractions`]).
    retractions_rx: Mutex<Option<mpsc::UnboundedReceiver<Retraction>>>,
    pub stats: L2Stats,
}

impl L2 {
    /// Builds the clients and starts connecting in the background: Strata serves at once, degraded
    /// if Redis is not there yet.
    pub fn start(
        config: &RedisConfig,
        max_body: u64,
        purges: Arc<PurgeLog>,
    ) -> Result<Arc<L2>, fred::error::Error> {
        let mut stores = Vec::with_capacity(config.stores.len());
        for store_config in &config.stores {
            let pool = Builder::from_config(store_config.clone())
                .with_connection_config(|c| {
                    c.connection_timeout = Duration::from_secs(2);
                    c.internal_command_timeout = Duration::from_secs(2);
                    c.max_command_attempts = 1;
                    c.unresponsive.max_timeout = Some(Duration::from_secs(2));
                    c.unresponsive.interval = Duration::from_millis(500);
                })
                .with_performance_config(|p| {
                    p.default_command_timeout = config.timeout;
                })
                // Forever (0 attempts = unlimited), 100 ms doubling to 2 s.
                .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
                .build_pool(config.pool_size)?;
            let subscriber = listening_client(store_config.clone())?;
            stores.push(Store {
                pool,
                breaker: Breaker::new(),
                subscriber,
                sentinels: Watch::new(store_config),
            });
        }
        let (writes, queues): (Vec<_>, Vec<_>) =
            (0..WRITE_LANES).map(|_| mpsc::channel(WRITE_QUEUE)).unzip();
        // Unbounded: one item per purge that overtook writes of this instance, a rare event.
        let (retractions, retractions_rx) = mpsc::unbounded_channel();
        let l2 = Arc::new(L2 {
            stores,
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            options: Options {
                timeout: Some(config.timeout),
                fail_fast: true,
                max_attempts: Some(1),
                max_redirections: Some(3),
                ..Options::default()
            },
            max_body,
            writes,
            lanes: std::hash::RandomState::new(),
            queued: AtomicU64::new(0),
            drained: Notify::new(),
            lock_counter: AtomicU64::new(0),
            instance: instance_id(),
            purges,
            sent: Mutex::new(SentWrites::default()),
            retractions,
            retractions_rx: Mutex::new(Some(retractions_rx)),
            stats: L2Stats::default(),
        });
        for queue in queues {
            tokio::spawn(write_loop(Arc::downgrade(&l2), queue));
        }
        for (index, store) in l2.stores.iter().enumerate() {
            for client in store.pool.clients() {
                tokio::spawn(supervise(Arc::downgrade(&l2), client.clone()));
            }
            tokio::spawn(supervise(Arc::downgrade(&l2), store.subscriber.clone()));
            if let Some(sentinels) = &store.sentinels {
                sentinels.start(&l2, index);
            }
        }
        Ok(l2)
    }

    /// Waits up to `patience` for the first store to connect, and says how it went: Strata serves
    /// either way, degraded to L1 + origin while Redis is away.
    pub async fn await_startup(&self, patience: Duration) -> bool {
        let Some(first) = self.stores.first() else {
            return false;
        };
        match tokio::time::timeout(patience, first.pool.wait_for_connect()).await {
            Ok(Ok(())) => {
                tracing::info!("Redis L2 connected");
                true
            }
            _ => {
                tracing::warn!("Redis L2 unreachable at start-up: serving from L1 and the origin (degraded); reconnecting in the background");
                false
            }
        }
    }

    pub fn entry_key(&self, key: &str) -> String {
        format!("{}e:{key}", self.prefix)
    }

    /// A surrogate key's index: a sorted set of the storage keys that carry it, each scored with
    /// its entry's expiry (Unix ms), so that names of expired entries can be dropped as new ones
    /// come (see `index_tags`).
    fn tag_key(&self, tag: &str) -> String {
        format!("{}tz:{tag}", self.prefix)
    }

    /// The plain set an earlier version indexed a surrogate key in: still purged, never written.
    /// It goes with its TTL (at least `TAG_SET_MIN_TTL` after that version's last write).
    fn legacy_tag_key(&self, tag: &str) -> String {
        format!("{}t:{tag}", self.prefix)
    }

    fn lock_key(&self, key: &str) -> String {
        format!("{}lock:{key}", self.prefix)
    }

    /// A connected client of `store` whose commands carry the fail-fast L2 options.
    fn command_client(&self, store: &Store) -> WithOptions<fred::clients::Client> {
        store.pool.next_connected().with_options(&self.options)
    }

    /// The first store whose breaker admits traffic.
    fn active(&self) -> Option<(usize, &Store)> {
        self.stores
            .iter()
            .enumerate()
            .find(|(_, store)| store.breaker.admits())
    }

    /// True while every store is being skipped.
    pub fn breaker_open(&self) -> bool {
        self.stores.iter().all(|store| store.breaker.is_open())
    }

    /// Runs one command against a store under the deadline; failures feed the breaker.
    async fn call<T, F>(&self, store: &Store, command: F) -> Option<T>
    where
        F: std::future::Future<Output = Result<T, fred::error::Error>>,
    {
        self.call_or_why(store, command).await.ok()
    }

    /// [`L2::call`], saying why it failed: a call that went unanswered may still have been carried
    /// out.
    async fn call_or_why<T, F>(&self, store: &Store, command: F) -> Result<T, CallFailed>
    where
        F: std::future::Future<Output = Result<T, fred::error::Error>>,
    {
        self.call_or_why_within(store, self.timeout, command).await
    }

    /// [`L2::call_or_why`] with a deadline of its own (the command's options must carry it too).
    async fn call_or_why_within<T, F>(
        &self,
        store: &Store,
        deadline: Duration,
        command: F,
    ) -> Result<T, CallFailed>
    where
        F: std::future::Future<Output = Result<T, fred::error::Error>>,
    {
        // fred's own timeout is not fully cancellation-safe; the outer one bounds us regardless.
        match tokio::time::timeout(deadline + Duration::from_millis(5), command).await {
            Ok(Ok(value)) => {
                store.breaker.success();
                Ok(value)
            }
            Ok(Err(error)) => {
                use fred::error::ErrorKind;
                let failed = match error.kind() {
                    ErrorKind::Timeout => {
                        self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                        CallFailed::Unanswered
                    }
                    // The connection broke or was reset with the command possibly sent.
                    ErrorKind::IO | ErrorKind::Canceled => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        CallFailed::Unanswered
                    }
                    _ => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        CallFailed::Refused
                    }
                };
                tracing::debug!(%error, "Redis call failed");
                store.breaker.failure();
                Err(failed)
            }
            Err(_) => {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                store.breaker.failure();
                Err(CallFailed::Unanswered)
            }
        }
    }

    /// Runs a pipeline of commands that each answer an integer. `None` when the store did not
    /// answer it: fred reports a lost connection in every reply, not as the pipeline's result, so
    /// such a pipeline is handed to [`L2::call`] as the failure it is (not counted for the breaker).
    async fn call_pipeline(
        &self,
        store: &Store,
        pipeline: Pipeline<WithOptions<fred::clients::Client>>,
    ) -> Option<Vec<Result<i64, fred::error::Error>>> {
        let unanswered = |reply: &Result<i64, fred::error::Error>| {
            reply.as_ref().is_err_and(|error| {
                use fred::error::ErrorKind;
                matches!(
                    error.kind(),
                    ErrorKind::IO
                        | ErrorKind::Timeout
                        | ErrorKind::Canceled
                        | ErrorKind::Backpressure
                )
            })
        };
        let answered = async {
            let replies = pipeline.try_all::<i64>().await;
            match replies.first() {
                Some(Err(error)) if replies.iter().all(unanswered) => Err(error.clone()),
                _ => Ok(replies),
            }
        };
        self.call(store, answered).await
    }

    /// The slot stored under a cache key (entry or vary record), if any and readable.
    pub async fn get(&self, key: &str) -> Option<Slot> {
        let (_, store) = self.active()?;
        let redis_key = self.entry_key(key);
        let client = self.command_client(store);
        let started = Instant::now();
        // Outer None: the call failed; inner None: no such key.
        // Boxed: fred's command future is large, and `call` and its timeout would each move it.
        let command = Box::pin(client.get(redis_key.as_str()));
        let reply: Option<Option<Bytes>> = self.call(store, command).await;
        self.stats.latency.observe(started.elapsed());
        let value = reply.flatten()?;
        match decode_off_runtime(value.clone(), self.max_body).await {
            Ok(slot) => Some(slot),
            Err(error) => {
                self.corrupt(key, value, &error);
                None
            }
        }
    }

    /// Counts a corrupt value and queues its deletion. Only that value is deleted: the miss it
    /// causes is refilled, and the lock holder publishes its fill at once (`put_now`), possibly
    /// before this queued deletion runs.
    fn corrupt(&self, key: &str, value: Bytes, error: &CodecError) {
        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, "corrupt L2 entry; treated as a miss and deleted");
        self.enqueue(Write::DeleteIfUnchanged {
            key: key.to_string(),
            value,
        });
    }

    /// Queues a fill's write (`since`: the purge generation when the fill began); never waits. A
    /// full queue drops the write (counted).
    pub fn put(&self, key: String, slot: Slot, ttl: Duration, since: u64) {
        if ttl.as_millis() < 1 {
            return;
        }
        self.enqueue(Write::Put {
            key,
            slot,
            ttl,
            since,
        });
    }

    fn enqueue(&self, write: Write) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        let Some(lane) = self.lane(write.key()) else {
            return self.write_done();
        };
        match lane.try_send(write) {
            Ok(()) => {}
            // A dropped delete would leave a corrupt value in Redis: it waits for room instead
            // (deletes are few; a full queue is a storm of fills).
            Err(mpsc::error::TrySendError::Full(write @ Write::DeleteIfUnchanged { .. }))
                if tokio::runtime::Handle::try_current().is_ok() =>
            {
                let lane = lane.clone();
                tokio::spawn(async move {
                    // Refused only once the write loop is gone, and the L2 with it.
                    let _ = lane.send(write).await;
                });
            }
            Err(_) => {
                self.stats.dropped_writes.fetch_add(1, Ordering::Relaxed);
                self.write_done();
            }
        }
    }

    /// The queue of `key`'s lane.
    fn lane(&self, key: &str) -> Option<&mpsc::Sender<Write>> {
        let lane = self.lanes.hash_one(key) % WRITE_LANES as u64;
        self.writes.get(usize::try_from(lane).unwrap_or(0))
    }

    fn write_done(&self) {
        if self.queued.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// Writes now (used by a lock holder, which must publish its fill before releasing the lock).
    pub async fn put_now(&self, key: &str, slot: &Slot, ttl: Duration, since: u64) -> bool {
        let Some((index, store)) = self.active() else {
            return false;
        };
        self.write_to(index, store, key, slot, ttl, since).await
    }

    /// Writes a fill's slot to store `index`, unless a purge logged since `since` concerns it. True
    /// when it was written and kept.
    async fn write_to(
        &self,
        index: usize,
        store: &Store,
        key: &str,
        slot: &Slot,
        ttl: Duration,
        since: u64,
    ) -> bool {
        let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let Some((value, digest)) = encode_for_write(slot).await else {
            return false; // the encoder task failed: nothing worth writing
        };
        let tags: &[String] = match slot {
            Slot::Entry(entry) => &entry.tags,
            Slot::Vary(_) | Slot::Pass(_) => &[],
        };
        let primary = primary_key(key);
        let overtaken = || self.purges.overtaken(since, primary, tags);
        // As late as possible: the write may have waited in the queue, or for its encoding.
        if overtaken() {
            self.stats.overtaken_writes.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // A large value takes longer to cross the network than REDIS_TIMEOUT allows a command:
        // its SET gets the time to send it on top, or every large fill would time out, miss
        // Redis and count toward opening the breaker for every key.
        let deadline = write_deadline(self.timeout, value.len());
        let options = Options {
            timeout: Some(deadline),
            ..self.options.clone()
        };
        let client = store.pool.next_connected().with_options(&options);
        let written: Result<(), CallFailed> = self
            .call_or_why_within(
                store,
                deadline,
                client.set(
                    self.entry_key(key),
                    value,
                    Some(Expiration::PX(millis)),
                    None,
                    false,
                ),
            )
            .await;
        let sent = SentWrite {
            store: index,
            key: key.to_string(),
            tags: tags.to_vec(),
            since,
            digest,
            at: Instant::now(),
        };
        // Remembered even when the SET failed (one that timed out may still land), and before the
        // second check, so that a purge logged after that check finds it here.
        self.remember(sent.clone());
        // A purge logged while the SET was on its way may have been done on Redis before it.
        if overtaken() {
            self.retract(Retraction {
                writes: vec![sent],
                purge: Purge {
                    selector: Selector::Key(primary.to_string()),
                    soft: false,
                },
            });
            return false;
        }
        // Indexed also when the SET went unanswered: it may still land, and without its names a
        // tag purge would miss it until its TTL. A name whose entry never came is harmless (a
        // purge unlinks a key that is not there) and goes with its set's TTL.
        if !tags.is_empty() && written != Err(CallFailed::Refused) {
            self.index_tags(store, key, tags, ttl).await;
        }
        if written.is_err() {
            return false;
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The tag index: one sorted set per surrogate key naming the entries that carry it, all of an
    /// entry's tags in one round trip (a cluster client sends each set's commands to its node).
    /// Each write also drops the names whose entries have expired: with names kept until a purge,
    /// URLs that differ only in a query string (a crawler, a cache-buster) grew a tag's set in
    /// Redis for as long as the tag was written at all, and each purge had to page through them.
    async fn index_tags(&self, store: &Store, key: &str, tags: &[String], ttl: Duration) {
        let set_ttl = i64::try_from(ttl.max(TAG_SET_MIN_TTL).as_millis()).unwrap_or(i64::MAX);
        let now = unix_millis();
        let expires = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        // Scores come from each instance's clock: an instance running ahead must not drop the
        // names of entries another one stored that are still alive.
        let prune_before = now.saturating_sub(TAG_PRUNE_MARGIN_MS);
        let pipeline = Pipeline::from(self.command_client(store));
        for tag in tags {
            let set = self.tag_key(tag);
            let queued: [Result<(), fred::error::Error>; 4] = [
                // GT: a name already there keeps the later of its two expiries.
                pipeline
                    .zadd(
                        set.as_str(),
                        None,
                        Some(fred::types::sorted_sets::Ordering::GreaterThan),
                        false,
                        false,
                        (expires as f64, key),
                    )
                    .await,
                pipeline
                    .zremrangebyscore(set.as_str(), f64::NEG_INFINITY, prune_before as f64)
                    .await,
                // NX gives a new set its TTL, GT only ever extends it.
                pipeline
                    .pexpire(set.as_str(), set_ttl, Some(ExpireOptions::NX))
                    .await,
                pipeline
                    .pexpire(set.as_str(), set_ttl, Some(ExpireOptions::GT))
                    .await,
            ];
            if queued.iter().any(Result::is_err) {
                return;
            }
        }
        let _ = self.call_pipeline(store, pipeline).await;
    }

    /// Deletes `redis_key` only while it still holds `expected` (an entry we read or wrote, a lock
    /// we own). Whether it was deleted; `None` when the store did not answer.
    async fn compare_and_delete(
        &self,
        store: &Store,
        redis_key: String,
        expected: Value,
    ) -> Option<bool> {
        let client = self.command_client(store);
        let deleted: Option<i64> = self
            .call(
                store,
                client.eval(COMPARE_AND_DELETE_SCRIPT, vec![redis_key], vec![expected]),
            )
            .await;
        deleted.map(|n| n > 0)
    }

    fn remember(&self, write: SentWrite) {
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(write);
    }

    fn retract(&self, retraction: Retraction) {
        // Refused only once the receiving task is gone, and the proxy with it.
        let _ = self.retractions.send(retraction);
    }

    /// The retractions to carry out; `None` once taken.
    pub fn take_retractions(&self) -> Option<mpsc::UnboundedReceiver<Retraction>> {
        self.retractions_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Retracts (and forgets) the values written lately that another instance's purge, logged
    /// here as `generation`, may have undone: those of fills that began before it was logged here,
    /// which it concerns. That instance deleted on Redis before it announced the purge, so a write
    /// that landed before the announcement may have landed after the deletion.
    pub fn retract_overtaken(&self, purge: &Purge, generation: u64) {
        let overtaken = self
            .sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_overtaken(purge, generation);
        if !overtaken.is_empty() {
            self.retract(Retraction {
                writes: overtaken,
                purge: purge.clone(),
            });
        }
    }

    /// Deletes each of these writes that L2 still holds as it was written (a copy stored since by
    /// any instance stays). Returns how many were deleted, and the writes whose store did not
    /// answer.
    pub async fn take_back(&self, writes: Vec<SentWrite>) -> (u64, Vec<SentWrite>) {
        let mut deleted = 0;
        let mut failed = Vec::new();
        for writes in writes.chunks(TAKE_BACK_CONCURRENCY) {
            let done = futures_util::future::join_all(
                writes.iter().map(|write| self.take_back_one(write)),
            )
            .await;
            for (write, done) in writes.iter().zip(done) {
                match done {
                    Some(true) => deleted += 1,
                    Some(false) => {}
                    None => failed.push(write.clone()),
                }
            }
        }
        self.stats
            .overtaken_writes
            .fetch_add(deleted, Ordering::Relaxed);
        (deleted, failed)
    }

    /// `Some(deleted)`, or `None` when the store did not answer.
    async fn take_back_one(&self, write: &SentWrite) -> Option<bool> {
        let store = self.stores.get(write.store)?;
        let client = self.command_client(store);
        let deleted: i64 = self
            .call(
                store,
                client.eval(
                    DELETE_IF_DIGEST_SCRIPT,
                    vec![self.entry_key(&write.key)],
                    vec![write.digest.clone()],
                ),
            )
            .await?;
        Some(deleted > 0)
    }

    /// Applies a purge to every store (not only the active one: a failover list may hold copies in
    /// several), all at once; says how many entries it concerned and which stores it did not fully
    /// reach.
    pub async fn purge(&self, purge: &Purge, now: std::time::SystemTime) -> L2Purge {
        let results = futures_util::future::join_all(
            (0..self.stores.len())
                .map(|index| self.purge_store_within(index, purge, now, PURGE_DEADLINE)),
        )
        .await;
        let mut outcome = L2Purge::default();
        for (index, result) in results.into_iter().enumerate() {
            match result {
                Ok(concerned) => outcome.concerned += concerned,
                Err(Unfinished) => outcome.unfinished.push(index),
            }
        }
        outcome
    }

    /// The number of stores (`REDIS_URL`'s list).
    pub fn store_count(&self) -> usize {
        self.stores.len()
    }

    /// Applies again, to store `index` alone, a purge it missed: `Err` unless every key it
    /// concerns was reached this time.
    pub async fn retry_purge(
        &self,
        index: usize,
        purge: &Purge,
        now: std::time::SystemTime,
    ) -> Result<u64, Unfinished> {
        self.purge_store_within(index, purge, now, PURGE_RETRY_DEADLINE)
            .await
    }

    /// A purge on store `index`: `Err` unless every key it concerns was reached (any failed call,
    /// a failed SCAN, or the deadline leaves it unfinished).
    async fn purge_store_within(
        &self,
        index: usize,
        purge: &Purge,
        now: std::time::SystemTime,
        deadline: Duration,
    ) -> Result<u64, Unfinished> {
        let store = self.stores.get(index).ok_or(Unfinished)?;
        match tokio::time::timeout(deadline, self.purge_store(store, purge, now)).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    store = index,
                    "purge did not finish on a Redis store within {deadline:?}"
                );
                Err(Unfinished)
            }
        }
    }

    async fn purge_store(
        &self,
        store: &Store,
        purge: &Purge,
        now: std::time::SystemTime,
    ) -> Result<u64, Unfinished> {
        let mut concerned = 0;
        match &purge.selector {
            Selector::Key(key) => {
                concerned += self
                    .remove(store, vec![self.entry_key(key)], purge.soft, now)
                    .await?;
            }
            Selector::Pattern(pattern) => {
                let pattern = format!(
                    "{}e:{}",
                    escape_glob(&self.prefix),
                    escape_glob_but_stars(pattern)
                );
                // Page by page: a page's keys are removed before the next page is asked for, so
                // memory stays one page whatever the keyspace, and a purge that stops (an error,
                // its deadline) stops the SCAN too. (fred's buffered scans read the whole keyspace
                // into memory, and go on after their stream is dropped.)
                let client = store.pool.next_connected();
                let count = Some(PURGE_BATCH as u32);
                let mut pages = if client.is_clustered() {
                    client.scan_cluster(pattern, count, None).boxed()
                } else {
                    client.scan(pattern, count, None).boxed()
                };
                while let Some(page) = pages.next().await {
                    let mut page = self.scan_page(page, "SCAN")?;
                    let keys = page.take_keys();
                    if !keys.is_empty() {
                        concerned += self.remove(store, keys, purge.soft, now).await?;
                    }
                    page.next();
                }
            }
            Selector::Tags(tags) => {
                for tag in tags {
                    // Page by page (ZSCAN), like patterns: a tag on a million entries is purged in
                    // batches within the purge's deadline, where one ZRANGE had to answer within
                    // REDIS_TIMEOUT and never did.
                    let client = store.pool.next_connected();
                    let index = TagIndex::Sorted(self.tag_key(tag));
                    let pages = client.zscan(index.key(), "*", Some(PURGE_BATCH as u32));
                    concerned += self
                        .purge_index(store, &index, pages.boxed(), "ZSCAN", purge, now)
                        .await?;
                    let index = TagIndex::Legacy(self.legacy_tag_key(tag));
                    let pages = client.sscan(index.key(), "*", Some(PURGE_BATCH as u32));
                    concerned += self
                        .purge_index(store, &index, pages.boxed(), "SSCAN", purge, now)
                        .await?;
                }
            }
        }
        Ok(concerned)
    }

    /// Purges the entries a tag's index names, page by page (`command` names the scan in logs);
    /// how many there were.
    async fn purge_index<S>(
        &self,
        store: &Store,
        index: &TagIndex,
        mut pages: futures_util::stream::BoxStream<'_, Result<S, fred::error::Error>>,
        command: &str,
        purge: &Purge,
        now: std::time::SystemTime,
    ) -> Result<u64, Unfinished>
    where
        S: Scanner,
        S::Page: IndexPage,
    {
        let mut concerned = 0;
        while let Some(page) = pages.next().await {
            let mut page = self.scan_page(page, command)?;
            let members = page.take_members();
            concerned += self
                .purge_members(store, index, members, purge, now)
                .await?;
            page.next();
        }
        Ok(concerned)
    }

    /// Purges the entries a page of a tag's index names; how many there were.
    async fn purge_members(
        &self,
        store: &Store,
        index: &TagIndex,
        members: Vec<String>,
        purge: &Purge,
        now: std::time::SystemTime,
    ) -> Result<u64, Unfinished> {
        if members.is_empty() {
            return Ok(0);
        }
        let keys = members.iter().map(|m| self.entry_key(m)).collect();
        let concerned = self.remove(store, keys, purge.soft, now).await?;
        // A soft purge leaves the entries (stale), so their tags still name them. A hard one
        // forgets only the members it removed: unlinking the whole set also dropped the entries
        // fills tagged meanwhile, which the next purge of the tag would then miss.
        if !purge.soft {
            self.forget_members(store, index, members).await?;
        }
        Ok(concerned)
    }

    /// A page of a purge's `command` (SCAN, SSCAN, ZSCAN), or the purge left unfinished (counted, logged).
    fn scan_page<S: Scanner>(
        &self,
        page: Result<S, fred::error::Error>,
        command: &str,
    ) -> Result<ScanPage<S>, Unfinished> {
        match page {
            Ok(page) => Ok(ScanPage(Some(page))),
            Err(error) => {
                tracing::warn!(%error, command, "scan failed during a purge");
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                Err(Unfinished)
            }
        }
    }

    /// Removes purged entries' names from a tag's index (an emptied one goes with its last member),
    /// then names again those whose entry exists by now: a fill that stored one of them again
    /// after the purge removed it sent its ZADD while the name was still there (an update), and
    /// without its name the next purge of the tag would miss it. Entry and index may live on
    /// different cluster nodes, so this is three round trips rather than one script.
    async fn forget_members(
        &self,
        store: &Store,
        index: &TagIndex,
        members: Vec<String>,
    ) -> Result<(), Unfinished> {
        let client = self.command_client(store);
        let removed: Option<i64> = match index {
            TagIndex::Sorted(key) => self.call(store, client.zrem(key, members.clone())).await,
            TagIndex::Legacy(key) => self.call(store, client.srem(key, members.clone())).await,
        };
        removed.ok_or(Unfinished)?;
        let pipeline = Pipeline::from(self.command_client(store));
        for member in &members {
            let queued: Result<(), fred::error::Error> =
                pipeline.pttl(self.entry_key(member)).await;
            queued.map_err(|_| Unfinished)?;
        }
        let lives = self
            .call_pipeline(store, pipeline)
            .await
            .ok_or(Unfinished)?;
        let now = unix_millis();
        let mut refilled = Vec::new();
        for (member, pttl) in members.into_iter().zip(lives) {
            match pttl {
                // -2: no such entry (purged, not filled again).
                Ok(-2) => {}
                // Its expiry, as `index_tags` scores it (-1, no TTL, is never dropped).
                Ok(left) => {
                    let expires = u64::try_from(left)
                        .map_or(f64::INFINITY, |left| now.saturating_add(left) as f64);
                    refilled.push((expires, member));
                }
                // Unknown (a node that did not answer): the purge is not done there.
                Err(_) => return Err(Unfinished),
            }
        }
        if refilled.is_empty() {
            return Ok(());
        }
        // The removal may have emptied the index, and Redis then deleted it with its TTL: the one
        // made again gets one, as `index_tags` gives a new one (without, it would never go).
        let ttl = i64::try_from(TAG_SET_MIN_TTL.as_millis()).unwrap_or(i64::MAX);
        let key = index.key();
        let pipeline = Pipeline::from(self.command_client(store));
        let queued: [Result<(), fred::error::Error>; 2] = [
            match index {
                TagIndex::Sorted(_) => {
                    pipeline
                        .zadd(
                            key,
                            None,
                            Some(fred::types::sorted_sets::Ordering::GreaterThan),
                            false,
                            false,
                            refilled,
                        )
                        .await
                }
                TagIndex::Legacy(_) => {
                    let names: Vec<String> = refilled.into_iter().map(|(_, name)| name).collect();
                    pipeline.sadd(key, names).await
                }
            },
            pipeline.pexpire(key, ttl, Some(ExpireOptions::NX)).await,
        ];
        if queued.iter().any(Result::is_err) {
            return Err(Unfinished);
        }
        let replies = self
            .call_pipeline(store, pipeline)
            .await
            .ok_or(Unfinished)?;
        if replies.iter().any(Result::is_err) {
            return Err(Unfinished);
        }
        Ok(())
    }

    /// Removes (hard) or marks stale (soft) these Redis keys; how many existed (were fresh).
    async fn remove(
        &self,
        store: &Store,
        keys: Vec<String>,
        soft: bool,
        now: std::time::SystemTime,
    ) -> Result<u64, Unfinished> {
        if soft {
            let mut concerned = 0;
            for keys in keys.chunks(SOFT_PURGE_CONCURRENCY) {
                let marked = futures_util::future::join_all(
                    keys.iter().map(|key| self.expire_in_place(store, key, now)),
                )
                .await;
                for done in marked {
                    concerned += u64::from(done?);
                }
            }
            return Ok(concerned);
        }
        // One round trip per batch: a pipeline of single-key UNLINKs, which a cluster client
        // routes key by key (a multi-key UNLINK would be refused across hash slots).
        let pipeline = Pipeline::from(self.command_client(store));
        for key in &keys {
            let queued: Result<(), fred::error::Error> = pipeline.unlink(key.as_str()).await;
            queued.map_err(|_| Unfinished)?;
        }
        let replies = self
            .call_pipeline(store, pipeline)
            .await
            .ok_or(Unfinished)?;
        let mut removed = 0;
        for reply in replies {
            match reply {
                Ok(n) => removed += u64::from(n > 0),
                Err(error) => {
                    tracing::debug!(%error, "UNLINK failed during a purge");
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(Unfinished);
                }
            }
        }
        Ok(removed)
    }

    /// Soft purge of one Redis entry: rewritten stale from `now` on, its TTL kept. `Ok(false)` when
    /// there was nothing fresh to mark (absent, already stale, unreadable) or the entry changed
    /// between our read and our write: a copy stored since is either newer than the purge, or a
    /// fill the purge overtook, which its writer takes back when it hears of the purge.
    async fn expire_in_place(
        &self,
        store: &Store,
        redis_key: &str,
        now: std::time::SystemTime,
    ) -> Result<bool, Unfinished> {
        let client = self.command_client(store);
        let value: Option<Bytes> = self
            .call(store, client.get(redis_key))
            .await
            .ok_or(Unfinished)?;
        let Some(value) = value else {
            return Ok(false);
        };
        let read = sha1_smol::Sha1::from(&value).digest().to_string();
        let entry = match decode_off_runtime(value.clone(), self.max_body).await {
            Ok(Slot::Entry(entry)) => entry,
            // A URL whose answers vary: its variants are stored under keys only its record and a
            // request's fields lead to, so they cannot be marked one by one. Without the record
            // they cannot be found: instances refetch, and those with a copy in L1 serve it stale.
            Ok(Slot::Vary(_)) => {
                // A store that did not answer still owes the purge (retried like any other).
                return self
                    .compare_and_delete(store, redis_key.to_string(), Value::from(value))
                    .await
                    .ok_or(Unfinished);
            }
            _ => return Ok(false),
        };
        if !entry.is_fresh(now) {
            return Ok(false);
        }
        let expired = Slot::Entry(Arc::new(entry.expired_at(now)));
        let value = Bytes::from(encode_off_runtime(&expired).await);
        let written: i64 = self
            .call(
                store,
                client.eval(
                    SET_IF_DIGEST_SCRIPT,
                    vec![redis_key],
                    vec![Value::from(read), Value::from(value)],
                ),
            )
            .await
            .ok_or(Unfinished)?;
        Ok(written > 0)
    }

    /// Waits until every queued write has been attempted.
    pub async fn flush(&self) {
        loop {
            let drained = self.drained.notified();
            if self.queued.load(Ordering::Acquire) == 0 {
                return;
            }
            drained.await;
        }
    }

    /// Takes the fleet-wide fill lock for `key` (`SET NX PX`).
    pub async fn lock(&self, key: &str, ttl: Duration) -> Lock {
        let Some((index, store)) = self.active() else {
            return Lock::Unavailable;
        };
        let owner = format!(
            "{}:{}",
            self.instance,
            self.lock_counter.fetch_add(1, Ordering::Relaxed)
        );
        let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let client = self.command_client(store);
        let reply: Option<Option<String>> = self
            .call(
                store,
                client.set(
                    self.lock_key(key),
                    owner.as_str(),
                    Some(Expiration::PX(millis)),
                    Some(SetOptions::NX),
                    false,
                ),
            )
            .await;
        match reply {
            Some(Some(_)) => Lock::Acquired(LockToken {
                key: key.to_string(),
                owner,
                store: index,
            }),
            Some(None) => Lock::Held,
            None => Lock::Unavailable,
        }
    }

    /// Releases a lock we hold (compare-and-delete: never someone else's).
    pub async fn unlock(&self, token: LockToken) {
        let Some(store) = self.stores.get(token.store) else {
            return;
        };
        // Unanswered, the lock expires by itself (its TTL is CACHE_LOCK_TIMEOUT).
        let _ = self
            .compare_and_delete(store, self.lock_key(&token.key), Value::from(token.owner))
            .await;
    }

    /// Whether some store answers `PING` now (readiness), trying them in priority order and ignoring
    /// the breakers: this is the check that tells.
    pub async fn ping(&self) -> bool {
        for index in 0..self.stores.len() {
            if self.store_answers(index).await {
                return true;
            }
        }
        false
    }

    /// Whether store `index` answers `PING` now, whatever its breaker says.
    pub async fn store_answers(&self, index: usize) -> bool {
        let Some(store) = self.stores.get(index) else {
            return false;
        };
        let client = self.command_client(store);
        let pong = tokio::time::timeout(
            self.timeout + Duration::from_millis(5),
            client.ping::<String>(None),
        )
        .await;
        matches!(pong, Ok(Ok(_)))
    }

    /// The invalidation channel (`{prefix}invalidate`).
    pub fn channel(&self) -> String {
        format!("{}invalidate", self.prefix)
    }

    /// Publishes an invalidation on the active store; its sequence number, or `None` when Redis
    /// could not take it.
    pub async fn publish(&self, payload: &str) -> Option<u64> {
        let (_, store) = self.active()?;
        let client = self.command_client(store);
        let sequence_key = format!("{}invalidate:seq", self.prefix);
        let seq: Option<i64> = self
            .call(
                store,
                client.eval(
                    PUBLISH_SCRIPT,
                    vec![sequence_key],
                    vec![self.channel(), payload.to_string()],
                ),
            )
            .await;
        seq.and_then(|seq| u64::try_from(seq).ok())
    }

    /// The clients of store `index` that talk to its master: the pool's, and the subscriber.
    pub(super) fn store_clients(
        &self,
        index: usize,
    ) -> Option<(Vec<fred::clients::Client>, fred::clients::Client)> {
        let store = self.stores.get(index)?;
        Some((store.pool.clients().to_vec(), store.subscriber.clone()))
    }

    /// One subscriber connection per store, with the receivers the invalidation loop owns.
    pub fn subscribers(&self) -> Vec<fred::clients::Client> {
        self.stores
            .iter()
            .map(|store| store.subscriber.clone())
            .collect()
    }

    /// Whether another instance still holds the fill lock for `key`.
    pub async fn is_locked(&self, key: &str) -> Option<bool> {
        let (_, store) = self.active()?;
        let client = self.command_client(store);
        let exists: i64 = self.call(store, client.exists(self.lock_key(key))).await?;
        Some(exists > 0)
    }
}

/// Values larger than this are (de)compressed on the blocking pool: zstd over megabytes would stall
/// a runtime worker and every request scheduled on it.
const INLINE_CODEC_LIMIT: usize = 64 * 1024;

/// The values written lately, for `SENT_WRITES_KEPT` and `SENT_WRITES_CAPACITY` at most, kept by
/// URL: every purge heard of is checked against them, and the purge of one URL (which each
/// successful write request to it sends) looks at that URL's writes alone, however many others
/// there are.
#[derive(Default)]
struct SentWrites {
    /// Each URL's writes with their numbers, oldest first.
    per_url: HashMap<Arc<str>, VecDeque<(u64, SentWrite)>>,
    /// Every write's number, time and URL, oldest first: what expires them and holds the capacity.
    /// A write a purge took out stays here, skipped, until its turn to go.
    order: VecDeque<(u64, Instant, Arc<str>)>,
    next: u64,
}

impl SentWrites {
    fn push(&mut self, write: SentWrite) {
        self.forget_expired();
        while self.order.len() >= SENT_WRITES_CAPACITY {
            self.pop_oldest();
        }
        let url = primary_key(&write.key);
        let url = match self.per_url.get_key_value(url) {
            Some((known, _)) => Arc::clone(known),
            None => Arc::from(url),
        };
        let number = self.next;
        self.next += 1;
        self.order.push_back((number, write.at, Arc::clone(&url)));
        self.per_url
            .entry(url)
            .or_default()
            .push_back((number, write));
    }

    /// Takes out the writes of fills that began before `generation` which `purge` concerns.
    fn take_overtaken(&mut self, purge: &Purge, generation: u64) -> Vec<SentWrite> {
        self.forget_expired();
        let mut overtaken = Vec::new();
        let mut take = |url: &str, writes: &mut VecDeque<(u64, SentWrite)>| {
            writes.retain(|(_, write)| {
                let concerned = write.since < generation && purge.matches(url, &write.tags);
                if concerned {
                    overtaken.push(write.clone());
                }
                !concerned
            });
        };
        match &purge.selector {
            Selector::Key(url) => {
                if let Some(writes) = self.per_url.get_mut(url.as_str()) {
                    take(url, writes);
                    if writes.is_empty() {
                        self.per_url.remove(url.as_str());
                    }
                }
            }
            Selector::Pattern(_) | Selector::Tags(_) => self.per_url.retain(|url, writes| {
                take(url, writes);
                !writes.is_empty()
            }),
        }
        overtaken
    }

    /// Drops the remembered writes older than `SENT_WRITES_KEPT`.
    fn forget_expired(&mut self) {
        while self
            .order
            .front()
            .is_some_and(|(_, at, _)| at.elapsed() > SENT_WRITES_KEPT)
        {
            self.pop_oldest();
        }
    }

    /// Forgets the oldest write, unless a purge took it out already.
    fn pop_oldest(&mut self) {
        let Some((number, _, url)) = self.order.pop_front() else {
            return;
        };
        if let Some(writes) = self.per_url.get_mut(&url) {
            // A URL's writes are in order too: its oldest still here is this one, or it was taken.
            if writes.front().is_some_and(|(first, _)| *first == number) {
                writes.pop_front();
            }
            if writes.is_empty() {
                self.per_url.remove(&url);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.per_url.values().map(VecDeque::len).sum()
    }
}

/// Runs `work` on `slot` here, or on the blocking pool when its body is large. `None` if that task
/// failed.
async fn off_runtime<T: Send + 'static>(slot: &Slot, work: fn(&Slot) -> T) -> Option<T> {
    let large = matches!(slot, Slot::Entry(entry) if entry.body.len() > INLINE_CODEC_LIMIT);
    if !large {
        return Some(work(slot));
    }
    let slot = slot.clone();
    tokio::task::spawn_blocking(move || work(&slot)).await.ok()
}

/// A slot's stored form (empty if the encoder task failed).
async fn encode_off_runtime(slot: &Slot) -> Vec<u8> {
    off_runtime(slot, codec::encode).await.unwrap_or_default()
}

/// A slot's stored form and its SHA-1 in hex (as Redis's `redis.sha1hex` spells it). `None` if
/// the encoder task failed.
async fn encode_for_write(slot: &Slot) -> Option<(Bytes, String)> {
    off_runtime(slot, |slot| {
        let value = codec::encode(slot);
        let digest = sha1_smol::Sha1::from(&value).digest().to_string();
        (Bytes::from(value), digest)
    })
    .await
}

async fn decode_off_runtime(value: Bytes, max_body: u64) -> Result<Slot, CodecError> {
    if value.len() <= INLINE_CODEC_LIMIT {
        return codec::decode(&value, max_body);
    }
    tokio::task::spawn_blocking(move || codec::decode(&value, max_body))
        .await
        .unwrap_or(Err(CodecError::Payload))
}

/// Messages a subscriber may fall behind by before it must assume it missed one (and flush L1).
/// fred's default is 32: a burst of purges (every successful write request in the fleet sends
/// one) arriving while the runtime is busy would flush every instance's L1 at once.
const SUBSCRIBER_BACKLOG: usize = 4096;

/// A client that only listens (a subscription): it runs no command with a deadline of its own, and
/// reconnects forever, 100 ms doubling to 2 s.
pub(super) fn listening_client(
    config: fred::types::config::Config,
) -> Result<fred::clients::Client, fred::error::Error> {
    Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
        })
        .with_performance_config(|p| p.broadcast_channel_capacity = SUBSCRIBER_BACKLOG)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()
}

/// Keeps one client connected for as long as the L2 exists. fred's reconnect policy covers a
/// connection that was up and dropped, but a connection that fails while being established (Redis
/// down at start-up, or dying during the handshake) ends fred's connection task for good; this
/// starts it again, with backoff.
pub(super) async fn supervise(l2: std::sync::Weak<L2>, client: fred::clients::Client) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let ended = client.connect().await;
        if l2.strong_count() == 0 {
            return;
        }
        if let Ok(Err(error)) = &ended {
            tracing::debug!(%error, "Redis connection ended; connecting again");
        }
        // A connection that stayed up a while earns a quick retry; repeated failures back off.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        if l2.strong_count() == 0 {
            return;
        }
    }
}

impl Drop for L2 {
    fn drop(&mut self) {
        // Ends the connection tasks (and so the supervisors) of a proxy that is gone.
        let clients: Vec<_> = self
            .stores
            .iter()
            .flat_map(|store| {
                store
                    .pool
                    .clients()
                    .iter()
                    .cloned()
                    .chain([store.subscriber.clone()])
                    .chain(store.sentinels.iter().flat_map(|w| w.clients().to_vec()))
            })
            .collect();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // All at once, each bounded: a QUIT queued while a connection attempt fails is never
            // answered, and one that hangs must not keep the others open.
            runtime.spawn(futures_util::future::join_all(clients.into_iter().map(
                |client| async move {
                    let _ = tokio::time::timeout(QUIT_LIMIT, client.quit()).await;
                },
            )));
        }
    }
}

async fn write_loop(l2: std::sync::Weak<L2>, mut queue: mpsc::Receiver<Write>) {
    while let Some(write) = queue.recv().await {
        let Some(l2) = l2.upgrade() else { return };
        if let Some((index, store)) = l2.active() {
            match &write {
                Write::Put {
                    key,
                    slot,
                    ttl,
                    since,
                } => {
                    l2.write_to(index, store, key, slot, *ttl, *since).await;
                }
                Write::DeleteIfUnchanged { key, value } => {
                    let _ = l2
                        .compare_and_delete(store, l2.entry_key(key), Value::from(value.clone()))
                        .await;
                }
            }
        }
        l2.write_done();
    }
}

/// Escapes Redis MATCH syntax so `text` matches only itself.
fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A Strata pattern (only `*` is special) in Redis MATCH syntax.
fn escape_glob_but_stars(pattern: &str) -> String {
    pattern
        .split('*')
        .map(escape_glob)
        .collect::<Vec<_>>()
        .join("*")
}

/// Distinguishes this process's lock values from other instances'.
fn instance_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}", std::process::id(), nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(key: &str, since: u64) -> SentWrite {
        SentWrite {
            store: 0,
            key: key.to_string(),
            tags: vec!["t".into()],
            since,
            digest: String::new(),
            at: Instant::now(),
        }
    }

    fn key_purge(url: &str) -> Purge {
        Purge {
            selector: Selector::Key(url.into()),
            soft: false,
        }
    }

    #[test]
    fn large_writes_get_the_time_to_cross_the_network() {
        let timeout = Duration::from_millis(50);
        assert_eq!(write_deadline(timeout, 1024), Duration::from_micros(50_015));
        // 8 MiB, CACHE_MAX_OBJECT_MB's default: 125 ms more.
        assert_eq!(
            write_deadline(timeout, 8 * 1024 * 1024),
            Duration::from_millis(175)
        );
        assert!(write_deadline(timeout, usize::MAX) > Duration::from_secs(3600));
    }

    #[test]
    fn sent_writes_are_found_by_url_and_forgotten_once_taken() {
        let mut sent = SentWrites::default();
        sent.push(write("h/a", 1));
        sent.push(write("h/a\u{0}1\u{0}=gzip", 1)); // a variant of h/a
        sent.push(write("h/b", 5));
        assert!(sent.take_overtaken(&key_purge("h/x"), 9).is_empty());
        assert!(
            sent.take_overtaken(&key_purge("h/b"), 5).is_empty(),
            "its fill began after the purge"
        );
        assert_eq!(sent.take_overtaken(&key_purge("h/a"), 2).len(), 2);
        assert!(!sent.per_url.contains_key("h/a"));
        assert_eq!(sent.len(), 1);
        let tagged = Purge {
            selector: Selector::Tags(vec!["t".into()]),
            soft: false,
        };
        assert_eq!(sent.take_overtaken(&tagged, 9).len(), 1);
        assert!(sent.per_url.is_empty());
    }

    #[test]
    fn writes_taken_by_a_purge_leave_the_others_to_expire_in_order() {
        let mut sent = SentWrites::default();
        sent.push(write("h/a", 1));
        sent.push(write("h/b", 1));
        sent.push(write("h/a", 1));
        sent.push(write("h/a", 7)); // its fill began after the purge
        assert_eq!(sent.take_overtaken(&key_purge("h/a"), 5).len(), 2);
        // The first three writes' places go first, taken or not; the fourth's stays.
        for n in 0..SENT_WRITES_CAPACITY - 1 {
            sent.push(write(&format!("h/n{n}"), 1));
        }
        assert_eq!(sent.len(), SENT_WRITES_CAPACITY);
        assert!(sent.take_overtaken(&key_purge("h/b"), 9).is_empty());
        assert_eq!(sent.take_overtaken(&key_purge("h/a"), 9).len(), 1);
        assert_eq!(sent.take_overtaken(&key_purge("h/n0"), 9).len(), 1);
    }

    #[test]
    fn the_oldest_sent_write_goes_past_the_capacity() {
        let mut sent = SentWrites::default();
        for n in 0..=SENT_WRITES_CAPACITY {
            sent.push(write(&format!("h/{n}"), 1));
        }
        assert_eq!(sent.len(), SENT_WRITES_CAPACITY);
        assert_eq!(sent.per_url.len(), SENT_WRITES_CAPACITY);
        assert!(!sent.per_url.contains_key("h/0"));
        assert!(sent.take_overtaken(&key_purge("h/0"), 9).is_empty());
        assert_eq!(sent.take_overtaken(&key_purge("h/1"), 9).len(), 1);
    }
}
