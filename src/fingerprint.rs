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

use std::sync::{LazyLock, Mutex};

use http::{HeaderMap, Method, header};
use sha2::{Digest, Sha256};

pub use crate::canonical_json::canonical_json;
use crate::{
    canonical_json::canonicalize,
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
    if json && let Some((canonical, true)) = canonicalize(body) {
        return (BodyKind::Json, Sha256::digest(&canonical).into());
    }
    (BodyKind::Raw, Sha256::digest(body).into())
}

/// [`body_digest`], remembered for JSON bodies: a retry usually repeats its body byte for byte,
/// and then skips canonicalization. The memory is keyed by SHA-256 over the caller's scope and
/// the body as sent, so a caller never learns (by timing) what bodies another caller sent.
pub(crate) fn body_digest_remembered(
    scope: &Scope,
    body: &[u8],
    json: bool,
) -> (BodyKind, [u8; 32]) {
    if !json {
        return body_digest(body, false);
    }
    let mut sent = Fields::new(MEMO_VERSION);
    sent.push(1, scope.as_bytes());
    sent.push(9, body);
    let sent = sent.finish();
    if let Some(digest) = CANONICAL_DIGESTS.get(&sent) {
        return (BodyKind::Json, digest);
    }
    let (kind, digest) = body_digest(body, true);
    if kind == BodyKind::Json {
        CANONICAL_DIGESTS.put(sent, digest);
    }
    (kind, digest)
}

const MEMO_VERSION: &[u8] = b"tower-idempotency/json-memo/v1";

/// Slots of [`CANONICAL_DIGESTS`]: 4,096 of 72 bytes, about 290 KiB, allocated on first use.
const MEMO_SLOTS: usize = 4096;

/// Canonical digests of recent JSON bodies, by their [`body_digest_remembered`] key; shared by
/// every layer in the process.
static CANONICAL_DIGESTS: LazyLock<DigestMemo> = LazyLock::new(DigestMemo::new);

/// A fixed table of `(key, digest)` slots, each chosen by the key's first bytes; a newer key
/// takes the slot of an older one. An all-zero key marks an empty slot (SHA-256 never gives it
/// in practice).
struct DigestMemo {
    slots: Box<[Mutex<MemoSlot>]>,
}

/// A memory slot: a key and its canonical digest.
type MemoSlot = ([u8; 32], [u8; 32]);

impl DigestMemo {
    fn new() -> Self {
        Self {
            slots: (0..MEMO_SLOTS)
                .map(|_| Mutex::new(([0; 32], [0; 32])))
                .collect(),
        }
    }

    fn slot(&self, key: &[u8; 32]) -> std::sync::MutexGuard<'_, MemoSlot> {
        let index = usize::from(u16::from_le_bytes([key[0], key[1]])) % MEMO_SLOTS;
        // The slot holds plain bytes; a panic elsewhere cannot leave it half written.
        self.slots[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, key: &[u8; 32]) -> Option<[u8; 32]> {
        let slot = self.slot(key);
        (slot.0 == *key).then_some(slot.1)
    }

    fn put(&self, key: [u8; 32], digest: [u8; 32]) {
        *self.slot(&key) = (key, digest);
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
        // More bodies than the memory has slots, twice over: misses, hits and evictions.
        let bodies: Vec<Vec<u8>> = (0..2 * MEMO_SLOTS)
            .map(|i| format!(r#"{{"n": {i}, "a": [true]}}"#).into_bytes())
            .chain([b"{not json".to_vec(), b"plain text".to_vec()])
            .collect();
        for _ in 0..2 {
            for body in &bodies {
                for scope in [&alice, &bob] {
                    for json in [true, false] {
                        assert_eq!(
                            body_digest_remembered(scope, body, json),
                            body_digest(body, json)
                        );
                    }
                }
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
