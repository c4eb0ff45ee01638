//! Behaviour of the layer, driven through axum routers with `tower::ServiceExt::oneshot`:
//! replay fidelity, scoping, key validation and reuse, fingerprints, limits, pass-through,
//! the status policy, failures that release the lease, TTL, and tracing.

mod support;

use std::{
    convert::Infallible,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::Request as AxumRequest,
    routing::{get, post},
};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http::{HeaderName, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use support::*;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_http::catch_panic::CatchPanicLayer;
use tower_idempotency::{IdempotencyLayer, KeyReuse, MemoryStore, MissingScope};

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
// Key reuse and fingerprints

#[tokio::test]
async fn by_default_a_different_body_is_a_new_request() {
    let calls = Calls::default();
    let app = calls_app(IdempotencyLayer::new().post("/calls"), &calls);
    let a = send(&app, request("/calls", Some("k"), r#"{"to":"+1"}"#)).await;
    let b = send(&app, request("/calls", Some("k"), r#"{"to":"+2"}"#)).await;
    assert_eq!(calls.get(), 2);
    assert_eq!(b.status, StatusCode::CREATED);
    assert!(!b.replayed());
    let a_again = send(&app, request("/calls", Some("k"), r#"{"to":"+1"}"#)).await;
    let b_again = send(&app, request("/calls", Some("k"), r#"{"to":"+2"}"#)).await;
    assert_eq!(calls.get(), 2, "each body has its own record");
    assert!(a_again.replayed() && b_again.replayed());
    assert_eq!(a_again.body, a.body);
    assert_eq!(b_again.body, b.body);
}

#[tokio::test]
async fn strict_mode_rejects_a_different_body_with_422() {
    let calls = Calls::default();
    let app = calls_app(
        IdempotencyLayer::new()
            .post("/calls")
            .key_reuse(KeyReuse::Reject),
        &calls,
    );
    let first = send(&app, request("/calls", Some("k"), r#"{"to":"+1"}"#)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    send(&app, request("/calls", Some("k"), r#"{"to":"+2"}"#))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused");
    assert_eq!(calls.get(), 1);
    let again = send(&app, request("/calls", Some("k"), r#"{"to":"+1"}"#)).await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
}

#[tokio::test]
async fn strict_mode_rejects_a_different_body_while_the_first_is_in_flight() {
    let gate = Gate::default();
    let calls = Calls::default();
    let (g, c) = (gate.clone(), calls.clone());
    let app = Router::new()
        .route(
            "/calls",
            post(move |b: Bytes| async move {
                let run = c.hit();
                g.enter().await;
                created(run, &b)
            }),
        )
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .key_reuse(KeyReuse::Reject),
        );
    let owner = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), r#"{"to":"+1"}"#)).await }
    });
    gate.entered(1).await;
    send(&app, request("/calls", Some("k"), r#"{"to":"+2"}"#))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused");
    assert_eq!(calls.get(), 1, "nothing ran for the mismatched request");
    gate.open(1);
    let owner = within(owner).await.unwrap();
    assert_eq!(owner.status, StatusCode::CREATED);
    let replay = send(&app, request("/calls", Some("k"), r#"{"to":"+1"}"#)).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, owner.body);
}

#[tokio::test]
async fn json_key_order_and_whitespace_do_not_change_the_fingerprint() {
    for mode in [KeyReuse::NewRequest, KeyReuse::Reject] {
        let calls = Calls::default();
        let app = calls_app(
            IdempotencyLayer::new().post("/calls").key_reuse(mode),
            &calls,
        );
        let first = send(
            &app,
            request("/calls", Some("k"), r#"{"b":1,"a":{"y":[1,2],"x":null}}"#),
        )
        .await;
        let reordered = send(
            &app,
            request(
                "/calls",
                Some("k"),
                "{ \"a\" : { \"x\" : null , \"y\" : [ 1 , 2 ] } ,\n\t\"b\" : 1 }",
            ),
        )
        .await;
        assert_eq!(calls.get(), 1, "{mode:?}");
        assert!(reordered.replayed());
        assert_eq!(reordered.body, first.body);
        // Array order is significant.
        let swapped = send(
            &app,
            request("/calls", Some("k"), r#"{"b":1,"a":{"y":[2,1],"x":null}}"#),
        )
        .await;
        assert!(!swapped.replayed(), "{mode:?}");
    }
}

#[tokio::test]
async fn without_canonical_json_a_reordered_body_is_a_new_request() {
    let calls = Calls::default();
    let app = calls_app(
        IdempotencyLayer::new().post("/calls").canonical_json(false),
        &calls,
    );
    send(&app, request("/calls", Some("k"), r#"{"a":1,"b":2}"#)).await;
    assert!(
        send(&app, request("/calls", Some("k"), r#"{"a":1,"b":2}"#))
            .await
            .replayed()
    );
    let reordered = send(&app, request("/calls", Some("k"), r#"{"b":2,"a":1}"#)).await;
    assert!(!reordered.replayed());
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn json_with_a_structured_suffix_is_canonicalized_too() {
    let calls = Calls::default();
    let app = calls_app(IdempotencyLayer::new().post("/calls"), &calls);
    let with_type = |body: &str| {
        keyed(Method::POST, "/calls", "k")
            .header(
                header::CONTENT_TYPE,
                "application/merge-patch+json; charset=utf-8",
            )
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    send(&app, with_type(r#"{"a":1,"b":2}"#)).await;
    let replay = send(&app, with_type(r#"{"b":2, "a":1}"#)).await;
    assert!(replay.replayed());
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn non_json_bodies_are_hashed_raw() {
    let calls = Calls::default();
    let app = calls_app(IdempotencyLayer::new().post("/calls"), &calls);
    let text = |body: &str| {
        keyed(Method::POST, "/calls", "k")
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    send(&app, text(r#"{"a":1,"b":2}"#)).await;
    let reordered = send(&app, text(r#"{"b":2,"a":1}"#)).await;
    let spaced = send(&app, text(r#"{"a":1, "b":2}"#)).await;
    assert!(!reordered.replayed() && !spaced.replayed());
    assert_eq!(calls.get(), 3, "text bodies differ by their bytes");
    let same = send(&app, text(r#"{"a":1,"b":2}"#)).await;
    assert!(same.replayed());
    assert_eq!(calls.get(), 3);
}

// ---------------------------------------------------------------------------------------------
// Key validation

fn with_key_value(value: http::HeaderValue) -> Request<Body> {
    Request::post("/calls")
        .header(header::AUTHORIZATION, ORG_A)
        .header(KEY, value)
        .body(Body::from("{}"))
        .unwrap()
}

#[tokio::test]
async fn invalid_keys_get_400_and_nothing_runs() {
    let calls = Calls::default();
    let app = calls_app(IdempotencyLayer::new().post("/calls"), &calls);
    let too_long = "k".repeat(256);
    for value in [
        raw_header(b""),
        raw_header(too_long.as_bytes()),
        raw_header("caf\u{e9}".as_bytes()),
        raw_header(b"\x80\x81"),
        raw_header(b"has space"),
        raw_header(b"\"unterminated"),
    ] {
        let reply = send(&app, with_key_value(value.clone())).await;
        reply.assert_problem(StatusCode::BAD_REQUEST, "invalid-key");
    }
    let two_fields = Request::post("/calls")
        .header(header::AUTHORIZATION, ORG_A)
        .header(KEY, "one")
        .header(KEY, "two")
        .body(Body::from("{}"))
        .unwrap();
    send(&app, two_fields)
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid-key");
    assert_eq!(calls.get(), 0);

    let longest = "k".repeat(255);
    let ok = send(&app, with_key_value(raw_header(longest.as_bytes()))).await;
    assert_eq!(ok.status, StatusCode::CREATED, "255 characters is allowed");
}

#[tokio::test]
async fn a_structured_field_string_is_the_same_key_as_its_content() {
    let calls = Calls::default();
    let app = calls_app(IdempotencyLayer::new().post("/calls"), &calls);
    let first = send(&app, with_key_value(raw_header(b"abc"))).await;
    let quoted = send(&app, with_key_value(raw_header(b"\"abc\""))).await;
    assert_eq!(calls.get(), 1);
    assert!(quoted.replayed());
    assert_eq!(quoted.body, first.body);
}

#[tokio::test]
async fn a_required_key_gives_400_when_missing() {
    let calls = Calls::default();
    let app = calls_app(
        IdempotencyLayer::new().post("/calls").require_key(true),
        &calls,
    );
    send(&app, request("/calls", None, "{}"))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid-key");
    assert_eq!(calls.get(), 0);

    // Without `require_key`, no key means pass through: each request runs.
    let optional = calls_app(IdempotencyLayer::new().post("/calls"), &calls);
    for _ in 0..2 {
        let reply = send(&optional, request("/calls", None, "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
    }
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn by_default_both_the_x_and_the_ietf_header_names_carry_the_key() {
    let calls = Calls::default();
    let app = calls_app(IdempotencyLayer::new().post("/calls"), &calls);
    let with = |names: &[&str]| {
        let mut builder = Request::post("/calls").header(header::AUTHORIZATION, ORG_A);
        for name in names {
            builder = builder.header(*name, "same-key");
        }
        builder.body(Body::from("{}")).unwrap()
    };
    send(&app, with(&["Idempotency-Key"])).await;
    assert!(send(&app, with(&["Idempotency-Key"])).await.replayed());
    assert_eq!(calls.get(), 1);
    // Either name is the same key: a client that switches names still gets its replay.
    assert!(send(&app, with(&["X-Idempotency-Key"])).await.replayed());
    // Both at once is ambiguous: 400, nothing runs.
    let both = send(&app, with(&["X-Idempotency-Key", "Idempotency-Key"])).await;
    both.assert_problem(StatusCode::BAD_REQUEST, "invalid-key");
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_missing_required_key_names_the_header_to_send() {
    let calls = Calls::default();
    let app = calls_app(
        IdempotencyLayer::new().post("/calls").require_key(true),
        &calls,
    );
    let reply = send(&app, request("/calls", None, "{}")).await;
    reply.assert_problem(StatusCode::BAD_REQUEST, "invalid-key");
    let detail = reply.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains("x-idempotency-key or idempotency-key"),
        "{detail}"
    );
}

#[tokio::test]
async fn the_header_name_is_configurable() {
    let calls = Calls::default();
    let app = calls_app(
        IdempotencyLayer::new()
            .post("/calls")
            .header_name(HeaderName::from_static("idempotency-key")),
        &calls,
    );
    let ietf = || {
        Request::post("/calls")
            .header(header::AUTHORIZATION, ORG_A)
            .header(
                "Idempotency-Key",
                "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"",
            )
            .body(Body::from("{}"))
            .unwrap()
    };
    send(&app, ietf()).await;
    assert!(send(&app, ietf()).await.replayed());
    assert_eq!(calls.get(), 1);
    // The default header name is now just another header.
    send(&app, request("/calls", Some("k"), "{}")).await;
    let again = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(!again.replayed());
    assert_eq!(calls.get(), 3);
}

// ---------------------------------------------------------------------------------------------
// Limits

/// A 1 MiB request body in 1 KiB chunks, without a declared length, that counts the bytes
/// pulled from it.
fn counted_body(pulled: &Arc<AtomicUsize>) -> Body {
    let pulled = pulled.clone();
    Body::from_stream(
        stream::repeat_with(move || {
            pulled.fetch_add(1024, Ordering::SeqCst);
            Ok::<_, Infallible>(Bytes::from(vec![b'x'; 1024]))
        })
        .take(1024),
    )
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_limit_gets_413_without_reading_past_the_limit() {
    let limit = 10_000;
    let calls = Calls::default();
    let app = calls_app(
        IdempotencyLayer::new()
            .post("/calls")
            .max_request_body(limit),
        &calls,
    );

    // Streamed (no Content-Length): stops at the first chunk over the limit.
    let pulled = Arc::new(AtomicUsize::new(0));
    let streamed = keyed(Method::POST, "/calls", "k")
        .body(counted_body(&pulled))
        .unwrap();
    send(&app, streamed)
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large");
    let read = pulled.load(Ordering::SeqCst);
    assert!(read > limit && read <= limit + 1024, "read {read} bytes");

    // A declared Content-Length over the limit: rejected before reading anything.
    let pulled = Arc::new(AtomicUsize::new(0));
    let declared = keyed(Method::POST, "/calls", "k2")
        .header(header::CONTENT_LENGTH, "1000000")
        .body(counted_body(&pulled))
        .unwrap();
    send(&app, declared)
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large");
    assert_eq!(pulled.load(Ordering::SeqCst), 0);

    // Exactly the limit is fine, declared or not.
    let at_limit = keyed(Method::POST, "/calls", "k3")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, limit)
        .body(Body::from(vec![b'x'; limit]))
        .unwrap();
    assert_eq!(send(&app, at_limit).await.status, StatusCode::CREATED);
    let undeclared = keyed(Method::POST, "/calls", "k4")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from(vec![b'x'; limit]))
        .unwrap();
    assert_eq!(send(&app, undeclared).await.status, StatusCode::CREATED);
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn a_body_that_fails_while_read_gets_400_and_nothing_runs() {
    let calls = Calls::default();
    let app = calls_app(IdempotencyLayer::new().post("/calls"), &calls);
    let chunks = [
        Ok(Bytes::from_static(b"{\"to\":")),
        Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "client went away",
        )),
    ];
    let req = keyed(Method::POST, "/calls", "k")
        .body(Body::from_stream(stream::iter(chunks)))
        .unwrap();
    send(&app, req)
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "body-unreadable");
    assert_eq!(calls.get(), 0);
    // Nothing was recorded: the same key runs once the body arrives whole.
    let whole = send(&app, request("/calls", Some("k"), r#"{"to":1}"#)).await;
    assert_eq!(whole.status, StatusCode::CREATED);
    assert!(!whole.replayed());
}

#[tokio::test]
async fn the_handler_sees_the_buffered_body_unchanged() {
    let app = Router::new()
        .route("/calls", post(|body: Bytes| async move { body }))
        .layer(IdempotencyLayer::new().post("/calls"));
    let body: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let chunks: Vec<Result<Bytes, Infallible>> = body
        .chunks(777)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let req = keyed(Method::POST, "/calls", "k")
        .body(Body::from_stream(stream::iter(chunks)))
        .unwrap();
    assert_eq!(send(&app, req).await.body, body);
}

#[tokio::test]
async fn an_oversized_response_is_sent_whole_but_not_stored() {
    let cap = 1024;
    let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let calls = Calls::default();
    let (c1, c2, b1, b2) = (calls.clone(), calls.clone(), big.clone(), big.clone());
    let app = Router::new()
        // A body whose size is known up front.
        .route(
            "/calls",
            post(move || async move {
                c1.hit();
                (StatusCode::CREATED, b1)
            }),
        )
        // A streamed body that crosses the cap in the middle of a chunk.
        .route(
            "/agents",
            post(move || async move {
                c2.hit();
                let chunks: Vec<Result<Bytes, Infallible>> = b2
                    .chunks(700)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                (StatusCode::CREATED, Body::from_stream(stream::iter(chunks)))
            }),
        )
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .post("/agents")
                .max_response_body(cap),
        );
    for path in ["/calls", "/agents"] {
        let before = calls.get();
        let first = send(&app, request(path, Some("k"), "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert_eq!(first.body, big, "{path}: the whole body is sent, in order");
        let retry = send(&app, request(path, Some("k"), "{}")).await;
        assert!(!retry.replayed(), "{path}: not stored");
        assert_eq!(retry.body, big);
        assert_eq!(calls.get(), before + 2, "{path}: the lease was released");
    }
}

#[tokio::test]
async fn a_response_of_exactly_the_cap_is_stored_and_one_byte_more_is_not() {
    // Bodies of known size: the size hint alone decides, before a byte is read.
    let cap = 1024;
    for (len, stored) in [(cap, true), (cap + 1, false)] {
        let calls = Calls::default();
        let c = calls.clone();
        let body = vec![b'x'; len];
        let app = Router::new()
            .route(
                "/calls",
                post(move || {
                    let (c, body) = (c.clone(), body.clone());
                    async move {
                        c.hit();
                        (StatusCode::CREATED, body)
                    }
                }),
            )
            .layer(
                IdempotencyLayer::new()
                    .post("/calls")
                    .max_response_body(cap),
            );
        let first = send(&app, request("/calls", Some("k"), "{}")).await;
        assert_eq!(first.body.len(), len);
        let retry = send(&app, request("/calls", Some("k"), "{}")).await;
        assert_eq!(
            retry.replayed(),
            stored,
            "{len} bytes against a cap of {cap}"
        );
        assert_eq!(retry.body.len(), len);
        assert_eq!(calls.get(), if stored { 1 } else { 2 });
    }
}

#[tokio::test]
async fn a_streamed_response_is_measured_chunk_by_chunk_against_the_cap() {
    // No size hint: the cap is checked as the chunks arrive. One chunk past the cap on its
    // own, and two chunks that reach it exactly together.
    let cap = 1024;
    let cases: [(Vec<usize>, bool); 3] = [
        (vec![cap + 1], false),
        (vec![cap / 2, cap / 2], true),
        (vec![cap / 2, cap / 2 + 1], false),
    ];
    for (chunks, stored) in cases {
        let calls = Calls::default();
        let c = calls.clone();
        let sizes = chunks.clone();
        let app = Router::new()
            .route(
                "/calls",
                post(move || {
                    let (c, sizes) = (c.clone(), sizes.clone());
                    async move {
                        c.hit();
                        let parts: Vec<Result<Bytes, Infallible>> = sizes
                            .iter()
                            .map(|n| Ok(Bytes::from(vec![b'y'; *n])))
                            .collect();
                        (StatusCode::CREATED, Body::from_stream(stream::iter(parts)))
                    }
                }),
            )
            .layer(
                IdempotencyLayer::new()
                    .post("/calls")
                    .max_response_body(cap),
            );
        let total: usize = chunks.iter().sum();
        let first = send(&app, request("/calls", Some("k"), "{}")).await;
        assert_eq!(first.body.len(), total);
        let retry = send(&app, request("/calls", Some("k"), "{}")).await;
        assert_eq!(
            retry.replayed(),
            stored,
            "chunks {chunks:?} against a cap of {cap}"
        );
        assert_eq!(retry.body.len(), total);
    }
}

#[tokio::test]
async fn the_response_future_says_which_path_the_request_took() {
    let mut svc =
        IdempotencyLayer::new()
            .post("/calls")
            .layer(service_fn(|_req: Request<Body>| async {
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }));
    let get = Request::get("/calls").body(Body::empty()).unwrap();
    let future = svc.ready().await.unwrap().call(get);
    assert_eq!(
        format!("{future:?}"),
        r#"ResponseFuture { kind: "passthrough" }"#
    );
    let post = request("/calls", Some("k"), "{}");
    let future = svc.ready().await.unwrap().call(post);
    assert_eq!(
        format!("{future:?}"),
        r#"ResponseFuture { kind: "covered" }"#
    );
}

// ---------------------------------------------------------------------------------------------
// Pass-through

/// A request body fed by the test through a channel; it ends only when the sender is dropped.
fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let body = stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    (tx, Body::from_stream(body))
}

/// A handler that answers with the first chunk of its request body, without waiting for the
/// rest, and streams its own response from a channel.
async fn first_chunk(req: AxumRequest) -> Response<Body> {
    let mut stream = req.into_body().into_data_stream();
    let first = stream.next().await.unwrap().unwrap();
    // Keep reading in the background so the test's sender is never blocked.
    tokio::spawn(async move { while stream.next().await.is_some() {} });
    Response::new(Body::from(first))
}

#[tokio::test(start_paused = true)]
async fn unlisted_routes_and_get_pass_through_with_bodies_unread() {
    let calls = Calls::default();
    let (c1, c2) = (calls.clone(), calls.clone());
    let app = Router::new()
        .route(
            "/calls",
            post(move |b: Bytes| async move { created(c1.hit(), &b) }).get(first_chunk),
        )
        .route("/voices", post(first_chunk))
        .route(
            "/knowledge-bases",
            post(move |b: Bytes| async move { created(c2.hit(), &b) }),
        )
        .layer(IdempotencyLayer::new().post("/calls"));

    // The request body is still streaming when the handler answers: nothing buffered it.
    for (method, path) in [(Method::POST, "/voices"), (Method::GET, "/calls")] {
        let (tx, body) = channel_body();
        tx.send(Bytes::from_static(b"first chunk")).await.unwrap();
        let req = keyed(method.clone(), path, "k").body(body).unwrap();
        let reply = send(&app, req).await;
        assert_eq!(reply.body, "first chunk", "{method} {path}");
        assert!(!reply.replayed());
        drop(tx);
    }

    // A covered route without a key passes through the same way.
    let (tx, body) = channel_body();
    tx.send(Bytes::from_static(b"no key")).await.unwrap();
    let app_no_key = Router::new()
        .route("/calls", post(first_chunk))
        .layer(IdempotencyLayer::new().post("/calls"));
    let req = Request::post("/calls")
        .header(header::AUTHORIZATION, ORG_A)
        .body(body)
        .unwrap();
    assert_eq!(send(&app_no_key, req).await.body, "no key");
    drop(tx);

    // The key header is ignored on unlisted routes: every request runs.
    for _ in 0..2 {
        let reply = send(&app, request("/knowledge-bases", Some("k"), "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
    }
    assert_eq!(calls.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn pass_through_responses_stream() {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let app = Router::new()
        .route(
            "/voices",
            post(move || async move {
                let rx = rx.lock().unwrap().take().unwrap();
                let body = stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
                });
                Body::from_stream(body)
            }),
        )
        .layer(IdempotencyLayer::new().post("/calls"));
    let response = within(app.oneshot(request("/voices", Some("k"), "{}")))
        .await
        .unwrap();
    tx.send(Bytes::from_static(b"streamed")).await.unwrap();
    let mut body = response.into_body();
    let frame = within(body.frame()).await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "streamed");
}

#[tokio::test]
async fn allow_list_templates_match_through_matched_path() {
    // The layer runs inside a nested router: the URI it sees has the prefix stripped, so only
    // the `MatchedPath` ("/api/orgs/{org_id}/calls") can match the listed template.
    let calls = Calls::default();
    let (c1, c2) = (calls.clone(), calls.clone());
    let inner = Router::new()
        .route(
            "/orgs/{org_id}/calls",
            post(move |b: Bytes| async move { created(c1.hit(), &b) }),
        )
        .route(
            "/orgs/{org_id}/voices",
            post(move |b: Bytes| async move { created(c2.hit(), &b) }),
        )
        .layer(IdempotencyLayer::new().post("/api/orgs/{org_id}/calls"));
    let app = Router::new().nest("/api", inner);

    send(&app, request("/api/orgs/7/calls", Some("k"), "{}")).await;
    let replay = send(&app, request("/api/orgs/7/calls", Some("k"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(calls.get(), 1);
    // Another org id is another path, so another record.
    assert!(
        !send(&app, request("/api/orgs/8/calls", Some("k"), "{}"))
            .await
            .replayed()
    );
    // Not listed.
    send(&app, request("/api/orgs/7/voices", Some("k"), "{}")).await;
    assert!(
        !send(&app, request("/api/orgs/7/voices", Some("k"), "{}"))
            .await
            .replayed()
    );
    assert_eq!(calls.get(), 4);
}

#[tokio::test]
async fn allow_list_templates_match_the_uri_path_outside_a_router() {
    // Wrapped around the whole router, the layer sees no `MatchedPath`.
    let calls = Calls::default();
    let (c1, c2) = (calls.clone(), calls.clone());
    let router = Router::new()
        .route(
            "/orgs/{org_id}/calls",
            post(move |b: Bytes| async move { created(c1.hit(), &b) }),
        )
        .route(
            "/orgs/{org_id}/voices",
            post(move |b: Bytes| async move { created(c2.hit(), &b) }),
        );
    let app = ServiceBuilder::new()
        .layer(IdempotencyLayer::new().post("/orgs/{org_id}/calls"))
        .service(router);

    send(&app, request("/orgs/7/calls", Some("k"), "{}")).await;
    assert!(
        send(&app, request("/orgs/7/calls", Some("k"), "{}"))
            .await
            .replayed()
    );
    send(&app, request("/orgs/7/voices", Some("k"), "{}")).await;
    assert!(
        !send(&app, request("/orgs/7/voices", Some("k"), "{}"))
            .await
            .replayed()
    );
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
async fn without_an_allow_list_every_post_is_covered_and_only_post() {
    let calls = Calls::default();
    let (c1, c2) = (calls.clone(), calls.clone());
    let app = Router::new()
        .route(
            "/anything",
            post(move |b: Bytes| async move { created(c1.hit(), &b) })
                .put(move |b: Bytes| async move { created(c2.hit(), &b) }),
        )
        .route_layer(IdempotencyLayer::new());
    send(&app, request("/anything", Some("k"), "{}")).await;
    assert!(
        send(&app, request("/anything", Some("k"), "{}"))
            .await
            .replayed()
    );
    let put = || {
        keyed(Method::PUT, "/anything", "k")
            .body(Body::from("{}"))
            .unwrap()
    };
    send(&app, put()).await;
    assert!(!send(&app, put()).await.replayed());
    assert_eq!(calls.get(), 3);
}

// ---------------------------------------------------------------------------------------------
// Status policy, panics and errors

/// A handler answering the status given in its JSON body as `{"status": N}`.
fn status_app(layer: IdempotencyLayer, calls: &Calls) -> Router {
    let calls = calls.clone();
    Router::new()
        .route(
            "/calls",
            post(move |body: Bytes| async move {
                let run = calls.hit();
                let spec: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let status = StatusCode::from_u16(spec["status"].as_u64().unwrap() as u16).unwrap();
                (status, format!("run {run}"))
            }),
        )
        .layer(layer)
}

#[tokio::test]
async fn server_errors_timeouts_and_rate_limits_are_not_stored() {
    for status in [500, 502, 503, 408, 429] {
        let calls = Calls::default();
        let app = status_app(IdempotencyLayer::new().post("/calls"), &calls);
        let body = format!(r#"{{"status":{status}}}"#);
        let first = send(&app, request("/calls", Some("k"), &body)).await;
        assert_eq!(first.status.as_u16(), status);
        let retry = send(&app, request("/calls", Some("k"), &body)).await;
        assert_eq!(retry.status.as_u16(), status);
        assert!(!retry.replayed(), "{status}");
        assert_eq!(
            retry.body, "run 2",
            "{status}: the retry runs again at once"
        );
    }
    // Any other status is stored.
    let calls = Calls::default();
    let app = status_app(IdempotencyLayer::new().post("/calls"), &calls);
    send(&app, request("/calls", Some("k"), r#"{"status":400}"#)).await;
    let retry = send(&app, request("/calls", Some("k"), r#"{"status":400}"#)).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, "run 1");
}

#[tokio::test]
async fn a_custom_status_policy_replaces_the_default() {
    let calls = Calls::default();
    let app = status_app(
        IdempotencyLayer::new()
            .post("/calls")
            .store_status(|status| {
                status.is_success() || status == StatusCode::SERVICE_UNAVAILABLE
            }),
        &calls,
    );
    // 404 is no longer stored...
    send(&app, request("/calls", Some("k"), r#"{"status":404}"#)).await;
    let retry = send(&app, request("/calls", Some("k"), r#"{"status":404}"#)).await;
    assert!(!retry.replayed());
    assert_eq!(calls.get(), 2);
    // ...and 503 now is.
    send(&app, request("/calls", Some("k"), r#"{"status":503}"#)).await;
    let retry = send(&app, request("/calls", Some("k"), r#"{"status":503}"#)).await;
    assert!(retry.replayed());
    assert_eq!(retry.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.get(), 3);
}

async fn panic_releases_the_lease(run_to_completion: bool) {
    let calls = Calls::default();
    let counter = calls.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move |b: Bytes| async move {
                let run = counter.hit();
                if run == 1 {
                    panic!("handler failed on purpose");
                }
                created(run, &b)
            }),
        )
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .run_to_completion(run_to_completion),
        )
        .layer(CatchPanicLayer::new());
    let first = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "the retry runs at once");
    assert!(!retry.replayed());
    assert_eq!(calls.get(), 2);
    assert!(
        send(&app, request("/calls", Some("k"), "{}"))
            .await
            .replayed()
    );
}

#[tokio::test]
async fn a_panic_releases_the_lease() {
    panic_releases_the_lease(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_releases_the_lease_before_the_500_is_sent() {
    // On a multi-threaded runtime nothing orders a background release before the retry.
    for _ in 0..50 {
        panic_releases_the_lease(true).await;
    }
}

#[tokio::test]
async fn a_panic_releases_the_lease_without_run_to_completion() {
    panic_releases_the_lease(false).await;
}

#[tokio::test]
async fn an_inner_service_error_releases_the_lease() {
    let calls = Calls::default();
    let counter = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new().post("/calls"))
        .service(service_fn(move |_req: Request<Body>| {
            let run = counter.hit();
            async move {
                if run == 1 {
                    Err(io::Error::other("connection to the database lost"))
                } else {
                    Ok(created(run, b"{}"))
                }
            }
        }));
    let error = svc
        .clone()
        .oneshot(request("/calls", Some("k"), "{}"))
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "connection to the database lost");
    let retry = svc
        .clone()
        .oneshot(request("/calls", Some("k"), "{}"))
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(calls.get(), 2);
    let replay = Reply::collect(
        svc.oneshot(request("/calls", Some("k"), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert!(replay.replayed());
}

// ---------------------------------------------------------------------------------------------
// TTL

#[tokio::test(start_paused = true)]
async fn an_expired_record_is_not_replayed_and_a_replay_does_not_extend_it() {
    // No sweeping during the test: expiry is decided on read.
    let store = MemoryStore::builder()
        .sweep_interval(Duration::from_secs(24 * 3600))
        .build();
    let calls = Calls::default();
    let app = calls_app(
        IdempotencyLayer::new()
            .post("/calls")
            .store(store.clone())
            .ttl(Duration::from_secs(10)),
        &calls,
    );
    send(&app, request("/calls", Some("k"), "{}")).await;
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(
        send(&app, request("/calls", Some("k"), "{}"))
            .await
            .replayed()
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    let after = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(!after.replayed(), "11 s after completion, with a 10 s TTL");
    assert_eq!(calls.get(), 2);
    assert_eq!(after.header("location"), Some("/calls/2"));
}

#[tokio::test(start_paused = true)]
async fn expired_records_are_reclaimed_without_being_read() {
    let store = MemoryStore::new();
    let calls = Calls::default();
    let app = calls_app(
        IdempotencyLayer::new()
            .post("/calls")
            .store(store.clone())
            .ttl(Duration::from_secs(10)),
        &calls,
    );
    for key in ["a", "b", "c"] {
        send(&app, request("/calls", Some(key), "{}")).await;
    }
    assert_eq!(store.len(), 3);
    tokio::time::advance(Duration::from_secs(9)).await;
    settle().await;
    assert_eq!(store.len(), 3, "nothing expired yet");
    // Past the TTL and one sweep interval.
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(store.len(), 0, "the sweeper reclaimed the records");
    assert_eq!(store.bytes(), 0);
}

/// Lets spawned tasks (the sweeper) run without moving the paused clock.
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tracing

#[tokio::test]
async fn one_trace_event_per_covered_request_with_its_outcome_and_no_secrets() {
    // A current-thread runtime: the layer's tasks run on this thread, so its events are ours.
    capture_trace();

    let key = "very-secret-key-6b1f";
    let gate = Gate::default();
    let calls = Calls::default();
    let (g, c) = (gate.clone(), calls.clone());
    let app = Router::new()
        .route(
            "/calls",
            post(move |b: Bytes| async move {
                let run = c.hit();
                if b.as_ref() == b"{\"slow\":true}" {
                    g.enter().await;
                }
                created(run, &b)
            }),
        )
        .route("/voices", post(|| async { "not covered" }))
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .key_reuse(KeyReuse::Reject),
        );

    let outcome_of = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|line| line.contains("outcome"))
            .map(|line| {
                let at = line.find("outcome=").expect("outcome field") + "outcome=".len();
                line[at..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_matches('"')
                    .to_owned()
            })
            .collect()
    };
    let mut all = String::new();
    let mut step = |reply_log: String, expected: &[&str]| {
        assert_eq!(outcome_of(&reply_log), expected, "log: {reply_log:?}");
        all.push_str(&reply_log);
    };

    send(&app, request("/calls", Some(key), "{}")).await;
    step(take_trace(), &["executed"]);
    send(&app, request("/calls", Some(key), "{}")).await;
    step(take_trace(), &["replayed"]);
    send(&app, request("/calls", Some(key), r#"{"other":1}"#)).await;
    step(take_trace(), &["mismatch"]);
    send(&app, request("/calls", Some("bad key"), "{}")).await;
    step(take_trace(), &["rejected"]);
    send(&app, request("/calls", None, "{}")).await;
    step(take_trace(), &["bypassed"]);
    send(&app, request("/voices", Some(key), "{}")).await;
    step(take_trace(), &[]);

    let owner = tokio::spawn({
        let app = app.clone();
        async move {
            send(
                &app,
                request("/calls", Some("slow-key"), r#"{"slow":true}"#),
            )
            .await
        }
    });
    gate.entered(1).await;
    send(
        &app,
        request("/calls", Some("slow-key"), r#"{"slow":true}"#),
    )
    .await;
    step(take_trace(), &["conflict"]);
    gate.open(1);
    within(owner).await.unwrap();
    step(take_trace(), &["executed"]);

    // A response over the capture cap is sent with a warning.
    let big = Router::new()
        .route("/calls", post(|| async { vec![b'x'; 64] }))
        .layer(IdempotencyLayer::new().post("/calls").max_response_body(16));
    send(&big, request("/calls", Some(key), "{}")).await;
    let log = take_trace();
    assert!(
        log.lines()
            .any(|line| line.contains("WARN") && line.contains("capture limit")),
        "{log}"
    );
    step(log, &["executed"]);

    // Failing open is loud.
    let store = TestStore::new(MemoryStore::new());
    store.set_faults(|f| f.begin = Fault::Fail);
    let open = Router::new()
        .route("/calls", post(|| async { "ran" }))
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .store(store)
                .on_store_error(tower_idempotency::StoreFailure::FailOpen),
        );
    send(&open, request("/calls", Some(key), "{}")).await;
    let log = take_trace();
    assert!(
        log.lines()
            .any(|line| line.contains("WARN") && line.contains("WITHOUT idempotency protection")),
        "{log}"
    );
    step(log, &["bypassed"]);

    for secret in [key, "slow-key", "org_a_secret"] {
        assert!(!all.contains(secret), "the trace leaks {secret:?}:\n{all}");
    }
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
