//! [`MemoryStoreBuilder`]: bounds and sweeping.

use std::time::Duration;

use super::eviction::WhenFull;

/// The default record bound: about 1 GB of records with 100-byte bodies.
pub const DEFAULT_MAX_RECORDS: usize = 1_000_000;

/// The default bound on stored response bytes: 1 GiB.
pub const DEFAULT_MAX_BYTES: usize = 1 << 30;

/// The shortest sweep interval: tokio's timer resolution.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(1);

/// Builder for [`MemoryStore`](super::MemoryStore).
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    pub(super) max_records: usize,
    pub(super) max_bytes: usize,
    pub(super) sweep_interval: Duration,
    pub(super) sweep_batch: usize,
    pub(super) background_sweep: bool,
    pub(super) when_full: WhenFull,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_records: DEFAULT_MAX_RECORDS,
            max_bytes: DEFAULT_MAX_BYTES,
            sweep_interval: Duration::from_secs(1),
            sweep_batch: 1024,
            background_sweep: true,
            when_full: WhenFull::default(),
        }
    }
}

impl MemoryStoreBuilder {
    /// The most records (in flight and completed) the store holds. Default: 1,000,000
    /// ([`DEFAULT_MAX_RECORDS`]); `usize::MAX` for no bound. A new key at the bound evicts the
    /// oldest completed record, or with [`WhenFull::Refuse`] fails with
    /// [`StoreErrorKind::Full`](crate::store::StoreErrorKind::Full) (see
    /// [`when_full`](Self::when_full)).
    pub fn max_records(mut self, max: usize) -> Self {
        self.max_records = max;
        self
    }

    /// The most stored response bytes (bodies plus headers, see
    /// [`StoredResponse::weight`](crate::StoredResponse::weight)). Default: 1 GiB
    /// ([`DEFAULT_MAX_BYTES`]); `usize::MAX` for no bound. Checked when a record begins, so a
    /// completion may pass it by its own response; a new key at or past it evicts the oldest
    /// completed records until the stored bytes are below it, or with [`WhenFull::Refuse`]
    /// fails with [`StoreErrorKind::Full`](crate::store::StoreErrorKind::Full) (see
    /// [`when_full`](Self::when_full)).
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max;
        self
    }

    /// What a new key does when [`max_records`](Self::max_records) or
    /// [`max_bytes`](Self::max_bytes) is reached. Default: [`WhenFull::EvictOldest`], which
    /// evicts the oldest completed records (never a lease) and refuses the new key with
    /// [`StoreErrorKind::Full`](crate::store::StoreErrorKind::Full) only when every record is
    /// in flight; [`WhenFull::Refuse`] refuses every new key until records expire.
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// How often the background sweeper looks for expired records. Default: 1 s; at least
    /// 1 ms (a shorter interval, zero included, counts as 1 ms).
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval.max(MIN_SWEEP_INTERVAL);
        self
    }

    /// Whether a background task sweeps every
    /// [`sweep_interval`](Self::sweep_interval). Default: `true`. With `false`, expired
    /// records are still never returned, and only
    /// [`MemoryStore::sweep`](super::MemoryStore::sweep) (called on your own schedule) or a
    /// `begin` at the record bound reclaims them.
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
}
