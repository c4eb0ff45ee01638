//! [`Outcome`]: what became of a covered request, as the trace, the response extensions and
//! the metrics report it.

use axum::body::Body;
use http::{Method, Response, request::Parts};

use crate::{config::Config, problem::Problem};

/// What became of a request on a covered route: one per response the layer sends.
///
/// The layer puts it in the **response extensions** of every covered response (a request on an
/// allow-listed route, or any `POST` when the allow-list is empty), so that the application's
/// own logging or metrics can read it, for example in a `tower_http::trace` `on_response`
/// callback or an outer middleware:
///
/// ```
/// use axum::{Router, body::Body, http::Request, routing::post};
/// use tower::ServiceExt;
/// use tower_idempotency::{IdempotencyLayer, Outcome};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let app: Router = Router::new()
///     .route("/calls", post(|| async { "created" }))
///     .route_layer(IdempotencyLayer::new());
/// let request = || {
///     Request::post("/calls")
///         .header("authorization", "Bearer sk_test_1")
///         .header("x-idempotency-key", "k-1")
///         .body(Body::empty())
///         .unwrap()
/// };
/// let first = app.clone().oneshot(request()).await.unwrap();
/// assert_eq!(first.extensions().get::<Outcome>(), Some(&Outcome::Executed));
/// let retry = app.oneshot(request()).await.unwrap();
/// assert_eq!(retry.extensions().get::<Outcome>(), Some(&Outcome::Replayed));
/// # }
/// ```
///
/// Requests on routes the layer does not cover carry none. The same value is the `outcome`
/// field of the layer's trace event and the `outcome` label of the `idempotency_requests_total`
/// counter (feature `metrics`); [`as_str`](Self::as_str) gives that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// `executed`: the request took the lease and its handler ran (whatever its status, and
    /// whether or not the response was stored). A handler that panicked counts here too.
    Executed,
    /// `replayed`: answered from a completed record, without running the handler.
    Replayed,
    /// `waited`: a duplicate that arrived while the first request was running, waited for it
    /// ([`InFlight::Wait`](crate::InFlight::Wait)) and was answered with its replay.
    Waited,
    /// `conflict`: a duplicate of a request still in flight, answered 409 with `Retry-After`
    /// (at once, or after waiting in vain).
    Conflict,
    /// `mismatch`: strict mode ([`KeyReuse::Reject`](crate::KeyReuse::Reject)), the key was
    /// used with another request; answered 422.
    Mismatch,
    /// `rejected`: answered with another rejection (invalid or missing key, no scope, body too
    /// large or unreadable, store failure or full); the handler did not run.
    Rejected,
    /// `bypassed`: the handler ran without idempotency protection: no key on a route where the
    /// key is optional, no scope with [`MissingScope::PassThrough`](crate::MissingScope), or a
    /// store failure with [`StoreFailure::FailOpen`](crate::StoreFailure::FailOpen).
    Bypassed,
}

impl Outcome {
    /// The outcome's name, in lowercase: `executed`, `replayed`, `waited`, `conflict`,
    /// `mismatch`, `rejected` or `bypassed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::Replayed => "replayed",
            Outcome::Waited => "waited",
            Outcome::Conflict => "conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::Rejected => "rejected",
            Outcome::Bypassed => "bypassed",
        }
    }

    /// Marks `response` with this outcome (in its extensions).
    pub(crate) fn mark<B>(self, mut response: Response<B>) -> Response<B> {
        response.extensions_mut().insert(self);
        response
    }
}

/// One event per covered request. Never carries the key or a credential.
pub(crate) fn trace(outcome: Outcome, method: &Method, path: &str, detail: &str) {
    tracing::info!(
        target: "tower_idempotency",
        outcome = outcome.as_str(),
        %method,
        path,
        detail,
        "idempotency"
    );
}

/// A rejection, traced, rendered with the layer's settings and marked with its outcome.
pub(crate) fn problem(
    config: &Config,
    parts: &Parts,
    outcome: Outcome,
    problem: Problem,
) -> Response<Body> {
    trace(
        outcome,
        &parts.method,
        parts.uri.path(),
        problem.kind.title(),
    );
    outcome.mark(config.reject.render(problem))
}
