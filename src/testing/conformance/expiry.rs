//! Checks of deadlines: an expired lease is taken over, `renew` moves the deadline, a late
//! completion is consistent with what `begin` sees, and a response is kept for its TTL only.

use std::time::Duration;

use tokio::time::Instant;

use super::fixtures::*;
use crate::store::IdempotencyStore;

/// A lease past its expiry is taken over by the next `begin`; the old owner's token then
/// cannot complete, renew or release, and does not overwrite the new owner's response.
pub async fn expired_lease_is_taken_over<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    let old = acquire(store, &key, &random_fingerprint(), SHORT).await;
    wait_out(SHORT).await;
    let new_fingerprint = random_fingerprint();
    let new = acquire(store, &key, &new_fingerprint, LONG).await;
    assert!(
        !complete(store, &key, old, &marked_response("old"), LONG).await,
        "the old owner cannot complete after a takeover"
    );
    assert!(!renew(store, &key, old, LONG).await, "nor renew");
    assert!(!release(store, &key, old).await, "nor release");
    let (fingerprint, _) = expect_in_flight(store, &key).await;
    assert_eq!(fingerprint, new_fingerprint, "the new lease is untouched");
    let mine = marked_response("new");
    assert!(complete(store, &key, new, &mine, LONG).await);
    let (fingerprint, stored) = expect_completed(store, &key).await;
    assert_eq!(fingerprint, new_fingerprint);
    assert_same_response(&stored, &mine);
}

/// A lease past its expiry that nobody took over: the contract lets a store either accept the
/// owner's late `complete` or refuse it, but the answer must match what `begin` sees next
/// (the response, or a free key).
pub async fn late_completion_without_takeover_is_consistent<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    let owner = random_fingerprint();
    let token = acquire(store, &key, &owner, SHORT).await;
    wait_out(SHORT).await;
    let response = marked_response("late");
    if complete(store, &key, token, &response, LONG).await {
        let (fingerprint, stored) = expect_completed(store, &key).await;
        assert_eq!(fingerprint, owner);
        assert_same_response(&stored, &response);
    } else {
        acquire(store, &key, &random_fingerprint(), LONG).await;
    }
}

/// `renew` by the owner moves the expiry out: past the original expiry the lease is still held.
pub async fn renew_extends_lease_past_original_expiry<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    let owner = random_fingerprint();
    let token = acquire(store, &key, &owner, SHORT).await;
    assert!(renew(store, &key, token, LONG).await, "the owner's renew");
    wait_out(SHORT).await;
    let (fingerprint, lease_remaining) = expect_in_flight(store, &key).await;
    assert_eq!(fingerprint, owner);
    assert!(lease_remaining > Duration::ZERO);
    assert!(complete(store, &key, token, &marked_response("renewed"), LONG).await);
}

/// A completed response is kept for its TTL and no longer: past it, `begin` acquires again
/// and the new lease carries the new fingerprint.
pub async fn completed_record_expires_after_ttl<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    let token = acquire(store, &key, &random_fingerprint(), LONG).await;
    assert!(complete(store, &key, token, &binary_response(), SHORT).await);
    expect_completed(store, &key).await;
    wait_out(SHORT).await;
    let next_fingerprint = random_fingerprint();
    let next = acquire(store, &key, &next_fingerprint, LONG).await;
    assert!(
        !release(store, &key, token).await,
        "the first token owns nothing"
    );
    let (fingerprint, _) = expect_in_flight(store, &key).await;
    assert_eq!(fingerprint, next_fingerprint);
    assert!(release(store, &key, next).await);
}

/// Deadlines come no earlier than asked: looked at two thirds of the way through, a lease is
/// still held, reporting no more time left than it has, and a completed response is still
/// replayed. (A store that keeps either for half the time asked fails here.)
pub async fn deadlines_are_not_early<S: IdempotencyStore>(store: &S) {
    // 1.8 s: the check looks at 1.2 s, and a store that keeps half lost the record at 0.9 s;
    // the 0.6 s left is headroom for a slow machine.
    let asked = SHORT * 6;
    let leased = random_key();
    let owner = random_fingerprint();
    acquire(store, &leased, &owner, asked).await;
    let acquired = Instant::now();
    let kept = random_key();
    let token = acquire(store, &kept, &random_fingerprint(), LONG).await;
    let response = marked_response("kept");
    assert!(complete(store, &kept, token, &response, asked).await);

    tokio::time::sleep(asked * 2 / 3).await;
    let asking = Instant::now();
    let (fingerprint, lease_remaining) = expect_in_flight(store, &leased).await;
    assert_eq!(fingerprint, owner, "the lease is still its owner's");
    let left = asked.saturating_sub(asking - acquired);
    assert!(
        lease_remaining <= left + CLOCK_SLACK,
        "lease_remaining is what is left of the lease ({left:?} at most), not {lease_remaining:?}"
    );
    let (_, stored) = expect_completed(store, &kept).await;
    assert_same_response(&stored, &response);
}

/// How far a store's own clock (and its rounding, to a millisecond in Redis) may put a
/// deadline past the one this process computes.
const CLOCK_SLACK: Duration = Duration::from_millis(100);
