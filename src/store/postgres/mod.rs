//! [`PostgresStore`]: records in one PostgreSQL table, through an `sqlx` pool.

use std::{fmt, sync::Arc, time::Duration};

use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, postgres::PgPoolOptions};
use tokio::task::JoinHandle;

mod calls;
mod notify;
mod statements;
mod transaction;

use notify::Listener;
use statements::Statements;

use super::{
    StoreError, StoreKey, StoredResponse,
    sql::{self, DEFAULT_TABLE, SqlStore},
    table_name::{TableNameError, validate_table_name},
};
use crate::Lease;

/// A store in a PostgreSQL table, shared by every instance of a service that uses the same
/// database. Built on an [`sqlx`] [`PgPool`]; cloning is cheap and clones share the pool.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency::{IdempotencyLayer, store::PostgresStore};
///
/// let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/app").await?;
/// store.migrate().await?; // once at start-up; a no-op when the table exists
/// let _cleanup = store.spawn_cleanup(std::time::Duration::from_secs(60));
/// let layer = IdempotencyLayer::new().store(store).post("/calls");
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// # Schema
///
/// [`migrate`](Self::migrate) creates one table (default name `idempotency_records`, see
/// [`with_table_name`](Self::with_table_name)) and one index:
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS "idempotency_records" (
///     key          bytea       PRIMARY KEY,  -- StoreKey, 32 bytes
///     fingerprint  bytea       NOT NULL,     -- Fingerprint, 32 bytes
///     state        text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
///     token        bytea,                    -- LeaseToken, 16 bytes; NULL once completed
///     expires_at   timestamptz NOT NULL,     -- in flight: lease expiry; completed: end of TTL
///     response     bytea,                    -- StoredResponse::encode; NULL while in flight
///     created_at   timestamptz NOT NULL,     -- when the current lease was taken
///     completed_at timestamptz,              -- when the response was stored
///     waited       boolean     NOT NULL DEFAULT false, -- a request waits for the lease
///     CHECK ((state = 'in_flight') = (token IS NOT NULL AND response IS NULL))
/// );
/// CREATE INDEX IF NOT EXISTS "idempotency_records_expires_at_idx"
///     ON "idempotency_records" (expires_at);
/// ```
///
/// Keys, fingerprints and tokens are the raw bytes of [`StoreKey`],
/// [`Fingerprint`](super::Fingerprint) and [`LeaseToken`](super::LeaseToken); responses use the
/// compact binary [`StoredResponse::encode`] format, so binary bodies and non-UTF-8 header values
/// are kept exactly. You may create the table yourself (with your migration tool) instead of
/// calling `migrate`, as long as it has these columns.
///
/// # Round trips
///
/// | call | statement | round trips | writes |
/// |---|---|---|---|
/// | [`begin`](super::IdempotencyStore::begin), new or expired key | one statement: read the live row, else `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE <expired>` | 1 | one row |
/// | [`begin`](super::IdempotencyStore::begin), replay or in flight | the same statement | 1 | nothing (a plain read) |
/// | [`renew`](super::IdempotencyStore::renew) | one token-checked `UPDATE` | 1 | one row |
/// | [`complete`](super::IdempotencyStore::complete) | one token-checked `UPDATE` (`pg_notify` in it when a request waits) | 1 | one row |
/// | [`release`](super::IdempotencyStore::release) | one token-checked `DELETE` (the same) | 1 | one row |
/// | [`wait`](super::IdempotencyStore::wait) | `LISTEN` on the listener connection, then `UPDATE ... SET waited = true` | 2 (`UNLISTEN` when the last waiter of the key leaves) | one row |
/// | [`delete_expired`](Self::delete_expired) | one `DELETE` per batch | 1 per [`cleanup_batch`](Self::cleanup_batch) rows, plus 1 | the expired rows |
/// | [`migrate`](Self::migrate) | a transaction: advisory lock, `CREATE TABLE`, `ALTER TABLE ... ADD COLUMN IF NOT EXISTS waited`, `CREATE INDEX` | 6 | DDL, once |
///
/// A request that runs thus costs two writes (`begin`, `complete`), each its own autocommit
/// transaction; a replay costs one read.
///
/// **Why `begin` is atomic.** The statement first reads the key's row if its deadline has not
/// passed; if there is one, it reports it and writes nothing. Otherwise it inserts a lease, and
/// on a conflicting row `ON CONFLICT DO UPDATE ... WHERE expires_at <= now()` locks that row
/// (waiting for any concurrent writer) and takes it over only if its latest committed version
/// is expired. The unique key and the row lock make that decision one at a time, so of many
/// concurrent `begin` calls on one key exactly one acquires. A `begin` that lost such a race
/// to a row committed *after* its statement began cannot read that row in the same statement
/// (its snapshot predates it); it then runs the statement once more, which sees it. That
/// second round trip happens only under contention on that very key.
///
/// # Waiting duplicates
///
/// A request that waits for a duplicate in flight ([`InFlight::Wait`](crate::InFlight::Wait))
/// is woken as soon as the record completes or its lease is released, on whichever instance
/// that happens, through `LISTEN`/`NOTIFY`:
///
/// - The store has one listener connection of its own (sqlx's
///   [`PgListener`](sqlx::postgres::PgListener), on a pool of one with the pool's connect
///   options; shared by clones), opened when a request first waits. It listens on the
///   channels of keys that requests of this instance wait for, and only while they wait. A
///   channel is `idempotency_` followed by the first 40 hex digits of the [`StoreKey`]: only the
///   key's digest, never a raw idempotency key.
/// - Once listening, a waiter marks the lease as waited for (`UPDATE ... SET waited = true`,
///   which also tells it whether the lease is still there). `complete` and `release` call
///   `pg_notify` in their own statement only for a row so marked, and the notification is sent
///   when their transaction commits (in the handler's transaction for
///   [`complete_in`](Self::complete_in)). Requests that nobody waits for thus never `NOTIFY`
///   and never take PostgreSQL's commit-time notification lock (which serializes notifying
///   commits: notifying on every `complete` cost 28% of `begin` + `complete` throughput from
///   16 tasks in one run of `benches/notify.rs`).
/// - While the listener's connection is down, waiters look at the table again after each of
///   the layer's pauses (20 ms doubling to 500 ms), as without notification; when it drops,
///   every waiter of this instance looks at once. sqlx reconnects it and listens again.
///
/// Measured on loopback (two layers, each with its own store, `tests/wait_notification.rs`):
/// the waiter's replay comes a median of under 1 ms after the first response, where polling
/// took up to 500 ms. A lease that runs out (its owner crashed) is not announced: waiters find
/// it at their next look. [`notify(false)`](Self::notify) turns it off. Count the listener's
/// connection in the database's `max_connections`.
///
/// # Expiry and clocks
///
/// Every deadline is computed and compared on the **database's** clock (`now()`, the start of
/// the statement's transaction), never the application's, so instances with skewed clocks
/// agree. A record whose `expires_at` has passed is never returned: `begin` takes it over as if
/// the key were absent, whether or not it has been deleted yet. Durations above 100 years are
/// clamped to 100 years.
///
/// A lease past its expiry that nobody has taken over still belongs to its token, so a slow
/// owner can still `complete` (finishing late is better than running twice), as with
/// [`MemoryStore`](super::MemoryStore).
///
/// # Connections
///
/// `begin` runs on the pool you give (or [`connect`](Self::connect) makes). `renew`, `complete`
/// and `release`, the calls of a request that holds a lease, run on a second pool of their own
/// (at most 2 connections by default, [`owner_connections`](Self::owner_connections); opened
/// when needed, closed after a minute unused). After an outage, every client retries at once,
/// and their `begin` calls can fill the main pool's queue for seconds; an owner whose renewal
/// or completion waited behind them could see its lease run out, and a duplicate then run the
/// request a second time. Count these connections in the database's `max_connections`.
///
/// # Cleanup
///
/// Expired rows stay in the table until deleted. [`delete_expired`](Self::delete_expired)
/// deletes them (expired responses and expired leases) in batches of
/// [`cleanup_batch`](Self::cleanup_batch) rows (default 1,000), through the `expires_at` index,
/// skipping rows other transactions hold locked, so it never blocks requests for long.
/// [`spawn_cleanup`](Self::spawn_cleanup) runs it periodically on a tokio task; running it on
/// every instance is safe.
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Lease maintenance (`renew`, `complete`, `release`): owners that hold a lease never queue
    /// behind the `begin` calls of their duplicates.
    owners: PgPool,
    sql: Arc<Statements>,
    cleanup_batch: i64,
    /// Whether `complete` and `release` notify, and waiters listen.
    notify: bool,
    listener: Arc<Listener>,
}

/// The owners' pool's size unless [`PostgresStore::owner_connections`] says otherwise.
const DEFAULT_OWNER_CONNECTIONS: u32 = 2;

/// A pool of at most `connections` on `pool`'s connect options, opened as needed and closed
/// after a minute unused.
fn owner_pool(pool: &PgPool, connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(connections)
        .min_connections(0)
        .idle_timeout(Duration::from_secs(60))
        .connect_lazy_with((*pool.connect_options()).clone())
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.sql.table)
            .field("cleanup_batch", &self.cleanup_batch)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A store on `pool`, using the table `idempotency_records`. Creates nothing; call
    /// [`migrate`](Self::migrate) (or create the table yourself) before use.
    ///
    /// Lease maintenance gets a small pool of its own, on the same connect options (see
    /// [Connections](Self#connections)); call within a tokio runtime.
    pub fn new(pool: PgPool) -> Self {
        let owners = owner_pool(&pool, DEFAULT_OWNER_CONNECTIONS);
        let listener = Listener::new(&pool);
        Self {
            pool,
            owners,
            sql: Arc::new(Statements::new(DEFAULT_TABLE)),
            cleanup_batch: 1000,
            notify: true,
            listener,
        }
    }

    /// Whether `complete` and `release` send a notification (`pg_notify`, delivered when
    /// their transaction commits) and whether requests waiting for a duplicate in flight
    /// ([`InFlight::Wait`](crate::InFlight::Wait)) listen for it. Default: on.
    ///
    /// On, a waiting request on any instance learns of the change within a round trip (see
    /// [Waiting duplicates](Self#waiting-duplicates)); off, it looks at the table again after
    /// pauses of 20 ms doubling to 500 ms. Every instance sharing the table should notify: an
    /// instance with notification off does not wake the waiters of the others (they then find
    /// its results by polling).
    pub fn notify(mut self, on: bool) -> Self {
        self.notify = on;
        self
    }

    /// How many connections the owners' pool opens at most (see
    /// [Connections](Self#connections)). Default: 2; at least 1.
    pub fn owner_connections(mut self, connections: u32) -> Self {
        self.owners = owner_pool(&self.pool, connections.max(1));
        self
    }

    /// Connects a pool with sqlx's default pool options to `url` (for example
    /// `postgres://user@host:5432/database`, see [`sqlx::postgres::PgConnectOptions`]) and
    /// returns a store on it, as [`new`](Self::new) does.
    ///
    /// Errors with [`StoreErrorKind::Unavailable`](super::StoreErrorKind::Unavailable) (the sqlx
    /// error as its source) when the URL is invalid or no connection can be made.
    ///
    /// It opens one connection first, so that a database that cannot be reached fails at once
    /// with the driver's cause (connection refused, authentication failed, no such database)
    /// instead of a pool timeout 30 s later.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Ok(Self::new(sql::connect(url).await?))
    }

    /// Keeps the records in the table `name` instead of `idempotency_records` (the index is
    /// named `<name>_expires_at_idx`). The table lives in the connection's `search_path`
    /// schema (usually `public`).
    ///
    /// Errors unless `name` is a plain lowercase identifier (see [`TableNameError`]).
    pub fn with_table_name(mut self, name: &str) -> Result<Self, TableNameError> {
        validate_table_name(name)?;
        self.sql = Arc::new(Statements::new(name));
        Ok(self)
    }

    /// How many rows one `DELETE` of [`delete_expired`](Self::delete_expired) removes at most.
    /// Default: 1,000; at least 1.
    pub fn cleanup_batch(mut self, rows: u32) -> Self {
        self.cleanup_batch = i64::from(rows.max(1));
        self
    }

    /// The table name.
    pub fn table_name(&self) -> &str {
        &self.sql.table
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the table and its index (see [Schema](Self#schema)) if they do not exist, and
    /// adds the `waited` column to a table made before it existed (a metadata change:
    /// PostgreSQL 11 and later do not rewrite the table for it).
    ///
    /// Safe to call on every start of every instance: it runs in one transaction holding a
    /// transaction-level advisory lock derived from the table name, so concurrent calls do not
    /// trip over each other, and it changes nothing when the table exists.
    ///
    /// Errors with [`StoreErrorKind::Unavailable`](super::StoreErrorKind::Unavailable) when the
    /// database fails (for example, the role may not create tables).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::unavailable)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tower_idempotency.migrate.' || $1))")
            .bind(&self.sql.table)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::unavailable)?;
        for ddl in [
            &self.sql.create_table,
            &self.sql.add_waited,
            &self.sql.create_index,
        ] {
            sqlx::raw_sql(AssertSqlSafe(ddl.clone()))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::unavailable)?;
        }
        tx.commit().await.map_err(StoreError::unavailable)
    }

    /// Deletes every record whose deadline has passed (expired responses and expired leases),
    /// in batches of [`cleanup_batch`](Self::cleanup_batch) rows, and returns how many it
    /// deleted. Rows locked by other transactions are skipped and left for the next run.
    ///
    /// Expired records are never returned even before they are deleted; this only reclaims
    /// space. An owner whose expired lease was deleted gets `Ok(false)` from `complete`.
    ///
    /// Errors with [`StoreErrorKind::Unavailable`](super::StoreErrorKind::Unavailable) when the
    /// database fails; batches deleted before the failure stay deleted.
    pub async fn delete_expired(&self) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let batch = sqlx::query(AssertSqlSafe(self.sql.delete_expired.clone()))
                .bind(self.cleanup_batch)
                .execute(&self.pool)
                .await
                .map_err(StoreError::unavailable)?
                .rows_affected();
            deleted += batch;
            if batch < self.cleanup_batch as u64 {
                return Ok(deleted);
            }
        }
    }

    /// Spawns a tokio task that calls [`delete_expired`](Self::delete_expired) every `period`
    /// (the first run right away). Failures are logged with `tracing` at `warn` and retried at
    /// the next tick. The task runs until aborted through the returned handle (or the runtime
    /// shuts down).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, or if `period` is zero.
    pub fn spawn_cleanup(&self, period: Duration) -> JoinHandle<()> {
        sql::spawn_cleanup(self, period)
    }
}

impl SqlStore for PostgresStore {
    type Database = Postgres;
    const NAME: &'static str = "PostgresStore";

    fn table(&self) -> &str {
        &self.sql.table
    }

    async fn delete_expired_records(&self) -> Result<u64, StoreError> {
        self.delete_expired().await
    }

    async fn complete_on(
        &self,
        conn: &mut PgConnection,
        lease: &Lease,
        stored: &StoredResponse,
    ) -> Result<bool, StoreError> {
        self.complete_in(conn, lease, stored).await
    }

    async fn record_exists(
        &self,
        conn: &mut PgConnection,
        key: &StoreKey,
    ) -> Result<bool, sqlx::Error> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM \"{}\" WHERE key = $1)",
            self.table_name()
        );
        sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(&key.0[..])
            .fetch_one(conn)
            .await
    }
}
