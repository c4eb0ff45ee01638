//! The layer's metrics (feature `metrics`), read back from a `metrics-util` debugging recorder
//! installed as this test's thread-local recorder: each test has its own, and the tests'
//! runtimes are single-threaded, so every task a test spawns records into it.
#![cfg(all(feature = "metrics", feature = "testing"))]

mod support;

use std::{collections::BTreeMap, convert::Infallible, time::Duration};

use axum::{Router, body::Body, routing::post};
use http::{Request, Response, StatusCode};
use metrics::Unit;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::{KEY, request};
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyLayer, InFlight, KeyReuse, MemoryStore, StoreFailure,
    store::WhenFull,
    testing::{Fault, FaultyStore, StoreOp},
};

type Labels = Vec<(String, String)>;

/// What the recorder holds, by metric name, then by label set.
#[derive(Debug, Default)]
struct Recorded {
    counters: BTreeMap<String, BTreeMap<Labels, u64>>,
    histograms: BTreeMap<String, BTreeMap<Labels, Vec<f64>>>,
    units: BTreeMap<String, Option<Unit>>,
}

impl Recorded {
    fn take(snapshotter: &Snapshotter) -> Self {
        let mut recorded = Self::default();
        for (key, unit, _, value) in snapshotter.snapshot().into_vec() {
            let name = key.key().name().to_owned();
            let mut labels: Labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            recorded.units.insert(name.clone(), unit);
            match value {
                DebugValue::Counter(n) => {
                    recorded.counters.entry(name).or_default().insert(labels, n);
                }
                DebugValue::Histogram(values) => {
                    let values = values.into_iter().map(|v| v.into_inner()).collect();
                    recorded
                        .histograms
                        .entry(name)
                        .or_default()
                        .insert(labels, values);
                }
                DebugValue::Gauge(_) => {}
            }
        }
        recorded
    }

    /// Every label set of counter `name` with its count.
    fn counter(&self, name: &str) -> BTreeMap<Labels, u64> {
        self.counters.get(name).cloned().unwrap_or_default()
    }

    /// Every label set of histogram `name` with its values.
    fn histogram(&self, name: &str) -> BTreeMap<Labels, Vec<f64>> {
        self.histograms.get(name).cloned().unwrap_or_default()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    let mut labels: Labels = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    labels
}

/// `idempotency_requests_total` as it should read: `(outcome, route, count)`.
fn requests(expected: &[(&str, &str, u64)]) -> BTreeMap<Labels, u64> {
    expected
        .iter()
        .map(|(outcome, route, n)| (labels(&[("outcome", outcome), ("route", route)]), *n))
        .collect()
}

/// A create handler that takes a second (on the paused clock), so that duplicates meet it in
/// flight; `fail` in the body makes it answer 500 (not stored).
async fn slow_create(body: String) -> (StatusCode, String) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    if body.contains("fail") {
        return (StatusCode::INTERNAL_SERVER_ERROR, "failed".to_owned());
    }
    (StatusCode::CREATED, format!("created {body}"))
}

async fn call(app: &Router, req: Request<Body>) -> Response<Body> {
    let response: Result<Response<Body>, Infallible> = app.clone().oneshot(req).await;
    response.unwrap()
}

/// Sends `first`, and `second` while `first` is still running; returns both statuses.
async fn overlapping(app: &Router, first: Request<Body>, second: Request<Body>) -> [StatusCode; 2] {
    let owner = tokio::spawn({
        let app = app.clone();
        async move { call(&app, first).await.status() }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let duplicate = call(app, second).await.status();
    [owner.await.unwrap(), duplicate]
}

#[tokio::test(start_paused = true)]
async fn requests_are_counted_by_outcome_and_allow_listed_route_template() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let app = Router::new()
        .route("/orgs/{org}/calls", post(slow_create))
        .route("/voices", post(slow_create))
        .layer(IdempotencyLayer::new().post("/orgs/{org}/calls"));

    let statuses = overlapping(
        &app,
        request("/orgs/1/calls", Some("k-1"), "{}"),
        request("/orgs/1/calls", Some("k-1"), "{}"),
    )
    .await;
    assert_eq!(statuses, [StatusCode::CREATED, StatusCode::CONFLICT]);
    let replay = call(&app, request("/orgs/1/calls", Some("k-1"), "{}")).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    // Another organization's path, the same template.
    let other = call(&app, request("/orgs/2/calls", Some("k-1"), "{}")).await;
    assert_eq!(other.status(), StatusCode::CREATED);
    let keyless = call(&app, request("/orgs/1/calls", None, "{}")).await;
    assert_eq!(keyless.status(), StatusCode::CREATED);
    let invalid = call(&app, request("/orgs/1/calls", Some("two words"), "{}")).await;
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
    let no_scope = Request::post("/orgs/3/calls")
        .header(KEY, "k-1")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(
        call(&app, no_scope).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // Not covered: not counted.
    let uncovered = call(&app, request("/voices", Some("k-1"), "{}")).await;
    assert_eq!(uncovered.status(), StatusCode::CREATED);

    let recorded = Recorded::take(&snapshotter);
    let route = "/orgs/{org}/calls";
    assert_eq!(
        recorded.counter("idempotency_requests_total"),
        requests(&[
            ("executed", route, 2),
            ("conflict", route, 1),
            ("replayed", route, 1),
            ("bypassed", route, 1),
            ("rejected", route, 2),
        ])
    );
    assert_eq!(
        recorded.units["idempotency_requests_total"],
        Some(Unit::Count)
    );
}

#[tokio::test(start_paused = true)]
async fn waited_and_mismatch_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let layer = IdempotencyLayer::new()
        .post("/calls")
        .key_reuse(KeyReuse::Reject)
        .in_flight(InFlight::Wait {
            timeout: Duration::from_secs(10),
        });
    let app = Router::new()
        .route("/calls", post(slow_create))
        .layer(layer);

    let statuses = overlapping(
        &app,
        request("/calls", Some("k-1"), "{}"),
        request("/calls", Some("k-1"), "{}"),
    )
    .await;
    assert_eq!(statuses, [StatusCode::CREATED, StatusCode::CREATED]);
    let mismatch = call(&app, request("/calls", Some("k-1"), r#"{"other":1}"#)).await;
    assert_eq!(mismatch.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let recorded = Recorded::take(&snapshotter);
    assert_eq!(
        recorded.counter("idempotency_requests_total"),
        requests(&[
            ("executed", "/calls", 1),
            ("waited", "/calls", 1),
            ("mismatch", "/calls", 1),
        ])
    );
}

/// Without an allow-list, the route is axum's `MatchedPath` (under `route_layer`, or
/// `Router::layer` for a matched route), and `unmatched` when there is none (the fallback).
#[tokio::test(start_paused = true)]
async fn the_route_is_the_matched_path_or_unmatched() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let routed = Router::new()
        .route("/users/{id}/calls", post(slow_create))
        .route_layer(IdempotencyLayer::new());
    let layered = Router::new()
        .route("/agents/{id}", post(slow_create))
        .fallback(post(slow_create))
        .layer(IdempotencyLayer::new());

    for id in ["u1", "u2"] {
        let path = format!("/users/{id}/calls");
        let response = call(&routed, request(&path, Some("k-1"), "{}")).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let matched = call(&layered, request("/agents/a1", Some("k-1"), "{}")).await;
    assert_eq!(matched.status(), StatusCode::CREATED);
    let fallback = call(&layered, request("/no/such/route", Some("k-1"), "{}")).await;
    assert_eq!(fallback.status(), StatusCode::CREATED);

    let recorded = Recorded::take(&snapshotter);
    assert_eq!(
        recorded.counter("idempotency_requests_total"),
        requests(&[
            ("executed", "/users/{id}/calls", 2),
            ("executed", "/agents/{id}", 1),
            ("executed", "unmatched", 1),
        ])
    );
}

/// The allow-list's template comes before axum's `MatchedPath`: a layer on a nested router
/// lists the path inside it, while the matched path is the whole one.
#[tokio::test(start_paused = true)]
async fn the_allow_listed_template_comes_before_the_matched_path() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let inner = Router::new()
        .route("/calls/{id}", post(slow_create))
        .layer(IdempotencyLayer::new().post("/calls/{id}"));
    let app = Router::new().nest("/v1", inner);
    let response = call(&app, request("/v1/calls/7", Some("k-1"), "{}")).await;
    assert_eq!(response.status(), StatusCode::CREATED);

    let recorded = Recorded::take(&snapshotter);
    assert_eq!(
        recorded.counter("idempotency_requests_total"),
        requests(&[("executed", "/calls/{id}", 1)])
    );
}

/// Every store call of the layer is timed under its `op`, in seconds on tokio's clock.
#[tokio::test(start_paused = true)]
async fn store_calls_are_timed_per_op() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let store = FaultyStore::new(MemoryStore::new());
    store.set(StoreOp::Begin, Fault::Delay(Duration::from_millis(250)));
    // A lease of 1.2 s is renewed every 0.4 s: twice while a handler takes 1 s.
    let layer = IdempotencyLayer::new()
        .post("/calls")
        .store(store.clone())
        .lease(Duration::from_millis(1200));
    let drain = layer.drain_handle();
    let app = Router::new()
        .route("/calls", post(slow_create))
        .layer(layer);

    let created = call(&app, request("/calls", Some("k-1"), "{}")).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let failed = call(&app, request("/calls", Some("k-2"), r#"{"fail":1}"#)).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    drain.wait(Duration::from_secs(5)).await.unwrap();

    let recorded = Recorded::take(&snapshotter);
    let durations = recorded.histogram("idempotency_store_duration_seconds");
    let op = |op: &str| durations[&labels(&[("op", op)])].clone();
    assert_eq!(
        durations.keys().cloned().collect::<Vec<_>>(),
        ["begin", "complete", "release", "renew"].map(|op| labels(&[("op", op)]))
    );
    // Two requests: two begins, each delayed by a quarter second.
    let begins = op("begin");
    assert_eq!(begins.len(), 2);
    assert!(
        begins.iter().all(|s| (0.25..0.26).contains(s)),
        "{begins:?}"
    );
    assert_eq!(op("complete").len(), 1, "the 201 is stored");
    assert_eq!(op("release").len(), 1, "the 500's lease is released");
    assert_eq!(op("renew").len(), 4, "two renewals per request");
    assert_eq!(store.calls(StoreOp::Renew), 4);
    assert_eq!(
        recorded.units["idempotency_store_duration_seconds"],
        Some(Unit::Seconds)
    );
    assert!(
        recorded
            .counter("idempotency_store_errors_total")
            .is_empty()
    );
}

/// A failed store call is counted under its `op` and the error's `kind`.
#[tokio::test(start_paused = true)]
async fn store_errors_are_counted_by_op_and_kind() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let store = FaultyStore::new(MemoryStore::new());
    let layer = IdempotencyLayer::new()
        .post("/calls")
        .store(store.clone())
        .store_timeout(Duration::from_millis(100));
    let drain = layer.drain_handle();
    let app = Router::new()
        .route("/calls", post(slow_create))
        .layer(layer);

    store.set(StoreOp::Begin, Fault::Fail);
    let unavailable = call(&app, request("/calls", Some("k-1"), "{}")).await;
    assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
    store.set(StoreOp::Begin, Fault::Hang);
    let timed_out = call(&app, request("/calls", Some("k-1"), "{}")).await;
    assert_eq!(timed_out.status(), StatusCode::SERVICE_UNAVAILABLE);
    store.clear();
    store.set(StoreOp::Release, Fault::Hang);
    let failed = call(&app, request("/calls", Some("k-2"), r#"{"fail":1}"#)).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    drain.wait(Duration::from_secs(5)).await.unwrap();

    // A full store.
    let full = Router::new().route("/calls", post(slow_create)).layer(
        IdempotencyLayer::new()
            .post("/calls")
            .store(
                MemoryStore::builder()
                    .max_records(1)
                    .when_full(WhenFull::Refuse)
                    .build(),
            )
            .on_store_error(StoreFailure::FailOpen),
    );
    assert_eq!(
        call(&full, request("/calls", Some("k-1"), "{}"))
            .await
            .status(),
        StatusCode::CREATED
    );
    let refused = call(&full, request("/calls", Some("k-2"), "{}")).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);

    let recorded = Recorded::take(&snapshotter);
    let errors = |pairs: &[(&str, &str, u64)]| -> BTreeMap<Labels, u64> {
        pairs
            .iter()
            .map(|(op, kind, n)| (labels(&[("op", op), ("kind", kind)]), *n))
            .collect()
    };
    assert_eq!(
        recorded.counter("idempotency_store_errors_total"),
        errors(&[
            ("begin", "unavailable", 1),
            ("begin", "timeout", 1),
            ("begin", "full", 1),
            ("release", "timeout", 1),
        ])
    );
    assert_eq!(
        recorded.counter("idempotency_requests_total"),
        requests(&[("rejected", "/calls", 3), ("executed", "/calls", 2),])
    );
    // A failed call is timed too: the hanging ones for the store timeout.
    let durations = recorded.histogram("idempotency_store_duration_seconds");
    let release = &durations[&labels(&[("op", "release")])];
    assert_eq!(release, &[0.1]);
}

/// Each later try of `complete` after a failed one is a completion retry.
#[tokio::test(start_paused = true)]
async fn completion_retries_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let store = FaultyStore::new(MemoryStore::new());
    let layer = IdempotencyLayer::new().post("/calls").store(store.clone());
    let drain = layer.drain_handle();
    let app = Router::new()
        .route("/calls", post(slow_create))
        .layer(layer);

    store.set(StoreOp::Complete, Fault::Fail);
    let created = call(&app, request("/calls", Some("k-1"), "{}")).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    // Tries after 50, 100, 200 and 400 ms fail; the one after 800 ms more succeeds.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    store.clear();
    drain.wait(Duration::from_secs(5)).await.unwrap();
    assert_eq!(store.calls(StoreOp::Complete), 6);

    let recorded = Recorded::take(&snapshotter);
    assert_eq!(
        recorded.counter("idempotency_completion_retries_total"),
        BTreeMap::from([(Labels::new(), 5)])
    );
    assert_eq!(
        recorded.counter("idempotency_store_errors_total"),
        BTreeMap::from([(labels(&[("op", "complete"), ("kind", "unavailable")]), 5)])
    );
    assert_eq!(
        recorded.histogram("idempotency_store_duration_seconds")[&labels(&[("op", "complete")])]
            .len(),
        6
    );
}

/// A handler that panicked ran: `executed`, counted before the panic goes on outward.
#[tokio::test(start_paused = true)]
async fn a_panicking_handler_is_counted_as_executed() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let app = Router::new()
        .route(
            "/calls",
            post(|| async {
                panic!("the handler failed");
                #[allow(unreachable_code)]
                ""
            }),
        )
        .layer(IdempotencyLayer::new().post("/calls"))
        .layer(tower_http::catch_panic::CatchPanicLayer::new());

    let response = call(&app, request("/calls", Some("k-1"), "{}")).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);

    let recorded = Recorded::take(&snapshotter);
    assert_eq!(
        recorded.counter("idempotency_requests_total"),
        requests(&[("executed", "/calls", 1)])
    );
}

/// An inner service's error is counted with the outcome of the run that failed: `executed`
/// under a lease, `bypassed` when it ran unprotected.
#[tokio::test(start_paused = true)]
async fn an_inner_service_error_is_counted_with_its_run() {
    use tower::Layer;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let failing = tower::service_fn(|_: Request<Body>| async {
        Err::<Response<Body>, std::io::Error>(std::io::Error::other("inner failure"))
    });
    let store = FaultyStore::new(MemoryStore::new());
    let layer = IdempotencyLayer::new()
        .store(store.clone())
        .on_store_error(StoreFailure::FailOpen);
    let svc = layer.layer(failing);

    let error = svc
        .clone()
        .oneshot(request("/calls", Some("k-1"), "{}"))
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "inner failure");
    store.set(StoreOp::Begin, Fault::Fail);
    let error = svc
        .oneshot(request("/calls", Some("k-2"), "{}"))
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "inner failure");

    let recorded = Recorded::take(&snapshotter);
    // No router: no template, no `MatchedPath`.
    assert_eq!(
        recorded.counter("idempotency_requests_total"),
        requests(&[("executed", "unmatched", 1), ("bypassed", "unmatched", 1)])
    );
}
