//! Waiting duplicates on another instance are woken by the store's notification: two layers,
//! each with its own store connection, share one Redis, one Redis Cluster or one PostgreSQL.
//! A request runs on instance A; its duplicate, sent to instance B while it runs, waits
//! (`InFlight::Wait`). The delay measured is from A's response to B's replay.
//!
//! With notification on (the default), the delay is a round trip or two; with it off
//! (`notify(false)`), B finds the record only when its next pause (20 ms doubling to 500 ms)
//! ends. The tests print median and p99 and assert bounds loose enough for a loaded machine.
//!
//! Needs `REDIS_URL`, `REDIS_CLUSTER_URL` (seed URLs separated by commas) and `DATABASE_URL`;
//! each test is skipped with a message when its variable is unset, and fails under `CI=true`.
#![cfg(any(feature = "redis", feature = "postgres"))]

mod common;
mod support;

use std::{sync::Arc, time::Duration};

use axum::{Router, routing::post};
use bytes::Bytes;
use http::StatusCode;
use support::*;
use tokio::time::Instant;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, InFlight};

/// `POST /calls` behind a waiting layer on `store`: counts the run, waits at `gate`.
fn instance(store: Arc<dyn IdempotencyStore>, calls: &Calls, gate: &Gate) -> Router {
    let (calls, gate) = (calls.clone(), gate.clone());
    let layer = IdempotencyLayer::new()
        .post("/calls")
        .store(store)
        .in_flight(InFlight::Wait {
            timeout: Duration::from_secs(20),
        });
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

/// Delays in milliseconds, sorted.
struct Delays(Vec<f64>);

impl Delays {
    fn quantile(&self, q: f64) -> f64 {
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i]
    }

    fn median(&self) -> f64 {
        self.quantile(0.5)
    }

    fn p99(&self) -> f64 {
        self.quantile(0.99)
    }
}

/// `tries` times: a request on `a` held for `hold`, its duplicate on `b`; returns the delays
/// from A's response to B's replay. Every duplicate must be a replay: B's handler never runs.
async fn measure(
    a: Arc<dyn IdempotencyStore>,
    b: Arc<dyn IdempotencyStore>,
    tries: usize,
    hold: Duration,
) -> Delays {
    let (calls_a, calls_b, gate_a, gate_b) = (
        Calls::default(),
        Calls::default(),
        Gate::default(),
        Gate::default(),
    );
    gate_b.open(tries);
    let app_a = instance(a, &calls_a, &gate_a);
    let app_b = instance(b, &calls_b, &gate_b);
    let mut delays = Vec::with_capacity(tries);
    for n in 0..tries {
        let key = uuid::Uuid::new_v4().to_string();
        let first = tokio::spawn({
            let (app, key) = (app_a.clone(), key.clone());
            async move {
                let reply = send(&app, request("/calls", Some(&key), "{}")).await;
                (reply, Instant::now())
            }
        });
        gate_a.entered(n + 1).await;
        let duplicate = tokio::spawn({
            let (app, key) = (app_b.clone(), key.clone());
            async move {
                let reply = send(&app, request("/calls", Some(&key), "{}")).await;
                (reply, Instant::now())
            }
        });
        tokio::time::sleep(hold).await;
        gate_a.open(1);
        let (first, answered) = first.await.unwrap();
        let (duplicate, replayed) = duplicate.await.unwrap();
        assert_eq!(first.status, StatusCode::CREATED);
        assert_eq!(
            duplicate.status,
            StatusCode::CREATED,
            "{:?}",
            duplicate.body
        );
        assert!(duplicate.replayed(), "the duplicate gets the replay");
        assert_eq!(duplicate.body, first.body);
        delays.push(replayed.saturating_duration_since(answered).as_secs_f64() * 1000.0);
    }
    assert_eq!(calls_a.get(), tries, "each request ran once on A");
    assert_eq!(calls_b.get(), 0, "no duplicate ran on B");
    delays.sort_by(f64::total_cmp);
    Delays(delays)
}

/// How many tries with notification on.
const TRIES: usize = 100;
/// How long A's handler runs with notification on: B is waiting by then.
const HOLD: Duration = Duration::from_millis(30);
/// The bound asserted on the median with notification on. The goal is 10 ms on loopback; this
/// leaves room for a loaded machine, and is still far below what polling gives.
const NOTIFIED_MEDIAN_MS: f64 = 60.0;
/// With notification off: A holds its lease 700 ms, so B's pauses (20, 40, 80, 160, 320, 500
/// ms, looking at 20, 60, 140, 300, 620 and 1,120 ms) make it find the record about 420 ms
/// after A answered.
const POLL_HOLD: Duration = Duration::from_millis(700);
const POLL_TRIES: usize = 5;

/// Runs both measurements for stores built by `open(notify)`, prints, and asserts.
async fn notified_and_polled<F, Fut>(store: &str, open: F)
where
    F: Fn(bool) -> Fut,
    Fut: std::future::Future<Output = (Arc<dyn IdempotencyStore>, Arc<dyn IdempotencyStore>)>,
{
    let (a, b) = open(true).await;
    // One try first, so that connections are warm.
    measure(a.clone(), b.clone(), 1, HOLD).await;
    let notified = measure(a.clone(), b.clone(), TRIES, HOLD).await;
    let notified_long = measure(a, b, POLL_TRIES, POLL_HOLD).await;
    let (a, b) = open(false).await;
    let polled = measure(a, b, POLL_TRIES, POLL_HOLD).await;
    println!(
        "{store}: notify on, {TRIES} tries: median {:.2} ms, p99 {:.2} ms; \
         held {} ms, {POLL_TRIES} tries: median {:.2} ms; notify off, held {} ms: median {:.2} ms",
        notified.median(),
        notified.p99(),
        POLL_HOLD.as_millis(),
        notified_long.median(),
        POLL_HOLD.as_millis(),
        polled.median(),
    );
    assert!(
        notified.median() <= NOTIFIED_MEDIAN_MS,
        "{store}: median {:.2} ms with notification",
        notified.median()
    );
    assert!(
        notified_long.median() <= NOTIFIED_MEDIAN_MS,
        "{store}: median {:.2} ms with notification, held long",
        notified_long.median()
    );
    assert!(
        polled.median() >= 200.0,
        "{store}: median {:.2} ms without notification: the test no longer shows polling",
        polled.median()
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wakes_a_waiter_on_another_instance() {
    use tower_idempotency::store::RedisStore;
    let Some(url) = common::service_url("REDIS_URL", "redis_wakes_a_waiter_on_another_instance")
    else {
        return;
    };
    notified_and_polled("Redis", |notify| {
        let url = url.clone();
        async move {
            let prefix = format!("tower-idempotency-test:{}:", uuid::Uuid::new_v4().simple());
            let open = || async {
                let store = RedisStore::open(&url).await.unwrap();
                Arc::new(store.prefix(prefix.clone()).notify(notify)) as Arc<dyn IdempotencyStore>
            };
            (open().await, open().await)
        }
    })
    .await;
}

#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_wakes_a_waiter_on_another_instance() {
    use tower_idempotency::store::RedisStore;
    let test = "redis_cluster_wakes_a_waiter_on_another_instance";
    let Some(urls) = common::service_url("REDIS_CLUSTER_URL", test) else {
        return;
    };
    let seeds: Vec<String> = urls.split(',').map(|u| u.trim().to_owned()).collect();
    notified_and_polled("Redis Cluster", |notify| {
        let seeds = seeds.clone();
        async move {
            let prefix = format!("tower-idempotency-test:{}:", uuid::Uuid::new_v4().simple());
            let open = || async {
                let store = RedisStore::open_cluster(&seeds).await.unwrap();
                Arc::new(store.prefix(prefix.clone()).notify(notify)) as Arc<dyn IdempotencyStore>
            };
            (open().await, open().await)
        }
    })
    .await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_wakes_a_waiter_on_another_instance() {
    use tower_idempotency::store::PostgresStore;
    let test = "postgres_wakes_a_waiter_on_another_instance";
    let Some(url) = common::service_url("DATABASE_URL", test) else {
        return;
    };
    let table = format!(
        "idem_wait_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let cleanup = PostgresStore::connect(&url).await.unwrap();
    notified_and_polled("PostgreSQL", |notify| {
        let (url, table) = (url.clone(), table.clone());
        async move {
            let open = || async {
                let store = PostgresStore::connect(&url)
                    .await
                    .unwrap()
                    .with_table_name(&table)
                    .unwrap()
                    .notify(notify);
                store.migrate().await.unwrap();
                Arc::new(store) as Arc<dyn IdempotencyStore>
            };
            (open().await, open().await)
        }
    })
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS \"{table}\""
    )))
    .execute(cleanup.pool())
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// A broken notification channel: waiters fall back to their pauses, and the channel comes back
// by itself.

/// How long `wait` takes on `store` for `key` when `change` runs `after` into it; `None` when
/// the wait did not end by `slice`.
async fn woken_after<S, F, Fut>(
    store: &S,
    key: &tower_idempotency::store::StoreKey,
    slice: Duration,
    after: Duration,
    change: F,
) -> Duration
where
    S: IdempotencyStore + Clone,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let waiter = tokio::spawn({
        let (store, key) = (store.clone(), *key);
        async move {
            let started = Instant::now();
            store.wait(&key, slice).await.unwrap();
            started.elapsed()
        }
    });
    tokio::time::sleep(after).await;
    change().await;
    waiter.await.unwrap()
}

fn fresh_key() -> (
    tower_idempotency::store::StoreKey,
    tower_idempotency::store::Fingerprint,
) {
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    let mut key = [0; 32];
    key[..16].copy_from_slice(&bytes);
    (
        tower_idempotency::store::StoreKey(key),
        tower_idempotency::store::Fingerprint([7; 32]),
    )
}

/// Takes a fresh key's lease on `owner`, has `waiter` wait for it with a 2 s slice, and
/// completes it 150 ms later: returns how long after the completion began the waiter woke.
/// `None` when the store failed (it may be reconnecting).
async fn wake_delay<S: IdempotencyStore + Clone>(owner: &S, waiter: &S) -> Option<Duration> {
    use tower_idempotency::store::{Begin, StoredResponse};
    let (key, fp) = fresh_key();
    let Ok(Begin::Acquired(token)) = owner.begin(&key, &fp, Duration::from_secs(30)).await else {
        tokio::time::sleep(Duration::from_millis(50)).await;
        return None;
    };
    let completed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let waited = woken_after(
        waiter,
        &key,
        Duration::from_secs(2),
        Duration::from_millis(150),
        || {
            let completed = completed.clone();
            async move {
                let response = StoredResponse {
                    status: StatusCode::CREATED,
                    headers: http::HeaderMap::new(),
                    body: Bytes::new(),
                };
                let stored = owner
                    .complete(&key, token, &response, Duration::from_secs(60))
                    .await;
                completed.store(
                    matches!(stored, Ok(true)),
                    std::sync::atomic::Ordering::SeqCst,
                );
            }
        },
    )
    .await;
    completed
        .load(std::sync::atomic::Ordering::SeqCst)
        .then(|| waited.saturating_sub(Duration::from_millis(150)))
}

/// Asserts that `waiter` is woken within 100 ms of a completion on `owner` within `within`
/// (its notification channel may be reconnecting meanwhile).
async fn notified_again<S: IdempotencyStore + Clone>(owner: &S, waiter: &S, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let delay = wake_delay(owner, waiter).await;
        if delay.is_some_and(|d| d < Duration::from_millis(100)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "notification did not come back: woken {delay:?} after the completion"
        );
    }
}

#[cfg(feature = "redis")]
mod redis_servers;

/// The Redis subscriber connection is killed while a request waits, then the server is killed
/// and started again: the waiter never waits past its slice, and notification comes back by
/// itself each time. On a private server, as it kills connections and the server.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_notification_survives_a_broken_subscription() {
    use redis_servers::RedisServer;
    use tower_idempotency::store::{Begin, RedisStore};
    let test = "redis_notification_survives_a_broken_subscription";
    if common::service_url("REDIS_URL", test).is_none() {
        return;
    }
    let args = ["--save", "", "--appendonly", "no"];
    let mut server = RedisServer::start(&args);
    let port = server.port;
    let a = RedisStore::open(&server.url()).await.unwrap();
    let b = RedisStore::open(&server.url()).await.unwrap();
    notified_again(&a, &b, Duration::from_secs(5)).await;

    // The subscriber's connection dies while a request waits: the wait ends at once (messages
    // may have been lost), well before its slice.
    let (key, fp) = fresh_key();
    assert!(matches!(
        a.begin(&key, &fp, Duration::from_secs(30)).await.unwrap(),
        Begin::Acquired(_)
    ));
    let long_slice = Duration::from_secs(3);
    let waited = woken_after(&b, &key, long_slice, Duration::from_millis(100), || async {
        let killed = server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert_ne!(killed.trim(), "0", "the subscriber connection was killed");
    })
    .await;
    assert!(
        waited < Duration::from_secs(1),
        "waited {waited:?} after the subscriber's connection died, of a {long_slice:?} slice"
    );
    let slice = Duration::from_millis(400);
    notified_again(&a, &b, Duration::from_secs(5)).await;

    // Redis itself goes away: waits end by their slices.
    server.kill();
    for _ in 0..3 {
        let started = Instant::now();
        b.wait(&key, slice).await.unwrap();
        assert!(
            started.elapsed() < slice + Duration::from_millis(100),
            "waited {:?} past a {slice:?} slice with Redis down",
            started.elapsed()
        );
    }
    // And it comes back, on the same port: so does notification.
    let _server = RedisServer::start_on(port, &args);
    notified_again(&a, &b, Duration::from_secs(10)).await;
}

/// The PostgreSQL listener's connection is terminated while a request waits: the waiter never
/// waits past its slice, and notification comes back by itself.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notification_survives_a_broken_listener() {
    use tower_idempotency::store::{Begin, PostgresStore};
    let test = "postgres_notification_survives_a_broken_listener";
    let Some(url) = common::service_url("DATABASE_URL", test) else {
        return;
    };
    let name = format!(
        "idem_listen_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    // The application name tells this test's connections from everyone else's.
    let url = format!(
        "{url}{}application_name={name}",
        if url.contains('?') { '&' } else { '?' }
    );
    let a = PostgresStore::connect(&url)
        .await
        .unwrap()
        .with_table_name(&name)
        .unwrap();
    a.migrate().await.unwrap();
    let b = PostgresStore::connect(&url)
        .await
        .unwrap()
        .with_table_name(&name)
        .unwrap();
    notified_again(&a, &b, Duration::from_secs(5)).await;

    let (key, fp) = fresh_key();
    assert!(matches!(
        a.begin(&key, &fp, Duration::from_secs(30)).await.unwrap(),
        Begin::Acquired(_)
    ));
    let slice = Duration::from_millis(400);
    let terminate = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = '{name}' AND query LIKE 'LISTEN%'"
    );
    let waited = woken_after(&b, &key, slice, Duration::from_millis(100), || async {
        let killed: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(terminate.clone()))
            .fetch_one(a.pool())
            .await
            .unwrap();
        assert!(killed >= 1, "the listener connection was terminated");
    })
    .await;
    assert!(
        waited < slice + Duration::from_millis(100),
        "waited {waited:?} past a {slice:?} slice"
    );
    notified_again(&a, &b, Duration::from_secs(5)).await;

    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS \"{name}\""
    )))
    .execute(a.pool())
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Requests that nobody waits for send no notification.

/// A record's response, for the store-level tests.
fn stored() -> tower_idempotency::store::StoredResponse {
    tower_idempotency::store::StoredResponse {
        status: StatusCode::CREATED,
        headers: http::HeaderMap::new(),
        body: Bytes::new(),
    }
}

/// Completes `keys[0]` and releases `keys[1]` with no waiter, then completes `keys[2]` while
/// `store` waits for it.
async fn complete_release_and_waited<S: IdempotencyStore + Clone>(
    store: &S,
    keys: [tower_idempotency::store::StoreKey; 3],
) {
    use tower_idempotency::store::Begin;
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_secs(60);
    let [completed, released, waited] = keys;
    let fp = tower_idempotency::store::Fingerprint([7; 32]);
    let Begin::Acquired(token) = store.begin(&completed, &fp, lease).await.unwrap() else {
        panic!("acquired")
    };
    assert!(
        store
            .complete(&completed, token, &stored(), ttl)
            .await
            .unwrap()
    );
    let Begin::Acquired(token) = store.begin(&released, &fp, lease).await.unwrap() else {
        panic!("acquired")
    };
    assert!(store.release(&released, token).await.unwrap());
    let Begin::Acquired(token) = store.begin(&waited, &fp, lease).await.unwrap() else {
        panic!("acquired")
    };
    let woken = woken_after(
        store,
        &waited,
        Duration::from_secs(2),
        Duration::from_millis(150),
        || async {
            assert!(
                store
                    .complete(&waited, token, &stored(), ttl)
                    .await
                    .unwrap()
            );
        },
    )
    .await;
    assert!(woken < Duration::from_millis(400), "woken after {woken:?}");
}

/// On Redis, only the record a request waited for is published.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_publishes_only_records_a_request_waits_for() {
    use futures_util::StreamExt;
    use tower_idempotency::store::RedisStore;
    let test = "redis_publishes_only_records_a_request_waits_for";
    let Some(url) = common::service_url("REDIS_URL", test) else {
        return;
    };
    let prefix = format!("tower-idempotency-test:{}:", uuid::Uuid::new_v4().simple());
    let store = RedisStore::open(&url).await.unwrap().prefix(prefix.clone());
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe(format!("{prefix}*")).await.unwrap();

    let keys = [fresh_key().0, fresh_key().0, fresh_key().0];
    complete_release_and_waited(&store, keys).await;
    let mut messages = pubsub.on_message();
    let first = tokio::time::timeout(Duration::from_secs(1), messages.next())
        .await
        .expect("the waited record is published")
        .unwrap();
    assert_eq!(
        first.get_channel_name(),
        format!("{prefix}{}", keys[2].to_hex()),
        "the first message is the waited record's: the others published nothing"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), messages.next())
            .await
            .is_err(),
        "one message in all"
    );
}

/// On PostgreSQL, only the record a request waited for is notified.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notifies_only_records_a_request_waits_for() {
    use tower_idempotency::store::{PostgresStore, StoreKey};
    let test = "postgres_notifies_only_records_a_request_waits_for";
    let Some(url) = common::service_url("DATABASE_URL", test) else {
        return;
    };
    let table = format!(
        "idem_only_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let store = PostgresStore::connect(&url)
        .await
        .unwrap()
        .with_table_name(&table)
        .unwrap();
    store.migrate().await.unwrap();
    let keys = [fresh_key().0, fresh_key().0, fresh_key().0];
    let channel = |key: &StoreKey| format!("idempotency_{}", &key.to_hex()[..40]);
    let mut listener = sqlx::postgres::PgListener::connect(&url).await.unwrap();
    for key in &keys {
        listener.listen(&channel(key)).await.unwrap();
    }
    complete_release_and_waited(&store, keys).await;
    let first = tokio::time::timeout(Duration::from_secs(1), listener.recv())
        .await
        .expect("the waited record is notified")
        .unwrap();
    assert_eq!(
        first.channel(),
        channel(&keys[2]),
        "the first notification is the waited record's: the others sent nothing"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), listener.recv())
            .await
            .is_err(),
        "one notification in all"
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS \"{table}\""
    )))
    .execute(store.pool())
    .await
    .unwrap();
}
