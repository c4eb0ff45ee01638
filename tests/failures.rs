//! What the layer stores and releases when a request does not end well (the status policy,
//! panics, inner service errors), record expiry (TTL), and the trace events.

mod support;

use std::{io, time::Duration};

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use http::{Request, StatusCode};
use support::*;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_http::catch_panic::CatchPanicLayer;
use tower_idempotency::{IdempotencyLayer, KeyReuse, MemoryStore};

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
