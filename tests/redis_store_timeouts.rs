//! `RedisStore`'s timeouts, on private `redis-server` processes that the tests pause with
//! `DEBUG SLEEP` (see `redis_servers`): the redis crate's own response timeout no longer cuts a
//! slow call short, and a `begin` answered after the layer's store timeout leaves no lease.
//!
//! The private servers need `redis-server` and `redis-cli` on the `PATH`, and run where
//! `REDIS_URL` is set, as that says a Redis installation is at hand. Unset: each test prints
//! that it is skipped and passes, except under `CI=true`, where a missing URL fails.
#![cfg(all(feature = "redis", feature = "testing"))]

mod common;
mod redis_servers;
mod support;

use std::time::Duration;

use common::conformance::{LONG, acquire, random_fingerprint, random_key};
use redis_servers::{RedisServer, private_servers};
use tower_idempotency::store::RedisStore;

/// The redis crate's own response timeout (500 ms by default) no longer cuts calls short: a
/// call that the server answers after 800 ms succeeds, on the store and through the layer
/// with its default store timeout (2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_slower_than_half_a_second_succeeds() {
    if !private_servers("a_call_slower_than_half_a_second_succeeds") {
        return;
    }
    let server = RedisServer::start_debuggable();
    let store = RedisStore::open(&server.url()).await.unwrap();
    let stall = || {
        let port = server.port;
        std::thread::spawn(move || redis_servers::cli(port, &["DEBUG", "SLEEP", "0.8"]))
    };

    let sleeper = stall();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    acquire(&store, &random_key(), &random_fingerprint(), LONG).await;
    let took = started.elapsed();
    sleeper.join().unwrap();
    assert!(
        took > Duration::from_millis(500),
        "the call was slow: {took:?}"
    );

    use axum::{Router, routing::post};
    use http::StatusCode;
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { StatusCode::CREATED }
            }),
        )
        .layer(
            tower_idempotency::IdempotencyLayer::new()
                .post("/calls")
                .store(store),
        );
    let sleeper = stall();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let reply = support::send(&app, support::request("/calls", Some("slow-1"), "{}")).await;
    let took = started.elapsed();
    sleeper.join().unwrap();
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        took > Duration::from_millis(500),
        "the call was slow: {took:?}"
    );
}

/// With no response timeout of the driver's own, the layer's store timeout is the one that
/// ends a request's wait: a `begin` whose reply comes after it is answered 503, and the lease
/// that `begin` took when the server ran it late is released, so the next try runs (not 409
/// until the lease runs out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_answered_after_the_store_timeout_leaves_no_lease() {
    if !private_servers("a_begin_answered_after_the_store_timeout_leaves_no_lease") {
        return;
    }
    use axum::{Router, routing::post};
    use http::StatusCode;
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    let server = RedisServer::start_debuggable();
    let store = RedisStore::open(&server.url()).await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { StatusCode::CREATED }
            }),
        )
        .layer(
            tower_idempotency::IdempotencyLayer::new()
                .post("/calls")
                .store(store)
                .lease(Duration::from_secs(30))
                .store_timeout(Duration::from_millis(300)),
        );
    let port = server.port;
    let sleeper = std::thread::spawn(move || redis_servers::cli(port, &["DEBUG", "SLEEP", "1"]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = support::send(&app, support::request("/calls", Some("late-1"), "{}")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    sleeper.join().unwrap();
    // The server has run the begin by now; its reply went to nobody.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.cli(&["DBSIZE"]).trim(),
        "0",
        "the late lease was released"
    );
    let reply = support::send(&app, support::request("/calls", Some("late-1"), "{}")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
