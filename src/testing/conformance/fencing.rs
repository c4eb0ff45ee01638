//! Checks of the lease token: `complete`, `renew` and `release` with a token that does not own
//! the lease (or on a key with no record) change nothing and return false.

use super::fixtures::*;
use crate::store::{IdempotencyStore, LeaseToken};

/// `complete`, `renew` and `release` with a token that does not own the lease return false and
/// leave the lease as it was; the owner can still complete.
pub async fn wrong_token_changes_nothing<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    let owner = random_fingerprint();
    let token = acquire(store, &key, &owner, LONG).await;
    let stranger = LeaseToken::random();
    assert!(
        !complete(store, &key, stranger, &marked_response("stranger"), LONG).await,
        "complete with a wrong token"
    );
    assert!(
        !renew(store, &key, stranger, LONG).await,
        "renew with a wrong token"
    );
    assert!(
        !release(store, &key, stranger).await,
        "release with a wrong token"
    );
    let (fingerprint, _) = expect_in_flight(store, &key).await;
    assert_eq!(fingerprint, owner, "the lease is untouched");
    let mine = marked_response("owner");
    assert!(
        complete(store, &key, token, &mine, LONG).await,
        "the owner still completes"
    );
    let (fingerprint, stored) = expect_completed(store, &key).await;
    assert_eq!(fingerprint, owner);
    assert_same_response(&stored, &mine);
}

/// A completed record ignores every token: nothing overwrites or drops it.
pub async fn wrong_token_on_completed_changes_nothing<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    let owner = random_fingerprint();
    let token = acquire(store, &key, &owner, LONG).await;
    let response = binary_response();
    assert!(complete(store, &key, token, &response, LONG).await);
    let stranger = LeaseToken::random();
    assert!(!complete(store, &key, stranger, &marked_response("x"), LONG).await);
    assert!(!renew(store, &key, stranger, LONG).await);
    assert!(!release(store, &key, stranger).await);
    let (fingerprint, stored) = expect_completed(store, &key).await;
    assert_eq!(fingerprint, owner);
    assert_same_response(&stored, &response);
}

/// `complete`, `renew` and `release` on a key with no record return false and create nothing.
pub async fn calls_on_absent_key_return_false<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    let token = LeaseToken::random();
    assert!(!complete(store, &key, token, &marked_response("x"), LONG).await);
    assert!(!renew(store, &key, token, LONG).await);
    assert!(!release(store, &key, token).await);
    acquire(store, &key, &random_fingerprint(), LONG).await;
}
