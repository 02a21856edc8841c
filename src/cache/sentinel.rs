//! Follows a Redis Sentinel failover as soon as the sentinels announce it.
//!
//! fred finds the master through the sentinels when it connects, but it only reconnects when its
//! connection breaks. After a forced or graceful failover the old master is still up, still
//! answering as a master until the sentinels demote it, and they do that on their next `INFO`
//! round, up to 10 s later; meanwhile every write went to a server that is about to be a replica.
//! So Strata listens for `+switch-master` on every sentinel of a store and reconnects the store's
//! clients at once, which makes fred ask the sentinels again.
//!
//! Sentinels learn a new configuration from each other's hello messages (every 2 s): one that has
//! not yet may still name the old master. So after reconnecting, Strata checks where each client
//! landed and reconnects again the ones that are not on the announced master, for a while, backing
//! off. The pool's clients move first; the invalidation subscriber moves once they are on the new
//! master, because every reconnection of the subscriber flushes L1 (a purge may have been missed).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fred::clients::Client;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::config::{Config, Server, ServerConfig};
use fred::types::CustomCommand;
use futures_util::future::join_all;
use tokio::sync::broadcast::error::RecvError;

use super::l2::{listening_client, supervise, L2};

/// The sentinels' channel for a finished failover: `<name> <old-ip> <old-port> <new-ip> <new-port>`.
const SWITCH_MASTER: &str = "+switch-master";
/// How long to keep moving clients that a sentinel still unaware of the switch sent back to the old
/// master (sentinels spread a new configuration within a few hello periods of 2 s).
const CONVERGE_WITHIN: Duration = Duration::from_secs(10);
/// First pause before moving the clients that landed elsewhere again; doubles up to
/// [`RECHECK_AT_MOST`].
const RECHECK_FIRST: Duration = Duration::from_millis(200);
const RECHECK_AT_MOST: Duration = Duration::from_millis(1600);
/// Longest wait for one client's reconnection (fred answers once it has connected, or given up).
const RECONNECT_LIMIT: Duration = Duration::from_secs(3);
/// How often a listener whose L2 may be gone checks that it is still wanted.
const ALIVE_CHECK: Duration = Duration::from_secs(1);
/// How long to wait before subscribing again after a failed attempt.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// A master's address as sentinels announce it.
type Address = (String, u16);

/// The master a store's clients were last moved to, shared by the listeners of its sentinels: every
/// sentinel announces the same switch, and only the first announcement moves the clients.
#[derive(Default)]
struct Switches {
    /// The announced master, and how many switches were followed (so a move that a later switch
    /// superseded stops).
    current: Mutex<Option<(Address, u64)>>,
    /// Masters whose unsure announcement the sentinels are being asked about now: every sentinel
    /// announces the same switch, and one confirmation answers for all of them.
    confirming: Mutex<Vec<Address>>,
}

/// What to make of an announced switch.
#[derive(Debug, PartialEq, Eq)]
enum Announced {
    /// A switch to follow, under this generation.
    Follow(u64),
    /// The switch already followed, announced by another sentinel.
    Repeat,
    /// Its `from` is not the master followed last: either a late announcement of an older switch,
    /// or the newest one after an announcement was missed (a sentinel connection down during a
    /// failover). Only the sentinels can tell which: ask one where the master is now.
    Unsure,
}

impl Switches {
    /// Records an announced switch `from` → `to` (see [`Announced`]).
    fn record(&self, from: &Address, to: &Address) -> Announced {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let generation = match &*current {
            Some((master, _)) if master == to => return Announced::Repeat,
            Some((master, _)) if master != from => return Announced::Unsure,
            Some((_, generation)) => generation + 1,
            None => 1,
        };
        *current = Some((to.clone(), generation));
        Announced::Follow(generation)
    }

    /// The generation of the switch followed last (0: none yet).
    fn generation(&self) -> u64 {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().map_or(0, |(_, generation)| *generation)
    }

    /// After an [`Announced::Unsure`] switch to `to`, which the sentinels confirmed is the master
    /// now, asked while `seen` was the last switch followed: the generation to follow it under, or
    /// `None` if it is followed already or a switch followed since supersedes the answer (asking
    /// takes seconds; an older answer arriving last must not move the clients back).
    fn confirmed(&self, to: &Address, seen: u64) -> Option<u64> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let generation = match &*current {
            Some((_, generation)) if *generation != seen => return None,
            Some((master, _)) if master == to => return None,
            Some((_, generation)) => generation + 1,
            None if seen != 0 => return None,
            None => 1,
        };
        *current = Some((to.clone(), generation));
        Some(generation)
    }

    /// Starts confirming a switch to `to`; `false` if a confirmation of it is under way already.
    fn begin_confirming(&self, to: &Address) -> bool {
        let mut confirming = self.confirming.lock().unwrap_or_else(|p| p.into_inner());
        if confirming.contains(to) {
            return false;
        }
        confirming.push(to.clone());
        true
    }

    fn end_confirming(&self, to: &Address) {
        let mut confirming = self.confirming.lock().unwrap_or_else(|p| p.into_inner());
        confirming.retain(|master| master != to);
    }

    /// Whether `generation` is still the switch to follow.
    fn is_current(&self, generation: u64) -> bool {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        matches!(&*current, Some((_, g)) if *g == generation)
    }
}

type LastSwitch = Arc<Switches>;

/// The sentinels of one store, each with a client that will listen for `+switch-master`.
pub(super) struct Watch {
    clients: Vec<Client>,
    service: String,
    last: LastSwitch,
}

impl Watch {
    /// For a store reached through Sentinel, a client per sentinel (not connected yet); `None` for
    /// other topologies.
    pub(super) fn new(config: &Config) -> Option<Watch> {
        let ServerConfig::Sentinel {
            hosts,
            service_name,
            ..
        } = &config.server
        else {
            return None;
        };
        let mut clients = Vec::with_capacity(hosts.len());
        for sentinel in hosts {
            // The store's settings (credentials, TLS) apply to its sentinels too, as in fred.
            let sentinel_config = Config {
                server: ServerConfig::Centralized {
                    server: sentinel.clone(),
                },
                database: None,
                ..config.clone()
            };
            match listening_client(sentinel_config) {
                Ok(client) => clients.push(client),
                Err(error) => {
                    tracing::warn!(%error, %sentinel, "cannot watch this sentinel for failovers");
                }
            }
        }
        Some(Watch {
            clients,
            service: service_name.clone(),
            last: LastSwitch::default(),
        })
    }

    /// Connects the clients and starts listening; `store` is the store's index in `l2`.
    pub(super) fn start(&self, l2: &Arc<L2>, store: usize) {
        let sentinels: Arc<[Config]> = self.clients.iter().map(Client::client_config).collect();
        for client in &self.clients {
            tokio::spawn(supervise(Arc::downgrade(l2), client.clone()));
            let switches = Following {
                l2: Arc::downgrade(l2),
                store,
                service: self.service.clone(),
                last: self.last.clone(),
                sentinels: sentinels.clone(),
            };
            tokio::spawn(announcements(client.clone(), switches));
        }
    }

    /// The clients, for the L2 to close when it goes.
    pub(super) fn clients(&self) -> &[Client] {
        &self.clients
    }
}

/// What a store's listeners share to follow its switches.
#[derive(Clone)]
struct Following {
    l2: Weak<L2>,
    store: usize,
    service: String,
    last: LastSwitch,
    /// Every sentinel of the store, to ask when an announcement is [`Announced::Unsure`].
    sentinels: Arc<[Config]>,
}

impl Following {
    /// Moves the store's clients to `to` under `generation` (in a task of its own).
    fn follow(&self, to: Address, generation: u64) {
        if let Some(l2) = self.l2.upgrade() {
            l2.stats.failovers_followed.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(host = %to.0, port = to.1, "Sentinel failover: moving to the new master");
        tokio::spawn(follow(
            self.l2.clone(),
            self.store,
            to,
            self.last.clone(),
            generation,
        ));
    }

    /// An announcement that does not start from the master followed last: followed only if most
    /// of the store's sentinels name `to` now. The announcing sentinel alone would not do: a
    /// late announcement of an older switch comes from the sentinel most likely behind.
    fn confirm_then_follow(&self, to: Address) {
        if !self.last.begin_confirming(&to) {
            return;
        }
        let following = self.clone();
        let seen = self.last.generation();
        tokio::spawn(async move {
            let named = join_all(
                following
                    .sentinels
                    .iter()
                    .map(|sentinel| named_master(sentinel, &following.service)),
            )
            .await;
            following.last.end_confirming(&to);
            if !named_by_most(&named, &to) {
                tracing::debug!(host = %to.0, port = to.1, ?named, "Sentinel announcement not confirmed; ignored");
                return;
            }
            if let Some(generation) = following.last.confirmed(&to, seen) {
                following.follow(to, generation);
            }
        });
    }
}

/// One sentinel's announcements: (re)subscribes on every (re)connection, and moves the store's
/// clients when the sentinel names a new master for the service.
async fn announcements(client: Client, following: Following) {
    let l2 = &following.l2;
    let mut messages = client.message_rx();
    let mut reconnects = client.reconnect_rx();
    loop {
        if l2.strong_count() == 0 {
            return;
        }
        let connected = tokio::time::timeout(ALIVE_CHECK, client.wait_for_connect()).await;
        if !matches!(connected, Ok(Ok(()))) || client.subscribe(SWITCH_MASTER).await.is_err() {
            tokio::time::sleep(RETRY_EVERY).await;
            continue;
        }
        // A connection event that came before this subscription is this subscription.
        while reconnects.try_recv().is_ok() {}
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Ok(message) => {
                        let Some(text) = message.value.as_str() else { continue };
                        let Some((from, to)) = switch(&text, &following.service) else { continue };
                        match following.last.record(&from, &to) {
                            Announced::Follow(generation) => following.follow(to, generation),
                            Announced::Repeat => {}
                            Announced::Unsure => following.confirm_then_follow(to),
                        }
                    }
                    // A lost announcement is covered by fred's own reconnection, later.
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
                reconnected = reconnects.recv() => {
                    if matches!(reconnected, Err(RecvError::Closed)) {
                        return;
                    }
                    break; // subscribe again on the new connection
                }
                () = tokio::time::sleep(ALIVE_CHECK) => {
                    if l2.strong_count() == 0 {
                        return;
                    }
                }
            }
        }
    }
}

/// Whether more than half of the sentinels asked (`named`: each one's answer, `None` if it gave
/// none) name `to` as the master.
fn named_by_most(named: &[Option<Address>], to: &Address) -> bool {
    let agreeing = named
        .iter()
        .filter(|named| named.as_ref() == Some(to))
        .count();
    agreeing * 2 > named.len()
}

/// The master `sentinel` names for `service` now (`SENTINEL get-master-addr-by-name`), asked on
/// a connection of its own (the listeners' are subscribed); `None` if it cannot tell in time.
async fn named_master(sentinel: &Config, service: &str) -> Option<Address> {
    let asking = Client::new(sentinel.clone(), None, None, None);
    let ask = async {
        let _connection = asking.init().await.ok()?;
        let reply: Vec<String> = asking
            .custom(
                CustomCommand::new_static("SENTINEL", None, false),
                vec!["get-master-addr-by-name", service],
            )
            .await
            .ok()?;
        let [host, port] = <[String; 2]>::try_from(reply).ok()?;
        Some((host, port.parse().ok()?))
    };
    let named = tokio::time::timeout(RECONNECT_LIMIT, ask)
        .await
        .ok()
        .flatten();
    // Not awaited here: the answer is what the caller waits for.
    tokio::spawn(async move {
        let _ = tokio::time::timeout(RECONNECT_LIMIT, asking.quit()).await;
    });
    named
}

/// The old and the new master's addresses in a `+switch-master` message about `service`.
fn switch(message: &str, service: &str) -> Option<(Address, Address)> {
    let mut fields = message.split_ascii_whitespace();
    if fields.next()? != service {
        return None;
    }
    let mut address = || -> Option<Address> {
        let host = fields.next()?.to_string();
        let port = fields.next()?.parse().ok()?;
        Some((host, port))
    };
    let from = address()?;
    let to = address()?;
    Some((from, to))
}

/// Moves the store's clients to `master`: reconnects them (fred asks the sentinels for the master
/// on every connection) until each has landed there, for at most [`CONVERGE_WITHIN`], and stops
/// early when a later switch supersedes this one. The pool first, then the subscriber.
async fn follow(
    l2: Weak<L2>,
    store: usize,
    master: Address,
    switches: LastSwitch,
    generation: u64,
) {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    let Some((pool, subscriber)) = l2.upgrade().and_then(|l2| l2.store_clients(store)) else {
        return;
    };
    for (clients, what) in [
        (pool, "pool"),
        (vec![subscriber], "invalidation subscriber"),
    ] {
        // At the announcement they are all on the old master, unless fred already moved one.
        let mut behind: Vec<Client> = clients
            .into_iter()
            .filter(|client| !client.active_connections().iter().any(|s| at(s, &master)))
            .collect();
        let mut pause = RECHECK_FIRST;
        while !behind.is_empty() {
            if !switches.is_current(generation) || l2.strong_count() == 0 {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    host = %master.0,
                    port = master.1,
                    behind = behind.len(),
                    what,
                    "Redis clients are not on the announced master yet; fred keeps following the sentinels"
                );
                return;
            }
            let landed = join_all(behind.iter().map(reconnect)).await;
            behind = behind
                .into_iter()
                .zip(landed)
                .filter(|(_, server)| !server.as_ref().is_some_and(|s| at(s, &master)))
                .map(|(client, _)| client)
                .collect();
            if !behind.is_empty() {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECHECK_AT_MOST);
            }
        }
    }
    tracing::info!(host = %master.0, port = master.1, "following the new Redis master");
}

fn at(server: &Server, master: &Address) -> bool {
    *server.host == *master.0 && server.port == master.1
}

/// Reconnects `client`; returns the server it connected to (from fred's connection event, which
/// also works where `CLIENT ID` is not allowed and `active_connections` stays empty).
async fn reconnect(client: &Client) -> Option<Server> {
    let mut events = client.reconnect_rx();
    let reconnected = tokio::time::timeout(RECONNECT_LIMIT, client.force_reconnection()).await;
    if !matches!(reconnected, Ok(Ok(()))) {
        return None;
    }
    // fred announces a connection before it answers the reconnection: the last event is this one.
    let mut landed = None;
    while let Ok(server) = events.try_recv() {
        landed = Some(server);
    }
    landed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(host: &str, port: u16) -> Address {
        (host.to_string(), port)
    }

    #[test]
    fn reads_the_switch_of_its_service_only() {
        assert_eq!(
            switch("mymaster 127.0.0.1 6380 127.0.0.1 6381", "mymaster"),
            Some((address("127.0.0.1", 6380), address("127.0.0.1", 6381)))
        );
        assert_eq!(
            switch("other 127.0.0.1 6380 127.0.0.1 6381", "mymaster"),
            None
        );
        assert_eq!(switch("mymaster 127.0.0.1 6380", "mymaster"), None);
        assert_eq!(
            switch("mymaster 127.0.0.1 6380 10.0.0.2 port", "mymaster"),
            None
        );
    }

    #[test]
    fn each_switch_is_followed_once_and_late_announcements_are_ignored() {
        let switches = Switches::default();
        let (a, b, c) = (address("a", 1), address("b", 2), address("c", 3));
        assert_eq!(switches.record(&a, &b), Announced::Follow(1));
        // The other sentinels announce the same switch.
        assert_eq!(switches.record(&a, &b), Announced::Repeat);
        assert!(switches.is_current(1));
        // A second failover supersedes the first one's move.
        assert_eq!(switches.record(&b, &c), Announced::Follow(2));
        assert!(!switches.is_current(1));
        // A sentinel that heard of the first failover late announces it now: the sentinels are
        // asked, name c, and nothing changes.
        assert_eq!(switches.record(&a, &b), Announced::Unsure);
        assert!(switches.is_current(2));
    }

    #[test]
    fn one_confirmation_at_a_time_per_master() {
        let switches = Switches::default();
        let (b, c) = (address("b", 2), address("c", 3));
        assert!(switches.begin_confirming(&b));
        assert!(
            !switches.begin_confirming(&b),
            "the other sentinels' announcements"
        );
        assert!(switches.begin_confirming(&c));
        switches.end_confirming(&b);
        assert!(switches.begin_confirming(&b));
    }

    #[test]
    fn an_unsure_switch_needs_most_sentinels_to_name_its_master() {
        let (b, c) = (address("b", 2), address("c", 3));
        assert!(named_by_most(&[Some(c.clone()), Some(c.clone()), None], &c));
        // The announcing sentinel is behind; the other two know of a later switch.
        assert!(!named_by_most(
            &[Some(b.clone()), Some(c.clone()), Some(c.clone())],
            &b
        ));
        // Unreachable sentinels confirm nothing.
        assert!(!named_by_most(&[Some(b.clone()), None, None], &b));
        assert!(!named_by_most(&[Some(b.clone()), Some(c.clone())], &b));
        assert!(!named_by_most(&[], &b));
    }

    #[test]
    fn a_switch_after_a_missed_one_is_followed_once_confirmed() {
        let switches = Switches::default();
        let (a, b, c, d) = (
            address("a", 1),
            address("b", 2),
            address("c", 3),
            address("d", 4),
        );
        assert_eq!(switches.record(&a, &b), Announced::Follow(1));
        // b → c was missed; c → d does not start where the last followed switch ended.
        assert_eq!(switches.record(&c, &d), Announced::Unsure);
        // The sentinels name d: followed, once (another listener's confirmation finds it done).
        let seen = switches.generation();
        assert_eq!(switches.confirmed(&d, seen), Some(2));
        assert_eq!(switches.confirmed(&d, seen), None);
        assert!(switches.is_current(2));
        // And the switches after it are followed as usual.
        assert_eq!(switches.record(&c, &d), Announced::Repeat);
        assert_eq!(switches.record(&d, &a), Announced::Follow(3));
        // A confirmation asked before that switch, answered after it, changes nothing.
        assert_eq!(switches.confirmed(&b, seen), None);
        assert!(switches.is_current(3));
    }
}
