//! [`IdempotencyLayer`]: the by-value builder.

use std::{fmt, sync::Arc, time::Duration};

use axum::response::IntoResponse;
use http::{HeaderName, Method, StatusCode};
use tokio_util::task::TaskTracker;
use tower::Layer;

/// The default [`max_response_body`](IdempotencyLayer::max_response_body): 4 MiB.
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 4 * 1024 * 1024;

/// The default [completion deadline](IdempotencyLayer::completion_deadline): 5 minutes.
pub const DEFAULT_COMPLETION_DEADLINE: Duration = Duration::from_secs(5 * 60);

use crate::{
    config::{
        Config, DEFAULT_HEADER, IETF_HEADER, InFlight, KeyReuse, MAX_DURATION, MissingScope,
        Routes, StoreFailure, default_status_policy,
    },
    drain::Drain,
    problem::Problem,
    problem_types::ProblemTypes,
    reject::Reject,
    scope::{AuthorizationScope, ScopeExtractor},
    service::Idempotency,
    store::{IdempotencyStore, MemoryStore},
};

/// A [`Layer`] that makes covered requests idempotent. See the [crate docs](crate) for the
/// flow and an example.
///
/// Every setting has a default, so `IdempotencyLayer::new()` alone protects every POST that
/// reaches it (use it with `route_layer`), keyed by `X-Idempotency-Key`, scoped by the hashed
/// `Authorization` header, in a [`MemoryStore`]. Setters take and return the layer by value.
#[derive(Clone)]
pub struct IdempotencyLayer {
    pub(crate) config: Arc<Config>,
}

impl Default for IdempotencyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("IdempotencyLayer")
            .field("headers", &c.headers)
            .field("require_key", &c.require_key)
            .field("key_reuse", &c.key_reuse)
            .field("in_flight", &c.in_flight)
            .field("lease", &c.lease)
            .field("ttl", &c.ttl)
            .field("max_request_body", &c.max_request_body)
            .field("max_response_body", &c.max_response_body)
            .field("store_timeout", &c.store_timeout)
            .field("store_failure", &c.store_failure)
            .field("run_to_completion", &c.run_to_completion)
            .field("canonical_json", &c.canonical_json)
            .field("problem_types", &c.reject.types)
            .field("reject_with", &c.reject.hook.is_some())
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// A layer with every default (see each setter) and a fresh [`MemoryStore`].
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                store: Arc::new(MemoryStore::new()),
                routes: None,
                headers: vec![DEFAULT_HEADER, IETF_HEADER],
                require_key: false,
                scope: Arc::new(AuthorizationScope),
                missing_scope: MissingScope::Reject,
                key_reuse: KeyReuse::NewRequest,
                in_flight: InFlight::Conflict,
                lease: Duration::from_secs(60),
                ttl: Duration::from_secs(24 * 60 * 60),
                max_request_body: 2 * 1024 * 1024,
                max_response_body: DEFAULT_MAX_RESPONSE_BODY,
                store_timeout: Duration::from_secs(2),
                store_failure: StoreFailure::FailClosed,
                run_to_completion: true,
                status_policy: Arc::new(default_status_policy),
                canonical_json: true,
                reject: Reject::default(),
                completion_deadline: DEFAULT_COMPLETION_DEADLINE,
                tracker: TaskTracker::new(),
                missing_scope_warned: Arc::default(),
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self
    }

    /// Where records are kept. Default: a [`MemoryStore`] private to this layer (and the
    /// services it makes). Pass a clone of a store to share it, or a `RedisStore` /
    /// `PostgresStore` when several instances serve the same clients.
    pub fn store(self, store: impl IdempotencyStore) -> Self {
        self.store_arc(Arc::new(store))
    }

    /// Like [`store`](Self::store), for a store already behind an `Arc` (a `dyn` store chosen
    /// at run time, say).
    pub fn store_arc(self, store: Arc<dyn IdempotencyStore>) -> Self {
        self.with(|c| c.store = store)
    }

    /// Adds `path` + `method` to the allow-list, in axum's order (`Router::route(path, ..)`).
    /// `path` is a literal path or an axum route template (`/orgs/{org_id}/calls`,
    /// `/files/{*rest}`), matched against the request's `MatchedPath` when the layer runs
    /// inside a `Router`, else against the URI path.
    ///
    /// Default: no allow-list, and every POST that reaches the layer is covered (right for
    /// `route_layer` on the routes that create things). Once any route is added, only listed
    /// routes are covered; every other request passes through untouched, its body unread.
    ///
    /// # Panics
    /// Here, in this call, on a template that axum's router syntax rejects (`/a/{`, say), as
    /// axum's own `Router::route` does: a route table is fixed at start-up, so a typo stops
    /// the server before it serves anything.
    pub fn route(self, path: &str, method: Method) -> Self {
        self.with(|c| {
            c.routes
                .get_or_insert_with(Routes::default)
                .add(method, path)
        })
    }

    /// Shorthand for [`route`](Self::route)`(path, Method::POST)`.
    ///
    /// # Panics
    /// As [`route`](Self::route), on a template axum rejects.
    pub fn post(self, path: &str) -> Self {
        self.route(path, Method::POST)
    }

    /// The one header that carries the key. Default: both `X-Idempotency-Key` and the IETF
    /// draft's `Idempotency-Key` are read (a request carrying both gets 400), so a client using
    /// either name is protected. Setting a name here reads that name only; a request using
    /// another name then passes through unprotected (or gets 400 with
    /// [`require_key`](Self::require_key)).
    pub fn header_name(self, name: HeaderName) -> Self {
        self.header_names([name])
    }

    /// The headers that carry the key, any one of them per request (two at once: 400).
    /// Default: `X-Idempotency-Key` and `Idempotency-Key`. A name given twice counts once
    /// (header names are case-insensitive: `Idempotency-Key` and `idempotency-key` are one).
    ///
    /// # Panics
    /// When `names` is empty.
    pub fn header_names(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let mut unique: Vec<HeaderName> = Vec::new();
        for name in names {
            if !unique.contains(&name) {
                unique.push(name);
            }
        }
        assert!(
            !unique.is_empty(),
            "at least one idempotency key header name"
        );
        self.with(|c| c.headers = unique)
    }

    /// Whether a covered request must carry a key. Default: `false` (no key: the request passes
    /// through unprotected, as `seed_api` documents for its API). When `true`, a covered request
    /// without the header gets 400 (IETF draft section 2.7).
    pub fn require_key(self, required: bool) -> Self {
        self.with(|c| c.require_key = required)
    }

    /// How the caller's scope is found. Default: [`AuthorizationScope`] (the `Authorization`
    /// header, hashed with SHA-256). See [`crate::scope`] for the others.
    pub fn scope(self, extractor: impl ScopeExtractor) -> Self {
        self.with(|c| c.scope = Arc::new(extractor))
    }

    /// What happens to a keyed request without a scope. Default: [`MissingScope::Reject`] (401).
    pub fn missing_scope(self, policy: MissingScope) -> Self {
        self.with(|c| c.missing_scope = policy)
    }

    /// What a key reused with a different request means. Default: [`KeyReuse::NewRequest`].
    pub fn key_reuse(self, mode: KeyReuse) -> Self {
        self.with(|c| c.key_reuse = mode)
    }

    /// What a duplicate of a running request gets. Default: [`InFlight::Conflict`] (409).
    pub fn in_flight(self, mode: InFlight) -> Self {
        self.with(|c| c.in_flight = mode)
    }

    /// How long an in-flight claim lasts without renewal. Default: 60 s. The owner renews it
    /// every third of this while its handler runs, so it runs out only when the owner is gone
    /// (process killed); then the next request with the key takes it over and runs.
    ///
    /// Longer than 100 years (`Duration::MAX`, say) counts as 100 years.
    pub fn lease(self, lease: Duration) -> Self {
        self.with(|c| c.lease = lease.clamp(Duration::from_millis(1), MAX_DURATION))
    }

    /// How long a completed response is replayed, measured from completion. Default: 24 h
    /// (IETF draft section 2.5 leaves it to the resource; Stripe keeps keys 24 h). A replay does
    /// not extend it. Expired records are never replayed.
    ///
    /// Longer than 100 years (`Duration::MAX`, say) counts as 100 years.
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|c| c.ttl = ttl.min(MAX_DURATION))
    }

    /// The largest request body buffered, in bytes. Default: 2 MiB (2,097,152). A larger body
    /// gets 413 without more than this many bytes read (a `Content-Length` over it is rejected
    /// before reading anything).
    pub fn max_request_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_request_body = bytes)
    }

    /// The largest response body stored, in bytes. Default: 4 MiB (4,194,304). A larger
    /// response is sent to the client as it streams, not stored, and its lease released (a
    /// retry runs again), with a warning in the trace.
    pub fn max_response_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_response_body = bytes)
    }

    /// The longest any one store call may take. Default: 2 s. Past it the call counts as a
    /// store failure (see [`on_store_error`](Self::on_store_error)).
    ///
    /// Longer than 100 years (`Duration::MAX`, say) counts as 100 years.
    pub fn store_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.store_timeout = timeout.min(MAX_DURATION))
    }

    /// What a store failure means for the request. Default: [`StoreFailure::FailClosed`] (503).
    pub fn on_store_error(self, policy: StoreFailure) -> Self {
        self.with(|c| c.store_failure = policy)
    }

    /// Whether a covered handler runs to completion, and its response is stored, even when the
    /// client disconnects. Default: `true`: the handler runs on its own tokio task once the
    /// lease is taken, so a client that timed out and retries gets the stored response instead
    /// of a second run. `false`: dropping the response future cancels the handler and releases
    /// the lease.
    pub fn run_to_completion(self, enabled: bool) -> Self {
        self.with(|c| c.run_to_completion = enabled)
    }

    /// Whether JSON bodies (`application/json`, `*/*+json`) are canonicalized before hashing
    /// (object keys sorted, whitespace dropped; see [`crate::fingerprint`]), so that a retry
    /// whose client re-serialized the same object in another key order still replays.
    /// Default: `true`. With `false`, every body is hashed as sent: a first request then costs
    /// about 1 to 2 µs less per KiB of JSON (measured on 2026-12-03 on two virtual machines: a
    /// 1 KiB body's digest took 1.65 and 2.82 µs canonical against 0.57 and 0.71 µs as sent,
    /// a 64 KiB one 100 and 169 µs against 34 and 42 µs; see BENCHMARKS.md), and a retry must
    /// repeat its body byte for byte to replay.
    pub fn canonical_json(self, enabled: bool) -> Self {
        self.with(|c| c.canonical_json = enabled)
    }

    /// How long an owner whose handler has finished keeps trying to store its response when
    /// the store fails. Default: 5 minutes ([`DEFAULT_COMPLETION_DEADLINE`]), comfortably
    /// longer than a store restart or failover.
    ///
    /// Meanwhile the owner keeps its lease: it tries `complete` again after 50 ms, doubling to
    /// 1 s (never more than a quarter of the [lease](Self::lease)), and renews the lease every
    /// third of it, so duplicates get 409 (or wait) and never a second run. It stops when the
    /// store takes the response, when the store says the lease was lost (it expired and another
    /// request took it over), or at this deadline; the lease then expires, and a retry after
    /// that runs the request again. The client gets its response at once, whatever the store
    /// does. See the crate docs, "What runs once means", for the guarantee this gives.
    ///
    /// Longer than 100 years (`Duration::MAX`, say) counts as 100 years.
    pub fn completion_deadline(self, deadline: Duration) -> Self {
        self.with(|c| c.completion_deadline = deadline.min(MAX_DURATION))
    }

    /// A handle that waits for the work this layer detaches from requests (handlers whose
    /// clients left, completions being retried) at shutdown. Every service the layer makes
    /// shares it, and so do layers cloned from this one. See [`Drain`].
    pub fn drain_handle(&self) -> Drain {
        Drain {
            tracker: self.config.tracker.clone(),
        }
    }

    /// How every rejection the layer makes is rendered, for an API whose clients expect its own
    /// error format (an SDK that cannot read problem details, say). Default: none, and each
    /// rejection is RFC 9457 problem details ([`Problem::into_response`]):
    /// `Content-Type: application/problem+json`, `Retry-After` when the problem has one, and
    /// `{"detail":…,"status":…,"title":…,"type":…}`.
    ///
    /// `hook` gets the [`Problem`] (kind, [status](Problem::status), detail,
    /// [`Retry-After`](Problem::retry_after_secs), [`type` URI](Problem::type_uri)) of every
    /// response the layer makes itself: 400 invalid or missing key and unreadable body, 401
    /// missing scope, 409 in flight, 413 body too large, 422 key reused, 503 store unavailable
    /// or full or server shutting down, and the 500s of a [`Lease`](crate::Lease) extractor
    /// and of `TransactionalError` that reach the client through this layer. Replays are the
    /// stored responses, never passed to it. The response's status, headers and body are the
    /// hook's; when the problem has a `Retry-After` and the hook's response has no
    /// `Retry-After` header, the layer adds it (in whole seconds). A hook can keep problem
    /// details for some kinds by returning `problem.into_response()`.
    ///
    /// Only rejections call the hook: a request that runs, is replayed or passes through costs
    /// nothing more. A `Lease` extractor on a handler that no layer wraps has no hook to ask,
    /// and answers with problem details. With feature `utoipa`, describe the hook's body for
    /// the OpenAPI document with `IdempotencyOpenApi::rejection_schema`.
    ///
    /// ```
    /// use axum::{Json, http::StatusCode};
    /// use tower_idempotency::{IdempotencyLayer, problem::Problem};
    ///
    /// let layer = IdempotencyLayer::new().reject_with(|problem: Problem| {
    ///     let body = serde_json::json!({
    ///         "error": { "code": problem.kind.slug(), "message": problem.detail }
    ///     });
    ///     (problem.status(), Json(body))
    /// });
    /// ```
    pub fn reject_with<F, R>(self, hook: F) -> Self
    where
        F: Fn(Problem) -> R + Send + Sync + 'static,
        R: IntoResponse,
    {
        self.with(|c| c.reject.hook = Some(Arc::new(move |problem| hook(problem).into_response())))
    }

    /// The `type` URIs of the layer's problem details (and of the [`Problem`]s a
    /// [`reject_with`](Self::reject_with) hook gets). Default: [`ProblemTypes::default()`],
    /// `tag:tower-idempotency,2026:` followed by the kind's slug (`…:in-flight`). See
    /// [`ProblemTypes`] for a base URI on your documentation and per-kind URIs; their URIs are
    /// checked when you make them, so a bad one stops your set-up code, not a response.
    pub fn problem_types(self, types: ProblemTypes) -> Self {
        self.with(|c| c.reject.types = types)
    }

    /// Which responses are stored, by status. Default: [`default_status_policy`] (all but 5xx,
    /// 408 and 429). A response not stored releases the lease, so a retry runs again. A 1xx
    /// status is never stored, whatever the policy: it is not a final response.
    pub fn store_status(self, policy: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        self.with(|c| c.status_policy = Arc::new(policy))
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        // The metrics' descriptions and units, for the recorder in place (feature `metrics`).
        crate::instrument::describe();
        Idempotency {
            inner,
            config: self.config.clone(),
        }
    }
}
