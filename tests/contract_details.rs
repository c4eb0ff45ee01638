//! Small behaviours stated exactly, each one a test that fails when the behaviour drifts:
//! `scope_fn`, which content types count as JSON, `Retry-After` rounding, the in-memory byte
//! bound at its edge, and the texts that rejections carry.

mod support;

use std::time::Duration;

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use tower_idempotency::{
    IdempotencyLayer, KeyError, MemoryStore, Scope, ScopeExtractor,
    fingerprint::is_json,
    problem::{Problem, ProblemKind},
    scope_fn,
    store::{Begin, Fingerprint, IdempotencyStore, StoreErrorKind, StoreKey, StoredResponse},
};

use support::{Calls, KEY, calls_app, send};

// ---------------------------------------------------------------------------------------------
// scope_fn

fn tenant_scope() -> impl ScopeExtractor {
    scope_fn(|parts| {
        parts
            .headers
            .get("x-tenant")
            .map(|tenant| Scope::new(tenant.as_bytes().to_vec()))
    })
}

#[test]
fn scope_fn_returns_what_the_closure_returns() {
    let extractor = tenant_scope();
    let with = Request::post("/")
        .header("x-tenant", "acme")
        .body(())
        .unwrap();
    let scope = extractor.extract(&with.into_parts().0).expect("a scope");
    assert_eq!(scope.as_bytes(), b"acme");
    let without = Request::post("/").body(()).unwrap();
    assert!(extractor.extract(&without.into_parts().0).is_none());
}

fn tenant_request(tenant: Option<&str>, key: &str) -> Request<Body> {
    let mut builder = Request::post("/calls").header(KEY, key);
    if let Some(tenant) = tenant {
        builder = builder.header("x-tenant", tenant);
    }
    builder.body(Body::from("{}")).unwrap()
}

/// Behind the layer: the closure's scope separates callers, and its `None` is a missing scope.
#[tokio::test]
async fn scope_fn_scopes_the_layer() {
    let calls = Calls::default();
    let app = calls_app(IdempotencyLayer::new().scope(tenant_scope()), &calls);
    let acme = send(&app, tenant_request(Some("acme"), "k")).await;
    let again = send(&app, tenant_request(Some("acme"), "k")).await;
    let globex = send(&app, tenant_request(Some("globex"), "k")).await;
    assert!(again.replayed());
    assert_eq!(again.body, acme.body);
    assert!(!globex.replayed(), "another tenant, another record");
    assert_eq!(calls.get(), 2);
    let nobody = send(&app, tenant_request(None, "k")).await;
    nobody.assert_problem(StatusCode::UNAUTHORIZED, "missing-scope");
    assert_eq!(calls.get(), 2);
}

// ---------------------------------------------------------------------------------------------
// Which bodies are JSON

fn content_type(value: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
    headers
}

#[test]
fn json_means_application_json_or_a_json_suffix() {
    for json in [
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/problem+json",
        "application/vnd.api+JSON",
        "text/json",
    ] {
        assert!(is_json(&content_type(json)), "{json}");
    }
    for not in [
        "application/octet-stream",
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/jsonl",
        "application/json-seq",
        "application/xjson",
        "application/+json",
        "json",
        "multipart/form-data; boundary=json",
    ] {
        assert!(!is_json(&content_type(not)), "{not}");
    }
    assert!(!is_json(&HeaderMap::new()));
}

// ---------------------------------------------------------------------------------------------
// Retry-After

fn retry_after(after: Duration) -> String {
    let response: http::Response<Body> = Problem::new(ProblemKind::InFlight, "busy")
        .retry_after(after)
        .into_response();
    response.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .to_owned()
}

#[test]
fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
    assert_eq!(retry_after(Duration::ZERO), "1");
    assert_eq!(retry_after(Duration::from_millis(1)), "1");
    assert_eq!(retry_after(Duration::from_secs(1)), "1");
    assert_eq!(retry_after(Duration::from_millis(1001)), "2");
    assert_eq!(retry_after(Duration::from_secs(2)), "2");
    assert_eq!(retry_after(Duration::from_millis(59_500)), "60");
}

// ---------------------------------------------------------------------------------------------
// The in-memory byte bound, at its edge

fn response(body: &'static [u8]) -> StoredResponse {
    StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::new(),
        body: Bytes::from_static(body),
    }
}

async fn store_one(store: &MemoryStore, n: u8, body: &'static [u8]) -> Result<(), StoreErrorKind> {
    let key = StoreKey([n; 32]);
    let lease = Duration::from_secs(60);
    match store.begin(&key, &Fingerprint([n; 32]), lease).await {
        Ok(Begin::Acquired(token)) => {
            let stored = store
                .complete(&key, token, &response(body), lease)
                .await
                .unwrap();
            assert!(stored);
            Ok(())
        }
        Ok(other) => panic!("{other:?}"),
        Err(error) => Err(error.kind()),
    }
}

/// Stored bytes equal to the bound leave no room; one byte more of bound leaves room for one
/// more record. (With `WhenFull::Refuse`, so that "no room" is seen as `Full` rather than as
/// an eviction.)
#[tokio::test]
async fn the_byte_bound_is_reached_at_exactly_max_bytes() {
    let weight = response(b"0123456789").weight();
    assert_eq!(weight, 10);

    let exact = MemoryStore::builder()
        .max_bytes(weight)
        .when_full(tower_idempotency::store::WhenFull::Refuse)
        .build();
    store_one(&exact, 1, b"0123456789").await.unwrap();
    assert_eq!(
        store_one(&exact, 2, b"x").await,
        Err(StoreErrorKind::Full),
        "at the bound: full"
    );

    let roomy = MemoryStore::builder()
        .max_bytes(weight + 1)
        .when_full(tower_idempotency::store::WhenFull::Refuse)
        .build();
    store_one(&roomy, 1, b"0123456789").await.unwrap();
    store_one(&roomy, 2, b"x").await.unwrap();
}

#[tokio::test]
async fn the_record_bound_is_reached_at_exactly_max_records() {
    let store = MemoryStore::builder()
        .max_records(2)
        .when_full(tower_idempotency::store::WhenFull::Refuse)
        .build();
    store_one(&store, 1, b"a").await.unwrap();
    store_one(&store, 2, b"b").await.unwrap();
    assert_eq!(store_one(&store, 3, b"c").await, Err(StoreErrorKind::Full));
}

// ---------------------------------------------------------------------------------------------
// Texts

#[test]
fn every_problem_kind_has_its_status_type_and_title() {
    let kinds = [
        (
            ProblemKind::InvalidKey,
            400,
            "invalid-key",
            "Invalid idempotency key",
        ),
        (
            ProblemKind::BodyUnreadable,
            400,
            "body-unreadable",
            "Request body could not be read",
        ),
        (
            ProblemKind::MissingScope,
            401,
            "missing-scope",
            "Caller could not be identified",
        ),
        (
            ProblemKind::InFlight,
            409,
            "in-flight",
            "Request with this idempotency key is in progress",
        ),
        (
            ProblemKind::BodyTooLarge,
            413,
            "body-too-large",
            "Request body too large",
        ),
        (
            ProblemKind::KeyReused,
            422,
            "key-reused",
            "Idempotency key reused with a different request",
        ),
        (
            ProblemKind::StoreUnavailable,
            503,
            "store-unavailable",
            "Idempotency store unavailable",
        ),
        (
            ProblemKind::StoreFull,
            503,
            "store-full",
            "Idempotency store full",
        ),
        (
            ProblemKind::NoLease,
            500,
            "no-lease",
            "Idempotency lease missing",
        ),
        (
            ProblemKind::ResponseUnstorable,
            500,
            "response-unstorable",
            "Response could not be stored",
        ),
    ];
    for (kind, status, name, title) in kinds {
        assert_eq!(kind.status().as_u16(), status, "{kind:?}");
        assert_eq!(
            kind.type_uri(),
            format!("tag:tower-idempotency,2026:{name}"),
            "{kind:?}"
        );
        assert_eq!(kind.title(), title, "{kind:?}");
        // A rejection of the kind, as a `reject_with` hook gets it, says the same.
        let problem = Problem::new(kind, "detail");
        assert_eq!(problem.title(), title, "{kind:?}");
        assert_eq!(problem.status().as_u16(), status, "{kind:?}");
    }
}

#[test]
fn key_errors_say_what_is_wrong() {
    let said = |error: KeyError| error.to_string();
    assert_eq!(
        said(KeyError::Missing),
        "the idempotency key header is required on this endpoint"
    );
    assert!(
        said(KeyError::Repeated).starts_with("the idempotency key must be sent in exactly one")
    );
    assert_eq!(
        said(KeyError::Empty),
        "the idempotency key must not be empty"
    );
    assert_eq!(
        said(KeyError::TooLong),
        "the idempotency key must be at most 255 characters"
    );
    assert!(said(KeyError::InvalidCharacter).contains("visible ASCII characters (0x21 to 0x7E)"));
}

/// The rejection of a bad key names the header and the reason, in the problem's `detail`.
#[tokio::test]
async fn a_bad_key_is_rejected_with_the_reason_and_the_header() {
    let app = Router::new()
        .route("/calls", post(|| async { StatusCode::CREATED }))
        .layer(IdempotencyLayer::new());
    let reply = send(
        &app,
        Request::builder()
            .method(Method::POST)
            .uri("/calls")
            .header(header::AUTHORIZATION, support::ORG_A)
            .header(KEY, "")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    reply.assert_problem(StatusCode::BAD_REQUEST, "invalid-key");
    let detail = reply.json()["detail"].as_str().unwrap().to_owned();
    assert_eq!(
        detail,
        "the idempotency key must not be empty (header x-idempotency-key or idempotency-key)"
    );
}

/// The layer is ready when the service it wraps is, and passes on its readiness error; its
/// `Debug` output shows the wrapped service.
#[tokio::test]
async fn readiness_is_the_wrapped_services() {
    use std::task::{Context, Poll};

    use tower::{Layer, ServiceExt};

    #[derive(Clone, Debug)]
    struct NotReady;
    impl tower::Service<Request<Body>> for NotReady {
        type Response = http::Response<Body>;
        type Error = &'static str;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Err("the wrapped service is not ready"))
        }
        fn call(&mut self, _: Request<Body>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(Body::empty())))
        }
    }

    let mut svc = IdempotencyLayer::new().layer(NotReady);
    assert!(format!("{svc:?}").starts_with("Idempotency { inner: NotReady"));
    let error = svc.ready().await.unwrap_err();
    assert_eq!(error, "the wrapped service is not ready");
}
