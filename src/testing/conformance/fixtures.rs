//! What the checks share: durations, fresh keys and fingerprints, sample responses, and store
//! calls that panic with the call's name when the store fails.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::{
    StoredResponse,
    store::{Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreKey},
};

/// A lease that does not run out during a check.
pub const LONG: Duration = Duration::from_secs(30);
/// A lease or TTL that a check waits out.
pub const SHORT: Duration = Duration::from_millis(300);
/// How long past a [`SHORT`] deadline a check waits before it expects the deadline to have
/// passed on the store's clock.
pub const MARGIN: Duration = Duration::from_millis(200);

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

pub(super) async fn begin<S: IdempotencyStore>(
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

pub(super) async fn complete<S: IdempotencyStore>(
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

pub(super) async fn renew<S: IdempotencyStore>(
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

pub(super) async fn release<S: IdempotencyStore>(
    store: &S,
    key: &StoreKey,
    token: LeaseToken,
) -> bool {
    store
        .release(key, token)
        .await
        .unwrap_or_else(|e| panic!("release failed: {e}"))
}

/// Sleeps until `deadline` has surely passed on the store's clock.
pub(super) async fn wait_out(deadline: Duration) {
    tokio::time::sleep(deadline + MARGIN).await;
}

pub(super) fn assert_same_response(got: &StoredResponse, want: &StoredResponse) {
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
