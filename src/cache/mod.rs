//! The cache: keys, stored entries, RFC 9111 rules and the tiers that hold entries.
//!
//! Nothing here knows about hyper's server side; the proxy asks this module what to do.

pub mod codec;
pub mod entry;
pub mod key;
pub mod l1;
pub mod l2;
pub mod policy;
mod sentinel;
pub mod tiered;

pub use entry::Entry;
pub use tiered::Cache;

/// How a response was produced; maps one-to-one to the `X-Cache` header and the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheStatus {
    HitL1,
    HitL2,
    Miss,
    Stale,
    Revalidated,
    Bypass,
}

impl CacheStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            CacheStatus::HitL1 => "HIT-L1",
            CacheStatus::HitL2 => "HIT-L2",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Revalidated => "REVALIDATED",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}
