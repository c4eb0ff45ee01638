//! With notification off (`RedisStore::notify(false)`), a waiting request does not listen: it
//! neither subscribes to the record's channel nor wakes early, but sleeps out its slice, and the
//! layer then looks at the store again (see `wait_notification` for the pauses).
//!
//! Reads `REDIS_URL`; skipped without it, except under `CI=true`.
#![cfg(all(feature = "redis", feature = "testing"))]

mod common;

use std::time::Duration;

use common::conformance::{LONG, acquire, marked_response, random_fingerprint, random_key};
use tokio::time::Instant;
use tower_idempotency::store::{IdempotencyStore, RedisStore};

/// How many connections the server has subscribed to `channel`.
async fn subscribers(conn: &mut redis::aio::MultiplexedConnection, channel: &str) -> i64 {
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(conn)
        .await
        .unwrap();
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_with_notification_off_neither_subscribes_nor_wakes_early() {
    let test = "a_waiter_with_notification_off_neither_subscribes_nor_wakes_early";
    let Some(url) = common::service_url("REDIS_URL", test) else {
        return;
    };
    let owner = RedisStore::open(&url).await.unwrap().prefix(format!(
        "tower-idempotency-test:{}:",
        uuid::Uuid::new_v4().simple()
    ));
    let waiter = owner.clone().notify(false);
    let mut inspect = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = random_key();
    let token = acquire(&owner, &key, &random_fingerprint(), LONG).await;
    let channel = format!("{}{}", owner.key_prefix(), key.to_hex());

    let slice = Duration::from_millis(1500);
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move {
            let started = Instant::now();
            waiter.wait(&key, slice).await.unwrap();
            started.elapsed()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        subscribers(&mut inspect, &channel).await,
        0,
        "not subscribed"
    );
    // The owner (notification on) completes: the record changes, and nothing tells the waiter.
    assert!(
        owner
            .complete(&key, token, &marked_response("done"), LONG)
            .await
            .unwrap()
    );
    let waited = waiting.await.unwrap();
    assert!(
        waited >= slice,
        "woke after {waited:?}, before its {slice:?} slice"
    );
}
