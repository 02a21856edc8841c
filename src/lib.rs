//! Strata: a caching reverse proxy with an in-RAM L1, RFC 9111 shared-cache semantics, miss
//! coalescing and stale serving.
//!
//! # Layout
//! - [`config`]: every environment variable / flag, typed and validated.
//! - [`server`]: listeners (HTTP/1.1 + h2c), admin listener, graceful shutdown.
//! - [`proxy`]: the request path: cache decisions, origin client, header rules, fills.
//! - [`cache`]: keys, stored entries, RFC 9111 policy, the L1 tier and the tiered lookup.
//! - [`coalesce`]: one origin request per key; followers wait for the leader.
//! - [`invalidate`]: purges (key, glob, surrogate keys; hard or soft) and the generation log.
//! - [`admin`]: admin routes (health, readiness, stats, metrics, purge, cache, warm).
//! - [`metrics`]: counters behind `/stats` and the tests.
//! - [`clock`]: the wall clock freshness is computed against (advanceable in tests).
//! - [`telemetry`]: tracing set-up (text or JSON lines).

#![forbid(unsafe_code)]

pub mod admin;
pub mod cache;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod invalidate;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod telemetry;

pub use proxy::{Proxy, StartError};
