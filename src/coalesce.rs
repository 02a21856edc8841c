//! Miss coalescing (nginx's proxy_cache_lock): one request per key goes to the origin, the others wait
//! for its result.
//!
//! A leader holds a [`FlightPermit`]; dropping it without completing (error, cancellation, panic)
//! releases every follower at once, so nobody waits on a leader that is gone. Followers wait on a
//! `watch` channel, which wakes all of them together; quick_cache's guard would wake them one by one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

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
    /// When its leader joined.
    started: Instant,
}

pub struct Coalescer {
    // std Mutex: held only to look up or change the map, never across an .await.
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    /// How long one fill keeps its key to itself (see [`Coalescer::join`]).
    reopen_after: Duration,
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
    /// Waits for the leader, until `deadline` at most.
    pub async fn wait(mut self, deadline: Instant) -> Waited {
        let finished = self
            .state
            .wait_for(|state| !matches!(state, FlightState::Pending));
        // Boxed: a timer is over a hundred bytes, and inline it made a coalesced request's boxed
        // future too large for glibc's per-thread cache (see `Accounted`); this small box is
        // served from that cache.
        let timer = Box::pin(tokio::time::sleep_until(deadline));
        tokio::select! {
            biased;
            state = finished => match state {
                Ok(state) => match &*state {
                    FlightState::Stored(entry) => Waited::Stored(entry.clone()),
                    FlightState::Failed => Waited::Failed,
                    FlightState::Pending | FlightState::Released => Waited::Released,
                },
                // The sender is gone: the leader vanished without a word. Treat as released.
                Err(_) => Waited::Released,
            },
            () = timer => Waited::TimedOut,
        }
    }
}

impl Coalescer {
    /// `reopen_after`: CACHE_LOCK_TIMEOUT, past which a fill no longer holds its key.
    pub fn new(reopen_after: Duration) -> Arc<Coalescer> {
        Arc::new(Coalescer {
            flights: Mutex::default(),
            reopen_after,
        })
    }

    /// Becomes the leader for `key`, or a follower of the fill already under way.
    ///
    /// A fill whose leader joined `reopen_after` ago or more no longer takes followers: the
    /// request leads a fill of its own (as nginx's `proxy_cache_lock_age`). An origin slow to
    /// answer, or trickling a body out, would otherwise hold the key for as long as it takes, each
    /// request meanwhile waiting its whole CACHE_LOCK_TIMEOUT for it. The older fill goes on; its
    /// followers still get its result, and it still stores it.
    ///
    /// `purge_generation` is read by the caller before joining: every purge recorded after it is
    /// one the fill must not undo (see `crate::invalidate::PurgeLog`).
    pub fn join(self: &Arc<Self>, key: &str, purge_generation: u64) -> Join {
        let mut flights = self.lock();
        let now = Instant::now();
        if let Some(flight) = flights.get(key) {
            if now.saturating_duration_since(flight.started) < self.reopen_after {
                return Join::Follower(Follower {
                    state: flight.state.subscribe(),
                });
            }
        }
        let (state, _) = watch::channel(FlightState::Pending);
        let flight = Arc::new(Flight {
            state,
            started: now,
        });
        flights.insert(key.to_string(), flight.clone());
        Join::Leader(FlightPermit {
            coalescer: self.clone(),
            key: key.to_string(),
            flight,
            finished: false,
            purge_generation,
        })
    }

    /// Requests waiting for another request's fill now. Counted when asked (by `/stats`), from the
    /// flights under way: each follower holds one receiver of its flight's channel.
    pub fn waiting(&self) -> u64 {
        self.lock()
            .values()
            .map(|flight| flight.state.receiver_count() as u64)
            .sum()
    }

    /// Fills under way now (one leader each).
    pub fn in_flight_count(&self) -> u64 {
        self.lock().len() as u64
    }

    /// Whether a fill for `key` is under way.
    pub fn in_flight(&self, key: &str) -> bool {
        self.lock().contains_key(key)
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

    pub fn purge_generation(&self) -> u64 {
        self.purge_generation
    }

    /// Whether a newer fill of the key took over (this one outlived the lock age, see
    /// [`Coalescer::join`]): its result, more recent, is the one for the shared cache.
    pub fn superseded(&self) -> bool {
        !self
            .coalescer
            .lock()
            .get(&self.key)
            .is_some_and(|current| Arc::ptr_eq(current, &self.flight))
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
        let coalescer = Coalescer::new(Duration::from_secs(5));
        let Join::Leader(permit) = coalescer.join("k", 0) else {
            panic!("first join must lead");
        };
        let Join::Follower(follower) = coalescer.join("k", 0) else {
            panic!("second join must follow");
        };
        drop(permit);
        assert!(matches!(
            follower.wait(Instant::now() + Duration::from_secs(5)).await,
            Waited::Released
        ));
        assert!(!coalescer.in_flight("k"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fill_older_than_the_lock_age_takes_no_followers() {
        let coalescer = Coalescer::new(Duration::from_secs(5));
        let Join::Leader(first) = coalescer.join("k", 0) else {
            panic!("first join must lead");
        };
        let Join::Follower(early) = coalescer.join("k", 0) else {
            panic!("a join inside the lock age follows");
        };
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!first.superseded());
        let Join::Leader(second) = coalescer.join("k", 0) else {
            panic!("the key is open again");
        };
        assert!(first.superseded() && !second.superseded());
        assert!(matches!(coalescer.join("k", 0), Join::Follower(_)));
        // The first fill finishing still answers its own followers, and leaves the second
        // fill's flight in place.
        first.release();
        assert!(matches!(
            early.wait(Instant::now() + Duration::from_secs(60)).await,
            Waited::Released
        ));
        assert!(coalescer.in_flight("k"));
        drop(second);
        assert!(!coalescer.in_flight("k"));
    }

    #[tokio::test]
    async fn follower_times_out() {
        let coalescer = Coalescer::new(Duration::from_secs(5));
        let _leader = coalescer.join("k", 0);
        let Join::Follower(follower) = coalescer.join("k", 0) else {
            panic!("second join must follow");
        };
        assert!(matches!(
            follower
                .wait(Instant::now() + Duration::from_millis(10))
                .await,
            Waited::TimedOut
        ));
    }
}
