//! [`RedisStore`]: records in Redis, one hash per key, every call one Lua script.

use std::{fmt, sync::Arc, time::Duration};

use redis::{
    RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

/// The longest pause between two tries to reconnect a broken connection: 500 ms.
const RECONNECT_MAX_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

mod calls;
mod connection;
mod durability;
mod eval;
mod notify;
mod scripts;

use connection::Connection;
pub use durability::RedisDurability;
use durability::{WaitReplicas, read_durability};
use notify::{Publish, Subscriber};
use scripts::millis;

use super::{StoreError, StoreKey};

/// The default key prefix.
const DEFAULT_PREFIX: &str = "idempotency:";

/// A store in Redis, for services that run as several instances: every instance sees every
/// record, and leases and TTLs run on the Redis server's clock, so instances need not agree on
/// the time.
///
/// One server ([`open`](Self::open), on the `redis` crate's [`ConnectionManager`], which
/// multiplexes calls over one connection and reconnects by itself) or a Redis Cluster
/// ([`open_cluster`](Self::open_cluster), feature `redis-cluster`, on the crate's cluster client,
/// which follows `MOVED` and `ASK` and refreshes its slot map after a failover). While Redis cannot
/// be reached, calls fail with [`StoreErrorKind::Unavailable`](super::StoreErrorKind::Unavailable)
/// (the driver error is the [`source`](std::error::Error::source): "connection refused", a `MOVED`
/// reply, an I/O error) and the layer answers `503` (see [`StoreFailure`](crate::StoreFailure)).
/// Needs Redis 5 or later (or Valkey).
///
/// ```no_run
/// # async fn run() -> Result<(), tower_idempotency::store::StoreError> {
/// use tower_idempotency::{IdempotencyLayer, store::RedisStore};
///
/// let store = RedisStore::open("redis://127.0.0.1:6379").await?.prefix("billing:idem:");
/// let layer = IdempotencyLayer::new().post("/calls").store(store);
/// # let _ = layer; Ok(()) }
/// ```
///
/// # What survives, and what does not
///
/// The handler runs at most once per record *while Redis keeps the record*. A record that
/// Redis forgets is a free key, and a retry with it runs the handler again.
///
/// - **Restarts** depend on the server's persistence, which the store reads when it opens
///   ([`durability`](Self::durability), see [`RedisDurability`]): without persistence a
///   restart forgets every record; with RDB snapshots only, the records since the last
///   snapshot; with AOF and `appendfsync everysec`, a restart of the Redis process loses
///   nothing and a crash of the machine up to about a second of records. When records would
///   not survive a restart, or the settings cannot be read, [`open`](Self::open) logs one
///   warning (`tracing`, target `tower_idempotency`).
/// - **Failovers.** Redis replicates asynchronously: a replica promoted after its master
///   died lacks the writes it had not received, so a lease or a stored response that a client
///   has already seen can be forgotten, and the retry runs again. With
///   [`wait_replicas`](Self::wait_replicas), `begin` and `complete` succeed only once that
///   many replicas have the write (`WAIT`), so a failover to one of them forgets neither.
///   `WAIT` does not make Redis strongly consistent: a failover to a replica that did not
///   acknowledge (if there are more replicas than you wait for), or a failover during a
///   network partition, can still lose the write.
///
/// # Timeouts
///
/// The store sets no response timeout of its own: the layer's
/// [`store_timeout`](crate::IdempotencyLayer::store_timeout) (2 s by default) governs every
/// call. [`open`](Self::open) and [`open_cluster`](Self::open_cluster) switch off the `redis`
/// crate's response timeout (500 ms by default for the connection manager), which would
/// otherwise fail every call slower than half a second. A call that the layer stops waiting
/// for keeps its place on the connection, and its reply is dropped when it comes. A server
/// that never answers (a dead peer that sends no TCP reset) holds calls until the operating
/// system gives the connection up; the layer answers `503` after its store timeout meanwhile,
/// and the connection manager reconnects once the connection fails. A `begin` that fails
/// without an answer releases the lease it may have taken, queued behind it. If you build
/// the connection yourself ([`new`](Self::new), [`from_cluster`](Self::from_cluster)), give
/// it no response timeout shorter than the layer's store timeout, or the shorter one governs.
///
/// # Data layout
///
/// One hash per record, at `<prefix><key>`: the [prefix](Self::prefix) (default
/// `idempotency:`) followed by the [`StoreKey`] as 64 lowercase hex digits. Its fields:
///
/// | field | value | present |
/// |---|---|---|
/// | `f` | the fingerprint, 32 raw bytes | always |
/// | `d` | the deadline, milliseconds since the Unix epoch on the server's clock, in decimal: the lease expiry while in flight, completion time plus TTL once completed | always |
/// | `t` | the lease token, 16 raw bytes | in flight |
/// | `r` | the response, [`StoredResponse::encode`](crate::StoredResponse::encode)d: status, headers and body as length-prefixed binary | completed |
/// | `c` | the token that completed the record, 16 raw bytes, so that the owner's repeated `complete` is told from a stranger's (see [`wait_replicas`](Self::wait_replicas)) | completed |
/// | `w` | `1`: a request waits for the lease, so `complete` and `release` publish (see [Waiting duplicates](Self#waiting-duplicates)) | in flight, once a request waits |
///
/// Nothing is base64 or JSON: a completed record with a 100-byte body and two short headers
/// holds 255 bytes of values, and took 656 bytes of Redis memory in all (`MEMORY USAGE`,
/// Redis 7.0, x86_64).
///
/// Every script touches exactly one key, the record's, passed in `KEYS`, so on a cluster each
/// call goes to the one master that holds the key's slot.
///
/// # Round trips
///
/// | call | round trips | what runs on the server |
/// |---|---|---|
/// | `begin` | 1 | one script: read the record; if absent or past its deadline, write a new lease (with [`wait_replicas`](Self::wait_replicas): followed by `WAIT` in the same round trip) |
/// | `complete` | 1 | one script: compare the token, write the response and its deadline; if a request waits for the record, publish an empty message on its channel (with `wait_replicas`: followed by `WAIT`) |
/// | `renew` | 1 | one script: compare the token, move the deadline |
/// | `release` | 1 | one script: compare the token, delete the key (and publish, as `complete`) |
/// | `wait` | 2 on the subscriber connection and the store's | `SUBSCRIBE` (`SSUBSCRIBE` on a cluster), then a script that marks the lease as waited for (field `w`); `UNSUBSCRIBE` when the last waiter of the key leaves (see [Waiting duplicates](Self#waiting-duplicates)) |
///
/// # Waiting duplicates
///
/// A request that waits for a duplicate in flight ([`InFlight::Wait`](crate::InFlight::Wait))
/// is woken as soon as the record completes or its lease is released, on whichever instance
/// that happens:
///
/// - `complete` and `release` publish an empty message in the same script, on a channel named
///   as the record's key (`<prefix><64 hex digits of the StoreKey>`: only the key's digest,
///   never a raw idempotency key): `PUBLISH` on one server, `SPUBLISH` on a cluster, where the
///   message stays on the shard that holds the key's slot (Redis 7 or later).
/// - A store made by [`open`](Self::open) or [`open_cluster`](Self::open_cluster) has one
///   subscriber connection of its own (RESP3, which needs Redis 6 or later; shared by clones),
///   subscribed only to the channels of keys that requests of this instance wait for, and
///   only while they wait. A waiter subscribes (confirmed by the server), then marks the lease
///   as waited for (field `w`, by a script that also tells it whether the lease is still there,
///   so that a change between its `begin` and the subscription is not missed), then waits for
///   a message or the end of its pause. `complete` and `release` publish only for a lease so
///   marked.
/// - While the subscriber connection is down, waiters look at the store again after each of
///   the layer's pauses (20 ms doubling to 500 ms), as without notification; when it drops,
///   every waiter of this instance looks at once (messages may have been lost). On one
///   server it reconnects by itself (pauses of at most 500 ms) and subscribes again (tested:
///   subscriber connection killed, Redis killed and started again). On a cluster, reconnection
///   is the `redis` crate's cluster client's; a failover or slot move of the subscriber's
///   shard has not been tested here: waiters poll if it does not come back.
/// - Requests that nobody waits for publish nothing, and pay only the read of one more hash
///   field in the scripts they run anyway (`benches/notify.rs`: within the noise). Publishing on
///   every `complete` cost 11 and 14% of `begin` + `complete` throughput from one task on a
///   local cluster in two runs, where `SPUBLISH` is forwarded to the shard's replicas.
///
/// Measured on loopback (two layers, each with its own store, `tests/wait_notification.rs`):
/// the waiter's replay comes a median of under 1 ms after the first response, where polling
/// took up to 500 ms. A lease that runs out (its owner crashed) is not announced: waiters find
/// it at their next look. [`new`](Self::new) and [`from_cluster`](Self::from_cluster) stores
/// have no subscriber connection: their waiters poll (and mark nothing), and their `complete`
/// and `release` still publish for records that waiters on other instances marked. If opening
/// the subscriber connection fails (Redis 5, say), `open` logs a warning and the store polls.
/// [`notify(false)`](Self::notify) turns publishing and subscribing off.
///
/// # Scripts
///
/// Scripts run by `EVALSHA`; on a server that has not seen a script (after a restart, a
/// failover or `SCRIPT FLUSH`), the call is sent once more with `EVAL` and the source.
///
/// # Expiry
///
/// Every script reads the server's clock (`TIME`) and decides from the stored deadline `d`:
/// a record past it is never replayed, and a lease past it is taken over by the next `begin`.
/// Redis reclaims the memory through key expiry (`PEXPIRE`): a completed record's key expires
/// with its TTL; an in-flight key lives twice its lease, so that an owner which finishes late
/// (its renewals failed) can still complete while nobody has taken the key over.
/// Durations are written in whole milliseconds, rounded up, at least 1 ms and at most 100
/// years.
///
/// Cloning is cheap; clones share the connection.
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
pub struct RedisStore {
    conn: Connection,
    prefix: Arc<str>,
    wait: Option<WaitReplicas>,
    durability: Option<RedisDurability>,
    /// What `complete` and `release` publish.
    publish: Publish,
    /// The publish command when notification is on: `PUBLISH`, or `SPUBLISH` on a cluster.
    publish_on: Publish,
    /// The subscriber connection, when the store opened its own connections.
    subscriber: Option<Arc<Subscriber>>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.conn {
            Connection::Single(_) => "single",
            #[cfg(feature = "redis-cluster")]
            Connection::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("connection", &kind)
            .field("prefix", &self.prefix)
            .field("wait", &self.wait)
            .field("durability", &self.durability)
            .field("notify", &(self.publish != Publish::Off))
            .field("subscriber", &self.subscriber.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    fn with_connection(conn: Connection) -> Self {
        let publish = match conn {
            Connection::Single(_) => Publish::Plain,
            #[cfg(feature = "redis-cluster")]
            Connection::Cluster(_) => Publish::Sharded,
        };
        Self {
            conn,
            prefix: Arc::from(DEFAULT_PREFIX),
            wait: None,
            durability: None,
            publish,
            publish_on: publish,
            subscriber: None,
        }
    }

    /// A store that subscribes on `subscriber`, or polls (with a warning) if it could not be
    /// connected.
    fn with_subscriber(mut self, subscriber: RedisResult<Arc<Subscriber>>) -> Self {
        match subscriber {
            Ok(subscriber) => self.subscriber = Some(subscriber),
            Err(error) => tracing::warn!(
                target: "tower_idempotency",
                %error,
                "could not open the Redis connection that wakes waiting duplicates (RESP3 \
                 pub/sub needs Redis 6 or later); requests waiting for a duplicate in flight \
                 poll instead"
            ),
        }
        self
    }

    /// Whether `complete` and `release` publish a message when a record completes or its lease
    /// is dropped, and whether requests waiting for a duplicate in flight
    /// ([`InFlight::Wait`](crate::InFlight::Wait)) listen for it. Default: on.
    ///
    /// On, a waiting request on any instance learns of the change within a network round trip
    /// (see [Waiting duplicates](Self#waiting-duplicates)); off, it looks at the store again
    /// after pauses of 20 ms doubling to 500 ms. Every instance sharing the records should
    /// publish: an instance with notification off does not wake the waiters of the others
    /// (they then find its results by polling).
    pub fn notify(mut self, on: bool) -> Self {
        self.publish = if on { self.publish_on } else { Publish::Off };
        self
    }

    /// A store on `conn`, with the default prefix `idempotency:`. Does not read the server's
    /// persistence settings (call [`check_durability`](Self::check_durability) for that), and
    /// keeps `conn`'s response timeout (see [Timeouts](Self#timeouts)).
    pub fn new(conn: ConnectionManager) -> Self {
        Self::with_connection(Connection::Single(conn))
    }

    /// Connects to `url` (`redis://[user:password@]host:port/db`, `rediss://` for TLS when the
    /// `redis` crate has a TLS feature enabled) with a [`ConnectionManager`] of default settings
    /// except for the response timeout, which is off (the layer's store timeout governs), reads the
    /// server's persistence settings ([`check_durability`](Self::check_durability)), and returns a
    /// store with the default prefix.
    ///
    /// Returns once connected. Errors with
    /// [`StoreErrorKind::Unavailable`](super::StoreErrorKind::Unavailable), the driver error as its
    /// source, if the URL is invalid, or if the server cannot be reached within the connection
    /// manager's retries (6 tries, 100 ms apart doubling to at most 500 ms, each with the driver's
    /// connection timeout; build a [`ConnectionManager`] with your own `ConnectionManagerConfig`
    /// and use [`new`](Self::new) to choose otherwise). Neither the error's message nor its source
    /// contains the URL.
    ///
    /// The same retries reconnect a connection that broke: with the pause between tries capped
    /// at 500 ms, a store that comes back is used again within about half a second, so that an
    /// owner still holding a lease can store its response before the lease runs out (the
    /// driver's default, doubling without a cap, could leave an instance disconnected for about
    /// 6 s after Redis was back).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(StoreError::unavailable)?;
        let subscriber = Subscriber::single(&client, RECONNECT_MAX_DELAY).await;
        Ok(Self::new(conn)
            .with_subscriber(subscriber)
            .check_durability()
            .await)
    }

    /// A store on a Redis Cluster connection, with the default prefix. Does not read the
    /// masters' persistence settings (call [`check_durability`](Self::check_durability) for
    /// that).
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn from_cluster(conn: redis::cluster_async::ClusterConnection) -> Self {
        Self::with_connection(Connection::Cluster(conn))
    }

    /// Connects to the Redis Cluster that `nodes` belong to (one or more seed URLs,
    /// `redis://host:port`; the others are found from them) with the `redis` crate's cluster
    /// client of default settings (no response timeout: the layer's store timeout governs),
    /// reads the masters' persistence settings, and returns a store with the default prefix.
    ///
    /// Each record is one key, and each call one script on that key, so each call goes to the
    /// master that holds the key's slot; after a failover the client refreshes its slot map and
    /// follows `MOVED`, with no restart of the application. Errors with
    /// [`StoreErrorKind::Unavailable`](super::StoreErrorKind::Unavailable) (driver error as source)
    /// if a URL is invalid or no seed node answers.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub async fn open_cluster<S: AsRef<str>>(
        nodes: impl IntoIterator<Item = S>,
    ) -> Result<Self, StoreError> {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        let client = redis::cluster::ClusterClient::new(nodes.iter().map(String::as_str))
            .map_err(StoreError::unavailable)?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(StoreError::unavailable)?;
        let subscriber = Subscriber::cluster(&nodes).await;
        Ok(Self::from_cluster(conn)
            .with_subscriber(subscriber)
            .check_durability()
            .await)
    }

    /// Reads the server's persistence settings (`CONFIG GET appendonly`, `appendfsync`,
    /// `save`; on a cluster, those of every master, keeping the weakest), keeps them for
    /// [`durability`](Self::durability), and logs one warning (`tracing`, target
    /// `tower_idempotency`) when records would not survive a restart of Redis, or when the
    /// settings cannot be read. [`open`](Self::open) and [`open_cluster`](Self::open_cluster)
    /// call it; never fails.
    pub async fn check_durability(mut self) -> Self {
        let (durability, error) = read_durability(&mut self.conn).await;
        match (durability, error) {
            (RedisDurability::Unknown, Some(error)) => tracing::warn!(
                target: "tower_idempotency",
                error = %error,
                "could not tell whether Redis keeps idempotency records across a restart \
                 (CONFIG GET failed); if it does not, a retry after a restart runs the request again"
            ),
            (durability, _) if !durability.survives_restart() => tracing::warn!(
                target: "tower_idempotency",
                ?durability,
                "Redis forgets idempotency records on a restart (no append-only file: all of \
                 them without persistence, those since the last snapshot with RDB); a retry \
                 after a restart runs the request again"
            ),
            _ => {}
        }
        self.durability = Some(durability);
        self
    }

    /// What the server's persistence settings mean for the records, as read when the store
    /// opened; `None` if they were never read ([`new`](Self::new) and
    /// [`from_cluster`](Self::from_cluster) without [`check_durability`](Self::check_durability)).
    pub fn durability(&self) -> Option<RedisDurability> {
        self.durability
    }

    /// The prefix of every key this store writes. Default: `idempotency:`. Give each
    /// application (or each test run) sharing a Redis its own.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    /// The key prefix in use.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// Makes `begin` and `complete` wait until `replicas` replicas have their write
    /// (`WAIT replicas timeout`, sent in the same round trip as the write, on the same
    /// connection), so that a failover to one of those replicas forgets neither a lease nor
    /// a stored response that a client has seen. Default: off (Redis replicates
    /// asynchronously, and a failover may lose the last writes). `timeout` is rounded up to
    /// whole milliseconds, at least 1 ms; `replicas` of 0 turns waiting off.
    ///
    /// When fewer than `replicas` acknowledge within `timeout`:
    ///
    /// - `begin` that took a lease releases it (token-checked, so only its own lease) and fails
    ///   with [`StoreErrorKind::Unavailable`](super::StoreErrorKind::Unavailable): the request is
    ///   answered `503` and its handler does not run, so nothing runs on a lease a failover could
    ///   forget.
    /// - `complete` fails with [`StoreErrorKind::Unavailable`](super::StoreErrorKind::Unavailable);
    ///   the response is stored on the master, and the layer tries `complete` again. That repeated
    ///   `complete` by the same owner (same token) waits again and returns `Ok(true)` once
    ///   acknowledged; this is the one place where this store answers a second `complete` with the
    ///   same token `true` (without `wait_replicas` it answers `false`, as the store contract
    ///   says), and it changes nothing in the record.
    ///
    /// The source of either error says how many replicas acknowledged. A `begin` that finds
    /// the record in flight or completed does not fail for missing acknowledgements.
    /// `renew` and `release` never wait: a failover that loses one makes the lease last
    /// shorter, or longer up to its deadline.
    ///
    /// The calls take up to `timeout` longer when replicas lag: keep the layer's
    /// [`store_timeout`](crate::IdempotencyLayer::store_timeout) above `timeout` plus a
    /// round trip. On a cluster, `WAIT` goes to the master that took the write and counts its
    /// replicas.
    pub fn wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait = (replicas > 0).then(|| WaitReplicas {
            replicas,
            timeout_ms: millis(timeout),
        });
        self
    }

    fn redis_key(&self, key: &StoreKey) -> String {
        format!("{}{}", self.prefix, key.to_hex())
    }
}
