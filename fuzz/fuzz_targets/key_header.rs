//! Key header parsing: `IdempotencyKey::parse` on any bytes, and `from_headers` with any number
//! of fields. Never panics; an accepted key is 1 to 255 visible ASCII characters; a plain value
//! is its own key; a structured-field string is the key of its content; one field parses as
//! the value alone, two or more are `Repeated`.
#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tower_idempotency::{IdempotencyKey, KeyError, MAX_KEY_LEN};

#[derive(Arbitrary, Debug)]
struct Input {
    value: Vec<u8>,
    fields: Vec<Vec<u8>>,
}

fn check_accepted(key: &IdempotencyKey) {
    let text = key.as_str();
    assert!(!text.is_empty() && text.len() <= MAX_KEY_LEN, "{text:?}");
    assert!(text.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{text:?}");
}

/// The structured-field string form of a key: `"` + content with `"` and `\` escaped + `"`.
fn sf_string(key: &str) -> Vec<u8> {
    let mut out = vec![b'"'];
    for b in key.bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

fuzz_target!(|input: Input| {
    let raw = &input.value;
    let parsed = IdempotencyKey::parse(raw);
    if let Ok(key) = &parsed {
        check_accepted(key);
        // Wrapping any accepted key as a structured-field string gives the same key back.
        assert_eq!(
            IdempotencyKey::parse(&sf_string(key.as_str())).as_ref(),
            Ok(key)
        );
    }
    let plain = raw.first() != Some(&b'"');
    let visible = raw.iter().all(|b| (0x21..=0x7e).contains(b));
    if plain && visible && !raw.is_empty() && raw.len() <= MAX_KEY_LEN {
        assert_eq!(parsed.as_ref().map(|k| k.as_str().as_bytes()), Ok(&raw[..]));
    }
    if plain && !raw.is_empty() && !visible {
        assert!(parsed.is_err(), "{raw:?} accepted");
    }

    // Any number of header fields (values the http crate accepts).
    let name = HeaderName::from_static("x-idempotency-key");
    let mut headers = HeaderMap::new();
    let mut values = Vec::new();
    for field in input.fields.iter().take(64) {
        if let Ok(value) = HeaderValue::from_bytes(field) {
            headers.append(&name, value.clone());
            values.push(value);
        }
    }
    let from_headers = IdempotencyKey::from_headers(&headers, &name);
    match values.as_slice() {
        [] => assert_eq!(from_headers, Ok(None)),
        [one] => assert_eq!(
            from_headers,
            IdempotencyKey::parse(one.as_bytes()).map(Some)
        ),
        _ => assert_eq!(from_headers, Err(KeyError::Repeated)),
    }
});
