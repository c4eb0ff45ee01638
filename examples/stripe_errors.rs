//! Rejections in your API's own error format: here, Stripe's, so that a Stripe SDK reads the
//! layer's 400, 409 and 422 as the API errors they are instead of failing with "Invalid
//! response object from API" on problem details it does not know.
//!
//! Run it:
//!
//! ```text
//! cargo run --example stripe_errors                  # listens on 127.0.0.1:3000
//! cargo run --example stripe_errors -- 127.0.0.1:8080
//! ```
//!
//! Then try (`amount=2000&slow=true` makes the handler take 5 seconds):
//!
//! ```text
//! curl -i localhost:3000/v1/charges -u sk_test_demo: -H 'Idempotency-Key: k1' -d amount=2000
//! ```
//!
//! - Send it twice: the second answer is the first (same `id`), `Idempotent-Replayed: true`.
//! - Same key, `-d amount=3000`: 422 with
//!   `{"error":{"type":"idempotency_error","code":"idempotency_key_reused",...}}`.
//! - A new key with `-d amount=2000 -d slow=true`, and the same again from a second terminal
//!   within 5 seconds: 409 `idempotency_key_in_use` with `Retry-After: 1`.
//! - `-H 'Idempotency-Key: two words'`: 400 `idempotency_key_invalid`.
//! - No `-u`: 401 `authentication_error`.
//!
//! Every error carries `doc_url`, the problem's `type` URI, here made from a documentation base
//! URI with `ProblemTypes` (`https://docs.example.com/errors/idempotency#in-flight`, ...).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    http::{HeaderName, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::json;
use tower_idempotency::{
    IdempotencyLayer, KeyReuse, ProblemTypes,
    problem::{Problem, ProblemKind},
};

/// The Stripe error object for a rejection of the layer:
/// `{"error": {"type", "code", "message", "doc_url"}}` with the layer's status (the layer adds
/// `Retry-After` to 409 and 503).
pub fn stripe_error(problem: Problem) -> Response {
    let (kind, code) = match problem.kind {
        ProblemKind::InvalidKey => ("idempotency_error", "idempotency_key_invalid"),
        ProblemKind::InFlight => ("idempotency_error", "idempotency_key_in_use"),
        ProblemKind::KeyReused => ("idempotency_error", "idempotency_key_reused"),
        ProblemKind::MissingScope => ("authentication_error", "missing_api_key"),
        ProblemKind::BodyTooLarge => ("invalid_request_error", "request_too_large"),
        ProblemKind::BodyUnreadable => ("invalid_request_error", "request_unreadable"),
        _ => ("api_error", "idempotency_unavailable"),
    };
    let body = json!({
        "error": {
            "type": kind,
            "code": code,
            "message": problem.detail,
            "doc_url": problem.type_uri(),
        }
    });
    (problem.status(), Json(body)).into_response()
}

/// `POST /v1/charges` behind the layer, set up as Stripe's API behaves: the `Idempotency-Key`
/// header, a key bound to its first request (422 on another body), errors as [`stripe_error`].
pub fn app() -> Router {
    let types = ProblemTypes::default()
        .base("https://docs.example.com/errors/idempotency#")
        .expect("an absolute URI");
    let layer = IdempotencyLayer::new()
        .header_name(HeaderName::from_static("idempotency-key"))
        .key_reuse(KeyReuse::Reject)
        .problem_types(types)
        .reject_with(stripe_error);
    let next_id = Arc::new(AtomicU64::new(1));
    Router::new()
        .route(
            "/v1/charges",
            post(move |body: Bytes| {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                async move {
                    let form = String::from_utf8_lossy(&body).into_owned();
                    if form.contains("slow=true") {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    let charge =
                        json!({ "id": format!("ch_{id}"), "object": "charge", "form": form });
                    (StatusCode::OK, Json(charge))
                }
            }),
        )
        .route_layer(layer)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into())
        .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {addr}; try:");
    println!(
        "  curl -i {addr}/v1/charges -u sk_test_demo: -H 'Idempotency-Key: k1' -d amount=2000"
    );
    println!(
        "  curl -i {addr}/v1/charges -u sk_test_demo: -H 'Idempotency-Key: k1' -d amount=3000"
    );
    axum::serve(listener, app()).await?;
    Ok(())
}
