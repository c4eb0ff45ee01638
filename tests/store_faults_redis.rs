//! Three instances of an API share one Redis through a TCP fault proxy, while clients retry every
//! create until they get a 2xx, and the network to Redis fails under them for less than the 10 s
//! lease: a 6 s partition (bytes stop both ways and flow again after, nothing lost), and a 6 s
//! crash (every connection closed, new ones refused, then back with its data). The handler must run
//! exactly once per create, and every client of a create must get the one response. The run
//! (instances, clients, faults and checks) is in `support/store_faults.rs`; the tests of this file
//! take turns, as each loads the two cores on its own.
//!
//! Needs `REDIS_URL`; unset, a test prints that it is skipped and passes, except under
//! `CI=true`, where it fails. Records go under a Redis key prefix of the run's own.
#![cfg(feature = "redis")]

mod common;
mod support;

use std::sync::Arc;

use support::{
    proxy::FaultProxy,
    store_faults::{
        CRASH, INSTANCES, ONE_AT_A_TIME, PARTITION, Plan, run, through_proxy, unique, upstream,
    },
};
use tower_idempotency::IdempotencyStore;

/// Runs `plan` on three `RedisStore`s, each with its own connection through a fault proxy to
/// `REDIS_URL`, under a key prefix of the run's own.
async fn on_redis(test: &str, plan: &Plan) {
    use tower_idempotency::store::RedisStore;

    let Some(url) = common::service_url("REDIS_URL", test) else {
        return;
    };
    let _alone = ONE_AT_A_TIME.lock().await;
    let proxy = FaultProxy::start(upstream(&url, 6379).await).await;
    let (_, proxied) = through_proxy(&url, proxy.addr(), 6379);
    let prefix = format!("tower-idempotency-test:faults:{}:", unique());
    let mut stores: Vec<Arc<dyn IdempotencyStore>> = Vec::new();
    for _ in 0..INSTANCES {
        let store = RedisStore::open(&proxied)
            .await
            .unwrap_or_else(|e| panic!("Redis at {url} (through the proxy): {e}"))
            .prefix(prefix.clone());
        stores.push(Arc::new(store));
    }
    run(test, &proxy, stores, plan).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_partition_shorter_than_the_lease_runs_every_create_once() {
    on_redis(
        "redis_partition_shorter_than_the_lease_runs_every_create_once",
        &PARTITION,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crash_shorter_than_the_lease_runs_every_create_once() {
    on_redis(
        "redis_crash_shorter_than_the_lease_runs_every_create_once",
        &CRASH,
    )
    .await;
}
