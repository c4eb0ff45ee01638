//! The security properties of `SECURITY.md` for replays (its section 6, header injection
//! through replay): a replay never carries `Set-Cookie`, nor any other header that is never
//! replayed, whatever a stored record holds (a record written by another program or by hand,
//! and the input the `stored_response` fuzz target found); a record whose header value holds a
//! line break or NUL, or whose header name is not a token, is corrupt and never replayed.

mod support;

use std::{sync::Mutex, time::Duration};

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use support::{Calls, request, send};
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, StoredResponse,
    store::{Begin, Fingerprint, LeaseToken, StoreError, StoreErrorKind, StoreKey},
};

// ---------------------------------------------------------------------------------------------
// Replays never carry Set-Cookie, nor any other header that is never replayed

#[tokio::test]
async fn a_replay_never_carries_set_cookie() {
    let calls = Calls::default();
    let counter = calls.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move || async move {
                let run = counter.hit();
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header(header::SET_COOKIE, format!("session=run-{run}; HttpOnly"))
                    .header(header::SET_COOKIE, "csrf=abc")
                    .header(header::LOCATION, format!("/calls/{run}"))
                    .body(Body::empty())
                    .unwrap()
            }),
        )
        .layer(IdempotencyLayer::new().post("/calls"));
    let first = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(first.headers.get_all(header::SET_COOKIE).iter().count(), 2);
    let replay = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(calls.get(), 1);
    assert!(replay.headers.get(header::SET_COOKIE).is_none());
    assert_eq!(replay.header("location"), Some("/calls/1"));
}

/// A store that answers `begin` with a completed record it was given: a record written by
/// another program, an older version, or by hand.
struct ForeignRecord {
    response: StoredResponse,
    fingerprint: Mutex<Option<Fingerprint>>,
}

#[tower_idempotency::async_trait]
impl IdempotencyStore for ForeignRecord {
    async fn begin(
        &self,
        _: &StoreKey,
        fingerprint: &Fingerprint,
        _: Duration,
    ) -> Result<Begin, StoreError> {
        let fingerprint = *self.fingerprint.lock().unwrap().get_or_insert(*fingerprint);
        Ok(Begin::Completed {
            fingerprint,
            response: self.response.clone(),
        })
    }

    async fn renew(&self, _: &StoreKey, _: LeaseToken, _: Duration) -> Result<bool, StoreError> {
        Ok(false)
    }

    async fn complete(
        &self,
        _: &StoreKey,
        _: LeaseToken,
        _: &StoredResponse,
        _: Duration,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }

    async fn release(&self, _: &StoreKey, _: LeaseToken) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// Found by the `stored_response` fuzz target: `to_replay` sent every header a record held, so
/// a record holding `Set-Cookie`, `TE`, `Transfer-Encoding`, `Connection` or a stale
/// `Content-Length` (one this layer's capture did not write) was replayed with them. A replay
/// now leaves out every header that is never stored, whatever the record holds.
#[tokio::test]
async fn a_replay_of_a_record_holding_never_replayed_headers_leaves_them_out() {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("set-cookie", "session=someone-elses"),
        ("content-length", "999"),
        ("transfer-encoding", "chunked"),
        ("te", "trailers"),
        ("connection", "close"),
        ("keep-alive", "timeout=5"),
        ("upgrade", "websocket"),
        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("idempotent-replayed", "false"),
        ("location", "/calls/1"),
    ] {
        headers.append(name, HeaderValue::from_static(value));
    }
    let record = StoredResponse {
        status: StatusCode::CREATED,
        headers,
        body: Bytes::from_static(b"created"),
    };
    let app = Router::new()
        .route("/calls", post(|| async { StatusCode::IM_A_TEAPOT }))
        .layer(IdempotencyLayer::new().post("/calls").store(ForeignRecord {
            response: record,
            fingerprint: Mutex::new(None),
        }));
    let replay = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, "created");
    let mut names: Vec<&str> = replay.headers.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["content-length", "idempotent-replayed", "location"]);
    assert_eq!(replay.header("content-length"), Some("7"));
}

/// The fuzzer's input itself: a record of status 256 with one header, `tE` (an empty `TE`),
/// and an empty body.
#[test]
fn fuzz_stored_response_te_header_in_a_record_is_not_replayed() {
    let input: [u8; 26] = [
        0x54, 0x49, 0x52, 0x31, 0x01, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x02, 0x74, 0x45, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    let record = StoredResponse::decode(&input).unwrap();
    assert!(record.headers.contains_key(header::TE));
    let replay: Response<Bytes> = record.to_replay();
    assert!(replay.headers().get(header::TE).is_none());
    assert_eq!(replay.headers()[header::CONTENT_LENGTH], "0");
}

// ---------------------------------------------------------------------------------------------
// Header injection through a record

/// A stored record whose header value holds a line break or NUL, or whose header name is not a
/// token, is corrupt: it fails to decode, so it is never replayed (the layer answers 503).
#[test]
fn a_record_with_a_line_break_in_a_header_or_a_bad_header_name_is_corrupt() {
    let good = StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::from_iter([(header::LOCATION, HeaderValue::from_static("/a"))]),
        body: Bytes::new(),
    }
    .encode();
    assert!(StoredResponse::decode(&good).is_ok());
    // The layout: tag, status, count, name length, "location", value length, "/a", body length.
    let value_at = good.len() - 8 - 2;
    for bad in [&b"\r\nSet-Cookie: x=1"[..], b"\n", b"a\0"] {
        let mut bytes = good[..value_at - 4].to_vec();
        bytes.extend_from_slice(&(bad.len() as u32).to_be_bytes());
        bytes.extend_from_slice(bad);
        bytes.extend_from_slice(&good[value_at + 2..]);
        let error = StoredResponse::decode(&bytes).unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Corrupt, "{bad:?}");
    }
    let name_at = holds_at(&good, b"location");
    for bad in [b' ', b':', b'\n'] {
        let mut bytes = good.clone();
        bytes[name_at + 3] = bad;
        let error = StoredResponse::decode(&bytes).unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Corrupt, "{bad:?}");
    }
}

fn holds_at(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
        .unwrap()
}
