//! Completion inside the handler's own transaction, for [`PostgresStore`].

use axum::{body::Body, response::IntoResponse};
use http::Response;
use sqlx::{PgConnection, Postgres, Transaction};

use super::PostgresStore;
use crate::{
    Lease, TransactionalError,
    store::{StoreError, StoredResponse, sql},
};

impl PostgresStore {
    /// Completes the record of `lease` with `stored` through `conn`, a connection inside your
    /// own transaction (`&mut *tx` for an [`sqlx::Transaction`]): one token-checked `UPDATE`
    /// of the record, which becomes visible when your transaction commits, together with your
    /// other writes. The response is kept for [`Lease::ttl`] from the transaction's start
    /// (`now()`).
    ///
    /// Returns `Ok(false)` when the lease's token no longer owns the record (it expired and
    /// another request took the key over): roll your transaction back then, so that your
    /// writes do not happen a second time. After a commit, return
    /// [`lease.committed(&stored)`](Lease::committed) from the handler.
    ///
    /// [`complete_in_transaction`](Self::complete_in_transaction) does all of this in one call.
    ///
    /// Errors with [`StoreErrorKind::Unavailable`](crate::store::StoreErrorKind) when the
    /// database fails.
    pub async fn complete_in(
        &self,
        conn: &mut PgConnection,
        lease: &Lease,
        stored: &StoredResponse,
    ) -> Result<bool, StoreError> {
        let key = lease.store_key();
        let result = self
            .complete_query(&key, lease.fencing_token(), stored, lease.ttl())
            .execute(conn)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(result.rows_affected() == 1)
    }

    /// Stores `response` as the record of `lease` inside `tx`, commits `tx`, and returns the
    /// response to send: exactly the stored status, headers and body (see
    /// [`Lease::committed`]). The handler's writes in `tx` and the idempotency record thus
    /// commit together or not at all, and the lease token fences them: an owner that lost its
    /// lease cannot commit.
    ///
    /// ```no_run
    /// use axum::{Json, extract::State, http::StatusCode, response::{IntoResponse, Response}};
    /// use tower_idempotency::{Lease, store::PostgresStore};
    ///
    /// async fn create_payment(
    ///     State(store): State<PostgresStore>,
    ///     lease: Lease,
    ///     Json(payment): Json<serde_json::Value>,
    /// ) -> Response {
    ///     let mut tx = match store.pool().begin().await {
    ///         Ok(tx) => tx,
    ///         Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    ///     };
    ///     let inserted = sqlx::query("INSERT INTO payments (body) VALUES ($1)")
    ///         .bind(payment.to_string())
    ///         .execute(&mut *tx)
    ///         .await;
    ///     if inserted.is_err() {
    ///         return StatusCode::INTERNAL_SERVER_ERROR.into_response(); // tx rolls back on drop
    ///     }
    ///     let response = (StatusCode::CREATED, Json(payment));
    ///     store
    ///         .complete_in_transaction(tx, &lease, response)
    ///         .await
    ///         .unwrap_or_else(IntoResponse::into_response)
    /// }
    /// ```
    ///
    /// Only writes in this database are covered. A call to an outside service (a payment
    /// provider, say) made by the handler is not rolled back; pass it an idempotency key of its
    /// own (the request's [`IdempotencyKey`](crate::IdempotencyKey) is in the request
    /// extensions), so that a second attempt is harmless there too.
    ///
    /// Errors: see [`TransactionalError`]; `tx` is rolled back in each case.
    pub async fn complete_in_transaction(
        &self,
        tx: Transaction<'_, Postgres>,
        lease: &Lease,
        response: impl IntoResponse,
    ) -> Result<Response<Body>, TransactionalError> {
        sql::complete_in_transaction(self, tx, lease, response).await
    }
}
