//! [`Outcome`]: what became of a covered request, as the trace reports it.

use axum::body::Body;
use http::{Method, Response, request::Parts};

use crate::{config::Config, problem::Problem};

/// The outcome of a covered request, as written to the trace (`outcome` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Executed,
    Replayed,
    Conflict,
    Mismatch,
    Rejected,
    Bypassed,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::Replayed => "replayed",
            Outcome::Conflict => "conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::Rejected => "rejected",
            Outcome::Bypassed => "bypassed",
        }
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

/// A rejection, traced with its outcome and rendered with the layer's settings.
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
    config.reject.render(problem)
}
