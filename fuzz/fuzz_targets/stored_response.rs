//! `StoredResponse::decode` on any bytes (a store's record may be corrupt, or written by
//! something else): never panics; a decoded record re-encodes to bytes that decode to it again,
//! and its replay carries the replay marker once, a `Content-Length` that matches the body (none
//! for 1xx, 204 and 304), and none of the headers that are never replayed, whatever the record
//! holds.
#![no_main]

use bytes::Bytes;
use http::{Response, header};
use libfuzzer_sys::fuzz_target;
use tower_idempotency::{REPLAYED_HEADER, StoredResponse};

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = StoredResponse::decode(data) else {
        return;
    };
    let again = StoredResponse::decode(&decoded.encode()).expect("re-encoded record decodes");
    assert_eq!(again, decoded);
    let replay: Response<Bytes> = decoded.to_replay();
    assert_eq!(replay.headers().get_all(REPLAYED_HEADER).iter().count(), 1);
    let lengths: Vec<_> = replay
        .headers()
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .collect();
    let status = decoded.status;
    if status.is_informational() || status.as_u16() == 204 || status.as_u16() == 304 {
        assert!(lengths.is_empty(), "{lengths:?}");
    } else {
        assert_eq!(lengths, [decoded.body.len().to_string().as_str()]);
    }
    for never in [
        "set-cookie",
        "date",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(replay.headers().get(never).is_none(), "replayed {never}");
    }
    assert_eq!(replay.body(), &decoded.body);
});
