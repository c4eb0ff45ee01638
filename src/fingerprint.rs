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
//! limit) is hashed raw, as is every other body. The body kind (JSON or raw) is a field of its
//! own, so a raw body can never match a canonical one.

use std::{borrow::Cow, fmt, ops::Range};

use http::{HeaderMap, Method, header};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
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

/// The canonical form of a JSON text, or `None` if it is not JSON (or nests 128 levels deep or
/// more).
///
/// Object keys sorted by their UTF-8 bytes (for duplicate keys, the last one wins, as
/// `serde_json` parses), no whitespace, strings escaped as `serde_json` writes them, numbers as
/// parsed, arrays in order.
///
/// Written in one pass over the text as `serde_json` parses it, without building a
/// `serde_json::Value`: each object's members are written as they come, then put in key order.
pub fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len());
    let mut de = serde_json::Deserializer::from_slice(body);
    Canonical { out: &mut out }.deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(out)
}

/// Writes the canonical form of the value being deserialized onto the end of `out`.
struct Canonical<'a> {
    out: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for Canonical<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Canonical<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        write_scalar(&v, self.out);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        write_scalar(&v, self.out);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        write_scalar(&v, self.out);
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        write_scalar(&v, self.out);
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        write_scalar(v, self.out);
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push(b'[');
        let mut first = true;
        loop {
            let before = self.out.len();
            if !first {
                self.out.push(b',');
            }
            if seq
                .next_element_seed(Canonical { out: self.out })?
                .is_none()
            {
                self.out.truncate(before);
                break;
            }
            first = false;
        }
        self.out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Each value is written in arrival order after `base`; then the members are laid out
        // again in key order.
        let base = self.out.len();
        let mut members: Vec<(Cow<'de, str>, Range<usize>)> = Vec::new();
        while let Some(key) = map.next_key_seed(Key)? {
            let start = self.out.len() - base;
            map.next_value_seed(Canonical { out: self.out })?;
            members.push((key, start..self.out.len() - base));
        }
        // A stable sort keeps duplicates in arrival order; the last of each run wins.
        members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let values = self.out.split_off(base);
        self.out.push(b'{');
        let mut first = true;
        for (i, (key, range)) in members.iter().enumerate() {
            if members.get(i + 1).is_some_and(|(next, _)| next == key) {
                continue;
            }
            if !first {
                self.out.push(b',');
            }
            first = false;
            write_scalar(key.as_ref(), self.out);
            self.out.push(b':');
            self.out.extend_from_slice(&values[range.clone()]);
        }
        self.out.push(b'}');
        Ok(())
    }
}

/// An object key, borrowed from the text when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
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

    /// The canonical form as first written: parse into a `serde_json::Value`, then write it
    /// with sorted keys. `canonical_json` must give the same bytes (stored fingerprints stay
    /// valid), without building the tree.
    fn reference(body: &[u8]) -> Option<Vec<u8>> {
        fn write(value: &serde_json::Value, out: &mut Vec<u8>) {
            use serde_json::Value;
            match value {
                Value::Object(map) => {
                    let mut entries: Vec<_> = map.iter().collect();
                    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                    out.push(b'{');
                    for (i, (key, value)) in entries.into_iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        write_scalar(key, out);
                        out.push(b':');
                        write(value, out);
                    }
                    out.push(b'}');
                }
                Value::Array(items) => {
                    out.push(b'[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        write(item, out);
                    }
                    out.push(b']');
                }
                scalar => write_scalar(scalar, out),
            }
        }
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let mut out = Vec::new();
        write(&value, &mut out);
        Some(out)
    }

    #[test]
    fn canonical_json_matches_the_reference_on_edge_cases() {
        let nested = |n: usize| "[".repeat(n) + &"]".repeat(n);
        let cases: Vec<String> = [
            r#"{"a":1,"a":2}"#,
            r#"{"b":1,"a":{"x":1},"a":3,"c":[{"z":0,"y":[]}]}"#,
            r#"{"é":1,"e":2,"\u00e9x":3,"E":4,"":5}"#,
            r#"["\ud83d\ude00","\u0000\t\n\"\\/","é😀"]"#,
            "[1.0, 1e2, 1E-7, -0, -0.0, 0.1, 12345678901234567890, 18446744073709551616, -9223372036854775809]",
            "[1e400]",
            r#"["\ud800"]"#,
            "  {\"a\" : [ true , false , null ] }  ",
            "{} ",
            "[]",
            "\"text\"",
            "17",
            "null",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\":1} x",
            "",
        ]
        .into_iter()
        .map(String::from)
        .chain([nested(127), nested(128), nested(129)])
        .collect();
        for case in &cases {
            assert_eq!(
                canonical_json(case.as_bytes()),
                reference(case.as_bytes()),
                "{case}"
            );
        }
        assert_eq!(canonical_json(br#"{"a":1,"a":2}"#).unwrap(), br#"{"a":2}"#);
        assert!(canonical_json(nested(127).as_bytes()).is_some());
        assert!(canonical_json(nested(128).as_bytes()).is_none());
    }

    #[test]
    fn a_key_named_like_serde_json_internals_is_an_ordinary_key() {
        // With serde_json's `raw_value` feature on (axum turns it on), parsing into a `Value`
        // treats this key as a marker and returns the parsed string instead, so the two bodies
        // below collided.
        let marker = br#"{"$serde_json::private::RawValue":"[1,2]"}"#;
        assert_eq!(canonical_json(marker).unwrap(), marker);
        assert_ne!(canonical_json(marker), canonical_json(b"[1,2]"));
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec(("[a-c]{0,2}|\\PC{0,4}", inner), 0..8)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn canonical_json_matches_the_reference(value in json_value(), pretty: bool) {
            let text = if pretty {
                serde_json::to_vec_pretty(&value).unwrap()
            } else {
                serde_json::to_vec(&value).unwrap()
            };
            proptest::prop_assert_eq!(canonical_json(&text), reference(&text));
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
        ] {
            headers.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(is_json(&headers), json, "{ct}");
        }
    }
}
