//! The proxy's wall clock: real time plus an offset that tests can advance.
//!
//! All freshness and `Age` arithmetic reads this clock, so a test can move an entry past its
//! `max-age` without sleeping. Deadlines on the network path (timeouts) use tokio time, not this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

#[derive(Debug, Default)]
pub struct Clock {
    offset_millis: AtomicU64,
}

impl Clock {
    /// Current time as the cache sees it.
    #[inline]
    pub fn now(&self) -> SystemTime {
        let offset = self.offset_millis.load(Ordering::Relaxed);
        SystemTime::now() + Duration::from_millis(offset)
    }

    /// Moves this clock forward (tests only need this; production never calls it).
    pub fn advance(&self, by: Duration) {
        let millis = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_millis.fetch_add(millis, Ordering::Relaxed);
    }
}
