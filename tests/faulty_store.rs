//! `testing::FaultyStore`: each fault does what it says, on the calls it is set for.
#![cfg(feature = "testing")]

use std::time::Duration;

use tower_idempotency::{
    MemoryStore,
    store::{Begin, Fingerprint, IdempotencyStore, StoreErrorKind, StoreKey},
    testing::{Fault, FaultyStore, StoreOp},
};

const LEASE: Duration = Duration::from_secs(30);

fn key(n: u8) -> StoreKey {
    StoreKey([n; 32])
}

#[tokio::test(start_paused = true)]
async fn faults_apply_to_their_call_only_and_every_call_is_counted() {
    let store = FaultyStore::new(MemoryStore::new());
    store.set(StoreOp::Begin, Fault::Fail);
    let failed = store.begin(&key(1), &Fingerprint([1; 32]), LEASE).await;
    assert_eq!(failed.unwrap_err().kind(), StoreErrorKind::Unavailable);
    // Not forwarded: the key is still free underneath.
    let inner = store
        .inner()
        .begin(&key(1), &Fingerprint([1; 32]), LEASE)
        .await;
    assert!(matches!(inner, Ok(Begin::Acquired(_))));

    // Other calls are not affected.
    let token = match store
        .inner()
        .begin(&key(2), &Fingerprint([2; 32]), LEASE)
        .await
    {
        Ok(Begin::Acquired(token)) => token,
        other => panic!("{other:?}"),
    };
    assert!(store.renew(&key(2), token, LEASE).await.unwrap());

    store.clear();
    assert!(matches!(
        store.begin(&key(3), &Fingerprint([3; 32]), LEASE).await,
        Ok(Begin::Acquired(_))
    ));
    assert_eq!(store.calls(StoreOp::Begin), 2);
    assert_eq!(store.calls(StoreOp::Renew), 1);
    assert_eq!(store.calls(StoreOp::Complete), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lost_reply_does_the_work_and_reports_a_failure() {
    let store = FaultyStore::new(MemoryStore::new());
    store.set(StoreOp::Begin, Fault::LoseReply);
    let lost = store.begin(&key(1), &Fingerprint([1; 32]), LEASE).await;
    assert_eq!(lost.unwrap_err().kind(), StoreErrorKind::Unavailable);
    // The lease was taken all the same.
    let found = store
        .inner()
        .begin(&key(1), &Fingerprint([1; 32]), LEASE)
        .await;
    assert!(matches!(found, Ok(Begin::InFlight { .. })), "{found:?}");
}

#[tokio::test(start_paused = true)]
async fn a_delay_waits_then_forwards_and_a_hang_never_answers() {
    let store = FaultyStore::new(MemoryStore::new());
    store.set(StoreOp::Begin, Fault::Delay(Duration::from_secs(3)));
    let started = tokio::time::Instant::now();
    let begun = store.begin(&key(1), &Fingerprint([1; 32]), LEASE).await;
    assert!(matches!(begun, Ok(Begin::Acquired(_))));
    assert_eq!(started.elapsed(), Duration::from_secs(3));

    store.set(StoreOp::Begin, Fault::Hang);
    let hung = tokio::time::timeout(
        Duration::from_secs(600),
        store.begin(&key(2), &Fingerprint([2; 32]), LEASE),
    )
    .await;
    assert!(hung.is_err());
}

/// A store whose `release` does nothing.
#[derive(Clone)]
struct NoRelease(MemoryStore);

#[tower_idempotency::async_trait]
impl IdempotencyStore for NoRelease {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, tower_idempotency::store::StoreError> {
        self.0.begin(key, fingerprint, lease).await
    }
    async fn renew(
        &self,
        key: &StoreKey,
        token: tower_idempotency::store::LeaseToken,
        lease: Duration,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        self.0.renew(key, token, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        token: tower_idempotency::store::LeaseToken,
        response: &tower_idempotency::StoredResponse,
        ttl: Duration,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        self.0.complete(key, token, response, ttl).await
    }
    async fn release(
        &self,
        _: &StoreKey,
        _: tower_idempotency::store::LeaseToken,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        Ok(false)
    }
}

/// The conformance suite names the rule a store broke in its panic message.
#[tokio::test(start_paused = true)]
#[should_panic(expected = "store conformance: rule `release_lets_next_begin_acquire` broke")]
async fn the_conformance_suite_names_the_rule_that_broke() {
    tower_idempotency::testing::conformance::run_all(NoRelease(MemoryStore::new())).await;
}

#[tokio::test(start_paused = true)]
async fn wait_is_forwarded_to_the_wrapped_store() {
    // A lease that nothing completes or releases: the wrapped store's wait takes its whole
    // timeout.
    let store = FaultyStore::new(MemoryStore::new());
    let held = store.begin(&key(9), &Fingerprint([9; 32]), LEASE).await;
    assert!(matches!(held, Ok(Begin::Acquired(_))));
    let start = tokio::time::Instant::now();
    store
        .wait(&key(9), Duration::from_millis(250))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    assert_eq!(store.calls(StoreOp::Wait), 1);
}

#[test]
fn debug_shows_faults_and_call_counts() {
    let store = FaultyStore::new(MemoryStore::new());
    store.set(StoreOp::Begin, Fault::Fail);
    let shown = format!("{store:?}");
    assert!(shown.starts_with("FaultyStore { faults: ["), "{shown}");
    assert!(shown.contains("Fail"), "{shown}");
    assert!(shown.contains("calls: [0, 0, 0, 0, 0]"), "{shown}");
}
