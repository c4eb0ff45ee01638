//! Runs once even when the store fails after the handler ran: durable completion (the owner
//! keeps its lease and tries `complete` again, up to the completion deadline), the lease around
//! it (released before the client has a response that is not stored, renewals that back off
//! while they fail, a lease lost to a takeover), what the log says, and the drain on shutdown.
//! What a handler reads from its request extensions is in `handler_extensions.rs`.
//!
//! The clock is paused in most tests: `MemoryStore` keeps tokio's time, so leases and the
//! completion deadline pass in microseconds.

mod support;

use std::time::Duration;

use axum::{Router, routing::post};
use http::StatusCode;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

use support::{Calls, Fault, TestStore, calls_app, capture_trace, request, send, take_trace};

const LEASE: Duration = Duration::from_secs(10);

/// `/calls` counting its runs, behind a layer on `store` with a 10 s lease.
fn app(store: &TestStore, calls: &Calls, layer: IdempotencyLayer) -> Router {
    calls_app(
        layer.post("/calls").store(store.clone()).lease(LEASE),
        calls,
    )
}

/// Lets the paused clock run `by` forward, with every task woken on the way.
async fn pass(by: Duration) {
    let step = Duration::from_millis(50);
    let mut passed = Duration::ZERO;
    while passed < by {
        tokio::time::sleep(step).await;
        passed += step;
    }
}

/// The figure the issue asks for, in miniature: a store outage shorter than the lease, starting
/// right as the handler finishes. The owner keeps trying; duplicates meanwhile get 409; once the
/// store is back the response is stored, and a retry after the first lease would have run out
/// is a replay. Before durable completion, the owner gave up after two tries and that retry
/// ran the create a second time.
#[tokio::test(start_paused = true)]
async fn a_completion_outlasts_a_store_outage_shorter_than_the_lease() {
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let app = app(&store, &calls, IdempotencyLayer::new());

    store.set_faults(|f| {
        f.complete = Fault::Fail;
        f.renew = Fault::Fail;
    });
    let first = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the client is not kept waiting"
    );

    // 8 s of outage (shorter than the 10 s lease), a duplicate every second: never a run.
    for _ in 0..8 {
        pass(Duration::from_secs(1)).await;
        let duplicate = send(&app, request("/calls", Some("k"), "{}")).await;
        duplicate.assert_problem(StatusCode::CONFLICT, "in-flight");
    }
    store.set_faults(|f| *f = Default::default());
    store.wait_for(|e| e.completed == 1).await;

    // Past the first lease: only a stored response keeps this from running again.
    pass(LEASE).await;
    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(calls.get(), 1);
}

/// While `complete` keeps failing but the store otherwise answers, the owner renews its lease,
/// so nobody takes the key over, however long past the first lease that lasts.
#[tokio::test(start_paused = true)]
async fn no_takeover_while_the_owner_still_renews() {
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let app = app(&store, &calls, IdempotencyLayer::new());

    store.set_faults(|f| f.complete = Fault::Fail);
    let first = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // Three leases long.
    for _ in 0..30 {
        pass(Duration::from_secs(1)).await;
        let duplicate = send(&app, request("/calls", Some("k"), "{}")).await;
        duplicate.assert_problem(StatusCode::CONFLICT, "in-flight");
    }
    assert_eq!(calls.get(), 1);
    // Renewed every third of the lease (about 9 in 30 s), not on every try of `complete`.
    let renewed = store.events().renewed;
    assert!((6..=12).contains(&renewed), "{:?}", store.events());

    store.set_faults(|f| *f = Default::default());
    store.wait_for(|e| e.completed == 1).await;
    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(retry.replayed());
    assert_eq!(calls.get(), 1);
}

/// The owner stops at the completion deadline (with an error in the log); its lease then
/// expires and the next retry runs: the documented bound.
#[tokio::test(start_paused = true)]
async fn the_owner_gives_up_at_the_completion_deadline() {
    capture_trace();
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let layer = IdempotencyLayer::new().completion_deadline(Duration::from_secs(30));
    let app = app(&store, &calls, layer);

    store.set_faults(|f| f.complete = Fault::Fail);
    send(&app, request("/calls", Some("k"), "{}")).await;
    pass(Duration::from_secs(29)).await;
    let tries_before_deadline = store.events().completes;
    assert!(tries_before_deadline >= 25, "{:?}", store.events());
    let duplicate = send(&app, request("/calls", Some("k"), "{}")).await;
    duplicate.assert_problem(StatusCode::CONFLICT, "in-flight");

    pass(Duration::from_secs(5)).await;
    let at_deadline = store.events().completes;
    assert!(
        at_deadline <= tries_before_deadline + 2,
        "{:?}",
        store.events()
    );
    pass(LEASE + Duration::from_secs(1)).await;
    assert_eq!(
        store.events().completes,
        at_deadline,
        "no tries after the deadline"
    );
    let trace = take_trace();
    assert!(
        trace.contains("ERROR") && trace.contains("completion deadline"),
        "{trace}"
    );

    store.set_faults(|f| *f = Default::default());
    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(calls.get(), 2);
}

/// A failed store call is logged with its cause, so an operator can tell one failure from
/// another.
#[tokio::test(start_paused = true)]
async fn store_failures_are_logged_with_their_cause() {
    capture_trace();
    let store = TestStore::new(MemoryStore::new());
    let calls = Calls::default();
    let app = app(&store, &calls, IdempotencyLayer::new());
    store.set_faults(|f| f.begin = Fault::Fail);
    send(&app, request("/calls", Some("k"), "{}")).await;
    let trace = take_trace();
    assert!(
        trace.contains("cause=injected store fault (Unavailable)"),
        "{trace}"
    );
}

/// A response that is not stored (a 5xx) releases its lease before the client has it, so the
/// client's immediate retry runs instead of meeting 409. The release is slowed down, so that a
/// release left to the background would not have finished when the response arrives.
#[cfg(feature = "testing")]
#[tokio::test(start_paused = true)]
async fn an_unstored_response_releases_its_lease_before_the_client_has_it() {
    use tower_idempotency::testing::{Fault as Injected, FaultyStore, StoreOp};

    let counted = TestStore::new(MemoryStore::new());
    let store = FaultyStore::new(counted.clone());
    store.set(StoreOp::Release, Injected::Delay(Duration::from_millis(50)));
    let app = Router::new()
        .route(
            "/calls",
            post(|| async { (StatusCode::SERVICE_UNAVAILABLE, "try again") }),
        )
        .layer(IdempotencyLayer::new().post("/calls").store(store));
    let failed = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    let events = counted.events();
    assert_eq!((events.releases, events.released), (1, 1), "{events:?}");
}

/// A renewal that keeps failing is tried again with growing pauses (50 ms doubling to 1 s),
/// not every 50 ms: an outage does not turn every running handler into a flood of renewals.
#[tokio::test(start_paused = true)]
async fn failing_renewals_back_off() {
    let store = TestStore::new(MemoryStore::new());
    let app = Router::new()
        .route(
            "/calls",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(8)).await;
                StatusCode::CREATED
            }),
        )
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .store(store.clone())
                .lease(LEASE),
        );
    store.set_faults(|f| f.renew = Fault::Fail);
    send(&app, request("/calls", Some("k"), "{}")).await;
    // The first renewal is due a third of a lease (3.3 s) in; then 50, 100, 200, 400, 800,
    // 1000, 1000 ms: about 8 tries in the remaining 4.7 s, where 50 ms pauses would make ~90.
    let renews = store.events().renews;
    assert!((5..=12).contains(&renews), "{renews} renewals");
}

/// An owner whose lease was taken over before it could store its response says so.
#[tokio::test(start_paused = true)]
async fn an_owner_whose_lease_was_taken_over_says_so() {
    capture_trace();
    let store = TestStore::new(MemoryStore::new());
    let lease = Duration::from_secs(1);
    let app = Router::new()
        .route(
            "/calls",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                StatusCode::CREATED
            }),
        )
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .store(store.clone())
                .lease(lease),
        );
    // Renewals fail, so the lease runs out while the handler sleeps; a duplicate takes it over.
    store.set_faults(|f| f.renew = Fault::Fail);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    pass(Duration::from_millis(1500)).await;
    let second = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    first.await.unwrap();
    second.await.unwrap();
    let trace = take_trace();
    assert!(
        trace.contains("lease was lost before completion"),
        "{trace}"
    );
}

/// A `complete` whose reply was lost (the store did it) is tried again, the store refuses the
/// repeat, and the log says what that may mean.
#[cfg(feature = "testing")]
#[tokio::test(start_paused = true)]
async fn a_refused_repeat_after_a_lost_reply_is_explained() {
    use tower_idempotency::testing::{Fault as Injected, FaultyStore, StoreOp};

    capture_trace();
    let store = FaultyStore::new(MemoryStore::new());
    store.set(StoreOp::Complete, Injected::LoseReply);
    let calls = Calls::default();
    let app = calls_app(
        IdempotencyLayer::new().post("/calls").store(store.clone()),
        &calls,
    );
    send(&app, request("/calls", Some("k"), "{}")).await;
    store.clear();
    pass(Duration::from_secs(1)).await;
    let trace = take_trace();
    assert!(
        trace.contains("an earlier try whose answer was lost stored it"),
        "{trace}"
    );
    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(retry.replayed());
    assert_eq!(calls.get(), 1);
}

// ---------------------------------------------------------------------------------------------
// Drain on shutdown

/// A handler whose client left goes on running; the drain handle waits for it and for its
/// completion, so the response is stored before the process exits.
#[tokio::test(start_paused = true)]
async fn drain_waits_for_a_detached_handler_and_its_completion() {
    let store = TestStore::new(MemoryStore::new());
    let layer = IdempotencyLayer::new().post("/calls").store(store.clone());
    let drain = layer.drain_handle();
    let app = Router::new()
        .route(
            "/calls",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                (StatusCode::CREATED, "slow create")
            }),
        )
        .layer(layer);

    // The client gives up after 100 ms.
    let gone = tokio::time::timeout(
        Duration::from_millis(100),
        send(&app, request("/calls", Some("k"), "{}")),
    )
    .await;
    assert!(gone.is_err());
    assert_eq!(drain.pending(), 1);
    assert_eq!(format!("{drain:?}"), "Drain { pending: 1 }");
    // The store fails for a while once the handler is done.
    store.set_faults(|f| f.complete = Fault::Fail);
    let heal = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(8)).await;
        heal.set_faults(|f| *f = Default::default());
    });

    drain
        .wait(Duration::from_secs(60))
        .await
        .expect("drained in time");
    assert_eq!(store.events().completed, 1, "{:?}", store.events());
    assert_eq!(drain.pending(), 0);
}

/// Past its timeout, the drain says how much work was left.
#[tokio::test(start_paused = true)]
async fn drain_times_out_with_the_count_of_pending_work() {
    let layer = IdempotencyLayer::new().post("/calls");
    let drain = layer.drain_handle();
    let app = Router::new()
        .route(
            "/calls",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(600)).await;
                "never"
            }),
        )
        .layer(layer);
    let _ = tokio::time::timeout(
        Duration::from_millis(10),
        send(&app, request("/calls", Some("k"), "{}")),
    )
    .await;
    let timed_out = drain.wait(Duration::from_secs(2)).await.unwrap_err();
    assert_eq!(timed_out.pending, 1);
    assert_eq!(timed_out.timeout, Duration::from_secs(2));
    assert!(timed_out.to_string().contains("1 detached"), "{timed_out}");
}
