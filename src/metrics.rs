//! Counters and latency histograms of what the cache and proxy did, and their Prometheus text
//! rendering; read by the admin API (`/stats`, `/metrics`) and by tests.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    pub purges: AtomicU64,
    pub invalidations_sent: AtomicU64,
    pub invalidations_received: AtomicU64,
    pub invalidations_applied: AtomicU64,
    pub pubsub_reconnects: AtomicU64,
    /// Time to response headers for answers from L1.
    pub hit_latency: Histogram,
}

/// Upper bounds (seconds) of the latency buckets: 100 µs to 10 s.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A Prometheus histogram on relaxed atomics: observing is a few uncontended adds, no lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative); the last slot is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    #[inline]
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(BUCKETS.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Everything `/metrics` shows, gathered by the proxy.
pub struct MetricsSources<'a> {
    pub stats: &'a Stats,
    pub snapshot: &'a StatsSnapshot,
    pub l2_latency: Option<&'a Histogram>,
    pub origin_latency: &'a Histogram,
}

/// Prometheus text exposition format 0.0.4.
pub fn render_prometheus(sources: &MetricsSources<'_>) -> String {
    let s = sources.snapshot;
    let mut out = String::with_capacity(8 * 1024);
    let _ = writeln!(
        out,
        "# HELP strata_requests_total Client requests by X-Cache value.\n# TYPE strata_requests_total counter"
    );
    for (label, value) in [
        ("HIT-L1", s.l1_hits),
        ("HIT-L2", s.l2_hits),
        ("MISS", s.misses),
        ("STALE", s.stale),
        ("REVALIDATED", s.revalidated),
        ("BYPASS", s.bypass),
    ] {
        let _ = writeln!(out, "strata_requests_total{{x_cache=\"{label}\"}} {value}");
    }
    sources.stats.hit_latency.render(
        &mut out,
        "strata_hit_duration_seconds",
        "Time to response headers of answers from L1.",
    );
    match sources.l2_latency {
        Some(histogram) => histogram.render(
            &mut out,
            "strata_l2_duration_seconds",
            "Duration of Redis L2 lookups.",
        ),
        None => Histogram::default().render(
            &mut out,
            "strata_l2_duration_seconds",
            "Duration of Redis L2 lookups.",
        ),
    }
    sources.origin_latency.render(
        &mut out,
        "strata_origin_duration_seconds",
        "Time until the origin's response headers arrived, from when the request went out (not the wait for an ORIGIN_MAX_CONNS slot; a request body's upload included).",
    );
    let families: [(&str, &str, &str, u64); 30] = [
        (
            "strata_l1_bytes",
            "gauge",
            "Bytes accounted in L1 (key + headers + body).",
            s.l1_bytes,
        ),
        (
            "strata_l1_capacity_bytes",
            "gauge",
            "L1 capacity (CACHE_SIZE_MB).",
            s.l1_capacity_bytes,
        ),
        ("strata_l1_entries", "gauge", "Entries in L1.", s.l1_entries),
        (
            "strata_l1_evictions_total",
            "counter",
            "Entries evicted from L1 for room.",
            s.l1_evictions,
        ),
        (
            "strata_l2_errors_total",
            "counter",
            "Redis calls that failed.",
            s.l2_errors,
        ),
        (
            "strata_l2_timeouts_total",
            "counter",
            "Redis calls that passed REDIS_TIMEOUT.",
            s.l2_timeouts,
        ),
        (
            "strata_l2_breaker_open",
            "gauge",
            "1 while every Redis store is skipped by its breaker.",
            s.l2_breaker_open,
        ),
        (
            "strata_l2_dropped_writes_total",
            "counter",
            "L2 writes dropped because the queue was full.",
            s.l2_dropped_writes,
        ),
        (
            "strata_l2_corrupt_total",
            "counter",
            "L2 values that did not decode (deleted).",
            s.l2_corrupt,
        ),
        (
            "strata_l2_writes_overtaken_total",
            "counter",
            "L2 writes of fills a purge overtook: not sent, or deleted again after they landed.",
            s.l2_writes_overtaken,
        ),
        (
            "strata_l2_failovers_followed_total",
            "counter",
            "Redis Sentinel failovers followed on the sentinels' announcement.",
            s.l2_failovers_followed,
        ),
        (
            "strata_coalesced_total",
            "counter",
            "Requests answered from another request's fill.",
            s.coalesced,
        ),
        (
            "strata_coalesce_waiting",
            "gauge",
            "Requests waiting for another request's fill of the same key.",
            s.coalesce_waiting,
        ),
        (
            "strata_fills_in_flight",
            "gauge",
            "Keys being fetched now by a leader (from Redis or the origin), refreshes included.",
            s.fills_in_flight,
        ),
        (
            "strata_refreshes_total",
            "counter",
            "Background refreshes of stale entries started (stale-while-revalidate).",
            s.refreshes,
        ),
        (
            "strata_l2_writes_total",
            "counter",
            "Entries written to Redis.",
            s.l2_writes,
        ),
        (
            "strata_origin_requests_total",
            "counter",
            "Requests sent to the origin.",
            s.origin_requests,
        ),
        (
            "strata_origin_errors_total",
            "counter",
            "Origin requests that failed (unreachable, timeout).",
            s.origin_errors,
        ),
        (
            "strata_origin_connections_total",
            "counter",
            "Connections to the origin opened (each carries many requests when kept alive).",
            s.origin_connections,
        ),
        (
            "strata_origin_idle_connections",
            "gauge",
            "Kept-alive origin connections waiting for a request.",
            s.origin_idle_connections,
        ),
        (
            "strata_origin_in_flight",
            "gauge",
            "Requests in flight to the origin (counted only under ORIGIN_MAX_CONNS).",
            s.origin_in_flight,
        ),
        (
            "strata_origin_waiting",
            "gauge",
            "Requests waiting for an ORIGIN_MAX_CONNS slot.",
            s.origin_waiting,
        ),
        (
            "strata_origin_busy_total",
            "counter",
            "Requests answered 503: no ORIGIN_MAX_CONNS slot within ORIGIN_TIMEOUT.",
            s.origin_busy,
        ),
        (
            "strata_purges_total",
            "counter",
            "Purge requests received (admin API, PURGE method).",
            s.purges,
        ),
        (
            "strata_invalidations_sent_total",
            "counter",
            "Invalidations published to other instances.",
            s.invalidations_sent,
        ),
        (
            "strata_invalidations_received_total",
            "counter",
            "Invalidations received from other instances.",
            s.invalidations_received,
        ),
        (
            "strata_invalidations_applied_total",
            "counter",
            "Received invalidations applied to L1.",
            s.invalidations_applied,
        ),
        (
            "strata_pubsub_reconnects_total",
            "counter",
            "Times the invalidation subscriber (re)connected.",
            s.pubsub_reconnects,
        ),
        (
            "strata_purges_unpublished",
            "gauge",
            "Purges applied here that wait for Redis to publish them to the other instances.",
            s.purges_unpublished,
        ),
        (
            "strata_l2_purges_unfinished",
            "gauge",
            "Purges that wait for a Redis store that did not take them (summed over stores).",
            s.l2_purges_unfinished,
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    out
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
    /// Connections to the origin opened since start.
    pub origin_connections: u64,
    /// Kept-alive origin connections idle in the pool now.
    pub origin_idle_connections: u64,
    /// Requests in flight to the origin now (counted under ORIGIN_MAX_CONNS only).
    pub origin_in_flight: u64,
    /// Requests waiting for an ORIGIN_MAX_CONNS slot now.
    pub origin_waiting: u64,
    /// Requests answered 503 for want of an ORIGIN_MAX_CONNS slot, since start.
    pub origin_busy: u64,
    pub coalesced: u64,
    /// Requests waiting for another request's fill of the same key now.
    pub coalesce_waiting: u64,
    /// Fills under way now: keys a leader is fetching (from Redis or the origin) or refreshing.
    pub fills_in_flight: u64,
    pub refreshes: u64,
    pub l1_bytes: u64,
    pub l1_entries: u64,
    pub l1_capacity_bytes: u64,
    pub l1_evictions: u64,
    pub purges: u64,
    pub invalidations_sent: u64,
    pub invalidations_received: u64,
    pub invalidations_applied: u64,
    pub pubsub_reconnects: u64,
    pub l2_errors: u64,
    pub l2_timeouts: u64,
    pub l2_writes: u64,
    pub l2_dropped_writes: u64,
    pub l2_corrupt: u64,
    /// Fill writes a purge overtook (not sent, or taken back from L2).
    pub l2_writes_overtaken: u64,
    pub l2_failovers_followed: u64,
    /// Purges waiting to be published (Redis was unreachable).
    pub purges_unpublished: u64,
    /// Purges waiting for an L2 store that did not take them, summed over the stores.
    pub l2_purges_unfinished: u64,
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
            purges: get(&self.purges),
            invalidations_sent: get(&self.invalidations_sent),
            invalidations_received: get(&self.invalidations_received),
            invalidations_applied: get(&self.invalidations_applied),
            pubsub_reconnects: get(&self.pubsub_reconnects),
            ..StatsSnapshot::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(50));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(60));
        let mut out = String::new();
        histogram.render(&mut out, "t", "test");
        assert!(out.contains("t_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("t_count 3\n"), "{out}");
    }
}
