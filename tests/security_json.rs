//! The security properties of `SECURITY.md` for JSON bodies (its sections 5 and 8): a deeply
//! nested body neither overflows the stack nor breaks replay, and the long integer that the
//! `canonical_json` fuzz target found canonicalizes to a fixed point.

mod support;

use axum::{Router, routing::post};
use http::StatusCode;
use support::{Calls, request, send};
use tower_idempotency::IdempotencyLayer;

// ---------------------------------------------------------------------------------------------
// Exhaustion: deep nesting

/// A megabyte of nested arrays (far past the JSON parser's depth limit of 128) and a nesting
/// of 100: neither overflows the stack; the first is hashed raw, so its retry is still
/// recognised, and the second canonically, so other whitespace is the same request.
#[tokio::test]
async fn deeply_nested_json_neither_overflows_nor_breaks_replay() {
    let calls = Calls::default();
    let counter = calls.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move || async move {
                counter.hit();
                StatusCode::CREATED
            }),
        )
        .layer(IdempotencyLayer::new().post("/calls"));
    let deep = "[".repeat(500_000) + &"]".repeat(500_000);
    let fine = "[".repeat(100) + "1" + &"]".repeat(100);
    for (key, body) in [("deep", &deep), ("fine", &fine)] {
        send(&app, request("/calls", Some(key), body)).await;
        let again = send(&app, request("/calls", Some(key), body)).await;
        assert!(again.replayed(), "{key}");
    }
    let spaced = "[ ".repeat(100) + "1" + &" ]".repeat(100);
    let again = send(&app, request("/calls", Some("fine"), &spaced)).await;
    assert!(again.replayed());
    assert_eq!(calls.get(), 2);
}

/// Found by the `canonical_json` fuzz target: canonical JSON was not a fixed point. A long
/// integer (past `u64`) is read as an `f64`, and `serde_json`'s default float parsing is not
/// correctly rounded: `9999667799976999199999` was read as one `f64`, written as
/// `9.999667799976999e21`, and that text read back as another. So a retry whose encoder wrote
/// the number the other way was not the same request, and ran again. With correctly rounded
/// parsing (`serde_json`'s `float_roundtrip`), every number's canonical text reads back as the
/// same number.
#[test]
fn fuzz_canonical_json_a_long_integer_canonicalizes_to_a_fixed_point() {
    use tower_idempotency::fingerprint::{body_digest, canonical_json};

    let input = b"9999667799976999199999";
    let canonical = canonical_json(input).unwrap();
    assert_eq!(canonical_json(&canonical).as_deref(), Some(&canonical[..]));
    // The canonical text is the double nearest the input, another number: a body holding a
    // number that no double holds exactly is hashed as sent, not as its canonical form.
    assert_ne!(body_digest(input, true), body_digest(&canonical, true));
    assert_eq!(body_digest(input, false), body_digest(input, true));
    for text in [
        "0.1",
        "1e23",
        "8.98846567431158e307",
        "2.2250738585072014e-308",
        "123456789012345678901234567890",
    ] {
        let canonical = canonical_json(text.as_bytes()).unwrap();
        assert_eq!(
            canonical_json(&canonical).as_deref(),
            Some(&canonical[..]),
            "{text}"
        );
    }
}
