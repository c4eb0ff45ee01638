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

use std::{
    ops::Range,
    sync::{LazyLock, Mutex},
};

use http::{HeaderMap, Method, header};
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

/// The canonical form of a JSON text, or `None` if it is not JSON (or nests 128 levels deep or
/// more).
///
/// Object keys sorted by their UTF-8 bytes (for duplicate keys, the last one wins, as
/// `serde_json` parses), no whitespace, strings escaped as `serde_json` writes them, numbers as
/// parsed, arrays in order.
///
/// One pass over the text, accepting exactly what `serde_json` accepts: the structure is read
/// here, and every token whose canonical form is not its own text (a string with an escape
/// sequence, a number with a fraction or an exponent, or with more than 18 digits, or `-0`) is
/// parsed and written by `serde_json`. Each object is written as its members arrive and put in
/// key order only when they did not arrive in it.
pub fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    canonicalize(body).map(|(canonical, _)| canonical)
}

/// [`canonical_json`], and whether the canonical form is lossless: no object repeats a key and
/// every number's canonical text has the value of its text as sent.
fn canonicalize(body: &[u8]) -> Option<(Vec<u8>, bool)> {
    let mut c = Canonicalizer {
        input: body,
        pos: 0,
        out: Vec::with_capacity(body.len()),
        members: Vec::new(),
        scratch: Vec::new(),
        lossless: true,
    };
    c.skip_whitespace();
    c.value(0)?;
    c.skip_whitespace();
    (c.pos == body.len()).then_some((c.out, c.lossless))
}

/// `serde_json`'s recursion limit: an array or object at this depth is an error.
const MAX_DEPTH: usize = 128;

struct Canonicalizer<'a> {
    input: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    /// The members of the objects being written, innermost last: each key and where its
    /// `"key":value` text lies in `out`.
    members: Vec<(Text<'a>, Range<usize>)>,
    /// Room to reorder one object's members.
    scratch: Vec<u8>,
    /// No repeated key dropped, no number rounded, so far.
    lossless: bool,
}

impl<'a> Canonicalizer<'a> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => {
                let text = self.string()?;
                text.write(&mut self.out);
                Some(())
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.pos + word.len();
        (self.input.get(self.pos..end)? == word).then_some(())?;
        self.pos = end;
        self.out.extend_from_slice(word);
        Some(())
    }

    /// A string token; borrowed from the text when it has no escape sequence.
    fn string(&mut self) -> Option<Text<'a>> {
        let input = self.input;
        let start = self.pos + 1;
        let (mut i, ascii) = plain_run(input, start);
        if *input.get(i)? == b'"' {
            let text = &input[start..i];
            if !ascii {
                std::str::from_utf8(text).ok()?;
            }
            self.pos = i + 1;
            return Some(Text::Plain(text));
        }
        // An escape sequence (or a control character, which serde_json rejects below): find the
        // closing quote, then let serde_json decode the token.
        loop {
            match *input.get(i)? {
                b'"' => break,
                b'\\' => i += 2,
                _ => i += 1,
            }
        }
        let decoded: String = serde_json::from_slice(&input[self.pos..=i]).ok()?;
        self.pos = i + 1;
        Some(Text::Decoded(decoded))
    }

    fn number(&mut self) -> Option<()> {
        let input = self.input;
        let start = self.pos;
        let digits = |mut i: usize| {
            while let Some(b'0'..=b'9') = input.get(i) {
                i += 1;
            }
            i
        };
        let mut i = start;
        if input[i] == b'-' {
            i += 1;
        }
        i = match input.get(i)? {
            b'0' => i + 1,
            b'1'..=b'9' => digits(i + 1),
            _ => return None,
        };
        let integer_len = i - start;
        let mut plain = true;
        if input.get(i) == Some(&b'.') {
            plain = false;
            let end = digits(i + 1);
            (end > i + 1).then_some(())?;
            i = end;
        }
        if let Some(b'e' | b'E') = input.get(i) {
            plain = false;
            i += 1;
            if let Some(b'+' | b'-') = input.get(i) {
                i += 1;
            }
            let end = digits(i);
            (end > i).then_some(())?;
            i = end;
        }
        let token = &input[start..i];
        self.pos = i;
        if plain && integer_len <= 18 && token != b"-0" {
            // Fits an i64 (or u64), which serde_json writes back digit for digit.
            self.out.extend_from_slice(token);
        } else {
            let number: serde_json::Number = serde_json::from_slice(token).ok()?;
            let start = self.out.len();
            write_scalar(&number, &mut self.out);
            let written = &self.out[start..];
            // Most numbers come as serde_json writes them, and are then exact.
            self.lossless &= written == token || Decimal::of(token) == Decimal::of(written);
        }
        Some(())
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        self.out.push(b'[');
        self.skip_whitespace();
        if self.peek()? == b']' {
            self.pos += 1;
            self.out.push(b']');
            return Some(());
        }
        loop {
            self.value(depth)?;
            self.skip_whitespace();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.out.push(b',');
                    self.skip_whitespace();
                }
                b']' => {
                    self.pos += 1;
                    self.out.push(b']');
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        let open = self.out.len();
        self.out.push(b'{');
        self.skip_whitespace();
        if self.peek()? == b'}' {
            self.pos += 1;
            self.out.push(b'}');
            return Some(());
        }
        let base = self.members.len();
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            let key = self.string()?;
            self.skip_whitespace();
            if self.peek()? != b':' {
                return None;
            }
            self.pos += 1;
            self.skip_whitespace();
            if self.members.len() > base {
                self.out.push(b',');
            }
            let start = self.out.len();
            key.write(&mut self.out);
            self.out.push(b':');
            self.value(depth)?;
            self.members.push((key, start..self.out.len()));
            self.skip_whitespace();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.skip_whitespace();
                }
                b'}' => {
                    self.pos += 1;
                    break;
                }
                _ => return None,
            }
        }
        let Self {
            out,
            members,
            scratch,
            lossless,
            ..
        } = self;
        let object = &mut members[base..];
        let in_order = object
            .windows(2)
            .all(|pair| pair[0].0.as_bytes() < pair[1].0.as_bytes());
        if !in_order {
            // A stable sort keeps duplicates in arrival order; the last of each run wins.
            object.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            scratch.clear();
            scratch.extend_from_slice(&out[open..]);
            out.truncate(open + 1);
            let mut first = true;
            for (i, (key, range)) in object.iter().enumerate() {
                if object
                    .get(i + 1)
                    .is_some_and(|(next, _)| next.as_bytes() == key.as_bytes())
                {
                    *lossless = false;
                    continue;
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(&scratch[range.start - open..range.end - open]);
            }
        }
        out.push(b'}');
        members.truncate(base);
        Some(())
    }
}

/// The value of a JSON number text, exactly: its sign, its significant digits (no leading or
/// trailing zeros) and the power of ten of the last one; zero, whatever its sign or form, is
/// `Zero`. So `1E2`, `100` and `100.0` are equal, and `0.1` and `0.10000000000000000001` are
/// not. Exponents are taken up to 10^15 in size, far past any a double reaches.
#[derive(PartialEq, Eq)]
enum Decimal {
    Zero,
    NonZero {
        negative: bool,
        digits: Vec<u8>,
        exponent: i64,
    },
}

impl Decimal {
    /// `text` must be a valid JSON number.
    fn of(text: &[u8]) -> Self {
        let (negative, text) = match text {
            [b'-', rest @ ..] => (true, rest),
            _ => (false, text),
        };
        let split = text
            .iter()
            .position(|b| matches!(b, b'e' | b'E'))
            .unwrap_or(text.len());
        let (mantissa, exponent_text) = text.split_at(split);
        let mut exponent: i64 = 0;
        let mut exponent_negative = false;
        for &b in exponent_text.iter().skip(1) {
            match b {
                b'-' => exponent_negative = true,
                b'0'..=b'9' => {
                    exponent = (exponent * 10 + i64::from(b - b'0')).min(1_000_000_000_000_000);
                }
                _ => {}
            }
        }
        if exponent_negative {
            exponent = -exponent;
        }
        let (integer, fraction) = match mantissa.iter().position(|&b| b == b'.') {
            Some(dot) => (&mantissa[..dot], &mantissa[dot + 1..]),
            None => (mantissa, &[][..]),
        };
        exponent -= fraction.len() as i64;
        let mut digits: Vec<u8> = integer.iter().chain(fraction).copied().collect();
        while digits.last() == Some(&b'0') {
            digits.pop();
            exponent += 1;
        }
        let leading = digits.iter().take_while(|&&b| b == b'0').count();
        if leading == digits.len() {
            return Decimal::Zero;
        }
        digits.drain(..leading);
        Decimal::NonZero {
            negative,
            digits,
            exponent,
        }
    }
}

/// The content of a string token.
enum Text<'a> {
    /// Straight from the text: the token had no escape sequence, so it holds no `"`, no `\\`
    /// and no control character, and needs no escaping.
    Plain(&'a [u8]),
    /// Decoded by serde_json.
    Decoded(String),
}

impl Text<'_> {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Text::Plain(text) => text,
            Text::Decoded(text) => text.as_bytes(),
        }
    }

    /// Writes the string as serde_json does (a plain one is written as it came).
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Text::Plain(text) => {
                out.reserve(text.len() + 2);
                out.push(b'"');
                out.extend_from_slice(text);
                out.push(b'"');
            }
            Text::Decoded(text) => write_scalar(text.as_str(), out),
        }
    }
}

/// From `i`, the end of the run of string bytes that need no escaping (the index of the first
/// `"`, `\\` or control character, or the end of the input), and whether the run is all ASCII.
/// Eight bytes at a time, with the usual bit tricks.
fn plain_run(input: &[u8], mut i: usize) -> (usize, bool) {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Non-zero when some byte of `x` is zero.
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut seen = 0u64;
    while let Some(chunk) = input.get(i..i + 8) {
        let x = u64::from_ne_bytes(chunk.try_into().expect("eight bytes"));
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        if control
            | zero_byte(x ^ (ONES * u64::from(b'"')))
            | zero_byte(x ^ (ONES * u64::from(b'\\')))
            != 0
        {
            break;
        }
        seen |= x;
        i += 8;
    }
    let mut seen_byte = 0u8;
    while let Some(&b) = input.get(i) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        seen_byte |= b;
        i += 1;
    }
    (i, seen & HIGH == 0 && seen_byte < 0x80)
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
            "[0, -1, 123456789012345678, -123456789012345678, 1234567890123456789, -1234567890123456789]",
            r#"{"b":{"d":1,"c":2},"a":[{"z":1,"y":2}],"c":"\\"}"#,
            r#"{"\u0062":1,"a":2,"b":3}"#,
            "[\"\u{7f}\", \"\\u00\", \"\\x\", \"\\\"]",
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
        .chain(
            [
                "9223372036854775807", "-9223372036854775808", "18446744073709551615", "00",
                "01", "-", "-a", "1.", ".5", "+1", "1e", "1e+", "2E-0", "1.5e3", "0e0", "-0e0",
                "0.0", "1E+2", "100000000000000000000000", "123.456e-789", "tru", "nul", "fals",
                "truee", "nulll", "1 2", "[1 2]", "{\"a\" 1}", "{\"a\":1 \"b\":2}", "{1:2}",
            ]
            .into_iter()
            .flat_map(|token| [token.to_owned(), format!("[{token}]"), format!("{{\"k\":{token}}}")]),
        )
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
        /// Accepts and rejects exactly what serde_json does, on near-JSON text.
        #[test]
        fn canonical_json_accepts_what_the_reference_accepts(
            text in r#"[\[\]{}",: 0-9eE.+\-a\\u\ttrufalsn\x00\x7fé]{0,24}"#,
        ) {
            proptest::prop_assert_eq!(canonical_json(text.as_bytes()), reference(text.as_bytes()));
        }

        /// The same on JSON documents with one byte changed.
        #[test]
        fn canonical_json_matches_the_reference_on_damaged_json(
            value in json_value(),
            at: proptest::sample::Index,
            byte in proptest::prop_oneof![
                proptest::sample::select(b"[]{}\",:\\.-+eE0 tn".to_vec()),
                proptest::prelude::any::<u8>(),
            ],
        ) {
            let mut text = serde_json::to_vec(&value).unwrap();
            let at = at.index(text.len());
            text[at] = byte;
            proptest::prop_assert_eq!(canonical_json(&text), reference(&text));
        }

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
        ] {
            headers.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(is_json(&headers), json, "{ct}");
        }
    }
}
