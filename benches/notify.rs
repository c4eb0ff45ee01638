//! What change notification costs the requests that do not wait: `begin` + `complete`
//! throughput on `RedisStore` (one server, and a cluster) and `PostgresStore`, with
//! notification on (the default: `complete` publishes, `PUBLISH`/`SPUBLISH` or `pg_notify`)
//! and off (`notify(false)`), with no waiter listening.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 REDIS_CLUSTER_URL=redis://127.0.0.1:7000 \
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//! cargo bench -p tower-idempotency-benches --bench notify --features redis-cluster,postgres
//! ```
//!
//! Each store is skipped when its variable is unset. For each store and each concurrency (1
//! task, and 16 tasks on one store), the two settings run in turns (off, on, off, on, ...),
//! `ROUNDS` rounds of `ROUND` each, and the bench prints pairs per second of each setting: the
//! median over its rounds, and the ratio on/off. A plain timed loop rather than criterion, so
//! that both settings see the same machine load in turn.

#![cfg_attr(
    not(any(feature = "redis", feature = "postgres")),
    allow(dead_code, unused_imports)
)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tower_idempotency::{
    IdempotencyStore, StoredResponse,
    store::{Begin, Fingerprint, StoreKey},
};

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(60);
const ROUND: Duration = Duration::from_secs(2);
const ROUNDS: usize = 5;

fn response() -> StoredResponse {
    StoredResponse {
        status: http::StatusCode::CREATED,
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::from_static(&[b'x'; 100]),
    }
}

/// Pairs of `begin` (a new key) and `complete` per second, from `tasks` tasks for `ROUND`.
async fn round(store: Arc<dyn IdempotencyStore>, tasks: usize, next: Arc<AtomicU64>) -> f64 {
    let body = Arc::new(response());
    let start = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (store, next, body, done) = (store.clone(), next.clone(), body.clone(), done.clone());
        set.spawn(async move {
            while start.elapsed() < ROUND {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let key = StoreKey(Sha256::digest(i.to_be_bytes()).into());
                let Begin::Acquired(token) =
                    store.begin(&key, &Fingerprint(key.0), LEASE).await.unwrap()
                else {
                    panic!("a new key is acquired");
                };
                assert!(store.complete(&key, token, &body, TTL).await.unwrap());
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    set.join_all().await;
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs the rounds for one store, `off` and `on` in turns, and prints.
async fn compare(name: &str, off: Arc<dyn IdempotencyStore>, on: Arc<dyn IdempotencyStore>) {
    let next = Arc::new(AtomicU64::new(
        uuid::Uuid::new_v4().as_u64_pair().0 & 0x7fff_ffff_0000_0000,
    ));
    for tasks in [1, 16] {
        let (mut offs, mut ons) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            offs.push(round(off.clone(), tasks, next.clone()).await);
            ons.push(round(on.clone(), tasks, next.clone()).await);
        }
        let (off_median, on_median) = (median(offs), median(ons));
        println!(
            "{name:<14} {tasks:>2} tasks: notify off {off_median:>8.0} pairs/s, on {on_median:>8.0} pairs/s, on/off {:.3}",
            on_median / off_median
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        use tower_idempotency::store::RedisStore;
        let prefix = format!("bench:{}:", uuid::Uuid::new_v4().simple());
        let open = |notify: bool| {
            let (url, prefix) = (url.clone(), prefix.clone());
            async move {
                let store = RedisStore::open(&url).await.expect("REDIS_URL answers");
                Arc::new(store.prefix(prefix).notify(notify)) as Arc<dyn IdempotencyStore>
            }
        };
        compare("redis", open(false).await, open(true).await).await;
    }
    #[cfg(feature = "redis-cluster")]
    if let Ok(urls) = std::env::var("REDIS_CLUSTER_URL") {
        use tower_idempotency::store::RedisStore;
        let prefix = format!("bench:{}:", uuid::Uuid::new_v4().simple());
        let open = |notify: bool| {
            let (urls, prefix) = (urls.clone(), prefix.clone());
            async move {
                let store = RedisStore::open_cluster(urls.split(','))
                    .await
                    .expect("REDIS_CLUSTER_URL answers");
                Arc::new(store.prefix(prefix).notify(notify)) as Arc<dyn IdempotencyStore>
            }
        };
        compare("redis-cluster", open(false).await, open(true).await).await;
    }
    #[cfg(feature = "postgres")]
    if let Ok(url) = std::env::var("DATABASE_URL") {
        use tower_idempotency::store::PostgresStore;
        let table = format!(
            "bench_notify_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let open = |notify: bool| {
            let (url, table) = (url.clone(), table.clone());
            async move {
                let store = PostgresStore::connect(&url)
                    .await
                    .expect("DATABASE_URL answers")
                    .with_table_name(&table)
                    .unwrap()
                    .notify(notify);
                store.migrate().await.unwrap();
                store
            }
        };
        let (off, on) = (open(false).await, open(true).await);
        let pool = off.pool().clone();
        compare("postgres", Arc::new(off), Arc::new(on)).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE \"{table}\"")))
            .execute(&pool)
            .await
            .unwrap();
    }
}
