//! The shared state behind every clone of a [`MemoryStore`](super::MemoryStore): the records,
//! their counters and bounds, and the atomic steps on one record.

use std::{
    sync::{
        Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry};
use tokio::time::Instant;

use super::{
    builder::MemoryStoreBuilder,
    eviction::{self, CompletionQueue, EvictionReport},
    expiry::{self, ExpiryIndex},
    record::{Record, State},
};
use crate::{
    config::MAX_DURATION,
    store::{Begin, Fingerprint, LeaseToken, StoreError, StoreErrorKind, StoreKey},
};

pub(super) struct Inner {
    pub(super) map: DashMap<StoreKey, Record>,
    pub(super) expiry: ExpiryIndex,
    /// Completed records in completion order, for eviction (empty under `WhenFull::Refuse`).
    pub(super) completions: CompletionQueue,
    pub(super) evictions: EvictionReport,
    pub(super) records: AtomicUsize,
    pub(super) bytes: AtomicUsize,
    pub(super) max_records: usize,
    pub(super) max_bytes: usize,
    pub(super) sweep_batch: usize,
    pub(super) sweep_interval: Duration,
    pub(super) sweeper_started: AtomicBool,
}

fn full() -> StoreError {
    StoreError::new(
        StoreErrorKind::Full,
        "in-memory store is at its record or byte bound",
    )
}

/// What one sweep batch did.
pub(super) struct Swept {
    /// Index entries taken off the expiry index.
    pub(super) consumed: usize,
    /// Records removed.
    pub(super) removed: usize,
}

/// Wakes every `every`, sweeps what is due in batches with a yield between them, and compacts
/// the expiry index; returns once the store is dropped.
pub(super) async fn sweeper(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        while inner.sweep_batch(Instant::now()).consumed == inner.sweep_batch {
            // A full batch: there may be more. Let requests run in between.
            tokio::task::yield_now().await;
        }
        for shard in 0..expiry::SHARDS {
            inner.compact_index(shard);
            // Each shard is a pass over its entries: let requests run in between.
            tokio::task::yield_now().await;
        }
        if inner.completions.enabled() {
            for shard in 0..eviction::SHARDS {
                inner.trim_completions(shard);
                tokio::task::yield_now().await;
            }
        }
    }
}

impl Inner {
    pub(super) fn new(config: &MemoryStoreBuilder) -> Self {
        Self {
            map: DashMap::new(),
            expiry: ExpiryIndex::new(),
            completions: CompletionQueue::new(config.when_full),
            evictions: EvictionReport::new(),
            records: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_records: config.max_records,
            max_bytes: config.max_bytes,
            sweep_batch: config.sweep_batch,
            sweep_interval: config.sweep_interval,
            // A store without background sweeping counts as started: nothing will start it.
            sweeper_started: AtomicBool::new(!config.background_sweep),
        }
    }

    /// Removes the records behind up to `sweep_batch` due index entries (deadline at or before
    /// `now`). Stale entries, whose record has moved on, are consumed without removing
    /// anything, so a full batch of consumed entries means "look again".
    pub(super) fn sweep_batch(&self, now: Instant) -> Swept {
        let due = self.expiry.take_due(now, self.sweep_batch);
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

    /// Drops the stale entries of expiry index shard `shard`, once they outnumber its records
    /// by far (see [`ExpiryIndex::compact`]).
    pub(super) fn compact_index(&self, shard: usize) {
        let threshold =
            2 * self.records.load(Ordering::Relaxed) / expiry::SHARDS + self.sweep_batch;
        self.expiry.compact(shard, threshold, |key, deadline| {
            self.map
                .get(key)
                .is_some_and(|record| record.state.expires_at() == deadline)
        });
    }

    /// Drops the expired entries of completion queue shard `shard` (see
    /// [`CompletionQueue::trim`]).
    pub(super) fn trim_completions(&self, shard: usize) {
        let threshold =
            2 * self.records.load(Ordering::Relaxed) / eviction::SHARDS + self.sweep_batch;
        self.completions.trim(shard, Instant::now(), threshold);
    }

    /// Evicts the oldest completed records until the store is below both bounds, or none is
    /// left; returns how many it evicted. Never touches a lease. Must not be called while a
    /// map entry is held (it removes entries from the map).
    pub(super) fn evict_until_room(&self, now: Instant) -> usize {
        let mut evicted = 0;
        let mut youngest = None;
        while !self.has_room() {
            let Some(oldest) = self.completions.pop_oldest(now) else {
                break;
            };
            // Only the completion the entry names is removed: never a lease, never a later
            // completion of the same key.
            let removed = self
                .map
                .remove_if(&oldest.key, |_, record| match record.state {
                    State::Completed { expires_at, .. } => expires_at == oldest.expires_at,
                    State::InFlight { .. } => false,
                });
            if let Some((_, record)) = removed {
                self.forget(&record.state);
                evicted += 1;
                youngest = Some(oldest.completed_at);
            }
        }
        if let Some(youngest) = youngest {
            self.evictions.evicted(evicted as u64, youngest, now);
        }
        evicted
    }

    pub(super) fn forget(&self, state: &State) {
        self.records.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(state.weight(), Ordering::Relaxed);
    }

    pub(super) fn has_room(&self) -> bool {
        self.records.load(Ordering::Relaxed) < self.max_records
            && self.bytes.load(Ordering::Relaxed) < self.max_bytes
    }

    pub(super) fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        // A replay or a duplicate needs no token: look first, under the shard's read lock, so
        // that only a request that may acquire draws one (a system call).
        let held = match self.map.get(key) {
            Some(record) => match record.live(now) {
                Some(found) => return Ok(found),
                None => true,
            },
            None => false,
        };
        // A new key at a bound needs room first (made by the caller): no token yet.
        if !held && !self.has_room() {
            return Err(full());
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
                    return Err(full());
                }
                self.records.fetch_add(1, Ordering::Relaxed);
                vacant.insert(Record {
                    fingerprint: *fingerprint,
                    state: fresh,
                });
            }
        }
        self.expiry.schedule(*key, expires_at);
        Ok(Begin::Acquired(token))
    }

    /// Runs `change` on the record for `key` if `token` owns its lease. `change` returns the new
    /// state (`None` removes the record). A lease past its expiry that nobody has taken over
    /// still belongs to its token: finishing late is better than running twice.
    pub(super) fn with_owned_lease(
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
            self.expiry.schedule(*key, deadline);
        }
        true
    }
}
