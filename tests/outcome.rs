//! The [`Outcome`] in the response extensions: every covered response carries what became of
//! its request; requests the layer does not cover carry none.

mod support;

use std::{convert::Infallible, time::Duration};

use axum::{Router, body::Body, routing::post};
use http::{Request, Response, StatusCode};
use support::{KEY, request};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, InFlight, KeyReuse, MissingScope, Outcome};

/// A create handler that takes a second (on the paused clock), so that duplicates meet it in
/// flight.
async fn slow_create(body: String) -> (StatusCode, String) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    (StatusCode::CREATED, format!("created {body}"))
}

fn app(layer: IdempotencyLayer) -> Router {
    Router::new()
        .route("/calls", post(slow_create))
        .route("/voices", post(slow_create))
        .layer(layer)
}

async fn call(app: &Router, req: Request<Body>) -> Response<Body> {
    let response: Result<Response<Body>, Infallible> = app.clone().oneshot(req).await;
    response.unwrap()
}

fn outcome(response: &Response<Body>) -> Option<Outcome> {
    response.extensions().get::<Outcome>().copied()
}

/// Sends `first`, and `second` while `first` is still running; returns both responses.
async fn overlapping(
    app: &Router,
    first: Request<Body>,
    second: Request<Body>,
) -> [Response<Body>; 2] {
    let owner = tokio::spawn({
        let app = app.clone();
        async move { call(&app, first).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let duplicate = call(app, second).await;
    [owner.await.unwrap(), duplicate]
}

#[tokio::test(start_paused = true)]
async fn executed_replayed_conflict_and_bypassed_are_marked() {
    let app = app(IdempotencyLayer::new().post("/calls"));
    let [first, conflict] = overlapping(
        &app,
        request("/calls", Some("k-1"), "{}"),
        request("/calls", Some("k-1"), "{}"),
    )
    .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(outcome(&first), Some(Outcome::Executed));
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    assert_eq!(outcome(&conflict), Some(Outcome::Conflict));

    let replay = call(&app, request("/calls", Some("k-1"), "{}")).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(outcome(&replay), Some(Outcome::Replayed));

    let keyless = call(&app, request("/calls", None, "{}")).await;
    assert_eq!(keyless.status(), StatusCode::CREATED);
    assert_eq!(outcome(&keyless), Some(Outcome::Bypassed));

    // Not on the allow-list: not covered, no outcome.
    let uncovered = call(&app, request("/voices", Some("k-1"), "{}")).await;
    assert_eq!(uncovered.status(), StatusCode::CREATED);
    assert_eq!(outcome(&uncovered), None);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_that_waited_for_the_replay_is_marked_waited() {
    let app = app(IdempotencyLayer::new()
        .post("/calls")
        .in_flight(InFlight::Wait {
            timeout: Duration::from_secs(10),
        }));
    let [first, waited] = overlapping(
        &app,
        request("/calls", Some("k-1"), "{}"),
        request("/calls", Some("k-1"), "{}"),
    )
    .await;
    assert_eq!(outcome(&first), Some(Outcome::Executed));
    assert_eq!(waited.headers()["idempotent-replayed"], "true");
    assert_eq!(outcome(&waited), Some(Outcome::Waited));
    // A replay without waiting stays a replay.
    let replay = call(&app, request("/calls", Some("k-1"), "{}")).await;
    assert_eq!(outcome(&replay), Some(Outcome::Replayed));
}

#[tokio::test(start_paused = true)]
async fn rejections_and_mismatches_are_marked() {
    let strict = app(IdempotencyLayer::new()
        .post("/calls")
        .key_reuse(KeyReuse::Reject));
    assert_eq!(
        outcome(&call(&strict, request("/calls", Some("k-1"), "{}")).await),
        Some(Outcome::Executed)
    );
    let mismatch = call(&strict, request("/calls", Some("k-1"), r#"{"a":1}"#)).await;
    assert_eq!(mismatch.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(outcome(&mismatch), Some(Outcome::Mismatch));

    let invalid = call(&strict, request("/calls", Some("two words"), "{}")).await;
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
    assert_eq!(outcome(&invalid), Some(Outcome::Rejected));

    let no_scope = Request::post("/calls")
        .header(KEY, "k-2")
        .body(Body::from("{}"))
        .unwrap();
    let no_scope = call(&strict, no_scope).await;
    assert_eq!(no_scope.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(outcome(&no_scope), Some(Outcome::Rejected));

    let too_large = call(
        &app(IdempotencyLayer::new().post("/calls").max_request_body(4)),
        request("/calls", Some("k-3"), r#"{"long": true}"#),
    )
    .await;
    assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(outcome(&too_large), Some(Outcome::Rejected));

    let required = app(IdempotencyLayer::new().post("/calls").require_key(true));
    let missing = call(&required, request("/calls", None, "{}")).await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(outcome(&missing), Some(Outcome::Rejected));
}

#[tokio::test(start_paused = true)]
async fn unprotected_runs_are_marked_bypassed() {
    let pass = app(IdempotencyLayer::new()
        .post("/calls")
        .missing_scope(MissingScope::PassThrough));
    let no_scope = Request::post("/calls")
        .header(KEY, "k-1")
        .body(Body::from("{}"))
        .unwrap();
    let no_scope = call(&pass, no_scope).await;
    assert_eq!(no_scope.status(), StatusCode::CREATED);
    assert_eq!(outcome(&no_scope), Some(Outcome::Bypassed));
}

#[cfg(feature = "testing")]
#[tokio::test(start_paused = true)]
async fn store_failures_are_bypassed_when_failing_open_and_rejected_otherwise() {
    use tower_idempotency::{
        MemoryStore, StoreFailure,
        store::WhenFull,
        testing::{Fault, FaultyStore, StoreOp},
    };

    let store = FaultyStore::new(MemoryStore::new());
    store.set(StoreOp::Begin, Fault::Fail);
    let open = app(IdempotencyLayer::new()
        .post("/calls")
        .store(store.clone())
        .on_store_error(StoreFailure::FailOpen));
    let unprotected = call(&open, request("/calls", Some("k-1"), "{}")).await;
    assert_eq!(unprotected.status(), StatusCode::CREATED);
    assert_eq!(outcome(&unprotected), Some(Outcome::Bypassed));

    let closed = app(IdempotencyLayer::new().post("/calls").store(store));
    let refused = call(&closed, request("/calls", Some("k-1"), "{}")).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(outcome(&refused), Some(Outcome::Rejected));

    // A full store is answered 503 whatever the failure policy: rejected, not bypassed.
    let full = app(IdempotencyLayer::new()
        .post("/calls")
        .store(
            MemoryStore::builder()
                .max_records(1)
                .when_full(WhenFull::Refuse)
                .build(),
        )
        .on_store_error(StoreFailure::FailOpen));
    let _ = call(&full, request("/calls", Some("k-1"), "{}")).await;
    let refused = call(&full, request("/calls", Some("k-2"), "{}")).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(outcome(&refused), Some(Outcome::Rejected));
}

#[test]
fn outcome_names_are_the_label_values() {
    let names: Vec<&str> = [
        Outcome::Executed,
        Outcome::Replayed,
        Outcome::Waited,
        Outcome::Conflict,
        Outcome::Mismatch,
        Outcome::Rejected,
        Outcome::Bypassed,
    ]
    .into_iter()
    .map(Outcome::as_str)
    .collect();
    assert_eq!(
        names,
        [
            "executed", "replayed", "waited", "conflict", "mismatch", "rejected", "bypassed"
        ]
    );
}
