//! Checks of completion and replay: the owner's `complete` stores the response, `begin` replays
//! it byte for byte, and a completed record belongs to no token.

use http::HeaderValue;

use super::fixtures::*;
use crate::store::IdempotencyStore;

/// `complete` by the owner stores the response; `begin` then replays it byte for byte with
/// the owner's fingerprint: binary bodies, empty bodies, repeated and non-UTF-8 header values,
/// several statuses.
pub async fn complete_then_begin_replays_byte_exact<S: IdempotencyStore>(store: &S) {
    for response in [binary_response(), empty_response(), problem_response()] {
        let key = random_key();
        let owner = random_fingerprint();
        let token = acquire(store, &key, &owner, LONG).await;
        assert!(
            complete(store, &key, token, &response, LONG).await,
            "the owner's complete stores the response"
        );
        let (fingerprint, stored) = expect_completed(store, &key).await;
        assert_eq!(
            fingerprint, owner,
            "Completed reports the owner's fingerprint"
        );
        assert_same_response(&stored, &response);
        let multi: Vec<&[u8]> = stored
            .headers
            .get_all("x-multi")
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        let want: Vec<&[u8]> = response
            .headers
            .get_all("x-multi")
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        assert_eq!(multi, want, "repeated header values keep their order");
        // A replay does not consume the record.
        let (_, again) = expect_completed(store, &key).await;
        assert_same_response(&again, &response);
    }
}

/// Once completed, the token owns nothing: a `renew` or a `release` with it returns false, a
/// repeated `complete` (either answer is allowed) changes nothing, and the response stays.
pub async fn complete_needs_a_live_lease<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    let token = acquire(store, &key, &random_fingerprint(), LONG).await;
    let first = marked_response("first");
    assert!(complete(store, &key, token, &first, LONG).await);
    // The contract lets a repeat by the completing token answer `true` (a store that remembers
    // it, as `RedisStore` with `wait_replicas`) or `false`; neither may change the response.
    let _either = complete(store, &key, token, &marked_response("second"), LONG).await;
    assert!(
        !renew(store, &key, token, LONG).await,
        "renew after complete"
    );
    assert!(!release(store, &key, token).await, "release after complete");
    let (_, stored) = expect_completed(store, &key).await;
    assert_same_response(&stored, &first);
}
