//! [`MySqlStore`]: records in one MySQL or MariaDB (InnoDB) table, through an `sqlx` pool.

use std::{fmt, sync::Arc, time::Duration};

use sqlx::{AssertSqlSafe, Executor, MySql, MySqlConnection, MySqlPool};
use tokio::task::JoinHandle;

mod calls;
mod locks;
mod statements;
mod transaction;

use locks::with_lock_retries;
use statements::Statements;

use super::{
    StoreError, StoreErrorKind, StoreKey, StoredResponse,
    sql::{self, DEFAULT_TABLE, SqlStore},
    table_name::{TableNameError, validate_table_name},
};
use crate::Lease;

/// The most rows [`MySqlStore::cleanup_batch`] accepts: the placeholders of one `DELETE`.
const MAX_CLEANUP_BATCH: u32 = 10_000;

/// How long [`MySqlStore::migrate`] waits for a concurrent migration's lock, in seconds.
const MIGRATE_LOCK_SECS: i64 = 60;

/// A store in a MySQL or MariaDB table (InnoDB), shared by every instance of a service that
/// uses the same database. Built on an [`sqlx`] [`MySqlPool`]; cloning is cheap and clones
/// share the pool.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency::{IdempotencyLayer, store::MySqlStore};
///
/// let store = MySqlStore::connect("mysql://app@127.0.0.1:3306/app").await?;
/// store.migrate().await?; // once at start-up; a no-op when the table exists
/// let _cleanup = store.spawn_cleanup(std::time::Duration::from_secs(60));
/// let layer = IdempotencyLayer::new().store(store).post("/calls");
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// Tested against MariaDB 10.11 only; MySQL is not tested. Cleanup needs `FOR UPDATE SKIP
/// LOCKED` (MariaDB 10.6 and MySQL 8.0 have it). The crate enables neither TLS nor RSA in
/// `sqlx`: to log in to MySQL 8 with its default `caching_sha2_password` over a plain
/// connection, enable `sqlx`'s `mysql-rsa` (or a TLS feature) in your own `Cargo.toml`.
///
/// # Schema
///
/// [`migrate`](Self::migrate) creates one table (default name `idempotency_records`, see
/// [`with_table_name`](Self::with_table_name)) with one secondary index:
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS `idempotency_records` (
///     `key`        BINARY(32)   NOT NULL,   -- StoreKey
///     fingerprint  BINARY(32)   NOT NULL,   -- Fingerprint
///     state        ENUM('in_flight', 'completed') NOT NULL,
///     token        BINARY(16)   NULL,       -- LeaseToken; NULL once completed
///     expires_at   DATETIME(6)  NOT NULL,   -- UTC; in flight: lease expiry; completed: end of TTL
///     response     LONGBLOB     NULL,       -- StoredResponse::encode; NULL while in flight
///     created_at   DATETIME(6)  NOT NULL,   -- UTC; when the current lease was taken
///     completed_at DATETIME(6)  NULL,       -- UTC; when the response was stored
///     PRIMARY KEY (`key`),
///     KEY `idempotency_records_expires_at_idx` (expires_at),
///     CHECK ((state = 'in_flight') = (token IS NOT NULL AND response IS NULL))
/// ) ENGINE = InnoDB;
/// ```
///
/// Keys, fingerprints and tokens are the raw bytes of [`StoreKey`],
/// [`Fingerprint`](super::Fingerprint) and [`LeaseToken`](super::LeaseToken); responses use the
/// compact binary [`StoredResponse::encode`] format, so binary bodies and non-UTF-8 header values
/// are kept exactly. A response larger than the server's `max_allowed_packet` (16 MiB by default on
/// MariaDB, 64 MiB on MySQL 8) cannot be stored: `complete` fails with
/// [`StoreErrorKind::Unavailable`]. Times are `DATETIME(6)` in UTC (`UTC_TIMESTAMP(6)`), so the
/// session's `time_zone` does not matter. You may create the table yourself (with your migration
/// tool) instead of calling `migrate`, as long as it has these columns, this primary key and
/// `ENGINE = InnoDB`: the atomicity below rests on InnoDB's row locks.
///
/// # Round trips
///
/// | call | statements | round trips | writes |
/// |---|---|---|---|
/// | [`begin`](super::IdempotencyStore::begin), replay or in flight | a plain `SELECT` of the key's row | 1 | nothing (no lock either) |
/// | [`begin`](super::IdempotencyStore::begin), new key | `SELECT`, then `INSERT` | 2 | one row |
/// | [`begin`](super::IdempotencyStore::begin), expired or released key | `SELECT`, then `UPDATE ... WHERE <expired>` | 2 | one row |
/// | [`renew`](super::IdempotencyStore::renew) | one token-checked `UPDATE` | 1 | one row |
/// | [`complete`](super::IdempotencyStore::complete) | one token-checked `UPDATE` | 1 | one row |
/// | [`complete_in`](Self::complete_in) | the same `UPDATE`, in your transaction | 1 | one row, committed with yours |
/// | [`release`](super::IdempotencyStore::release) | one token-checked `UPDATE` | 1 | one row |
/// | [`delete_expired`](Self::delete_expired) | per batch: `SET TRANSACTION`, `BEGIN`, `SELECT ... FOR UPDATE SKIP LOCKED`, `DELETE`, `COMMIT` | 5 per [`cleanup_batch`](Self::cleanup_batch) rows | the expired rows |
/// | [`migrate`](Self::migrate) | `GET_LOCK`, `CREATE TABLE IF NOT EXISTS`, `RELEASE_LOCK` | 3 | DDL, once |
///
/// A request that runs thus costs three round trips and two autocommit writes (`begin`,
/// `complete`); a replay or a 409 costs one plain read. Each statement is prepared once per
/// pooled connection (sqlx caches it), which costs one more round trip the first time.
///
/// # Why `begin` is atomic
///
/// `begin` reads first and decides on a write. The decision that matters (who gets the lease)
/// is never taken on the read; it is taken by the write, on the latest committed row under
/// InnoDB's exclusive row lock. Step by step, each statement in autocommit mode, at the default
/// REPEATABLE READ:
///
/// 1. A plain `SELECT` of the key's row. In autocommit mode every statement is its own transaction
///    with a fresh consistent snapshot, so it sees every commit made before it started. A row whose
///    deadline (`expires_at`, on the server's clock) has not passed is reported as it is,
///    [`Begin::InFlight`](super::Begin::InFlight) or [`Begin::Completed`](super::Begin::Completed):
///    a correct answer as of that snapshot, given without taking any lock or writing anything.
/// 2. No row: `INSERT` a lease. The primary key admits one row per key; of concurrent inserts
///    exactly one succeeds, and the others wait for its lock and then fail with a duplicate
///    key (error 1062), whatever their snapshots said.
/// 3. A row past its deadline: `UPDATE ... WHERE key = ? AND expires_at <= UTC_TIMESTAMP(6)`
///    with the new lease. An `UPDATE` is a locking read: it waits for the row's exclusive lock
///    and evaluates its `WHERE` on the **latest committed** version of the row, not on the
///    snapshot of step 1. Of concurrent takeovers, the first changes the row; the others then
///    find its new deadline in the future and change nothing (0 rows).
/// 4. A write that found its assumption outdated (a duplicate key, or 0 rows) means another
///    writer committed on this key in between: `begin` starts again at step 1, whose new
///    snapshot sees that commit. Only a write that inserted or changed the row reports
///    [`Begin::Acquired`](super::Begin::Acquired), with the token it wrote.
///
/// So of any number of concurrent `begin` calls on one key, exactly one acquires. The argument
/// holds at REPEATABLE READ (the default, and what the tests run) and at READ COMMITTED, since
/// the decisive statements are locking at both; not at READ UNCOMMITTED, where step 1 could
/// report a lease whose insert never commits. This is the design with
/// a plain read first, rather than `INSERT ... ON DUPLICATE KEY UPDATE`, because the read
/// answers replays and duplicates in one round trip without locking the row, and because
/// sqlx connects with `CLIENT_FOUND_ROWS`, under which an `ON DUPLICATE KEY UPDATE` that
/// inserted and one that changed nothing both report one row.
///
/// **Deadlocks.** Inserts of one key by many connections at once can deadlock in InnoDB (each
/// holds a shared lock from its duplicate-key check on a row that another deleted or rolled
/// back, and waits for the others). InnoDB then rolls one transaction back with error 1213.
/// Every statement of the store's own is an autocommit statement (a cleanup batch: a short
/// transaction of its own), so a rolled-back one changed nothing: the store runs it again (the
/// whole pass, for `begin`; the whole batch, for cleanup), after a short random pause (up to
/// 8 ms), at most 10 times per call, so a deadlock does not become an error. A lock wait
/// timeout (error 1205, after `innodb_lock_wait_timeout`, 50 s by default) is run again the same
/// way, though with the default it outlasts any sensible store timeout. Past the bound, the
/// call fails with [`StoreErrorKind::Unavailable`].
///
/// Waiting duplicates ([`InFlight::Wait`](crate::InFlight::Wait)) poll `begin` with the
/// layer's backoff (the default [`wait`](super::IdempotencyStore::wait)).
///
/// # Expiry and clocks
///
/// Every deadline is computed and compared on the **database's** clock (`UTC_TIMESTAMP(6)`,
/// the start of the statement), never the application's, so instances with skewed clocks
/// agree. A record whose `expires_at` has passed is never returned: `begin` takes it over as if
/// the key were absent, whether or not it has been deleted yet. Durations above 100 years are
/// clamped to 100 years; time is kept in microseconds.
///
/// A lease past its expiry that nobody has taken over still belongs to its token, so a slow
/// owner can still `complete` (finishing late is better than running twice), as with
/// [`MemoryStore`](super::MemoryStore). [`release`](super::IdempotencyStore::release) does not
/// delete the row: it ends the lease (its deadline set to the past, its token replaced by one
/// nobody holds), so that the next `begin` takes the row over with an `UPDATE`, which queues
/// on the row lock, rather than inserting where a row is being deleted, the case in which
/// InnoDB deadlocks concurrent inserts (see above). Cleanup deletes it later.
///
/// # Durability
///
/// A stored response survives a crash and restart of the server when its commit was made
/// durable: with `innodb_flush_log_at_trx_commit = 1` (the default) InnoDB flushes its log on
/// every commit (tested: a server killed with `SIGKILL` replays, once restarted, a response
/// stored before). With `2` or `0`, about the last second of commits can be lost in an
/// operating system crash (with `0`, in a server crash too), and with them the promise that
/// those requests do not run again.
///
/// **Not guaranteed across a failover.** A replica has only what it received: with
/// asynchronous replication (the default) the last commits before a failover can be missing,
/// and a retry of one of those requests runs again. Semi-synchronous replication or Galera,
/// with `sync_binlog = 1` when the binary log is on (MariaDB's default is `0`: the operating
/// system decides when the binary log reaches the disk), narrow that window; this is not
/// tested here. The store neither checks nor changes these settings.
///
/// # Cleanup
///
/// Expired rows stay in the table until deleted. [`delete_expired`](Self::delete_expired)
/// deletes them (expired responses, expired and released leases) in batches of
/// [`cleanup_batch`](Self::cleanup_batch) rows (default 1,000), through the `expires_at` index,
/// at READ COMMITTED and skipping rows other transactions hold locked (`SKIP LOCKED`), so it
/// never waits for requests and never holds gap locks. [`spawn_cleanup`](Self::spawn_cleanup)
/// runs it periodically on a tokio task; running it on every instance is safe.
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
#[derive(Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    sql: Arc<Statements>,
    cleanup_batch: u32,
}

impl fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlStore")
            .field("table", &self.sql.table)
            .field("cleanup_batch", &self.cleanup_batch)
            .finish_non_exhaustive()
    }
}

impl MySqlStore {
    /// A store on `pool`, using the table `idempotency_records`. Creates nothing; call
    /// [`migrate`](Self::migrate) (or create the table yourself) before use.
    pub fn new(pool: MySqlPool) -> Self {
        Self {
            pool,
            sql: Arc::new(Statements::new(DEFAULT_TABLE)),
            cleanup_batch: 1000,
        }
    }

    /// Connects a pool with sqlx's default pool options to `url` (for example
    /// `mysql://user:password@host:3306/database`, see [`sqlx::mysql::MySqlConnectOptions`])
    /// and returns a store on it, as [`new`](Self::new) does.
    ///
    /// Errors with [`StoreErrorKind::Unavailable`] (the sqlx error as its source) when the URL
    /// is invalid or no connection can be made.
    ///
    /// It opens one connection first, so that a database that cannot be reached fails at once
    /// with the driver's cause (connection refused, access denied, unknown database) instead
    /// of a pool timeout 30 s later.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Ok(Self::new(sql::connect(url).await?))
    }

    /// Keeps the records in the table `name` instead of `idempotency_records` (the index is
    /// named `<name>_expires_at_idx`). The table lives in the connection's database.
    ///
    /// Errors unless `name` is a plain lowercase identifier (see [`TableNameError`]).
    pub fn with_table_name(mut self, name: &str) -> Result<Self, TableNameError> {
        validate_table_name(name)?;
        self.sql = Arc::new(Statements::new(name));
        Ok(self)
    }

    /// How many rows one batch of [`delete_expired`](Self::delete_expired) removes at most.
    /// Default: 1,000; at least 1, at most 10,000 (the keys of a batch are the placeholders of
    /// one `DELETE`).
    pub fn cleanup_batch(mut self, rows: u32) -> Self {
        self.cleanup_batch = rows.clamp(1, MAX_CLEANUP_BATCH);
        self
    }

    /// The table name.
    pub fn table_name(&self) -> &str {
        &self.sql.table
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Creates the table and its index (see [Schema](Self#schema)) if they do not exist.
    ///
    /// Safe to call on every start of every instance: it holds a named lock
    /// (`GET_LOCK`, derived from the database and table names) while it creates the table, so
    /// concurrent calls do not trip over each other, and it changes nothing when the table
    /// exists. It waits up to 60 seconds for a concurrent call's lock.
    ///
    /// Errors with [`StoreErrorKind::Unavailable`] when the database fails (for example, the
    /// user may not create tables) or the lock was not granted within 60 seconds.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::unavailable)?;
        // A named lock belongs to the session. 18 + 32 characters: within the 64 allowed.
        let lock = "CONCAT('tower_idempotency:', MD5(CONCAT_WS('.', DATABASE(), ?)))";
        let granted: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT GET_LOCK({lock}, ?)")))
                .bind(&self.sql.table)
                .bind(MIGRATE_LOCK_SECS)
                .fetch_one(&mut *conn)
                .await
                .map_err(StoreError::unavailable)?;
        if granted != Some(1) {
            return Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "migrate: another migration held the lock for 60 seconds",
            ));
        }
        let created = sqlx::raw_sql(AssertSqlSafe(self.sql.create_table.clone()))
            .execute(&mut *conn)
            .await
            .map_err(StoreError::unavailable);
        let released = sqlx::query(AssertSqlSafe(format!("DO RELEASE_LOCK({lock})")))
            .bind(&self.sql.table)
            .execute(&mut *conn)
            .await;
        if released.is_err() {
            // Never hand a session that may still hold the lock back to the pool.
            conn.close_on_drop();
        }
        created.map(drop)
    }

    /// Deletes every record whose deadline has passed (expired responses, expired and released
    /// leases), in batches of [`cleanup_batch`](Self::cleanup_batch) rows, and returns how many
    /// it deleted. Rows locked by other transactions are skipped and left for the next run.
    ///
    /// Expired records are never returned even before they are deleted; this only reclaims
    /// space. An owner whose expired lease was deleted gets `Ok(false)` from `complete`.
    ///
    /// Errors with [`StoreErrorKind::Unavailable`] when the database fails; batches deleted
    /// before the failure stay deleted.
    pub async fn delete_expired(&self) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let batch = with_lock_retries(|| self.delete_expired_batch())
                .await
                .map_err(StoreError::unavailable)?;
            deleted += batch;
            if batch < u64::from(self.cleanup_batch) {
                return Ok(deleted);
            }
        }
    }

    /// One batch of [`delete_expired`](Self::delete_expired), in a transaction of its own at
    /// READ COMMITTED (no gap locks).
    async fn delete_expired_batch(&self) -> Result<u64, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        // Applies to the next transaction on this session only.
        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let keys: Vec<Vec<u8>> = sqlx::query_scalar(AssertSqlSafe(self.sql.select_expired.clone()))
            .bind(self.cleanup_batch)
            .fetch_all(&mut *tx)
            .await?;
        if keys.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let mut delete =
            sqlx::query(AssertSqlSafe(self.sql.delete_keys(keys.len()))).persistent(false);
        for key in &keys {
            delete = delete.bind(key.as_slice());
        }
        let deleted = delete.execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(deleted)
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

impl SqlStore for MySqlStore {
    type Database = MySql;
    const NAME: &'static str = "MySqlStore";

    fn table(&self) -> &str {
        &self.sql.table
    }

    async fn delete_expired_records(&self) -> Result<u64, StoreError> {
        self.delete_expired().await
    }

    async fn complete_on(
        &self,
        conn: &mut MySqlConnection,
        lease: &Lease,
        stored: &StoredResponse,
    ) -> Result<bool, StoreError> {
        self.complete_in(conn, lease, stored).await
    }

    async fn record_exists(
        &self,
        conn: &mut MySqlConnection,
        key: &StoreKey,
    ) -> Result<bool, sqlx::Error> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM `{}` WHERE `key` = ?)",
            self.table_name()
        );
        sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(&key.0[..])
            .fetch_one(conn)
            .await
    }
}
