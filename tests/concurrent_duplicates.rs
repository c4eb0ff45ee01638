//! Duplicates of a request still running: in the default 409 mode each gets 409 `in-flight`
//! with `Retry-After` and the handler runs once; with `InFlight::Wait` they wait for the owner
//! and replay its response, woken by its completion, get 409 past their timeout, and one of
//! them takes over when the owner fails. Different keys never wait on each other.
//!
//! Time is driven with tokio's paused clock wherever the behaviour depends on it; tests wait on
//! notifications (a [`Gate`] in the handler, [`TestStore`] events) rather than sleeping.

mod support;

use std::time::Duration;

use axum::{Router, response::IntoResponse, routing::post};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use support::*;
use tokio::time::Instant;
use tower_http::catch_panic::CatchPanicLayer;
use tower_idempotency::{IdempotencyLayer, InFlight, MemoryStore};

// ---------------------------------------------------------------------------------------------
// Concurrent duplicates (409 mode)

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_duplicates_run_the_handler_once() {
    let gate = Gate::default();
    let calls = Calls::default();
    let g = gate.clone();
    let app = calls_app_with(IdempotencyLayer::new().post("/calls"), &calls, move |_| {
        let g = g.clone();
        async move { g.enter().await }
    });

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..20 {
        let (app, tx) = (app.clone(), tx.clone());
        tokio::spawn(async move {
            let reply = send(&app, request("/calls", Some("k-dup"), r#"{"n":1}"#)).await;
            tx.send(reply).unwrap();
        });
    }
    // The handler cannot answer before the gate opens, so the first 19 answers are the
    // duplicates'. A second run would block at the gate too, and this would hang.
    for _ in 0..19 {
        let reply = within(rx.recv()).await.unwrap();
        reply.assert_problem(StatusCode::CONFLICT, "in-flight");
        reply.assert_retry_after();
    }
    assert_eq!(gate.count(), 1);

    // The rejected duplicates did not touch the owner's lease: a retry still conflicts.
    send(&app, request("/calls", Some("k-dup"), r#"{"n":1}"#))
        .await
        .assert_problem(StatusCode::CONFLICT, "in-flight");

    gate.open(1);
    let owner = within(rx.recv()).await.unwrap();
    assert_eq!(owner.status, StatusCode::CREATED);
    assert!(!owner.replayed());
    assert_eq!(calls.get(), 1);

    let replay = send(&app, request("/calls", Some("k-dup"), r#"{"n":1}"#)).await;
    assert!(replay.replayed());
    assert_eq!(
        replay.body, owner.body,
        "the retry replays the owner's response"
    );
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn different_keys_never_wait_on_each_other() {
    let gate = Gate::default();
    let calls = Calls::default();
    let g = gate.clone();
    let app = calls_app_with(IdempotencyLayer::new().post("/calls"), &calls, move |run| {
        let g = g.clone();
        async move {
            if run == 1 {
                g.enter().await;
            }
        }
    });
    let slow = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("slow"), "{}")).await }
    });
    gate.entered(1).await;
    let other = send(&app, request("/calls", Some("other"), "{}")).await;
    assert_eq!(other.status, StatusCode::CREATED);
    gate.open(1);
    assert_eq!(within(slow).await.unwrap().status, StatusCode::CREATED);
}

// ---------------------------------------------------------------------------------------------
// Waiting duplicates

fn waiting(timeout: Duration, store: &TestStore) -> IdempotencyLayer {
    IdempotencyLayer::new()
        .post("/calls")
        .store(store.clone())
        .in_flight(InFlight::Wait { timeout })
}

/// The headers a replay must repeat from the original response.
fn kept(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .filter(|(name, _)| !["content-length", "idempotent-replayed"].contains(&name.as_str()))
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect()
}

#[tokio::test]
async fn waiting_duplicates_get_the_replay() {
    let store = TestStore::new(MemoryStore::new());
    let gate = Gate::default();
    let calls = Calls::default();
    let g = gate.clone();
    let app = calls_app_with(waiting(HANG, &store), &calls, move |_| {
        let g = g.clone();
        async move { g.enter().await }
    });
    let owner = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    gate.entered(1).await;
    let duplicates: Vec<_> = (0..5)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, request("/calls", Some("k"), "{}")).await })
        })
        .collect();
    // Every duplicate has found the request in flight (and waits) before the owner finishes.
    store.wait_for(|e| e.in_flight >= 5).await;
    gate.open(1);

    let owner = within(owner).await.unwrap();
    assert_eq!(owner.status, StatusCode::CREATED);
    for duplicate in duplicates {
        let reply = within(duplicate).await.unwrap();
        assert!(reply.replayed());
        assert_eq!(reply.status, owner.status);
        assert_eq!(kept(&reply.headers), kept(&owner.headers));
        assert_eq!(reply.body, owner.body);
    }
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn waiters_are_woken_by_the_completion_not_by_polling() {
    // The owner answers at t = 5 s. A waiter that only polled, in slices growing to 500 ms,
    // would see it later; a notified one answers at the same instant.
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let app = slow_calls_app(
        waiting(Duration::from_secs(60), &store),
        &calls,
        Duration::from_secs(5),
    );
    let owner = tokio::spawn({
        let app = app.clone();
        async move {
            let reply = send(&app, request("/calls", Some("k"), "{}")).await;
            (reply, Instant::now())
        }
    });
    store.wait_for(|e| e.acquired == 1).await;
    let started = Instant::now();
    let waiter = send(&app, request("/calls", Some("k"), "{}")).await;
    let waiter_done = Instant::now();
    let (owner, owner_done) = within(owner).await.unwrap();
    assert!(waiter.replayed());
    assert_eq!(waiter.body, owner.body);
    assert_eq!(waiter_done, owner_done, "woken at the completion");
    assert_eq!(waiter_done - started, Duration::from_secs(5));
    // Between notifications the waiter re-checks in slices growing to 500 ms: 14 in 5 s.
    assert!(
        store.events().waits <= 20,
        "a busy loop: {:?}",
        store.events()
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_past_its_timeout_gets_409() {
    let store = TestStore::new(MemoryStore::new());
    let gate = Gate::default();
    let calls = Calls::default();
    let g = gate.clone();
    let app = calls_app_with(waiting(Duration::from_secs(2), &store), &calls, move |_| {
        let g = g.clone();
        async move { g.enter().await }
    });
    let owner = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    gate.entered(1).await;
    let started = Instant::now();
    let reply = send(&app, request("/calls", Some("k"), "{}")).await;
    reply.assert_problem(StatusCode::CONFLICT, "in-flight");
    reply.assert_retry_after();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it waited first"
    );
    assert_eq!(calls.get(), 1);
    gate.open(1);
    assert_eq!(within(owner).await.unwrap().status, StatusCode::CREATED);
}

/// The owner (run 1) waits at the gate and then fails: a 503 or a panic.
async fn owner_fails_and_one_waiter_takes_over(panics: bool) {
    let store = TestStore::new(MemoryStore::new());
    let gate = Gate::default();
    let calls = Calls::default();
    let (g, c) = (gate.clone(), calls.clone());
    let app = Router::new()
        .route(
            "/calls",
            post(move |body: Bytes| async move {
                let run = c.hit();
                if run == 1 {
                    g.enter().await;
                    if panics {
                        panic!("the owner's handler failed");
                    }
                    return (StatusCode::SERVICE_UNAVAILABLE, "database down").into_response();
                }
                created(run, &body)
            }),
        )
        .layer(waiting(HANG, &store))
        .layer(CatchPanicLayer::new());
    let owner = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    gate.entered(1).await;
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, request("/calls", Some("k"), "{}")).await })
        })
        .collect();
    store.wait_for(|e| e.in_flight >= 4).await;
    gate.open(1);

    let owner = within(owner).await.unwrap();
    assert!(owner.status.is_server_error());
    let mut replies = Vec::new();
    for waiter in waiters {
        replies.push(within(waiter).await.unwrap());
    }
    let ran: Vec<_> = replies.iter().filter(|r| !r.replayed()).collect();
    assert_eq!(ran.len(), 1, "exactly one waiter took over and ran");
    let ran = ran[0];
    assert_eq!(ran.status, StatusCode::CREATED);
    assert_eq!(ran.json()["run"], 2);
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.body, ran.body, "the others got that run's replay");
    }
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn when_the_owner_answers_5xx_one_waiter_takes_over() {
    owner_fails_and_one_waiter_takes_over(false).await;
}

#[tokio::test]
async fn when_the_owner_panics_one_waiter_takes_over() {
    owner_fails_and_one_waiter_takes_over(true).await;
}
