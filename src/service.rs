//! [`Idempotency`]: the service, and the order of the stages of a covered request.
//!
//! Select and validate ([`Service::call`]), scope, buffer, fingerprint (`stages`), begin
//! ([`crate::begin`]), run and capture (`execute`, [`crate::capture`]), complete
//! ([`crate::lease`]). Each stage lives in the file named after it; this file only orders them.
//! Every covered response leaves marked with its [`Outcome`], which `handle` counts (feature
//! `metrics`, [`crate::instrument`]).

use std::{
    any::Any,
    fmt,
    panic::AssertUnwindSafe,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, extract::OriginalUri};
use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::{Service, ServiceExt};

use crate::{
    begin::{Decision, begin},
    capture::{Captured, TOO_LARGE, capture},
    config::{Config, KeyReuse, MissingScope},
    fingerprint::{self, RequestIdentity},
    future::ResponseFuture,
    instrument::{self, Route},
    key::{IdempotencyKey, KeyError},
    lease::{self, LeaseGuard, release, renewing},
    outcome::{Outcome, problem, trace},
    problem::{Problem, ProblemKind},
    reject::Unrendered,
    response::StoredResponse,
    scope::ScopeDigest,
    store::{BoxError, StoreKey},
    transactional::{DoNotStore, HANDLER_COMPLETED, HandlerCompleted, Lease},
};

/// The header that marks a response served without protection because the store failed and
/// the layer is set to [`StoreFailure::FailOpen`](crate::StoreFailure::FailOpen).
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
            return ResponseFuture::passthrough(self.inner.call(req), self.rerenders());
        }
        let route = Route::of(&self.config, &req);
        let key = match IdempotencyKey::from_any_header(req.headers(), &self.config.headers) {
            Ok(Some(key)) => key,
            Ok(None) if !self.config.require_key => {
                tracing::debug!(target: "tower_idempotency", outcome = "bypassed", detail = "no key");
                instrument::request(&route, Outcome::Bypassed);
                return ResponseFuture::bypassed(self.inner.call(req), self.rerenders());
            }
            Ok(None) => {
                instrument::request(&route, Outcome::Rejected);
                return ResponseFuture::ready(reject_key(&req, KeyError::Missing, &self.config));
            }
            Err(error) => {
                instrument::request(&route, Outcome::Rejected);
                return ResponseFuture::ready(reject_key(&req, error, &self.config));
            }
        };
        // The ready service is the one to call; keep a fresh clone for the next request
        // (see axum's `from_fn`): the call happens later, inside the future.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::covered(Box::pin(handle(
            self.config.clone(),
            inner,
            req,
            key,
            route,
        )))
    }
}

impl<S> Idempotency<S> {
    /// The settings a passed-through response needs when it may be a rejection of the
    /// [`Lease`] extractor to render again; `None` (and no reference counting) by default.
    fn rerenders(&self) -> Option<Arc<Config>> {
        (!self.config.reject.is_default()).then(|| self.config.clone())
    }
}

/// The first keyed request without a scope is most often a server misconfiguration (an
/// authentication layer inside the idempotency layer instead of outside it): say so once, with
/// the fix, in the server's log.
fn warn_missing_scope_once(config: &Config) {
    if !config
        .missing_scope_warned
        .swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!(
            target: "tower_idempotency",
            "a covered request with an idempotency key had no scope (no caller identity). If \
             your authentication layer puts the caller in the request extensions, it must run \
             before the idempotency layer: add it with `.layer(..)` after the idempotency layer \
             (or use `route_layer` for the idempotency layer). Said once per layer."
        );
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
    Outcome::Rejected.mark(
        config
            .reject
            .render(Problem::new(ProblemKind::InvalidKey, detail)),
    )
}

/// How a covered request ended without a response: the inner service's error (after the
/// handler ran, or ran unprotected), or the handler's panic.
enum Ended<E> {
    Error(Outcome, E),
    Panic(Box<dyn Any + Send>),
}

/// A covered request from its scope on; counts its [`Outcome`], which every response of
/// [`stages`] carries in its extensions.
async fn handle<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    req: Request<ReqBody>,
    key: IdempotencyKey,
    route: Route,
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
    match stages(config, inner, req, key).await {
        Ok(response) => {
            let outcome = response.extensions().get::<Outcome>().copied();
            debug_assert!(outcome.is_some(), "a covered response without its outcome");
            instrument::request(&route, outcome.unwrap_or(Outcome::Executed));
            Ok(response)
        }
        Err(Ended::Error(outcome, error)) => {
            instrument::request(&route, outcome);
            Err(error)
        }
        Err(Ended::Panic(panic)) => {
            instrument::request(&route, Outcome::Executed);
            std::panic::resume_unwind(panic)
        }
    }
}

/// Scope, buffer, fingerprint, begin, then run, capture and complete.
async fn stages<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    req: Request<ReqBody>,
    key: IdempotencyKey,
) -> Result<Response<Body>, Ended<S::Error>>
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
    let (mut parts, body) = req.into_parts();

    // Scope.
    let Some(scope) = config.scope.extract(&parts) else {
        warn_missing_scope_once(&config);
        return match config.missing_scope {
            MissingScope::Reject => Ok(problem(
                &config,
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
                parts.extensions.insert(key);
                let response = inner
                    .oneshot(Request::from_parts(parts, body))
                    .await
                    .map_err(|error| Ended::Error(Outcome::Bypassed, error))?;
                Ok(Outcome::Bypassed.mark(config.reject.rerender(response.map(Body::new))))
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
        return Ok(problem(&config, &parts, Outcome::Rejected, too_large()));
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(problem(&config, &parts, Outcome::Rejected, too_large()));
        }
        Err(error) => {
            let detail = format!("the request body could not be read: {error}");
            return Ok(problem(
                &config,
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
    // The request key (scope, method, path, idempotency key) is the record key in strict mode
    // and the key of the remembered canonical digests; a text body in the default mode needs
    // neither, and is spared its three SHA-256 blocks.
    let strict = config.key_reuse == KeyReuse::Reject;
    let request_key = (json || strict).then(|| fingerprint::store_key(&id));
    let (kind, digest) = match &request_key {
        Some(request_key) => fingerprint::body_digest_remembered(request_key, &bytes, json),
        None => fingerprint::body_digest(&bytes, false),
    };
    let fp = fingerprint::fingerprint(&id, uri.query(), kind, &digest);
    let store_key = match request_key {
        Some(request_key) if strict => request_key,
        _ => StoreKey(fp.0),
    };

    // Begin.
    let token = match begin(&config, &parts, &store_key, &fp).await {
        Ok(token) => token,
        Err(Decision::Respond(response)) => return Ok(response),
        Err(Decision::Unprotected) => {
            parts.extensions.insert(ScopeDigest::of(&scope));
            parts.extensions.insert(key);
            let req = Request::from_parts(parts, ReqBody::from(bytes));
            let mut response = config.reject.rerender(
                inner
                    .oneshot(req)
                    .await
                    .map_err(|error| Ended::Error(Outcome::Bypassed, error))?
                    .map(Body::new),
            );
            response
                .headers_mut()
                .insert(UNPROTECTED_HEADER, HeaderValue::from_static("true"));
            return Ok(Outcome::Bypassed.mark(response));
        }
    };

    // Run (on its own task unless cancellation is wanted), capture, complete.
    let method = parts.method.clone();
    let path = path.to_owned();
    // What the handler may read: the validated key, whose it is, and its lease.
    parts.extensions.insert(ScopeDigest::of(&scope));
    parts.extensions.insert(key);
    parts
        .extensions
        .insert(Lease::from_config(store_key, token, &config));
    let req = Request::from_parts(parts, ReqBody::from(bytes));
    let guard = LeaseGuard {
        config: config.clone(),
        key: store_key,
        token: Some(token),
    };
    // Boxed: the future is large (the handler's future, capture, completion), and a box moves
    // as one pointer into the task or the catch-unwind wrapper, and keeps this future small.
    let job = Box::pin(execute(config.clone(), inner, req, guard, method, path));
    let panic = if config.run_to_completion {
        // Tracked, so that a shutdown can wait for a handler whose client has gone.
        match config.tracker.spawn(job).await {
            Ok(result) => return result.map_err(|error| Ended::Error(Outcome::Executed, error)),
            Err(error) if error.is_panic() => error.into_panic(),
            Err(_) => {
                return Ok(Outcome::Rejected.mark(
                    config.reject.render(
                        Problem::new(ProblemKind::StoreUnavailable, "the server is shutting down")
                            .retry_after(Duration::from_secs(1)),
                    ),
                ));
            }
        }
    } else {
        match AssertUnwindSafe(job).catch_unwind().await {
            Ok(result) => return result.map_err(|error| Ended::Error(Outcome::Executed, error)),
            Err(panic) => panic,
        }
    };
    // The handler panicked. Its guard released the lease from a background task on drop;
    // release it here too (the token check makes the second call a no-op) so that it is gone
    // before the 500 reaches the client, whose immediate retry must run, not get 409. Then let
    // the panic continue outward, as if the handler had run here, for a catch-panic layer.
    release(&config, &store_key, token).await;
    Err(Ended::Panic(panic))
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
        // A rejection made inside the handler (`TransactionalError`, the `Lease` extractor) is
        // rendered with the layer's settings before anything else. It is never stored: its
        // transaction rolled back, so a retry must run, whatever status the hook gives it or
        // the status policy takes. `Body::new` here boxes the body once, as capturing it
        // would; later calls find a `Body` and do not box it again.
        let response = inner.oneshot(req).await?.map(Body::new);
        let rejection = Unrendered::is_in(&response);
        let response = config.reject.rerender(response);
        let (mut parts, body) = response.into_parts();
        // The handler stored the record itself, in its own transaction: this is the stored
        // response, and the lease is settled.
        if HandlerCompleted::take(&mut parts.extensions, guard.token()) {
            return Ok((
                parts,
                Captured::NotStored(Body::new(body), HANDLER_COMPLETED),
            ));
        }
        // A 1xx is no final response (hyper sends 500 in its place): never stored, whatever the
        // policy says; nor is an answer that says the handler did not get to finish (a fenced
        // transactional completion, a rejection of the layer's own).
        if parts.status.is_informational()
            || !(config.status_policy)(parts.status)
            || DoNotStore::take(&mut parts.extensions)
            || rejection
        {
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
            let detail = lease::complete(guard, stored, &method, &path).await;
            (Body::from(bytes), detail)
        }
        Captured::NotStored(body, HANDLER_COMPLETED) => {
            guard.take();
            (body, HANDLER_COMPLETED)
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
    Ok(Outcome::Executed.mark(Response::from_parts(parts, body)))
}
