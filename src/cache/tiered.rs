//! The tiered cache the proxy talks to: lookup and fill across L1 (RAM) and L2 (Redis), with
//! `Vary` variants stored side by side under one URL in both tiers.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;

use super::entry::Entry;
use super::key::{primary_key, variant_key};
use super::l1::{Slot, VaryRecord, L1};
use super::l2::{L2Purge, L2};
use crate::config::Config;
use crate::invalidate::{Purge, PurgeLog, Selector};

/// A vary record outlives its variants in L2 by at least this much: it is tiny, and a record that
/// expired first would hide variants that are still good.
const VARY_RECORD_MIN_TTL: Duration = Duration::from_secs(3600);

/// What one read of a URL's L1 slot found.
#[derive(Debug, Default)]
pub struct L1Lookup {
    /// A stored response for this request.
    pub entry: Option<Arc<Entry>>,
    /// The URL's responses `Vary` and none is stored for this request's selecting headers.
    pub vary_miss: bool,
    /// A hit-for-miss marker: the URL's answers are not stored until then.
    pub pass_until: Option<SystemTime>,
}

pub struct Cache {
    l1: L1,
    l2: Option<Arc<L2>>,
    /// Source of vary-record nonces; see [`variant_key`]. Seeded per process so that instances
    /// sharing an L2 do not hand out the same nonces.
    next_nonce: AtomicU64,
}

/// Where a response for a URL is kept: the key of the entry, and the vary record when it varies.
struct Placement {
    storage_key: String,
    record: Option<Arc<VaryRecord>>,
}

impl Cache {
    /// `purges` is the log the L2 checks a fill's write against (see [`L2`]).
    pub fn new(config: &Config, purges: Arc<PurgeLog>) -> Result<Cache, fred::error::Error> {
        let l2 = match &config.redis {
            Some(redis) => Some(L2::start(redis, config.max_object_bytes, purges)?),
            None => None,
        };
        Ok(Cache {
            l1: L1::new(config.cache_size_bytes, config.max_object_bytes),
            l2,
            next_nonce: AtomicU64::new(nonce_seed()),
        })
    }

    pub fn l1(&self) -> &L1 {
        &self.l1
    }

    pub fn l2(&self) -> Option<&Arc<L2>> {
        self.l2.as_ref()
    }

    /// The L1 response for this URL that matches the request's selecting headers, if any.
    #[inline]
    pub fn lookup(&self, key: &str, request_headers: &HeaderMap) -> L1Lookup {
        let mut found = L1Lookup::default();
        match self.l1.get(key) {
            None => {}
            Some(Slot::Entry(entry)) => found.entry = entry.variant.is_empty().then_some(entry),
            Some(Slot::Pass(until)) => found.pass_until = Some(until),
            Some(Slot::Vary(record)) => {
                let variant = variant_key(key, record.nonce, &record.names, request_headers);
                match self.l1.get(&variant) {
                    Some(Slot::Entry(entry)) if entry.matches_variant(request_headers) => {
                        found.entry = Some(entry);
                    }
                    Some(Slot::Pass(until)) => {
                        found.pass_until = Some(until);
                        found.vary_miss = true;
                    }
                    _ => found.vary_miss = true,
                }
            }
        }
        found
    }

    /// Remembers until `until` that this URL's answers cannot be stored. When its answers vary
    /// and some are stored, only this request's variant is marked: a mark in the URL's own slot
    /// would replace the record through which the stored ones are found, so one variant's
    /// uncacheable answer (a signed-in user's `private` page under `Vary: Cookie`) would hide
    /// every stored variant.
    pub fn mark_pass(&self, key: &str, request_headers: &HeaderMap, until: SystemTime) {
        let mark = match self.l1.get(key) {
            Some(Slot::Vary(record)) => {
                variant_key(key, record.nonce, &record.names, request_headers)
            }
            _ => key.to_string(),
        };
        self.l1.insert(mark, Slot::Pass(until));
    }

    /// The L2 response for this URL, promoted into L1 when found.
    ///
    /// `purged` says whether a purge made while Redis answered concerns an entry (key, tags): one
    /// read before the purge deleted it and arriving after must neither enter L1 nor be served.
    /// It is asked again after the copy entered L1, as `settle` does for fills: a purge (from
    /// another thread) logged between the first check and the insert found nothing in L1 to
    /// remove, and the copy must not outlive it there.
    pub async fn lookup_l2(
        &self,
        key: &str,
        request_headers: &HeaderMap,
        purged: impl Fn(&Entry) -> bool,
    ) -> Option<Arc<Entry>> {
        let l2 = self.l2.as_ref()?;
        match l2.get(key).await? {
            Slot::Entry(entry) if entry.variant.is_empty() => {
                if purged(&entry) {
                    return None;
                }
                self.l1.insert(key.to_string(), Slot::Entry(entry.clone()));
                if purged(&entry) {
                    self.l1.remove_entry(key, &entry);
                    return None;
                }
                Some(entry)
            }
            Slot::Entry(_) | Slot::Pass(_) => None,
            Slot::Vary(record) => {
                let variant = variant_key(key, record.nonce, &record.names, request_headers);
                // The record goes to L1 even when this request's variant is not stored: through
                // it, an uncacheable answer for this variant marks only the variant (see
                // `mark_pass`) instead of the whole URL, hiding the variants stored in Redis.
                let same_record = matches!(self.l1.get(key), Some(Slot::Vary(local)) if local.nonce == record.nonce);
                if !same_record {
                    self.l1.insert(key.to_string(), Slot::Vary(record));
                }
                let Slot::Entry(entry) = l2.get(&variant).await? else {
                    return None;
                };
                if !entry.matches_variant(request_headers) || purged(&entry) {
                    return None;
                }
                self.l1.insert(variant.clone(), Slot::Entry(entry.clone()));
                if purged(&entry) {
                    self.l1.remove_entry(&variant, &entry);
                    return None;
                }
                Some(entry)
            }
        }
    }

    /// Stores a response for the URL `key` in L1 now and, with `to_l2`, queues it for L2 (off the
    /// response path). `since` is the purge generation when its fill began: L2 does not keep it
    /// past a purge logged after that which concerns it. `false` when L1 holds a fresher, more
    /// recent copy and nothing was stored (see [`Cache::holds_newer`]).
    pub fn store(
        &self,
        key: &str,
        entry: Arc<Entry>,
        request_headers: &HeaderMap,
        now: SystemTime,
        since: u64,
        to_l2: bool,
    ) -> bool {
        if self.holds_newer(key, &entry, request_headers, now) {
            return false;
        }
        let placement = self.store_l1(key, &entry, request_headers);
        if let Some(l2) = self.l2.as_ref().filter(|_| to_l2) {
            for (l2_key, slot, ttl) in l2_writes(key, entry, placement, now) {
                l2.put(l2_key, slot, ttl, since);
            }
        }
        true
    }

    /// Like [`Cache::store`], but waits for the L2 write: a fill that holds the fleet-wide lock
    /// publishes its result before releasing it.
    pub async fn store_now(
        &self,
        key: &str,
        entry: Arc<Entry>,
        request_headers: &HeaderMap,
        now: SystemTime,
        since: u64,
    ) -> bool {
        if self.holds_newer(key, &entry, request_headers, now) {
            return false;
        }
        let placement = self.store_l1(key, &entry, request_headers);
        if let Some(l2) = &self.l2 {
            for (l2_key, slot, ttl) in l2_writes(key, entry, placement, now) {
                l2.put_now(&l2_key, &slot, ttl, since).await;
            }
        }
        true
    }

    /// Whether L1 holds a fresh response for this request received after `entry` was: a fill that
    /// outlived CACHE_LOCK_TIMEOUT finishes after the fill that reopened its key, and the most
    /// recent response is the one to keep (RFC 9111 §4). A stale one is always replaced: a copy
    /// from another instance whose clock runs ahead must not keep a refill out. Only this
    /// instance's L1 is asked: without L1, or against another instance's newer copy in L2, the
    /// last write wins.
    fn holds_newer(
        &self,
        key: &str,
        entry: &Entry,
        request_headers: &HeaderMap,
        now: SystemTime,
    ) -> bool {
        let stored = match self.l1.get(key) {
            Some(Slot::Entry(stored)) => Some(stored),
            Some(Slot::Vary(record)) => {
                let variant = variant_key(key, record.nonce, &record.names, request_headers);
                match self.l1.get(&variant) {
                    Some(Slot::Entry(stored)) => Some(stored),
                    _ => None,
                }
            }
            Some(Slot::Pass(_)) | None => None,
        };
        stored.is_some_and(|stored| {
            stored.response_time > entry.response_time && stored.is_fresh(now)
        })
    }

    fn store_l1(&self, key: &str, entry: &Arc<Entry>, request_headers: &HeaderMap) -> Placement {
        if entry.variant.is_empty() {
            self.l1.insert(key.to_string(), Slot::Entry(entry.clone()));
            return Placement {
                storage_key: key.to_string(),
                record: None,
            };
        }
        let names: Vec<_> = entry.variant.iter().map(|(name, _)| name.clone()).collect();
        let record = match self.l1.get(key) {
            Some(Slot::Vary(record)) if record.names == names => record,
            _ => {
                let nonce = self.next_nonce.fetch_add(1, Ordering::Relaxed);
                let record = Arc::new(VaryRecord { names, nonce });
                self.l1.insert(key.to_string(), Slot::Vary(record.clone()));
                record
            }
        };
        let storage_key = variant_key(key, record.nonce, &record.names, request_headers);
        self.l1
            .insert(storage_key.clone(), Slot::Entry(entry.clone()));
        Placement {
            storage_key,
            record: Some(record),
        }
    }

    /// Applies a purge to L1: removes (or, soft, marks stale) every matching response. Returns how
    /// many responses it concerned.
    pub fn purge_l1(&self, purge: &Purge, now: SystemTime) -> u64 {
        // A hard key purge needs no scan: without the URL's slot its variants cannot be found.
        if let (Selector::Key(key), false) = (&purge.selector, purge.soft) {
            return match self.l1.get(key) {
                Some(Slot::Entry(_)) | Some(Slot::Vary(_)) => u64::from(self.l1.remove(key)),
                Some(Slot::Pass(_)) | None => 0,
            };
        }
        if purge.soft {
            // Marked stale, not removed: copies of the matching entries replace them. Records and
            // markers stay, so the stale copies can still be found and served.
            let matching = self.l1.entries_where(|storage_key, entry| {
                entry.is_fresh(now) && purge.matches(primary_key(storage_key), &entry.tags)
            });
            return matching
                .into_iter()
                .map(|(storage_key, entry)| {
                    let expired = Arc::new(entry.expired_at(now));
                    u64::from(self.l1.replace_entry(&storage_key, &entry, expired))
                })
                .sum();
        }
        let concerned = Cell::new(0);
        self.l1.remove_where(|storage_key, slot| {
            let primary = primary_key(storage_key);
            match slot {
                Slot::Entry(entry) => {
                    let doomed = purge.matches(primary, &entry.tags);
                    concerned.set(concerned.get() + u64::from(doomed));
                    doomed
                }
                // Records and markers of a purged URL go too (not for tags: they carry none).
                Slot::Vary(_) | Slot::Pass(_) => {
                    !matches!(purge.selector, Selector::Tags(_)) && purge.matches(primary, &[])
                }
            }
        });
        concerned.get()
    }

    /// Applies a purge to every L2 store: how many Redis entries it concerned, and the stores it
    /// did not fully reach.
    pub async fn purge_l2(&self, purge: &Purge, now: SystemTime) -> L2Purge {
        match &self.l2 {
            Some(l2) => l2.purge(purge, now).await,
            None => L2Purge::default(),
        }
    }
}

/// What storing `entry` writes to L2: the vary record (if it varies) and the entry, each with the
/// TTL until the entry can no longer be served in any way. Nothing once that time has passed.
fn l2_writes(
    key: &str,
    entry: Arc<Entry>,
    placement: Placement,
    now: SystemTime,
) -> Vec<(String, Slot, Duration)> {
    let ttl = entry
        .useless_after()
        .duration_since(now)
        .unwrap_or_default();
    if ttl.as_millis() < 1 {
        return Vec::new();
    }
    let mut writes = Vec::with_capacity(2);
    if let Some(record) = placement.record {
        writes.push((
            key.to_string(),
            Slot::Vary(record),
            ttl.max(VARY_RECORD_MIN_TTL),
        ));
    }
    writes.push((placement.storage_key, Slot::Entry(entry), ttl));
    writes
}

fn nonce_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40)
}
