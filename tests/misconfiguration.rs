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

/// A key header name given twice (`Idempotency-Key` and `idempotency-key` are one name) is one
/// header: a request carrying it once runs once and is replayed, with few headers or many, and
/// the 400 for a missing key names it once.
#[tokio::test]
async fn a_header_name_given_twice_counts_once() {
    use axum::http::HeaderName;
    let calls = support::Calls::default();
    let app = support::calls_app(
        IdempotencyLayer::new()
            .header_names([
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_bytes(b"Idempotency-Key").unwrap(),
            ])
            .require_key(true),
        &calls,
    );
    for others in [0, 30] {
        let keyed = || {
            let mut request = Request::post("/calls")
                .header("authorization", support::ORG_A)
                .header("Idempotency-Key", format!("k-{others}"));
            for n in 0..others {
                request = request.header(format!("x-other-{n}"), "v");
            }
            request.body(Body::from("{}")).unwrap()
        };
        let first = send(&app, keyed()).await;
        assert_eq!(first.status, StatusCode::CREATED, "{others} other headers");
        let again = send(&app, keyed()).await;
        assert!(again.replayed(), "{others} other headers");
    }
    assert_eq!(calls.get(), 2);
    let missing = send(
        &app,
        Request::post("/calls")
            .header("authorization", support::ORG_A)
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    let detail = missing.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.ends_with("in the idempotency-key header"),
        "{detail}"
    );
}
