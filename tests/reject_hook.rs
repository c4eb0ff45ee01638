//! Every rejection goes through the application's hook (`IdempotencyLayer::reject_with`), and
//! every `type` URI through the layer's `ProblemTypes`: each kind is driven through a real
//! router, and the hook's body, status and `Retry-After` must come out. A path that renders
//! problem details by itself fails here.

mod support;

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    response::IntoResponse,
    routing::{get, post},
};
use bytes::Bytes;
use futures_util::stream;
use http::{HeaderValue, Request, StatusCode, header};
use support::*;
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyLayer, KeyReuse, Lease, MemoryStore, ProblemTypes,
    problem::{Problem, ProblemKind},
    store::WhenFull,
};

/// The hook under test: JSON of its own, the layer's status, a marker header; its own
/// `Retry-After` for the in-flight kind only (for the others, the layer adds it).
fn hook(problem: Problem) -> http::Response<Body> {
    let body = serde_json::json!({
        "hook": problem.kind.slug(),
        "detail": problem.detail,
        "type": problem.type_uri(),
        "retry_after": problem.retry_after_secs(),
    });
    let mut response = (problem.status(), Json(body)).into_response();
    response
        .headers_mut()
        .insert("x-rendered-by", HeaderValue::from_static("hook"));
    if problem.kind == ProblemKind::InFlight {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("42"));
    }
    response
}

fn hooked() -> IdempotencyLayer {
    IdempotencyLayer::new().reject_with(hook)
}

/// A router whose `POST /calls` waits for `gate` when its body is `"wait"`, and whose
/// `POST /leased` and `GET /leased` need a `Lease`.
fn app(layer: IdempotencyLayer, gate: Arc<Notify>, entered: Arc<Notify>) -> Router {
    Router::new()
        .route(
            "/calls",
            post(move |body: Bytes| async move {
                if body.as_ref() == b"\"wait\"" {
                    entered.notify_one();
                    gate.notified().await;
                }
                (StatusCode::CREATED, "created")
            }),
        )
        .route(
            "/leased",
            post(|_lease: Lease| async { StatusCode::CREATED }).get(|_lease: Lease| async { "ok" }),
        )
        .route("/other", get(|| async { "other" }))
        .layer(layer)
}

fn simple(layer: IdempotencyLayer) -> Router {
    app(layer, Arc::new(Notify::new()), Arc::new(Notify::new()))
}

/// Asserts that `reply` is the hook's rendering of `kind` with `status`.
#[track_caller]
fn assert_hooked(reply: &Reply, kind: ProblemKind, status: StatusCode) {
    assert_eq!(reply.status, status, "{kind:?}: {:?}", reply.body);
    assert_eq!(reply.header("x-rendered-by"), Some("hook"), "{kind:?}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["hook"], kind.slug(), "{body}");
    assert_eq!(body["type"], kind.type_uri(), "{body}");
    assert!(!body["detail"].as_str().unwrap().is_empty(), "{body}");
}

#[tokio::test]
async fn a_bad_key_and_a_missing_key_go_through_the_hook() {
    let svc = simple(hooked().require_key(true));
    let bad = send(&svc, request("/calls", Some("bad key"), "{}")).await;
    assert_hooked(&bad, ProblemKind::InvalidKey, StatusCode::BAD_REQUEST);
    assert!(bad.header("retry-after").is_none());
    let missing = send(&svc, request("/calls", None, "{}")).await;
    assert_hooked(&missing, ProblemKind::InvalidKey, StatusCode::BAD_REQUEST);
    assert!(
        missing.json()["detail"]
            .as_str()
            .unwrap()
            .contains("requires")
    );
}

#[tokio::test]
async fn a_missing_scope_goes_through_the_hook() {
    let svc = simple(hooked());
    let req = Request::post("/calls")
        .header(KEY, "k1")
        .body(Body::from("{}"))
        .unwrap();
    let reply = send(&svc, req).await;
    assert_hooked(&reply, ProblemKind::MissingScope, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_unreadable_body_goes_through_the_hook() {
    let svc = simple(hooked());
    let failing = stream::iter([Err::<Bytes, _>(std::io::Error::other("connection reset"))]);
    let req = keyed(http::Method::POST, "/calls", "k1")
        .body(Body::from_stream(failing))
        .unwrap();
    let reply = send(&svc, req).await;
    assert_hooked(&reply, ProblemKind::BodyUnreadable, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_body_too_large_goes_through_the_hook_declared_or_streamed() {
    let svc = simple(hooked().max_request_body(4));
    let declared = send(&svc, request("/calls", Some("k1"), "\"too long\"")).await;
    assert_hooked(
        &declared,
        ProblemKind::BodyTooLarge,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    let chunks = stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"\"too long\""))]);
    let req = keyed(http::Method::POST, "/calls", "k2")
        .body(Body::from_stream(chunks))
        .unwrap();
    let streamed = send(&svc, req).await;
    assert_hooked(
        &streamed,
        ProblemKind::BodyTooLarge,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
}

#[tokio::test]
async fn in_flight_goes_through_the_hook_with_its_own_retry_after() {
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let svc = app(hooked(), gate.clone(), entered.clone());
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, request("/calls", Some("k1"), "\"wait\"")).await }
    });
    within(entered.notified()).await;
    let duplicate = send(&svc, request("/calls", Some("k1"), "\"wait\"")).await;
    assert_hooked(&duplicate, ProblemKind::InFlight, StatusCode::CONFLICT);
    assert_eq!(duplicate.header("retry-after"), Some("42"));
    assert_eq!(duplicate.json()["retry_after"], 1);
    gate.notify_one();
    assert_eq!(within(first).await.unwrap().status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_reused_key_goes_through_the_hook() {
    let svc = simple(hooked().key_reuse(KeyReuse::Reject));
    let first = send(&svc, request("/calls", Some("k1"), "{\"a\":1}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let reused = send(&svc, request("/calls", Some("k1"), "{\"a\":2}")).await;
    assert_hooked(
        &reused,
        ProblemKind::KeyReused,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
}

#[tokio::test]
async fn store_unavailable_goes_through_the_hook_and_the_layer_adds_retry_after() {
    let store = TestStore::new(MemoryStore::new());
    store.set_faults(|f| f.begin = Fault::Fail);
    let svc = simple(hooked().store(store));
    let reply = send(&svc, request("/calls", Some("k1"), "{}")).await;
    assert_hooked(
        &reply,
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn store_full_goes_through_the_hook_and_the_layer_adds_retry_after() {
    // Refuse: the default store evicts k1 for k2 instead of being full.
    let store = MemoryStore::builder()
        .max_records(1)
        .when_full(WhenFull::Refuse)
        .build();
    let svc = simple(hooked().store(store));
    let first = send(&svc, request("/calls", Some("k1"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let reply = send(&svc, request("/calls", Some("k2"), "{}")).await;
    assert_hooked(
        &reply,
        ProblemKind::StoreFull,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn a_missing_lease_goes_through_the_hook_on_every_way_past_the_layer() {
    let svc = simple(hooked());
    // Covered, no key: passed through to a handler that needs a lease.
    let keyless = send(&svc, request("/leased", None, "{}")).await;
    assert_hooked(
        &keyless,
        ProblemKind::NoLease,
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    // Not covered at all (a GET).
    let req = Request::get("/leased").body(Body::empty()).unwrap();
    let uncovered = send(&svc, req).await;
    assert_hooked(
        &uncovered,
        ProblemKind::NoLease,
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    // Other responses pass untouched.
    let req = Request::get("/other").body(Body::empty()).unwrap();
    let other = send(&svc, req).await;
    assert_eq!(other.text(), "other");
    assert!(other.header("x-rendered-by").is_none());
}

#[tokio::test]
async fn the_hook_decides_the_status() {
    let layer = IdempotencyLayer::new()
        .key_reuse(KeyReuse::Reject)
        .reject_with(|problem: Problem| {
            let status = match problem.kind {
                ProblemKind::KeyReused => StatusCode::BAD_REQUEST,
                _ => problem.status(),
            };
            (status, problem.detail)
        });
    let svc = simple(layer);
    send(&svc, request("/calls", Some("k1"), "{\"a\":1}")).await;
    let reused = send(&svc, request("/calls", Some("k1"), "{\"a\":2}")).await;
    assert_eq!(reused.status, StatusCode::BAD_REQUEST);
    assert!(reused.text().contains("different request"));
}

#[tokio::test]
async fn a_hook_can_keep_problem_details() {
    let svc = simple(IdempotencyLayer::new().reject_with(Problem::into_response::<Body>));
    let reply = send(&svc, request("/calls", Some("bad key"), "{}")).await;
    reply.assert_problem(StatusCode::BAD_REQUEST, "invalid-key");
}

#[tokio::test]
async fn configured_type_uris_reach_the_problem_documents() {
    let types = ProblemTypes::default()
        .base("https://docs.example.com/errors/")
        .unwrap()
        .uri(ProblemKind::NoLease, "https://docs.example.com/lease")
        .unwrap();
    let svc = simple(IdempotencyLayer::new().problem_types(types));
    let bad = send(&svc, request("/calls", Some("bad key"), "{}")).await;
    assert_eq!(bad.header("content-type"), Some("application/problem+json"));
    assert_eq!(
        bad.json()["type"],
        "https://docs.example.com/errors/invalid-key"
    );
    let keyless = send(&svc, request("/leased", None, "{}")).await;
    assert_eq!(keyless.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(keyless.json()["type"], "https://docs.example.com/lease");
}

#[tokio::test]
async fn the_hook_gets_the_configured_type_uri() {
    let types = ProblemTypes::default().base("urn:example:").unwrap();
    let layer = IdempotencyLayer::new()
        .problem_types(types)
        .reject_with(|problem: Problem| problem.type_uri().to_owned());
    let reply = send(&simple(layer), request("/calls", Some("bad key"), "{}")).await;
    assert_eq!(reply.text(), "urn:example:invalid-key");
}

#[tokio::test]
async fn without_a_hook_a_missing_lease_is_problem_details_as_before() {
    let svc = simple(IdempotencyLayer::new());
    let keyless = send(&svc, request("/leased", None, "{}")).await;
    keyless.assert_problem(StatusCode::INTERNAL_SERVER_ERROR, "no-lease");
}

/// A handler's `TransactionalError` reaches the client through the hook, and what the layer
/// must know of it (a lost lease is not stored) survives the rendering.
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[tokio::test]
async fn transactional_errors_go_through_the_hook() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower_idempotency::{
        CaptureError, TransactionalError,
        store::{StoreError, StoreErrorKind},
    };

    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |_lease: Lease, body: Bytes| {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                let error = match (body.as_ref(), run) {
                    (b"\"lost\"", 0) => TransactionalError::LeaseLost,
                    (b"\"lost\"", _) => return (StatusCode::CREATED, "ran again").into_response(),
                    (b"\"large\"", _) => {
                        TransactionalError::Capture(CaptureError::TooLarge { max: 1 })
                    }
                    _ => TransactionalError::Database(StoreError::new(
                        StoreErrorKind::Unavailable,
                        "database down",
                    )),
                };
                error.into_response()
            }
        }
    };
    let svc = Router::new().route("/tx", post(handler)).layer(hooked());

    let lost = send(&svc, request("/tx", Some("k1"), "\"lost\"")).await;
    assert_hooked(&lost, ProblemKind::InFlight, StatusCode::CONFLICT);
    assert_eq!(lost.header("retry-after"), Some("42"));
    // Not stored: the retry runs.
    let retry = send(&svc, request("/tx", Some("k1"), "\"lost\"")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.text(), "ran again");

    let large = send(&svc, request("/tx", Some("k2"), "\"large\"")).await;
    assert_hooked(
        &large,
        ProblemKind::ResponseUnstorable,
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    let down = send(&svc, request("/tx", Some("k3"), "\"down\"")).await;
    assert_hooked(
        &down,
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert_eq!(down.header("retry-after"), Some("1"));
}

/// A rejection made in the handler (`TransactionalError`) rolled its work back: it is never
/// stored, even where the status policy would store its status.
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[tokio::test]
async fn a_transactional_rejection_is_not_stored_whatever_the_status_policy() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower_idempotency::{
        TransactionalError,
        store::{StoreError, StoreErrorKind},
    };

    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |_lease: Lease| {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                if run == 0 {
                    TransactionalError::Database(StoreError::new(
                        StoreErrorKind::Unavailable,
                        "database down",
                    ))
                    .into_response()
                } else {
                    (StatusCode::CREATED, "ran again").into_response()
                }
            }
        }
    };
    let layer = IdempotencyLayer::new().store_status(|_| true);
    let svc = Router::new().route("/tx", post(handler)).layer(layer);

    let down = send(&svc, request("/tx", Some("k1"), "{}")).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    let retry = send(&svc, request("/tx", Some("k1"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.text(), "ran again");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Polls `future` on this thread, outside any runtime, until it is ready; panics after [`HANG`].
/// For a request that must outlive the runtime that runs its handler.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    let deadline = std::time::Instant::now() + HANG;
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        assert!(std::time::Instant::now() < deadline, "the request hung");
        std::thread::park_timeout(HANG);
    }
}

/// The runtime that runs a covered handler (on its own task, `run_to_completion`) shuts down
/// while the request waits for it: the layer answers 503 "shutting down" itself, and that
/// rejection goes through the hook too, with the layer's `Retry-After`.
#[test]
fn the_shutdown_503_goes_through_the_hook() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    let (started, on_start) = std::sync::mpsc::channel::<()>();
    let app = Router::new()
        .route(
            "/calls",
            post(move || async move {
                started.send(()).unwrap();
                std::future::pending::<()>().await;
                StatusCode::CREATED
            }),
        )
        .layer(hooked().post("/calls"));
    // Shuts the runtime down once the handler has started: its task is cancelled.
    let stopper = std::thread::spawn(move || {
        on_start.recv().unwrap();
        runtime.shutdown_background();
    });
    // The request's own future runs here, in the runtime's context but not on it, so that it
    // outlives the runtime and sees its handler's task cancelled.
    let reply = {
        let _context = handle.enter();
        let response = block_on(app.oneshot(request("/calls", Some("k-shutdown"), "{}"))).unwrap();
        block_on(Reply::collect(response))
    };
    stopper.join().unwrap();
    assert_hooked(
        &reply,
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert_eq!(reply.json()["detail"], "the server is shutting down");
    assert_eq!(reply.header("retry-after"), Some("1"));
}
