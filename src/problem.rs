//! Rejections: RFC 9457 problem details (`application/problem+json`) by default, or the
//! application's own error format through a hook.
//!
//! Every response the layer makes itself (as opposed to a replay) starts as a [`Problem`]: a
//! [`ProblemKind`], a `detail` sentence and an optional `Retry-After`. By default it is sent as
//! problem details with `type`, `title`, `status` and `detail` members. The default `type` is a
//! `tag:` URI (RFC 4151), `tag:tower-idempotency,2026:` followed by the kind's
//! [slug](ProblemKind::slug), that names the kind of problem and stays stable across versions;
//! clients can match on it. [`ProblemTypes`](crate::ProblemTypes) makes the `type` URIs point
//! at your API's own documentation instead, and
//! [`IdempotencyLayer::reject_with`](crate::IdempotencyLayer::reject_with) renders every
//! rejection in your API's own error format.
//!
//! | kind | status | slug (default `type`: `tag:tower-idempotency,2026:` + slug) | when |
//! |---|---|---|---|
//! | [`InvalidKey`](ProblemKind::InvalidKey) | 400 | `invalid-key` | key header repeated, empty, too long, bad characters, or missing when required |
//! | [`BodyUnreadable`](ProblemKind::BodyUnreadable) | 400 | `body-unreadable` | the request body failed while being read |
//! | [`MissingScope`](ProblemKind::MissingScope) | 401 | `missing-scope` | no caller could be identified |
//! | [`InFlight`](ProblemKind::InFlight) | 409 + `Retry-After` | `in-flight` | a request with this key is still running |
//! | [`BodyTooLarge`](ProblemKind::BodyTooLarge) | 413 | `body-too-large` | the request body is over the limit |
//! | [`KeyReused`](ProblemKind::KeyReused) | 422 | `key-reused` | strict mode: the key was used with another request |
//! | [`StoreUnavailable`](ProblemKind::StoreUnavailable) | 503 + `Retry-After` | `store-unavailable` | the store failed or timed out |
//! | [`StoreFull`](ProblemKind::StoreFull) | 503 + `Retry-After` | `store-full` | the store is at its capacity bound |
//! | [`ResponseUnstorable`](ProblemKind::ResponseUnstorable) | 500 | `response-unstorable` | a handler completing its record in its own transaction had a response that cannot be stored |
//! | [`NoLease`](ProblemKind::NoLease) | 500 | `no-lease` | a handler extracted a [`Lease`](crate::Lease) and the request has none (a server misconfiguration) |

use std::{borrow::Cow, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// The content type of every rejection.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The kinds of rejection the layer answers with. See the [module docs](self) for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// 400: the idempotency key header is invalid or missing where required.
    InvalidKey,
    /// 400: reading the request body failed.
    BodyUnreadable,
    /// 401: no scope could be found for the request.
    MissingScope,
    /// 409: a request with the same key is still in flight.
    InFlight,
    /// 413: the request body is larger than the limit.
    BodyTooLarge,
    /// 422: strict mode, the key was already used with a different request.
    KeyReused,
    /// 503: the store failed or did not answer in time.
    StoreUnavailable,
    /// 503: the store is at its capacity bound.
    StoreFull,
    /// 500: a handler needs a [`Lease`](crate::Lease) and the request has none: it carries no
    /// key, or the handler is not behind the layer.
    NoLease,
    /// 500: a handler's response could not be stored with its record (too large, trailers,
    /// a failing body), so the handler's transaction did not commit.
    ResponseUnstorable,
}

impl ProblemKind {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            ProblemKind::InvalidKey | ProblemKind::BodyUnreadable => StatusCode::BAD_REQUEST,
            ProblemKind::MissingScope => StatusCode::UNAUTHORIZED,
            ProblemKind::InFlight => StatusCode::CONFLICT,
            ProblemKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemKind::StoreUnavailable | ProblemKind::StoreFull => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProblemKind::NoLease | ProblemKind::ResponseUnstorable => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// Every kind, in the order of the table in the [module docs](self).
    pub const ALL: [ProblemKind; 10] = [
        ProblemKind::InvalidKey,
        ProblemKind::BodyUnreadable,
        ProblemKind::MissingScope,
        ProblemKind::InFlight,
        ProblemKind::BodyTooLarge,
        ProblemKind::KeyReused,
        ProblemKind::StoreUnavailable,
        ProblemKind::StoreFull,
        ProblemKind::ResponseUnstorable,
        ProblemKind::NoLease,
    ];

    /// The kind's short, stable name, such as `in-flight`: lowercase ASCII letters and `-`.
    /// The default `type` URI is [`DEFAULT_TYPE_BASE`] followed by it; with a
    /// [`ProblemTypes::base`](crate::ProblemTypes::base), that base followed by it.
    pub fn slug(self) -> &'static str {
        match self {
            ProblemKind::InvalidKey => "invalid-key",
            ProblemKind::BodyUnreadable => "body-unreadable",
            ProblemKind::MissingScope => "missing-scope",
            ProblemKind::InFlight => "in-flight",
            ProblemKind::BodyTooLarge => "body-too-large",
            ProblemKind::KeyReused => "key-reused",
            ProblemKind::StoreUnavailable => "store-unavailable",
            ProblemKind::StoreFull => "store-full",
            ProblemKind::NoLease => "no-lease",
            ProblemKind::ResponseUnstorable => "response-unstorable",
        }
    }

    /// The default `type` URI: [`DEFAULT_TYPE_BASE`] followed by the [slug](Self::slug), such
    /// as `tag:tower-idempotency,2026:in-flight`. The layer sends it unless
    /// [`ProblemTypes`](crate::ProblemTypes) say otherwise.
    pub fn type_uri(self) -> &'static str {
        match self {
            ProblemKind::InvalidKey => "tag:tower-idempotency,2026:invalid-key",
            ProblemKind::BodyUnreadable => "tag:tower-idempotency,2026:body-unreadable",
            ProblemKind::MissingScope => "tag:tower-idempotency,2026:missing-scope",
            ProblemKind::InFlight => "tag:tower-idempotency,2026:in-flight",
            ProblemKind::BodyTooLarge => "tag:tower-idempotency,2026:body-too-large",
            ProblemKind::KeyReused => "tag:tower-idempotency,2026:key-reused",
            ProblemKind::StoreUnavailable => "tag:tower-idempotency,2026:store-unavailable",
            ProblemKind::StoreFull => "tag:tower-idempotency,2026:store-full",
            ProblemKind::NoLease => "tag:tower-idempotency,2026:no-lease",
            ProblemKind::ResponseUnstorable => "tag:tower-idempotency,2026:response-unstorable",
        }
    }

    /// The short, fixed `title`.
    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::InvalidKey => "Invalid idempotency key",
            ProblemKind::BodyUnreadable => "Request body could not be read",
            ProblemKind::MissingScope => "Caller could not be identified",
            ProblemKind::InFlight => "Request with this idempotency key is in progress",
            ProblemKind::BodyTooLarge => "Request body too large",
            ProblemKind::KeyReused => "Idempotency key reused with a different request",
            ProblemKind::StoreUnavailable => "Idempotency store unavailable",
            ProblemKind::StoreFull => "Idempotency store full",
            ProblemKind::NoLease => "Idempotency lease missing",
            ProblemKind::ResponseUnstorable => "Response could not be stored",
        }
    }
}

/// The prefix of the default `type` URIs, `tag:tower-idempotency,2026:` (a `tag:` URI, RFC
/// 4151): each kind's default `type` is this followed by its [slug](ProblemKind::slug).
pub const DEFAULT_TYPE_BASE: &str = "tag:tower-idempotency,2026:";

/// A rejection: its kind, detail, and an optional `Retry-After`. The layer hands one to the
/// [rejection hook](crate::IdempotencyLayer::reject_with), or, by default, sends it as problem
/// details with [`into_response`](Self::into_response).
#[derive(Debug, Clone)]
pub struct Problem {
    /// What went wrong.
    pub kind: ProblemKind,
    /// The `detail` member: this occurrence, in an English sentence for the developer who
    /// reads the error.
    pub detail: String,
    /// `Retry-After`, sent in whole seconds (rounded up, at least 1): see
    /// [`retry_after_secs`](Self::retry_after_secs).
    pub retry_after: Option<Duration>,
    /// The `type` URI the layer's [`ProblemTypes`](crate::ProblemTypes) gave this kind; `None`:
    /// the default.
    type_uri: Option<Cow<'static, str>>,
}

impl Problem {
    /// A problem of `kind` with `detail`, no `Retry-After`, and the kind's default `type` URI.
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
            type_uri: None,
        }
    }

    /// The HTTP status of the kind ([`ProblemKind::status`]): 400, 401, 409, 413, 422, 500
    /// or 503.
    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// The short, fixed `title` of the kind ([`ProblemKind::title`]).
    pub fn title(&self) -> &'static str {
        self.kind.title()
    }

    /// The `type` URI: the one the layer's [`ProblemTypes`](crate::ProblemTypes) give the kind,
    /// else the kind's default ([`ProblemKind::type_uri`]).
    pub fn type_uri(&self) -> &str {
        self.type_uri.as_deref().unwrap_or(self.kind.type_uri())
    }

    /// The `Retry-After` value the layer sends, in whole seconds: the duration rounded up, at
    /// least 1. `None` when the problem has none.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|after| (after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1))
    }

    /// Sets the `type` URI (the layer does, from its [`ProblemTypes`](crate::ProblemTypes)).
    pub(crate) fn with_type_uri(mut self, uri: Option<Cow<'static, str>>) -> Self {
        self.type_uri = uri;
        self
    }

    /// Adds a `Retry-After` header.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The response: status, `Content-Type: application/problem+json`, `Retry-After` when set,
    /// and the JSON body `{"type", "title", "status", "detail"}`.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let body = serde_json::json!({
            "type": self.type_uri(),
            "title": self.kind.title(),
            "status": self.kind.status().as_u16(),
            "detail": self.detail,
        });
        let bytes = Bytes::from(serde_json::to_vec(&body).expect("serializing a JSON value"));
        let mut response = Response::new(B::from(bytes));
        *response.status_mut() = self.kind.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after_secs() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_has_the_rfc_9457_members() {
        let response: Response<Bytes> = Problem::new(ProblemKind::InFlight, "busy")
            .retry_after(Duration::from_millis(1500))
            .into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["type"], "tag:tower-idempotency,2026:in-flight");
        assert_eq!(body["status"], 409);
        assert_eq!(body["detail"], "busy");
        assert!(body["title"].is_string());
    }

    #[test]
    fn the_default_document_is_byte_for_byte_the_same() {
        let response: Response<Bytes> = Problem::new(ProblemKind::InFlight, "busy").into_response();
        assert_eq!(
            response.body().as_ref(),
            br#"{"detail":"busy","status":409,"title":"Request with this idempotency key is in progress","type":"tag:tower-idempotency,2026:in-flight"}"#
        );
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn every_default_type_is_the_base_and_the_slug() {
        for kind in ProblemKind::ALL {
            assert_eq!(
                kind.type_uri(),
                format!("{DEFAULT_TYPE_BASE}{}", kind.slug())
            );
            assert!(
                kind.slug()
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c == b'-'),
                "{kind:?}"
            );
        }
        let slugs: std::collections::HashSet<_> = ProblemKind::ALL.map(ProblemKind::slug).into();
        assert_eq!(slugs.len(), ProblemKind::ALL.len());
    }
}
