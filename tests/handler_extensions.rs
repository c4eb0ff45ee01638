//! What a covered handler reads from its request extensions: the key, the scope digest and its
//! `Lease`, none of them on a request the layer does not cover. The `Lease` extractor refuses a
//! request without a lease; `Lease::capture` (up to the response cap) and `Lease::committed` let
//! a handler store its own record, as it would inside its transaction, and the layer then
//! stores nothing again.

mod support;

use axum::{Router, body::Body, extract::Request as AxumRequest, routing::post};
use http::{HeaderMap, Request, StatusCode, header};
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, IdempotencyStore, Lease, MemoryStore, ScopeDigest,
    StoredResponse,
};

use support::{Calls, ORG_B, TestStore, request, send};

/// A handler that answers with what it found in its request extensions.
async fn report(req: AxumRequest) -> String {
    let ext = req.extensions();
    format!(
        "key={:?} scope={:?} lease={}",
        ext.get::<IdempotencyKey>().map(|k| k.as_str().to_owned()),
        ext.get::<ScopeDigest>().map(ScopeDigest::to_hex),
        ext.get::<Lease>().is_some(),
    )
}

#[tokio::test]
async fn the_handler_reads_the_key_the_scope_digest_and_its_lease() {
    let app = Router::new()
        .route("/calls", post(report))
        .layer(IdempotencyLayer::new().post("/calls"));
    let a1 = send(&app, request("/calls", Some("\"k-1\""), "{}")).await;
    let text = a1.text().to_owned();
    assert!(
        text.starts_with("key=Some(\"k-1\") scope=Some(\""),
        "{text}"
    );
    assert!(text.ends_with("lease=true"), "{text}");

    let same_org = send(&app, request("/calls", Some("k-2"), "{}")).await;
    let other_org = send(
        &app,
        Request::post("/calls")
            .header(header::AUTHORIZATION, ORG_B)
            .header(support::KEY, "k-1")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    let scope = |text: &str| text.split(' ').nth(1).unwrap().to_owned();
    assert_eq!(scope(same_org.text()), scope(&text));
    assert_ne!(scope(other_org.text()), scope(&text));
    assert_eq!(scope(&text).len(), "scope=Some(\"\")".len() + 64);

    let keyless = send(&app, request("/calls", None, "{}")).await;
    assert_eq!(keyless.text(), "key=None scope=None lease=false");
}

/// A handler that needs a lease refuses a request without one with 500 problem+json (a
/// misconfiguration), and `Option<Lease>` takes either.
#[tokio::test]
async fn the_lease_extractor_refuses_a_request_without_a_lease() {
    let app = Router::new()
        .route(
            "/needs",
            post(|lease: Lease| async move {
                // Debug names the record and never shows the token, a capability.
                let shown = format!("{lease:?}");
                assert!(shown.starts_with("Lease { store_key: StoreKey("), "{shown}");
                assert!(
                    !shown.contains(&format!("{:x}", lease.fencing_token().0)),
                    "{shown}"
                );
                "had a lease"
            }),
        )
        .route(
            "/may",
            post(|lease: Option<Lease>| async move { format!("{}", lease.is_some()) }),
        )
        .route_layer(IdempotencyLayer::new());
    let keyless = send(&app, request("/needs", None, "{}")).await;
    keyless.assert_problem(StatusCode::INTERNAL_SERVER_ERROR, "no-lease");
    let keyed = send(&app, request("/needs", Some("k"), "{}")).await;
    assert_eq!(keyed.text(), "had a lease");
    assert_eq!(
        send(&app, request("/may", None, "{}")).await.text(),
        "false"
    );
    assert_eq!(
        send(&app, request("/may", Some("k"), "{}")).await.text(),
        "true"
    );
}

/// A handler that stores its own record (as it would inside its transaction) returns
/// `Lease::committed`: the client gets exactly the stored response, and the layer neither
/// stores it again nor releases the lease.
#[tokio::test]
async fn a_response_the_handler_stored_itself_is_not_stored_again() {
    let store = TestStore::new(MemoryStore::new());
    let handler_store = store.clone();
    let calls = Calls::default();
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move |lease: Lease| async move {
                let run = counted.hit();
                let mut headers = HeaderMap::new();
                headers.insert(header::SET_COOKIE, "session=abc".parse().unwrap());
                let response = (StatusCode::CREATED, headers, format!("created {run}"));
                let stored: StoredResponse = lease.capture(response).await.unwrap();
                let done = handler_store
                    .complete(
                        &lease.store_key(),
                        lease.fencing_token(),
                        &stored,
                        lease.ttl(),
                    )
                    .await
                    .unwrap();
                assert!(done);
                lease.committed(&stored)
            }),
        )
        .layer(IdempotencyLayer::new().post("/calls").store(store.clone()));

    let first = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "created 1");
    assert!(
        first.header("set-cookie").is_none(),
        "exactly what was stored"
    );
    assert_eq!(first.header("content-length"), Some("9"));
    assert!(!first.replayed());
    let events = store.events();
    assert_eq!((events.completes, events.releases), (1, 0), "{events:?}");

    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(calls.get(), 1);
}

/// `Lease::capture` refuses a body over the layer's response cap.
#[tokio::test]
async fn capture_refuses_a_response_over_the_cap() {
    let app = Router::new()
        .route(
            "/calls",
            post(|lease: Lease| async move {
                match lease.capture("x".repeat(11)).await {
                    Ok(_) => "stored".to_owned(),
                    Err(error) => error.to_string(),
                }
            }),
        )
        .layer(IdempotencyLayer::new().post("/calls").max_response_body(10));
    let reply = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(
        reply.text(),
        "response body larger than the limit of 10 bytes"
    );
}
