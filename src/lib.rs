//! Idempotency keys for axum and tower: a retried POST runs once, and every retry gets the
//! stored response.
//!
//! A client sends `X-Idempotency-Key: <key>` (or the IETF draft's `Idempotency-Key`; both are
//! read by default) on a request that creates something. The first
//! request with the key runs; its status, headers and body are stored; a retry with the same
//! key, endpoint, caller and body gets the same response back, marked
//! `Idempotent-Replayed: true`, without the handler running again. A duplicate that arrives
//! while the first is still running gets 409 (or waits for it, see [`InFlight::Wait`]).
//! This follows the IETF draft "The Idempotency-Key HTTP Header Field" and Stripe's
//! idempotent requests.
//!
//! ```
//! use axum::{Router, http::StatusCode, routing::post};
//! use tower_idempotency::IdempotencyLayer;
//!
//! let app: Router = Router::new()
//!     .route("/calls", post(|| async { (StatusCode::CREATED, "created") }))
//!     .route_layer(IdempotencyLayer::new());
//! # let _ = app;
//! ```
//!
//! # How a covered request flows
//!
//! 1. **Select.** Not an allow-listed method and path ([`IdempotencyLayer::route`]), or no key
//!    header: the request passes through untouched, its body unread (no key with
//!    [`require_key(true)`](IdempotencyLayer::require_key): 400).
//! 2. **Validate** the key ([`IdempotencyKey`]): one header field, 1 to 255 visible ASCII
//!    characters, optionally a structured-field string. Otherwise 400.
//! 3. **Scope** ([`scope`]): whose key it is. Default: the hashed `Authorization` header. None:
//!    401.
//! 4. **Buffer** the body up to [`max_request_body`](IdempotencyLayer::max_request_body)
//!    (413 past it).
//! 5. **Fingerprint** ([`fingerprint`]): SHA-256 over scope, method, path, key, query and
//!    (canonical JSON) body.
//! 6. **Begin**: one atomic store call. Absent: take a lease and run. In flight: 409 or wait.
//!    Completed: replay. Completed with another request in strict mode: 422.
//! 7. **Run** the inner service on its own task (so it finishes even if the client goes away),
//!    renewing the lease while it runs; a panic or error releases the lease.
//! 8. **Capture** status, end-to-end headers and body (up to
//!    [`max_response_body`](IdempotencyLayer::max_response_body)), store them if the status
//!    policy says so, and send the response.
//! 9. **Complete**, durably: when the store fails, the owner keeps its lease alive and keeps
//!    trying until the store takes the response (see
//!    [`completion_deadline`](IdempotencyLayer::completion_deadline)); duplicates get 409 or
//!    wait meanwhile, never a second run.
//!
//! The handler finds the validated [`IdempotencyKey`], a [`ScopeDigest`] and its [`Lease`] in
//! the request extensions. With the lease it can complete the record inside its own database
//! transaction (`PostgresStore::complete_in_transaction`, feature `postgres`), so that its
//! writes and the record commit together and a lost lease rolls them back.
//!
//! # What "runs once" means
//!
//! The handler runs at most once per record while the store keeps the record, through any store
//! outage that ends while the owner's lease still holds. A process killed while its handler
//! runs, or an outage longer than the lease, lets a later retry run again, unless the handler
//! completes its record in its own transaction. A store that forgets records (Redis without
//! persistence, restarted) forgets the promise with them. At shutdown, await
//! [`IdempotencyLayer::drain_handle`] after the server stops, so that handlers whose clients
//! left and pending completions finish. The README has the table of cases and their tests.
//!
//! Rejections are `application/problem+json` responses ([`problem`]), never service errors:
//! the service's error type is the inner service's. Your API's own error format instead:
//! [`IdempotencyLayer::reject_with`]; `type` URIs that point at your docs:
//! [`IdempotencyLayer::problem_types`].
//!
//! Every covered response carries its [`Outcome`] (executed, replayed, waited, conflict,
//! mismatch, rejected or bypassed) in its response extensions, for the application's own logs
//! and metrics.
//!
//! # Metrics
//!
//! With the feature `metrics`, the layer records through the
//! [`metrics`](https://docs.rs/metrics/0.24) facade (0.24), so the application picks the
//! exporter (Prometheus, StatsD...) and installs its recorder; without the feature nothing is
//! recorded and nothing is computed for it.
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `idempotency_requests_total` | counter | `outcome`, `route` | requests on covered routes, one per response, by [`Outcome::as_str`]: `executed`, `replayed`, `waited`, `conflict`, `mismatch`, `rejected`, `bypassed` (a request with no key counts as `bypassed`) |
//! | `idempotency_store_duration_seconds` | histogram, seconds | `op` | the layer's store calls, by `op`: `begin`, `complete`, `renew`, `release`; a call cut by the [store timeout](IdempotencyLayer::store_timeout) is recorded at the timeout |
//! | `idempotency_store_errors_total` | counter | `op`, `kind` | failed store calls, by `op` (those above, and `wait`) and `kind`: `unavailable`, `timeout`, `full`, `corrupt` ([`StoreErrorKind`](store::StoreErrorKind)) |
//! | `idempotency_completion_retries_total` | counter | none | later tries to store a response after a failed one (durable completion, see [`completion_deadline`](IdempotencyLayer::completion_deadline)) |
//!
//! `route` is a route template, never the raw path, so that the label set stays bounded: the
//! allow-list's template that covers the request ([`IdempotencyLayer::route`]), else axum's
//! `MatchedPath` (set for a matched route under `route_layer` or `Router::layer`), else
//! `unmatched`. Durations are measured on tokio's clock. The descriptions and units are
//! registered with the recorder in place when the layer wraps a service, so install the
//! recorder before building the router.
//!
//! # Stores
//!
//! [`MemoryStore`] (default) for one instance; `RedisStore` (feature `redis`; Redis Cluster with
//! `redis-cluster`), `PostgresStore` (feature `postgres`) and `MySqlStore` (feature `mysql`)
//! when several instances share clients. The contract is [`IdempotencyStore`]; feature
//! `testing` has its conformance suite and a fault-injecting store.
//!
//! # OpenAPI
//!
//! With feature `utoipa`, `IdempotencyLayer::openapi` adds the key header, the
//! `Idempotent-Replayed` marker and the problem responses (or, with a rejection hook, the
//! hook's bodies) to a utoipa OpenAPI document, on the operations the layer covers (module
//! `openapi`).
//!
//! # Examples
//!
//! Runnable programs, shipped in the crate package (docs.rs shows them under
//! [Source](https://docs.rs/crate/tower-idempotency/latest/source/examples/)):
//!
//! - `examples/custom_store.rs`: a whole store of your own, checked by the conformance suite
//!   (`cargo run --example custom_store`).
//! - `examples/stripe_errors.rs`: every rejection in Stripe's error shape, through
//!   [`IdempotencyLayer::reject_with`] (`cargo run --example stripe_errors`).
//!
//! The reference API, an agents/calls/tools API with every store, is a package of its own in
//! the repository (`cargo run -p seed_api`), not in the crate package.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod begin;
mod canonical_json;
mod capture;
mod config;
mod drain;
pub mod fingerprint;
mod future;
mod instrument;
mod key;
mod layer;
mod lease;
#[cfg(feature = "utoipa")]
#[cfg_attr(docsrs, doc(cfg(feature = "utoipa")))]
pub mod openapi;
mod outcome;
pub mod problem;
mod problem_types;
mod reject;
mod response;
pub mod scope;
mod service;
pub mod store;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod transactional;

pub use async_trait::async_trait;
pub use config::{
    DEFAULT_HEADER, IETF_HEADER, InFlight, KeyReuse, MissingScope, StatusPolicy, StoreFailure,
    default_status_policy,
};
pub use drain::{Drain, DrainTimedOut};
pub use future::ResponseFuture;
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN};
pub use layer::{DEFAULT_COMPLETION_DEADLINE, DEFAULT_MAX_RESPONSE_BODY, IdempotencyLayer};
pub use outcome::Outcome;
pub use problem_types::{InvalidTypeUri, ProblemTypes};
pub use response::{REPLAYED_HEADER, StoredResponse};
pub use scope::{AuthorizationScope, ExtensionScope, Scope, ScopeDigest, ScopeExtractor, scope_fn};
pub use service::{Idempotency, UNPROTECTED_HEADER};
/// The `sqlx` this crate's SQL stores are built on (0.9), for handlers that complete their
/// record in their own transaction: use it, so that pools and transactions are the same types.
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "mysql"))))]
pub use sqlx;
pub use store::{IdempotencyStore, MemoryStore};
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use transactional::TransactionalError;
pub use transactional::{CaptureError, Lease};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
