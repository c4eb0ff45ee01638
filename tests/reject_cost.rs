//! The rejection hook costs nothing until something is rejected: a request that runs, is
//! replayed or passes through makes exactly as many heap allocations with a hook and
//! `ProblemTypes` set as without. Counted by a global allocator (this binary runs one test,
//! on one thread).
//!
//! The bodies are JSON of more than 8 KiB: the digest memo (bodies up to 8 KiB) is shared by
//! every layer in the process, so with a small body the second layer would find the first
//! layer's bodies remembered and allocate less for that reason alone.

use std::alloc::System;

use axum::{Router, body::Body, routing::post};
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, ProblemTypes, problem::Problem};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn app(layer: IdempotencyLayer) -> Router {
    Router::new()
        .route(
            "/calls",
            post(|| async { (StatusCode::CREATED, "created") }),
        )
        .route("/other", post(|| async { "other" }))
        .route_layer(layer.post("/calls"))
}

/// A JSON body larger than the digest memo keeps, so every first run canonicalizes it.
static BODY: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!(r#"{{"note":"{}"}}"#, "x".repeat(9 * 1024)));

fn request(path: &str, key: Option<&str>) -> Request<Body> {
    let mut builder = Request::post(path)
        .header(header::AUTHORIZATION, "Bearer a")
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        builder = builder.header("x-idempotency-key", key);
    }
    builder.body(Body::from(BODY.as_str())).unwrap()
}

/// Allocations of one request, its body read, once the app is warm.
async fn cost(app: &Router, req: Request<Body>) -> (StatusCode, u64) {
    let region = Region::new(GLOBAL);
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    drop(response.into_body().collect().await.unwrap());
    let change = region.change();
    (status, (change.allocations + change.reallocations) as u64)
}

/// The allocations of: a first run, a replay, a covered request without a key, and a request
/// the layer does not cover; each the fewest of 32 tries (a map that grows now and then
/// allocates on one of them, whatever the layer).
async fn costs(layer: IdempotencyLayer) -> Vec<(StatusCode, u64)> {
    let app = app(layer);
    // Warm up: first-use allocations of the runtime, the router and the store.
    for key in ["w1", "w2"] {
        cost(&app, request("/calls", Some(key))).await;
        cost(&app, request("/calls", Some(key))).await;
    }
    cost(&app, request("/calls", None)).await;
    cost(&app, request("/other", None)).await;
    let mut fewest = vec![(StatusCode::OK, u64::MAX); 4];
    for i in 0..32 {
        let key = format!("k{i}");
        let tries = [
            cost(&app, request("/calls", Some(&key))).await,
            cost(&app, request("/calls", Some(&key))).await,
            cost(&app, request("/calls", None)).await,
            cost(&app, request("/other", None)).await,
        ];
        for (least, now) in fewest.iter_mut().zip(tries) {
            if now.1 < least.1 {
                *least = now;
            }
        }
    }
    fewest
}

#[tokio::test(flavor = "current_thread")]
async fn success_paths_allocate_the_same_with_a_hook() {
    let plain = costs(IdempotencyLayer::new().run_to_completion(false)).await;
    let types = ProblemTypes::default()
        .base("https://docs.example.com/errors/")
        .unwrap();
    let hooked = costs(
        IdempotencyLayer::new()
            .run_to_completion(false)
            .problem_types(types)
            .reject_with(|problem: Problem| (problem.status(), problem.detail)),
    )
    .await;
    eprintln!("allocations per request (run, replay, no key, not covered): {plain:?}");
    assert_eq!(plain[0].0, StatusCode::CREATED);
    assert_eq!(plain[1].0, StatusCode::CREATED);
    assert!(plain.iter().all(|(_, n)| *n > 0), "the counter counts");
    assert_eq!(hooked, plain);
}
