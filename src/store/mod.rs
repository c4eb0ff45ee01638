//! The storage contract: [`IdempotencyStore`] and its backends.
//!
//! A store keeps one *record* per [`StoreKey`]. A record is either **in flight** (a lease held
//! by the request that is running, identified by a [`LeaseToken`] and an expiry) or
//! **completed** (a [`StoredResponse`] kept until its TTL runs out). Every method is a single
//! atomic step on one record; the layer never does check-then-write across two calls.
//!
//! | method | does | must be atomic with respect to |
//! |---|---|---|
//! | [`begin`](IdempotencyStore::begin) | claim a lease if the key is absent, expired, or its lease ran out; else report what is there | every other call on the key |
//! | [`renew`](IdempotencyStore::renew) | push the lease expiry out, only for the token that owns it | `begin`, `complete`, `release` |
//! | [`complete`](IdempotencyStore::complete) | replace the lease with the response, only for the owning token | `begin`, `renew`, `release` |
//! | [`release`](IdempotencyStore::release) | drop the lease, only for the owning token | `begin`, `renew`, `complete` |
//! | [`wait`](IdempotencyStore::wait) | sleep until the record may have changed, or a timeout | nothing (a hint) |
//!
//! Expiry is decided from the timestamps the store keeps (lease expiry, completion time plus
//! TTL), not only by a backend's own eviction: an expired record is never returned as completed
//! and an expired lease never reported as in flight.
//!
//! Backends: [`MemoryStore`] (always), `RedisStore` (feature `redis`), `PostgresStore`
//! (feature `postgres`), `MySqlStore` (feature `mysql`). `examples/custom_store.rs` shows a store
//! of your own.

use std::{error::Error as StdError, fmt, time::Duration};

use async_trait::async_trait;

pub use crate::response::StoredResponse;

mod memory;
pub use memory::{DEFAULT_MAX_BYTES, DEFAULT_MAX_RECORDS, MemoryStore, MemoryStoreBuilder};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
mod redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisStore;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
mod postgres;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::{PostgresStore, TableNameError};

#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
mod mysql;
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use self::mysql::{MySqlStore, MySqlTableNameError};

/// A boxed error, the `source` of a [`StoreError`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Writes 32 bytes as 64 lowercase hex digits.
fn write_hex(bytes: &[u8; 32], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// The key a record is stored under: 32 bytes, a SHA-256 digest.
///
/// The layer derives it from the scope, method, path and idempotency key (and, in the default
/// [`KeyReuse::NewRequest`](crate::KeyReuse::NewRequest) mode, the request fingerprint), so a
/// store never sees a raw idempotency key or credential. Backends that need text use
/// [`to_hex`](Self::to_hex) (64 lowercase hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(pub [u8; 32]);

impl StoreKey {
    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(&self.0, f)
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({self})")
    }
}

/// The fingerprint of a request: SHA-256 over its scope, endpoint, idempotency key and
/// canonical body (see [`crate::fingerprint`]). Two requests are "the same request" exactly when
/// their fingerprints are equal.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(&self.0, f)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// The proof of ownership of a lease: 128 random bits, drawn fresh by every successful
/// [`begin`](IdempotencyStore::begin).
///
/// `renew`, `complete` and `release` act only when the token still owns the lease, so an owner
/// whose lease expired and was taken over can never overwrite or drop the new owner's record.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(pub u128);

impl LeaseToken {
    /// A fresh random token (UUID v4 randomness, from the operating system's generator).
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().as_u128())
    }

    /// The token as 16 big-endian bytes, for backends that store bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// The token from 16 big-endian bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }
}

impl fmt::Debug for LeaseToken {
    // The token is a capability; keep it out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseToken(..)")
    }
}

/// What [`IdempotencyStore::begin`] found.
#[derive(Debug, Clone)]
pub enum Begin {
    /// The key was absent, expired, or its lease had run out: the caller now owns a fresh lease
    /// and must run the request, then `complete` or `release`.
    Acquired(LeaseToken),
    /// Another request holds an unexpired lease on the key.
    InFlight {
        /// The fingerprint the owner began with.
        fingerprint: Fingerprint,
        /// Time left on the owner's lease (a hint for `Retry-After`).
        lease_remaining: Duration,
    },
    /// The key holds a completed, unexpired response.
    Completed {
        /// The fingerprint of the request that produced the response.
        fingerprint: Fingerprint,
        /// The stored response.
        response: StoredResponse,
    },
}

/// What went wrong in a store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The backend could not be reached or answered with an error.
    Unavailable,
    /// The call did not finish within the layer's store timeout.
    Timeout,
    /// The store is at a configured capacity bound and will not take a new record until space
    /// frees (see [`MemoryStoreBuilder::max_records`]).
    Full,
    /// A stored record could not be decoded.
    Corrupt,
}

/// An error from a store call. Keeps its cause as [`source`](StdError::source).
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: &'static str,
    source: Option<BoxError>,
}

impl StoreError {
    /// A new error of `kind` with a short static description.
    pub fn new(kind: StoreErrorKind, message: &'static str) -> Self {
        Self {
            kind,
            message,
            source: None,
        }
    }

    /// A new [`StoreErrorKind::Unavailable`] error caused by `source` (a driver error, say).
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self::new(StoreErrorKind::Unavailable, "store unavailable").with_source(source)
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cause is reported by `source()`, not repeated here.
        f.write_str(self.message)
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// A place to keep idempotency records. See the [module docs](self) for the contract.
///
/// Implement it with [`async_trait`](https://docs.rs/async-trait) (re-exported as
/// [`crate::async_trait`]). All durations are relative; a store turns them into deadlines
/// on its own clock (the in-memory store uses tokio's clock, so tests can pause time; shared
/// stores use the server's clock so that every instance agrees).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Atomically: if `key` is absent, holds an expired completed record, or holds a lease whose
    /// expiry has passed, store a new lease (fresh [`LeaseToken`], expiring `lease` from now,
    /// remembering `fingerprint`) and return [`Begin::Acquired`]. Otherwise report the live
    /// record: [`Begin::InFlight`] or [`Begin::Completed`].
    ///
    /// Errors: [`StoreErrorKind::Full`] when a capacity bound forbids a new record;
    /// [`StoreErrorKind::Unavailable`] when the backend fails.
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError>;

    /// Moves the lease expiry to `lease` from now, only if `token` still owns the lease on
    /// `key`. Returns whether it did.
    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError>;

    /// Replaces the lease with `response`, kept for `ttl` from now, only if `token` still owns
    /// the lease on `key` (an owner whose lease was taken over gets `Ok(false)` and changes
    /// nothing). Returns whether it stored the response.
    ///
    /// A lease past its expiry that no `begin` has taken over yet may go either way: a store
    /// may still accept its owner's `complete` (and `renew`), since finishing late is better
    /// than running twice, or may already have dropped it and answer `Ok(false)`. Whatever it
    /// answers, the next `begin` must agree: `Ok(true)` means the response is replayed,
    /// `Ok(false)` means the key is free. Once another `begin` has acquired the key, the old
    /// token never succeeds again.
    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Removes the lease on `key`, only if `token` still owns it, so that the next request with
    /// the key runs. Returns whether it removed it.
    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError>;

    /// Returns after at most `timeout`, earlier when the store knows that the record for `key`
    /// may have changed (completed or released). Used by waiting duplicates
    /// ([`InFlight::Wait`](crate::InFlight::Wait)) between calls to `begin`.
    ///
    /// The default sleeps for `timeout`; the layer calls it with growing slices (20 ms doubling
    /// to 500 ms), so a store without change notification is polled with backoff.
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        let _ = key;
        tokio::time::sleep(timeout).await;
        Ok(())
    }
}

#[async_trait]
impl<T: IdempotencyStore + ?Sized> IdempotencyStore for std::sync::Arc<T> {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        (**self).begin(key, fingerprint, lease).await
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        (**self).renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        (**self).complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        (**self).release(key, token).await
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        (**self).wait(key, timeout).await
    }
}
