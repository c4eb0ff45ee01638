//! Rejections as RFC 9457 problem details (`application/problem+json`).
//!
//! Every response the layer makes itself (as opposed to a replay) is one of these, with
//! `type`, `title`, `status` and `detail` members. The `type` is a `tag:` URI (RFC 4151) that
//! names the kind of problem and stays stable across versions; clients can match on it.
//!
//! | kind | status | `type` | when |
//! |---|---|---|---|
//! | [`InvalidKey`](ProblemKind::InvalidKey) | 400 | `tag:tower-idempotency,2026:invalid-key` | key header repeated, empty, too long, bad characters, or missing when required |
//! | [`BodyUnreadable`](ProblemKind::BodyUnreadable) | 400 | `tag:tower-idempotency,2026:body-unreadable` | the request body failed while being read |
//! | [`MissingScope`](ProblemKind::MissingScope) | 401 | `tag:tower-idempotency,2026:missing-scope` | no caller could be identified |
//! | [`InFlight`](ProblemKind::InFlight) | 409 + `Retry-After` | `tag:tower-idempotency,2026:in-flight` | a request with this key is still running |
//! | [`BodyTooLarge`](ProblemKind::BodyTooLarge) | 413 | `tag:tower-idempotency,2026:body-too-large` | the request body is over the limit |
//! | [`KeyReused`](ProblemKind::KeyReused) | 422 | `tag:tower-idempotency,2026:key-reused` | strict mode: the key was used with another request |
//! | [`StoreUnavailable`](ProblemKind::StoreUnavailable) | 503 + `Retry-After` | `tag:tower-idempotency,2026:store-unavailable` | the store failed or timed out |
//! | [`StoreFull`](ProblemKind::StoreFull) | 503 + `Retry-After` | `tag:tower-idempotency,2026:store-full` | the store is at its capacity bound |
//! | [`ResponseUnstorable`](ProblemKind::ResponseUnstorable) | 500 | `tag:tower-idempotency,2026:response-unstorable` | a handler completing its record in its own transaction had a response that cannot be stored |
//! | [`NoLease`](ProblemKind::NoLease) | 500 | `tag:tower-idempotency,2026:no-lease` | a handler extracted a [`Lease`](crate::Lease) and the request has none (a server misconfiguration) |

use std::time::Duration;

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

    /// The `type` URI.
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

/// A problem details response: kind, detail, and an optional `Retry-After`.
#[derive(Debug, Clone)]
pub struct Problem {
    /// What went wrong.
    pub kind: ProblemKind,
    /// The `detail` member: this occurrence, in a sentence.
    pub detail: String,
    /// `Retry-After`, in whole seconds (rounded up, at least 1).
    pub retry_after: Option<Duration>,
}

impl Problem {
    /// A problem of `kind` with `detail`.
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
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
            "type": self.kind.type_uri(),
            "title": self.kind.title(),
            "status": self.kind.status().as_u16(),
            "detail": self.detail,
        });
        let bytes = Bytes::from(serde_json::to_vec(&body).expect("serializing a JSON value"));
        let mut response = Response::new(B::from(bytes));
        *response.status_mut() = self.kind.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
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
}
