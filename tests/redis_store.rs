//! `RedisStore` against a real Redis: the store conformance suite, plus the record layout and
//! expiry rules of its type docs.
//!
//! Durability, replica acknowledgement and timeouts are tested on private `redis-server`
//! processes that the tests start, stop and pause (see `redis_servers`).
//!
//! Reads `REDIS_URL` (`redis://127.0.0.1:6379`, say). Unset: each test prints that it is
//! skipped and passes, except under `CI=true`, where a missing URL fails. A set URL that does
//! not answer always fails. Every test writes under a prefix of its own, so runs never meet.
#![cfg(all(feature = "redis", feature = "testing"))]

mod common;
mod redis_servers;
mod support;

use std::time::Duration;

use common::conformance::{
    self, LONG, MARGIN, SHORT, acquire, binary_response, expect_completed, expect_in_flight,
    marked_response, random_fingerprint, random_key,
};
use redis::AsyncCommands;
use redis_servers::{RedisServer, private_servers, replica_of};
use tower_idempotency::store::{
    Begin, IdempotencyStore, LeaseToken, RedisDurability, RedisStore, StoreErrorKind, StoreKey,
};

/// The store for one test, under a random prefix, and a plain connection to inspect it with;
/// `None` when the test is skipped.
async fn setup(test: &str) -> Option<(RedisStore, redis::aio::MultiplexedConnection)> {
    let url = common::service_url("REDIS_URL", test)?;
    let store = RedisStore::open(&url)
        .await
        .unwrap_or_else(|e| panic!("Redis at {url} does not answer: {e}"))
        .prefix(format!(
            "tower-idempotency-test:{}:",
            uuid::Uuid::new_v4().simple()
        ));
    let inspect = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    Some((store, inspect))
}

fn redis_key(store: &RedisStore, key: &StoreKey) -> String {
    format!("{}{}", store.key_prefix(), key.to_hex())
}

/// The server's clock in milliseconds since the Unix epoch.
async fn server_millis(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1000 + micros / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let Some((store, _)) = setup("conformance").await else {
        return;
    };
    conformance::run_all(store).await;
}

/// One hash at `<prefix><hex key>`: fingerprint and token as raw bytes, the deadline on the
/// server's clock, the response as `StoredResponse::encode`; key expiry set in both states.
#[tokio::test]
async fn record_layout_is_as_documented() {
    let Some((store, mut conn)) = setup("record_layout_is_as_documented").await else {
        return;
    };
    let key = random_key();
    let name = redis_key(&store, &key);
    let fingerprint = random_fingerprint();
    let before = server_millis(&mut conn).await;
    let token = acquire(&store, &key, &fingerprint, LONG).await;

    let fields: Vec<String> = conn.hkeys(&name).await.unwrap();
    let mut fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["d", "f", "t"], "an in-flight record");
    let f: Vec<u8> = conn.hget(&name, "f").await.unwrap();
    assert_eq!(f, fingerprint.0);
    let t: Vec<u8> = conn.hget(&name, "t").await.unwrap();
    assert_eq!(t, token.to_bytes());
    let d: u64 = conn.hget(&name, "d").await.unwrap();
    let lease = LONG.as_millis() as u64;
    assert!(
        d >= before + lease,
        "the lease deadline is on the server's clock"
    );
    assert!(d <= server_millis(&mut conn).await + lease);
    let pttl: i64 = conn.pttl(&name).await.unwrap();
    assert!(
        pttl > lease as i64 && pttl <= 2 * lease as i64,
        "an in-flight key lives twice its lease: {pttl}"
    );

    let response = binary_response();
    let ttl = Duration::from_secs(60);
    assert!(store.complete(&key, token, &response, ttl).await.unwrap());
    let fields: Vec<String> = conn.hkeys(&name).await.unwrap();
    let mut fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["c", "d", "f", "r"],
        "a completed record keeps no lease token"
    );
    let c: Vec<u8> = conn.hget(&name, "c").await.unwrap();
    assert_eq!(c, token.to_bytes(), "the token that completed it");
    let r: Vec<u8> = conn.hget(&name, "r").await.unwrap();
    assert_eq!(
        r,
        response.encode(),
        "the response is stored in its binary encoding"
    );
    let pttl: i64 = conn.pttl(&name).await.unwrap();
    assert!(
        pttl > 0 && pttl <= ttl.as_millis() as i64,
        "a completed key expires with its TTL: {pttl}"
    );

    assert!(
        !conn
            .exists::<_, bool>(format!("idempotency:{}", key.to_hex()))
            .await
            .unwrap(),
        "nothing under the default prefix"
    );
}

/// Expiry is decided from the stored deadline, not only by Redis' key expiry: a record whose
/// deadline has passed while its key still lives is neither replayed nor reported in flight.
#[tokio::test]
async fn stored_deadline_decides_expiry() {
    let Some((store, mut conn)) = setup("stored_deadline_decides_expiry").await else {
        return;
    };
    // A completed record.
    let key = random_key();
    let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
    assert!(
        store
            .complete(&key, token, &binary_response(), LONG)
            .await
            .unwrap()
    );
    let past = server_millis(&mut conn).await - 1;
    let () = conn.hset(redis_key(&store, &key), "d", past).await.unwrap();
    assert!(conn.pttl::<_, i64>(redis_key(&store, &key)).await.unwrap() > 0);
    acquire(&store, &key, &random_fingerprint(), LONG).await;

    // An in-flight record: taken over, and the old token owns nothing.
    let key = random_key();
    let old = acquire(&store, &key, &random_fingerprint(), LONG).await;
    let past = server_millis(&mut conn).await - 1;
    let () = conn.hset(redis_key(&store, &key), "d", past).await.unwrap();
    let fingerprint = random_fingerprint();
    acquire(&store, &key, &fingerprint, LONG).await;
    assert!(!store.release(&key, old).await.unwrap());
    assert_eq!(expect_in_flight(&store, &key).await.0, fingerprint);
}

/// The key of an in-flight record outlives its lease, so an owner that finishes late (nobody
/// took over) still completes, and the response is replayed.
#[tokio::test]
async fn late_owner_completes_when_nobody_took_over() {
    let Some((store, _)) = setup("late_owner_completes_when_nobody_took_over").await else {
        return;
    };
    let key = random_key();
    let fingerprint = random_fingerprint();
    let token = acquire(&store, &key, &fingerprint, SHORT).await;
    tokio::time::sleep(SHORT + MARGIN).await;
    let response = marked_response("late");
    assert!(store.complete(&key, token, &response, LONG).await.unwrap());
    let (stored_fingerprint, stored) = expect_completed(&store, &key).await;
    assert_eq!(stored_fingerprint, fingerprint);
    assert_eq!(stored, response);
}

/// Stores with different prefixes never see each other's records.
#[tokio::test]
async fn prefixes_separate_stores() {
    let Some((store, _)) = setup("prefixes_separate_stores").await else {
        return;
    };
    let other = store
        .clone()
        .prefix(format!("{}other:", store.key_prefix()));
    let key = random_key();
    acquire(&store, &key, &random_fingerprint(), LONG).await;
    acquire(&other, &key, &random_fingerprint(), LONG).await;
    expect_in_flight(&store, &key).await;
}

/// A record that does not decode is reported as corrupt, not replayed or overwritten.
#[tokio::test]
async fn corrupt_records_are_reported() {
    let Some((store, mut conn)) = setup("corrupt_records_are_reported").await else {
        return;
    };
    let key = random_key();
    let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
    assert!(
        store
            .complete(&key, token, &binary_response(), LONG)
            .await
            .unwrap()
    );
    let () = conn
        .hset(redis_key(&store, &key), "r", &b"\x00\xff"[..])
        .await
        .unwrap();
    let error = store
        .begin(&key, &random_fingerprint(), LONG)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Corrupt);

    let key = random_key();
    acquire(&store, &key, &random_fingerprint(), LONG).await;
    let () = conn
        .hset(redis_key(&store, &key), "f", &b"short"[..])
        .await
        .unwrap();
    let error = store
        .begin(&key, &random_fingerprint(), LONG)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Corrupt);
}

/// The scripts are loaded again when the server forgets them (`SCRIPT FLUSH`, a restart).
#[tokio::test]
async fn scripts_survive_script_flush() {
    let Some((store, mut conn)) = setup("scripts_survive_script_flush").await else {
        return;
    };
    let key = random_key();
    acquire(&store, &key, &random_fingerprint(), LONG).await;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    expect_in_flight(&store, &key).await;
}

/// A server that does not answer is `Unavailable`, with the driver error as the source.
#[tokio::test]
async fn unreachable_server_is_unavailable() {
    // Port 1 on loopback: nothing listens there. Needs no Redis.
    let error = RedisStore::open("redis://127.0.0.1:1").await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    assert!(std::error::Error::source(&error).is_some());
}

/// A command the server rejects (here: a key of another type under the prefix) fails with
/// `Unavailable`, keeping the driver error, and leaves other keys working.
#[tokio::test]
async fn driver_errors_are_unavailable() {
    let Some((store, mut conn)) = setup("driver_errors_are_unavailable").await else {
        return;
    };
    let key = random_key();
    let () = conn.set(redis_key(&store, &key), "a string").await.unwrap();
    let () = conn.pexpire(redis_key(&store, &key), 60_000).await.unwrap();
    let error = store
        .begin(&key, &random_fingerprint(), LONG)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    assert!(std::error::Error::source(&error).is_some());
    let error = store.release(&key, LeaseToken::random()).await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    match store
        .begin(&random_key(), &random_fingerprint(), LONG)
        .await
    {
        Ok(Begin::Acquired(_)) => {}
        other => panic!("the store works for other keys: {other:?}"),
    }
}

/// `open` reads the persistence settings, `durability()` tells them, and one warning says when
/// records would not survive a restart, or when the settings cannot be read.
#[tokio::test]
async fn durability_is_read_from_the_server_and_warned_about() {
    if !private_servers("durability_is_read_from_the_server_and_warned_about") {
        return;
    }
    support::capture_trace();
    let cases: [(&[&str], RedisDurability, Option<&str>); 5] = [
        (
            &["--save", "", "--appendonly", "no"],
            RedisDurability::None,
            Some("Redis forgets idempotency records on a restart"),
        ),
        (
            &["--save", "3600 1", "--appendonly", "no"],
            RedisDurability::Snapshots,
            Some("Redis forgets idempotency records on a restart"),
        ),
        (
            &[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ],
            RedisDurability::AppendOnlyEverySec,
            None,
        ),
        (
            &[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            RedisDurability::AppendOnlyAlways,
            None,
        ),
        (
            &[
                "--save",
                "",
                "--appendonly",
                "no",
                "--rename-command",
                "CONFIG",
                "",
            ],
            RedisDurability::Unknown,
            Some("could not tell whether Redis keeps idempotency records"),
        ),
    ];
    for (args, expected, warning) in cases {
        let server = RedisServer::start(args);
        support::take_trace();
        let store = RedisStore::open(&server.url()).await.unwrap();
        assert_eq!(store.durability(), Some(expected), "{args:?}");
        let trace = support::take_trace();
        let warnings: Vec<&str> = trace.lines().filter(|l| l.contains("WARN")).collect();
        match warning {
            Some(text) => {
                assert_eq!(warnings.len(), 1, "one warning for {args:?}: {trace}");
                assert!(warnings[0].contains(text), "{trace}");
                assert!(warnings[0].contains("tower_idempotency"), "{trace}");
            }
            None => assert!(warnings.is_empty(), "no warning for {args:?}: {trace}"),
        }
        // The store works whatever it found.
        acquire(&store, &random_key(), &random_fingerprint(), LONG).await;
    }
}

/// `wait_replicas(1, ..)`: with no replica, `begin` fails (`Unavailable`, saying how many
/// acknowledged) and leaves the key free; with one, `begin` and `complete` succeed and the
/// replica holds the record. A `complete` no replica acknowledges fails, and succeeds when
/// repeated once a replica is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_fails_without_a_replica_and_passes_with_one() {
    if !private_servers("wait_replicas_fails_without_a_replica_and_passes_with_one") {
        return;
    }
    let master = RedisServer::start(&["--save", "", "--appendonly", "no"]);
    let ack = Duration::from_secs(1);
    let store = RedisStore::open(&master.url())
        .await
        .unwrap()
        .wait_replicas(1, ack);
    let plain = RedisStore::open(&master.url()).await.unwrap();

    // No replica: begin fails, after waiting the timeout, and gives the lease back.
    let key = random_key();
    let started = std::time::Instant::now();
    let error = store
        .begin(&key, &random_fingerprint(), LONG)
        .await
        .unwrap_err();
    assert!(started.elapsed() >= ack, "WAIT waited");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    let source = std::error::Error::source(&error).unwrap().to_string();
    assert!(source.contains("0 replica(s) acknowledged"), "{source}");
    assert_eq!(
        master.cli(&["DBSIZE"]).trim(),
        "0",
        "the lease was released"
    );
    acquire(&plain, &key, &random_fingerprint(), LONG).await;

    // One replica: both writes acknowledged, and on the replica.
    let mut replica = replica_of(&master);
    let key = random_key();
    let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
    let name = format!("idempotency:{}", key.to_hex());
    assert_eq!(replica.cli(&["HEXISTS", &name, "t"]).trim(), "1");
    assert!(
        store
            .complete(&key, token, &marked_response("acked"), LONG)
            .await
            .unwrap()
    );
    assert_eq!(replica.cli(&["HEXISTS", &name, "r"]).trim(), "1");

    // The replica gone: complete is stored on the master but not acknowledged, so it fails.
    let key = random_key();
    let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
    replica.kill();
    let response = marked_response("retried");
    let error = store
        .complete(&key, token, &response, LONG)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    // A replica back: the owner's repeated complete succeeds, and is acknowledged; another
    // token's does not, and the owner's without replica acknowledgement does not either (the
    // store contract).
    let replica = replica_of(&master);
    assert!(
        !store
            .complete(&key, LeaseToken::random(), &response, LONG)
            .await
            .unwrap()
    );
    assert!(!plain.complete(&key, token, &response, LONG).await.unwrap());
    assert!(store.complete(&key, token, &response, LONG).await.unwrap());
    let name = format!("idempotency:{}", key.to_hex());
    assert_eq!(replica.cli(&["HEXISTS", &name, "r"]).trim(), "1");
    assert_eq!(expect_completed(&plain, &key).await.1, response);
}

/// The redis crate's own response timeout (500 ms by default) no longer cuts calls short: a
/// call that the server answers after 800 ms succeeds, on the store and through the layer
/// with its default store timeout (2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_slower_than_half_a_second_succeeds() {
    if !private_servers("a_call_slower_than_half_a_second_succeeds") {
        return;
    }
    let server = RedisServer::start_debuggable();
    let store = RedisStore::open(&server.url()).await.unwrap();
    let stall = || {
        let port = server.port;
        std::thread::spawn(move || redis_servers::cli(port, &["DEBUG", "SLEEP", "0.8"]))
    };

    let sleeper = stall();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    acquire(&store, &random_key(), &random_fingerprint(), LONG).await;
    let took = started.elapsed();
    sleeper.join().unwrap();
    assert!(
        took > Duration::from_millis(500),
        "the call was slow: {took:?}"
    );

    use axum::{Router, routing::post};
    use http::StatusCode;
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { StatusCode::CREATED }
            }),
        )
        .layer(
            tower_idempotency::IdempotencyLayer::new()
                .post("/calls")
                .store(store),
        );
    let sleeper = stall();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let reply = support::send(&app, support::request("/calls", Some("slow-1"), "{}")).await;
    let took = started.elapsed();
    sleeper.join().unwrap();
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        took > Duration::from_millis(500),
        "the call was slow: {took:?}"
    );
}

/// Errors carry the driver's error as their source, and no URL (with its password) in any
/// message of the chain.
#[tokio::test]
async fn errors_carry_the_driver_error_and_no_credentials() {
    let error = RedisStore::open("redis://user:hunter2@127.0.0.1:1")
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    let chain = common::error_chain(&error);
    let text = chain.join(" / ");
    assert!(chain.len() >= 2, "a source: {text}");
    assert!(text.to_lowercase().contains("refused"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.contains("127.0.0.1:1"), "{text}");
}

/// With no response timeout of the driver's own, the layer's store timeout is the one that
/// ends a request's wait: a `begin` whose reply comes after it is answered 503, and the lease
/// that `begin` took when the server ran it late is released, so the next try runs (not 409
/// until the lease runs out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_answered_after_the_store_timeout_leaves_no_lease() {
    if !private_servers("a_begin_answered_after_the_store_timeout_leaves_no_lease") {
        return;
    }
    use axum::{Router, routing::post};
    use http::StatusCode;
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    let server = RedisServer::start_debuggable();
    let store = RedisStore::open(&server.url()).await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { StatusCode::CREATED }
            }),
        )
        .layer(
            tower_idempotency::IdempotencyLayer::new()
                .post("/calls")
                .store(store)
                .lease(Duration::from_secs(30))
                .store_timeout(Duration::from_millis(300)),
        );
    let port = server.port;
    let sleeper = std::thread::spawn(move || redis_servers::cli(port, &["DEBUG", "SLEEP", "1"]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = support::send(&app, support::request("/calls", Some("late-1"), "{}")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    sleeper.join().unwrap();
    // The server has run the begin by now; its reply went to nobody.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.cli(&["DBSIZE"]).trim(),
        "0",
        "the late lease was released"
    );
    let reply = support::send(&app, support::request("/calls", Some("late-1"), "{}")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Why `wait_replicas`: Redis replicates asynchronously, so a response stored on the master
/// (`complete` answered `true`) that has not reached the replica yet is forgotten when the
/// replica is promoted, and the retry would run the handler again. With `wait_replicas(1, ..)`
/// the same situation is a store error (the layer does not count the response as stored), and
/// a `begin` is refused. Replication to the replica goes through a proxy that the test holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_forgets_unacknowledged_writes_that_wait_replicas_reports() {
    if !private_servers("a_failover_forgets_unacknowledged_writes_that_wait_replicas_reports") {
        return;
    }
    let mut master = RedisServer::start(&["--save", "", "--appendonly", "no"]);
    let proxy = redis_servers::HoldingProxy::start(master.port).await;
    let replica = RedisServer::start(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--replicaof",
        "127.0.0.1",
        &proxy.port.to_string(),
    ]);
    redis_servers::wait_until("the replica's link", Duration::from_secs(10), || {
        replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
    });
    let plain = RedisStore::open(&master.url()).await.unwrap();
    let waiting = RedisStore::open(&master.url())
        .await
        .unwrap()
        .wait_replicas(1, Duration::from_millis(300));

    // Before the hold, a write reaches the replica.
    let kept = random_key();
    let token = acquire(&waiting, &kept, &random_fingerprint(), LONG).await;
    assert!(
        waiting
            .complete(&kept, token, &marked_response("kept"), LONG)
            .await
            .unwrap()
    );

    proxy.hold(true);
    // Without waiting: stored, as far as the layer can tell.
    let forgotten = random_key();
    let token = acquire(&plain, &forgotten, &random_fingerprint(), LONG).await;
    assert!(
        plain
            .complete(&forgotten, token, &marked_response("lost"), LONG)
            .await
            .unwrap()
    );
    // Waiting: the same complete is an error, and a begin is refused.
    let reported = random_key();
    let token = acquire(&plain, &reported, &random_fingerprint(), LONG).await;
    let error = waiting
        .complete(&reported, token, &marked_response("x"), LONG)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    let error = waiting
        .begin(&random_key(), &random_fingerprint(), LONG)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);

    // Failover: the master dies, the replica is promoted.
    master.kill();
    replica.cli(&["REPLICAOF", "NO", "ONE"]);
    let promoted = RedisStore::open(&replica.url()).await.unwrap();
    expect_completed(&promoted, &kept).await;
    match promoted
        .begin(&forgotten, &random_fingerprint(), LONG)
        .await
        .unwrap()
    {
        Begin::Acquired(_) => {}
        other => panic!("the unacknowledged response was expected to be lost: {other:?}"),
    }
}
