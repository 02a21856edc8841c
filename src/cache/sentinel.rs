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
//! landed and reconnects again the ones that are not on the announced master, for a while.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fred::clients::Client;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::config::{Config, ReconnectPolicy, Server, ServerConfig};
use fred::types::Builder;
use tokio::sync::broadcast::error::RecvError;

use super::l2::{supervise, L2};

/// The sentinels' channel for a finished failover: `<name> <old-ip> <old-port> <new-ip> <new-port>`.
const SWITCH_MASTER: &str = "+switch-master";
/// How long to keep moving clients that a sentinel still unaware of the switch sent back to the old
/// master (sentinels spread a new configuration within a few hello periods of 2 s).
const CONVERGE_WITHIN: Duration = Duration::from_secs(10);
/// Pause between two checks of where the clients are.
const RECHECK_EVERY: Duration = Duration::from_millis(200);
/// How often a listener whose L2 may be gone checks that it is still wanted.
const ALIVE_CHECK: Duration = Duration::from_secs(1);
/// How long to wait before subscribing again after a failed attempt.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// The master a store's clients last moved to, shared by the listeners of its sentinels (every
/// sentinel announces the same switch: only the first announcement moves the clients).
type LastSwitch = Arc<Mutex<Option<(String, u16)>>>;

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
            match Builder::from_config(sentinel_config)
                .with_connection_config(|c| {
                    c.connection_timeout = Duration::from_secs(2);
                    c.internal_command_timeout = Duration::from_secs(2);
                })
                .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
                .build()
            {
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
        for client in &self.clients {
            tokio::spawn(supervise(Arc::downgrade(l2), client.clone()));
            tokio::spawn(announcements(
                Arc::downgrade(l2),
                store,
                client.clone(),
                self.service.clone(),
                self.last.clone(),
            ));
        }
    }

    /// The clients, for the L2 to close when it goes.
    pub(super) fn clients(&self) -> &[Client] {
        &self.clients
    }
}

/// One sentinel's announcements: (re)subscribes on every (re)connection, and moves the store's
/// clients when the sentinel names a new master for the service.
async fn announcements(
    l2: Weak<L2>,
    store: usize,
    client: Client,
    service: String,
    last: LastSwitch,
) {
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
                        let Some(master) = new_master(&text, &service) else { continue };
                        let first = {
                            let mut last = last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                            let first = last.as_ref() != Some(&master);
                            *last = Some(master.clone());
                            first
                        };
                        if first {
                            if let Some(l2) = l2.upgrade() {
                                l2.stats.failovers_followed.fetch_add(1, Ordering::Relaxed);
                            }
                            tracing::info!(host = %master.0, port = master.1, "Sentinel failover: moving to the new master");
                            tokio::spawn(follow(l2.clone(), store, master));
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

/// The new master's address in a `+switch-master` message about `service`.
fn new_master(message: &str, service: &str) -> Option<(String, u16)> {
    let mut fields = message.split_ascii_whitespace();
    if fields.next()? != service {
        return None;
    }
    let (_old_host, _old_port) = (fields.next()?, fields.next()?);
    let host = fields.next()?;
    let port = fields.next()?.parse().ok()?;
    Some((host.to_string(), port))
}

/// Reconnects the store's clients until each is connected to `master` (or for
/// [`CONVERGE_WITHIN`]): fred asks the sentinels for the master on every connection.
async fn follow(l2: Weak<L2>, store: usize, master: (String, u16)) {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    let on_master = |server: &Server| *server.host == *master.0 && server.port == master.1;
    loop {
        let Some(clients) = l2.upgrade().map(|l2| l2.store_clients(store)) else {
            return;
        };
        let behind: Vec<Client> = clients
            .into_iter()
            .filter(|client| !client.active_connections().iter().any(on_master))
            .collect();
        if behind.is_empty() {
            tracing::info!(host = %master.0, port = master.1, "following the new Redis master");
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                host = %master.0,
                port = master.1,
                behind = behind.len(),
                "some Redis clients are not on the announced master yet; fred keeps following the sentinels"
            );
            return;
        }
        for client in behind {
            // Bounded: a reconnection that hangs must not stop the others from moving.
            let _ = tokio::time::timeout(RECHECK_EVERY * 10, client.force_reconnection()).await;
        }
        tokio::time::sleep(RECHECK_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_new_master_of_its_service_only() {
        assert_eq!(
            new_master("mymaster 127.0.0.1 6380 127.0.0.1 6381", "mymaster"),
            Some(("127.0.0.1".to_string(), 6381))
        );
        assert_eq!(
            new_master("other 127.0.0.1 6380 127.0.0.1 6381", "mymaster"),
            None
        );
        assert_eq!(new_master("mymaster 127.0.0.1 6380", "mymaster"), None);
        assert_eq!(
            new_master("mymaster 127.0.0.1 6380 10.0.0.2 port", "mymaster"),
            None
        );
    }
}
