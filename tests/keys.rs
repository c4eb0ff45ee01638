//! Keys and fingerprints, driven through axum routers: what makes two requests one request
//! (key reuse, canonical JSON, raw bodies) and which keys are accepted (validation, header names).

mod support;

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use http::{HeaderName, Method, Request, StatusCode, header};
use support::*;
use tower_idempotency::{IdempotencyLayer, KeyReuse};

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

/// Strict mode binds the key to the first request whatever its body is hashed as: raw (a text
/// body) or canonical JSON turned off. The record key is then the request key, not the
/// fingerprint, and the layer computes it only when it needs it.
#[tokio::test]
async fn strict_mode_rejects_a_different_raw_body_with_422() {
    let cases = [
        ("text body", IdempotencyLayer::new(), true),
        (
            "canonical JSON off",
            IdempotencyLayer::new().canonical_json(false),
            false,
        ),
    ];
    for (case, layer, text) in cases {
        let build = |body: &'static str| {
            if text {
                keyed(Method::POST, "/calls", "k")
                    .header(header::CONTENT_TYPE, "text/plain")
                    .body(Body::from(body))
                    .unwrap()
            } else {
                request("/calls", Some("k"), body)
            }
        };
        let calls = Calls::default();
        let app = calls_app(layer.post("/calls").key_reuse(KeyReuse::Reject), &calls);
        let first = send(&app, build(r#"{"to":"+1"}"#)).await;
        assert_eq!(first.status, StatusCode::CREATED, "{case}");
        send(&app, build(r#"{"to":"+2"}"#))
            .await
            .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused");
        assert_eq!(calls.get(), 1, "{case}: nothing ran for the different body");
        let again = send(&app, build(r#"{"to":"+1"}"#)).await;
        assert!(again.replayed(), "{case}");
        assert_eq!(again.body, first.body, "{case}");
    }
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
