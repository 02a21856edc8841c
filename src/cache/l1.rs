//! L1: the in-RAM tier, a quick_cache bounded in bytes (key + headers + body).
//!
//! quick_cache divides its capacity among shards and silently refuses an item heavier than (about) one
//! shard, so the shard count is chosen from `CACHE_SIZE_MB` and `CACHE_MAX_OBJECT_MB`: a largest object
//! takes at most half a shard.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::HeaderName;
use quick_cache::sync::Cache as QuickCache;
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

    /// Every key and slot, shard by shard (a purge's scan; never on the request path).
    pub fn snapshot(&self) -> Vec<(String, Slot)> {
        self.store
            .as_ref()
            .map_or_else(Vec::new, |s| s.iter().collect())
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
    use super::*;

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
