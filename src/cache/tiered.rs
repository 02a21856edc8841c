//! The tiered cache the proxy talks to: lookup and fill across tiers (today L1; the Redis L2 joins
//! here), with `Vary` variants stored side by side under one URL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::HeaderMap;

use super::entry::Entry;
use super::key::variant_key;
use super::l1::{Slot, VaryRecord, L1};
use super::PurgeReason;

pub struct Cache {
    l1: L1,
    /// Source of vary-record nonces; see [`variant_key`].
    next_nonce: AtomicU64,
}

impl Cache {
    pub fn new(capacity_bytes: u64, max_object_bytes: u64) -> Cache {
        Cache {
            l1: L1::new(capacity_bytes, max_object_bytes),
            next_nonce: AtomicU64::new(1),
        }
    }

    pub fn l1(&self) -> &L1 {
        &self.l1
    }

    /// The stored response for this URL that matches the request's selecting headers, if any.
    #[inline]
    pub fn lookup(&self, key: &str, request_headers: &HeaderMap) -> Option<Arc<Entry>> {
        match self.l1.get(key)? {
            Slot::Entry(entry) => entry.variant.is_empty().then_some(entry),
            Slot::Vary(record) => {
                let variant = variant_key(key, record.nonce, &record.names, request_headers);
                match self.l1.get(&variant)? {
                    Slot::Entry(entry) if entry.matches_variant(request_headers) => Some(entry),
                    _ => None,
                }
            }
        }
    }

    /// Stores a response for the URL `key`, as a variant when it carries `Vary`.
    pub fn store(&self, key: &str, entry: Arc<Entry>, request_headers: &HeaderMap) {
        if !self.l1.enabled() {
            return;
        }
        if entry.variant.is_empty() {
            self.l1.insert(key.to_string(), Slot::Entry(entry));
            return;
        }
        let names: Vec<_> = entry.variant.iter().map(|(name, _)| name.clone()).collect();
        let nonce = match self.l1.get(key) {
            Some(Slot::Vary(record)) if record.names == names => record.nonce,
            _ => {
                let nonce = self.next_nonce.fetch_add(1, Ordering::Relaxed);
                let record = VaryRecord {
                    names: names.clone(),
                    nonce,
                };
                self.l1
                    .insert(key.to_string(), Slot::Vary(Arc::new(record)));
                nonce
            }
        };
        let variant = variant_key(key, nonce, &names, request_headers);
        self.l1.insert(variant, Slot::Entry(entry));
    }

    /// Removes every stored response for the URL `key` (all its variants). Returns whether anything
    /// was there.
    pub fn purge(&self, key: &str, reason: PurgeReason) -> bool {
        let removed = self.l1.remove(key);
        if removed {
            tracing::debug!(?reason, "purged from L1");
        }
        removed
    }
}
