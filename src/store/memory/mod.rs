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
mod tests {
    use super::*;
    use http::{HeaderMap, StatusCode};

    #[test]
    fn the_default_store_is_bounded() {
        let store = MemoryStore::new();
        assert_eq!(store.inner.max_records, DEFAULT_MAX_RECORDS);
        assert_eq!(store.inner.max_bytes, DEFAULT_MAX_BYTES);
        assert!(store.inner.completions.enabled(), "the default evicts");
        let unbounded = MemoryStore::builder()
            .max_records(usize::MAX)
            .max_bytes(usize::MAX)
            .build();
        assert!(unbounded.inner.has_room());
    }

    fn index_len(store: &MemoryStore) -> usize {
        store.inner.expiry.len()
    }

    /// A lease released at once (its response was a 5xx, a 429, too large) left its expiry
    /// index entry behind until the lease's deadline: a caller sending unique keys whose
    /// requests fail grew the index by one entry per request for as long as a lease lasts,
    /// past `max_records` and `max_bytes` (about 50 bytes a request; an hour's lease at 40,000
    /// requests a second is gigabytes).
    #[tokio::test(start_paused = true)]
    async fn released_leases_do_not_grow_the_expiry_index() {
        let store = MemoryStore::builder()
            .max_records(10)
            .background_sweep(false)
            .build();
        let fp = Fingerprint([1; 32]);
        for i in 0..50_000u32 {
            let mut key = [0; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            key[4] = i as u8; // spread over the index shards
            let key = StoreKey(key);
            let Begin::Acquired(token) = store
                .begin(&key, &fp, Duration::from_secs(3600))
                .await
                .unwrap()
            else {
                panic!("a fresh key is acquired");
            };
            assert!(store.release(&key, token).await.unwrap());
        }
        assert_eq!(store.len(), 0);
        assert_eq!(store.sweep(), 0, "nothing is due");
        let bound = expiry::SHARDS * store.inner.sweep_batch;
        assert!(
            index_len(&store) <= bound,
            "{} index entries for no record",
            index_len(&store)
        );
    }

    async fn complete_unique_keys(store: &MemoryStore, n: u32, ttl: Duration) {
        let fp = Fingerprint([1; 32]);
        let response = StoredResponse {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: bytes::Bytes::from_static(b"ok"),
        };
        for i in 0..n {
            let mut key = [0; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            key[4] = i as u8; // spread over the shards
            let key = StoreKey(key);
            let Begin::Acquired(token) = store.begin(&key, &fp, ttl).await.unwrap() else {
                panic!("a fresh key is acquired");
            };
            assert!(store.complete(&key, token, &response, ttl).await.unwrap());
        }
    }

    /// Records that expire instead of being evicted leave their completion queue entries
    /// behind; a sweep drops them, so the queue does not grow past the records.
    #[tokio::test(start_paused = true)]
    async fn the_completion_queue_drops_expired_entries() {
        let store = MemoryStore::builder().background_sweep(false).build();
        complete_unique_keys(&store, 5_000, Duration::from_secs(1)).await;
        assert_eq!(store.inner.completions.len(), 5_000);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(store.sweep(), 5_000);
        assert_eq!(store.inner.completions.len(), 0);
    }

    /// Under `WhenFull::Refuse` nothing is queued: the queue costs nothing.
    #[tokio::test(start_paused = true)]
    async fn refuse_keeps_no_completion_queue() {
        let store = MemoryStore::builder()
            .when_full(WhenFull::Refuse)
            .background_sweep(false)
            .build();
        complete_unique_keys(&store, 100, Duration::from_secs(60)).await;
        assert_eq!(store.len(), 100);
        assert_eq!(store.inner.completions.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_counts_removed_records_not_stale_index_entries() {
        // No background sweeps during the test: only `sweep()` removes records.
        let store = MemoryStore::builder().background_sweep(false).build();
        let key = StoreKey([7; 32]);
        let fp = Fingerprint([1; 32]);
        let Begin::Acquired(token) = store
            .begin(&key, &fp, Duration::from_millis(300))
            .await
            .unwrap()
        else {
            panic!("absent key must be acquired");
        };
        let response = StoredResponse {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: bytes::Bytes::from_static(b"ok"),
        };
        assert!(
            store
                .complete(&key, token, &response, Duration::from_secs(30))
                .await
                .unwrap()
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        // The lease's index entry is due but its record lives on as a completed response.
        assert_eq!(store.sweep(), 0);
        assert_eq!(store.len(), 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(store.sweep(), 1);
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn builder_settings_are_kept_in_any_order() {
        let store = MemoryStore::builder()
            .max_records(7)
            .sweep_batch(3)
            .when_full(WhenFull::Refuse)
            .build();
        assert_eq!(store.inner.max_records, 7);
        assert_eq!(store.inner.sweep_batch, 3);
        assert!(
            !store.inner.completions.enabled(),
            "a store that refuses keeps no eviction queue"
        );
        let at_least_one = MemoryStore::builder().sweep_batch(0).build();
        assert_eq!(at_least_one.inner.sweep_batch, 1);
    }

    /// A key in shard `shard` of the expiry index and of the completion queue.
    fn key_in_shard(shard: u8, n: u8) -> StoreKey {
        let mut key = [n; 32];
        key[0] = shard;
        StoreKey(key)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// 64 records (4 in each of the 16 shards) and a batch of 2: a shard is rebuilt once it
    /// holds more than 2 * 64 / 16 + 2 = 10 index entries, twice its share of the records
    /// plus a batch. Below that, the sweep leaves stale entries alone (rebuilding a shard reads
    /// all of its records).
    #[tokio::test(start_paused = true)]
    async fn an_index_shard_is_rebuilt_once_past_twice_its_share_of_the_records_plus_a_batch() {
        let store = MemoryStore::builder()
            .sweep_batch(2)
            .background_sweep(false)
            .build();
        let fp = Fingerprint([1; 32]);
        for n in 0..64u8 {
            store
                .begin(&key_in_shard(n % 16, n), &fp, HOUR)
                .await
                .unwrap();
        }
        let release_one = |n: u8| {
            let store = store.clone();
            async move {
                let key = key_in_shard(0, 100 + n);
                let Begin::Acquired(token) = store.begin(&key, &fp, HOUR).await.unwrap() else {
                    panic!("a fresh key is acquired");
                };
                assert!(store.release(&key, token).await.unwrap());
            }
        };
        for n in 0..6 {
            release_one(n).await;
        }
        assert_eq!(store.sweep(), 0);
        assert_eq!(
            index_len(&store),
            64 + 6,
            "shard 0 holds 4 + 6 = 10 entries: kept"
        );
        release_one(6).await;
        assert_eq!(store.sweep(), 0);
        assert_eq!(
            index_len(&store),
            64,
            "shard 0 held 4 + 7 = 11 entries: its stale ones are dropped, its records' kept"
        );
    }

    /// The same threshold for the completion queue: with 64 live completed records (4 a shard)
    /// and a batch of 2, the expired entries behind a live front of a shard are dropped once
    /// the shard holds more than 10 entries.
    #[tokio::test(start_paused = true)]
    async fn a_queue_shard_drops_expired_entries_past_twice_its_share_of_records_plus_a_batch() {
        let store = MemoryStore::builder()
            .sweep_batch(2)
            .background_sweep(false)
            .build();
        let fp = Fingerprint([1; 32]);
        let response = StoredResponse {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: bytes::Bytes::from_static(b"ok"),
        };
        let complete = |key: StoreKey, ttl: Duration| {
            let (store, response) = (store.clone(), response.clone());
            async move {
                let Begin::Acquired(token) = store.begin(&key, &fp, HOUR).await.unwrap() else {
                    panic!("a fresh key is acquired");
                };
                assert!(store.complete(&key, token, &response, ttl).await.unwrap());
            }
        };
        for n in 0..64u8 {
            complete(key_in_shard(n % 16, n), HOUR).await;
        }
        let short = Duration::from_secs(1);
        for n in 0..6 {
            complete(key_in_shard(0, 100 + n), short).await;
        }
        tokio::time::advance(short).await;
        assert_eq!(store.sweep(), 6);
        assert_eq!(
            store.inner.completions.len(),
            64 + 6,
            "shard 0 holds 4 + 6 = 10 entries: kept"
        );
        complete(key_in_shard(0, 106), short).await;
        tokio::time::advance(short).await;
        assert_eq!(store.sweep(), 1);
        assert_eq!(
            store.inner.completions.len(),
            64,
            "shard 0 held 4 + 7 = 11 entries: the expired ones are dropped"
        );
    }
}
