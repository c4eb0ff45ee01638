//! Checks of `begin` and its answers: a free key is acquired, a held one is reported in flight
//! with its owner's fingerprint, exactly one of many racing calls acquires, a released key is
//! free again, and `wait` ends within its timeout.

use std::{sync::Arc, time::Duration};

use tokio::sync::Barrier;

use super::fixtures::*;
use crate::store::{Begin, IdempotencyStore};

/// `begin` on a key the store has never seen acquires a lease.
pub async fn begin_on_absent_key_acquires<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    acquire(store, &key, &random_fingerprint(), LONG).await;
}

/// A second `begin` while the lease is held reports the owner's fingerprint (not the caller's)
/// and a positive time left, no more than the lease.
pub async fn begin_on_held_lease_reports_in_flight<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    let owner = random_fingerprint();
    acquire(store, &key, &owner, LONG).await;
    let (fingerprint, lease_remaining) = expect_in_flight(store, &key).await;
    assert_eq!(
        fingerprint, owner,
        "InFlight reports the owner's fingerprint"
    );
    assert!(
        lease_remaining > Duration::ZERO,
        "lease_remaining is positive"
    );
    assert!(
        lease_remaining <= LONG,
        "lease_remaining is at most the lease"
    );
    // Asking again changes nothing.
    let (fingerprint, _) = expect_in_flight(store, &key).await;
    assert_eq!(fingerprint, owner);
}

/// `release` by the owner drops the lease, so the next `begin` acquires (with its own
/// fingerprint); the released token then owns nothing.
pub async fn release_lets_next_begin_acquire<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    let first = acquire(store, &key, &random_fingerprint(), LONG).await;
    assert!(release(store, &key, first).await, "the owner's release");
    assert!(!release(store, &key, first).await, "a second release");
    let next_fingerprint = random_fingerprint();
    let second = acquire(store, &key, &next_fingerprint, LONG).await;
    assert!(second != first, "every acquisition draws a fresh token");
    let (fingerprint, _) = expect_in_flight(store, &key).await;
    assert_eq!(fingerprint, next_fingerprint, "the new owner's fingerprint");
    assert!(
        !complete(store, &key, first, &marked_response("old"), LONG).await,
        "the released token cannot complete the new lease"
    );
    assert!(!release(store, &key, first).await);
    expect_in_flight(store, &key).await;
}

/// 50 tasks call `begin` on one key at once: exactly one acquires, the others see it in flight.
pub async fn concurrent_begin_acquires_exactly_once<S: IdempotencyStore + Clone>(store: &S) {
    const TASKS: usize = 50;
    let key = random_key();
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store.begin(&key, &random_fingerprint(), LONG).await
            })
        })
        .collect();
    let (mut acquired, mut in_flight) = (0, 0);
    for task in tasks {
        match task.await.expect("task panicked").expect("begin failed") {
            Begin::Acquired(_) => acquired += 1,
            Begin::InFlight { .. } => in_flight += 1,
            Begin::Completed { .. } => panic!("nothing was completed"),
        }
    }
    assert_eq!(acquired, 1, "exactly one begin acquires");
    assert_eq!(in_flight, TASKS - 1);
}

/// `wait` returns (successfully) within its timeout, on a held lease and on an absent key.
pub async fn wait_returns_within_timeout<S: IdempotencyStore>(store: &S) {
    // Generous: only a `wait` that ignores its timeout runs into it.
    const BOUND: Duration = Duration::from_secs(10);
    let key = random_key();
    acquire(store, &key, &random_fingerprint(), LONG).await;
    tokio::time::timeout(BOUND, store.wait(&key, SHORT))
        .await
        .expect("wait on a held lease ignored its timeout")
        .expect("wait failed");
    tokio::time::timeout(BOUND, store.wait(&random_key(), SHORT))
        .await
        .expect("wait on an absent key ignored its timeout")
        .expect("wait failed");
}
