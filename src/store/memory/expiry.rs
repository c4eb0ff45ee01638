//! The expiry index: every deadline the store hands out, so that a sweep reads only the
//! records that are due, never the live ones.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    sync::{Mutex, MutexGuard},
};

use tokio::time::Instant;

use crate::store::StoreKey;

/// Shards of the index; a record's shard is chosen by the first byte of its key.
pub(super) const SHARDS: usize = 16;

/// A min-heap of (deadline, key).
type Shard = BinaryHeap<Reverse<(Instant, StoreKey)>>;

/// A min-heap of (deadline, key) per shard. Entries whose record has since moved on (renewed,
/// completed, released, taken over) are not removed when that happens: a sweep skips them, and
/// [`compact`](Self::compact) drops them once they outnumber the records by far.
pub(super) struct ExpiryIndex {
    shards: Vec<Mutex<Shard>>,
}

impl ExpiryIndex {
    pub(super) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(BinaryHeap::new())).collect(),
        }
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds `key`'s new deadline.
    pub(super) fn schedule(&self, key: StoreKey, deadline: Instant) {
        self.lock(key.0[0] as usize % SHARDS)
            .push(Reverse((deadline, key)));
    }

    /// Takes up to `batch` entries whose deadline is at or before `now` off the index.
    pub(super) fn take_due(&self, now: Instant, batch: usize) -> Vec<StoreKey> {
        let mut due = Vec::new();
        for shard in 0..SHARDS {
            let mut heap = self.lock(shard);
            while due.len() < batch {
                match heap.peek() {
                    Some(Reverse((deadline, _))) if *deadline <= now => {
                        let Reverse((_, key)) = heap.pop().expect("peeked");
                        due.push(key);
                    }
                    _ => break,
                }
            }
        }
        due
    }

    /// Drops the entries of shard `shard` for which `in_use(key, deadline)` is false, once the
    /// shard holds more than `threshold` entries. A lease released at once (a 5xx, a response
    /// too large) leaves its entry until the lease's deadline; without this, a caller sending
    /// unique keys whose requests fail would grow the index past the store's bounds for as long
    /// as a lease lasts. The shard is not locked while `in_use` runs (it reads the map, and the
    /// store takes a shard lock while it holds a map entry); entries scheduled meanwhile are
    /// kept.
    pub(super) fn compact(
        &self,
        shard: usize,
        threshold: usize,
        in_use: impl Fn(&StoreKey, Instant) -> bool,
    ) {
        let entries = {
            let mut heap = self.lock(shard);
            if heap.len() <= threshold {
                return;
            }
            std::mem::take(&mut *heap).into_vec()
        };
        let live: Vec<_> = entries
            .into_iter()
            .filter(|Reverse((deadline, key))| in_use(key, *deadline))
            .collect();
        self.lock(shard).extend(live);
    }

    /// Entries held, stale ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        (0..SHARDS).map(|shard| self.lock(shard).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn take_due_takes_at_most_a_batch_and_leaves_the_rest_for_the_next() {
        let index = ExpiryIndex::new();
        let now = Instant::now();
        for n in 0..5u8 {
            // Two shards, so that the batch ends within the second one.
            index.schedule(
                StoreKey([n % 2; 32]),
                now - Duration::from_secs(u64::from(n)),
            );
        }
        index.schedule(StoreKey([9; 32]), now + Duration::from_secs(1));
        assert_eq!(index.take_due(now, 3).len(), 3);
        assert_eq!(
            index.take_due(now, 3).len(),
            2,
            "the rest of the due entries"
        );
        assert!(index.take_due(now, 3).is_empty(), "the last one is not due");
        assert_eq!(index.len(), 1);
    }
}
