//! Miss coalescing (nginx's proxy_cache_lock): one request per key goes to the origin, the others wait
//! for its result.
//!
//! A leader holds a [`FlightPermit`]; dropping it without completing (error, cancellation, panic)
//! releases every follower at once, so nobody waits on a leader that is gone. Followers wait on a
//! `watch` channel, which wakes all of them together; quick_cache's guard would wake them one by one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::cache::Entry;

/// What followers learn from the leader.
#[derive(Debug, Clone)]
pub enum FlightState {
    Pending,
    /// The leader stored this entry; followers answer from it.
    Stored(Arc<Entry>),
    /// Nothing usable was stored (uncacheable answer, leader gone): fetch for yourself.
    Released,
    /// The origin failed the leader (unreachable, timeout, 5xx): a follower holding a copy it may
    /// serve on error answers with it at once instead of trying the failing origin again.
    Failed,
}

struct Flight {
    state: watch::Sender<FlightState>,
    /// Set when the key is invalidated while the fill is under way: the fill must not be stored.
    invalidated: AtomicBool,
}

#[derive(Default)]
pub struct Coalescer {
    // std Mutex: held only to look up or change the map, never across an .await.
    flights: Mutex<HashMap<String, Arc<Flight>>>,
}

pub enum Join {
    Leader(FlightPermit),
    Follower(Follower),
}

pub struct Follower {
    state: watch::Receiver<FlightState>,
}

/// How a follower's wait ended.
pub enum Waited {
    Stored(Arc<Entry>),
    Released,
    Failed,
    TimedOut,
}

impl Follower {
    /// Waits for the leader, at most `timeout`.
    pub async fn wait(mut self, timeout: Duration) -> Waited {
        let finished = self
            .state
            .wait_for(|state| !matches!(state, FlightState::Pending));
        match tokio::time::timeout(timeout, finished).await {
            Ok(Ok(state)) => match &*state {
                FlightState::Stored(entry) => Waited::Stored(entry.clone()),
                FlightState::Failed => Waited::Failed,
                FlightState::Pending | FlightState::Released => Waited::Released,
            },
            // The sender is gone: the leader vanished without a word. Treat as released.
            Ok(Err(_)) => Waited::Released,
            Err(_) => Waited::TimedOut,
        }
    }
}

impl Coalescer {
    pub fn new() -> Arc<Coalescer> {
        Arc::new(Coalescer::default())
    }

    /// Becomes the leader for `key`, or a follower of the fill already under way.
    pub fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut flights = self.lock();
        if let Some(flight) = flights.get(key) {
            return Join::Follower(Follower {
                state: flight.state.subscribe(),
            });
        }
        let (state, _) = watch::channel(FlightState::Pending);
        let flight = Arc::new(Flight {
            state,
            invalidated: AtomicBool::new(false),
        });
        flights.insert(key.to_string(), flight.clone());
        Join::Leader(FlightPermit {
            coalescer: self.clone(),
            key: key.to_string(),
            flight,
            finished: false,
            purge_generation: 0,
        })
    }

    /// Whether a fill for `key` is under way.
    pub fn in_flight(&self, key: &str) -> bool {
        self.lock().contains_key(key)
    }

    /// Marks a fill under way for `key` as overtaken by an invalidation.
    pub fn invalidate(&self, key: &str) {
        if let Some(flight) = self.lock().get(key) {
            // SeqCst pairs with the fill's store-then-check: see `FlightPermit::is_invalidated`.
            flight.invalidated.store(true, Ordering::SeqCst);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        // A panic while holding this lock cannot leave the map inconsistent (single insert/remove),
        // so a poisoned lock is still usable.
        self.flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The right and duty to fill one key. Completing or dropping it wakes every follower.
pub struct FlightPermit {
    coalescer: Arc<Coalescer>,
    key: String,
    flight: Arc<Flight>,
    finished: bool,
    /// The purge generation when the fill began (see `crate::invalidate::PurgeLog`).
    purge_generation: u64,
}

impl FlightPermit {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Remembers the purge generation at which this fill begins.
    pub fn begin_at(&mut self, purge_generation: u64) {
        self.purge_generation = purge_generation;
    }

    pub fn purge_generation(&self) -> u64 {
        self.purge_generation
    }

    /// True when the key was invalidated after this fill began. A fill stores first and asks this
    /// after: either the invalidation's purge comes later and removes what was stored, or this sees
    /// the flag and the fill removes it itself. Checking before storing would leave a window.
    pub fn is_invalidated(&self) -> bool {
        self.flight.invalidated.load(Ordering::SeqCst)
    }

    /// The fill stored `entry`; followers answer from it.
    pub fn complete(mut self, entry: Arc<Entry>) {
        self.finish(FlightState::Stored(entry));
    }

    /// Nothing cacheable came back; followers fetch for themselves, all at once.
    pub fn release(mut self) {
        self.finish(FlightState::Released);
    }

    /// The origin failed; followers with a stale-if-error copy use it, the others fetch themselves.
    pub fn fail(mut self) {
        self.finish(FlightState::Failed);
    }

    fn finish(&mut self, state: FlightState) {
        if self.finished {
            return;
        }
        self.finished = true;
        {
            let mut flights = self.coalescer.lock();
            if flights
                .get(&self.key)
                .is_some_and(|current| Arc::ptr_eq(current, &self.flight))
            {
                flights.remove(&self.key);
            }
        }
        self.flight.state.send_replace(state);
    }
}

impl Drop for FlightPermit {
    fn drop(&mut self) {
        self.finish(FlightState::Released);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropped_leader_releases_followers() {
        let coalescer = Coalescer::new();
        let Join::Leader(permit) = coalescer.join("k") else {
            panic!("first join must lead");
        };
        let Join::Follower(follower) = coalescer.join("k") else {
            panic!("second join must follow");
        };
        drop(permit);
        assert!(matches!(
            follower.wait(Duration::from_secs(5)).await,
            Waited::Released
        ));
        assert!(!coalescer.in_flight("k"));
    }

    #[tokio::test]
    async fn follower_times_out() {
        let coalescer = Coalescer::new();
        let _leader = coalescer.join("k");
        let Join::Follower(follower) = coalescer.join("k") else {
            panic!("second join must follow");
        };
        assert!(matches!(
            follower.wait(Duration::from_millis(10)).await,
            Waited::TimedOut
        ));
    }
}
