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
    if json {
        let mut hasher = Sha256::new();
        if with_lossless_canonical(body, |piece| hasher.update(piece)) {
            return (BodyKind::Json, hasher.finalize().into());
        }
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
mod tests;
