//! [`StoreError`]: what went wrong in a store call, with its kind and its cause.

use std::{error::Error as StdError, fmt};

use super::BoxError;

/// What went wrong in a store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The backend could not be reached or answered with an error.
    Unavailable,
    /// The call did not finish within the layer's store timeout.
    Timeout,
    /// The store is at a configured capacity bound and will not take a new record until space
    /// frees (see [`MemoryStoreBuilder::max_records`](super::MemoryStoreBuilder::max_records)
    /// and [`WhenFull`](super::WhenFull): a `MemoryStore` that evicts answers this only when
    /// every record left is in flight).
    Full,
    /// A stored record could not be decoded.
    Corrupt,
}

/// An error from a store call. Keeps its cause as [`source`](StdError::source).
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: &'static str,
    source: Option<BoxError>,
}

impl StoreError {
    /// A new error of `kind` with a short static description.
    pub fn new(kind: StoreErrorKind, message: &'static str) -> Self {
        Self {
            kind,
            message,
            source: None,
        }
    }

    /// A new [`StoreErrorKind::Unavailable`] error caused by `source` (a driver error, say).
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self::new(StoreErrorKind::Unavailable, "store unavailable").with_source(source)
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The error and its causes in one line, for an operator's log: the message, the kind,
    /// then each [`source`](StdError::source) in turn, for example
    /// `store unavailable (Unavailable): Connection refused (os error 111)`. Every URL in it
    /// (anything of the form `scheme://...`, which may carry a password) is replaced by
    /// `<url>`. The layer logs store failures with this as the `cause` field.
    pub fn diagnostic(&self) -> String {
        let mut line = format!("{} ({:?})", self.message, self.kind);
        let mut source = self.source();
        while let Some(cause) = source {
            line.push_str(": ");
            line.push_str(&redact_urls(&cause.to_string()));
            source = cause.source();
        }
        line
    }
}

/// `text` with every `scheme://...` run (up to white space or a quote) replaced by `<url>`.
fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let scheme_len = rest[..at]
            .bytes()
            .rev()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
            .count();
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`'))
            .map_or(rest.len(), |n| at + n);
        out.push_str(&rest[..at - scheme_len]);
        out.push_str("<url>");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cause is reported by `source()`, not repeated here.
        f.write_str(self.message)
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_wherever_they_stand() {
        assert_eq!(
            redact_urls("cannot reach redis://:hunter2@cache:6379/0 now"),
            "cannot reach <url> now"
        );
        assert_eq!(redact_urls("postgres://u:p@db/x"), "<url>");
        assert_eq!(
            redact_urls("a \"mysql://root:pw@h/test\" and rediss://h"),
            "a \"<url>\" and <url>"
        );
        assert_eq!(
            redact_urls("no url: 127.0.0.1:6379"),
            "no url: 127.0.0.1:6379"
        );
    }

    #[test]
    fn diagnostic_names_kind_and_every_cause() {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connect to redis://user:secret@10.0.0.1:6379 refused",
        );
        let error = StoreError::unavailable(io);
        assert_eq!(
            error.diagnostic(),
            "store unavailable (Unavailable): connect to <url> refused"
        );
        let timeout = StoreError::new(StoreErrorKind::Timeout, "store call timed out");
        assert_eq!(timeout.diagnostic(), "store call timed out (Timeout)");
        // Display is the message alone; the cause is the `source()`.
        assert_eq!(error.to_string(), "store unavailable");
        assert!(error.source().is_some());
        assert_eq!(timeout.to_string(), "store call timed out");
    }
}
