//! `RedisStore` calls that fail: a `begin` that ends without its answer gives back the lease it
//! may have taken, and a script that fails is not sent again by its source (only a server that
//! lacks the script, `NOSCRIPT`, gets the source).
//!
//! Runs on private `redis-server` processes (see `redis_servers`), where a Redis installation
//! is at hand: with `REDIS_URL` set; skipped without it, except under `CI=true`.
#![cfg(all(feature = "redis", feature = "testing"))]

mod common;
mod redis_servers;

use std::time::Duration;

use common::conformance::{LONG, acquire, random_fingerprint, random_key};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis_servers::RedisServer;
use tower_idempotency::store::{IdempotencyStore, RedisStore, StoreErrorKind};

fn private_servers(test: &str) -> bool {
    common::service_url("REDIS_URL", test).is_some()
}

fn server() -> RedisServer {
    RedisServer::start(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--enable-debug-command",
        "yes",
    ])
}

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

/// A `begin` whose answer does not come in time (the connection's response timeout) may still
/// run on the server: the store queues a release behind it on the same connection, so the
/// lease it took does not stay behind until it runs out.
#[tokio::test]
async fn a_begin_without_its_answer_leaves_no_lease() {
    if !private_servers("a_begin_without_its_answer_leaves_no_lease") {
        return;
    }
    let server = server();
    let client = redis::Client::open(server.url()).unwrap();
    let conn = ConnectionManager::new_with_config(
        client,
        ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_millis(300))),
    )
    .await
    .unwrap();
    let store = RedisStore::new(conn);
    let port = server.port;
    let sleeper = std::thread::spawn(move || redis_servers::cli(port, &["DEBUG", "SLEEP", "1"]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let error = store
        .begin(&random_key(), &random_fingerprint(), LONG)
        .await
        .expect_err("the answer comes after the response timeout");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    sleeper.join().unwrap();
    // The server ran the begin, then the release queued behind it.
    redis_servers::wait_until("the late lease is released", Duration::from_secs(5), || {
        server.cli(&["DBSIZE"]).trim() == "0"
    });
    assert_eq!(calls(&server, "evalsha"), 1, "the begin ran");
}

/// A script that fails on the server (here: the record's key holds a string) fails the call at
/// once; it is not run again by its source.
#[tokio::test]
async fn a_failing_script_is_not_sent_again() {
    if !private_servers("a_failing_script_is_not_sent_again") {
        return;
    }
    let server = server();
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
