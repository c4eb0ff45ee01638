//! The cost of the layer per request, side by side with the bare router and with
//! `axum-idempotent`, all driven in process through `tower::ServiceExt::oneshot` in one run so
//! that the ratios hold on a noisy machine.
//!
//! ```text
//! cargo bench --bench layer
//! cargo bench --bench layer -- replay      # one group
//! ```
//!
//! Groups (every one has its `bare` baseline: the same router and handler with no layer):
//!
//! - `passthrough`: a POST to an unlisted route, and a POST to a listed route with no key;
//!   `axum_idempotent_no_key` is the peer's own pass-through (its key-header mode, no key);
//!   `bare_noop_layer` is the bare router with a layer that does nothing (axum's own cost of a
//!   layer).
//! - `first_request`: execute and store, a fresh key and a new body (one field changed) each
//!   iteration, 1 KiB JSON body; also ours with the body sent as `text/plain` (hashed as sent,
//!   no canonical JSON) and ours with `run_to_completion(false)` (no task per request), to show
//!   where the time goes.
//! - `replay`: the same request again, answered from the store.
//! - `body_size`: first request and replay at 1 KiB, 64 KiB and 1 MiB JSON bodies.
//! - `fingerprint`: the body digest alone at those sizes, canonical JSON and raw.
//! - `contention`: 64 concurrent requests on a multi-threaded runtime, all with one key or
//!   each with its own.
//! - `metrics` (only with `--features metrics`, which builds the layer with its metrics): no
//!   key, first request and replay, each without a recorder (the facade's no-op) and with a
//!   Prometheus recorder (`metrics-exporter-prometheus`) installed for the bench's thread.
//!   `cargo bench -p tower-idempotency-benches --features metrics --bench layer -- metrics`
//!
//! The peer (`axum-idempotent`) runs in its hashing mode (method, path, headers and body hashed
//! with BLAKE3), behind the session and cookie layers it needs, with an in-memory (`moka`)
//! session store and a session created beforehand, so that it really caches. Its session store
//! keeps every cached response of a session in one map and scans that map on every write, so a
//! session that has stored n responses pays O(n) for the next one; the first-request bench
//! starts a new session every 64 requests (untimed) so that it measures the per-request cost
//! rather than that scan.

use std::time::{Duration, Instant};

use axum::{
    Router,
    body::Bytes,
    http::{HeaderValue, StatusCode, header},
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tower_idempotency_benches::{
    KIB, bare, fresh_key, json_body, new_session, noop_layer, ours, ours_with, peer, request,
    runtime, send, unique_body,
};

/// A new peer session after this many first requests (see the module docs).
const PEER_SESSION_REQUESTS: u64 = 64;

// ---------------------------------------------------------------------------------------------
// Shapes of measurement.

/// What one timed request is made of.
#[derive(Clone, Copy)]
enum Shape {
    /// The same request every time (pass-through, replay, bare).
    Same,
    /// A fresh key and body every time (first requests).
    FreshKey,
    /// The same, sent as `text/plain`: the body is hashed as sent, not canonicalized.
    FreshKeyText,
}

/// Times `iters` requests built by `shape`, one at a time; request building and (for the peer)
/// session creation are not timed.
async fn timed(
    app: &Router,
    path: &str,
    key: Option<&str>,
    peer_session: bool,
    shape: Shape,
    body: &Bytes,
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut cookie = None;
    for i in 0..iters {
        if peer_session
            && (cookie.is_none() || matches!(shape, Shape::FreshKey))
            && i % PEER_SESSION_REQUESTS == 0
        {
            cookie = Some(new_session(app).await);
        }
        let req = match shape {
            Shape::Same => request(path, key, cookie.as_ref(), body),
            Shape::FreshKey | Shape::FreshKeyText => {
                let (key, n) = fresh_key();
                let mut req = request(path, Some(&key), cookie.as_ref(), &unique_body(body, n));
                if matches!(shape, Shape::FreshKeyText) {
                    req.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                }
                req
            }
        };
        let start = Instant::now();
        let response = send(app, req).await;
        total += start.elapsed();
        assert_eq!(response.0, StatusCode::CREATED, "a bench request failed");
    }
    total
}

/// Stores a response for `key` (peer: in a new session) and checks that the next identical
/// request is a replay. Returns the peer's cookie.
async fn prime_replay(
    app: &Router,
    key: &str,
    peer_session: bool,
    body: &Bytes,
) -> Option<HeaderValue> {
    let cookie = if peer_session {
        Some(new_session(app).await)
    } else {
        None
    };
    let (status, replayed, _) =
        send(app, request("/calls", Some(key), cookie.as_ref(), body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed, "the first request must execute");
    let (status, replayed, _) =
        send(app, request("/calls", Some(key), cookie.as_ref(), body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed, "the second request must be a replay");
    cookie
}

async fn timed_replay(
    app: &Router,
    cookie: Option<&HeaderValue>,
    key: &str,
    body: &Bytes,
    iters: u64,
    replay: bool,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let req = request("/calls", Some(key), cookie, body);
        let start = Instant::now();
        let response = send(app, req).await;
        total += start.elapsed();
        assert_eq!(response.0, StatusCode::CREATED, "a bench request failed");
        assert_eq!(
            response.1, replay,
            "a replay where none was expected, or none"
        );
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Benches.

fn passthrough(c: &mut Criterion) {
    let rt = runtime();
    let (bare, noop, ours, peer_key) =
        rt.block_on(async { (bare(), noop_layer(), ours(), peer(true)) });
    let body = json_body(KIB);
    let mut group = c.benchmark_group("passthrough");
    group.measurement_time(Duration::from_secs(3));

    group.bench_function("bare", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            timed(
                &bare,
                "/voices",
                Some("unlisted-key"),
                false,
                Shape::Same,
                &body,
                iters,
            )
        })
    });
    group.bench_function("bare_noop_layer", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            timed(
                &noop,
                "/voices",
                Some("unlisted-key"),
                false,
                Shape::Same,
                &body,
                iters,
            )
        })
    });
    group.bench_function("unlisted_route", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            timed(
                &ours,
                "/voices",
                Some("unlisted-key"),
                false,
                Shape::Same,
                &body,
                iters,
            )
        })
    });
    group.bench_function("no_key", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed(&ours, "/calls", None, false, Shape::Same, &body, iters))
    });
    group.bench_function("axum_idempotent_no_key", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed(&peer_key, "/calls", None, true, Shape::Same, &body, iters))
    });
    group.finish();
}

fn first_request(c: &mut Criterion) {
    let rt = runtime();
    let body = json_body(KIB);
    let mut group = c.benchmark_group("first_request");
    group.measurement_time(Duration::from_secs(3));
    // Each variant's router is built for its benches and dropped after them: a store holding
    // the hundreds of thousands of records of one variant's run must not be in the process
    // while another variant is timed (it slowed the peer measured after ours by up to a third).
    let timed_on = |group: &mut criterion::BenchmarkGroup<'_, _>,
                    name: &str,
                    app: &Router,
                    peer: bool,
                    shape: Shape| {
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter_custom(|iters| timed(app, "/calls", None, peer, shape, &body, iters))
        });
    };
    timed_on(&mut group, "bare", &bare(), false, Shape::FreshKey);
    {
        let ours = rt.block_on(async {
            let ours = ours();
            prime_replay(&ours, &fresh_key().0, false, &body).await;
            ours
        });
        timed_on(
            &mut group,
            "tower_idempotency",
            &ours,
            false,
            Shape::FreshKey,
        );
    }
    {
        let peer_hash = rt.block_on(async {
            let peer_hash = peer(false);
            // The peer caches first requests in this setup.
            prime_replay(&peer_hash, &fresh_key().0, true, &body).await;
            peer_hash
        });
        timed_on(
            &mut group,
            "axum_idempotent",
            &peer_hash,
            true,
            Shape::FreshKey,
        );
    }
    // Where our first request's time goes: without canonical JSON, and without the task that
    // lets the handler finish when the client goes away.
    timed_on(
        &mut group,
        "tower_idempotency_text_body",
        &rt.block_on(async { ours() }),
        false,
        Shape::FreshKeyText,
    );
    timed_on(
        &mut group,
        "tower_idempotency_no_run_to_completion",
        &rt.block_on(async { ours_with(|layer| layer.run_to_completion(false)) }),
        false,
        Shape::FreshKey,
    );
    group.finish();
}

fn replay(c: &mut Criterion) {
    let rt = runtime();
    let (bare, ours, peer_hash) = rt.block_on(async { (bare(), ours(), peer(false)) });
    let body = json_body(KIB);
    let (peer_cookie, ..) = rt.block_on(async {
        (
            prime_replay(&peer_hash, "replay-key", true, &body).await,
            prime_replay(&ours, "replay-key", false, &body).await,
        )
    });
    let mut group = c.benchmark_group("replay");
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("bare", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed_replay(&bare, None, "replay-key", &body, iters, false))
    });
    group.bench_function("tower_idempotency", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| timed_replay(&ours, None, "replay-key", &body, iters, true))
    });
    group.bench_function("axum_idempotent", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            timed_replay(
                &peer_hash,
                peer_cookie.as_ref(),
                "replay-key",
                &body,
                iters,
                true,
            )
        })
    });
    group.finish();
}

fn body_size(c: &mut Criterion) {
    let rt = runtime();
    let (bare, ours) = rt.block_on(async { (bare(), ours()) });
    let mut group = c.benchmark_group("body_size");
    for (label, size) in [("1KiB", KIB), ("64KiB", 64 * KIB), ("1MiB", 1024 * KIB)] {
        let body = json_body(size);
        let key = format!("replay-{label}");
        rt.block_on(prime_replay(&ours, &key, false, &body));
        group.throughput(Throughput::Bytes(body.len() as u64));
        if size >= 1024 * KIB {
            group.sample_size(20);
            group.measurement_time(Duration::from_secs(4));
        } else {
            group.sample_size(50);
            group.measurement_time(Duration::from_secs(2));
        }
        group.bench_with_input(BenchmarkId::new("bare", label), &body, |b, body| {
            b.to_async(&rt).iter_custom(|iters| {
                timed(&bare, "/calls", None, false, Shape::FreshKey, body, iters)
            })
        });
        group.bench_with_input(
            BenchmarkId::new("first_request", label),
            &body,
            |b, body| {
                b.to_async(&rt).iter_custom(|iters| {
                    timed(&ours, "/calls", None, false, Shape::FreshKey, body, iters)
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("replay", label), &body, |b, body| {
            b.to_async(&rt)
                .iter_custom(|iters| timed_replay(&ours, None, &key, body, iters, true))
        });
    }
    group.finish();
}

/// The body's share of a covered request: canonical JSON and SHA-256 (`json`), or SHA-256 of
/// the bytes as sent (`raw`).
fn fingerprint(c: &mut Criterion) {
    let mut group = c.benchmark_group("fingerprint");
    group.measurement_time(Duration::from_secs(2));
    for (label, size) in [("1KiB", KIB), ("64KiB", 64 * KIB), ("1MiB", 1024 * KIB)] {
        let body = json_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        if size >= 1024 * KIB {
            group.sample_size(20);
        } else {
            group.sample_size(50);
        }
        group.bench_with_input(BenchmarkId::new("json", label), &body, |b, body| {
            b.iter(|| tower_idempotency::fingerprint::body_digest(body, true))
        });
        group.bench_with_input(BenchmarkId::new("raw", label), &body, |b, body| {
            b.iter(|| tower_idempotency::fingerprint::body_digest(body, false))
        });
    }
    group.finish();
}

/// 64 requests at once on a multi-threaded runtime; the time is for all 64.
fn contention(c: &mut Criterion) {
    const TASKS: usize = 64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (bare, ours) = rt.block_on(async { (bare(), ours()) });
    let body = json_body(KIB);

    async fn burst(app: &Router, body: &Bytes, one_key: bool, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let shared = fresh_key();
            let requests: Vec<_> = (0..TASKS)
                .map(|_| {
                    let (key, n) = if one_key { shared.clone() } else { fresh_key() };
                    request("/calls", Some(&key), None, &unique_body(body, n))
                })
                .collect();
            let start = Instant::now();
            let tasks: Vec<_> = requests
                .into_iter()
                .map(|req| {
                    let app = app.clone();
                    tokio::spawn(async move { send(&app, req).await.0 })
                })
                .collect();
            for task in tasks {
                std::hint::black_box(task.await.unwrap());
            }
            total += start.elapsed();
        }
        total
    }

    let mut group = c.benchmark_group("contention");
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(TASKS as u64));
    group.bench_function("bare_64_tasks", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| burst(&bare, &body, false, iters))
    });
    group.bench_function("one_key_64_tasks", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| burst(&ours, &body, true, iters))
    });
    group.bench_function("64_keys_64_tasks", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| burst(&ours, &body, false, iters))
    });
    group.finish();
}

/// The layer built with its metrics (feature `metrics`), without a recorder and with a
/// Prometheus recorder for this thread (the runtime is single-threaded, so the layer's tasks
/// record into it too).
#[cfg(feature = "metrics")]
fn with_metrics(c: &mut Criterion) {
    let rt = runtime();
    let (bare, ours) = rt.block_on(async { (bare(), ours()) });
    let body = json_body(KIB);
    rt.block_on(prime_replay(&ours, "metrics-replay-key", false, &body));
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let mut group = c.benchmark_group("metrics");
    group.measurement_time(Duration::from_secs(3));
    for prometheus in [false, true] {
        let _local = prometheus.then(|| metrics::set_default_local_recorder(&recorder));
        let suffix = if prometheus {
            "_prometheus"
        } else {
            "_no_recorder"
        };
        group.bench_function(format!("bare{suffix}"), |b| {
            b.to_async(&rt)
                .iter_custom(|iters| timed(&bare, "/calls", None, false, Shape::Same, &body, iters))
        });
        group.bench_function(format!("no_key{suffix}"), |b| {
            b.to_async(&rt)
                .iter_custom(|iters| timed(&ours, "/calls", None, false, Shape::Same, &body, iters))
        });
        group.bench_function(format!("first_request{suffix}"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                timed(&ours, "/calls", None, false, Shape::FreshKey, &body, iters)
            })
        });
        group.bench_function(format!("replay{suffix}"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                timed_replay(&ours, None, "metrics-replay-key", &body, iters, true)
            })
        });
    }
    // What the layer records for one first request, alone: the request counter with its two
    // labels (the route an allow-list template, shared), and two store calls timed on tokio's
    // clock into the histogram. Tight CPU work, so less noisy than whole requests.
    {
        let _local = metrics::set_default_local_recorder(&recorder);
        let route: std::sync::Arc<str> = std::sync::Arc::from("/calls");
        group.bench_function("recording_of_a_first_request_prometheus", |b| {
            b.to_async(&rt).iter(|| async {
                for op in ["begin", "complete"] {
                    let started = tokio::time::Instant::now();
                    metrics::histogram!("idempotency_store_duration_seconds", "op" => op)
                        .record(started.elapsed().as_secs_f64());
                }
                metrics::counter!(
                    "idempotency_requests_total",
                    "outcome" => "executed",
                    "route" => metrics::SharedString::from(route.clone()),
                )
                .increment(1);
            })
        });
    }
    // The recorder saw every request.
    assert!(
        recorder
            .handle()
            .render()
            .contains("idempotency_requests_total{outcome=\"replayed\",route=\"/calls\"}"),
        "the Prometheus recorder recorded nothing"
    );
    group.finish();
}

#[cfg(not(feature = "metrics"))]
criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = passthrough, first_request, replay, body_size, fingerprint, contention
}
#[cfg(feature = "metrics")]
criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = passthrough, first_request, replay, body_size, fingerprint, contention, with_metrics
}
criterion_main!(benches);
