//! Regressions for faults found by attacking the layer: each test is one input that once made
//! the layer run a handler twice, replay the wrong response, or leave a key blocked.

mod support;

use std::time::Duration;

use axum::{Router, routing::post};
use bytes::Bytes;
use http::StatusCode;
use support::*;
use tower_idempotency::{IdempotencyLayer, InFlight, StoreFailure};

/// `POST /calls` behind `layer`: counts the run, waits at `gate`, answers 201.
fn gated_app(layer: IdempotencyLayer, calls: &Calls, gate: &Gate) -> Router {
    let (calls, gate) = (calls.clone(), gate.clone());
    Router::new()
        .route(
            "/calls",
            post(move |body: Bytes| async move {
                let run = calls.hit();
                gate.enter().await;
                created(run, &body)
            }),
        )
        .layer(layer)
}

// ---------------------------------------------------------------------------------------------
// Waiting duplicates

/// A waiting duplicate pauses between looks at the store for up to 500 ms. That pause counted as
/// a store call under the store timeout, so with a store timeout under 500 ms a duplicate of a
/// request still running, on a healthy store, got 503, or ran the handler a second time when the
/// layer fails open.
#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_outlasts_a_store_timeout_shorter_than_its_pauses() {
    for policy in [StoreFailure::FailClosed, StoreFailure::FailOpen] {
        let (calls, gate) = (Calls::default(), Gate::default());
        let layer = IdempotencyLayer::new()
            .post("/calls")
            .store_timeout(Duration::from_millis(100))
            .on_store_error(policy)
            .in_flight(InFlight::Wait {
                timeout: Duration::from_secs(10),
            });
        let app = gated_app(layer, &calls, &gate);

        let owner = tokio::spawn({
            let app = app.clone();
            async move { send(&app, request("/calls", Some("k"), "{}")).await }
        });
        gate.entered(1).await;
        let duplicate = tokio::spawn({
            let app = app.clone();
            async move { send(&app, request("/calls", Some("k"), "{}")).await }
        });
        // Long enough for the duplicate's pauses to grow past the store timeout.
        tokio::time::sleep(Duration::from_secs(2)).await;
        gate.open(1);

        let owner = within(owner).await.unwrap();
        let duplicate = within(duplicate).await.unwrap();
        assert_eq!(owner.status, StatusCode::CREATED, "{policy:?}");
        assert_eq!(duplicate.status, StatusCode::CREATED, "{policy:?}");
        assert!(
            duplicate.replayed(),
            "{policy:?}: the duplicate gets the replay"
        );
        assert_eq!(duplicate.body, owner.body, "{policy:?}");
        assert_eq!(calls.get(), 1, "{policy:?}: the handler ran once");
    }
}
