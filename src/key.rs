//! [`IdempotencyKey`]: the validated value of the idempotency key header.

use std::fmt;

use http::{HeaderMap, HeaderName};

/// The longest key accepted, in characters (bytes: keys are ASCII).
pub const MAX_KEY_LEN: usize = 255;

/// Up to this many distinct header names, the key headers are found by one pass over the
/// request's headers rather than by a hash lookup per key header name.
const SCAN_HEADERS: usize = 16;

/// A validated idempotency key.
///
/// Accepted: exactly one header field whose value, after unwrapping a well-formed
/// structured-field string (RFC 8941 section 3.3.3: `"..."` with `\"` and `\\` as the only
/// escapes, as the IETF Idempotency-Key draft writes keys), is 1 to 255 visible ASCII
/// characters (0x21 to 0x7E). A UUID is the usual choice.
///
/// The key is a client secret of sorts (whoever knows it can read the stored response within
/// the same scope), so its `Debug` output is redacted and the layer never logs it.
///
/// # In the handler
///
/// The layer puts the validated key in the request extensions of every request whose handler
/// it runs with a key (under a lease, or unprotected when the store fails open or the scope is
/// missing and passed through), next to the [`ScopeDigest`](crate::ScopeDigest) of its scope
/// (absent when there is no scope). Read them with axum's `Extension` (`Option<Extension<..>>`
/// when requests without a key reach the handler too):
///
/// ```
/// use axum::{Extension, Router, body::Body, http::Request, routing::post};
/// use tower::ServiceExt;
/// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, ScopeDigest};
///
/// async fn create(
///     key: Option<Extension<IdempotencyKey>>,
///     scope: Option<Extension<ScopeDigest>>,
/// ) -> String {
///     match (key, scope) {
///         (Some(Extension(key)), Some(Extension(scope))) => {
///             format!("key {} of scope {}", key.as_str(), &scope.to_hex()[..8])
///         }
///         _ => "no key".to_owned(),
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let app: Router = Router::new()
///     .route("/calls", post(create))
///     .route_layer(IdempotencyLayer::new());
/// let request = Request::post("/calls")
///     .header("authorization", "Bearer sk_test_1")
///     .header("x-idempotency-key", "k-1")
///     .body(Body::empty())
///     .unwrap();
/// let response = app.oneshot(request).await.unwrap();
/// let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
/// assert!(body.starts_with(b"key k-1 of scope "), "{body:?}");
/// # }
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why a key header was rejected (the layer answers 400 with this as the detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The header is absent (only an error when the key is required).
    Missing,
    /// The header appears more than once.
    Repeated,
    /// The value is empty (or an empty structured-field string).
    Empty,
    /// The value is longer than 255 characters.
    TooLong,
    /// The value has a character outside visible ASCII (0x21 to 0x7E), or is a malformed
    /// structured-field string.
    InvalidCharacter,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyError::Missing => "the idempotency key header is required on this endpoint",
            KeyError::Repeated => {
                "the idempotency key must be sent in exactly one header field (not repeated, \
                 and not under two header names at once)"
            }
            KeyError::Empty => "the idempotency key must not be empty",
            KeyError::TooLong => "the idempotency key must be at most 255 characters",
            KeyError::InvalidCharacter => {
                "the idempotency key must be visible ASCII characters (0x21 to 0x7E), \
                 optionally as a structured-field string (\"...\")"
            }
        })
    }
}

impl std::error::Error for KeyError {}

impl IdempotencyKey {
    /// Reads and validates the key from `headers` under `name`. `Ok(None)` when the header is
    /// absent.
    pub fn from_headers(headers: &HeaderMap, name: &HeaderName) -> Result<Option<Self>, KeyError> {
        Self::from_any_header(headers, std::slice::from_ref(name))
    }

    /// Reads and validates the key from whichever of `names` the request carries. Exactly one
    /// field in all is allowed: the same header twice, or two of the names at once (even with
    /// equal values), is [`KeyError::Repeated`]. `Ok(None)` when none is present. A name that
    /// `names` lists more than once counts once.
    pub fn from_any_header(
        headers: &HeaderMap,
        names: &[HeaderName],
    ) -> Result<Option<Self>, KeyError> {
        let mut found = None;
        let mut note = |value| match found.replace(value) {
            Some(_) => Err(KeyError::Repeated),
            None => Ok(()),
        };
        if headers.keys_len() <= SCAN_HEADERS {
            // A few headers: one pass comparing names costs less than hashing each key
            // header name for a lookup.
            for (name, value) in headers {
                if names.contains(name) {
                    note(value)?;
                }
            }
        } else {
            for (i, name) in names.iter().enumerate() {
                // A name listed twice is still one header: read it once.
                if !names[..i].contains(name) {
                    headers.get_all(name).iter().try_for_each(&mut note)?;
                }
            }
        }
        found.map(|value| Self::parse(value.as_bytes())).transpose()
    }

    /// Validates one header value.
    pub fn parse(raw: &[u8]) -> Result<Self, KeyError> {
        let unwrapped = match raw {
            [b'"', inner @ .., b'"'] => unwrap_sf_string(inner)?,
            [b'"', ..] => return Err(KeyError::InvalidCharacter),
            _ => raw.to_vec(),
        };
        if unwrapped.is_empty() {
            return Err(KeyError::Empty);
        }
        if unwrapped.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
        if !unwrapped.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(KeyError::InvalidCharacter);
        }
        // Visible ASCII is valid UTF-8.
        String::from_utf8(unwrapped)
            .map(Self)
            .map_err(|_| KeyError::InvalidCharacter)
    }

    /// The key text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The content of an RFC 8941 string between its quotes: printable ASCII (0x20 to 0x7E),
/// `\` only before `"` or `\`, no bare `"`.
fn unwrap_sf_string(inner: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => out.push(escaped),
                _ => return Err(KeyError::InvalidCharacter),
            },
            b'"' => return Err(KeyError::InvalidCharacter),
            0x20..=0x7e => out.push(b),
            _ => return Err(KeyError::InvalidCharacter),
        }
    }
    Ok(out)
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdempotencyKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn accepts_plain_and_structured_field_keys() {
        assert_eq!(
            IdempotencyKey::parse(b"abc-123").unwrap().as_str(),
            "abc-123"
        );
        assert_eq!(IdempotencyKey::parse(b"\"abc\"").unwrap().as_str(), "abc");
        assert_eq!(
            IdempotencyKey::parse(br#""a\"b\\c""#).unwrap().as_str(),
            r#"a"b\c"#
        );
        let longest = "k".repeat(255);
        assert!(IdempotencyKey::parse(longest.as_bytes()).is_ok());
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(IdempotencyKey::parse(b""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(b"\"\""), Err(KeyError::Empty));
        let too_long = "k".repeat(256);
        assert_eq!(
            IdempotencyKey::parse(too_long.as_bytes()),
            Err(KeyError::TooLong)
        );
        for bad in [
            &b"a b"[..],
            b"caf\xc3\xa9",
            b"\"abc",
            b"\"",
            b"\"a\"b\"",
            b"\"a\\x\"",
            b"\"a b\"",
            b"tab\there",
        ] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(KeyError::InvalidCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn two_names_at_once_are_repeated() {
        let names = [
            HeaderName::from_static("x-idempotency-key"),
            HeaderName::from_static("idempotency-key"),
        ];
        let mut headers = HeaderMap::new();
        headers.insert(&names[1], HeaderValue::from_static("a"));
        assert_eq!(
            IdempotencyKey::from_any_header(&headers, &names)
                .unwrap()
                .unwrap()
                .as_str(),
            "a"
        );
        headers.insert(&names[0], HeaderValue::from_static("a"));
        assert_eq!(
            IdempotencyKey::from_any_header(&headers, &names),
            Err(KeyError::Repeated)
        );
    }

    #[test]
    fn header_must_appear_once() {
        let name = HeaderName::from_static("x-idempotency-key");
        let mut headers = HeaderMap::new();
        assert_eq!(IdempotencyKey::from_headers(&headers, &name), Ok(None));
        headers.append(&name, HeaderValue::from_static("a"));
        assert!(
            IdempotencyKey::from_headers(&headers, &name)
                .unwrap()
                .is_some()
        );
        headers.append(&name, HeaderValue::from_static("a"));
        assert_eq!(
            IdempotencyKey::from_headers(&headers, &name),
            Err(KeyError::Repeated)
        );
    }
    /// Both ways of finding the key headers (a pass over a few headers, a lookup per name in
    /// a larger map) agree on every case.
    #[test]
    fn few_and_many_headers_find_the_same_key() {
        // A name listed twice (`Idempotency-Key` and `idempotency-key` are one name) is one
        // header all the same.
        let names = [
            HeaderName::from_static("x-idempotency-key"),
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_bytes(b"Idempotency-Key").unwrap(),
        ];
        for others in [0, 3, SCAN_HEADERS - 1, SCAN_HEADERS, SCAN_HEADERS + 1, 40] {
            let base = || {
                let mut headers = HeaderMap::new();
                for n in 0..others {
                    headers.insert(
                        HeaderName::try_from(format!("x-other-{n}")).unwrap(),
                        HeaderValue::from_static("v"),
                    );
                }
                headers
            };
            let found = |headers: &HeaderMap| {
                IdempotencyKey::from_any_header(headers, &names)
                    .map(|key| key.map(|key| key.as_str().to_owned()))
            };
            assert_eq!(found(&base()), Ok(None), "{others} other headers");
            for name in &names[..2] {
                let mut headers = base();
                headers.insert(name, HeaderValue::from_static("k1"));
                assert_eq!(found(&headers), Ok(Some("k1".into())), "{others}, {name}");
                headers.append(name, HeaderValue::from_static("k1"));
                assert_eq!(found(&headers), Err(KeyError::Repeated), "{others}, {name}");
            }
            let mut both = base();
            both.insert(&names[0], HeaderValue::from_static("k1"));
            both.insert(&names[1], HeaderValue::from_static("k2"));
            assert_eq!(
                found(&both),
                Err(KeyError::Repeated),
                "{others}, both names"
            );
            let mut bad = base();
            bad.insert(&names[1], HeaderValue::from_static("a b"));
            assert_eq!(found(&bad), Err(KeyError::InvalidCharacter), "{others}");
        }
    }
}
