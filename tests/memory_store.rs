//! `MemoryStore`: the store conformance suite, plus what only the in-memory store has (bounds
//! with `WhenFull::Refuse`, sweeping, wake-ups of waiting duplicates; eviction is in
//! `memory_eviction.rs`). Store-clock tests run on a paused tokio clock.
#![cfg(feature = "testing")]
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::conformance::{
    self, LONG, MARGIN, SHORT, acquire, expect_completed, expect_in_flight, marked_response,
    random_fingerprint, random_key,
};
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;
use tower_idempotency::{
    MemoryStore, StoredResponse,
    store::{IdempotencyStore, StoreErrorKind, StoreKey, WhenFull},
};

/// A sweeper interval long enough that only `sweep()` (or `begin` at a bound) reclaims.
const NEVER: Duration = Duration::from_secs(24 * 60 * 60);

fn body_of(len: usize) -> StoredResponse {
    StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::new(),
        body: Bytes::from(vec![7; len]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_real_clock() {
    conformance::run_all(MemoryStore::new()).await;
}

#[tokio::test(start_paused = true)]
async fn conformance_on_paused_clock() {
    conformance::run_all(MemoryStore::new()).await;
}

#[tokio::test(start_paused = true)]
async fn record_bound_gives_full_and_never_evicts_live_records() {
    let store = MemoryStore::builder()
        .max_records(2)
        .when_full(WhenFull::Refuse)
        .sweep_interval(NEVER)
        .build();
    let (a, b, c) = (random_key(), random_key(), random_key());
    let (fa, fb) = (random_fingerprint(), random_fingerprint());
    let token_a = acquire(&store, &a, &fa, LONG).await;
    acquire(&store, &b, &fb, LONG).await;

    let error = store
        .begin(&c, &random_fingerprint(), LONG)
        .await
        .expect_err("a third record is past the bound");
    assert_eq!(error.kind(), StoreErrorKind::Full);
    assert_eq!(store.len(), 2);
    assert_eq!(expect_in_flight(&store, &a).await.0, fa, "a is still held");
    assert_eq!(expect_in_flight(&store, &b).await.0, fb, "b is still held");

    // Completed records are live too until their TTL runs out.
    assert!(
        store
            .complete(&a, token_a, &marked_response("a"), SHORT)
            .await
            .unwrap()
    );
    let error = store
        .begin(&c, &random_fingerprint(), LONG)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Full);
    expect_completed(&store, &a).await;

    // Once a's TTL has passed, its room is reclaimed for c (without the sweeper running).
    tokio::time::sleep(SHORT + MARGIN).await;
    acquire(&store, &c, &random_fingerprint(), LONG).await;
    assert_eq!(store.len(), 2);
    assert_eq!(expect_in_flight(&store, &b).await.0, fb, "b survived");
}

#[tokio::test(start_paused = true)]
async fn byte_bound_gives_full_and_never_evicts_live_records() {
    let store = MemoryStore::builder()
        .max_bytes(100)
        .when_full(WhenFull::Refuse)
        .sweep_interval(NEVER)
        .build();
    let (a, b) = (random_key(), random_key());
    let fa = random_fingerprint();
    let token = acquire(&store, &a, &fa, LONG).await;
    let big = body_of(200);
    assert!(store.complete(&a, token, &big, LONG).await.unwrap());
    assert!(store.bytes() >= 200);

    let error = store
        .begin(&b, &random_fingerprint(), LONG)
        .await
        .expect_err("past the byte bound");
    assert_eq!(error.kind(), StoreErrorKind::Full);
    let (fingerprint, stored) = expect_completed(&store, &a).await;
    assert_eq!(fingerprint, fa);
    assert_eq!(stored, big, "the live record is kept whole");
}

#[tokio::test(start_paused = true)]
async fn existing_keys_answer_at_the_bound() {
    let store = MemoryStore::builder()
        .max_records(1)
        .sweep_interval(NEVER)
        .build();
    let key = random_key();
    let token = acquire(&store, &key, &random_fingerprint(), SHORT).await;
    expect_in_flight(&store, &key).await;
    // An expired lease is taken over in place: no new record, so no bound applies.
    tokio::time::sleep(SHORT + MARGIN).await;
    let next = acquire(&store, &key, &random_fingerprint(), LONG).await;
    assert!(next != token);
    assert!(
        store
            .complete(&key, next, &marked_response("x"), LONG)
            .await
            .unwrap()
    );
    expect_completed(&store, &key).await;
}

#[tokio::test(start_paused = true)]
async fn sweep_reclaims_expired_records_only() {
    let store = MemoryStore::builder().sweep_interval(NEVER).build();
    let expired_lease = random_key();
    let expired_response = random_key();
    let live_lease = random_key();
    let live_response = random_key();

    acquire(&store, &expired_lease, &random_fingerprint(), SHORT).await;
    let token = acquire(&store, &expired_response, &random_fingerprint(), LONG).await;
    assert!(
        store
            .complete(&expired_response, token, &body_of(50), SHORT)
            .await
            .unwrap()
    );
    let live_fingerprint = random_fingerprint();
    acquire(&store, &live_lease, &live_fingerprint, LONG).await;
    let token = acquire(&store, &live_response, &random_fingerprint(), LONG).await;
    let kept = body_of(70);
    assert!(
        store
            .complete(&live_response, token, &kept, LONG)
            .await
            .unwrap()
    );
    assert_eq!(store.len(), 4);

    assert_eq!(store.sweep(), 0, "nothing has expired yet");
    assert_eq!(store.len(), 4);

    tokio::time::sleep(SHORT + MARGIN).await;
    assert_eq!(store.len(), 4, "expired records wait for a sweep");
    store.sweep();
    assert_eq!(store.len(), 2, "the two expired records are gone");
    assert_eq!(store.bytes(), kept.weight(), "their bytes are released");
    assert_eq!(
        expect_in_flight(&store, &live_lease).await.0,
        live_fingerprint
    );
    assert_eq!(expect_completed(&store, &live_response).await.1, kept);
    assert_eq!(store.sweep(), 0, "a second sweep finds nothing");
}

#[tokio::test(start_paused = true)]
async fn background_sweeper_reclaims_expired_records() {
    let store = MemoryStore::builder()
        .sweep_interval(Duration::from_secs(1))
        .build();
    let key = random_key();
    let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
    assert!(
        store
            .complete(&key, token, &body_of(10), SHORT)
            .await
            .unwrap()
    );
    let live = random_key();
    acquire(&store, &live, &random_fingerprint(), LONG).await;
    assert_eq!(store.len(), 2);
    // The paused clock advances to the sweeper's next ticks.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(store.len(), 1, "the sweeper removed the expired record");
    assert_eq!(store.bytes(), 0);
    expect_in_flight(&store, &live).await;
}

/// `wait` on a held lease returns as soon as the lease is completed or released, not at its
/// timeout: on a paused clock, no time passes.
#[tokio::test(start_paused = true)]
async fn wait_wakes_on_complete_and_release() {
    const TIMEOUT: Duration = Duration::from_secs(3600);
    let store = MemoryStore::builder().sweep_interval(NEVER).build();
    for complete in [true, false] {
        let key = random_key();
        let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait(&key, TIMEOUT).await })
        };
        // Let the waiter register (current-thread runtime: it runs at this yield).
        tokio::task::yield_now().await;
        let start = Instant::now();
        if complete {
            assert!(
                store
                    .complete(&key, token, &marked_response("x"), LONG)
                    .await
                    .unwrap()
            );
        } else {
            assert!(store.release(&key, token).await.unwrap());
        }
        waiter.await.unwrap().unwrap();
        assert!(
            start.elapsed() < TIMEOUT,
            "the waiter was woken, not timed out (complete: {complete})"
        );
    }
}

/// A waiter is not woken by a renewal: the record did not change for it.
#[tokio::test(start_paused = true)]
async fn wait_sleeps_through_renewal() {
    const TIMEOUT: Duration = Duration::from_secs(5);
    let store = MemoryStore::builder().sweep_interval(NEVER).build();
    let key = random_key();
    let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait(&key, TIMEOUT).await })
    };
    tokio::task::yield_now().await;
    let start = Instant::now();
    assert!(store.renew(&key, token, LONG).await.unwrap());
    waiter.await.unwrap().unwrap();
    assert!(start.elapsed() >= TIMEOUT, "renewal does not wake waiters");
    // And the waiter registered on the renewed record is still woken by completion.
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait(&key, TIMEOUT).await })
    };
    tokio::task::yield_now().await;
    assert!(store.renew(&key, token, LONG).await.unwrap());
    let start = Instant::now();
    assert!(
        store
            .complete(&key, token, &marked_response("x"), LONG)
            .await
            .unwrap()
    );
    waiter.await.unwrap().unwrap();
    assert!(start.elapsed() < TIMEOUT);
}

/// `begin` on a record whose response expired hands out a lease even before a sweep, and
/// reports the new fingerprint from then on.
#[tokio::test(start_paused = true)]
async fn expired_response_is_never_replayed_before_a_sweep() {
    let store = MemoryStore::builder().sweep_interval(NEVER).build();
    let key = random_key();
    let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
    assert!(
        store
            .complete(&key, token, &body_of(5), SHORT)
            .await
            .unwrap()
    );
    tokio::time::sleep(SHORT + MARGIN).await;
    assert_eq!(store.len(), 1, "not swept");
    // Taken over: `acquire` panics unless `begin` answers Acquired.
    acquire(&store, &key, &random_fingerprint(), LONG).await;
    assert_eq!(
        store.bytes(),
        0,
        "the expired response's bytes are released"
    );
}

#[tokio::test(start_paused = true)]
async fn len_is_empty_and_debug_count_records_and_bytes() {
    let store = MemoryStore::builder().sweep_interval(NEVER).build();
    assert!(store.is_empty());
    assert_eq!(format!("{store:?}"), "MemoryStore { records: 0, bytes: 0 }");
    let key = random_key();
    let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
    assert!(!store.is_empty());
    assert_eq!(store.len(), 1);
    let response = body_of(10);
    assert!(store.complete(&key, token, &response, LONG).await.unwrap());
    assert_eq!(
        format!("{store:?}"),
        format!("MemoryStore {{ records: 1, bytes: {} }}", response.weight())
    );
}

/// A lease is over at its expiry instant: a duplicate waiting on it then returns at once
/// (to take it over), rather than sleeping out its timeout.
#[tokio::test(start_paused = true)]
async fn wait_on_a_lease_at_its_expiry_returns_at_once() {
    // No background sweeper: its first round, at the first yield, would remove the expired
    // record before the wait looks.
    let store = MemoryStore::builder().background_sweep(false).build();
    let key = random_key();
    acquire(&store, &key, &random_fingerprint(), SHORT).await;
    tokio::time::advance(SHORT).await;
    let start = Instant::now();
    store.wait(&key, LONG).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    // Before its expiry, the same wait sleeps (here: out its timeout, as nothing completes).
    let live = random_key();
    acquire(&store, &live, &random_fingerprint(), LONG).await;
    let start = Instant::now();
    store.wait(&live, SHORT).await.unwrap();
    assert_eq!(start.elapsed(), SHORT);
}

/// A lease is over at its expiry instant: `begin` then takes the key over.
#[tokio::test(start_paused = true)]
async fn a_lease_at_its_expiry_instant_is_taken_over() {
    let store = MemoryStore::builder().sweep_interval(NEVER).build();
    let key = random_key();
    acquire(&store, &key, &random_fingerprint(), SHORT).await;
    tokio::time::advance(SHORT).await;
    // Taken over: `acquire` panics unless `begin` answers Acquired.
    acquire(&store, &key, &random_fingerprint(), LONG).await;
}

/// A completed response is over at its expiry instant: `begin` then takes the key over.
#[tokio::test(start_paused = true)]
async fn a_response_at_its_expiry_instant_is_taken_over() {
    let store = MemoryStore::builder().sweep_interval(NEVER).build();
    let key = random_key();
    let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
    assert!(
        store
            .complete(&key, token, &body_of(5), SHORT)
            .await
            .unwrap()
    );
    tokio::time::advance(SHORT).await;
    // Taken over: `acquire` panics unless `begin` answers Acquired.
    acquire(&store, &key, &random_fingerprint(), LONG).await;
}

/// At the record bound, a key whose record has expired is taken over in place: it needs no
/// new room, so it is acquired even when reclaiming finds nothing to remove (here the sweep's
/// one-entry batch meets the stale index entry of a released lease first, in shard 0).
#[tokio::test(start_paused = true)]
async fn an_expired_key_at_the_record_bound_is_taken_over_without_new_room() {
    let store = MemoryStore::builder()
        .max_records(1)
        .when_full(WhenFull::Refuse)
        .sweep_batch(1)
        .sweep_interval(NEVER)
        .build();
    let released = StoreKey([0; 32]);
    let token = acquire(&store, &released, &random_fingerprint(), SHORT).await;
    assert!(store.release(&released, token).await.unwrap());
    let key = StoreKey([1; 32]);
    acquire(&store, &key, &random_fingerprint(), SHORT).await;
    tokio::time::sleep(SHORT + MARGIN).await;
    // Taken over: `acquire` panics unless `begin` answers Acquired.
    acquire(&store, &key, &random_fingerprint(), LONG).await;
    assert_eq!(store.len(), 1);
}

/// Rebuilding an index shard (here at once: four records in one shard, a batch of 1) keeps
/// the entries of the records still there, so each is swept once it expires.
#[tokio::test(start_paused = true)]
async fn records_are_swept_after_their_index_shard_was_rebuilt() {
    let store = MemoryStore::builder()
        .sweep_batch(1)
        .sweep_interval(NEVER)
        .build();
    for n in 1..=4 {
        // First byte 16 * n: all in the same shard.
        acquire(
            &store,
            &StoreKey([16 * n; 32]),
            &random_fingerprint(),
            SHORT,
        )
        .await;
    }
    assert_eq!(store.sweep(), 0, "nothing is due yet");
    tokio::time::sleep(SHORT + MARGIN).await;
    assert_eq!(store.sweep(), 4);
    assert!(store.is_empty());
}
