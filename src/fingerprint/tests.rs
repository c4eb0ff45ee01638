use super::*;
use crate::canonical_json::canonicalize;

fn id<'a>(scope: &'a Scope, path: &'a str, key: &'a IdempotencyKey) -> RequestIdentity<'a> {
    RequestIdentity {
        scope,
        method: &Method::POST,
        path,
        key,
    }
}

#[test]
fn remembered_digests_are_the_digests() {
    let alice = Scope::new("alice");
    let bob = Scope::new("bob");
    // More requests than the memory has slots, twice over: misses, hits and evictions.
    let requests: Vec<(IdempotencyKey, Vec<u8>)> = (0..2 * MEMO_SLOTS)
        .map(|i| format!(r#"{{"n": {i}, "a": [true]}}"#).into_bytes())
        .chain([b"{not json".to_vec(), b"plain text".to_vec()])
        .enumerate()
        .map(|(i, body)| {
            (
                IdempotencyKey::parse(format!("k{i}").as_bytes()).unwrap(),
                body,
            )
        })
        .collect();
    for _ in 0..2 {
        for (key, body) in &requests {
            for scope in [&alice, &bob] {
                let key = store_key(&id(scope, "/calls", key));
                for json in [true, false] {
                    assert_eq!(
                        body_digest_remembered(&key, body, json),
                        body_digest(body, json)
                    );
                }
            }
        }
    }
}

/// A digest no body has, to tell a digest served from the memory from one computed.
const PLANTED: (BodyKind, [u8; 32]) = (BodyKind::Json, [7; 32]);

fn planted(memo: &DigestMemo, key: &StoreKey, body: &[u8]) {
    memo.put(key, body, PLANTED.0, PLANTED.1);
}

#[test]
fn a_remembered_digest_needs_the_same_request_and_the_same_bytes() {
    let memo = DigestMemo::new();
    let k = IdempotencyKey::parse(b"k").unwrap();
    let (alice, bob) = (Scope::new("alice"), Scope::new("bob"));
    let request = store_key(&id(&alice, "/calls", &k));
    let body = br#"{"b":1,"a":2}"#;
    planted(&memo, &request, body);

    assert_eq!(memo.body_digest(&request, body), PLANTED);
    // The same bytes from another caller, or to another path, or under another key of the
    // same slot: computed.
    let mut same_slot = request;
    same_slot.0[31] ^= 1;
    for other in [
        store_key(&id(&bob, "/calls", &k)),
        store_key(&id(&alice, "/agents", &k)),
        same_slot,
    ] {
        assert_eq!(memo.body_digest(&other, body), body_digest(body, true));
    }
    // The same request with one byte changed: computed, and then remembered in its place.
    planted(&memo, &request, body);
    let changed = br#"{"b":1,"a":3}"#;
    assert_eq!(
        memo.body_digest(&request, changed),
        body_digest(changed, true)
    );
    assert_ne!(body_digest(changed, true), body_digest(body, true));
    assert_eq!(memo.body_digest(&request, body), body_digest(body, true));
}

/// A JSON text of exactly `len` bytes.
fn json_of_len(len: usize) -> Vec<u8> {
    format!(r#"{{"a":"{}"}}"#, "x".repeat(len - 8)).into_bytes()
}

#[test]
fn bodies_up_to_the_bound_are_kept_and_larger_ones_are_not() {
    let memo = DigestMemo::new();
    let request = StoreKey([1; 32]);
    let at_bound = json_of_len(MEMO_MAX_BODY);
    assert_eq!(at_bound.len(), MEMO_MAX_BODY);
    planted(&memo, &request, &at_bound);
    assert_eq!(memo.body_digest(&request, &at_bound), PLANTED);

    let over = json_of_len(MEMO_MAX_BODY + 1);
    planted(&memo, &request, &over);
    assert_eq!(memo.body_digest(&request, &over), body_digest(&over, true));
    // The body over the bound did not take the slot either.
    assert_eq!(memo.body_digest(&request, &at_bound), PLANTED);
}

#[test]
fn a_newer_request_takes_the_slot_of_an_older_one() {
    let memo = DigestMemo::new();
    // The same first two bytes, so the same slot; and a key of another slot.
    let older = StoreKey([1; 32]);
    let mut newer = StoreKey([1; 32]);
    newer.0[31] = 2;
    let elsewhere = StoreKey([2; 32]);
    let body = br#"{"a":1}"#;
    planted(&memo, &older, body);
    planted(&memo, &elsewhere, body);
    planted(&memo, &newer, body);

    assert_eq!(memo.body_digest(&newer, body), PLANTED);
    assert_eq!(memo.body_digest(&elsewhere, body), PLANTED);
    assert_eq!(memo.body_digest(&older, body), body_digest(body, true));
}

#[test]
fn no_slot_keeps_more_room_than_the_bound() {
    let memo = DigestMemo::new();
    let request = StoreKey([1; 32]);
    // A growing buffer would double past the bound here; a shorter body reuses the room.
    for len in [5_000, MEMO_MAX_BODY, 100] {
        let body = json_of_len(len);
        assert_eq!(memo.body_digest(&request, &body), body_digest(&body, true));
        let slot = memo.slot(&request);
        let entry = slot.as_ref().unwrap();
        assert_eq!(entry.body, body);
        assert!(entry.body.capacity() <= MEMO_MAX_BODY);
    }
}

#[test]
fn a_slot_keeps_its_room_for_a_body_that_fits() {
    let memo = DigestMemo::new();
    let request = StoreKey([1; 32]);
    let room = |memo: &DigestMemo| {
        let slot = memo.slot(&request);
        let entry = slot.as_ref().unwrap();
        (entry.body.as_ptr(), entry.body.capacity())
    };
    memo.body_digest(&request, &json_of_len(5_000));
    let before = room(&memo);
    let shorter = json_of_len(100);
    assert_eq!(
        memo.body_digest(&request, &shorter),
        body_digest(&shorter, true)
    );
    assert_eq!(room(&memo), before);
}

/// What [`body_digest`]`(body, true)` must be: SHA-256 of the whole canonical form when it is
/// lossless, of the bytes as sent otherwise.
fn expected(body: &[u8]) -> (BodyKind, [u8; 32]) {
    match canonicalize(body) {
        Some((canonical, true)) => (BodyKind::Json, Sha256::digest(&canonical).into()),
        _ => (BodyKind::Raw, Sha256::digest(body).into()),
    }
}

/// `value` as JSON text with every object's members in reverse key order, so that every
/// object with two members or more is out of order; with `repeat`, the outermost object's
/// first member is written twice.
fn reversed(value: &serde_json::Value, repeat: bool, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                reversed(item, false, out);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            out.push(b'{');
            let mut members: Vec<_> = members.iter().rev().collect();
            if repeat && let Some(&first) = members.first() {
                members.insert(0, first);
            }
            for (i, (key, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).unwrap();
                out.push(b':');
                reversed(value, false, out);
            }
            out.push(b'}');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).unwrap(),
    }
}

/// An object whose keys are hard to order: they share prefixes of up to 8 bytes and more (the
/// part compared first), end in NUL (the padding of a short prefix) or in bytes past ASCII, or
/// are prefixes of each other; with up to 24 members, past the 16 that are sorted by insertion.
fn hard_to_order() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    prop::collection::vec(
        ("(abcdefgh|abcdefg|abc)?[a\u{0}\u{e9}]{0,3}", any::<u8>()),
        0..24,
    )
    .prop_map(|members| {
        serde_json::Value::Object(
            members
                .into_iter()
                .map(|(key, value)| (key, serde_json::Value::from(value)))
                .collect(),
        )
    })
}

proptest::proptest! {
    /// Keys that are hard to order, in an outermost object (hashed a member at a time) and in a
    /// nested one (rewritten in place): the same canonical form as the reference, and the
    /// digest of it; a repeated key makes the body raw.
    #[test]
    fn keys_that_are_hard_to_order_are_sorted_as_the_reference_sorts_them(
        object in hard_to_order(),
        nested: bool,
        repeat: bool,
    ) {
        let value = if nested {
            serde_json::Value::Array(vec![object])
        } else {
            object
        };
        let mut body = Vec::new();
        reversed(&value, repeat, &mut body);
        if nested && repeat {
            // `reversed` repeats a member of the outermost object only; repeat one inside.
            if let Some(first) = body.iter().position(|&b| b == b',') {
                let member = body[2..first].to_vec();
                body.splice(2..2, member.into_iter().chain([b',']));
            }
        }
        proptest::prop_assert_eq!(
            canonical_json(&body),
            crate::canonical_json::tests::reference(&body)
        );
        proptest::prop_assert_eq!(body_digest(&body, true), expected(&body));
    }

    /// The digest is that of the whole canonical form, whether the outermost object came in
    /// key order or not (out of order, it is hashed a member at a time), and the bytes as sent
    /// when a key is repeated.
    #[test]
    fn a_json_digest_is_the_digest_of_the_canonical_form(
        value in crate::canonical_json::tests::json_value(),
        repeat: bool,
    ) {
        let mut body = Vec::new();
        reversed(&value, repeat, &mut body);
        proptest::prop_assert_eq!(body_digest(&body, true), expected(&body));
    }
}

#[test]
fn a_json_digest_does_not_depend_on_the_bodies_digested_before_it() {
    let wide = format!(
        "{{{}}}",
        (0..5000)
            .rev()
            .map(|i| format!(r#""k{i:05}":[{i},{{"z":"\u00e9","a":null}}]"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let bodies: [&[u8]; 10] = [
        br#"{"b":{"d":1,"c":[2,{"f":"\n","e":3}]},"a":"\u0041"}"#,
        br#"{"b":{"d":1,"c":[2,{"f":"\n""#,
        br#"{"b":1,"a":2} x"#,
        br#"{"b":1,"a":2}}"#,
        wide.as_bytes(),
        br#"{"a":1,"a":2}"#,
        br#"[{"y":1,"x":2}, 1.5e3, "s"]"#,
        b"not json",
        br#"{"z":[{"b":1,"a":2}],"y":{"d":{},"c":[]}}"#,
        b"{}",
    ];
    // Each body after each other one (and after itself), on one thread.
    for first in bodies {
        for second in bodies {
            body_digest(first, true);
            assert_eq!(body_digest(second, true), expected(second));
        }
    }
}

#[test]
fn deep_nesting_is_bounded() {
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    assert!(canonical_json(deep.as_bytes()).is_none());
    let (kind, _) = body_digest(deep.as_bytes(), true);
    assert_eq!(kind, BodyKind::Raw);
}

#[test]
fn field_boundaries_are_unambiguous() {
    let key = IdempotencyKey::parse(b"k").unwrap();
    let ab = Scope::new("ab");
    let a = Scope::new("a");
    assert_ne!(
        store_key(&id(&ab, "/c", &key)),
        store_key(&id(&a, "b/c", &key))
    );
}

#[test]
fn json_content_types() {
    let mut headers = HeaderMap::new();
    for (ct, json) in [
        ("application/json", true),
        ("application/json; charset=utf-8", true),
        ("APPLICATION/JSON", true),
        ("application/problem+json", true),
        ("text/plain", false),
        ("application/jsonx", false),
        ("json", false),
        ("application/octet-stream", false),
        ("application/vnd.api+json", true),
        ("application/x+json", true),
        // The suffix needs a name before it; shorter subtypes are not JSON either.
        ("application/+json", false),
        ("application/json+", false),
        ("text/csv", false),
        ("a/b", false),
        ("a/", false),
    ] {
        headers.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        assert_eq!(is_json(&headers), json, "{ct}");
    }
}
