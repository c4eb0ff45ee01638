//! Begin: the one atomic store call that decides whether a request runs, waits, is refused or
//! is answered with a replay.

use std::{future::Future, sync::Arc, task::Poll, time::Duration};

use axum::body::Body;
use http::{Response, request::Parts};
use tokio::time::Instant;

use crate::{
    config::{Config, InFlight, StoreFailure},
    instrument::{self, Op},
    lease::{LeaseGuard, store_call},
    outcome::{Outcome, problem, trace},
    problem::{Problem, ProblemKind},
    store::{Begin, Fingerprint, LeaseToken, StoreError, StoreErrorKind, StoreKey},
};

/// Backoff slices for waiting on stores without notification: 20 ms doubling to 500 ms.
fn wait_slice(attempt: u32) -> Duration {
    Duration::from_millis((20u64 << attempt.min(5)).min(500))
}

/// Why `begin` did not hand out a lease.
pub(crate) enum Decision {
    /// Answer with this (replay, conflict, mismatch, store failure).
    Respond(Response<Body>),
    /// The store failed and the layer fails open: run without protection.
    Unprotected,
}

/// Returns a lease token that the caller must put in its own [`LeaseGuard`] before it next
/// awaits anything (see [`begin_call`]).
pub(crate) async fn begin(
    config: &Arc<Config>,
    parts: &Parts,
    key: &StoreKey,
    fp: &Fingerprint,
) -> Result<LeaseToken, Decision> {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        let found = begin_call(config, key, fp).await;
        let lease_remaining = match found {
            Ok(Begin::Acquired(token)) => return Ok(token),
            Ok(Begin::Completed {
                fingerprint,
                response,
            }) => {
                if fingerprint != *fp {
                    return Err(Decision::Respond(mismatch(config, parts)));
                }
                // A duplicate that waited for the first request is answered with its replay.
                let outcome = if attempt == 0 {
                    Outcome::Replayed
                } else {
                    Outcome::Waited
                };
                trace(outcome, &parts.method, parts.uri.path(), "");
                return Err(Decision::Respond(outcome.mark(response.to_replay())));
            }
            Ok(Begin::InFlight {
                fingerprint,
                lease_remaining,
            }) => {
                if fingerprint != *fp {
                    return Err(Decision::Respond(mismatch(config, parts)));
                }
                lease_remaining
            }
            Err(error) => return Err(store_failed(config, parts, &error)),
        };
        let timeout = match config.in_flight {
            InFlight::Wait { timeout } => timeout,
            InFlight::Conflict => Duration::ZERO,
        };
        let remaining = timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            let detail = "a request with this idempotency key is still being processed; \
                          retry after it completes";
            return Err(Decision::Respond(problem(
                config,
                parts,
                Outcome::Conflict,
                Problem::new(ProblemKind::InFlight, detail)
                    .retry_after(lease_remaining.min(Duration::from_secs(1))),
            )));
        }
        let slice = wait_slice(attempt).min(remaining);
        attempt += 1;
        // A pause, not a store round trip: it may last the whole slice, longer than the store
        // timeout. Once the slice is over, look again; only an error is a store failure.
        if let Ok(Err(error)) = tokio::time::timeout(slice, config.store.wait(key, slice)).await {
            instrument::store_error(Op::Wait, &error);
            return Err(store_failed(config, parts, &error));
        }
    }
}

/// A `begin` answer on its way to the request: an acquired lease travels in its guard.
enum Answer {
    Found(Begin),
    Acquired(LeaseGuard),
}

/// `store.begin`, such that a lease the store grants always has an owner.
///
/// The call goes on in a task of its own once it has to wait for the store (an in-memory store
/// answers at once and needs none), and a lease it is granted is held by a [`LeaseGuard`] until
/// the request takes the token. So when the request stops waiting while the answer is on its
/// way (its client left and the future was dropped, or the store timeout ran out), the lease is
/// released as soon as it arrives, instead of blocking the key with 409 until it expires. An
/// answer later than the lease itself is not waited for.
async fn begin_call(
    config: &Arc<Config>,
    key: &StoreKey,
    fp: &Fingerprint,
) -> Result<Begin, StoreError> {
    instrument::timed(Op::Begin, begin_owned(config, key, fp)).await
}

/// [`begin_call`], unmeasured.
async fn begin_owned(
    config: &Arc<Config>,
    key: &StoreKey,
    fp: &Fingerprint,
) -> Result<Begin, StoreError> {
    let call = {
        let (config, key, fp) = (config.clone(), *key, *fp);
        async move {
            Ok(match config.store.begin(&key, &fp, config.lease).await? {
                Begin::Acquired(token) => Answer::Acquired(LeaseGuard {
                    config: config.clone(),
                    key,
                    token: Some(token),
                }),
                found => Answer::Found(found),
            })
        }
    };
    // Polled here first: an answer that is ready at once needs no task.
    let mut call = Box::pin(call);
    let answer = match std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await {
        Poll::Ready(answer) => answer?,
        Poll::Pending => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let lease = config.lease;
            tokio::spawn(async move {
                // Not received, the answer is dropped, and its guard releases the lease.
                if let Ok(answer) = tokio::time::timeout(lease, call).await {
                    let _ = tx.send(answer);
                }
            });
            let received = async {
                // Without an answer, the task gave up after the lease.
                rx.await.unwrap_or_else(|_| {
                    Err(StoreError::new(
                        StoreErrorKind::Timeout,
                        "store call timed out",
                    ))
                })
            };
            store_call(config, received).await?
        }
    };
    Ok(match answer {
        Answer::Found(found) => found,
        Answer::Acquired(mut guard) => Begin::Acquired(guard.take()),
    })
}

fn mismatch(config: &Config, parts: &Parts) -> Response<Body> {
    problem(
        config,
        parts,
        Outcome::Mismatch,
        Problem::new(
            ProblemKind::KeyReused,
            "this idempotency key was already used with a different request (method, path, \
             query or body); use a new key for a new request",
        ),
    )
}

fn store_failed(config: &Config, parts: &Parts, error: &StoreError) -> Decision {
    if error.kind() == StoreErrorKind::Full {
        tracing::warn!(target: "tower_idempotency", cause = %error.diagnostic(), "idempotency store is full");
        return Decision::Respond(problem(
            config,
            parts,
            Outcome::Rejected,
            Problem::new(
                ProblemKind::StoreFull,
                "the idempotency store is at capacity; retry later",
            )
            .retry_after(Duration::from_secs(1)),
        ));
    }
    match config.store_failure {
        StoreFailure::FailClosed => {
            tracing::warn!(target: "tower_idempotency", cause = %error.diagnostic(), "idempotency store failed; rejecting");
            Decision::Respond(problem(
                config,
                parts,
                Outcome::Rejected,
                Problem::new(
                    ProblemKind::StoreUnavailable,
                    "the idempotency store is unavailable; the request was not processed, retry later",
                )
                .retry_after(Duration::from_secs(1)),
            ))
        }
        StoreFailure::FailOpen => {
            tracing::warn!(
                target: "tower_idempotency",
                cause = %error.diagnostic(),
                "idempotency store failed; running the request WITHOUT idempotency protection"
            );
            trace(
                Outcome::Bypassed,
                &parts.method,
                parts.uri.path(),
                "store failure, fail open",
            );
            Decision::Unprotected
        }
    }
}
