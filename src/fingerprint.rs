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
//! A JSON body that does not parse (or nests deeper than 128 levels, the parser's recursion
//! limit) is hashed raw, as is every other body. The body kind (JSON or raw) is a field of its
//! own, so a raw body can never match a canonical one.

use http::{HeaderMap, Method, header};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{
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
    /// The request path (the URI path, not the route template).
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

/// The SHA-256 digest of a body and how it was taken: canonical JSON when `json` is true and the
/// body parses, the raw bytes otherwise.
pub fn body_digest(body: &[u8], json: bool) -> (BodyKind, [u8; 32]) {
    if json {
        if let Some(canonical) = canonical_json(body) {
            return (BodyKind::Json, Sha256::digest(&canonical).into());
        }
    }
    (BodyKind::Raw, Sha256::digest(body).into())
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

/// The canonical form of a JSON text, or `None` if it is not JSON (or nests deeper than 128).
///
/// Object keys sorted by their UTF-8 bytes (for duplicate keys, the last one wins, as
/// `serde_json` parses), no whitespace, strings escaped as `serde_json` writes them, numbers as
/// parsed, arrays in order.
pub fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let mut out = Vec::with_capacity(body.len());
    write_canonical(&value, &mut out);
    Some(out)
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(key, out);
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar<T: serde::Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // Writing a string, number, bool or null into a Vec cannot fail.
    serde_json::to_writer(out, value).expect("serializing a JSON scalar into memory");
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
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let a = canonical_json(br#"{ "b": [1, 2, {"d": 1, "c": "x"}], "a": "\u0041" }"#).unwrap();
        assert_eq!(a, br#"{"a":"A","b":[1,2,{"c":"x","d":1}]}"#);
        assert_ne!(
            canonical_json(b"[1,2]").unwrap(),
            canonical_json(b"[2,1]").unwrap()
        );
        assert!(canonical_json(b"{not json").is_none());
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
        ] {
            headers.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(is_json(&headers), json, "{ct}");
        }
    }
}
