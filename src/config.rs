//! [`Config`]: what the [`IdempotencyLayer`](crate::IdempotencyLayer) builder produces and the
//! service reads, with the policies it is made of.

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use axum::extract::MatchedPath;
use http::{HeaderName, Method, Request, StatusCode};
use tokio_util::task::TaskTracker;

use crate::{reject::Reject, scope::ScopeExtractor, store::IdempotencyStore};

/// The default key header, `X-Idempotency-Key`.
pub const DEFAULT_HEADER: HeaderName = HeaderName::from_static("x-idempotency-key");

/// The IETF draft's key header, `Idempotency-Key`, also read by default.
pub const IETF_HEADER: HeaderName = HeaderName::from_static("idempotency-key");

/// The longest duration the layer keeps (a lease, TTL, timeout or deadline): 100 years.
/// Longer ones, such as `Duration::MAX` meant as "for ever", are cut to it, so that adding them
/// to a clock never overflows.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// What a key that comes again with a *different* request (another body or query) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyReuse {
    /// The default, the behaviour of the API this crate was first built for (`seed_api`
    /// reproduces it): a different request is a new request with
    /// its own record (the fingerprint is part of the record key). The same key with the same
    /// body still replays.
    #[default]
    NewRequest,
    /// Strict, as the IETF draft (section 2.7) and Stripe do: the key is bound to the first
    /// request's fingerprint; a different request under a completed or in-flight key gets 422
    /// and nothing runs.
    Reject,
}

/// What a duplicate that arrives while the first request is still running gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlight {
    /// The default: 409 Conflict with `Retry-After: 1` at once (IETF draft section 2.7).
    Conflict,
    /// Wait up to `timeout` for the first request to finish and answer with its replay (same
    /// status, headers and body). The in-memory store wakes waiters by notification, and so
    /// do `RedisStore` (pub/sub) and `PostgresStore` (`LISTEN`/`NOTIFY`) across instances;
    /// other stores, and those two while their notification connection is down, are polled
    /// with backoff (20 ms doubling to 500 ms). If the first request fails
    /// without storing (5xx, panic), one waiter takes the lease and runs; the others go on
    /// waiting for that run. Past `timeout`: 409 with `Retry-After`.
    Wait {
        /// How long a duplicate waits at most.
        timeout: Duration,
    },
}

/// What to do when the store fails or does not answer within the
/// [store timeout](crate::IdempotencyLayer::store_timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreFailure {
    /// The default: answer 503 problem+json with `Retry-After: 1`; the handler does not run.
    #[default]
    FailClosed,
    /// Run the handler without protection, log a warning, and mark the response with
    /// `Idempotency-Unprotected: true`.
    ///
    /// # Warning
    /// During a store outage, a retry then runs the handler again: only for endpoints where a
    /// duplicate is cheaper than an outage.
    FailOpen,
}

/// What to do with a request that has a key but no [scope](crate::scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingScope {
    /// The default: 401 problem+json; the handler does not run.
    #[default]
    Reject,
    /// Pass the request to the handler without idempotency protection (for endpoints where
    /// authentication happens later and rejects it anyway).
    PassThrough,
}

/// Decides whether a response is stored (and replayed to retries) from its status.
pub type StatusPolicy = Arc<dyn Fn(StatusCode) -> bool + Send + Sync>;

/// The default status policy: store every status except 5xx, 408 Request Timeout and 429 Too
/// Many Requests, whose retries should run again.
pub fn default_status_policy(status: StatusCode) -> bool {
    !(status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS)
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) routes: Option<Routes>,
    pub(crate) headers: Vec<HeaderName>,
    pub(crate) require_key: bool,
    pub(crate) scope: Arc<dyn ScopeExtractor>,
    pub(crate) missing_scope: MissingScope,
    pub(crate) key_reuse: KeyReuse,
    pub(crate) in_flight: InFlight,
    pub(crate) lease: Duration,
    pub(crate) ttl: Duration,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) store_timeout: Duration,
    pub(crate) store_failure: StoreFailure,
    pub(crate) run_to_completion: bool,
    pub(crate) status_policy: StatusPolicy,
    pub(crate) canonical_json: bool,
    /// How rejections are rendered: `type` URIs and the application's hook.
    pub(crate) reject: Reject,
    /// How long an owner whose handler has finished keeps trying to store its response.
    pub(crate) completion_deadline: Duration,
    /// The layer's detached work (handlers whose clients left, pending completions, lease
    /// releases), so that shutdown can wait for it.
    pub(crate) tracker: TaskTracker,
    /// Whether the missing-scope misconfiguration warning was logged (once per layer).
    pub(crate) missing_scope_warned: Arc<AtomicBool>,
}

/// The allow-list: per method, the route templates and a matcher for concrete paths (whose
/// value is the template, the `route` label of the metrics).
#[derive(Clone, Default)]
pub(crate) struct Routes {
    entries: Vec<(Method, Templates, matchit::Router<Template>)>,
}

/// A route template of the allow-list, as it was given.
type Template = Arc<str>;

/// One method's templates, sorted: a request's [`MatchedPath`] is found by binary search,
/// which on the short lists of an allow-list costs a few comparisons where a hash set hashed
/// the whole path with SipHash on every covered request.
#[derive(Clone, Default)]
struct Templates(Vec<Template>);

impl Templates {
    /// Adds `template`; false if it was there.
    fn insert(&mut self, template: Template) -> bool {
        match self.0.binary_search(&template) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, template);
                true
            }
        }
    }

    fn get(&self, path: &str) -> Option<&Template> {
        self.0
            .binary_search_by(|template| (**template).cmp(path))
            .ok()
            .map(|at| &self.0[at])
    }
}

impl Routes {
    pub(crate) fn add(&mut self, method: Method, path: &str) {
        let index = match self.entries.iter().position(|(m, ..)| *m == method) {
            Some(index) => index,
            None => {
                self.entries
                    .push((method, Templates::default(), matchit::Router::new()));
                self.entries.len() - 1
            }
        };
        let (_, templates, router) = &mut self.entries[index];
        let template: Template = Arc::from(path);
        if templates.insert(template.clone())
            && let Err(error) = router.insert(path, template)
        {
            panic!("invalid idempotent route `{path}`: {error}");
        }
    }

    /// Every `(method, template)` on the allow-list, methods in the order they were first
    /// added, templates sorted.
    #[cfg(feature = "utoipa")]
    pub(crate) fn templates(&self) -> Vec<(Method, String)> {
        let mut all = Vec::new();
        for (method, templates, _) in &self.entries {
            all.extend(templates.0.iter().map(|t| (method.clone(), t.to_string())));
        }
        all
    }

    fn matches(&self, method: &Method, matched: Option<&MatchedPath>, path: &str) -> bool {
        self.entries.iter().any(|(m, templates, router)| {
            m == method
                && (matched.is_some_and(|matched| templates.get(matched.as_str()).is_some())
                    || router.at(path).is_ok())
        })
    }

    /// The template that covers the request: `matched` when it is listed, else the listed
    /// template that `path` matches.
    #[cfg(feature = "metrics")]
    fn template(
        &self,
        method: &Method,
        matched: Option<&MatchedPath>,
        path: &str,
    ) -> Option<Template> {
        let (_, templates, router) = self.entries.iter().find(|(m, ..)| m == method)?;
        matched
            .and_then(|matched| templates.get(matched.as_str()))
            .or_else(|| router.at(path).ok().map(|found| found.value))
            .cloned()
    }
}

impl Config {
    /// Whether a request is covered at all (the cheap, body-free first check).
    pub(crate) fn covers<B>(&self, req: &Request<B>) -> bool {
        match &self.routes {
            None => req.method() == Method::POST,
            Some(routes) => routes.matches(
                req.method(),
                req.extensions().get::<MatchedPath>(),
                req.uri().path(),
            ),
        }
    }

    /// The `route` label of a covered request: the allow-list's template, else axum's
    /// [`MatchedPath`], else `unmatched`.
    #[cfg(feature = "metrics")]
    pub(crate) fn route_template<B>(&self, req: &Request<B>) -> metrics::SharedString {
        let matched = req.extensions().get::<MatchedPath>();
        if let Some(routes) = &self.routes
            && let Some(template) = routes.template(req.method(), matched, req.uri().path())
        {
            return metrics::SharedString::from(template);
        }
        match matched {
            Some(matched) => metrics::SharedString::from(matched.as_str().to_owned()),
            None => metrics::SharedString::const_str(crate::instrument::UNMATCHED),
        }
    }
}
