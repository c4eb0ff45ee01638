//! The store conformance suite: the whole [`IdempotencyStore`] contract, run once per backend.
//! Every store of this crate passes it; run it on yours in one call:
//!
//! ```no_run
//! # #[derive(Clone)] struct MyStore;
//! # #[tower_idempotency::async_trait] impl tower_idempotency::IdempotencyStore for MyStore {
//! #   async fn begin(&self, _: &tower_idempotency::store::StoreKey, _: &tower_idempotency::store::Fingerprint, _: std::time::Duration) -> Result<tower_idempotency::store::Begin, tower_idempotency::store::StoreError> { unimplemented!() }
//! #   async fn renew(&self, _: &tower_idempotency::store::StoreKey, _: tower_idempotency::store::LeaseToken, _: std::time::Duration) -> Result<bool, tower_idempotency::store::StoreError> { unimplemented!() }
//! #   async fn complete(&self, _: &tower_idempotency::store::StoreKey, _: tower_idempotency::store::LeaseToken, _: &tower_idempotency::StoredResponse, _: std::time::Duration) -> Result<bool, tower_idempotency::store::StoreError> { unimplemented!() }
//! #   async fn release(&self, _: &tower_idempotency::store::StoreKey, _: tower_idempotency::store::LeaseToken) -> Result<bool, tower_idempotency::store::StoreError> { unimplemented!() }
//! # }
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn my_store_meets_the_contract() {
//!     tower_idempotency::testing::conformance::run_all(MyStore).await;
//! }
//! ```
//!
//! A check that fails panics with the rule that broke, as in ``store conformance: rule
//! `release_lets_next_begin_acquire` broke: ...``. Your store must be `Clone` (derive it, or pass an
//! `Arc` of it): checks that race several calls share it between tasks. Run it on a real clock for stores that keep time on a server, and on a paused
//! tokio clock (`#[tokio::test(start_paused = true)]`) for stores on tokio's clock.
//!
//! `run_all(store).await` runs every check; each check is also a `pub async fn` of its own, so
//! a failure names the rule that broke. Every check uses fresh random keys and fingerprints, so
//! a store shared by several tests (or several runs, as with Redis and PostgreSQL) never sees
//! one check's records in another.
//!
//! Durations are kept short (a few hundred milliseconds) because shared stores keep time on
//! the server's clock, so expiry needs real waiting; under a paused tokio clock the sleeps
//! cost nothing.

use std::{sync::Arc, time::Duration};

use crate::{
    StoredResponse,
    store::{Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreKey},
};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::Barrier;

/// A lease that does not run out during a check.
pub const LONG: Duration = Duration::from_secs(30);
/// A lease or TTL that a check waits out.
pub const SHORT: Duration = Duration::from_millis(300);
/// How long past a [`SHORT`] deadline a check waits before it expects the deadline to have
/// passed on the store's clock.
pub const MARGIN: Duration = Duration::from_millis(200);

/// Runs every check of the suite on `store`, one after another.
pub async fn run_all<S: IdempotencyStore + Clone>(store: S) {
    // Each check's name goes to stderr first, so a failing run shows which rule broke.
    macro_rules! checks {
        ($($check:ident),* $(,)?) => {$(
            eprintln!("store conformance: {}", stringify!($check));
            check_named(stringify!($check), $check(&store)).await;
        )*};
    }
    checks!(
        begin_on_absent_key_acquires,
        begin_on_held_lease_reports_in_flight,
        complete_then_begin_replays_byte_exact,
        complete_needs_a_live_lease,
        wrong_token_changes_nothing,
        wrong_token_on_completed_changes_nothing,
        calls_on_absent_key_return_false,
        release_lets_next_begin_acquire,
        expired_lease_is_taken_over,
        late_completion_without_takeover_is_consistent,
        renew_extends_lease_past_original_expiry,
        completed_record_expires_after_ttl,
        concurrent_begin_acquires_exactly_once,
        wait_returns_within_timeout,
    );
}

/// Runs one check; a failure panics again with the rule's name in front of its message.
async fn check_named(name: &str, check: impl std::future::Future<Output = ()>) {
    use futures_util::FutureExt;

    if let Err(panic) = std::panic::AssertUnwindSafe(check).catch_unwind().await {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        panic!("store conformance: rule `{name}` broke: {message}");
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn random_32() -> [u8; 32] {
    let mut out = [0; 32];
    out[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    out[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    out
}

/// A key no other check (or earlier run) uses.
pub fn random_key() -> StoreKey {
    StoreKey(random_32())
}

/// A fingerprint no other check uses.
pub fn random_fingerprint() -> Fingerprint {
    Fingerprint(random_32())
}

/// 201 with a body holding every byte value, repeated headers and a non-UTF-8 header value.
pub fn binary_response() -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.append("x-multi", HeaderValue::from_static("one"));
    headers.append("x-multi", HeaderValue::from_static("two"));
    headers.append("x-multi", HeaderValue::from_static("three"));
    headers.insert(
        "x-binary",
        HeaderValue::from_bytes(&[b'a', 0x80, 0xfe, 0xff, b'z']).expect("obs-text is allowed"),
    );
    headers.insert(header::LOCATION, HeaderValue::from_static("/calls/42"));
    let body: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    StoredResponse {
        status: StatusCode::CREATED,
        headers,
        body: Bytes::from(body),
    }
}

/// 204 with no headers and an empty body.
pub fn empty_response() -> StoredResponse {
    StoredResponse {
        status: StatusCode::NO_CONTENT,
        headers: HeaderMap::new(),
        body: Bytes::new(),
    }
}

/// 422 with a problem+json body.
pub fn problem_response() -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    StoredResponse {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        headers,
        body: Bytes::from_static(br#"{"type":"about:blank","title":"Unprocessable","status":422}"#),
    }
}

/// A small 201 with a marker, to tell two completions apart.
pub fn marked_response(marker: &str) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-marker",
        HeaderValue::from_str(marker).expect("visible ASCII"),
    );
    StoredResponse {
        status: StatusCode::CREATED,
        headers,
        body: Bytes::from(marker.to_owned()),
    }
}

async fn begin<S: IdempotencyStore>(
    store: &S,
    key: &StoreKey,
    fingerprint: &Fingerprint,
    lease: Duration,
) -> Begin {
    store
        .begin(key, fingerprint, lease)
        .await
        .unwrap_or_else(|e| panic!("begin failed: {e}"))
}

/// Begins and expects [`Begin::Acquired`].
pub async fn acquire<S: IdempotencyStore>(
    store: &S,
    key: &StoreKey,
    fingerprint: &Fingerprint,
    lease: Duration,
) -> LeaseToken {
    match begin(store, key, fingerprint, lease).await {
        Begin::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// Begins and expects [`Begin::InFlight`]; returns the owner's fingerprint and lease remaining.
pub async fn expect_in_flight<S: IdempotencyStore>(
    store: &S,
    key: &StoreKey,
) -> (Fingerprint, Duration) {
    match begin(store, key, &random_fingerprint(), LONG).await {
        Begin::InFlight {
            fingerprint,
            lease_remaining,
        } => (fingerprint, lease_remaining),
        other => panic!("expected InFlight, got {other:?}"),
    }
}

/// Begins and expects [`Begin::Completed`]; returns the stored fingerprint and response.
pub async fn expect_completed<S: IdempotencyStore>(
    store: &S,
    key: &StoreKey,
) -> (Fingerprint, StoredResponse) {
    match begin(store, key, &random_fingerprint(), LONG).await {
        Begin::Completed {
            fingerprint,
            response,
        } => (fingerprint, response),
        other => panic!("expected Completed, got {other:?}"),
    }
}

async fn complete<S: IdempotencyStore>(
    store: &S,
    key: &StoreKey,
    token: LeaseToken,
    response: &StoredResponse,
    ttl: Duration,
) -> bool {
    store
        .complete(key, token, response, ttl)
        .await
        .unwrap_or_else(|e| panic!("complete failed: {e}"))
}

async fn renew<S: IdempotencyStore>(
    store: &S,
    key: &StoreKey,
    token: LeaseToken,
    lease: Duration,
) -> bool {
    store
        .renew(key, token, lease)
        .await
        .unwrap_or_else(|e| panic!("renew failed: {e}"))
}

async fn release<S: IdempotencyStore>(store: &S, key: &StoreKey, token: LeaseToken) -> bool {
    store
        .release(key, token)
        .await
        .unwrap_or_else(|e| panic!("release failed: {e}"))
}

/// Sleeps until `deadline` has surely passed on the store's clock.
async fn wait_out(deadline: Duration) {
    tokio::time::sleep(deadline + MARGIN).await;
}

fn assert_same_response(got: &StoredResponse, want: &StoredResponse) {
    assert_eq!(got.status, want.status, "status");
    assert_eq!(got.body, want.body, "body bytes");
    // Field by field, in order: repeated fields keep their order, values keep their bytes.
    let got_fields: Vec<(&str, &[u8])> = got
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    let want_fields: Vec<(&str, &[u8])> = want
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    assert_eq!(got_fields, want_fields, "header fields");
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------------------------
// Checks

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

/// Once completed, the token owns nothing: a second `complete`, a `renew` or a `release` with
/// it returns false and the stored response stays.
pub async fn complete_needs_a_live_lease<S: IdempotencyStore>(store: &S) {
    let key = random_key();
    let token = acquire(store, &key, &random_fingerprint(), LONG).await;
    let first = marked_response("first");
    assert!(complete(store, &key, token, &first, LONG).await);
    assert!(
        !complete(store, &key, token, &marked_response("second"), LONG).await,
        "a second complete with the same token is refused"
    );
    assert!(
        !renew(store, &key, token, LONG).await,
        "renew after complete"
    );
    assert!(!release(store, &key, token).await, "release after complete");
    let (_, stored) = expect_completed(store, &key).await;
    assert_same_response(&stored, &first);
}

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
