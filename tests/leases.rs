//! Leases: a handler that runs longer than its lease keeps it by renewing it; a lease whose
//! owner is gone (or can no longer reach the store) is taken over once it expires, and the old
//! owner's token is fenced off: its late completion, renewal and release are refused and never
//! disturb the new owner's record.
//!
//! On tokio's paused clock, so leases expire in virtual time; tests wait on notifications (a
//! [`Gate`] in the handler, [`TestStore`] events) rather than sleeping.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use support::*;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore, store::StoredResponse};

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
