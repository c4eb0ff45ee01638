//! Completion inside the handler's own transaction, for [`PostgresStore`].

use std::fmt;

use axum::{body::Body, response::IntoResponse};
use http::Response;
use sqlx::{PgConnection, Postgres, Transaction};

use super::PostgresStore;
use crate::{
    CaptureError, Lease,
    problem::{Problem, ProblemKind},
    store::{StoreError, StoredResponse},
};

/// Why [`PostgresStore::complete_in_transaction`] did not commit. In every case the handler's
/// transaction was rolled back (or never committed): none of its writes happened.
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[derive(Debug)]
#[non_exhaustive]
pub enum TransactionalError {
    /// The lease's token no longer owns the record: the lease expired and another request
    /// took the key over. That request runs (or ran) the side effects; these writes must not.
    /// As a response: 409 `in-flight` with `Retry-After: 1`, so the client's retry gets the
    /// other run's response.
    LeaseLost,
    /// The response could not be stored (too large, trailers, a failing body). As a response:
    /// 500.
    Capture(CaptureError),
    /// The database failed, in the update or the commit. As a response: 503
    /// `store-unavailable` with `Retry-After: 1`; the layer then releases the lease (a 5xx is
    /// not stored), so the retry runs.
    ///
    /// A commit whose answer was lost may still have committed; the release is token-checked,
    /// so it cannot undo a record that did commit, and the retry replays it.
    Database(StoreError),
}

impl fmt::Display for TransactionalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransactionalError::LeaseLost => f.write_str(
                "the idempotency lease was lost (it expired and another request took the key \
                 over); the transaction was rolled back",
            ),
            TransactionalError::Capture(error) => {
                write!(f, "the response cannot be stored: {error}")
            }
            TransactionalError::Database(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for TransactionalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TransactionalError::LeaseLost => None,
            TransactionalError::Capture(error) => Some(error),
            TransactionalError::Database(error) => Some(error),
        }
    }
}

impl IntoResponse for TransactionalError {
    fn into_response(self) -> axum::response::Response {
        let retry = std::time::Duration::from_secs(1);
        match self {
            TransactionalError::LeaseLost => Problem::new(
                ProblemKind::InFlight,
                "another request with this idempotency key took over; retry to get its response",
            )
            .retry_after(retry)
            .into_response(),
            TransactionalError::Capture(error) => Problem::new(
                ProblemKind::ResponseUnstorable,
                format!("the response cannot be stored: {error}"),
            )
            .into_response(),
            TransactionalError::Database(_) => Problem::new(
                ProblemKind::StoreUnavailable,
                "the database failed; nothing was committed, retry later",
            )
            .retry_after(retry)
            .into_response(),
        }
    }
}

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
        mut tx: Transaction<'_, Postgres>,
        lease: &Lease,
        response: impl IntoResponse,
    ) -> Result<Response<Body>, TransactionalError> {
        let stored = lease
            .capture(response)
            .await
            .map_err(TransactionalError::Capture)?;
        match self.complete_in(&mut tx, lease, &stored).await {
            Ok(true) => {}
            Ok(false) => {
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
}
