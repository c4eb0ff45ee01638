//! Three instances of an API share one PostgreSQL through a TCP fault proxy, while clients retry
//! every create until they get a 2xx, and the network to PostgreSQL fails under them for less than
//! the 10 s lease: a 6 s partition (bytes stop both ways and flow again after, nothing lost), a 6 s
//! crash (every connection closed, new ones refused, then back with its data), and latency spikes
//! (every chunk delayed 1.5 s each way for 2 s, then 3 s each way for 4 s). The handler must run
//! exactly once per create, and every client of a create must get the one response. The run
//! (instances, clients, faults and checks) is in `support/store_faults.rs`; the tests of this file
//! take turns, as each loads the two cores on its own.
//!
//! Needs `DATABASE_URL`; unset, a test prints that it is skipped and passes, except under
//! `CI=true`, where it fails. Records go into a table of the run's own, dropped afterwards.
#![cfg(feature = "postgres")]

mod common;
mod support;

use std::sync::Arc;

use support::{
    proxy::FaultProxy,
    store_faults::{
        CRASH, INSTANCES, LATENCY, ONE_AT_A_TIME, PARTITION, Plan, run, through_proxy, unique,
        upstream,
    },
};
use tower_idempotency::IdempotencyStore;

/// Runs `plan` on three `PostgresStore`s, each with its own pool through a fault proxy to
/// `DATABASE_URL`, on a table of the run's own (dropped afterwards, also on failure).
async fn on_postgres(test: &str, plan: &Plan) {
    use std::panic::AssertUnwindSafe;

    use futures_util::FutureExt;
    use sqlx::AssertSqlSafe;
    use tower_idempotency::store::PostgresStore;

    let Some(url) = common::service_url("DATABASE_URL", test) else {
        return;
    };
    let _alone = ONE_AT_A_TIME.lock().await;
    let proxy = FaultProxy::start(upstream(&url, 5432).await).await;
    let (_, proxied) = through_proxy(&url, proxy.addr(), 5432);
    let table = format!("idem_faults_{}", unique());
    let mut stores = Vec::new();
    for _ in 0..INSTANCES {
        let store = PostgresStore::connect(&proxied)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} (through the proxy): {e}"))
            .with_table_name(&table)
            .expect("a valid table name");
        store.migrate().await.expect("migrate");
        stores.push(store);
    }
    let shared = stores
        .into_iter()
        .map(|store| Arc::new(store) as Arc<dyn IdempotencyStore>)
        .collect();
    let outcome = AssertUnwindSafe(run(test, &proxy, shared, plan))
        .catch_unwind()
        .await;
    // On a connection of its own, not through the proxy.
    let admin = sqlx::PgPool::connect(&url).await.expect("connect");
    sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS \"{table}\"")))
        .execute(&admin)
        .await
        .expect("drop the test table");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_partition_shorter_than_the_lease_runs_every_create_once() {
    on_postgres(
        "postgres_partition_shorter_than_the_lease_runs_every_create_once",
        &PARTITION,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_shorter_than_the_lease_runs_every_create_once() {
    on_postgres(
        "postgres_crash_shorter_than_the_lease_runs_every_create_once",
        &CRASH,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_latency_spikes_run_every_create_once() {
    on_postgres("postgres_latency_spikes_run_every_create_once", &LATENCY).await;
}
