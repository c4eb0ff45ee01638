//! `RedisStore`'s durability and replica acknowledgement, on private `redis-server` processes
//! that the tests start, stop and kill (see `redis_servers`): `open` reads the server's
//! persistence settings and warns when records would not survive a restart; `wait_replicas`
//! fails a write that no replica acknowledges, and a failover forgets the unacknowledged writes
//! that it reports.
//!
//! The private servers need `redis-server` and `redis-cli` on the `PATH`, and run where
//! `REDIS_URL` is set, as that says a Redis installation is at hand. Unset: each test prints
//! that it is skipped and passes, except under `CI=true`, where a missing URL fails.
#![cfg(all(feature = "redis", feature = "testing"))]

mod common;
mod redis_servers;
mod support;

use std::time::Duration;

use common::conformance::{
    LONG, acquire, expect_completed, marked_response, random_fingerprint, random_key,
};
use redis_servers::{RedisServer, private_servers, replica_of};
use tower_idempotency::store::{
    Begin, IdempotencyStore, LeaseToken, RedisDurability, RedisStore, StoreErrorKind,
};

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
