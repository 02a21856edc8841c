//! L1: the in-RAM tier, a quick_cache bounded in bytes (key + headers + body).
//!
//! quick_cache divides its capacity among shards and silently refuses an item heavier than (about) one
//! shard, so the shard count is chosen from `CACHE_SIZE_MB` and `CACHE_MAX_OBJECT_MB`: a largest object
//! takes at most half a shard.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use quick_cache::sync::{Cache as QuickCache, EntryAction, EntryResult};
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};

use super::entry::Entry;

/// Headroom above `CACHE_MAX_OBJECT_MB` for the key and headers of a largest object.
const HEADER_MARGIN: u64 = 64 * 1024;
/// A key's cost beyond its bytes: the `String`, its allocation, quick_cache's slot and hash entry.
const KEY_BOOKKEEPING: u64 = 96;
/// Average object size assumed to pre-size the map (it only affects allocation, not limits).
const ASSUMED_AVERAGE_OBJECT: u64 = 16 * 1024;

/// What a key holds: a response, or for a URL whose responses `Vary`, the record naming the
/// selecting headers (its variants live under [`super::key::variant_key`]), or a pass marker.
#[derive(Debug, Clone)]
pub enum Slot {
    Entry(Arc<Entry>),
    Vary(Arc<VaryRecord>),
    /// The origin's last answer for this URL could not be stored (Varnish's hit-for-miss): until
    /// this instant requests go straight to the origin, skipping coalescing and the L2 round trips.
    Pass(std::time::SystemTime),
}

#[derive(Debug)]
pub struct VaryRecord {
    pub names: Vec<HeaderName>,
    pub nonce: u64,
}

#[derive(Debug, Clone, Copy)]
struct SlotWeighter;

impl Weighter<String, Slot> for SlotWeighter {
    #[inline]
    fn weight(&self, key: &String, slot: &Slot) -> u64 {
        let value = match slot {
            Slot::Entry(entry) => entry.weight(),
            Slot::Vary(record) => {
                64 + record
                    .names
                    .iter()
                    .map(|n| n.as_str().len() as u64)
                    .sum::<u64>()
            }
            Slot::Pass(_) => 32,
        };
        key.len() as u64 + KEY_BOOKKEEPING + value
    }
}

/// Counts evictions (including items refused for being too heavy) for metrics.
#[derive(Debug, Clone, Default)]
struct EvictionCounter(Arc<AtomicU64>);

impl Lifecycle<String, Slot> for EvictionCounter {
    type RequestState = ();

    #[inline]
    fn on_evict(&self, _state: &mut (), _key: String, _slot: Slot) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

type Store = QuickCache<String, Slot, SlotWeighter, DefaultHashBuilder, EvictionCounter>;

pub struct L1 {
    /// `None` when `CACHE_SIZE_MB=0`.
    store: Option<Store>,
    evictions: Arc<AtomicU64>,
    capacity: u64,
}

impl L1 {
    pub fn new(capacity_bytes: u64, max_object_bytes: u64) -> L1 {
        let evictions = EvictionCounter::default();
        let counter = evictions.0.clone();
        if capacity_bytes == 0 {
            return L1 {
                store: None,
                evictions: counter,
                capacity: 0,
            };
        }
        let shards = shard_count(capacity_bytes, max_object_bytes);
        if capacity_bytes / shards < (max_object_bytes + HEADER_MARGIN) * 2 {
            tracing::warn!(
                capacity_bytes,
                max_object_bytes,
                "CACHE_SIZE_MB is small for CACHE_MAX_OBJECT_MB: the largest objects will not be kept in L1"
            );
        }
        let items = (capacity_bytes / ASSUMED_AVERAGE_OBJECT).max(64 * shards);
        let options = OptionsBuilder::new()
            .shards(shards as usize)
            .estimated_items_capacity(usize::try_from(items).unwrap_or(usize::MAX))
            .weight_capacity(capacity_bytes)
            .build();
        let store = match options {
            Ok(options) => Store::with_options(
                options,
                SlotWeighter,
                DefaultHashBuilder::default(),
                evictions,
            ),
            // Unreachable with the values above; fall back to quick_cache's own sharding rather than fail.
            Err(_) => Store::with(
                items as usize,
                capacity_bytes,
                SlotWeighter,
                DefaultHashBuilder::default(),
                evictions,
            ),
        };
        L1 {
            store: Some(store),
            evictions: counter,
            capacity: capacity_bytes,
        }
    }

    #[inline]
    pub fn get(&self, key: &str) -> Option<Slot> {
        self.store.as_ref()?.get(key)
    }

    pub fn insert(&self, key: String, slot: Slot) {
        if let Some(store) = &self.store {
            store.insert(key, slot);
        }
    }

    /// Removes every slot `doomed` picks, one shard at a time, in place: a purge's scan copies no
    /// key (quick_cache's iterator would clone every key and take a lock per item, which for a
    /// million entries meant a transient copy of some 100 MB and as many allocations). Each shard
    /// is write-locked while it is scanned. Returns how many slots `doomed` picked.
    pub fn remove_where(&self, doomed: impl Fn(&str, &Slot) -> bool) -> u64 {
        let Some(store) = &self.store else {
            return 0;
        };
        let removed = Cell::new(0u64);
        store.retain(|key, slot| {
            let doomed = doomed(key, slot);
            removed.set(removed.get() + u64::from(doomed));
            !doomed
        });
        removed.get()
    }

    /// The entries `wanted` picks with their storage keys, one shard at a time: only those are
    /// copied out.
    pub fn entries_where(
        &self,
        wanted: impl Fn(&str, &Entry) -> bool,
    ) -> Vec<(String, Arc<Entry>)> {
        let Some(store) = &self.store else {
            return Vec::new();
        };
        let found = RefCell::new(Vec::new());
        store.retain(|key, slot| {
            if let Slot::Entry(entry) = slot {
                if wanted(key, entry) {
                    found.borrow_mut().push((key.clone(), entry.clone()));
                }
            }
            true
        });
        found.into_inner()
    }

    /// Puts `replacement` under `key` if the key still holds `current`: an entry stored meanwhile
    /// (a fill that finished after the scan) is newer and stays. Returns whether it replaced.
    pub fn replace_entry(&self, key: &str, current: &Arc<Entry>, replacement: Arc<Entry>) -> bool {
        let Some(store) = &self.store else {
            return false;
        };
        // A zero timeout: a key being loaded through quick_cache's guards is not waited for (Strata
        // does not load through them; its own coalescer does that).
        let result = store.entry(key, Some(Duration::ZERO), |_, slot| match slot {
            Slot::Entry(held) if Arc::ptr_eq(held, current) => {
                *slot = Slot::Entry(replacement);
                EntryAction::Retain(true)
            }
            _ => EntryAction::Retain(false),
        });
        matches!(result, EntryResult::Retained(true))
    }

    /// Drops everything (after a missed invalidation: L2 stays the truth).
    pub fn clear(&self) {
        if let Some(store) = &self.store {
            store.clear();
        }
    }

    pub fn remove(&self, key: &str) -> bool {
        self.store.as_ref().is_some_and(|s| s.remove(key).is_some())
    }

    /// Removes `key` only while it still holds `entry` (not a newer one stored since).
    pub fn remove_entry(&self, key: &str, entry: &Arc<Entry>) -> bool {
        self.store.as_ref().is_some_and(|store| {
            store
                .remove_if(
                    key,
                    |slot| matches!(slot, Slot::Entry(held) if Arc::ptr_eq(held, entry)),
                )
                .is_some()
        })
    }

    pub fn enabled(&self) -> bool {
        self.store.is_some()
    }

    /// Bytes accounted by the weigher right now.
    pub fn weight(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| s.weight())
    }

    pub fn len(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| s.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

/// Largest power of two, at most quick_cache's default (4 per core), that leaves every shard room for
/// two largest objects.
fn shard_count(capacity_bytes: u64, max_object_bytes: u64) -> u64 {
    let parallelism = std::thread::available_parallelism().map_or(4, |n| n.get() as u64);
    let default_shards = (parallelism * 4).next_power_of_two();
    let per_shard_needed = (max_object_bytes + HEADER_MARGIN) * 2;
    let fitting = (capacity_bytes / per_shard_needed).max(1);
    let fitting_pow2 = 1u64 << (63 - fitting.leading_zeros());
    fitting_pow2.min(default_shards)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::cache::entry::Admission;
    use crate::cache::policy::Lifetime;

    fn entry(tag: &str) -> Arc<Entry> {
        let now = SystemTime::now();
        let admission = Admission {
            lifetime: Lifetime {
                fresh_until: now + Duration::from_secs(60),
                stale_while_revalidate_until: now + Duration::from_secs(60),
                stale_if_error_until: now + Duration::from_secs(60),
                initial_age: Duration::ZERO,
            },
            never_stale: false,
            honours_max_stale: true,
            variant: Vec::new(),
            tags: vec![tag.to_string()],
        };
        let body = Bytes::from_static(b"body");
        Arc::new(Entry::new(
            StatusCode::OK,
            &HeaderMap::new(),
            body,
            now,
            admission,
        ))
    }

    fn filled() -> L1 {
        let l1 = L1::new(16 << 20, 1 << 20);
        for i in 0..100 {
            let tag = if i % 10 == 0 { "tenth" } else { "other" };
            l1.insert(format!("example.com/{i}"), Slot::Entry(entry(tag)));
        }
        l1.insert(
            "example.com/marker".into(),
            Slot::Pass(SystemTime::now() + Duration::from_secs(60)),
        );
        l1
    }

    #[test]
    fn remove_where_removes_exactly_what_it_picks() {
        let l1 = filled();
        let removed = l1
            .remove_where(|_, slot| matches!(slot, Slot::Entry(entry) if entry.tags == ["tenth"]));
        assert_eq!(removed, 10);
        assert_eq!(l1.len(), 91);
        assert!(l1.get("example.com/0").is_none());
        assert!(l1.get("example.com/1").is_some());
        assert!(matches!(l1.get("example.com/marker"), Some(Slot::Pass(_))));
        assert_eq!(l1.remove_where(|_, _| false), 0);
        assert_eq!(l1.evictions(), 0, "a purge is not an eviction");
    }

    #[test]
    fn entries_where_copies_out_only_matching_entries() {
        let l1 = filled();
        let mut found =
            l1.entries_where(|key, entry| key.ends_with('0') && entry.tags == ["tenth"]);
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let keys: Vec<&str> = found.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(keys.len(), 10);
        assert_eq!(keys[0], "example.com/0");
        assert_eq!(l1.len(), 101, "nothing removed");
        assert!(L1::new(0, 1 << 20).entries_where(|_, _| true).is_empty());
    }

    #[test]
    fn replace_entry_keeps_an_entry_stored_after_the_scan() {
        let l1 = filled();
        let Some(Slot::Entry(scanned)) = l1.get("example.com/3") else {
            panic!("not stored");
        };
        // A fill stores a newer entry between the scan and the replacement: it stays.
        let newer = entry("newer");
        l1.insert("example.com/3".into(), Slot::Entry(newer.clone()));
        assert!(!l1.replace_entry("example.com/3", &scanned, entry("expired")));
        assert!(matches!(l1.get("example.com/3"), Some(Slot::Entry(e)) if Arc::ptr_eq(&e, &newer)));
        // Unchanged since the scan: replaced.
        let expired = entry("expired");
        assert!(l1.replace_entry("example.com/3", &newer, expired.clone()));
        assert!(
            matches!(l1.get("example.com/3"), Some(Slot::Entry(e)) if Arc::ptr_eq(&e, &expired))
        );
        // Gone meanwhile: not brought back.
        l1.remove("example.com/3");
        assert!(!l1.replace_entry("example.com/3", &expired, entry("again")));
        assert!(l1.get("example.com/3").is_none());
    }

    #[test]
    fn remove_entry_leaves_a_newer_entry() {
        let l1 = filled();
        let Some(Slot::Entry(read)) = l1.get("example.com/4") else {
            panic!("not stored");
        };
        let newer = entry("newer");
        l1.insert("example.com/4".into(), Slot::Entry(newer.clone()));
        assert!(!l1.remove_entry("example.com/4", &read));
        assert!(matches!(l1.get("example.com/4"), Some(Slot::Entry(e)) if Arc::ptr_eq(&e, &newer)));
        assert!(l1.remove_entry("example.com/4", &newer));
        assert!(l1.get("example.com/4").is_none());
    }

    #[test]
    fn largest_object_fits_a_shard() {
        let mb = 1024 * 1024;
        for (capacity, max_object) in [
            (256 * mb, 8 * mb),
            (mb, mb),
            (16 * mb, 8 * mb),
            (4096 * mb, mb),
        ] {
            let shards = shard_count(capacity, max_object);
            assert!(shards.is_power_of_two());
            assert!(
                shards == 1 || capacity / shards >= 2 * max_object,
                "{capacity} {max_object} {shards}"
            );
        }
    }
}
