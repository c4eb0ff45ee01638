//! Retry safety: work that outlives a dropped client, concurrent and waiting duplicates, leases
//! and their takeover, store faults, and the in-memory store's bounds and sweeping.
//!
//! Time is driven with tokio's paused clock wherever the behaviour depends on it; tests wait on
//! notifications (a [`Gate`] in the handler, [`TestStore`] events) rather than sleeping.

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, response::IntoResponse, routing::post};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use support::*;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, InFlight, MemoryStore, StoreFailure, UNPROTECTED_HEADER,
    store::{Fingerprint, StoreKey, StoredResponse},
};

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

// ---------------------------------------------------------------------------------------------
// Work that outlives the client

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

// ---------------------------------------------------------------------------------------------
// Leases

#[tokio::test(start_paused = true)]
async fn a_long_handler_keeps_its_lease_by_renewing_it() {
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let app = slow_calls_app(
        IdempotencyLayer::new()
            .post("/calls")
            .store(store.clone())
            .lease(Duration::from_secs(3)),
        &calls,
        Duration::from_secs(10),
    );
    let owner = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    store.wait_for(|e| e.acquired == 1).await;
    // Well past the first lease's expiry, the owner is still running.
    tokio::time::sleep(Duration::from_secs(7)).await;
    send(&app, request("/calls", Some("k"), "{}"))
        .await
        .assert_problem(StatusCode::CONFLICT, "in-flight");
    assert_eq!(calls.get(), 1, "no second run");
    assert!(store.events().renewed >= 2, "{:?}", store.events());

    let owner = within(owner).await.unwrap();
    assert_eq!(owner.status, StatusCode::CREATED);
    let replay = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, owner.body);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_lease_is_taken_over_after_it_expires_and_its_late_completion_refused() {
    let store = TestStore::new(MemoryStore::new());
    let gate = Gate::default();
    let calls = Calls::default();
    let g = gate.clone();
    let app = calls_app_with(
        IdempotencyLayer::new()
            .post("/calls")
            .store(store.clone())
            .lease(Duration::from_secs(5)),
        &calls,
        move |_| {
            let g = g.clone();
            async move { g.enter().await }
        },
    );
    // An owner acquires the lease and is gone (process killed) before completing it.
    store.set_faults(|f| f.begin = Fault::Abandon);
    send(&app, request("/calls", Some("k"), "{}"))
        .await
        .assert_problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    store.set_faults(|f| f.begin = Fault::None);
    let [(key, old_token)] = store.abandoned()[..] else {
        panic!("one abandoned lease")
    };
    assert_eq!(key, record_key(ORG_A, "/calls", "k", "{}").0);

    // While the lease runs, the key is busy.
    send(&app, request("/calls", Some("k"), "{}"))
        .await
        .assert_problem(StatusCode::CONFLICT, "in-flight");
    assert_eq!(calls.get(), 0);

    // Once it has expired, the next request takes it over and runs.
    tokio::time::advance(Duration::from_secs(6)).await;
    let taker = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    gate.entered(1).await;

    // The old owner comes back while the new one runs: every call with its token is refused,
    // and none of them disturbs the new owner's lease.
    let late = StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::new(),
        body: Bytes::from_static(b"the old owner's response"),
    };
    let ttl = Duration::from_secs(3600);
    assert!(!store.complete(&key, old_token, &late, ttl).await.unwrap());
    assert!(!store.renew(&key, old_token, ttl).await.unwrap());
    assert!(!store.release(&key, old_token).await.unwrap());
    send(&app, request("/calls", Some("k"), "{}"))
        .await
        .assert_problem(StatusCode::CONFLICT, "in-flight");

    gate.open(1);
    let taken = within(taker).await.unwrap();
    assert_eq!(taken.status, StatusCode::CREATED);
    assert!(!taken.replayed());
    assert_eq!(calls.get(), 1);
    assert!(!store.complete(&key, old_token, &late, ttl).await.unwrap());
    let replay = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, taken.body, "the new owner's record stands");
}

#[tokio::test(start_paused = true)]
async fn an_owner_cut_off_from_the_store_cannot_overwrite_its_successor() {
    // The first owner's renewals fail (it lost the store), so its lease runs out while it
    // works; a retry takes it over; the first owner's completion, arriving while the
    // successor still runs, is refused.
    let store = TestStore::new(MemoryStore::new());
    store.set_faults(|f| f.renew = Fault::Fail);
    let gate = Gate::default();
    let calls = Calls::default();
    let g = gate.clone();
    let app = calls_app_with(
        IdempotencyLayer::new()
            .post("/calls")
            .store(store.clone())
            .lease(Duration::from_secs(3)),
        &calls,
        move |run| {
            let g = g.clone();
            async move {
                if run == 1 {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                } else {
                    g.enter().await;
                }
            }
        },
    );
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    store.wait_for(|e| e.acquired == 1).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    gate.entered(1).await;
    assert_eq!(calls.get(), 2, "the expired lease was taken over");
    store.set_faults(|f| f.renew = Fault::None);

    let first = within(first).await.unwrap();
    assert_eq!(
        first.json()["run"],
        1,
        "the first client still gets its own answer"
    );
    let events = store.events();
    assert_eq!((events.completes, events.completed), (1, 0), "{events:?}");
    send(&app, request("/calls", Some("k"), "{}"))
        .await
        .assert_problem(StatusCode::CONFLICT, "in-flight");

    gate.open(1);
    let second = within(second).await.unwrap();
    assert_eq!(second.json()["run"], 2);
    let replay = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, second.body);
}

// ---------------------------------------------------------------------------------------------
// Store faults

#[tokio::test]
async fn a_failing_store_fails_closed_with_503_and_nothing_runs() {
    let store = TestStore::new(MemoryStore::new());
    store.set_faults(|f| f.begin = Fault::Fail);
    let calls = Calls::default();
    let app = calls_app_with(
        IdempotencyLayer::new().post("/calls").store(store.clone()),
        &calls,
        |_| async {},
    );
    let reply = send(&app, request("/calls", Some("k"), "{}")).await;
    reply.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    reply.assert_retry_after();
    assert!(!reply.headers.contains_key(UNPROTECTED_HEADER));
    assert_eq!(calls.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_store_times_out_into_503() {
    for (setting, expected) in [
        (None, Duration::from_secs(2)),
        (Some(5), Duration::from_secs(5)),
    ] {
        let store = TestStore::new(MemoryStore::new());
        store.set_faults(|f| f.begin = Fault::Hang);
        let mut layer = IdempotencyLayer::new().post("/calls").store(store.clone());
        if let Some(secs) = setting {
            layer = layer.store_timeout(Duration::from_secs(secs));
        }
        let calls = Calls::default();
        let app = calls_app_with(layer, &calls, |_| async {});
        let started = Instant::now();
        let reply = send(&app, request("/calls", Some("k"), "{}")).await;
        reply.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
        reply.assert_retry_after();
        assert_eq!(started.elapsed(), expected, "store timeout {setting:?}");
        assert_eq!(calls.get(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn failing_open_runs_unprotected_and_says_so() {
    for fault in [Fault::Fail, Fault::Hang] {
        let store = TestStore::new(MemoryStore::new());
        store.set_faults(|f| f.begin = fault);
        let calls = Calls::default();
        let app = calls_app_with(
            IdempotencyLayer::new()
                .post("/calls")
                .store(store.clone())
                .on_store_error(StoreFailure::FailOpen),
            &calls,
            |_| async {},
        );
        for run in 1..=2 {
            let reply = send(&app, request("/calls", Some("k"), "{}")).await;
            assert_eq!(reply.status, StatusCode::CREATED, "{fault:?}");
            assert_eq!(reply.header("idempotency-unprotected"), Some("true"));
            assert!(!reply.replayed());
            assert_eq!(
                reply.json()["run"],
                run,
                "{fault:?}: unprotected, so it runs again"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_response_the_store_failed_to_keep_is_sent_and_not_run_twice() {
    let store = TestStore::new(MemoryStore::new());
    store.set_faults(|f| f.complete = Fault::Fail);
    let calls = Calls::default();
    let app = calls_app_with(
        IdempotencyLayer::new()
            .post("/calls")
            .store(store.clone())
            .lease(Duration::from_secs(5)),
        &calls,
        |_| async {},
    );
    let first = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the client still gets its answer"
    );
    store.set_faults(|f| f.complete = Fault::None);
    // The lease is left to expire rather than released: a retry must not run it again at once.
    send(&app, request("/calls", Some("k"), "{}"))
        .await
        .assert_problem(StatusCode::CONFLICT, "in-flight");
    assert_eq!(calls.get(), 1);
    tokio::time::advance(Duration::from_secs(6)).await;
    let later = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(later.json()["run"], 2);
}

// ---------------------------------------------------------------------------------------------
// Bounded memory

#[tokio::test(start_paused = true)]
async fn a_full_store_answers_503_and_never_evicts_live_records() {
    let store = MemoryStore::builder()
        .max_records(2)
        .when_full(tower_idempotency::store::WhenFull::Refuse)
        .sweep_interval(Duration::from_secs(3600))
        .build();
    let gate = Gate::default();
    let calls = Calls::default();
    let g = gate.clone();
    let app = calls_app_with(
        IdempotencyLayer::new()
            .post("/calls")
            .store(store.clone())
            .ttl(Duration::from_secs(10)),
        &calls,
        move |run| {
            let g = g.clone();
            async move {
                if run == 2 {
                    g.enter().await;
                }
            }
        },
    );
    // One completed record and one in flight fill the store.
    let completed = send(&app, request("/calls", Some("a"), "{}")).await;
    let in_flight = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("b"), "{}")).await }
    });
    gate.entered(1).await;
    assert_eq!(store.len(), 2);

    let full = send(&app, request("/calls", Some("c"), "{}")).await;
    full.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "store-full");
    full.assert_retry_after();
    assert_eq!(calls.get(), 2, "nothing ran for the new key");

    // Neither live record was evicted.
    gate.open(1);
    let in_flight = within(in_flight).await.unwrap();
    assert_eq!(in_flight.status, StatusCode::CREATED);
    for (key, original) in [("a", &completed), ("b", &in_flight)] {
        let replay = send(&app, request("/calls", Some(key), "{}")).await;
        assert!(replay.replayed(), "{key}");
        assert_eq!(replay.body, original.body);
    }
    send(&app, request("/calls", Some("c"), "{}"))
        .await
        .assert_problem(StatusCode::SERVICE_UNAVAILABLE, "store-full");

    // Space frees once records expire (here without the background sweeper).
    tokio::time::advance(Duration::from_secs(11)).await;
    let after = send(&app, request("/calls", Some("c"), "{}")).await;
    assert_eq!(after.status, StatusCode::CREATED);
    assert!(!after.replayed());
}

#[tokio::test(start_paused = true)]
async fn the_byte_bound_turns_new_keys_away_until_space_frees() {
    let store = MemoryStore::builder()
        .max_bytes(1000)
        .when_full(tower_idempotency::store::WhenFull::Refuse)
        .build();
    let calls = Calls::default();
    let counter = calls.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move || async move {
                counter.hit();
                (StatusCode::CREATED, vec![b'x'; 1500])
            }),
        )
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .store(store.clone())
                .ttl(Duration::from_secs(10)),
        );
    send(&app, request("/calls", Some("a"), "{}")).await;
    assert!(store.bytes() >= 1500);
    send(&app, request("/calls", Some("b"), "{}"))
        .await
        .assert_problem(StatusCode::SERVICE_UNAVAILABLE, "store-full");
    assert!(
        send(&app, request("/calls", Some("a"), "{}"))
            .await
            .replayed()
    );
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(
        send(&app, request("/calls", Some("b"), "{}")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(calls.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_hundred_thousand_expired_records_are_swept_without_being_read() {
    const RECORDS: u32 = 100_000;
    let store = MemoryStore::new();
    let response = StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::new(),
        body: Bytes::from_static(br#"{"id":"c0ffee"}"#),
    };
    let real = std::time::Instant::now();
    for i in 0..RECORDS {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&i.to_be_bytes());
        bytes[31] = 1;
        let key = StoreKey(bytes);
        let tower_idempotency::store::Begin::Acquired(token) = store
            .begin(&key, &Fingerprint(bytes), Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("fresh key")
        };
        assert!(
            store
                .complete(&key, token, &response, Duration::from_secs(1))
                .await
                .unwrap()
        );
    }
    let filled = real.elapsed();
    assert_eq!(store.len(), RECORDS as usize);

    // Nobody reads them again; the background sweeper alone reclaims them, within 3 s of
    // (virtual) time of their completion.
    let real = std::time::Instant::now();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !store.is_empty() {
        assert!(Instant::now() < deadline, "{} records left", store.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.bytes(), 0);
    println!(
        "filled {RECORDS} records in {filled:?}; swept them in {:?} (wall clock, this build)",
        real.elapsed()
    );
}
