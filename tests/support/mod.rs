//! Helpers shared by the layer's behaviour tests: request builders, a collected response, a
//! call counter, and [`TestStore`], a store wrapper that injects faults and reports what the
//! layer asked of it. [`proxy`] puts a store behind a network that fails on demand,
//! [`store_faults`] is the run that the store fault tests put each store through, and
//! [`security`] is the app that two of the security test files share.
#![allow(dead_code, unreachable_pub)]

pub mod proxy;
pub mod security;
#[cfg(any(feature = "redis", feature = "postgres", feature = "mysql"))]
pub mod store_faults;
mod test_store;

// Not every test binary names each of them.
#[allow(unused_imports)]
pub use test_store::{Events, Fault, Faults, TestStore};

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tower::{Service, ServiceExt};
use tower_idempotency::{
    IdempotencyKey, REPLAYED_HEADER, Scope, ScopeExtractor,
    fingerprint::{self, RequestIdentity},
    scope::AuthorizationScope,
    store::{Fingerprint, StoreKey},
};

/// The credential of the organization most tests act as.
pub const ORG_A: &str = "Bearer org_a_secret";
/// Another organization's credential.
pub const ORG_B: &str = "Bearer org_b_secret";
/// The default key header.
pub const KEY: &str = "x-idempotency-key";

/// A guard against hangs: a test that should finish fails after this long instead. With a
/// paused clock it fires as soon as every task is idle.
pub const HANG: Duration = Duration::from_secs(30);

/// A `POST` with organization A's credential, the key (when given) and a JSON body.
pub fn request(path: &str, key: Option<&str>, json: &str) -> Request<Body> {
    let mut builder = Request::post(path)
        .header(header::AUTHORIZATION, ORG_A)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        builder = builder.header(KEY, key);
    }
    builder.body(Body::from(json.to_owned())).unwrap()
}

/// A request builder with organization A's credential and the key.
pub fn keyed(method: Method, path: &str, key: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, ORG_A)
        .header(KEY, key)
}

/// A response with its body collected.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub async fn collect(response: Response<Body>) -> Self {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Self {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// Whether the layer marked this response as a replay.
    pub fn replayed(&self) -> bool {
        match self.headers.get(REPLAYED_HEADER) {
            None => false,
            Some(v) if v == "true" => true,
            Some(v) => panic!("unexpected {REPLAYED_HEADER} value {v:?}"),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    /// Asserts that this is an RFC 9457 problem of `status` whose `type` ends with `kind`.
    #[track_caller]
    pub fn assert_problem(&self, status: StatusCode, kind: &str) {
        assert_eq!(self.status, status, "body: {:?}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let problem = self.json();
        assert_eq!(problem["status"], status.as_u16(), "{problem}");
        let ty = problem["type"].as_str().expect("type");
        assert!(
            ty.ends_with(&format!(":{kind}")),
            "type {ty}, expected {kind}"
        );
        assert!(problem["title"].is_string(), "{problem}");
        assert!(problem["detail"].is_string(), "{problem}");
        assert!(!self.replayed());
    }

    /// Asserts a `Retry-After` of a positive number of seconds.
    #[track_caller]
    pub fn assert_retry_after(&self) {
        let after: u64 = self
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("Retry-After in seconds");
        assert!(after >= 1);
    }
}

/// Sends `req` through a clone of `svc` and collects the response.
pub async fn send<S>(svc: &S, req: Request<Body>) -> Reply
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    let response = tokio::time::timeout(HANG, svc.clone().oneshot(req))
        .await
        .expect("the request hung")
        .unwrap();
    Reply::collect(response).await
}

/// Counts handler runs; clones share the count.
#[derive(Clone, Default, Debug)]
pub struct Calls(Arc<AtomicUsize>);

impl Calls {
    /// Counts one run and returns its number (1 for the first).
    pub fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A router with the standard create handler ([`created`]) on `POST /calls` behind `layer`,
/// counting runs in `calls`.
pub fn calls_app(layer: tower_idempotency::IdempotencyLayer, calls: &Calls) -> axum::Router {
    // `async {}` is ready at once: the handler never yields, as if it had no `before`.
    calls_app_with(layer, calls, |_| async {})
}

/// [`calls_app`] with a slow handler: each run is counted in `calls` as it starts, sleeps
/// `delay` (on tokio's clock: with the clock paused, in virtual time), then answers [`created`]
/// with its run number.
pub fn slow_calls_app(
    layer: tower_idempotency::IdempotencyLayer,
    calls: &Calls,
    delay: Duration,
) -> axum::Router {
    calls_app_with(layer, calls, move |_| tokio::time::sleep(delay))
}

/// [`calls_app`] whose handler, once it has counted its run, awaits `before(run)` (a gate, a
/// sleep for some runs only) before it answers [`created`].
pub fn calls_app_with<F, Fut>(
    layer: tower_idempotency::IdempotencyLayer,
    calls: &Calls,
    before: F,
) -> axum::Router
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let calls = calls.clone();
    axum::Router::new()
        .route(
            "/calls",
            axum::routing::post(move |body: Bytes| async move {
                let run = calls.hit();
                before(run).await;
                created(run, &body)
            }),
        )
        .layer(layer)
}

/// Awaits `future`, failing the test if it hangs.
pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(HANG, future)
        .await
        .expect("timed out waiting")
}

/// The record key and fingerprint the layer uses, in the default `KeyReuse::NewRequest` mode,
/// for a `POST` from `authorization` to `path` with `key` and a JSON `body`.
pub fn record_key(
    authorization: &str,
    path: &str,
    key: &str,
    body: &str,
) -> (StoreKey, Fingerprint) {
    let parts = Request::post(path)
        .header(header::AUTHORIZATION, authorization)
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let scope: Scope = AuthorizationScope.extract(&parts).unwrap();
    let key = IdempotencyKey::parse(key.as_bytes()).unwrap();
    let id = RequestIdentity {
        scope: &scope,
        method: &Method::POST,
        path,
        key: &key,
    };
    let (kind, digest) = fingerprint::body_digest(body.as_bytes(), true);
    let fp = fingerprint::fingerprint(&id, None, kind, &digest);
    (StoreKey(fp.0), fp)
}

/// A header value from raw bytes (for non-UTF-8 values).
pub fn raw_header(bytes: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(bytes).unwrap()
}

/// A gate for handlers: each run announces itself and then waits until the test opens the
/// gate for it. Clones share the gate.
#[derive(Clone)]
pub struct Gate {
    entered: Arc<watch::Sender<usize>>,
    go: Arc<tokio::sync::Semaphore>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            entered: Arc::new(watch::Sender::new(0)),
            go: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

impl Gate {
    /// Called by a handler: counts the run, then waits for a permit.
    pub async fn enter(&self) {
        self.entered.send_modify(|n| *n += 1);
        self.go.acquire().await.expect("gate open").forget();
    }

    /// Waits until `n` runs have entered.
    pub async fn entered(&self, n: usize) {
        let mut rx = self.entered.subscribe();
        within(rx.wait_for(|entered| *entered >= n))
            .await
            .expect("gate alive");
    }

    /// How many runs have entered.
    pub fn count(&self) -> usize {
        *self.entered.borrow()
    }

    /// Lets `n` waiting (or future) runs through.
    pub fn open(&self, n: usize) {
        self.go.add_permits(n);
    }
}

/// The standard create handler's response: 201, JSON `{"run": n, "request": <body>}` and
/// `Location: /calls/<n>`, where `n` is the run number.
pub fn created(run: usize, request: &[u8]) -> Response<Body> {
    let request: serde_json::Value =
        serde_json::from_slice(request).unwrap_or_else(|_| String::from_utf8_lossy(request).into());
    let body = serde_json::json!({ "run": run, "request": request });
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::LOCATION, format!("/calls/{run}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Trace capture

thread_local! {
    /// The trace output written on this thread while a test captures it.
    static CAPTURED: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
}

/// Writes trace output into the emitting thread's capture buffer, if it has one.
pub struct ThreadCapture;

impl std::io::Write for ThreadCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURED.with_borrow_mut(|captured| {
            if let Some(captured) = captured {
                captured.extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts capturing this thread's trace output.
///
/// The subscriber is the process-wide default, not a scoped one: `tracing` caches each
/// callsite's interest for the whole process, computed by whichever thread reaches it first,
/// so with a scoped subscriber a test running in parallel without one would switch the layer's
/// events off for everybody. Events from other threads are discarded by the writer.
pub fn capture_trace() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(|| ThreadCapture)
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
    });
    CAPTURED.set(Some(Vec::new()));
}

/// Takes what this thread's trace output has been since the last call.
pub fn take_trace() -> String {
    let bytes = CAPTURED.with_borrow_mut(|captured| std::mem::take(captured.as_mut().unwrap()));
    String::from_utf8(bytes).unwrap()
}
