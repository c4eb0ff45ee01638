//! `MemoryStore` at its bounds: the default evicts the oldest completed records
//! (`WhenFull::EvictOldest`), never a lease; `WhenFull::Refuse` turns new keys away. The
//! eviction log and the `idempotency_memory_evictions_total` metric. Paused tokio clock.
#![cfg(feature = "testing")]
mod common;
mod support;

use std::time::Duration;

use axum::{Router, routing::post};
use bytes::Bytes;
use common::conformance::{
    self, LONG, MARGIN, SHORT, acquire, expect_completed, expect_in_flight, marked_response,
    random_fingerprint, random_key,
};
use http::{HeaderMap, StatusCode};
use support::{Calls, created, request, send};
use tower_idempotency::{
    IdempotencyLayer, MemoryStore, StoredResponse,
    store::{Begin, IdempotencyStore, StoreErrorKind, StoreKey, WhenFull},
};

/// A sweeper interval long enough that only `sweep()` (or `begin` at a bound) reclaims.
const NEVER: Duration = Duration::from_secs(24 * 60 * 60);
/// A TTL that no test waits out.
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

fn body_of(len: usize) -> StoredResponse {
    StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::new(),
        body: Bytes::from(vec![7; len]),
    }
}

fn store(max_records: usize, max_bytes: usize, when_full: WhenFull) -> MemoryStore {
    MemoryStore::builder()
        .max_records(max_records)
        .max_bytes(max_bytes)
        .when_full(when_full)
        .sweep_interval(NEVER)
        .build()
}

/// Begins `key`, stores `response` for a day, and lets a second pass on the paused clock, so
/// that records stored one after another have different completion times.
async fn store_completed(store: &MemoryStore, key: &StoreKey, response: &StoredResponse) {
    let token = acquire(store, key, &random_fingerprint(), LONG).await;
    assert!(store.complete(key, token, response, DAY).await.unwrap());
    tokio::time::advance(Duration::from_secs(1)).await;
}

async fn begin_kind(store: &MemoryStore, key: &StoreKey) -> Result<&'static str, StoreErrorKind> {
    match store.begin(key, &random_fingerprint(), LONG).await {
        Ok(Begin::Acquired(_)) => Ok("acquired"),
        Ok(Begin::InFlight { .. }) => Ok("in flight"),
        Ok(Begin::Completed { .. }) => Ok("completed"),
        Err(error) => Err(error.kind()),
    }
}

#[tokio::test(start_paused = true)]
async fn conformance_when_full_refuse() {
    conformance::run_all(store(usize::MAX, usize::MAX, WhenFull::Refuse)).await;
}

#[tokio::test(start_paused = true)]
async fn conformance_when_full_evict_oldest() {
    conformance::run_all(store(usize::MAX, usize::MAX, WhenFull::EvictOldest)).await;
}

#[test]
fn evicting_is_the_default() {
    assert_eq!(WhenFull::default(), WhenFull::EvictOldest);
}

#[tokio::test(start_paused = true)]
async fn the_record_bound_evicts_the_oldest_completed_record_first() {
    // The default: no `when_full`.
    let store = MemoryStore::builder()
        .max_records(3)
        .sweep_interval(NEVER)
        .build();
    let (a, b, c, d) = (random_key(), random_key(), random_key(), random_key());
    store_completed(&store, &a, &marked_response("a")).await;
    store_completed(&store, &b, &marked_response("b")).await;
    store_completed(&store, &c, &marked_response("c")).await;

    acquire(&store, &d, &random_fingerprint(), LONG).await;
    assert_eq!(store.len(), 3, "one record made room for d");
    assert_eq!(expect_completed(&store, &b).await.1, marked_response("b"));
    assert_eq!(expect_completed(&store, &c).await.1, marked_response("c"));
    expect_in_flight(&store, &d).await;
    // a was the one evicted: it begins anew (and makes room by evicting b, now the oldest).
    assert_eq!(begin_kind(&store, &a).await, Ok("acquired"));
    assert_eq!(begin_kind(&store, &b).await, Ok("acquired"), "b went next");
    // And c for b: now only leases are left.
    assert_eq!(begin_kind(&store, &c).await, Err(StoreErrorKind::Full));
}

/// Through the layer: a full default store answers new keys with 201, not 503, and replays the
/// records it kept; the evicted one runs again.
#[tokio::test(start_paused = true)]
async fn the_layer_serves_new_keys_at_a_full_default_store() {
    let store = MemoryStore::builder()
        .max_records(2)
        .sweep_interval(NEVER)
        .build();
    let calls = Calls::default();
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move |body: Bytes| async move { created(counted.hit(), &body) }),
        )
        .layer(IdempotencyLayer::new().post("/calls").store(store.clone()));
    for key in ["a", "b", "c"] {
        let reply = send(&app, request("/calls", Some(key), "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{key}: {:?}", reply.body);
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(store.len(), 2);
    for key in ["b", "c"] {
        assert!(
            send(&app, request("/calls", Some(key), "{}"))
                .await
                .replayed(),
            "{key}"
        );
    }
    assert_eq!(calls.get(), 3);
    let again = send(&app, request("/calls", Some("a"), "{}")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.replayed(), "a was evicted: its retry runs again");
    assert_eq!(calls.get(), 4);
}

#[tokio::test(start_paused = true)]
async fn leases_are_never_evicted_and_full_comes_only_when_nothing_completed_is_left() {
    let store = store(3, usize::MAX, WhenFull::EvictOldest);
    let (a, b, c, d, e) = (
        random_key(),
        random_key(),
        random_key(),
        random_key(),
        random_key(),
    );
    // a: the oldest record, in flight; b: completed; c: in flight.
    let token_a = acquire(&store, &a, &random_fingerprint(), LONG).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    store_completed(&store, &b, &marked_response("b")).await;
    acquire(&store, &c, &random_fingerprint(), LONG).await;

    // d takes b's room: b was the only completed record.
    acquire(&store, &d, &random_fingerprint(), LONG).await;
    expect_in_flight(&store, &a).await;
    expect_in_flight(&store, &c).await;
    expect_in_flight(&store, &d).await;

    // Only leases are left: e is refused, and no lease was touched.
    assert_eq!(begin_kind(&store, &e).await, Err(StoreErrorKind::Full));
    assert_eq!(store.len(), 3);
    expect_in_flight(&store, &a).await;
    expect_in_flight(&store, &c).await;
    expect_in_flight(&store, &d).await;

    // Once a completes, it can be evicted for e.
    assert!(
        store
            .complete(&a, token_a, &marked_response("a"), DAY)
            .await
            .unwrap()
    );
    acquire(&store, &e, &random_fingerprint(), LONG).await;
    expect_in_flight(&store, &c).await;
    expect_in_flight(&store, &d).await;
    assert_eq!(
        begin_kind(&store, &a).await,
        Err(StoreErrorKind::Full),
        "a was evicted"
    );
}

#[tokio::test(start_paused = true)]
async fn the_byte_bound_evicts_the_oldest_until_below_it() {
    let store = store(usize::MAX, 250, WhenFull::EvictOldest);
    let (a, b, c, d) = (random_key(), random_key(), random_key(), random_key());
    store_completed(&store, &a, &body_of(100)).await;
    store_completed(&store, &b, &body_of(100)).await;
    store_completed(&store, &c, &body_of(100)).await;
    assert_eq!(store.bytes(), 300, "a completion may pass the bound");

    acquire(&store, &d, &random_fingerprint(), LONG).await;
    assert_eq!(store.bytes(), 200, "exactly one record (a) was evicted");
    assert_eq!(store.len(), 3);
    expect_completed(&store, &b).await;
    expect_completed(&store, &c).await;

    // A large response: room for the next key takes every record older than it, and itself.
    let (e, f) = (random_key(), random_key());
    store_completed(&store, &e, &body_of(400)).await;
    assert_eq!(store.bytes(), 600);
    acquire(&store, &f, &random_fingerprint(), LONG).await;
    assert_eq!(store.bytes(), 0);
    assert_eq!(store.len(), 2, "d and f, both in flight");
    expect_in_flight(&store, &d).await;
}

#[tokio::test(start_paused = true)]
async fn expired_records_are_reclaimed_before_a_live_one_is_evicted() {
    let store = store(2, usize::MAX, WhenFull::EvictOldest);
    let (old, short, new) = (random_key(), random_key(), random_key());
    // `old` completed first but lives long; `short` completed after it and expires.
    store_completed(&store, &old, &marked_response("old")).await;
    let token = acquire(&store, &short, &random_fingerprint(), LONG).await;
    assert!(
        store
            .complete(&short, token, &body_of(1), SHORT)
            .await
            .unwrap()
    );
    tokio::time::advance(SHORT + MARGIN).await;

    acquire(&store, &new, &random_fingerprint(), LONG).await;
    assert_eq!(
        expect_completed(&store, &old).await.1,
        marked_response("old"),
        "the expired record made room, not the oldest live one"
    );
}

#[tokio::test(start_paused = true)]
async fn refuse_turns_new_keys_away_and_keeps_every_record() {
    for (max_records, max_bytes) in [(2, usize::MAX), (usize::MAX, 150)] {
        let store = store(max_records, max_bytes, WhenFull::Refuse);
        let (a, b, c) = (random_key(), random_key(), random_key());
        store_completed(&store, &a, &body_of(100)).await;
        store_completed(&store, &b, &body_of(100)).await;
        assert_eq!(begin_kind(&store, &c).await, Err(StoreErrorKind::Full));
        assert_eq!(store.len(), 2);
        assert_eq!(expect_completed(&store, &a).await.1, body_of(100));
        assert_eq!(expect_completed(&store, &b).await.1, body_of(100));
    }
}

/// One line per minute at most, with the evictions since the last line and the age of the
/// youngest record evicted (the replay window in force).
#[tokio::test(start_paused = true)]
async fn evictions_are_logged_at_most_once_a_minute_with_the_youngest_age() {
    support::capture_trace();
    let store = store(2, usize::MAX, WhenFull::EvictOldest);
    let keys: Vec<_> = (0..8).map(|_| random_key()).collect();
    // keys[0] completes at t=0, keys[1] at t=1.
    store_completed(&store, &keys[0], &body_of(1)).await;
    store_completed(&store, &keys[1], &body_of(1)).await;
    tokio::time::advance(Duration::from_secs(8)).await; // t=10
    let token = acquire(&store, &keys[2], &random_fingerprint(), LONG).await; // evicts keys[0]
    let first = support::take_trace();
    assert_eq!(first.matches("evicted the oldest").count(), 1, "{first}");
    assert!(first.contains("evicted=1"), "{first}");
    assert!(first.contains("youngest_evicted_age_secs=10"), "{first}");
    assert!(first.contains("tower_idempotency"), "{first}");

    // 30 s later: an eviction, no line.
    tokio::time::advance(Duration::from_secs(30)).await; // t=40
    assert!(
        store
            .complete(&keys[2], token, &body_of(1), DAY)
            .await
            .unwrap()
    );
    // A lease that outlives the test, so that only eviction makes room.
    acquire(&store, &keys[3], &random_fingerprint(), DAY).await; // evicts keys[1]
    assert_eq!(support::take_trace(), "", "within the minute: no line");

    // A minute after the first line: the next eviction logs, counting both.
    tokio::time::advance(Duration::from_secs(30)).await; // t=70
    acquire(&store, &keys[4], &random_fingerprint(), LONG).await; // evicts keys[2]
    let second = support::take_trace();
    assert_eq!(second.matches("evicted the oldest").count(), 1, "{second}");
    assert!(second.contains("evicted=2"), "{second}");
    // keys[2] completed at t=40.
    assert!(second.contains("youngest_evicted_age_secs=30"), "{second}");
}

#[cfg(feature = "metrics")]
#[test]
fn the_eviction_metric_counts_every_eviction() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let evicting = store(2, usize::MAX, WhenFull::EvictOldest);
            for _ in 0..5 {
                store_completed(&evicting, &random_key(), &body_of(1)).await;
            }
            // Full with only leases: refused, not counted.
            let refusing = store(2, usize::MAX, WhenFull::EvictOldest);
            acquire(&refusing, &random_key(), &random_fingerprint(), LONG).await;
            acquire(&refusing, &random_key(), &random_fingerprint(), LONG).await;
            assert_eq!(
                begin_kind(&refusing, &random_key()).await,
                Err(StoreErrorKind::Full)
            );
        })
    });
    let counters: Vec<_> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "idempotency_memory_evictions_total")
        .map(|(.., value)| value)
        .collect();
    assert_eq!(
        counters,
        vec![DebugValue::Counter(3)],
        "5 records, room for 2"
    );
}
