//! Adversarial inputs against what the rejection hook, `ProblemTypes`, eviction, `Outcome` and
//! the metrics' `route` label promise: each test is an input that could break a promise.

mod support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use http::StatusCode;
use support::*;
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyLayer, InFlight, MemoryStore, Outcome,
    problem::{Problem, ProblemKind},
};

/// A hook that answers every rejection `200 OK` (some APIs put errors in a 200 envelope): its
/// answers are the layer's rejections, and a rejection is never stored nor replayed.
fn always_ok(problem: Problem) -> (StatusCode, String) {
    (StatusCode::OK, format!("hook: {}", problem.kind.slug()))
}

/// A duplicate's 409, rendered 200 by the hook, is not taken for the request's outcome: once
/// the first request completes, a retry gets the first request's response.
#[tokio::test(start_paused = true)]
async fn a_2xx_rejection_from_the_hook_is_not_replayed_in_place_of_the_response() {
    let calls = Calls::default();
    let gate = Gate::default();
    let app = {
        let (calls, gate) = (calls.clone(), gate.clone());
        Router::new()
            .route(
                "/calls",
                post(move |body: Bytes| async move {
                    let run = calls.hit();
                    gate.enter().await;
                    created(run, &body)
                }),
            )
            .layer(IdempotencyLayer::new().reject_with(always_ok))
    };
    let owner = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    gate.entered(1).await;
    let duplicate = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(duplicate.status, StatusCode::OK);
    assert_eq!(duplicate.text(), "hook: in-flight");
    gate.open(1);
    assert_eq!(within(owner).await.unwrap().status, StatusCode::CREATED);
    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(calls.get(), 1);
}

/// A handler's `TransactionalError` says its transaction rolled back: nothing happened, so its
/// answer must never be stored, whatever status the hook gives it or the status policy takes.
///
/// Defect found: `TransactionalError::Database` (503) rendered `200` by a hook, or kept as 503
/// with a policy that stores every status, was stored and replayed: every retry got "the
/// database failed; nothing was committed, retry later" for the whole TTL and never ran.
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[tokio::test(start_paused = true)]
async fn a_rolled_back_transaction_is_never_stored_whatever_the_hook_or_the_policy() {
    use axum::response::IntoResponse;
    use tower_idempotency::{
        CaptureError, Lease, TransactionalError,
        store::{StoreError, StoreErrorKind},
    };

    type MakeError = fn() -> TransactionalError;
    let errors: [(&str, MakeError); 2] = [
        ("database", || {
            TransactionalError::Database(StoreError::new(StoreErrorKind::Unavailable, "down"))
        }),
        ("capture", || {
            TransactionalError::Capture(CaptureError::TooLarge { max: 1 })
        }),
    ];
    for (name, error) in errors {
        let layers = [
            ("store all", IdempotencyLayer::new().store_status(|_| true)),
            ("hook 200", IdempotencyLayer::new().reject_with(always_ok)),
        ];
        for (setting, layer) in layers {
            let calls = Calls::default();
            let counted = calls.clone();
            let app = Router::new()
                .route(
                    "/tx",
                    post(move |_lease: Lease, body: Bytes| async move {
                        match counted.hit() {
                            1 => error().into_response(),
                            run => created(run, &body),
                        }
                    }),
                )
                .layer(layer);
            let first = send(&app, request("/tx", Some("k"), "{}")).await;
            assert_ne!(first.status, StatusCode::CREATED, "{name}, {setting}");
            let retry = send(&app, request("/tx", Some("k"), "{}")).await;
            assert_eq!(
                retry.status,
                StatusCode::CREATED,
                "{name}, {setting}: the rolled-back answer was replayed: {:?}",
                retry.body
            );
            assert!(!retry.replayed(), "{name}, {setting}");
            assert_eq!(calls.get(), 2, "{name}, {setting}");
        }
    }
}

/// A hook that panics on the rejection of a duplicate does not take the owner's lease with it:
/// the owner still completes and its response is replayed, and nothing runs twice.
#[tokio::test(start_paused = true)]
async fn a_panicking_hook_does_not_disturb_the_owner() {
    let calls = Calls::default();
    let gate = Gate::default();
    let app = {
        let (calls, gate) = (calls.clone(), gate.clone());
        Router::new()
            .route(
                "/calls",
                post(move |body: Bytes| async move {
                    let run = calls.hit();
                    gate.enter().await;
                    created(run, &body)
                }),
            )
            .layer(
                IdempotencyLayer::new().reject_with(|problem: Problem| -> StatusCode {
                    panic!("hook failed on {}", problem.kind.slug())
                }),
            )
    };
    let owner = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    gate.entered(1).await;
    let duplicate = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/calls", Some("k"), "{}")).await }
    });
    assert!(within(duplicate).await.unwrap_err().is_panic());
    gate.open(1);
    assert_eq!(within(owner).await.unwrap().status, StatusCode::CREATED);
    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(retry.replayed());
    assert_eq!(calls.get(), 1);
}

/// Eviction under concurrency, with waiting duplicates: many tasks send new keys at a store
/// far smaller than their number, each key several times at once, with `InFlight::Wait`.
/// A lease is never evicted, so no two runs of one key ever overlap; every request ends with
/// the handler's 201 (run or replayed) or the store's 503 when every record is in flight;
/// and a waiting duplicate gets the run it waited for or runs after it, never beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_never_lets_two_runs_of_one_key_overlap() {
    const KEYS: usize = 40;
    const COPIES: usize = 4;
    let store = MemoryStore::builder().max_records(6).build();
    // Per key: runs in progress, and the most that ever overlapped.
    let running: Arc<Mutex<HashMap<String, (usize, usize)>>> = Arc::default();
    let app = {
        let running = running.clone();
        Router::new()
            .route(
                "/calls",
                post(move |body: String| {
                    let running = running.clone();
                    async move {
                        {
                            let mut map = running.lock().unwrap();
                            let entry = map.entry(body.clone()).or_default();
                            entry.0 += 1;
                            entry.1 = entry.1.max(entry.0);
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        running.lock().unwrap().get_mut(&body).unwrap().0 -= 1;
                        (StatusCode::CREATED, body)
                    }
                }),
            )
            .layer(
                IdempotencyLayer::new()
                    .store(store.clone())
                    .in_flight(InFlight::Wait {
                        timeout: Duration::from_secs(10),
                    }),
            )
    };
    let mut tasks = Vec::new();
    for key in 0..KEYS {
        for _ in 0..COPIES {
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                let body = format!("\"k{key}\"");
                let response = app
                    .oneshot(request("/calls", Some(&format!("k{key}")), &body))
                    .await
                    .unwrap();
                let outcome = response.extensions().get::<Outcome>().copied();
                let reply = Reply::collect(response).await;
                (body, outcome, reply)
            }));
        }
    }
    for task in tasks {
        let (body, outcome, reply) = within(task).await.unwrap();
        match reply.status {
            StatusCode::CREATED => {
                assert_eq!(reply.text(), body);
                assert!(matches!(
                    outcome,
                    Some(Outcome::Executed | Outcome::Replayed | Outcome::Waited)
                ));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(outcome, Some(Outcome::Rejected));
                assert_eq!(reply.json()["type"], ProblemKind::StoreFull.type_uri());
            }
            other => panic!("{body}: {other} {:?}", reply.body),
        }
    }
    for (key, (now, most)) in running.lock().unwrap().iter() {
        assert_eq!(*now, 0, "{key}");
        assert_eq!(*most, 1, "{key}: runs overlapped");
    }
    assert!(store.len() <= 6, "{} records", store.len());
}

/// One response larger than the whole byte bound: stored (a completion may pass the bound by
/// its own response), replayed, then evicted for the next new key rather than filling the
/// store for good.
#[tokio::test(start_paused = true)]
async fn a_response_larger_than_the_byte_bound_does_not_fill_the_store_for_good() {
    let store = MemoryStore::builder().max_bytes(64).build();
    let calls = Calls::default();
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move || async move {
                counted.hit();
                (StatusCode::CREATED, "x".repeat(10_000))
            }),
        )
        .layer(IdempotencyLayer::new().store(store.clone()));
    let first = send(&app, request("/calls", Some("big"), "{}")).await;
    assert_eq!(first.body.len(), 10_000);
    assert!(store.bytes() > 64);
    assert!(
        send(&app, request("/calls", Some("big"), "{}"))
            .await
            .replayed()
    );
    for key in ["next-1", "next-2"] {
        let reply = send(&app, request("/calls", Some(key), "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{key}");
        assert_eq!(store.len(), 1, "{key}");
    }
    assert_eq!(calls.get(), 3);
}

/// The `route` label cannot be made unbounded by the client: with the layer around a whole
/// router (no `MatchedPath`) and no allow-list, odd paths (percent-encoded, trailing slashes,
/// dot segments, long) are all `unmatched`; with an allow-list, each is its template.
#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn odd_paths_do_not_make_new_route_labels() {
    use metrics_util::debugging::DebuggingRecorder;
    use tower::Layer;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let handler = || async { StatusCode::CREATED };
    let router = Router::new()
        .route("/orgs/{org}/calls", post(handler))
        .route("/orgs/{org}/calls/", post(handler))
        .fallback(post(handler));
    let outside = IdempotencyLayer::new().layer(router.clone());
    let listed = Router::new()
        .route("/orgs/{org}/calls", post(handler))
        .layer(IdempotencyLayer::new().post("/orgs/{org}/calls"));
    let long = format!("/orgs/{}/calls", "a".repeat(2_000));
    let paths = [
        "/orgs/1/calls",
        "/orgs/%31/calls",
        "/orgs/1/calls/",
        "/orgs/1/./calls",
        "/orgs/%2F/calls",
        "/x/../orgs/1/calls",
        long.as_str(),
    ];
    for (n, path) in paths.iter().enumerate() {
        let key = format!("k{n}");
        let reply = send(&outside, request(path, Some(&key), "{}")).await;
        assert!(
            reply.status.is_success() || reply.status.is_client_error(),
            "{path}"
        );
        send(&listed, request(path, Some(&key), "{}")).await;
    }
    let mut routes: Vec<String> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "idempotency_requests_total")
        .flat_map(|(key, ..)| {
            key.key()
                .labels()
                .filter(|l| l.key() == "route")
                .map(|l| l.value().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    routes.sort();
    routes.dedup();
    assert_eq!(routes, ["/orgs/{org}/calls", "unmatched"]);
}

/// Every covered response carries its `Outcome`, the rejections of a hook included, whatever
/// extensions the hook's response had.
#[tokio::test(start_paused = true)]
async fn a_hooks_own_outcome_extension_is_replaced_by_the_layers() {
    let app = Router::new()
        .route("/calls", post(|| async { StatusCode::CREATED }))
        .layer(IdempotencyLayer::new().reject_with(|_: Problem| {
            let mut response = http::Response::new(Body::empty());
            response.extensions_mut().insert(Outcome::Executed);
            response
        }));
    let response = app
        .oneshot(request("/calls", Some("two words"), "{}"))
        .await
        .unwrap();
    assert_eq!(
        response.extensions().get::<Outcome>(),
        Some(&Outcome::Rejected)
    );
}

/// The retries of an evicted record, sent all at once with `InFlight::Wait`: one runs again,
/// the others wait for that run and replay it; never two runs.
#[tokio::test(start_paused = true)]
async fn concurrent_retries_of_an_evicted_record_run_it_once() {
    let store = MemoryStore::builder().max_records(2).build();
    let calls = Calls::default();
    let app = slow_calls_app(
        IdempotencyLayer::new()
            .store(store.clone())
            .in_flight(InFlight::Wait {
                timeout: Duration::from_secs(10),
            }),
        &calls,
        Duration::from_millis(100),
    );
    for key in ["a", "b", "c"] {
        send(&app, request("/calls", Some(key), "{}")).await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(calls.get(), 3, "a was evicted for c");
    let retries: Vec<_> = (0..5)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let response = app
                    .oneshot(request("/calls", Some("a"), "{}"))
                    .await
                    .unwrap();
                let outcome = response.extensions().get::<Outcome>().copied();
                (outcome, Reply::collect(response).await)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for retry in retries {
        let (outcome, reply) = within(retry).await.unwrap();
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.json()["run"], 4, "every retry gets the one new run");
        outcomes.push(outcome.unwrap());
    }
    assert_eq!(calls.get(), 4);
    outcomes.sort_by_key(|o| o.as_str());
    assert_eq!(
        outcomes,
        [
            Outcome::Executed,
            Outcome::Waited,
            Outcome::Waited,
            Outcome::Waited,
            Outcome::Waited
        ]
    );
}

/// A sweep interval of zero (bad input) must not kill the sweeper: expired records are still
/// swept in the background.
///
/// Defect found: `sweep_interval(Duration::ZERO)` made the sweeper task panic at its first
/// line (`tokio::time::interval` refuses a zero period), so nothing was ever swept in the
/// background and the panic message went to stderr, not to the caller.
#[tokio::test(start_paused = true)]
async fn a_zero_sweep_interval_still_sweeps() {
    use tower_idempotency::{
        IdempotencyStore,
        store::{Begin, Fingerprint, StoreKey},
    };
    let store = MemoryStore::builder()
        .sweep_interval(Duration::ZERO)
        .build();
    let Begin::Acquired(_) = store
        .begin(
            &StoreKey([1; 32]),
            &Fingerprint([2; 32]),
            Duration::from_secs(1),
        )
        .await
        .unwrap()
    else {
        panic!("a fresh key is acquired");
    };
    assert_eq!(store.len(), 1);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(store.len(), 0, "the expired lease was not swept");
}

/// A sweep interval meant as "never" (`Duration::MAX`) does not overflow tokio's clock in the
/// sweeper, and the store still works.
#[tokio::test(start_paused = true)]
async fn a_sweep_interval_of_for_ever_does_not_panic() {
    use tower_idempotency::{
        IdempotencyStore,
        store::{Begin, Fingerprint, StoreKey},
    };
    let store = MemoryStore::builder().sweep_interval(Duration::MAX).build();
    for i in 0..3u8 {
        let begun = store
            .begin(
                &StoreKey([i; 32]),
                &Fingerprint([2; 32]),
                Duration::from_secs(1),
            )
            .await
            .unwrap();
        assert!(matches!(begun, Begin::Acquired(_)));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert_eq!(store.sweep(), 3);
}

/// A hook whose body never ends but is always ready (an endless stream) gets no example, and
/// documenting the layer finishes.
///
/// Defect found: the examples were rendered by collecting the hook's whole body while it was
/// ready, so `openapi().apply` looped for ever, its memory growing without bound.
#[cfg(feature = "utoipa")]
#[test]
fn documenting_a_hook_with_an_endless_body_finishes() {
    use utoipa::openapi::{
        HttpMethod, Info, OpenApiBuilder, PathItem, Paths, Ref, ResponseBuilder,
        path::OperationBuilder,
    };

    let layer = IdempotencyLayer::new()
        .post("/calls")
        .reject_with(|problem: Problem| {
            let chunks = futures_util::stream::repeat_with(|| {
                Ok::<_, std::io::Error>(Bytes::from_static(b"endless "))
            });
            (problem.status(), Body::from_stream(chunks))
        });
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let create =
            OperationBuilder::new().response("201", ResponseBuilder::new().description("Created"));
        let mut doc = OpenApiBuilder::new()
            .info(Info::new("Calls", "1.0.0"))
            .paths(Paths::builder().path("/calls", PathItem::new(HttpMethod::Post, create)))
            .build();
        let applied = layer
            .openapi()
            .rejection_schema(Ref::from_schema_name("ApiError"))
            .apply(&mut doc);
        let _ = done.send((applied.is_ok(), doc.to_json().unwrap()));
    });
    let (ok, json) = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("openapi().apply did not finish");
    assert!(ok);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let conflict = &json["paths"]["/calls"]["post"]["responses"]["409"];
    assert!(conflict.is_object(), "{conflict}");
    assert!(
        conflict["content"]["application/json"]["examples"].is_null(),
        "{conflict}"
    );
}

/// A hook that panics while rendering a handler's `TransactionalError` (inside the run, with
/// the lease held): the panic reaches the caller, the lease is released, and the retry runs.
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[tokio::test(start_paused = true)]
async fn a_hook_panicking_inside_the_run_releases_the_lease() {
    use axum::response::IntoResponse;
    use tower_idempotency::{
        Lease, TransactionalError,
        store::{StoreError, StoreErrorKind},
    };

    let calls = Calls::default();
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/tx",
            post(move |_lease: Lease, body: Bytes| async move {
                match counted.hit() {
                    1 => TransactionalError::Database(StoreError::new(
                        StoreErrorKind::Unavailable,
                        "down",
                    ))
                    .into_response(),
                    run => created(run, &body),
                }
            }),
        )
        .layer(
            IdempotencyLayer::new().reject_with(|problem: Problem| -> StatusCode {
                panic!("hook failed on {}", problem.kind.slug())
            }),
        );
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/tx", Some("k"), "{}")).await }
    });
    assert!(within(first).await.unwrap_err().is_panic());
    let retry = send(&app, request("/tx", Some("k"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.body);
    assert_eq!(calls.get(), 2);
}
