//! Completion inside the handler's own transaction: the [`Lease`] a handler reaches from the
//! request extensions, and the marker that tells the layer the record is already complete.
//!
//! A handler whose side effects live in the same database as the idempotency records can commit
//! its writes and the completed record in one transaction. The lease token then acts as a
//! fencing token: when the lease was lost (it expired and another request took it over), the
//! token-checked update of the record matches no row, the transaction rolls back, and the
//! handler's writes never happen twice, whatever the outage or crash.
//!
//! The flow, with `PostgresStore::complete_in_transaction` (feature `postgres`) doing steps
//! 2 to 4 in one call:
//!
//! 1. The handler extracts its [`Lease`] (an axum extractor; `Option<Lease>` when requests
//!    without a key reach it too) and writes its side effects in a transaction.
//! 2. [`Lease::capture`] turns the response it means to return into a [`StoredResponse`].
//! 3. The store's token-checked update writes that response into the record, in the same
//!    transaction; no row updated means the lease was lost: roll back.
//! 4. After the commit, the handler returns [`Lease::committed`]: a response built from exactly
//!    the stored bytes (so the client sees what a retry will be replayed), marked for the layer,
//!    which then neither stores the response again nor releases the lease.

use std::{convert::Infallible, fmt, time::Duration};

#[cfg(any(feature = "postgres", feature = "mysql"))]
use crate::store::StoreError;

use axum::{
    body::Body,
    extract::{FromRequestParts, OptionalFromRequestParts},
    response::IntoResponse,
};
use http::{Extensions, Response, request::Parts};

use crate::{
    capture::{Captured, TOO_LARGE, capture},
    config::Config,
    problem::{Problem, ProblemKind},
    reject::Unrendered,
    response::StoredResponse,
    store::{LeaseToken, StoreKey},
};

/// The trace detail of a request whose handler completed the record itself.
pub(crate) const HANDLER_COMPLETED: &str = "stored by the handler";

/// The lease a covered request holds while its handler runs: the record's [`StoreKey`], the
/// [`LeaseToken`] that fences it, and the TTL the layer would store the response with.
///
/// The layer puts it in the request extensions of every request whose handler it runs under a
/// lease (not for replays, conflicts or requests without a key). Extract it in a handler as
/// `Lease` (a request without one is refused with 500 problem+json: the handler is not behind
/// the layer) or as `Option<Lease>`.
///
/// `Debug` never shows the token: it is a capability.
#[derive(Clone)]
pub struct Lease {
    key: StoreKey,
    token: LeaseToken,
    ttl: Duration,
    max_response_body: usize,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("store_key", &self.key)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Lease {
    pub(crate) fn from_config(key: StoreKey, token: LeaseToken, config: &Config) -> Self {
        Self {
            key,
            token,
            ttl: config.ttl,
            max_response_body: config.max_response_body,
        }
    }

    /// A lease on `key` held by `token`, its response to be kept for `ttl`, and
    /// [`capture`](Self::capture) bounded by the layer's default of 4 MiB. The layer makes the
    /// leases it hands to handlers itself; this is for tests and for code that calls a store's
    /// `complete_in` outside a request (with a token from its own `begin`).
    pub fn new(key: StoreKey, token: LeaseToken, ttl: Duration) -> Self {
        Self {
            key,
            token,
            ttl,
            max_response_body: crate::layer::DEFAULT_MAX_RESPONSE_BODY,
        }
    }

    /// The key of the record this request owns.
    pub fn store_key(&self) -> StoreKey {
        self.key
    }

    /// The lease token: a fencing token. A store's token-checked write succeeds only while this
    /// token still owns the lease.
    pub fn fencing_token(&self) -> LeaseToken {
        self.token
    }

    /// How long the stored response is replayed, measured from completion: the layer's
    /// [`ttl`](crate::IdempotencyLayer::ttl) (default 24 h).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Buffers `response` into the [`StoredResponse`] a retry will be replayed: its status, its
    /// end-to-end headers (never `Set-Cookie`, `Date` or hop-by-hop ones) and its whole body.
    ///
    /// Errors: a body larger than the layer's
    /// [`max_response_body`](crate::IdempotencyLayer::max_response_body) (default 4 MiB), a
    /// body with trailers, or a body that fails. Nothing is stored then.
    pub async fn capture(
        &self,
        response: impl IntoResponse,
    ) -> Result<StoredResponse, CaptureError> {
        let (parts, body) = response.into_response().into_parts();
        match capture(body, self.max_response_body).await {
            Captured::Complete(body) => Ok(StoredResponse {
                status: parts.status,
                headers: StoredResponse::capture_headers(&parts.headers),
                body,
            }),
            Captured::NotStored(_, TOO_LARGE) => Err(CaptureError::TooLarge {
                max: self.max_response_body,
            }),
            Captured::NotStored(_, why) => Err(CaptureError::Unstorable(why)),
        }
    }

    /// The response to return once `stored` has been committed with this lease's token: the
    /// stored status, headers and body exactly (with `Content-Length`), marked so that the
    /// layer knows the record is complete and does not store it again.
    ///
    /// Return it only after the commit succeeded. Returned without one, the record stays in
    /// flight until the lease expires (duplicates get 409 meanwhile), and then a retry runs.
    pub fn committed(&self, stored: &StoredResponse) -> Response<Body> {
        let mut response: Response<Body> = stored.to_response(false);
        response
            .extensions_mut()
            .insert(HandlerCompleted(self.token));
        response
    }
}

/// Why [`Lease::capture`] could not turn a response into a [`StoredResponse`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaptureError {
    /// The body is larger than this many bytes.
    TooLarge {
        /// The layer's `max_response_body`, in bytes.
        max: usize,
    },
    /// The body has trailers, or failed while it was read.
    Unstorable(&'static str),
}

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaptureError::TooLarge { max } => {
                write!(f, "response body larger than the limit of {max} bytes")
            }
            CaptureError::Unstorable(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for CaptureError {}

impl<S: Send + Sync> FromRequestParts<S> for Lease {
    type Rejection = Response<Body>;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Lease>().cloned().ok_or_else(|| {
            Unrendered::response(Problem::new(
                ProblemKind::NoLease,
                "this handler needs an idempotency lease, and the request has none: it has no \
                 idempotency key, or the handler is not behind the idempotency layer",
            ))
        })
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Lease {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Lease>().cloned())
    }
}

/// In the response extensions: this answer is not the request's outcome (the handler's
/// transaction was fenced and rolled back), so the layer must not store it; a retry then gets
/// the outcome of the request that holds the key.
#[derive(Clone, Copy)]
pub(crate) struct DoNotStore;

impl DoNotStore {
    /// Removes the marker from `extensions`; whether it was there.
    pub(crate) fn take(extensions: &mut Extensions) -> bool {
        extensions.remove::<DoNotStore>().is_some()
    }
}

/// In the response extensions: the handler completed the record with this token itself.
#[derive(Clone)]
pub(crate) struct HandlerCompleted(LeaseToken);

impl HandlerCompleted {
    /// Removes the marker from `extensions`; whether it was there for `token` (a marker for
    /// another lease is dropped and ignored).
    pub(crate) fn take(extensions: &mut Extensions, token: LeaseToken) -> bool {
        extensions
            .remove::<HandlerCompleted>()
            .is_some_and(|marker| marker.0 == token)
    }
}

/// Why a store's `complete_in_transaction` (`PostgresStore`, `MySqlStore`) did not commit. In
/// every case the handler's transaction was rolled back (or never committed): none of its
/// writes happened.
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "mysql"))))]
#[derive(Debug)]
#[non_exhaustive]
pub enum TransactionalError {
    /// The lease's token no longer owns the record: the lease expired and another request
    /// took the key over. That request runs (or ran) the side effects; these writes must not.
    /// As a response: 409 `in-flight` with `Retry-After: 1`, which the layer does not store,
    /// so the client's retry gets the other run's response.
    LeaseLost,
    /// The response could not be stored (too large, trailers, a failing body). As a response:
    /// 500, which the layer never stores (whatever its status policy, or the status a
    /// [`reject_with`](crate::IdempotencyLayer::reject_with) hook gives it), so the retry runs.
    Capture(CaptureError),
    /// The database failed, in the update or the commit. As a response: 503
    /// `store-unavailable` with `Retry-After: 1`; the layer then releases the lease without
    /// storing it (whatever its status policy, or the status a
    /// [`reject_with`](crate::IdempotencyLayer::reject_with) hook gives it), so the retry runs.
    ///
    /// A commit whose answer was lost may still have committed; the release is token-checked,
    /// so it cannot undo a record that did commit, and the retry replays it.
    Database(StoreError),
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
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

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl std::error::Error for TransactionalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TransactionalError::LeaseLost => None,
            TransactionalError::Capture(error) => Some(error),
            TransactionalError::Database(error) => Some(error),
        }
    }
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl IntoResponse for TransactionalError {
    fn into_response(self) -> Response<Body> {
        let retry = std::time::Duration::from_secs(1);
        match self {
            TransactionalError::LeaseLost => {
                let mut response = Unrendered::response(
                    Problem::new(
                        ProblemKind::InFlight,
                        "another request with this idempotency key took over; retry to get \
                         its response",
                    )
                    .retry_after(retry),
                );
                // Not this request's outcome: a retry must get the other request's.
                response.extensions_mut().insert(DoNotStore);
                response
            }
            TransactionalError::Capture(error) => Unrendered::response(Problem::new(
                ProblemKind::ResponseUnstorable,
                format!("the response cannot be stored: {error}"),
            )),
            TransactionalError::Database(_) => Unrendered::response(
                Problem::new(
                    ProblemKind::StoreUnavailable,
                    "the database failed; nothing was committed, retry later",
                )
                .retry_after(retry),
            ),
        }
    }
}
