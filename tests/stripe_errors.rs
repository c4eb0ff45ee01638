//! The example `examples/stripe_errors.rs`: the layer's rejections in Stripe's error shape,
//! `{"error":{"type","code","message","doc_url"}}`, with the layer's status.

// The example program itself; its `main` is not used here.
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/stripe_errors.rs"]
mod stripe_errors;

use axum::body::Body;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;

fn charge(key: &str, form: &str) -> Request<Body> {
    Request::post("/v1/charges")
        .header(header::AUTHORIZATION, "Basic c2tfdGVzdF9kZW1vOg==")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header("idempotency-key", key)
        .body(Body::from(form.to_owned()))
        .unwrap()
}

async fn send(
    app: &axum::Router,
    req: Request<Body>,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let response = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).expect("a JSON body");
    (parts.status, parts.headers, json)
}

/// Asserts the Stripe error shape: exactly `type`, `code`, `message` and `doc_url` under
/// `error`, and nothing else.
#[track_caller]
fn assert_stripe_error(json: &serde_json::Value, kind: &str, code: &str, doc: &str) {
    let object = json.as_object().expect("an object");
    assert_eq!(object.len(), 1, "{json}");
    let error = json["error"].as_object().expect("an error object");
    assert_eq!(error.len(), 4, "{json}");
    assert_eq!(error["type"], kind, "{json}");
    assert_eq!(error["code"], code, "{json}");
    assert!(!error["message"].as_str().unwrap().is_empty(), "{json}");
    assert_eq!(
        error["doc_url"],
        format!("https://docs.example.com/errors/idempotency#{doc}"),
        "{json}"
    );
}

#[tokio::test]
async fn an_invalid_key_is_a_stripe_400() {
    let app = stripe_errors::app();
    let (status, headers, json) = send(&app, charge("two words", "amount=2000")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_stripe_error(
        &json,
        "idempotency_error",
        "idempotency_key_invalid",
        "invalid-key",
    );
}

#[tokio::test]
async fn a_key_reused_with_other_parameters_is_a_stripe_422() {
    let app = stripe_errors::app();
    let (status, _, first) = send(&app, charge("k1", "amount=2000")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, replay) = send(&app, charge("k1", "amount=2000")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(replay, first);
    let (status, headers, json) = send(&app, charge("k1", "amount=3000")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_stripe_error(
        &json,
        "idempotency_error",
        "idempotency_key_reused",
        "key-reused",
    );
}

#[tokio::test(start_paused = true)]
async fn a_key_in_use_is_a_stripe_409_with_retry_after() {
    let app = stripe_errors::app();
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, charge("k1", "amount=2000&slow=true")).await }
    });
    tokio::task::yield_now().await;
    let second = send(&app, charge("k1", "amount=2000&slow=true")).await;
    let first = first.await.unwrap();
    // Whichever took the lease first ran (5 s on the paused clock); the other got 409.
    let (ran, conflict) = if first.0 == StatusCode::OK {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(ran.0, StatusCode::OK);
    let (status, headers, json) = conflict;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_stripe_error(
        &json,
        "idempotency_error",
        "idempotency_key_in_use",
        "in-flight",
    );
}

#[tokio::test]
async fn no_credentials_is_a_stripe_401() {
    let app = stripe_errors::app();
    let mut req = charge("k1", "amount=2000");
    req.headers_mut().remove(header::AUTHORIZATION);
    let (status, _, json) = send(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_stripe_error(
        &json,
        "authentication_error",
        "missing_api_key",
        "missing-scope",
    );
}
