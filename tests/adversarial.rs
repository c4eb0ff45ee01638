//! Regressions for faults found by attacking the layer: each test is one input that once made
//! the layer run a handler twice, replay the wrong response, or leave a key blocked.

#[cfg(feature = "redis")]
mod common;
mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, routing::post};
use bytes::Bytes;
use http::StatusCode;
use support::*;
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, InFlight, KeyReuse, MemoryStore, StoreFailure,
    store::{Begin, Fingerprint, LeaseToken, StoreError, StoreKey, StoredResponse},
};

/// `POST /calls` behind `layer`: counts the run, waits at `gate`, answers 201.
fn gated_app(layer: IdempotencyLayer, calls: &Calls, gate: &Gate) -> Router {
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
        .layer(layer)
}

// ---------------------------------------------------------------------------------------------
// Waiting duplicates

/// A waiting duplicate pauses between looks at the store for up to 500 ms. That pause counted as
/// a store call under the store timeout, so with a store timeout under 500 ms a duplicate of a
/// request still running, on a healthy store, got 503, or ran the handler a second time when the
/// layer fails open.
#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_outlasts_a_store_timeout_shorter_than_its_pauses() {
    for policy in [StoreFailure::FailClosed, StoreFailure::FailOpen] {
        let (calls, gate) = (Calls::default(), Gate::default());
        let layer = IdempotencyLayer::new()
            .post("/calls")
            .store_timeout(Duration::from_millis(100))
            .on_store_error(policy)
            .in_flight(InFlight::Wait {
                timeout: Duration::from_secs(10),
            });
        let app = gated_app(layer, &calls, &gate);

        let owner = tokio::spawn({
            let app = app.clone();
            async move { send(&app, request("/calls", Some("k"), "{}")).await }
        });
        gate.entered(1).await;
        let duplicate = tokio::spawn({
            let app = app.clone();
            async move { send(&app, request("/calls", Some("k"), "{}")).await }
        });
        // Long enough for the duplicate's pauses to grow past the store timeout.
        tokio::time::sleep(Duration::from_secs(2)).await;
        gate.open(1);

        let owner = within(owner).await.unwrap();
        let duplicate = within(duplicate).await.unwrap();
        assert_eq!(owner.status, StatusCode::CREATED, "{policy:?}");
        assert_eq!(duplicate.status, StatusCode::CREATED, "{policy:?}");
        assert!(
            duplicate.replayed(),
            "{policy:?}: the duplicate gets the replay"
        );
        assert_eq!(duplicate.body, owner.body, "{policy:?}");
        assert_eq!(calls.get(), 1, "{policy:?}: the handler ran once");
    }
}

// ---------------------------------------------------------------------------------------------
// Replays of another endpoint's response

/// A router nested under a prefix sees its requests with the prefix stripped. The fingerprint
/// used that stripped path, so the same key and body sent to `/orgs/1/calls` and then to
/// `/orgs/2/calls` (or to `/v1/calls` and `/v2/calls`) was one request: the second got the
/// first one's response, and its call was never created.
#[tokio::test]
async fn nested_routers_keep_endpoints_apart() {
    let (calls, gate) = (Calls::default(), Gate::default());
    gate.open(10);
    let calls_api = gated_app(IdempotencyLayer::new().post("/calls"), &calls, &gate);
    let app = Router::new()
        .nest("/orgs/{org_id}", calls_api.clone())
        .nest("/v2", calls_api);

    for (n, path) in ["/orgs/1/calls", "/orgs/2/calls", "/v2/calls"]
        .iter()
        .enumerate()
    {
        let first = send(&app, request(path, Some("k"), "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED, "{path}");
        assert!(!first.replayed(), "{path} got another endpoint's response");
        assert_eq!(calls.get(), n + 1, "{path}");
        let retry = send(&app, request(path, Some("k"), "{}")).await;
        assert!(retry.replayed(), "{path}");
        assert_eq!(retry.body, first.body, "{path}");
    }
    assert_eq!(calls.get(), 3);
}

/// Canonical JSON made two different bodies one request when its form kept less than the body
/// said: numbers were read as doubles, so amounts a double cannot tell apart (an integer past
/// 2^64, a decimal with more than 17 significant digits, one that underflows) were the same
/// amount, and of a key sent twice only the last value counted. A handler that reads numbers
/// exactly (`u128`, a decimal type, another service behind a proxy) or rejects duplicate keys
/// (serde's derived `Deserialize`) tells them apart; the layer replayed the first response to
/// the second, and in strict mode did not answer 422.
#[tokio::test]
async fn json_bodies_that_a_double_or_a_repeated_key_would_merge_are_different_requests() {
    for (first, second) in [
        (
            r#"{"amount":100000000000000000001}"#,
            r#"{"amount":100000000000000000000}"#,
        ),
        (r#"{"amount":0.10000000000000000001}"#, r#"{"amount":0.1}"#),
        (r#"{"amount":1e-400}"#, r#"{"amount":0.0}"#),
        (r#"{"amount":1e-400}"#, r#"{"amount":2e-400}"#),
        (
            r#"{"amount":-9223372036854775809}"#,
            r#"{"amount":-9223372036854775808.0}"#,
        ),
        (r#"{"amount":1,"amount":2}"#, r#"{"amount":2}"#),
        (r#"{"to":{"n":1,"n":2}}"#, r#"{"to":{"n":2}}"#),
    ] {
        for strict in [false, true] {
            let (calls, gate) = (Calls::default(), Gate::default());
            gate.open(10);
            let mut layer = IdempotencyLayer::new().post("/calls");
            if strict {
                layer = layer.key_reuse(KeyReuse::Reject);
            }
            let app = gated_app(layer, &calls, &gate);
            let case = format!("{first} then {second}, strict: {strict}");

            let one = send(&app, request("/calls", Some("k"), first)).await;
            assert_eq!(one.status, StatusCode::CREATED, "{case}");
            let two = send(&app, request("/calls", Some("k"), second)).await;
            assert!(
                !two.replayed(),
                "{case}: the second body got the first one's response"
            );
            if strict {
                two.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused");
                assert_eq!(calls.get(), 1, "{case}");
            } else {
                assert_eq!(two.status, StatusCode::CREATED, "{case}");
                assert_eq!(calls.get(), 2, "{case}");
            }
            // Each body sent again, byte for byte, is still its own retry.
            assert!(
                send(&app, request("/calls", Some("k"), first))
                    .await
                    .replayed(),
                "{case}"
            );
        }
    }
}

/// Bodies that mean the same numbers and keys stay one request: canonical JSON still merges
/// what no reader can tell apart.
#[tokio::test]
async fn json_bodies_with_the_same_exact_numbers_are_still_one_request() {
    for (first, second) in [
        (r#"{"a":12.50,"b":1}"#, r#"{ "b": 1, "a": 12.5 }"#),
        (r#"{"amount":1E2}"#, r#"{"amount":100.0}"#),
        (
            r#"{"amount":18446744073709551615}"#,
            r#"{"amount": 18446744073709551615}"#,
        ),
        (
            r#"{"amount":1e23}"#,
            r#"{"amount":100000000000000000000000}"#,
        ),
        (r#"{"amount":-0}"#, r#"{"amount":-0.0}"#),
    ] {
        let (calls, gate) = (Calls::default(), Gate::default());
        gate.open(10);
        let app = gated_app(IdempotencyLayer::new().post("/calls"), &calls, &gate);
        send(&app, request("/calls", Some("k"), first)).await;
        let retry = send(&app, request("/calls", Some("k"), second)).await;
        assert!(retry.replayed(), "{first} then {second}");
        assert_eq!(calls.get(), 1, "{first} then {second}");
    }
}

// ---------------------------------------------------------------------------------------------
// Responses the client never got

/// A 1xx status is never a final response: hyper answers 500 in its place. The default status
/// policy stored it all the same, so the client got a 500 that was a replay, and every retry
/// got it again for the whole TTL, where a real 500 runs again.
#[tokio::test]
async fn an_informational_status_is_not_stored() {
    for status in [
        StatusCode::CONTINUE,
        StatusCode::PROCESSING,
        StatusCode::from_u16(103).unwrap(),
    ] {
        let calls = Calls::default();
        let counter = calls.clone();
        let app = Router::new()
            .route(
                "/calls",
                post(move || async move {
                    counter.hit();
                    status
                }),
            )
            .layer(IdempotencyLayer::new().post("/calls"));
        send(&app, request("/calls", Some("k"), "{}")).await;
        let retry = send(&app, request("/calls", Some("k"), "{}")).await;
        assert!(!retry.replayed(), "{status}");
        assert_eq!(calls.get(), 2, "{status}: the retry runs again");
    }
}

// ---------------------------------------------------------------------------------------------
// Leases nobody owns

/// A store whose next `begin` is carried out at once but answered only when the test opens the
/// gate: the reply is still on its way (a slow network, a busy Redis) when the client leaves or
/// the store timeout runs out.
#[derive(Clone)]
struct SlowReply {
    inner: MemoryStore,
    hold_next: Arc<AtomicBool>,
    carried_out: Arc<Notify>,
    gate: Arc<Semaphore>,
}

impl SlowReply {
    fn new() -> Self {
        Self {
            inner: MemoryStore::new(),
            hold_next: Arc::new(AtomicBool::new(true)),
            carried_out: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

#[tower_idempotency::async_trait]
impl IdempotencyStore for SlowReply {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let outcome = self.inner.begin(key, fingerprint, lease).await;
        if self.hold_next.swap(false, Ordering::SeqCst) {
            self.carried_out.notify_one();
            self.gate.acquire().await.expect("gate open").forget();
        }
        outcome
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        self.inner.release(key, token).await
    }
}

/// The store took the lease, but the request stopped waiting for the answer: its client left
/// (the request future was dropped) or the store timeout ran out (503). Nobody held the lease,
/// so every retry got 409 until it expired (a minute by default), and the handler never ran.
#[tokio::test(start_paused = true)]
async fn a_lease_taken_after_the_request_stopped_waiting_is_released() {
    for client_leaves in [true, false] {
        for run_to_completion in [true, false] {
            let case =
                format!("client leaves: {client_leaves}, run to completion: {run_to_completion}");
            let slow = SlowReply::new();
            let store = TestStore::new(slow.clone());
            let (calls, gate) = (Calls::default(), Gate::default());
            gate.open(10);
            let layer = IdempotencyLayer::new()
                .post("/calls")
                .store(store.clone())
                .store_timeout(Duration::from_millis(100))
                .run_to_completion(run_to_completion);
            let app = gated_app(layer, &calls, &gate);

            let first = tokio::spawn({
                let app = app.clone();
                async move { app.oneshot(request("/calls", Some("k"), "{}")).await }
            });
            within(slow.carried_out.notified()).await;
            if client_leaves {
                first.abort();
                assert!(first.await.unwrap_err().is_cancelled(), "{case}");
            } else {
                let answer = Reply::collect(within(first).await.unwrap().unwrap()).await;
                answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
            }
            // The store's answer arrives after all.
            slow.gate.add_permits(1);
            store.wait_for(|e| e.released == 1).await;

            let retry = send(&app, request("/calls", Some("k"), "{}")).await;
            assert_eq!(retry.status, StatusCode::CREATED, "{case}");
            assert!(!retry.replayed(), "{case}");
            assert_eq!(calls.get(), 1, "{case}: the retry ran, once");
        }
    }
}

/// Redis through a proxy that can hold back its replies.
#[cfg(feature = "redis")]
mod redis_late_reply {
    use std::time::Duration;

    use redis::{AsyncCommands, ConnectionAddr, aio::ConnectionManagerConfig};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        sync::watch,
    };
    use tower_idempotency::store::{Begin, Fingerprint, IdempotencyStore, RedisStore, StoreKey};

    use super::common;

    /// Forwards connections to `upstream`; while `hold` is true, replies wait.
    async fn proxy(upstream: String, hold: watch::Receiver<bool>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut hold = hold.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if hold.wait_for(|held| !held).await.is_err() {
                            return;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    /// Redis carried out a `begin` whose reply came after the client's response timeout (a
    /// busy server, a slow network): `begin` failed (503), yet the lease was taken, and nobody
    /// held its token, so the key answered 409 until the lease ran out.
    #[tokio::test]
    async fn a_lease_whose_reply_timed_out_is_released() {
        let test = "a_lease_whose_reply_timed_out_is_released";
        let Some(url) = common::service_url("REDIS_URL", test) else {
            return;
        };
        let client = redis::Client::open(url.as_str()).unwrap();
        let ConnectionAddr::Tcp(host, port) = client.get_connection_info().addr().clone() else {
            common::skip(test, "REDIS_URL is not plain TCP");
            return;
        };
        let (hold, held) = watch::channel(false);
        let proxied = url.replacen(
            &format!("{host}:{port}"),
            &format!("127.0.0.1:{}", proxy(format!("{host}:{port}"), held).await),
            1,
        );
        let config =
            ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_millis(200)));
        let conn = redis::Client::open(proxied)
            .unwrap()
            .get_connection_manager_with_config(config)
            .await
            .unwrap();
        let prefix = format!("tower-idempotency-test:{}:", uuid::Uuid::new_v4().simple());
        let store = RedisStore::new(conn).prefix(prefix.clone());
        let (key, fp) = (StoreKey([7; 32]), Fingerprint([9; 32]));
        let lease = Duration::from_secs(30);

        // The server knows the begin script, not yet the release script (as after a restart
        // or `SCRIPT FLUSH`, before any lease has been released).
        let mut inspect = client.get_multiplexed_async_connection().await.unwrap();
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut inspect)
            .await
            .unwrap();
        store
            .begin(&StoreKey([8; 32]), &fp, Duration::from_millis(1))
            .await
            .unwrap();

        hold.send_replace(true);
        let lost = store.begin(&key, &fp, lease).await;
        assert!(
            lost.is_err(),
            "the reply is held back past the response timeout"
        );
        hold.send_replace(false);

        let again = store.begin(&key, &fp, lease).await.unwrap();
        let _: () = inspect
            .del(format!("{prefix}{}", key.to_hex()))
            .await
            .unwrap();
        assert!(
            matches!(again, Begin::Acquired(_)),
            "the key is still held by a lease nobody owns: {again:?}"
        );
    }
}

/// A handler that ran and answered 201, whose answer the layer could not store: its body
/// failed after the first chunk (`/calls`), it had trailers (`/agents`), or it was over the
/// response cap (`/tools`). In each case the layer releases the lease, and the retry with the
/// same key runs the handler a second time: one create, two runs.
#[tokio::test]
#[ignore = "a 2xx the layer cannot store releases the lease, so its retry runs again; keeping \
            the key needs a record for a response that cannot be replayed (a design decision)"]
async fn a_success_whose_answer_cannot_be_stored_runs_once() {
    use axum::body::Body;
    use futures_util::stream;
    use http::HeaderMap;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};

    fn answer(path: &str) -> http::Response<Body> {
        let first = Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"{\"id\":")));
        let last = match path {
            "/calls" => Err(std::io::Error::other("connection to the backend lost")),
            "/agents" => Ok(Frame::trailers(HeaderMap::new())),
            _ => Ok(Frame::data(Bytes::from(vec![b'7'; 64]))),
        };
        http::Response::builder()
            .status(StatusCode::CREATED)
            .body(Body::new(StreamBody::new(stream::iter([first, last]))))
            .unwrap()
    }

    for path in ["/calls", "/agents", "/tools"] {
        let calls = Calls::default();
        let counted = calls.clone();
        let app = Router::new()
            .route(
                path,
                post(move |req: axum::extract::Request| {
                    let calls = counted.clone();
                    async move {
                        calls.hit();
                        answer(req.uri().path())
                    }
                }),
            )
            .layer(IdempotencyLayer::new().max_response_body(32));
        for _ in 0..2 {
            let response = within(app.clone().oneshot(request(path, Some("k"), "{}")))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::CREATED, "{path}");
            let _ = response.into_body().collect().await;
        }
        assert_eq!(calls.get(), 1, "{path}: one create, one run");
    }
}

/// A store that stops answering (a blackhole) while a handler runs: each lease renewal waits
/// for the store timeout. The handler was not polled while a renewal was waiting, so it made
/// progress only in the short pauses between renewals: 4 steps of 100 ms took over 2 s, and
/// during an outage every running handler (holding its own connections and locks) crawled.
/// Renewals now run beside the handler.
#[tokio::test]
async fn a_hanging_store_does_not_stall_the_running_handler() {
    let store = TestStore::new(MemoryStore::new());
    let app = Router::new()
        .route(
            "/calls",
            post(|| async {
                let started = tokio::time::Instant::now();
                for _ in 0..4 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                format!("{}", started.elapsed().as_millis())
            }),
        )
        .layer(
            IdempotencyLayer::new()
                .store(store.clone())
                .lease(Duration::from_millis(300))
                .store_timeout(Duration::from_millis(500)),
        );
    store.set_faults(|f| f.renew = Fault::Hang);
    let reply = send(&app, request("/calls", Some("k"), "{}")).await;
    let took: u64 = reply.text().parse().unwrap();
    assert!(
        took < 1000,
        "4 steps of 100 ms took {took} ms while renewals hung"
    );
    assert!(store.events().renews >= 1, "{:?}", store.events());
}

/// Durations meant as "for ever" (`Duration::MAX`): the in-memory store added them to the
/// clock and panicked. With the TTL, that panic came after the handler had run, so the lease
/// was released, the client got a 500, and its retry ran the handler again; with the lease or
/// the completion deadline, every keyed request panicked.
#[tokio::test]
async fn durations_meant_as_for_ever_do_not_panic_or_run_twice() {
    type Setting = (&'static str, fn(IdempotencyLayer) -> IdempotencyLayer);
    let settings: [Setting; 4] = [
        ("ttl", |layer| layer.ttl(Duration::MAX)),
        ("lease", |layer| layer.lease(Duration::MAX)),
        ("completion_deadline", |layer| {
            layer.completion_deadline(Duration::MAX)
        }),
        ("in_flight wait", |layer| {
            layer.in_flight(InFlight::Wait {
                timeout: Duration::MAX,
            })
        }),
    ];
    for (setting, set) in settings {
        let calls = Calls::default();
        let app = calls_app(set(IdempotencyLayer::new()), &calls)
            .layer(tower_http::catch_panic::CatchPanicLayer::new());
        let first = send(&app, request("/calls", Some("k"), "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED, "{setting}: {first:?}");
        let retry = send(&app, request("/calls", Some("k"), "{}")).await;
        assert!(retry.replayed(), "{setting}: {retry:?}");
        assert_eq!(calls.get(), 1, "{setting}: one run");
    }
}

/// A `begin` that took the lease in the store but whose answer was lost (a connection reset
/// after the statement ran): the request gets 503, and the lease it took is held by nobody.
/// Every retry then gets 409 until that lease expires (60 s by default), although nothing runs.
/// Redis undoes a `begin` whose answer came too late, on the same connection, but not one
/// whose connection broke; PostgreSQL and MySQL undo neither.
#[cfg(feature = "testing")]
#[tokio::test]
#[ignore = "a begin whose reply is lost leaves a lease nobody holds, so retries get 409 until \
            it expires; releasing it needs the token, which the store draws (a trait change)"]
async fn a_begin_whose_reply_was_lost_does_not_block_the_key_for_a_lease() {
    use tower_idempotency::testing::{Fault as StoreFault, FaultyStore, StoreOp};

    let store = FaultyStore::new(MemoryStore::new());
    let calls = Calls::default();
    let app = calls_app(
        IdempotencyLayer::new()
            .store(store.clone())
            .lease(Duration::from_secs(5)),
        &calls,
    );
    store.set(StoreOp::Begin, StoreFault::LoseReply);
    let lost = send(&app, request("/calls", Some("k"), "{}")).await;
    lost.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    store.clear();
    // The client retries after its Retry-After: 1.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert_eq!(calls.get(), 1);
}
