//! JSON canonicalization: `canonical_json` and `body_digest` on any bytes, and on the same
//! bytes nested inside up to thousands of arrays and objects. Never panics or overflows the stack;
//! the canonical form is itself canonical and means the same JSON value as the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency::fingerprint::{BodyKind, body_digest, canonical_json};

fn check(body: &[u8]) {
    let canonical = canonical_json(body);
    let (kind, digest) = body_digest(body, true);
    let (raw_kind, raw_digest) = body_digest(body, false);
    assert_eq!(raw_kind, BodyKind::Raw);
    match canonical {
        // A body whose canonical form would drop a repeated key or round a number is hashed as
        // sent; its canonical form is still canonical.
        Some(canonical) if kind == BodyKind::Raw => {
            assert_eq!(digest, raw_digest);
            assert_eq!(canonical_json(&canonical).as_deref(), Some(&canonical[..]));
            assert_eq!(body_digest(&canonical, true).0, BodyKind::Json);
        }
        Some(canonical) => {
            // Canonical twice is canonical once.
            assert_eq!(canonical_json(&canonical).as_deref(), Some(&canonical[..]));
            let original: serde_json::Value = serde_json::from_slice(body).unwrap();
            let again: serde_json::Value = serde_json::from_slice(&canonical).unwrap();
            assert_eq!(original, again);
            assert_eq!(body_digest(&canonical, true), (kind, digest));
        }
        None => {
            assert_eq!(kind, BodyKind::Raw);
            assert_eq!(digest, raw_digest);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // Deep nesting: the first two bytes pick a depth up to 4,095 (the parser stops at 128) and
    // the third the kind of wrapper.
    if let [a, b, kind, rest @ ..] = data {
        let depth = usize::from(u16::from_be_bytes([*a, *b]) % 4096);
        let (open, close): (&[u8], &[u8]) = match kind % 3 {
            0 => (b"[", b"]"),
            1 => (br#"{"k":"#, b"}"),
            _ => (br#"[{"a":1},"#, b"]"),
        };
        let mut nested = Vec::with_capacity(depth * (open.len() + close.len()) + rest.len());
        for _ in 0..depth {
            nested.extend_from_slice(open);
        }
        nested.extend_from_slice(rest);
        for _ in 0..depth {
            nested.extend_from_slice(close);
        }
        check(&nested);
    }
});
