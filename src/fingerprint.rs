//! Fingerprints and store keys: what makes two requests "the same request".
//!
//! Both are SHA-256 digests over **length-prefixed, tagged fields** behind a version tag:
//! every field is written as a one-byte tag, its length as a big-endian `u64`, then its bytes.
//! So `scope = "ab", path = "/c"` can never collide with `scope = "a", path = "b/c"`, and a
//! change of the layout changes the version tag rather than silently matching old records.
//!
//! | digest | fields | used as |
//! |---|---|---|
//! | [`store_key`] | scope, method, path, idempotency key | the record key in [`KeyReuse::Reject`](crate::KeyReuse::Reject) mode |
//! | [`fingerprint`] | the above, plus query, body kind and body digest | the request's identity; also the record key in [`KeyReuse::NewRequest`](crate::KeyReuse::NewRequest) mode |
//!
//! **Bodies.** A body whose `Content-Type` is `application/json` or any `*/*+json` type is
//! canonicalized first ([`canonical_json`]): object keys sorted by their UTF-8 bytes,
//! insignificant whitespace dropped, strings re-escaped in one canonical way, numbers written
//! as parsed, array order kept. So `{"b":1, "a":2}` and `{"a":2,"b":1}` are the same request.
//! A JSON body that does not parse (or nests 128 levels deep or more, the parser's recursion
//! limit) is hashed raw, as is every other body; so is a JSON body whose canonical form would
//! drop something a handler can read: a key repeated within one object, or a number that a
//! double cannot hold exactly (an integer past 2^64, a decimal with more than 17 significant
//! digits, one that underflows). The body kind (JSON or raw) is a field of its own, so a raw
//! body can never match a canonical one.
//!
//! **A retry's body.** The layer remembers the body digests of recent requests with a JSON body
//! of up to 8 KiB (1,024 of them; the copies take 8 MiB at most), each under its request's
//! [`store_key`] beside a copy of the body. A request under the same key with exactly the same
//! bytes takes its digest from there instead of canonicalizing its body again. No fingerprint
//! changes by it: the digest is a function of the bytes alone.

use std::sync::{LazyLock, Mutex};

use http::{HeaderMap, Method, header};
use sha2::{Digest, Sha256};

pub use crate::canonical_json::canonical_json;
use crate::{
    canonical_json::with_lossless_canonical,
    key::IdempotencyKey,
    scope::Scope,
    store::{Fingerprint, StoreKey},
};

const STORE_KEY_VERSION: &[u8] = b"tower-idempotency/store-key/v1";
const FINGERPRINT_VERSION: &[u8] = b"tower-idempotency/fingerprint/v1";

/// The parts of a request that decide which record it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct RequestIdentity<'a> {
    /// The caller.
    pub scope: &'a Scope,
    /// The request method.
    pub method: &'a Method,
    /// The request path as the client sent it (not the route template; the layer takes it from
    /// axum's `OriginalUri` when a nested router has stripped a prefix from the URI).
    pub path: &'a str,
    /// The idempotency key.
    pub key: &'a IdempotencyKey,
}

/// How a body was hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// Canonical JSON.
    Json,
    /// The bytes as sent.
    Raw,
}

struct Fields(Sha256);

impl Fields {
    fn new(version: &[u8]) -> Self {
        let mut fields = Fields(Sha256::new());
        fields.push(0, version);
        fields
    }

    fn push(&mut self, tag: u8, bytes: &[u8]) {
        self.0.update([tag]);
        self.0.update((bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
    }

    fn identity(mut self, id: &RequestIdentity<'_>) -> Self {
        self.push(1, id.scope.as_bytes());
        self.push(2, id.method.as_str().as_bytes());
        self.push(3, id.path.as_bytes());
        self.push(4, id.key.as_str().as_bytes());
        self
    }

    fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

/// The record key for a request's scope, method, path and idempotency key (body excluded).
pub fn store_key(id: &RequestIdentity<'_>) -> StoreKey {
    StoreKey(Fields::new(STORE_KEY_VERSION).identity(id).finish())
}

/// The fingerprint of a whole request: its identity, query string (`None` and `""` differ) and
/// body, canonicalized when `kind` is [`BodyKind::Json`] (see [`body_digest`]).
pub fn fingerprint(
    id: &RequestIdentity<'_>,
    query: Option<&str>,
    body_kind: BodyKind,
    body_digest: &[u8; 32],
) -> Fingerprint {
    let mut fields = Fields::new(FINGERPRINT_VERSION).identity(id);
    match query {
        Some(query) => fields.push(5, query.as_bytes()),
        None => fields.push(6, b""),
    }
    fields.push(
        7,
        match body_kind {
            BodyKind::Json => b"json",
            BodyKind::Raw => b"raw",
        },
    );
    fields.push(8, body_digest);
    Fingerprint(fields.finish())
}

/// The SHA-256 digest of a body and how it was taken: canonical JSON when `json` is true, the
/// body parses and its canonical form keeps all it says (no key twice in one object, every
/// number exact as a double; see the [module docs](self)), the raw bytes otherwise.
pub fn body_digest(body: &[u8], json: bool) -> (BodyKind, [u8; 32]) {
    if json
        && let Some(digest) =
            with_lossless_canonical(body, |canonical| Sha256::digest(canonical).into())
    {
        return (BodyKind::Json, digest);
    }
    (BodyKind::Raw, Sha256::digest(body).into())
}

/// [`body_digest`], remembered for JSON bodies of up to [`MEMO_MAX_BODY`] bytes: a retry
/// usually repeats its body byte for byte, and then skips canonicalization and hashing.
///
/// The memory is keyed by `key`, the request's [`store_key`] (scope, method, path and
/// idempotency key: small fields, so a first request, which misses, hashes nothing of its body
/// to look), and a hit needs the body to equal, byte for byte, the copy kept beside the key.
/// The digest is a function of the body's bytes alone, so a hit is always right; the scope in
/// the key keeps one caller from learning (by timing) what bodies another caller sent. A larger
/// body is not remembered: most requests are first requests, and a key over the whole body
/// (SHA-256 of it, as before) would cost each of them about a third of what it saves a retry.
pub(crate) fn body_digest_remembered(
    key: &StoreKey,
    body: &[u8],
    json: bool,
) -> (BodyKind, [u8; 32]) {
    if !json {
        return body_digest(body, false);
    }
    CANONICAL_DIGESTS.body_digest(key, body)
}

/// Slots of [`CANONICAL_DIGESTS`]: 1,024, each about 100 bytes (about 100 KiB, allocated on
/// first use) plus the copy of its body.
const MEMO_SLOTS: usize = 1024;

/// The largest body [`CANONICAL_DIGESTS`] keeps a copy of, in bytes: 8 KiB. A slot's copy never
/// takes more than this, so the copies take at most `MEMO_SLOTS` × 8 KiB = 8 MiB in all (1 MiB
/// when the bodies are 1 KiB).
const MEMO_MAX_BODY: usize = 8 * 1024;

/// Digests of recent JSON bodies, by request ([`body_digest_remembered`]); shared by every
/// layer in the process.
static CANONICAL_DIGESTS: LazyLock<DigestMemo> = LazyLock::new(DigestMemo::new);

/// A fixed table of [`MEMO_SLOTS`] slots, each holding a request's key, a copy of its body and
/// the body's digest, and chosen by the key's first bytes; a newer key takes the slot of an
/// older one.
struct DigestMemo {
    slots: Box<[Mutex<Option<MemoEntry>>]>,
}

/// What a slot remembers: [`body_digest`]`(body, true)` for a request.
struct MemoEntry {
    key: StoreKey,
    /// At most [`MEMO_MAX_BODY`] bytes, and so is its capacity.
    body: Vec<u8>,
    kind: BodyKind,
    digest: [u8; 32],
}

impl DigestMemo {
    fn new() -> Self {
        Self {
            slots: (0..MEMO_SLOTS).map(|_| Mutex::new(None)).collect(),
        }
    }

    fn slot(&self, key: &StoreKey) -> std::sync::MutexGuard<'_, Option<MemoEntry>> {
        let index = usize::from(u16::from_le_bytes([key.0[0], key.0[1]])) % MEMO_SLOTS;
        // Nothing panics while a slot is locked (`put` copies into room the slot has, or makes
        // its copy whole first), so a poisoned lock still guards a whole entry.
        self.slots[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`body_digest`]`(body, true)`, from the slot when it holds `key` and exactly `body`.
    fn body_digest(&self, key: &StoreKey, body: &[u8]) -> (BodyKind, [u8; 32]) {
        if let Some(remembered) = self.get(key, body) {
            return remembered;
        }
        let (kind, digest) = body_digest(body, true);
        self.put(key, body, kind, digest);
        (kind, digest)
    }

    fn get(&self, key: &StoreKey, body: &[u8]) -> Option<(BodyKind, [u8; 32])> {
        let slot = self.slot(key);
        let entry = slot.as_ref()?;
        (entry.key == *key && entry.body == body).then_some((entry.kind, entry.digest))
    }

    /// Keeps `key`, a copy of `body` and its digest in the key's slot; a body over
    /// [`MEMO_MAX_BODY`] bytes is not kept.
    fn put(&self, key: &StoreKey, body: &[u8], kind: BodyKind, digest: [u8; 32]) {
        if body.len() > MEMO_MAX_BODY {
            return;
        }
        let mut slot = self.slot(key);
        match &mut *slot {
            // The slot's buffer is reused when it is large enough; else replaced by one of the
            // body's size, so no buffer grows past `MEMO_MAX_BODY`.
            Some(entry) if entry.body.capacity() >= body.len() => {
                entry.body.clear();
                entry.body.extend_from_slice(body);
                entry.key = *key;
                entry.kind = kind;
                entry.digest = digest;
            }
            _ => {
                *slot = Some(MemoEntry {
                    key: *key,
                    body: body.to_vec(),
                    kind,
                    digest,
                });
            }
        }
    }
}

/// Whether `headers` declare a JSON body: `Content-Type` `application/json` or a `+json`
/// structured suffix (RFC 6839), parameters and case ignored.
pub fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((_, subtype)) = essence.split_once('/') else {
        return false;
    };
    subtype.eq_ignore_ascii_case("json")
        || (subtype.len() > 5
            && subtype.is_char_boundary(subtype.len() - 5)
            && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json"))
}

#[cfg(test)]
mod tests {
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
        let expected = |body: &[u8]| match canonicalize(body) {
            Some((canonical, true)) => (BodyKind::Json, Sha256::digest(&canonical).into()),
            _ => (BodyKind::Raw, Sha256::digest(body).into()),
        };
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

    /// The memory gives back the digest put under a key, nothing for a key it does not hold,
    /// and a newer key of the same slot takes the place of the older one.
    #[test]
    fn the_memory_gives_back_a_digest_by_its_key() {
        let memo = DigestMemo::new();
        let key = [7; 32];
        assert_eq!(memo.get(&key), None);
        memo.put(key, [1; 32]);
        assert_eq!(memo.get(&key), Some([1; 32]));
        let mut newer = key;
        newer[31] = 8;
        assert_eq!(memo.get(&newer), None);
        memo.put(newer, [2; 32]);
        assert_eq!(memo.get(&newer), Some([2; 32]));
        assert_eq!(memo.get(&key), None);
    }

    /// Keys whose first bytes differ go to slots of their own: the memory holds one key per
    /// slot, all at once.
    #[test]
    fn the_memory_holds_a_key_in_each_slot() {
        let memo = DigestMemo::new();
        let key = |i: usize| {
            let mut key = [0xa5; 32];
            key[..2].copy_from_slice(&u16::try_from(i).unwrap().to_le_bytes());
            key
        };
        let digest = |i: usize| [u8::try_from(i % 251).unwrap(); 32];
        for i in 0..MEMO_SLOTS {
            memo.put(key(i), digest(i));
        }
        for i in 0..MEMO_SLOTS {
            assert_eq!(memo.get(&key(i)), Some(digest(i)), "slot {i}");
        }
    }
}
