//! [`ProblemTypes`]: the `type` URIs of the layer's problem details, and their validation.

use std::{borrow::Cow, fmt};

use crate::problem::ProblemKind;

/// The `type` URIs of the layer's rejections, set with
/// [`IdempotencyLayer::problem_types`](crate::IdempotencyLayer::problem_types).
///
/// The IETF idempotency-key draft wants the `type` of its errors to point at the API's own
/// documentation; the default `tag:` URIs name the kinds but cannot be opened. A kind's `type`
/// is, first match wins:
///
/// 1. its own URI, set with [`uri`](Self::uri);
/// 2. the [`base`](Self::base) followed by the kind's [slug](ProblemKind::slug), joined as
///    text, with nothing added or removed: base `https://docs.example.com/errors/` makes
///    `https://docs.example.com/errors/in-flight`, base `https://docs.example.com/errors#`
///    makes `https://docs.example.com/errors#in-flight`;
/// 3. the default, [`DEFAULT_TYPE_BASE`](crate::problem::DEFAULT_TYPE_BASE) followed by the slug
///    (`tag:tower-idempotency,2026:in-flight`).
///
/// Every URI is checked when it is set: it must be an absolute URI (RFC 3986 section 4.3:
/// a scheme, `:`, then only URI characters, `%` followed by two hex digits, at most one `#`).
/// A relative reference, a space, a quote, a non-ASCII character or a broken `%` escape is an
/// [`InvalidTypeUri`] error, so a problem document never carries a `type` that cannot be
/// resolved.
///
/// ```
/// use tower_idempotency::{ProblemTypes, problem::ProblemKind};
///
/// let types = ProblemTypes::default()
///     .base("https://docs.example.com/errors/")?
///     .uri(ProblemKind::KeyReused, "https://docs.example.com/idempotency#reuse")?;
/// assert_eq!(types.get(ProblemKind::InFlight), "https://docs.example.com/errors/in-flight");
/// assert_eq!(types.get(ProblemKind::KeyReused), "https://docs.example.com/idempotency#reuse");
/// assert!(ProblemTypes::default().base("/errors/").is_err());
/// # Ok::<(), tower_idempotency::InvalidTypeUri>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProblemTypes {
    base: Option<String>,
    overrides: Vec<(ProblemKind, String)>,
}

impl ProblemTypes {
    /// Every kind's `type` is `base` followed by its [slug](ProblemKind::slug) (unless set
    /// with [`uri`](Self::uri)). Default: [`DEFAULT_TYPE_BASE`](crate::problem::DEFAULT_TYPE_BASE).
    ///
    /// # Errors
    /// [`InvalidTypeUri`] when `base` followed by a slug is not an absolute URI.
    pub fn base(mut self, base: &str) -> Result<Self, InvalidTypeUri> {
        check_uri(&format!("{base}{}", ProblemKind::InFlight.slug()), base)?;
        self.base = Some(base.to_owned());
        Ok(self)
    }

    /// `kind`'s `type` is `uri`, whatever the [`base`](Self::base).
    ///
    /// # Errors
    /// [`InvalidTypeUri`] when `uri` is not an absolute URI.
    pub fn uri(mut self, kind: ProblemKind, uri: &str) -> Result<Self, InvalidTypeUri> {
        check_uri(uri, uri)?;
        self.overrides.retain(|(k, _)| *k != kind);
        self.overrides.push((kind, uri.to_owned()));
        Ok(self)
    }

    /// The `type` URI of `kind`.
    pub fn get(&self, kind: ProblemKind) -> Cow<'static, str> {
        self.configured(kind)
            .unwrap_or(Cow::Borrowed(kind.type_uri()))
    }

    /// The `type` URI of `kind` when it is not the default.
    pub(crate) fn configured(&self, kind: ProblemKind) -> Option<Cow<'static, str>> {
        if let Some((_, uri)) = self.overrides.iter().find(|(k, _)| *k == kind) {
            return Some(Cow::Owned(uri.clone()));
        }
        let base = self.base.as_deref()?;
        Some(Cow::Owned(format!("{base}{}", kind.slug())))
    }

    /// Whether every kind has its default `type`.
    pub(crate) fn is_default(&self) -> bool {
        self.base.is_none() && self.overrides.is_empty()
    }
}

/// A `type` URI that [`ProblemTypes`] refused: it is not an absolute URI (RFC 3986).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTypeUri {
    uri: String,
    reason: &'static str,
}

impl InvalidTypeUri {
    /// The refused input, as given.
    pub fn uri(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for InvalidTypeUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid problem type URI {:?}: {} (an absolute URI is needed, such as \
             `https://docs.example.com/errors/`)",
            self.uri, self.reason
        )
    }
}

impl std::error::Error for InvalidTypeUri {}

/// Checks that `uri` is an absolute URI (RFC 3986 `absolute-URI` with an optional fragment);
/// `input` is what the caller gave, for the error.
fn check_uri(uri: &str, input: &str) -> Result<(), InvalidTypeUri> {
    let error = |reason| InvalidTypeUri {
        uri: input.to_owned(),
        reason,
    };
    let Some((scheme, rest)) = uri.split_once(':') else {
        return Err(error("no scheme (a relative reference)"));
    };
    let mut scheme_chars = scheme.bytes();
    if !scheme_chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        || !scheme_chars.all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c))
    {
        return Err(error(
            "the scheme must be a letter followed by letters, digits, `+`, `-` or `.`",
        ));
    }
    if rest.is_empty() {
        return Err(error("nothing after the scheme"));
    }
    let bytes = rest.as_bytes();
    let mut fragments = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                if !(i + 2 < bytes.len()
                    && bytes[i + 1].is_ascii_hexdigit()
                    && bytes[i + 2].is_ascii_hexdigit())
                {
                    return Err(error("`%` not followed by two hex digits"));
                }
                i += 2;
            }
            b'#' => {
                fragments += 1;
                if fragments > 1 {
                    return Err(error("more than one `#`"));
                }
            }
            c if c.is_ascii_alphanumeric() || b"-._~:/?[]@!$&'()*+,;=".contains(&c) => {}
            _ => {
                return Err(error(
                    "a character that a URI cannot hold (space, quote, `<`, `>`, `\\`, `^`, \
                     `` ` ``, `{`, `|`, `}`, control or non-ASCII); percent-encode it",
                ));
            }
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::Response;

    use super::*;
    use crate::problem::{DEFAULT_TYPE_BASE, Problem};

    #[test]
    fn every_default_type_is_the_default_base_and_the_slug() {
        for kind in ProblemKind::ALL {
            assert_eq!(ProblemTypes::default().get(kind), kind.type_uri());
            assert_eq!(
                ProblemTypes::default().get(kind),
                format!("{DEFAULT_TYPE_BASE}{}", kind.slug())
            );
            assert_eq!(ProblemTypes::default().configured(kind), None);
        }
        assert!(ProblemTypes::default().is_default());
    }

    #[test]
    fn a_base_is_joined_to_each_slug_and_a_kind_uri_wins() {
        let types = ProblemTypes::default()
            .uri(ProblemKind::KeyReused, "https://docs.example.com/reuse")
            .unwrap()
            .base("https://docs.example.com/errors#")
            .unwrap();
        assert!(!types.is_default());
        assert_eq!(
            types.get(ProblemKind::StoreFull),
            "https://docs.example.com/errors#store-full"
        );
        assert_eq!(
            types.get(ProblemKind::KeyReused),
            "https://docs.example.com/reuse"
        );
        let again = types
            .uri(ProblemKind::KeyReused, "https://docs.example.com/reuse2")
            .unwrap();
        assert_eq!(
            again.get(ProblemKind::KeyReused),
            "https://docs.example.com/reuse2"
        );
        let problem = Problem::new(ProblemKind::StoreFull, "full")
            .with_type_uri(again.configured(ProblemKind::StoreFull));
        let response: Response<Bytes> = problem.into_response();
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["type"], "https://docs.example.com/errors#store-full");
    }

    #[test]
    fn absolute_uris_are_taken() {
        for uri in [
            "https://docs.example.com/errors/",
            "https://docs.example.com/errors?kind=",
            "urn:example:errors:",
            "tag:example.com,2026:",
            "https://docs.example.com/a%20b/",
            "https://[::1]:8080/errors/",
            "a+b.c-d:x",
        ] {
            assert!(ProblemTypes::default().base(uri).is_ok(), "{uri}");
            assert!(
                ProblemTypes::default()
                    .uri(ProblemKind::InFlight, uri)
                    .is_ok(),
                "{uri}"
            );
        }
    }

    #[test]
    fn anything_else_is_refused_with_the_input_and_a_reason() {
        for (uri, reason) in [
            ("", "no scheme"),
            ("/errors/", "no scheme"),
            ("docs.example.com/errors", "no scheme"),
            ("1http://x/", "the scheme"),
            (":x", "the scheme"),
            ("ht tp://x/", "the scheme"),
            ("https://docs.example.com/my errors/", "cannot hold"),
            ("https://docs.example.com/\"quoted\"", "cannot hold"),
            ("https://docs.example.com/é", "cannot hold"),
            ("https://docs.example.com/\n", "cannot hold"),
            ("https://docs.example.com/{kind}", "cannot hold"),
            ("https://docs.example.com/%2", "`%`"),
            ("https://docs.example.com/%zz", "`%`"),
            // The two characters after the `%` are the ones checked, not the one before it.
            ("https://docs.example.com/a%g0", "`%`"),
            // Checking resumes right after an escape: a space there is still refused.
            ("tag:abc%41 x", "cannot hold"),
            ("https://docs.example.com/#a#", "more than one `#`"),
        ] {
            let error = ProblemTypes::default()
                .uri(ProblemKind::InFlight, uri)
                .unwrap_err();
            assert_eq!(error.uri(), uri);
            assert!(error.to_string().contains(reason), "{uri}: {error}");
        }
        // A base is checked with a slug after it: an empty remainder is fine there.
        assert!(ProblemTypes::default().base("urn:").is_ok());
        assert!(
            ProblemTypes::default()
                .uri(ProblemKind::InFlight, "urn:")
                .unwrap_err()
                .to_string()
                .contains("nothing after the scheme")
        );
        assert!(ProblemTypes::default().base("/errors/").is_err());
        assert!(ProblemTypes::default().base("https://x/%").is_err());
    }
}
