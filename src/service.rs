//! [`Idempotency`]: the service, and its [`ResponseFuture`].

use std::{
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, extract::OriginalUri};
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt, future::BoxFuture, stream};
use http::{HeaderValue, Method, Request, Response, header, request::Parts};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, LengthLimitError, Limited, StreamBody};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::{
    fingerprint::{self, RequestIdentity},
    key::{IdempotencyKey, KeyError},
    layer::{Config, InFlight, KeyReuse, MissingScope, StoreFailure},
    problem::{Problem, ProblemKind},
    response::StoredResponse,
    store::{Begin, BoxError, Fingerprint, LeaseToken, StoreError, StoreErrorKind, StoreKey},
};

/// The header that marks a response served without protection because the store failed and
/// the layer is set to [`StoreFailure::FailOpen`].
pub const UNPROTECTED_HEADER: http::HeaderName =
    http::HeaderName::from_static("idempotency-unprotected");

/// The service made by [`IdempotencyLayer`](crate::IdempotencyLayer).
#[derive(Clone)]
pub struct Idempotency<S> {
    pub(crate) inner: S,
    pub(crate) config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The outcome of a covered request, as written to the trace (`outcome` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Executed,
    Replayed,
    Conflict,
    Mismatch,
    Rejected,
    Bypassed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
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
fn trace(outcome: Outcome, method: &Method, path: &str, detail: &str) {
    tracing::info!(
        target: "tower_idempotency",
        outcome = outcome.as_str(),
        %method,
        path,
        detail,
        "idempotency"
    );
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: http_body::Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Select: the pass-through path reads nothing and allocates nothing.
        if !self.config.covers(&req) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let key = match IdempotencyKey::from_any_header(req.headers(), &self.config.headers) {
            Ok(Some(key)) => key,
            Ok(None) if !self.config.require_key => {
                tracing::debug!(target: "tower_idempotency", outcome = "bypassed", detail = "no key");
                return ResponseFuture::passthrough(self.inner.call(req));
            }
            Ok(None) => {
                return ResponseFuture::ready(reject_key(&req, KeyError::Missing, &self.config));
            }
            Err(error) => return ResponseFuture::ready(reject_key(&req, error, &self.config)),
        };
        // The ready service is the one to call; keep a fresh clone for the next request
        // (see axum's `from_fn`): the call happens later, inside the future.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::covered(Box::pin(handle(self.config.clone(), inner, req, key)))
    }
}

fn reject_key<B>(req: &Request<B>, error: KeyError, config: &Config) -> Response<Body> {
    trace(
        Outcome::Rejected,
        req.method(),
        req.uri().path(),
        "invalid key",
    );
    let names = config
        .headers
        .iter()
        .map(|name| name.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    let detail = match error {
        KeyError::Missing => {
            format!("this endpoint requires an idempotency key in the {names} header")
        }
        other => format!("{other} (header {names})"),
    };
    Problem::new(ProblemKind::InvalidKey, detail).into_response()
}

fn problem(parts: &Parts, outcome: Outcome, problem: Problem) -> Response<Body> {
    trace(
        outcome,
        &parts.method,
        parts.uri.path(),
        problem.kind.title(),
    );
    problem.into_response()
}

/// Runs a store call under the configured timeout.
async fn store_call<T>(
    config: &Config,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(config.store_timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::new(
            StoreErrorKind::Timeout,
            "store call timed out",
        )),
    }
}

/// Backoff slices for waiting on stores without notification: 20 ms doubling to 500 ms.
fn wait_slice(attempt: u32) -> Duration {
    Duration::from_millis((20u64 << attempt.min(5)).min(500))
}

async fn handle<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    req: Request<ReqBody>,
    key: IdempotencyKey,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: http_body::Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();

    // Scope.
    let Some(scope) = config.scope.extract(&parts) else {
        return match config.missing_scope {
            MissingScope::Reject => Ok(problem(
                &parts,
                Outcome::Rejected,
                Problem::new(
                    ProblemKind::MissingScope,
                    "an idempotency key needs an identified caller, and none was found for this \
                     request (no credentials; when the scope comes from an authentication layer, \
                     that layer must run before, i.e. outside, the idempotency layer)",
                ),
            )),
            MissingScope::PassThrough => {
                trace(
                    Outcome::Bypassed,
                    &parts.method,
                    parts.uri.path(),
                    "no scope",
                );
                let response = inner.oneshot(Request::from_parts(parts, body)).await?;
                Ok(response.map(Body::new))
            }
        };
    };

    // Buffer, never past the limit.
    let limit = config.max_request_body;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        Problem::new(
            ProblemKind::BodyTooLarge,
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    };
    if declared.is_some_and(|len| len > limit as u64) {
        return Ok(problem(&parts, Outcome::Rejected, too_large()));
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(problem(&parts, Outcome::Rejected, too_large()));
        }
        Err(error) => {
            let detail = format!("the request body could not be read: {error}");
            return Ok(problem(
                &parts,
                Outcome::Rejected,
                Problem::new(ProblemKind::BodyUnreadable, detail),
            ));
        }
    };

    // Fingerprint, of the endpoint as the client named it: a router nested under a prefix sees
    // the URI without it, and `/orgs/1/calls` and `/orgs/2/calls` are not one endpoint.
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or(&parts.uri, |original| &original.0);
    let path = uri.path();
    let id = RequestIdentity {
        scope: &scope,
        method: &parts.method,
        path,
        key: &key,
    };
    let json = config.canonical_json && fingerprint::is_json(&parts.headers);
    let (kind, digest) = fingerprint::body_digest_remembered(&scope, &bytes, json);
    let fp = fingerprint::fingerprint(&id, uri.query(), kind, &digest);
    let store_key = match config.key_reuse {
        KeyReuse::NewRequest => StoreKey(fp.0),
        KeyReuse::Reject => fingerprint::store_key(&id),
    };

    // Begin.
    let token = match begin(&config, &parts, &store_key, &fp).await {
        Ok(token) => token,
        Err(Decision::Respond(response)) => return Ok(response),
        Err(Decision::Unprotected) => {
            let req = Request::from_parts(parts, ReqBody::from(bytes));
            let mut response = inner.oneshot(req).await?.map(Body::new);
            response
                .headers_mut()
                .insert(UNPROTECTED_HEADER, HeaderValue::from_static("true"));
            return Ok(response);
        }
    };

    // Run (on its own task unless cancellation is wanted), capture, complete.
    let method = parts.method.clone();
    let path = path.to_owned();
    let req = Request::from_parts(parts, ReqBody::from(bytes));
    let guard = LeaseGuard {
        config: config.clone(),
        key: store_key,
        token: Some(token),
    };
    let job = execute(config.clone(), inner, req, guard, method, path);
    let panic = if config.run_to_completion {
        match tokio::spawn(job).await {
            Ok(result) => return result,
            Err(error) if error.is_panic() => error.into_panic(),
            Err(_) => {
                return Ok(Problem::new(
                    ProblemKind::StoreUnavailable,
                    "the server is shutting down",
                )
                .retry_after(Duration::from_secs(1))
                .into_response());
            }
        }
    } else {
        match AssertUnwindSafe(job).catch_unwind().await {
            Ok(result) => return result,
            Err(panic) => panic,
        }
    };
    // The handler panicked. Its guard released the lease from a background task on drop;
    // release it here too (the token check makes the second call a no-op) so that it is gone
    // before the 500 reaches the client, whose immediate retry must run, not get 409. Then let
    // the panic continue outward, as if the handler had run here, for a catch-panic layer.
    release(&config, &store_key, token).await;
    std::panic::resume_unwind(panic)
}

/// Why `begin` did not hand out a lease.
enum Decision {
    /// Answer with this (replay, conflict, mismatch, store failure).
    Respond(Response<Body>),
    /// The store failed and the layer fails open: run without protection.
    Unprotected,
}

/// Returns a lease token that the caller must put in its own [`LeaseGuard`] before it next
/// awaits anything (see [`begin_call`]).
async fn begin(
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
                    return Err(Decision::Respond(mismatch(parts)));
                }
                trace(Outcome::Replayed, &parts.method, parts.uri.path(), "");
                return Err(Decision::Respond(response.to_replay()));
            }
            Ok(Begin::InFlight {
                fingerprint,
                lease_remaining,
            }) => {
                if fingerprint != *fp {
                    return Err(Decision::Respond(mismatch(parts)));
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

fn mismatch(parts: &Parts) -> Response<Body> {
    problem(
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
        tracing::warn!(target: "tower_idempotency", %error, "idempotency store is full");
        return Decision::Respond(problem(
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
            tracing::warn!(target: "tower_idempotency", %error, "idempotency store failed; rejecting");
            Decision::Respond(problem(
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
                %error,
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

/// Owns a lease until it is completed or released; dropping it while armed (a panic, a
/// cancelled future) releases the lease in the background so a retry can run.
struct LeaseGuard {
    config: Arc<Config>,
    key: StoreKey,
    token: Option<LeaseToken>,
}

impl LeaseGuard {
    fn token(&self) -> LeaseToken {
        self.token.expect("lease guard used after it was settled")
    }

    /// Hands the lease over to another owner.
    fn take(&mut self) -> LeaseToken {
        self.token
            .take()
            .expect("lease guard used after it was settled")
    }

    /// The lease is settled (completed, or deliberately left to expire).
    fn disarm(&mut self) {
        self.token = None;
    }

    async fn release(&mut self) {
        if let Some(token) = self.token.take() {
            release(&self.config, &self.key, token).await;
        }
    }
}

async fn release(config: &Config, key: &StoreKey, token: LeaseToken) {
    if let Err(error) = store_call(config, config.store.release(key, token)).await {
        tracing::warn!(
            target: "tower_idempotency",
            %error,
            "could not release an idempotency lease; it will expire"
        );
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let config = self.config.clone();
        let key = self.key;
        runtime.spawn(async move { release(&config, &key, token).await });
    }
}

async fn execute<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    req: Request<ReqBody>,
    mut guard: LeaseGuard,
    method: Method,
    path: String,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let work = async {
        let response = inner.oneshot(req).await?;
        let (parts, body) = response.into_parts();
        // A 1xx is no final response (hyper sends 500 in its place): never stored, whatever the
        // policy says.
        if parts.status.is_informational() || !(config.status_policy)(parts.status) {
            return Ok((
                parts,
                Captured::NotStored(Body::new(body), "status not stored"),
            ));
        }
        Ok((parts, capture(body, config.max_response_body).await))
    };
    let (parts, captured) = match renewing(&config, &guard, work).await {
        Ok(done) => done,
        Err(error) => {
            guard.release().await;
            return Err(error);
        }
    };
    let (body, detail) = match captured {
        Captured::Complete(bytes) => {
            let stored = StoredResponse {
                status: parts.status,
                headers: StoredResponse::capture_headers(&parts.headers),
                body: bytes.clone(),
            };
            let token = guard.token();
            let completed = store_call(
                &config,
                config
                    .store
                    .complete(&guard.key, token, &stored, config.ttl),
            )
            .await;
            // Whatever happens, do not release: a lease that could not be completed is left
            // to expire rather than let a retry run the handler a second time at once.
            guard.disarm();
            let detail = match completed {
                Ok(true) => "stored",
                Ok(false) => {
                    tracing::warn!(
                        target: "tower_idempotency",
                        %method,
                        path,
                        "lease was lost before completion (it expired and was taken over); \
                         response not stored"
                    );
                    "lease lost, not stored"
                }
                Err(error) if is_passing(&error) => {
                    tracing::warn!(
                        target: "tower_idempotency",
                        %method,
                        path,
                        %error,
                        "could not store the response; trying again in the background"
                    );
                    // The client gets its response now; duplicates meanwhile get 409.
                    let (config, key) = (config.clone(), guard.key);
                    let (method, path) = (method.clone(), path.clone());
                    tokio::spawn(async move {
                        complete_again(&config, &key, token, &stored, &method, &path).await;
                    });
                    "store failed, retrying in the background"
                }
                Err(error) => {
                    tracing::error!(
                        target: "tower_idempotency",
                        %method,
                        path,
                        %error,
                        "could not store the response; retries get 409 until the lease expires"
                    );
                    "store failed, not stored"
                }
            };
            (Body::from(bytes), detail)
        }
        Captured::NotStored(body, why) => {
            guard.release().await;
            if why == TOO_LARGE {
                tracing::warn!(
                    target: "tower_idempotency",
                    %method,
                    path,
                    max = config.max_response_body,
                    "response body over the capture limit; sent without storing"
                );
            }
            (body, why)
        }
    };
    trace(Outcome::Executed, &method, &path, detail);
    Ok(Response::from_parts(parts, body))
}

/// How many times a failed or timed-out `complete` is tried again.
const COMPLETE_RETRIES: u32 = 2;

/// Whether a store error may pass if the call is tried again.
fn is_passing(error: &StoreError) -> bool {
    matches!(
        error.kind(),
        StoreErrorKind::Unavailable | StoreErrorKind::Timeout
    )
}

/// Tries a completion that failed again, twice (after 20 ms, then 40 ms), off the response
/// path. A completion lost to a passing store fault leaves the lease to expire, after which a
/// retry would run the handler a second time; the token check keeps a repeated call harmless.
async fn complete_again(
    config: &Config,
    key: &StoreKey,
    token: LeaseToken,
    stored: &StoredResponse,
    method: &Method,
    path: &str,
) {
    for attempt in 0..COMPLETE_RETRIES {
        tokio::time::sleep(wait_slice(attempt)).await;
        let result = store_call(
            config,
            config.store.complete(key, token, stored, config.ttl),
        )
        .await;
        match result {
            Ok(true) => {
                tracing::info!(target: "tower_idempotency", %method, path, "response stored on a later try");
                return;
            }
            Ok(false) => {
                tracing::warn!(target: "tower_idempotency", %method, path, "lease was lost before completion; response not stored");
                return;
            }
            Err(error) if is_passing(&error) && attempt + 1 < COMPLETE_RETRIES => {}
            Err(error) => {
                tracing::error!(
                    target: "tower_idempotency",
                    %method,
                    path,
                    %error,
                    "could not store the response; retries get 409 until the lease expires"
                );
                return;
            }
        }
    }
}

/// Drives `work` while renewing the guard's lease every third of the lease duration.
async fn renewing<T>(config: &Config, guard: &LeaseGuard, work: impl Future<Output = T>) -> T {
    let every = config.lease / 3;
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            biased;
            done = &mut work => return done,
            _ = tick.tick() => {
                let renewed = store_call(config, config.store.renew(&guard.key, guard.token(), config.lease)).await;
                match renewed {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(target: "tower_idempotency", "idempotency lease was lost while the handler ran"),
                    Err(error) => tracing::warn!(target: "tower_idempotency", %error, "could not renew an idempotency lease"),
                }
            }
        }
    }
}

const TOO_LARGE: &str = "response too large to store";

enum Captured {
    /// The whole body, within the cap.
    Complete(Bytes),
    /// A body to send as it is, with the reason it is not stored.
    NotStored(Body, &'static str),
}

/// Collects `body` up to `cap` bytes. Past the cap, with trailers, or on a body error, the
/// frames read so far are put back in front of the rest so the client still gets it all.
async fn capture<B>(body: B, cap: usize) -> Captured
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut body = Body::new(body);
    if http_body::Body::size_hint(&body).lower() > cap as u64 {
        return Captured::NotStored(body, TOO_LARGE);
    }
    let mut buf = BytesMut::new();
    let why = loop {
        match body.frame().await {
            None => return Captured::Complete(buf.freeze()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if buf.len() + data.len() <= cap => buf.extend_from_slice(&data),
                Ok(data) => {
                    let head = stream::iter([Ok(Frame::data(buf.freeze())), Ok(Frame::data(data))]);
                    let rest = head.chain(BodyStream::new(body));
                    return Captured::NotStored(Body::new(StreamBody::new(rest)), TOO_LARGE);
                }
                Err(trailers) => {
                    let frames = [Ok(Frame::data(buf.freeze())), Ok(trailers)];
                    break (frames, "response has trailers");
                }
            },
            Some(Err(error)) => {
                let frames = [Ok(Frame::data(buf.freeze())), Err(error)];
                break (frames, "response body failed");
            }
        }
    };
    let (frames, reason) = why;
    Captured::NotStored(Body::new(StreamBody::new(stream::iter(frames))), reason)
}

pin_project! {
    /// The response future of [`Idempotency`].
    pub struct ResponseFuture<F, E> {
        #[pin]
        kind: Kind<F, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, E> {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Response<Body>> },
        Covered { future: BoxFuture<'static, Result<Response<Body>, E>> },
    }
}

impl<F, E> ResponseFuture<F, E> {
    fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough { future },
        }
    }

    fn ready(response: Response<Body>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    fn covered(future: BoxFuture<'static, Result<Response<Body>, E>>) -> Self {
        Self {
            kind: Kind::Covered { future },
        }
    }
}

impl<F, E> fmt::Debug for ResponseFuture<F, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Ready { .. } => "ready",
            Kind::Covered { .. } => "covered",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(Body::new))),
            KindProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            KindProj::Covered { future } => future.as_mut().poll(cx),
        }
    }
}
