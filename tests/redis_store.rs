//! `RedisStore` against a real Redis: the store conformance suite, plus the record layout and
//! expiry rules of its type docs, and its errors.
//!
//! Durability and replica acknowledgement (`tests/redis_store_durability.rs`) and timeouts
//! (`redis_store_timeouts.rs`) are tested on private `redis-server` processes that those tests
//! start, stop and pause (see `redis_servers`).
//!
//! Reads `REDIS_URL` (`redis://127.0.0.1:6379`, say). Unset: each test prints that it is
//! skipped and passes, except under `CI=true`, where a missing URL fails. A set URL that does
//! not answer always fails. Every test writes under a prefix of its own, so runs never meet.
#![cfg(all(feature = "redis", feature = "testing"))]

mod common;

use std::time::Duration;

use common::conformance::{
    self, LONG, MARGIN, SHORT, acquire, binary_response, expect_completed, expect_in_flight,
    marked_response, random_fingerprint, random_key,
};
use redis::AsyncCommands;
use tower_idempotency::store::{
    Begin, IdempotencyStore, LeaseToken, RedisStore, StoreErrorKind, StoreKey,
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
