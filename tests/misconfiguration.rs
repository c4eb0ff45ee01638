//! A server misconfiguration is told to the server's log, not only to its clients.

mod support;

use axum::{Router, body::Body, routing::post};
use http::{Request, StatusCode};
use tower_idempotency::{IdempotencyLayer, MissingScope};

use support::{KEY, capture_trace, send, take_trace};

fn keyed_without_credentials(key: &str) -> Request<Body> {
    Request::post("/calls")
        .header(KEY, key)
        .body(Body::from("{}"))
        .unwrap()
}

/// The first keyed request that finds no scope logs one warning with the fix; later ones do
/// not repeat it.
#[tokio::test]
async fn a_keyed_request_without_a_scope_warns_once_with_the_fix() {
    capture_trace();
    let app = Router::new()
        .route("/calls", post(|| async { StatusCode::CREATED }))
        .layer(IdempotencyLayer::new());
    for key in ["k1", "k2", "k3"] {
        let reply = send(&app, keyed_without_credentials(key)).await;
        reply.assert_problem(StatusCode::UNAUTHORIZED, "missing-scope");
    }
    let trace = take_trace();
    let warnings = trace.matches("had no scope").count();
    assert_eq!(warnings, 1, "{trace}");
    assert!(
        trace.contains("must run before the idempotency layer"),
        "{trace}"
    );
}

/// Passing such requests through does not hide the misconfiguration either.
#[tokio::test]
async fn passing_through_without_a_scope_warns_too() {
    capture_trace();
    let app = Router::new()
        .route("/calls", post(|| async { StatusCode::CREATED }))
        .layer(IdempotencyLayer::new().missing_scope(MissingScope::PassThrough));
    let reply = send(&app, keyed_without_credentials("k1")).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(take_trace().matches("had no scope").count(), 1);
}

/// A route template axum would reject stops the program in `route` itself, at start-up.
#[test]
#[should_panic(expected = "invalid idempotent route `/calls/{`")]
fn a_bad_route_template_panics_in_route() {
    let _ = IdempotencyLayer::new().post("/calls/{");
}
