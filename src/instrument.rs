//! Metrics through the `metrics` facade (feature `metrics`); without the feature every item
//! here is empty and costs nothing.
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `idempotency_requests_total` | counter | `outcome`, `route` | covered requests, by [`Outcome`] |
//! | `idempotency_store_duration_seconds` | histogram, seconds | `op` | store calls of the layer: `begin`, `complete`, `renew`, `release` |
//! | `idempotency_store_errors_total` | counter | `op`, `kind` | failed store calls (`wait` too), by [`StoreErrorKind`](crate::store::StoreErrorKind) |
//! | `idempotency_completion_retries_total` | counter | none | later tries of `complete` after a failed one (durable completion) |

#[cfg(feature = "metrics")]
use std::future::Future;

use http::Request;

use crate::{config::Config, outcome::Outcome, store::StoreError};

/// The `route` label for requests whose route template is unknown: no axum `MatchedPath` and
/// no allow-list.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const UNMATCHED: &str = "unmatched";

/// A store call, the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Begin,
    Complete,
    Renew,
    Release,
    Wait,
}

impl Op {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn as_str(self) -> &'static str {
        match self {
            Op::Begin => "begin",
            Op::Complete => "complete",
            Op::Renew => "renew",
            Op::Release => "release",
            Op::Wait => "wait",
        }
    }
}

/// The route template of a covered request, the `route` label; empty without the feature.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    #[cfg(feature = "metrics")]
    label: metrics::SharedString,
}

impl Route {
    /// The route template of `req`: the allow-list's template that covers it, else axum's
    /// `MatchedPath`, else [`UNMATCHED`]. Never the raw path, so the label set stays bounded.
    #[inline]
    pub(crate) fn of<B>(config: &Config, req: &Request<B>) -> Self {
        #[cfg(feature = "metrics")]
        {
            Self {
                label: config.route_template(req),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (config, req);
            Self {}
        }
    }
}

/// Counts one covered request.
#[inline]
pub(crate) fn request(route: &Route, outcome: Outcome) {
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "idempotency_requests_total",
        "outcome" => outcome.as_str(),
        "route" => route.label.clone(),
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (route, outcome);
}

/// Counts a failed store call.
#[inline]
pub(crate) fn store_error(op: Op, error: &StoreError) {
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "idempotency_store_errors_total",
        "op" => op.as_str(),
        "kind" => kind(error.kind()),
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (op, error);
}

/// Counts a later try of `complete`.
#[inline]
pub(crate) fn completion_retry() {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_completion_retries_total").increment(1);
}

/// `call`, its duration recorded under `op` and its error counted. Without the feature, `call`
/// itself.
#[cfg(feature = "metrics")]
pub(crate) async fn timed<T>(
    op: Op,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = tokio::time::Instant::now();
    let result = call.await;
    metrics::histogram!("idempotency_store_duration_seconds", "op" => op.as_str())
        .record(started.elapsed().as_secs_f64());
    if let Err(error) = &result {
        store_error(op, error);
    }
    result
}

/// `call`, its duration recorded under `op` and its error counted. Without the feature, `call`
/// itself.
#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn timed<F>(_: Op, call: F) -> F {
    call
}

/// The `kind` label of a store error.
#[cfg(feature = "metrics")]
fn kind(kind: crate::store::StoreErrorKind) -> &'static str {
    use crate::store::StoreErrorKind;
    match kind {
        StoreErrorKind::Unavailable => "unavailable",
        StoreErrorKind::Timeout => "timeout",
        StoreErrorKind::Full => "full",
        StoreErrorKind::Corrupt => "corrupt",
    }
}

/// Registers the metrics' descriptions and units with the recorder in place (the Prometheus
/// exporter writes them as `# HELP` lines). Called when the layer wraps a service.
#[inline]
pub(crate) fn describe() {
    #[cfg(feature = "metrics")]
    {
        use metrics::{Unit, describe_counter, describe_histogram};
        describe_counter!(
            "idempotency_requests_total",
            Unit::Count,
            "Requests on routes covered by the idempotency layer, by outcome and route template"
        );
        describe_histogram!(
            "idempotency_store_duration_seconds",
            Unit::Seconds,
            "Duration of the idempotency layer's store calls, by operation"
        );
        describe_counter!(
            "idempotency_store_errors_total",
            Unit::Count,
            "Failed idempotency store calls, by operation and error kind"
        );
        describe_counter!(
            "idempotency_completion_retries_total",
            Unit::Count,
            "Later tries to store a response after a failed one (durable completion)"
        );
    }
}
