//! Work that outlives its client: a handler whose client timed out, disconnected or dropped the
//! response future still finishes and stores its response, so that the retry replays it; with
//! `run_to_completion(false)` the handler is cancelled with its client and its lease released,
//! so that the retry runs it again. Requests dropped outside the runtime, or kept but no longer
//! polled, are in `run_to_completion.rs`.
//!
//! Two tests go through a real listener and a `reqwest` client that times out; the others drop
//! the response future themselves, on tokio's paused clock. Tests wait on [`TestStore`] events
//! rather than sleeping.

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::Router;
use http::{StatusCode, header};
use support::*;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// Serves `app` on a fresh port of 127.0.0.1.
async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client_post(client: &reqwest::Client, addr: SocketAddr, key: &str) -> reqwest::RequestBuilder {
    client
        .post(format!("http://{addr}/calls"))
        .header(header::AUTHORIZATION, ORG_A)
        .header(KEY, key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(r#"{"to":"+15550100"}"#)
}

/// Sets a flag when dropped unless disarmed: tells whether a handler was cancelled.
struct CancelSignal(Arc<AtomicBool>, bool);

impl CancelSignal {
    fn disarm(&mut self) {
        self.1 = false;
    }
}

impl Drop for CancelSignal {
    fn drop(&mut self) {
        if self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_client_timeout_gets_the_stored_response() {
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let app = slow_calls_app(
        IdempotencyLayer::new().post("/calls").store(store.clone()),
        &calls,
        Duration::from_millis(500),
    );
    let addr = serve(app).await;

    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let error = client_post(&impatient, addr, "k-timeout")
        .send()
        .await
        .expect_err("the client gives up before the handler answers");
    assert!(error.is_timeout(), "{error}");

    // The server finishes the work and stores it although nobody is listening.
    store.wait_for(|e| e.completed == 1).await;

    let client = reqwest::Client::new();
    let retry = client_post(&client, addr, "k-timeout")
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()[header::LOCATION], "/calls/1");
    let body: serde_json::Value = retry.json().await.unwrap();
    assert_eq!(body["run"], 1);
    assert_eq!(calls.get(), 1, "the handler ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_run_to_completion_a_client_disconnect_cancels_and_releases() {
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let cancelled = Arc::new(AtomicBool::new(false));
    let flag = cancelled.clone();
    let app = calls_app_with(
        IdempotencyLayer::new()
            .post("/calls")
            .store(store.clone())
            .run_to_completion(false),
        &calls,
        move |run| {
            let mut signal = CancelSignal(flag.clone(), run == 1);
            async move {
                if run == 1 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                signal.disarm();
            }
        },
    );
    let addr = serve(app).await;

    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let error = client_post(&impatient, addr, "k-cancel")
        .send()
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");

    // hyper drops the request future; the guard releases the lease.
    store.wait_for(|e| e.released == 1).await;
    assert!(
        cancelled.load(Ordering::SeqCst),
        "the handler was cancelled"
    );
    assert_eq!(store.events().completes, 0);

    let retry = client_post(&reqwest::Client::new(), addr, "k-cancel")
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(calls.get(), 2, "the retry ran the handler again");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_response_future_still_completes_and_stores() {
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let app = slow_calls_app(
        IdempotencyLayer::new().post("/calls").store(store.clone()),
        &calls,
        Duration::from_millis(500),
    );
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        app.clone().oneshot(request("/calls", Some("k"), "{}")),
    )
    .await;
    assert!(dropped.is_err(), "the caller gave up");
    store.wait_for(|e| e.completed == 1).await;
    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.json()["run"], 1);
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_run_to_completion_a_dropped_response_future_cancels_the_handler() {
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let app = calls_app_with(
        IdempotencyLayer::new()
            .post("/calls")
            .store(store.clone())
            .run_to_completion(false),
        &calls,
        |run| async move {
            if run == 1 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        },
    );
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        app.clone().oneshot(request("/calls", Some("k"), "{}")),
    )
    .await;
    assert!(dropped.is_err());
    store.wait_for(|e| e.released == 1).await;
    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(calls.get(), 2);
}
