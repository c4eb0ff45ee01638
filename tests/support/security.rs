//! The app of the security tests that send secrets, slow requests and failures through the
//! layer (`tests/security.rs` and `security_tenants.rs`).

use axum::{Router, response::IntoResponse, routing::post};
use bytes::Bytes;
use http::StatusCode;
use tower_idempotency::IdempotencyLayer;

use super::{Calls, Gate, created};

/// The support module's create handler on `POST /calls`, counting runs, behind `layer`. A body
/// of `{"slow":true}` first waits at `gate`, `{"fail":true}` answers 500, and `{"big":true}`
/// answers 100 bytes.
pub fn app(layer: IdempotencyLayer, calls: &Calls, gate: &Gate) -> Router {
    let (calls, gate) = (calls.clone(), gate.clone());
    Router::new()
        .route(
            "/calls",
            post(move |body: Bytes| async move {
                let run = calls.hit();
                match body.as_ref() {
                    b"{\"slow\":true}" => gate.enter().await,
                    b"{\"fail\":true}" => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    b"{\"big\":true}" => {
                        return (StatusCode::CREATED, vec![b'x'; 100]).into_response();
                    }
                    _ => {}
                }
                created(run, &body)
            }),
        )
        .layer(layer)
}
