//! A store that fails, hangs or is full. The layer fails closed with 503 `store-unavailable`
//! (after the store timeout when the store hangs) and runs nothing, or with
//! `StoreFailure::FailOpen` runs the handler unprotected and says so; a response the store
//! failed to keep is still sent, and not run again before its lease expires. The in-memory
//! store's bounds with `WhenFull::Refuse` (503 `store-full`, no live record evicted; eviction
//! is in `memory_eviction.rs`) and the sweeping of expired records.
//!
//! Time is driven with tokio's paused clock wherever the behaviour depends on it.

mod support;

use std::time::Duration;

use axum::{Router, routing::post};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use support::*;
use tokio::time::Instant;
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, MemoryStore, StoreFailure, UNPROTECTED_HEADER,
    store::{Fingerprint, StoreKey, StoredResponse},
};

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
