//! Counters of what the cache and proxy did; read by the admin API and by tests.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::cache::CacheStatus;

/// Monotonic counters, updated with relaxed atomics on the request path (no locks).
#[derive(Debug, Default)]
pub struct Stats {
    pub l1_hits: AtomicU64,
    pub l2_hits: AtomicU64,
    pub misses: AtomicU64,
    pub stale: AtomicU64,
    pub revalidated: AtomicU64,
    pub bypass: AtomicU64,
    pub origin_requests: AtomicU64,
    pub origin_errors: AtomicU64,
    pub coalesced: AtomicU64,
    pub refreshes: AtomicU64,
}

impl Stats {
    #[inline]
    pub fn count(&self, status: CacheStatus) {
        let counter = match status {
            CacheStatus::HitL1 => &self.l1_hits,
            CacheStatus::HitL2 => &self.l2_hits,
            CacheStatus::Miss => &self.misses,
            CacheStatus::Stale => &self.stale,
            CacheStatus::Revalidated => &self.revalidated,
            CacheStatus::Bypass => &self.bypass,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A point-in-time copy of the counters plus the L1's size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub hits: u64,
    pub l1_hits: u64,
    pub l2_hits: u64,
    pub misses: u64,
    pub stale: u64,
    pub revalidated: u64,
    pub bypass: u64,
    pub origin_requests: u64,
    pub origin_errors: u64,
    pub coalesced: u64,
    pub refreshes: u64,
    pub l1_bytes: u64,
    pub l1_entries: u64,
    pub l1_capacity_bytes: u64,
    pub l1_evictions: u64,
    pub l2_errors: u64,
    pub l2_timeouts: u64,
    pub l2_writes: u64,
    pub l2_dropped_writes: u64,
    pub l2_corrupt: u64,
    /// 1 while every Redis store is being skipped by its circuit breaker.
    pub l2_breaker_open: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let l1_hits = get(&self.l1_hits);
        let l2_hits = get(&self.l2_hits);
        StatsSnapshot {
            hits: l1_hits + l2_hits,
            l1_hits,
            l2_hits,
            misses: get(&self.misses),
            stale: get(&self.stale),
            revalidated: get(&self.revalidated),
            bypass: get(&self.bypass),
            origin_requests: get(&self.origin_requests),
            origin_errors: get(&self.origin_errors),
            coalesced: get(&self.coalesced),
            refreshes: get(&self.refreshes),
            ..StatsSnapshot::default()
        }
    }
}
