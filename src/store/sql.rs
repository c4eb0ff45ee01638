//! What the SQL stores ([`PostgresStore`](super::PostgresStore), [`MySqlStore`](super::MySqlStore))
//! do alike, generic over the one thing that differs, the database: connecting, the periodic
//! cleanup task, and completing a record inside the handler's transaction.

use std::{future::Future, time::Duration};

use axum::{body::Body, response::IntoResponse};
use http::Response;
use sqlx::{
    ColumnIndex, ConnectOptions, Connection, Database, Decode, Pool, Row, Transaction, Type,
    pool::PoolOptions,
};
use tokio::task::JoinHandle;

use super::{Begin, BoxError, Fingerprint, StoreError, StoreErrorKind, StoreKey, StoredResponse};
use crate::{Lease, TransactionalError};

/// The table name used unless `with_table_name` says otherwise.
pub(super) const DEFAULT_TABLE: &str = "idempotency_records";

/// Durations longer than this (100 years) are clamped to it, to stay within the column types
/// (`timestamptz`, `DATETIME`).
pub(super) const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// A duration as whole microseconds, clamped to [`MAX_DURATION`].
pub(super) fn micros(duration: Duration) -> i64 {
    duration.min(MAX_DURATION).as_micros() as i64
}

pub(super) fn corrupt(source: impl Into<BoxError>) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, "stored record is corrupt").with_source(source)
}

/// The live record in a row that `begin` read (columns `remaining_us`, `fingerprint`, `state`
/// and `response`), or `None` when its deadline has passed.
pub(super) fn live_record<'r, R>(row: &'r R) -> Result<Option<Begin>, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    &'r str: Decode<'r, R::Database> + Type<R::Database>,
    &'r [u8]: Decode<'r, R::Database> + Type<R::Database>,
{
    let remaining_us: i64 = row.try_get("remaining_us").map_err(corrupt)?;
    if remaining_us <= 0 {
        return Ok(None);
    }
    let fingerprint: &[u8] = row.try_get("fingerprint").map_err(corrupt)?;
    let fingerprint = Fingerprint(
        fingerprint
            .try_into()
            .map_err(|_| corrupt("a fingerprint is 32 bytes"))?,
    );
    let state: &str = row.try_get("state").map_err(corrupt)?;
    match state {
        "in_flight" => Ok(Some(Begin::InFlight {
            fingerprint,
            lease_remaining: Duration::from_micros(remaining_us as u64),
        })),
        "completed" => {
            let bytes: &[u8] = row.try_get("response").map_err(corrupt)?;
            Ok(Some(Begin::Completed {
                fingerprint,
                response: StoredResponse::decode(bytes)?,
            }))
        }
        _ => Err(StoreError::new(
            StoreErrorKind::Corrupt,
            "stored record has an unknown state",
        )),
    }
}

/// What a SQL store gives the shared code below.
pub(super) trait SqlStore: Clone + Send + Sync + 'static {
    /// The database it runs on.
    type Database: Database;
    /// The store's type name, for the log.
    const NAME: &'static str;

    /// The table name.
    fn table(&self) -> &str;

    /// `delete_expired`.
    fn delete_expired_records(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// `complete_in`, on a connection inside the caller's transaction.
    fn complete_on(
        &self,
        conn: &mut <Self::Database as Database>::Connection,
        lease: &Lease,
        stored: &StoredResponse,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Whether the table holds a record for `key`, in any state.
    fn record_exists(
        &self,
        conn: &mut <Self::Database as Database>::Connection,
        key: &StoreKey,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;
}

/// A pool with sqlx's default pool options on `url`, after one connection opened and closed, so
/// that a database that cannot be reached fails at once with the driver's cause instead of a
/// pool timeout 30 s later.
pub(super) async fn connect<DB: Database>(url: &str) -> Result<Pool<DB>, StoreError> {
    let options: <DB::Connection as Connection>::Options =
        url.parse().map_err(StoreError::unavailable)?;
    let first = options.connect().await.map_err(StoreError::unavailable)?;
    let _ = first.close().await;
    Ok(PoolOptions::<DB>::new().connect_lazy_with(options))
}

/// `spawn_cleanup`: a tokio task that calls `delete_expired` every `period`, the first run
/// right away, logging each result.
pub(super) fn spawn_cleanup<S: SqlStore>(store: &S, period: Duration) -> JoinHandle<()> {
    let store = store.clone();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::spawn(async move {
        loop {
            tick.tick().await;
            match store.delete_expired_records().await {
                Ok(deleted) => tracing::debug!(
                    target: "tower_idempotency",
                    table = store.table(),
                    deleted,
                    "deleted expired idempotency records"
                ),
                Err(error) => tracing::warn!(
                    target: "tower_idempotency",
                    table = store.table(),
                    %error,
                    "deleting expired idempotency records failed"
                ),
            }
        }
    })
}

/// `complete_in_transaction`: capture `response`, complete the record in `tx` (token-checked),
/// and commit; a lease no longer held rolls `tx` back.
pub(super) async fn complete_in_transaction<S: SqlStore>(
    store: &S,
    mut tx: Transaction<'_, S::Database>,
    lease: &Lease,
    response: impl IntoResponse,
) -> Result<Response<Body>, TransactionalError> {
    let stored = lease
        .capture(response)
        .await
        .map_err(TransactionalError::Capture)?;
    match store.complete_on(&mut tx, lease, &stored).await {
        Ok(true) => {}
        Ok(false) => {
            explain_refusal(store, &mut tx, lease).await;
            // Dropping `tx` would roll back too; say it out loud.
            let _ = tx.rollback().await;
            return Err(TransactionalError::LeaseLost);
        }
        Err(error) => return Err(TransactionalError::Database(error)),
    }
    tx.commit()
        .await
        .map_err(|error| TransactionalError::Database(StoreError::unavailable(error)))?;
    Ok(lease.committed(&stored))
}

/// After a refused completion: a lease with no record at all means the layer keeps its
/// records elsewhere (another store, another table), a misconfiguration that would refuse
/// every request; say so in the log. A record held by another token is the fencing doing
/// its work.
async fn explain_refusal<S: SqlStore>(
    store: &S,
    conn: &mut <S::Database as Database>::Connection,
    lease: &Lease,
) {
    if let Ok(false) = store.record_exists(conn, &lease.store_key()).await {
        tracing::error!(
            target: "tower_idempotency",
            table = store.table(),
            "a handler's lease has no idempotency record in this table: the layer keeps its \
             records in another store or table. Give the layer this same {} \
             (IdempotencyLayer::store), or every such request is refused with 409",
            S::NAME
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_microseconds_clamped() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(micros(Duration::MAX), micros(MAX_DURATION));
    }

    /// The clamp is at 100 years: a TTL of 99 years is kept whole, one of 101 is cut to 100.
    #[test]
    fn the_clamp_is_at_100_years() {
        const YEAR_US: i64 = 365 * 24 * 60 * 60 * 1_000_000;
        let years = |n: u64| Duration::from_secs(n * 365 * 24 * 60 * 60);
        assert_eq!(micros(years(99)), 99 * YEAR_US);
        assert_eq!(micros(years(101)), 100 * YEAR_US);
    }
}
