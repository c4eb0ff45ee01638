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
//! Backends: [`MemoryStore`] (always), `RedisStore` (feature `redis`; on Redis Cluster with
//! feature `redis-cluster`), `PostgresStore` (feature `postgres`), `MySqlStore` (feature
//! `mysql`). `examples/custom_store.rs` shows a store of your own.

use std::{error::Error as StdError, fmt, time::Duration};

use async_trait::async_trait;

pub use crate::response::StoredResponse;

mod memory;
pub use memory::{
    DEFAULT_MAX_BYTES, DEFAULT_MAX_RECORDS, MemoryStore, MemoryStoreBuilder, WhenFull,
};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
mod redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisDurability, RedisStore};

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
mod postgres;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::PostgresStore;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use crate::TransactionalError;

#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
mod mysql;
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use self::mysql::MySqlStore;

mod error;
pub use error::{StoreError, StoreErrorKind};

#[cfg(any(feature = "postgres", feature = "mysql"))]
mod sql;
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod table_name;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod wait;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use table_name::TableNameError;

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
    /// A fresh random token: 128 bits from `rand`'s `ThreadRng`, a cryptographically secure
    /// generator (ChaCha12) per thread, seeded from the operating system's generator on first
    /// use and reseeded after every 64 KiB of output. Drawing one makes no system call (the
    /// operating system's generator cost a system call per token).
    ///
    /// # Panics
    ///
    /// When the operating system's generator fails on a thread's first draw (as drawing from it
    /// directly would).
    pub fn random() -> Self {
        Self(rand::random())
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

/// A place to keep idempotency records. See the [module docs](self) for the contract.
///
/// The trait uses [`async_trait`](https://docs.rs/async-trait) (re-exported as
/// [`crate::async_trait`]) so that it stays usable as `Arc<dyn IdempotencyStore>`; the
/// signatures below are what that macro expands to. Write the methods as plain `async fn`s:
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{
///     async_trait,
///     store::{Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreError, StoreKey, StoredResponse},
/// };
///
/// struct MyStore; // a connection pool, say
///
/// #[async_trait]
/// impl IdempotencyStore for MyStore {
///     async fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration)
///         -> Result<Begin, StoreError> { todo!("insert a lease if absent or expired, else report") }
///     async fn renew(&self, key: &StoreKey, token: LeaseToken, lease: Duration)
///         -> Result<bool, StoreError> { todo!("move the expiry, if `token` owns the lease") }
///     async fn complete(&self, key: &StoreKey, token: LeaseToken, response: &StoredResponse, ttl: Duration)
///         -> Result<bool, StoreError> { todo!("store the response, if `token` owns the lease") }
///     async fn release(&self, key: &StoreKey, token: LeaseToken)
///         -> Result<bool, StoreError> { todo!("drop the lease, if `token` owns it") }
///     // `wait` has a default (sleep); override it if the store can notify.
/// }
/// ```
///
/// `examples/custom_store.rs` is a whole store (about 70 lines of logic, with its comments and
/// a `main` to try it), and
/// `testing::conformance::run_all` (feature `testing`) checks one against
/// the whole contract in one call. All durations are relative; a store turns them into
/// deadlines on its own clock (the in-memory store uses tokio's clock, so tests can pause time;
/// shared stores use the server's clock so that every instance agrees). The lease time left
/// that [`Begin::InFlight`] reports is only a hint for `Retry-After`: the deadline minus now,
/// on the store's clock.
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
    ///
    /// The layer calls `complete` again after an error (durable completion), so a call whose
    /// reply was lost is repeated by the same owner. A repeat by the token that already
    /// completed the record may answer `Ok(true)` (a store that remembers the completing token,
    /// as `RedisStore` does with `wait_replicas`, where the repeat is how an unacknowledged
    /// write gets acknowledged) or `Ok(false)`; either way it must not change the stored
    /// response.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_tokens_differ_within_and_across_threads() {
        let mut seen: std::collections::HashSet<u128> =
            (0..10_000).map(|_| LeaseToken::random().0).collect();
        assert_eq!(seen.len(), 10_000);
        // Each thread seeds its own generator: no thread repeats another's tokens.
        let others: Vec<u128> = (0..4)
            .map(|_| std::thread::spawn(|| LeaseToken::random().0))
            .map(|thread| thread.join().unwrap())
            .collect();
        for token in others {
            assert!(seen.insert(token), "a token drawn twice");
        }
        // Neither half is constant.
        let (a, b) = (LeaseToken::random().0, LeaseToken::random().0);
        assert_ne!(a >> 64, b >> 64);
        assert_ne!(a as u64, b as u64);
    }

    #[test]
    fn store_key_is_64_lowercase_hex_digits() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xab;
        bytes[1] = 0x05;
        bytes[31] = 0xff;
        let key = StoreKey(bytes);
        let hex = format!("ab05{}ff", "00".repeat(29));
        assert_eq!(key.to_hex(), hex);
        assert_eq!(key.to_string(), hex);
        assert_eq!(format!("{key:?}"), format!("StoreKey({hex})"));
        let fingerprint = Fingerprint(bytes);
        assert_eq!(fingerprint.to_string(), hex);
        assert_eq!(format!("{fingerprint:?}"), format!("Fingerprint({hex})"));
    }

    #[test]
    fn lease_token_bytes_are_big_endian_and_its_debug_hides_it() {
        let token = LeaseToken(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        let bytes: [u8; 16] = std::array::from_fn(|i| i as u8 + 1);
        assert_eq!(token.to_bytes(), bytes);
        assert_eq!(LeaseToken::from_bytes(bytes), token);
        assert_eq!(format!("{token:?}"), "LeaseToken(..)");
    }

    /// A store with only the required methods: `wait` is the trait's default.
    struct Plain;

    #[async_trait]
    impl IdempotencyStore for Plain {
        async fn begin(
            &self,
            _: &StoreKey,
            _: &Fingerprint,
            _: Duration,
        ) -> Result<Begin, StoreError> {
            unreachable!("not called")
        }
        async fn renew(
            &self,
            _: &StoreKey,
            _: LeaseToken,
            _: Duration,
        ) -> Result<bool, StoreError> {
            unreachable!("not called")
        }
        async fn complete(
            &self,
            _: &StoreKey,
            _: LeaseToken,
            _: &StoredResponse,
            _: Duration,
        ) -> Result<bool, StoreError> {
            unreachable!("not called")
        }
        async fn release(&self, _: &StoreKey, _: LeaseToken) -> Result<bool, StoreError> {
            unreachable!("not called")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_default_wait_sleeps_the_whole_timeout() {
        let start = tokio::time::Instant::now();
        Plain
            .wait(&StoreKey([0; 32]), Duration::from_millis(320))
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(320));
    }
}

#[cfg(all(test, any(feature = "postgres", feature = "redis")))]
mod test_services;
