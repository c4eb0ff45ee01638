//! Behaviour of the layer, driven through axum routers with `tower::ServiceExt::oneshot`:
//! replay fidelity, scoping, and the service's plumbing. Keys and fingerprints are in
//! `keys.rs`, limits and pass-through in `limits_and_pass_through.rs`, the status policy,
//! failures, TTL and tracing in `failures.rs`.

mod support;

use std::{convert::Infallible, time::Duration};

use axum::{
    Router,
    body::Body,
    routing::{get, post},
};
use bytes::Bytes;
use futures_util::stream;
use http::{Method, Request, Response, StatusCode, header};
use support::*;
use tower::{ServiceBuilder, service_fn};
use tower_idempotency::{IdempotencyLayer, MissingScope};

// ---------------------------------------------------------------------------------------------
// Replay fidelity

/// A 201 whose every part is checked on replay: kept headers (Location, ETag, Content-Type, a
/// repeated field in order, a non-UTF-8 value), dropped headers (Set-Cookie, Date), and a binary
/// body.
fn rich_response(run: usize) -> Response<Body> {
    let body: Vec<u8> = (0..=255u8).chain([run as u8, 0, 0xff]).collect();
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::LOCATION, format!("/calls/{run}"))
        .header(header::ETAG, format!("\"v{run}\""))
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::SET_COOKIE, "session=abc; HttpOnly")
        .header(header::DATE, "Sun, 06 Nov 1994 08:49:37 GMT")
        .header("x-multi", "first")
        .header("x-multi", "second")
        .header("x-multi", "third")
        .header("x-raw", raw_header(b"\x80\xffraw"))
        .body(Body::from(body))
        .unwrap()
}

#[tokio::test]
async fn replay_returns_the_same_status_headers_and_bytes() {
    let calls = Calls::default();
    let counter = calls.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move || async move { rich_response(counter.hit()) }),
        )
        .layer(IdempotencyLayer::new().post("/calls"));

    let first = send(&app, request("/calls", Some("k-rich"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(
        !first.replayed(),
        "a first response is not marked as a replay"
    );
    assert!(first.headers.contains_key(header::SET_COOKIE));

    let replay = send(&app, request("/calls", Some("k-rich"), "{}")).await;
    assert_eq!(calls.get(), 1, "the retry must not run the handler");
    assert!(replay.replayed());
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.body, first.body, "binary body byte-exact");
    for name in [header::LOCATION, header::ETAG, header::CONTENT_TYPE] {
        assert_eq!(
            replay.headers.get(&name),
            first.headers.get(&name),
            "{name}"
        );
    }
    assert_eq!(replay.header("location"), Some("/calls/1"));
    let multi: Vec<_> = replay.headers.get_all("x-multi").iter().collect();
    assert_eq!(
        multi,
        ["first", "second", "third"],
        "repeated field in order"
    );
    assert_eq!(replay.headers["x-raw"].as_bytes(), b"\x80\xffraw");
    assert!(!replay.headers.contains_key(header::SET_COOKIE));
    assert!(!replay.headers.contains_key(header::DATE));
    assert_eq!(
        replay.header("content-length"),
        Some(replay.body.len().to_string().as_str())
    );
}

#[tokio::test]
async fn replay_keeps_every_stored_status() {
    for (status, body) in [
        (StatusCode::ACCEPTED, &b"queued"[..]),
        (StatusCode::NO_CONTENT, b""),
        (StatusCode::NOT_FOUND, b"{\"error\":\"no such agent\"}"),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            b"{\"error\":\"bad phone\"}",
        ),
        (StatusCode::CONFLICT, b"{\"error\":\"exists\"}"),
    ] {
        let calls = Calls::default();
        let counter = calls.clone();
        let app = Router::new()
            .route(
                "/calls",
                post(move || async move {
                    counter.hit();
                    (status, Bytes::from_static(body))
                }),
            )
            .layer(IdempotencyLayer::new().post("/calls"));
        let first = send(&app, request("/calls", Some("k"), "{}")).await;
        let replay = send(&app, request("/calls", Some("k"), "{}")).await;
        assert_eq!(calls.get(), 1, "{status} must be stored and replayed");
        assert_eq!(first.status, status);
        assert!(!first.replayed());
        assert!(replay.replayed(), "{status}");
        assert_eq!(replay.status, status);
        assert_eq!(replay.body, body, "{status}");
        assert_eq!(
            replay.headers.get("content-type"),
            first.headers.get("content-type")
        );
        if status == StatusCode::NO_CONTENT {
            // The layer sets none on a 204; axum's router adds `0` for any empty body, to
            // the first response and the replay alike.
            assert!(replay.body.is_empty());
            assert_eq!(
                replay.header("content-length"),
                first.header("content-length")
            );
        } else {
            assert_eq!(
                replay.header("content-length"),
                Some(body.len().to_string().as_str())
            );
        }
    }
}

#[tokio::test]
async fn the_replay_carries_one_content_length_matching_its_body() {
    // A bare service, not a router (axum's router would add a Content-Length of its own): the
    // handler streams its body and declares the length itself.
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new().post("/calls"))
        .service(service_fn(|_req: Request<Body>| async {
            let chunks = [
                Ok::<_, Infallible>(Bytes::from("hel")),
                Ok(Bytes::from("lo")),
            ];
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header(header::CONTENT_LENGTH, "5")
                    .body(Body::from_stream(stream::iter(chunks)))
                    .unwrap(),
            )
        }));
    send(&svc, request("/calls", Some("k-len"), "{}")).await;
    let replay = send(&svc, request("/calls", Some("k-len"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, "hello");
    let lengths: Vec<_> = replay
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .collect();
    assert_eq!(lengths, ["5"]);
}

// ---------------------------------------------------------------------------------------------
// Scope

#[tokio::test]
async fn keys_are_scoped_by_organization() {
    let calls = Calls::default();
    let app = calls_app(IdempotencyLayer::new().post("/calls"), &calls);
    let as_org = |auth: &str| {
        Request::post("/calls")
            .header(header::AUTHORIZATION, auth)
            .header(KEY, "shared-key")
            .body(Body::from("{}"))
            .unwrap()
    };
    let a = send(&app, as_org(ORG_A)).await;
    let b = send(&app, as_org(ORG_B)).await;
    assert_eq!(
        calls.get(),
        2,
        "another organization's key is another record"
    );
    assert!(!b.replayed());
    assert_ne!(a.body, b.body);
    let a_again = send(&app, as_org(ORG_A)).await;
    let b_again = send(&app, as_org(ORG_B)).await;
    assert_eq!(calls.get(), 2);
    assert_eq!((a_again.body, b_again.body), (a.body, b.body));
}

#[tokio::test]
async fn keys_are_scoped_by_path_and_method() {
    let calls = Calls::default();
    let (c1, c2) = (calls.clone(), calls.clone());
    let app = Router::new()
        .route(
            "/calls",
            post(move |b: Bytes| async move { created(c1.hit(), &b) })
                .put(move |b: Bytes| async move { created(c2.hit(), &b) }),
        )
        .route(
            "/agents",
            post({
                let c = calls.clone();
                move |b: Bytes| async move { created(c.hit(), &b) }
            }),
        )
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .post("/agents")
                .route("/calls", Method::PUT),
        );
    let put = |path: &str| {
        keyed(Method::PUT, path, "same-key")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = send(&app, request("/calls", Some("same-key"), "{}")).await;
    let other_path = send(&app, request("/agents", Some("same-key"), "{}")).await;
    let other_method = send(&app, put("/calls")).await;
    assert_eq!(calls.get(), 3, "path and method are part of the record");
    assert!(!other_path.replayed() && !other_method.replayed());
    for (req, expected) in [
        (request("/calls", Some("same-key"), "{}"), &first),
        (request("/agents", Some("same-key"), "{}"), &other_path),
        (put("/calls"), &other_method),
    ] {
        let replay = send(&app, req).await;
        assert!(replay.replayed());
        assert_eq!(replay.body, expected.body);
    }
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn a_key_without_credentials_gets_401_and_nothing_runs() {
    let calls = Calls::default();
    let app = calls_app(IdempotencyLayer::new().post("/calls"), &calls);
    let anonymous = || {
        Request::post("/calls")
            .header(KEY, "k")
            .body(Body::from("{}"))
            .unwrap()
    };
    let reply = send(&app, anonymous()).await;
    reply.assert_problem(StatusCode::UNAUTHORIZED, "missing-scope");
    assert_eq!(calls.get(), 0);
    // Two Authorization fields are no identity either (never a shared bucket).
    let two = Request::post("/calls")
        .header(KEY, "k")
        .header(header::AUTHORIZATION, ORG_A)
        .header(header::AUTHORIZATION, ORG_B)
        .body(Body::from("{}"))
        .unwrap();
    send(&app, two)
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "missing-scope");
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn missing_scope_can_pass_through_unprotected() {
    let calls = Calls::default();
    let app = calls_app(
        IdempotencyLayer::new()
            .post("/calls")
            .missing_scope(MissingScope::PassThrough),
        &calls,
    );
    for _ in 0..2 {
        let reply = send(
            &app,
            Request::post("/calls")
                .header(KEY, "k")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
    }
    assert_eq!(
        calls.get(),
        2,
        "unprotected: no record is shared between anonymous callers"
    );
}

// ---------------------------------------------------------------------------------------------
// Service plumbing

#[tokio::test]
async fn the_layer_wraps_a_single_route_with_route_layer() {
    let calls = Calls::default();
    let (c1, c2) = (calls.clone(), calls.clone());
    let app = Router::new()
        .route(
            "/calls",
            post(move |b: Bytes| async move { created(c1.hit(), &b) })
                .route_layer(IdempotencyLayer::new()),
        )
        .route("/health", get(|| async { "ok" }))
        .route(
            "/voices",
            post(move |b: Bytes| async move { created(c2.hit(), &b) }),
        );
    send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(
        send(&app, request("/calls", Some("k"), "{}"))
            .await
            .replayed()
    );
    send(&app, request("/voices", Some("k"), "{}")).await;
    assert!(
        !send(&app, request("/voices", Some("k"), "{}"))
            .await
            .replayed()
    );
    assert_eq!(calls.get(), 3);
}

#[test]
fn durations_past_100_years_are_cut_to_100_years() {
    // 100 years of 365 days, the documented cut, so that adding them to a clock never
    // overflows.
    let layer = IdempotencyLayer::new()
        .ttl(Duration::MAX)
        .lease(Duration::MAX);
    let shown = format!("{layer:?}");
    assert!(shown.contains("ttl: 3153600000s"), "{shown}");
    assert!(shown.contains("lease: 3153600000s"), "{shown}");
    let within = format!(
        "{:?}",
        IdempotencyLayer::new().ttl(Duration::from_secs(3_153_599_999))
    );
    assert!(within.contains("ttl: 3153599999s"), "{within}");
}

#[test]
fn the_defaults_are_the_documented_ones() {
    let shown = format!("{:?}", IdempotencyLayer::new());
    for field in [
        "lease: 60s",
        "ttl: 86400s",
        "max_request_body: 2097152",
        "max_response_body: 4194304",
        "store_timeout: 2s",
        "reject_with: false",
    ] {
        assert!(shown.contains(field), "{field} in {shown}");
    }
    assert_eq!(
        tower_idempotency::DEFAULT_MAX_RESPONSE_BODY,
        4 * 1024 * 1024
    );
    assert_eq!(
        tower_idempotency::DEFAULT_COMPLETION_DEADLINE,
        Duration::from_secs(5 * 60)
    );
}

#[test]
fn a_key_never_shows_in_debug_output() {
    let key = tower_idempotency::IdempotencyKey::parse(b"secret-key-123").unwrap();
    assert_eq!(key.as_str(), "secret-key-123");
    assert_eq!(format!("{key:?}"), "IdempotencyKey(..)");
}
