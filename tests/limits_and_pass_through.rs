//! Limits (request and response bodies) and pass-through (routes and methods the layer does not
//! cover, requests that stream), driven through axum routers.

mod support;

use std::{
    convert::Infallible,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{Router, body::Body, extract::Request as AxumRequest, routing::post};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use support::*;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_idempotency::IdempotencyLayer;

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
