//! Run to completion: a covered handler runs on a task of its own, so that it finishes, and its
//! response is stored, whatever becomes of the request's future: dropped (also outside the
//! runtime), or kept but no longer polled.
//!
//! Running the handler in the request's own task, and handing it to a task only when the
//! request is dropped, was tried (it saves about a seventh of a first request's time): a
//! request kept but not polled then stalls its handler and its lease renewals, the lease
//! expires, and the retry runs the handler a second time. The second test here fails that way.
//! That a dropped request's handler still completes and stores is also in
//! `client_disconnects.rs` (`a_dropped_response_future_still_completes_and_stores`), and that
//! the drain waits for it in `durable_completion.rs`.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Waker},
    time::Duration,
};

use axum::{Router, body::Bytes, routing::post};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

use support::{Calls, TestStore, created, request, send, slow_calls_app};

/// The request's future is polled inside the runtime's context until its handler has started,
/// then dropped on this thread, outside any runtime: the handler still finishes on the runtime,
/// and its response is stored, so that the retry replays it.
#[test]
fn a_request_dropped_outside_the_runtime_still_completes() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let started = Arc::new(AtomicBool::new(false));
    let (counted, flag) = (calls.clone(), started.clone());
    let app = Router::new()
        .route(
            "/calls",
            post(move |body: Bytes| async move {
                flag.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                created(counted.hit(), &body)
            }),
        )
        .layer(IdempotencyLayer::new().post("/calls").store(store.clone()));

    let mut pending = Box::pin(
        app.clone()
            .oneshot(request("/calls", Some("k-dropped"), "{}")),
    );
    {
        let _context = runtime.enter();
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..1000 {
            if started.load(Ordering::SeqCst) {
                break;
            }
            assert!(pending.as_mut().poll(&mut cx).is_pending());
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(started.load(Ordering::SeqCst), "the handler never started");
    }
    assert!(tokio::runtime::Handle::try_current().is_err());
    drop(pending);

    runtime.block_on(async {
        store.wait_for(|e| e.completed == 1).await;
        let retry = send(&app, request("/calls", Some("k-dropped"), "{}")).await;
        assert!(retry.replayed());
        assert_eq!(retry.json()["run"], 1);
        assert_eq!(calls.get(), 1, "the handler ran once");
    });
}

/// The request's future is polled until its handler has started, then kept but never polled
/// again (a caller stalled without dropping it), for longer than the lease: the handler still
/// finishes and keeps its lease, and the retry replays its response rather than running it
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_kept_but_not_polled_still_completes_and_keeps_its_lease() {
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let app = slow_calls_app(
        IdempotencyLayer::new()
            .post("/calls")
            .store(store.clone())
            .lease(Duration::from_millis(300)),
        &calls,
        Duration::from_millis(100),
    );

    let mut held = Box::pin(app.clone().oneshot(request("/calls", Some("k-held"), "{}")));
    let mut cx = Context::from_waker(Waker::noop());
    // Polled until the handler has started (on a loaded machine that can take a while).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while calls.get() == 0 && tokio::time::Instant::now() < deadline {
        assert!(held.as_mut().poll(&mut cx).is_pending());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(calls.get(), 1, "the handler never started");
    // Not polled for more than two leases; the handler finishes and stores meanwhile (a
    // handler that only the request's future drove would never finish, and this would time
    // out).
    tokio::time::sleep(Duration::from_millis(800)).await;
    store.wait_for(|e| e.completed == 1).await;

    let retry = send(&app, request("/calls", Some("k-held"), "{}")).await;
    assert!(retry.replayed(), "status {}", retry.status);
    assert_eq!(calls.get(), 1, "the handler ran once");
    drop(held);
}
