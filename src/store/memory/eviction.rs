//! What a full store does: [`WhenFull`], and for [`WhenFull::EvictOldest`] the queue of
//! completed records in the order they completed, and the report of what was evicted.

use std::{
    collections::VecDeque,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::store::StoreKey;

/// Shards of the queue; a record's shard is chosen by the first byte of its key.
pub(super) const SHARDS: usize = 16;

/// The least time between two log lines about evictions.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What a [`MemoryStore`](super::MemoryStore) does when a new key arrives and
/// [`max_records`](super::MemoryStoreBuilder::max_records) or
/// [`max_bytes`](super::MemoryStoreBuilder::max_bytes) is reached. Set it with
/// [`MemoryStoreBuilder::when_full`](super::MemoryStoreBuilder::when_full).
///
/// Either way, expired records are reclaimed first, and an in-flight record (a lease) is never
/// evicted: its handler may be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenFull {
    /// The default. Remove the completed records that completed longest ago, until the store is
    /// below both bounds again, and take the new key. The new key is refused with
    /// [`StoreErrorKind::Full`](crate::store::StoreErrorKind::Full) (503) only when every record
    /// left is in flight.
    ///
    /// An evicted record is forgotten before its TTL runs out: a retry of its request runs the
    /// handler again. The age of the youngest evicted record is therefore the replay window in
    /// force; the store logs it (a `WARN` event, target `tower_idempotency`, fields `evicted`
    /// and `youngest_evicted_age_secs`) at most once a minute while it evicts, and with the
    /// `metrics` feature counts every eviction in `idempotency_memory_evictions_total`.
    /// Records that completed at the same moment may go in either order.
    ///
    /// Cost: one queue entry of 64 bytes per completed record (67 to 105 bytes with the
    /// queue's spare capacity, measured at 10,000 to 1,000,000 records), and per eviction a
    /// look at the oldest entry of each of 16 queue shards and one map removal; nothing grows
    /// with the number of records.
    #[default]
    EvictOldest,
    /// Refuse every new key with [`StoreErrorKind::Full`](crate::store::StoreErrorKind::Full)
    /// (the layer answers 503 with `Retry-After`) until records expire: no record is forgotten
    /// before its TTL, so every retry within the TTL is replayed, and at a steady rate of new
    /// keys above `max_records` / TTL the store turns new keys away.
    Refuse,
}

/// A completed record, as the queue knows it. `expires_at` tells a stale entry (its record has
/// expired, and its key may have been begun and completed again since) from one whose record is
/// still there.
pub(super) struct Completion {
    pub(super) completed_at: Instant,
    pub(super) expires_at: Instant,
    pub(super) key: StoreKey,
}

type Shard = Mutex<VecDeque<Completion>>;

/// Completed records in the order they completed, per shard (first in, first out). Nothing is
/// removed from it when a record expires: expired entries are dropped when they reach the
/// front, and by [`trim`](Self::trim) once they outnumber the records by far. Empty, and never
/// written to, under [`WhenFull::Refuse`].
pub(super) struct CompletionQueue {
    shards: Vec<Shard>,
}

impl CompletionQueue {
    pub(super) fn new(when_full: WhenFull) -> Self {
        let shards = match when_full {
            WhenFull::EvictOldest => SHARDS,
            WhenFull::Refuse => 0,
        };
        Self {
            shards: (0..shards).map(|_| Mutex::new(VecDeque::new())).collect(),
        }
    }

    /// Whether the store evicts (the queue is kept).
    pub(super) fn enabled(&self) -> bool {
        !self.shards.is_empty()
    }

    fn lock(shard: &Shard) -> MutexGuard<'_, VecDeque<Completion>> {
        shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a record that has just completed.
    pub(super) fn push(&self, completion: Completion) {
        if let Some(shard) = self.shards.get(completion.key.0[0] as usize % SHARDS) {
            Self::lock(shard).push_back(completion);
        }
    }

    /// Takes the entry that completed longest ago among those not expired at `now`, dropping
    /// the expired ones it meets on the way. Looks at the front of each shard only.
    pub(super) fn pop_oldest(&self, now: Instant) -> Option<Completion> {
        loop {
            let mut oldest: Option<(Instant, usize)> = None;
            for (index, shard) in self.shards.iter().enumerate() {
                let mut queue = Self::lock(shard);
                while queue.front().is_some_and(|entry| entry.expires_at <= now) {
                    queue.pop_front();
                }
                if let Some(front) = queue.front()
                    && oldest.is_none_or(|(at, _)| front.completed_at < at)
                {
                    oldest = Some((front.completed_at, index));
                }
            }
            let (_, index) = oldest?;
            let popped = Self::lock(&self.shards[index]).pop_front();
            match popped {
                Some(entry) if entry.expires_at > now => return Some(entry),
                // Taken by another eviction in between (the next front may be expired): look again.
                _ => continue,
            }
        }
    }

    /// Drops shard `shard`'s expired entries: those at its front always, and all of them once
    /// the shard holds more than `threshold` entries (records with a shorter TTL behind ones
    /// with a longer TTL). Keeps the queue within about twice the records it points to.
    pub(super) fn trim(&self, shard: usize, now: Instant, threshold: usize) {
        let Some(shard) = self.shards.get(shard) else {
            return;
        };
        let mut queue = Self::lock(shard);
        while queue.front().is_some_and(|entry| entry.expires_at <= now) {
            queue.pop_front();
        }
        if queue.len() > threshold {
            queue.retain(|entry| entry.expires_at > now);
        }
    }

    /// Entries held, stale ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| Self::lock(shard).len())
            .sum()
    }
}

/// Counts evictions (metric `idempotency_memory_evictions_total`, feature `metrics`) and logs
/// the age of the youngest evicted record at most once a [`LOG_EVERY`].
pub(super) struct EvictionReport {
    /// The store's creation; log times are kept as milliseconds since.
    epoch: Instant,
    /// Milliseconds since `epoch` before which nothing is logged.
    next_log: AtomicU64,
    /// Evictions since the last log line.
    since_log: AtomicU64,
}

impl EvictionReport {
    pub(super) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            next_log: AtomicU64::new(0),
            since_log: AtomicU64::new(0),
        }
    }

    /// Reports `evicted` records, the youngest of which completed at `youngest`.
    pub(super) fn evicted(&self, evicted: u64, youngest: Instant, now: Instant) {
        #[cfg(feature = "metrics")]
        metrics::counter!("idempotency_memory_evictions_total").increment(evicted);
        let since_log = self.since_log.fetch_add(evicted, Ordering::Relaxed) + evicted;
        let at = u64::try_from(now.duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX);
        let next = self.next_log.load(Ordering::Relaxed);
        let due = at >= next
            && self
                .next_log
                .compare_exchange(
                    next,
                    at.saturating_add(LOG_EVERY.as_millis() as u64),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if due {
            // Another thread may add between the two steps; its count goes to the next line.
            self.since_log.fetch_sub(since_log, Ordering::Relaxed);
            tracing::warn!(
                target: "tower_idempotency",
                evicted = since_log,
                youngest_evicted_age_secs = now.duration_since(youngest).as_secs(),
                "in-memory idempotency store is full: evicted the oldest completed records; \
                 retries of requests older than youngest_evicted_age_secs run again"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shard 3 of the queue: keys whose first byte is 3.
    const SHARD: usize = 3;

    fn entry(n: u8, completed_at: Instant, expires_at: Instant) -> Completion {
        let mut key = [n; 32];
        key[0] = SHARD as u8;
        Completion {
            completed_at,
            expires_at,
            key: StoreKey(key),
        }
    }

    fn keys_left(queue: &CompletionQueue) -> Vec<u8> {
        CompletionQueue::lock(&queue.shards[SHARD])
            .iter()
            .map(|entry| entry.key.0[1])
            .collect()
    }

    /// A queue holding, in completion order: a live entry (1), one that expired before `now`
    /// (2), one that expires exactly at `now` (3) and another live one (4).
    fn queue_with_expired_entries_behind_a_live_front(now: Instant) -> CompletionQueue {
        let queue = CompletionQueue::new(WhenFull::EvictOldest);
        let start = now - Duration::from_secs(10);
        let later = now + Duration::from_secs(60);
        queue.push(entry(1, start, later));
        queue.push(entry(2, start, now - Duration::from_secs(1)));
        queue.push(entry(3, start, now));
        queue.push(entry(4, start, later));
        queue
    }

    #[test]
    fn trim_drops_expired_entries_at_the_front_and_keeps_live_ones() {
        let now = Instant::now();
        let start = now - Duration::from_secs(10);
        let queue = CompletionQueue::new(WhenFull::EvictOldest);
        queue.push(entry(1, start, now - Duration::from_secs(1)));
        queue.push(entry(2, start, now));
        queue.push(entry(3, start, now + Duration::from_secs(60)));
        queue.push(entry(4, start, now + Duration::from_secs(1)));
        queue.trim(SHARD, now, usize::MAX);
        assert_eq!(
            keys_left(&queue),
            [3, 4],
            "entries expired (at or before now) at the front go, live ones stay"
        );
    }

    #[test]
    fn trim_keeps_expired_entries_behind_a_live_front_up_to_the_threshold() {
        let now = Instant::now();
        let queue = queue_with_expired_entries_behind_a_live_front(now);
        queue.trim(SHARD, now, 4);
        assert_eq!(keys_left(&queue), [1, 2, 3, 4], "4 entries, threshold 4");
    }

    #[test]
    fn trim_drops_every_expired_entry_past_the_threshold() {
        let now = Instant::now();
        let queue = queue_with_expired_entries_behind_a_live_front(now);
        queue.trim(SHARD, now, 3);
        assert_eq!(
            keys_left(&queue),
            [1, 4],
            "4 entries, threshold 3: the expired ones go, the one expiring at now with them"
        );
    }
}
