//! Completion inside the handler's own transaction, for [`MySqlStore`].

use axum::{body::Body, response::IntoResponse};
use http::Response;
use sqlx::{Executor, MySql, Transaction};

use super::MySqlStore;
use crate::{
    Lease, TransactionalError,
    store::{StoreError, StoredResponse, sql},
};

impl MySqlStore {
    /// Completes the record of `lease` with `stored` inside **your** transaction, only if the
    /// lease's token still owns it: the token-checked `UPDATE` of
    /// [`complete`](crate::store::IdempotencyStore::complete), run on `executor` (`&mut *tx` for an
    /// `sqlx::Transaction<'_, MySql>`, or a `&mut MySqlConnection`). The response is kept for
    /// [`Lease::ttl`] from the statement, on the server's clock, clamped to 100 years. After
    /// your commit, return [`lease.committed(&stored)`](Lease::committed) from the handler;
    /// [`complete_in_transaction`](Self::complete_in_transaction) does all of it in one call.
    ///
    /// Run it in the handler's transaction, after the handler's own writes and before its
    /// commit. `Ok(true)`: the record is completed, and becomes visible with your commit, so
    /// your side effects and the stored response are committed together or not at all.
    /// `Ok(false)`: the lease is no longer yours (it expired and another request took the key
    /// over, or it was released or completed): **roll back**, so that the other request's run
    /// is the only one. This is the fencing check: the `UPDATE` reads the latest committed row
    /// under its exclusive lock, whatever your transaction's snapshot.
    ///
    /// From the `UPDATE` until your commit or rollback, your transaction holds the record's
    /// row lock: duplicates still get their answer at once (their `begin` reads without
    /// locking, and sees the record in flight until you commit), but the store's own `renew`
    /// and `complete` for the key wait for your transaction. Keep it short.
    ///
    /// Errors with [`StoreErrorKind::Unavailable`](crate::store::StoreErrorKind::Unavailable) (the sqlx error as its source) when the
    /// statement fails. It is not retried: a deadlock (error 1213) has rolled back your whole
    /// transaction, so the caller retries the transaction, not the statement.
    pub async fn complete_in<'c, E>(
        &self,
        executor: E,
        lease: &Lease,
        stored: &StoredResponse,
    ) -> Result<bool, StoreError>
    where
        E: Executor<'c, Database = MySql>,
    {
        let key = lease.store_key();
        let result = self
            .complete_query(&key, lease.fencing_token(), stored.encode(), lease.ttl())
            .execute(executor)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(result.rows_affected() == 1)
    }

    /// Stores `response` as the record of `lease` inside `tx`, commits `tx`, and returns the
    /// response to send: exactly the stored status, headers and body (see
    /// [`Lease::committed`]). The handler's writes in `tx` and the idempotency record commit
    /// together or not at all, and the lease token fences them, as with
    /// `PostgresStore::complete_in_transaction` (same API).
    ///
    /// Only writes in this database are covered; a call to an outside service needs that
    /// service's own idempotency key. Errors: see [`TransactionalError`]; `tx` is rolled back in
    /// each case.
    pub async fn complete_in_transaction(
        &self,
        tx: Transaction<'_, MySql>,
        lease: &Lease,
        response: impl IntoResponse,
    ) -> Result<Response<Body>, TransactionalError> {
        sql::complete_in_transaction(self, tx, lease, response).await
    }
}
