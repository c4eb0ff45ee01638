//! `RedisStore` calls that fail: a `begin` whose connection breaks before its answer came gives
//! back the lease it may have taken, and a script that fails is not sent again by its source
//! (only a server that lacks the script, `NOSCRIPT`, gets the source).
//!
//! Runs on private `redis-server` processes (see `redis_servers`), where a Redis installation
//! is at hand: with `REDIS_URL` set; skipped without it, except under `CI=true`.
#![cfg(all(feature = "redis", feature = "testing"))]

mod common;
mod redis_servers;
mod support;

use std::{net::SocketAddr, time::Duration};

use common::conformance::{LONG, acquire, random_fingerprint, random_key};
use redis_servers::{RedisServer, private_servers};
use support::proxy::{FaultProxy, NetFault};
use tokio::time::Instant;
use tower_idempotency::store::{IdempotencyStore, RedisStore, StoreErrorKind};

/// How many times the server ran `command` (from `INFO commandstats`).
fn calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |rest| {
            rest.split(',').next().unwrap().parse().expect("a count")
        })
}

/// A `begin` whose connection breaks after the server ran it, before its answer came back,
/// fails; the store then sends a release for its token behind it (on the connection the manager
/// opens again), so the lease it took does not stay behind until it runs out, answering 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_cut_off_from_its_answer_leaves_no_lease() {
    if !private_servers("a_begin_cut_off_from_its_answer_leaves_no_lease") {
        return;
    }
    let server = RedisServer::start_debuggable();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], server.port))).await;
    let store = RedisStore::open(&format!("redis://{}", proxy.addr()))
        .await
        .unwrap();
    // The server learns the scripts first, so that the begin below runs at once.
    let warm = random_key();
    let token = acquire(&store, &warm, &random_fingerprint(), LONG).await;
    assert!(store.release(&warm, token).await.unwrap());
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0");
    let evalsha = calls(&server, "evalsha");

    // Each way takes 300 ms: the server runs the begin at about 300 ms, and its answer is
    // still on the way at 450 ms, when the connection breaks.
    proxy.set(NetFault::Latency(Duration::from_millis(300)));
    let begin = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .begin(&random_key(), &random_fingerprint(), LONG)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(calls(&server, "evalsha"), evalsha + 1, "the begin ran");
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "1", "and took a lease");
    proxy.set(NetFault::Reset);
    let error = begin.await.unwrap().expect_err("the connection broke");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.set(NetFault::Pass);
    // Waited for here without blocking: the release runs on a task of the store's.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.cli(&["DBSIZE"]).trim() != "0" {
        assert!(Instant::now() < deadline, "the late lease was not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A script that fails on the server (here: the record's key holds a string) fails the call at
/// once; it is not run again by its source.
#[tokio::test]
async fn a_failing_script_is_not_sent_again() {
    if !private_servers("a_failing_script_is_not_sent_again") {
        return;
    }
    let server = RedisServer::start_debuggable();
    let store = RedisStore::open(&server.url()).await.unwrap();
    let key = random_key();
    let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
    // The server now knows the renew script (a fresh server lacks it: that first call is
    // answered `NOSCRIPT`, and sent again by source).
    assert!(store.renew(&key, token, LONG).await.unwrap());
    let record = format!("{}{}", store.key_prefix(), key.to_hex());
    server.cli(&["SET", &record, "not a record"]);
    let evals = calls(&server, "eval");
    let error = store
        .renew(&key, token, LONG)
        .await
        .expect_err("a string is no record");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable, "{error:?}");
    assert_eq!(calls(&server, "eval"), evals, "no EVAL by source");
}
