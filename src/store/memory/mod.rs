//! [`MemoryStore`]: records in a sharded concurrent map, with TTL, bounds and sweeping.

use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreError, StoreErrorKind, StoreKey,
    StoredResponse,
};
use crate::config::MAX_DURATION;

/// How many times a `begin` at a bound evicts and tries again before it gives up with
/// `StoreErrorKind::Full` (only reached when concurrent new keys keep taking the room made).
const EVICTION_ROUNDS: usize = 8;

mod builder;
mod eviction;
mod expiry;
mod inner;
mod record;

pub use builder::{DEFAULT_MAX_BYTES, DEFAULT_MAX_RECORDS, MemoryStoreBuilder};
use eviction::Completion;
pub use eviction::WhenFull;
use inner::Inner;
use record::State;

/// An in-process store: the default, for a service that runs as one instance.
///
/// Records live in a [`DashMap`](dashmap::DashMap) (sharded locks, never held across an
/// `.await`, so requests with different keys never wait on each other). Each lease or
/// completed response has a deadline on tokio's clock ([`tokio::time::Instant`], so tests can
/// pause and advance time); a record past its deadline is never returned, whether or not it has
/// been swept.
///
/// **Sweeping.** Every deadline is also put in an expiry index (a min-heap, sharded 16 ways).
/// A background task, spawned when the store is built inside a tokio runtime, wakes every
/// [`sweep_interval`](MemoryStoreBuilder::sweep_interval) (default 1 s) and removes the
/// records whose deadline has passed, in batches of
/// [`sweep_batch`](MemoryStoreBuilder::sweep_batch) (default 1,024) with a yield to the
/// scheduler between batches, so reclaiming a million records never holds a lock for long and
/// never reads the unexpired ones. The task stops when the last clone of the store is dropped.
/// [`sweep`](MemoryStore::sweep) runs one pass by hand. A shard of the index whose entries
/// come to outnumber its records by far (leases released long before their deadline, by
/// failing requests) is rebuilt in the same pass from the entries still in use, so the index
/// stays within about twice the records.
///
/// **Bounds.** [`max_records`](MemoryStoreBuilder::max_records) and
/// [`max_bytes`](MemoryStoreBuilder::max_bytes) (default: 1,000,000 records and 1 GiB, so a
/// caller sending unique keys cannot exhaust the process's memory). The byte bound counts
/// stored response bytes (see [`StoredResponse::weight`]) and is checked when a record begins,
/// so completions already running may pass it by at most their own responses. When a new key
/// finds either bound reached, expired records are reclaimed first; then
/// [`when_full`](MemoryStoreBuilder::when_full) decides:
///
/// - [`WhenFull::EvictOldest`] (the default): the completed records that completed longest ago
///   are evicted until the store is below both bounds, and the new key is taken. An in-flight
///   record (a lease) is never evicted; `begin` fails with [`StoreErrorKind::Full`] (the layer
///   answers 503 with `Retry-After`) only when every record left is in flight. An evicted
///   response is no longer replayed: a retry of its request runs the handler again, so the age
///   of the youngest evicted record is the replay window actually in force. The store logs it
///   at most once a minute (`WARN`, target `tower_idempotency`, field
///   `youngest_evicted_age_secs`), and with the `metrics` feature counts evictions in the
///   counter `idempotency_memory_evictions_total`. To keep the whole TTL, size `max_records`
///   above your rate of new keys times the TTL (the defaults, 1,000,000 records and 24 hours,
///   hold about 11.6 new keys a second).
/// - [`WhenFull::Refuse`]: `begin` for a new key fails with [`StoreErrorKind::Full`] until
///   records expire; no record is ever dropped before its TTL. At a steady rate of new keys
///   above `max_records` / TTL, this turns new keys away for good.
///
/// Eviction keeps a queue of completed records in completion order (sharded 16 ways, like the
/// expiry index; 64 bytes an entry): evicting one record looks at the front of each shard and
/// removes one map entry, whatever the number of records, and a sweep drops the entries of
/// expired records.
///
/// **Memory.** Heap bytes per record, measured on x86_64 with `benches/memory.rs` (10,000 to
/// 1,000,000 records; the spread is the hash map's spare capacity at each size): a completed
/// record with a 100-byte body and two short headers (`Content-Type`, a 30-byte `Location`)
/// takes 910 to 1,000 bytes, the body and headers included (830 to 900 under
/// [`WhenFull::Refuse`], which keeps no eviction queue), and each further body byte one byte
/// more; an in-flight record takes 210 to 290 bytes. The allocator's own overhead per block
/// comes on top.
///
/// Cloning is cheap and clones share the records.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl MemoryStoreBuilder {
    /// Builds the store and, inside a tokio runtime, spawns its sweeper. Built outside a
    /// runtime, the sweeper starts with the first `begin` call (which always runs inside one).
    pub fn build(self) -> MemoryStore {
        let store = MemoryStore {
            inner: Arc::new(Inner::new(&self)),
        };
        store.ensure_sweeper();
        store
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("records", &self.len())
            .field("bytes", &self.inner.bytes.load(Ordering::Relaxed))
            .finish()
    }
}

impl MemoryStore {
    /// A store with the default bounds (1,000,000 records, 1 GiB of responses) and sweeper
    /// (every 1 s). See [`MemoryStore::builder`].
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder for bounds and sweeping.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// The number of records held (in flight and completed, including expired ones not yet
    /// swept). O(1).
    pub fn len(&self) -> usize {
        self.inner.records.load(Ordering::Relaxed)
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stored response bytes currently held (see [`StoredResponse::weight`]).
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// Spawns the background sweeper once, if a tokio runtime is running here.
    fn ensure_sweeper(&self) {
        if self.inner.sweeper_started.load(Ordering::Relaxed) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.inner.sweeper_started.swap(true, Ordering::AcqRel) {
            handle.spawn(inner::sweeper(
                Arc::downgrade(&self.inner),
                self.inner.sweep_interval,
            ));
        }
    }

    /// Removes every record whose deadline has passed, now, and returns how many it removed.
    /// Touches only expired records (through the expiry index), never the live ones, unless
    /// an index shard has to be rebuilt (see the type docs).
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut removed = 0;
        loop {
            let swept = self.inner.sweep_batch(now);
            removed += swept.removed;
            if swept.consumed < self.inner.sweep_batch {
                for shard in 0..expiry::SHARDS {
                    self.inner.compact_index(shard);
                }
                for shard in 0..eviction::SHARDS {
                    self.inner.trim_completions(shard);
                }
                return removed;
            }
        }
    }
}

fn full(outcome: &Result<Begin, StoreError>) -> bool {
    matches!(outcome, Err(e) if e.kind() == StoreErrorKind::Full)
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.ensure_sweeper();
        let mut outcome = self.inner.begin(key, fingerprint, lease);
        if !full(&outcome) {
            return outcome;
        }
        // Expired records may be waiting for the sweeper: reclaim them first.
        let now = Instant::now();
        if self.inner.sweep_batch(now).removed > 0 {
            outcome = self.inner.begin(key, fingerprint, lease);
        }
        // Then evict (under `WhenFull::Refuse` nothing is). Eviction runs outside
        // `Inner::begin`, which holds a map entry. Concurrent new keys may take the room made
        // here; each round makes room again, and the rounds are bounded so that no request
        // loops for long.
        for _ in 0..EVICTION_ROUNDS {
            if !full(&outcome) {
                break;
            }
            if self.inner.evict_until_room(now) == 0 && !self.inner.has_room() {
                // Nothing completed is left to evict: every record is in flight.
                break;
            }
            outcome = self.inner.begin(key, fingerprint, lease);
        }
        outcome
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.inner.with_owned_lease(key, token, || {
            Some(State::InFlight {
                token,
                expires_at: Instant::now() + lease.min(MAX_DURATION),
                notify: None,
            })
        }))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let completed_at = Instant::now();
        let expires_at = completed_at + ttl.min(MAX_DURATION);
        let stored = self.inner.with_owned_lease(key, token, || {
            Some(State::Completed {
                weight: response.weight(),
                response: Box::new(response.clone()),
                expires_at,
            })
        });
        if stored {
            // Outside the map entry's lock; until it is queued, the record is not evicted.
            self.inner.completions.push(Completion {
                completed_at,
                expires_at,
                key: *key,
            });
        }
        Ok(stored)
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        Ok(self.inner.with_owned_lease(key, token, || None))
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        let notified = {
            let Some(mut record) = self.inner.map.get_mut(key) else {
                return Ok(());
            };
            match &mut record.state {
                State::InFlight {
                    notify, expires_at, ..
                } if *expires_at > Instant::now() => {
                    // Created under the shard lock, so a completion after this point wakes it
                    // even before it is first polled (tokio's `Notify` guarantee).
                    notify
                        .get_or_insert_with(Default::default)
                        .clone()
                        .notified_owned()
                }
                _ => return Ok(()),
            }
        };
        let _ = tokio::time::timeout(timeout, notified).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
