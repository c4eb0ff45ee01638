//! [`MemoryStore`]: records in a sharded concurrent map, with TTL, bounds and sweeping.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    fmt,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use dashmap::{DashMap, mapref::entry::Entry};
use tokio::{sync::Notify, time::Instant};

use super::{
    Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreError, StoreErrorKind, StoreKey,
    StoredResponse,
};
use crate::config::MAX_DURATION;

/// The default record bound: about 0.9 GB of records with 100-byte bodies.
pub const DEFAULT_MAX_RECORDS: usize = 1_000_000;

/// The default bound on stored response bytes: 1 GiB.
pub const DEFAULT_MAX_BYTES: usize = 1 << 30;

/// Shards of the expiry index; a record's shard is chosen by the first byte of its key.
const EXPIRY_SHARDS: usize = 16;

/// An in-process store: the default, for a service that runs as one instance.
///
/// Records live in a [`DashMap`] (sharded locks, never held across an `.await`, so requests
/// with different keys never wait on each other). Each lease or completed response has a
/// deadline on tokio's clock ([`tokio::time::Instant`], so tests can pause and advance time);
/// a record past its deadline is never returned, whether or not it has been swept.
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
/// caller sending unique keys cannot exhaust the process's memory). When either is reached,
/// `begin` for a new key fails with [`StoreErrorKind::Full`] (the layer answers 503 with
/// `Retry-After`) until expired records are reclaimed; an in-flight or unexpired record is never
/// evicted. The byte bound counts stored response bytes (see [`StoredResponse::weight`]) and is
/// checked when a record begins, so completions already running may pass it by at most their
/// own responses.
///
/// **Memory.** Heap bytes per record, measured on x86_64 with `benches/memory.rs` (10,000 to
/// 1,000,000 records; the spread is the hash map's spare capacity at each size): a completed
/// record with a 100-byte body and two short headers (`Content-Type`, a 30-byte `Location`)
/// takes 830 to 900 bytes, the body and headers included, and each further body byte one byte
/// more; an in-flight record takes 210 to 290 bytes. The allocator's own overhead per block
/// comes on top.
///
/// Cloning is cheap and clones share the records.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    map: DashMap<StoreKey, Record>,
    expiry: Vec<ExpiryShard>,
    records: AtomicUsize,
    bytes: AtomicUsize,
    max_records: usize,
    max_bytes: usize,
    sweep_batch: usize,
    sweep_interval: Duration,
    sweeper_started: AtomicBool,
}

/// A min-heap of (deadline, key); entries whose record has since moved on are skipped.
type ExpiryShard = Mutex<BinaryHeap<Reverse<(Instant, StoreKey)>>>;

struct Record {
    fingerprint: Fingerprint,
    state: State,
}

enum State {
    InFlight {
        token: LeaseToken,
        expires_at: Instant,
        /// Created by the first waiter only.
        notify: Option<Arc<Notify>>,
    },
    Completed {
        /// Boxed, so that a map slot (and an in-flight record) stays small: 112 bytes rather
        /// than 240, which keeps a large map's probes to fewer cache lines.
        response: Box<StoredResponse>,
        weight: usize,
        expires_at: Instant,
    },
}

impl Record {
    /// What `begin` reports for this record at `now`, unless it has expired.
    fn live(&self, now: Instant) -> Option<Begin> {
        match &self.state {
            State::InFlight { expires_at, .. } if *expires_at > now => Some(Begin::InFlight {
                fingerprint: self.fingerprint,
                lease_remaining: *expires_at - now,
            }),
            State::Completed {
                response,
                expires_at,
                ..
            } if *expires_at > now => Some(Begin::Completed {
                fingerprint: self.fingerprint,
                response: StoredResponse::clone(response),
            }),
            _ => None,
        }
    }
}

impl State {
    fn expires_at(&self) -> Instant {
        match self {
            State::InFlight { expires_at, .. } | State::Completed { expires_at, .. } => *expires_at,
        }
    }

    fn weight(&self) -> usize {
        match self {
            State::InFlight { .. } => 0,
            State::Completed { weight, .. } => *weight,
        }
    }

    /// Wakes everybody waiting on this record (it is about to change).
    fn wake(&self) {
        if let State::InFlight {
            notify: Some(notify),
            ..
        } = self
        {
            notify.notify_waiters();
        }
    }
}

/// Builder for [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_records: usize,
    max_bytes: usize,
    sweep_interval: Duration,
    sweep_batch: usize,
    background_sweep: bool,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_records: DEFAULT_MAX_RECORDS,
            max_bytes: DEFAULT_MAX_BYTES,
            sweep_interval: Duration::from_secs(1),
            sweep_batch: 1024,
            background_sweep: true,
        }
    }
}

impl MemoryStoreBuilder {
    /// The most records (in flight and completed) the store holds. Default: 1,000,000
    /// ([`DEFAULT_MAX_RECORDS`]); `usize::MAX` for no bound. A new key past it fails with
    /// [`StoreErrorKind::Full`].
    pub fn max_records(mut self, max: usize) -> Self {
        self.max_records = max;
        self
    }

    /// The most stored response bytes (bodies plus headers, see [`StoredResponse::weight`]).
    /// Default: 1 GiB ([`DEFAULT_MAX_BYTES`]); `usize::MAX` for no bound. A new key past it
    /// fails with [`StoreErrorKind::Full`].
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max;
        self
    }

    /// How often the background sweeper looks for expired records. Default: 1 s.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Whether a background task sweeps every
    /// [`sweep_interval`](Self::sweep_interval). Default: `true`. With `false`, expired
    /// records are still never returned, and only [`MemoryStore::sweep`] (called on your own
    /// schedule) or a `begin` at the record bound reclaims them.
    pub fn background_sweep(mut self, enabled: bool) -> Self {
        self.background_sweep = enabled;
        self
    }

    /// How many expired records the sweeper removes before yielding to the scheduler.
    /// Default: 1,024; at least 1.
    pub fn sweep_batch(mut self, batch: usize) -> Self {
        self.sweep_batch = batch.max(1);
        self
    }

    /// Builds the store and, inside a tokio runtime, spawns its sweeper. Built outside a
    /// runtime, the sweeper starts with the first `begin` call (which always runs inside one).
    pub fn build(self) -> MemoryStore {
        let inner = Arc::new(Inner {
            map: DashMap::new(),
            expiry: (0..EXPIRY_SHARDS)
                .map(|_| Mutex::new(BinaryHeap::new()))
                .collect(),
            records: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_records: self.max_records,
            max_bytes: self.max_bytes,
            sweep_batch: self.sweep_batch,
            sweep_interval: self.sweep_interval,
            // A store without background sweeping counts as started: nothing will start it.
            sweeper_started: AtomicBool::new(!self.background_sweep),
        });
        let store = MemoryStore { inner };
        store.ensure_sweeper();
        store
    }
}

async fn sweeper(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        while inner.sweep_batch(Instant::now()).consumed == inner.sweep_batch {
            // A full batch: there may be more. Let requests run in between.
            tokio::task::yield_now().await;
        }
        for shard in 0..EXPIRY_SHARDS {
            inner.compact_index(shard);
            // Each shard is a pass over its entries: let requests run in between.
            tokio::task::yield_now().await;
        }
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
            handle.spawn(sweeper(
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
                for shard in 0..EXPIRY_SHARDS {
                    self.inner.compact_index(shard);
                }
                return removed;
            }
        }
    }
}

/// What one sweep batch did.
struct Swept {
    /// Index entries taken off the expiry index.
    consumed: usize,
    /// Records removed.
    removed: usize,
}

impl Inner {
    fn schedule(&self, key: StoreKey, deadline: Instant) {
        let shard = &self.expiry[key.0[0] as usize % EXPIRY_SHARDS];
        shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Reverse((deadline, key)));
    }

    /// Removes the records behind up to `sweep_batch` due index entries (deadline at or before
    /// `now`). Stale entries, whose record has moved on, are consumed without removing
    /// anything, so a full batch of consumed entries means "look again".
    fn sweep_batch(&self, now: Instant) -> Swept {
        let mut due = Vec::new();
        for shard in &self.expiry {
            let mut heap = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            while due.len() < self.sweep_batch {
                match heap.peek() {
                    Some(Reverse((deadline, _))) if *deadline <= now => {
                        let Reverse((_, key)) = heap.pop().expect("peeked");
                        due.push(key);
                    }
                    _ => break,
                }
            }
        }
        let mut swept = Swept {
            consumed: due.len(),
            removed: 0,
        };
        for key in due {
            let removed = self
                .map
                .remove_if(&key, |_, record| record.state.expires_at() <= now);
            if let Some((_, record)) = removed {
                record.state.wake();
                self.forget(&record.state);
                swept.removed += 1;
            }
        }
        swept
    }

    /// Drops the entries of expiry index shard `shard` whose record has moved on, once they
    /// outnumber its records by far. A lease released at once (a 5xx, a response too large)
    /// leaves its entry until the lease's deadline; without this, a caller sending unique keys
    /// whose requests fail would grow the index past the store's bounds for as long as a lease
    /// lasts. The shard is not locked while the map is read (`with_owned_lease` takes a shard
    /// lock while it holds a map entry); entries scheduled meanwhile are kept.
    fn compact_index(&self, shard: usize) {
        let threshold = 2 * self.records.load(Ordering::Relaxed) / EXPIRY_SHARDS + self.sweep_batch;
        let lock = || {
            self.expiry[shard]
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        let entries = {
            let mut heap = lock();
            if heap.len() <= threshold {
                return;
            }
            std::mem::take(&mut *heap).into_vec()
        };
        let live: Vec<_> = entries
            .into_iter()
            .filter(|Reverse((deadline, key))| {
                self.map
                    .get(key)
                    .is_some_and(|record| record.state.expires_at() == *deadline)
            })
            .collect();
        lock().extend(live);
    }

    fn forget(&self, state: &State) {
        self.records.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(state.weight(), Ordering::Relaxed);
    }

    fn has_room(&self) -> bool {
        self.records.load(Ordering::Relaxed) < self.max_records
            && self.bytes.load(Ordering::Relaxed) < self.max_bytes
    }

    fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        // A replay or a duplicate needs no token: look first, under the shard's read lock, so
        // that only a request that may acquire draws one (a system call).
        if let Some(found) = self.map.get(key).and_then(|record| record.live(now)) {
            return Ok(found);
        }
        let expires_at = now + lease.min(MAX_DURATION);
        let token = LeaseToken::random();
        let fresh = State::InFlight {
            token,
            expires_at,
            notify: None,
        };
        match self.map.entry(*key) {
            Entry::Occupied(mut occupied) => {
                let record = occupied.get_mut();
                match record.live(now) {
                    Some(found) => return Ok(found),
                    None => {
                        // Expired lease or response: take it over.
                        let old = std::mem::replace(&mut record.state, fresh);
                        record.fingerprint = *fingerprint;
                        old.wake();
                        self.bytes.fetch_sub(old.weight(), Ordering::Relaxed);
                    }
                }
            }
            Entry::Vacant(vacant) => {
                if !self.has_room() {
                    return Err(StoreError::new(
                        StoreErrorKind::Full,
                        "in-memory store is at its record or byte bound",
                    ));
                }
                self.records.fetch_add(1, Ordering::Relaxed);
                vacant.insert(Record {
                    fingerprint: *fingerprint,
                    state: fresh,
                });
            }
        }
        self.schedule(*key, expires_at);
        Ok(Begin::Acquired(token))
    }

    /// Runs `change` on the record for `key` if `token` owns its lease. `change` returns the new
    /// state (`None` removes the record). A lease past its expiry that nobody has taken over
    /// still belongs to its token: finishing late is better than running twice.
    fn with_owned_lease(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        change: impl FnOnce() -> Option<State>,
    ) -> bool {
        let Entry::Occupied(mut occupied) = self.map.entry(*key) else {
            return false;
        };
        match &occupied.get().state {
            State::InFlight { token: owner, .. } if *owner == token => {}
            _ => return false,
        }
        let deadline = match change() {
            Some(state) => {
                let deadline = state.expires_at();
                self.bytes.fetch_add(state.weight(), Ordering::Relaxed);
                let old = std::mem::replace(&mut occupied.get_mut().state, state);
                // Keep the waiters' notifier if the record stays in flight (renewal).
                if let (
                    State::InFlight {
                        notify: Some(old_notify),
                        ..
                    },
                    State::InFlight { notify, .. },
                ) = (&old, &mut occupied.get_mut().state)
                {
                    *notify = Some(old_notify.clone());
                } else {
                    old.wake();
                }
                Some(deadline)
            }
            None => {
                let (_, record) = occupied.remove_entry();
                record.state.wake();
                self.forget(&record.state);
                None
            }
        };
        if let Some(deadline) = deadline {
            self.schedule(*key, deadline);
        }
        true
    }
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
        let outcome = self.inner.begin(key, fingerprint, lease);
        if matches!(&outcome, Err(e) if e.kind() == StoreErrorKind::Full)
            && self.inner.sweep_batch(Instant::now()).removed > 0
        {
            // Expired records were waiting for the sweeper; room may have freed.
            return self.inner.begin(key, fingerprint, lease);
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
        Ok(self.inner.with_owned_lease(key, token, || {
            Some(State::Completed {
                weight: response.weight(),
                response: Box::new(response.clone()),
                expires_at: Instant::now() + ttl.min(MAX_DURATION),
            })
        }))
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
        let unbounded = MemoryStore::builder()
            .max_records(usize::MAX)
            .max_bytes(usize::MAX)
            .build();
        assert!(unbounded.inner.has_room());
    }

    fn index_len(store: &MemoryStore) -> usize {
        store
            .inner
            .expiry
            .iter()
            .map(|shard| shard.lock().unwrap().len())
            .sum()
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
        let bound = EXPIRY_SHARDS * store.inner.sweep_batch;
        assert!(
            index_len(&store) <= bound,
            "{} index entries for no record",
            index_len(&store)
        );
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
}
