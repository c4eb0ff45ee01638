//! `MemoryStore` on its own: how `begin` + `complete` scale with the number of live records,
//! and how long a sweep of expired records takes.
//!
//! ```text
//! cargo bench --bench store
//! ```
//!
//! - `scaling/{1000,100000,1000000}`: one `begin` (a new key) and its `complete`, with that
//!   many completed records already held. The records a measurement adds are given a zero TTL
//!   and swept (untimed) every 256 operations, so the store stays at its size for the whole
//!   run.
//! - `scaling_floor/{1000,1000000}`: the same operations on a bare `std::collections::HashMap`
//!   (look the new key up, insert a 112-byte slot, look it up again and box a copy of the
//!   response into it), with the same keys, the same response and the same untimed removal
//!   every 256 operations: what any hash map of that many records costs, the floor under
//!   `scaling`'s ratio.
//! - `sweep/{100000,1000000}`: one `MemoryStore::sweep` call that removes that many expired
//!   records (filling the store is not timed).
//! - `evict/{1000,1000000}`: one `begin` (a new key) and its `complete` on a store that is full
//!   at that many completed records (`max_records` = N, the default `WhenFull::EvictOldest`),
//!   so that every `begin` evicts the oldest completed record first. The store stays at N;
//!   every 256 operations a `MemoryStore::sweep` (untimed) does the background sweeper's work.
//! - `redis/{single,cluster}/{1,64}` (feature `redis`, and `redis-cluster` for the cluster):
//!   one `begin` (a new key) and its `complete` on `RedisStore` over the network, from one
//!   task or from 64 at once on one store (one connection), against the Redis at `REDIS_URL`
//!   and the Redis Cluster at `REDIS_CLUSTER_URL`; each is skipped when its variable is unset.
//!   Records are written under `bench:<random>:` with a one-minute TTL.
//!
//! - `mysql/begin_complete/{1,16}` (feature `mysql`, `MYSQL_URL` set, else skipped): one `begin`
//!   (a new key) and its `complete` on `MySqlStore`, from 1 task on a pool of 1 connection, or
//!   from 16 tasks at once on a pool of 16 (an iteration is then 16 pairs, so the throughput is
//!   pairs per second over all tasks). `mysql/replay/1`: one `begin` that replays a stored
//!   response, one task, one connection. Each run works in a table of its own, dropped after.
//!
//! ```text
//! MYSQL_URL=mysql://root@127.0.0.1:3306/test cargo bench --features mysql --bench store -- mysql
//! ```

use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};
use tower_idempotency::{
    IdempotencyStore, MemoryStore, StoredResponse,
    store::{Begin, Fingerprint, StoreKey},
};

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Operations between two (untimed) sweeps of the records a measurement added.
const CHUNK: u64 = 256;

fn key(i: u64) -> StoreKey {
    StoreKey(Sha256::digest(i.to_be_bytes()).into())
}

/// A response as the layer stores it: 201, two short headers, a 100-byte body.
fn response(i: u64) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/calls/call_{i:016x}")).unwrap(),
    );
    let mut body = BytesMut::with_capacity(100);
    body.extend_from_slice(&[b'x'; 100]);
    StoredResponse {
        status: StatusCode::CREATED,
        headers,
        body: body.freeze(),
    }
}

async fn begin_complete(
    store: &MemoryStore,
    i: u64,
    lease: Duration,
    ttl: Duration,
    body: &StoredResponse,
) {
    let key = key(i);
    let Begin::Acquired(token) = store.begin(&key, &Fingerprint(key.0), lease).await.unwrap()
    else {
        panic!("a new key is acquired");
    };
    assert!(store.complete(&key, token, body, ttl).await.unwrap());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A store that no background sweeper touches during a measurement.
fn quiet_store() -> MemoryStore {
    MemoryStore::builder()
        // Unbounded: these measurements hold more than the default million records.
        .max_records(usize::MAX)
        .max_bytes(usize::MAX)
        .background_sweep(false)
        .build()
}

/// Runs `iters` operations in chunks of [`CHUNK`] keys, numbered on from `*next`: `timed` does
/// a chunk and returns how long it took, `untimed` then tidies up (sweeps); the sum of the
/// timed parts.
fn in_chunks(
    iters: u64,
    next: &mut u64,
    mut timed: impl FnMut(std::ops::Range<u64>) -> Duration,
    mut untimed: impl FnMut(std::ops::Range<u64>),
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        left -= n;
        let keys = *next..*next + n;
        *next += n;
        total += timed(keys.clone());
        untimed(keys);
    }
    total
}

/// `begin` + `complete` for each of `keys`, with `lease` and `ttl`; how long they took.
fn timed_pairs(
    rt: &tokio::runtime::Runtime,
    store: &MemoryStore,
    keys: std::ops::Range<u64>,
    (lease, ttl): (Duration, Duration),
    template: &StoredResponse,
) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for i in keys {
            begin_complete(store, i, lease, ttl, template).await;
        }
        start.elapsed()
    })
}

fn scaling(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("scaling");
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for live in [1_000u64, 100_000, 1_000_000] {
        let store = quiet_store();
        rt.block_on(async {
            for i in 0..live {
                begin_complete(&store, i, LEASE, TTL, &response(i)).await;
            }
        });
        // Measured keys start past the live ones.
        let mut next = u64::MAX / 2;
        let template = response(0);
        group.bench_with_input(BenchmarkId::from_parameter(live), &live, |b, &live| {
            b.iter_custom(|iters| {
                in_chunks(
                    iters,
                    &mut next,
                    // A zero lease and TTL behave as any other on these paths; they only let
                    // the sweep below take the record out again.
                    |keys| {
                        timed_pairs(
                            &rt,
                            &store,
                            keys,
                            (Duration::ZERO, Duration::ZERO),
                            &template,
                        )
                    },
                    |_| {
                        store.sweep();
                        debug_assert_eq!(store.len() as u64, live);
                    },
                )
            })
        });
        assert_eq!(store.len() as u64, live, "the live records stayed");
    }
    group.finish();
}

/// A map slot the size of `MemoryStore`'s (112 bytes): a fingerprint, a deadline, the boxed
/// response.
struct FloorSlot {
    _fingerprint: Fingerprint,
    _pad: [u64; 6],
    response: Option<Box<StoredResponse>>,
}

fn scaling_floor(c: &mut Criterion) {
    use std::collections::HashMap;
    let mut group = c.benchmark_group("scaling_floor");
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for live in [1_000u64, 1_000_000] {
        let template = response(0);
        let mut map: HashMap<StoreKey, FloorSlot> = HashMap::new();
        let insert = |map: &mut HashMap<StoreKey, FloorSlot>, i: u64| {
            let key = key(i);
            assert!(map.get(&key).is_none(), "a new key");
            map.insert(
                key,
                FloorSlot {
                    _fingerprint: Fingerprint(key.0),
                    _pad: [i; 6],
                    response: None,
                },
            );
            let slot = map.get_mut(&key).expect("just inserted");
            slot.response = Some(Box::new(template.clone()));
        };
        for i in 0..live {
            insert(&mut map, i);
        }
        let mut next = u64::MAX / 2;
        group.bench_with_input(BenchmarkId::from_parameter(live), &live, |b, _| {
            let map = std::cell::RefCell::new(&mut map);
            b.iter_custom(|iters| {
                in_chunks(
                    iters,
                    &mut next,
                    |keys| {
                        let mut map = map.borrow_mut();
                        let start = Instant::now();
                        for i in keys {
                            insert(&mut map, i);
                        }
                        start.elapsed()
                    },
                    |keys| {
                        let mut map = map.borrow_mut();
                        for i in keys {
                            map.remove(&key(i));
                        }
                    },
                )
            })
        });
        assert_eq!(map.len() as u64, live, "the live records stayed");
    }
    group.finish();
}

fn evict(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("evict");
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for full_at in [1_000u64, 1_000_000] {
        let store = MemoryStore::builder()
            .max_records(full_at as usize)
            .max_bytes(usize::MAX)
            .background_sweep(false)
            .build();
        rt.block_on(async {
            for i in 0..full_at {
                begin_complete(&store, i, LEASE, TTL, &response(i)).await;
            }
        });
        assert_eq!(store.len() as u64, full_at);
        // Measured keys start past the ones that filled the store.
        let mut next = u64::MAX / 2;
        let template = response(0);
        group.bench_with_input(BenchmarkId::from_parameter(full_at), &full_at, |b, _| {
            b.iter_custom(|iters| {
                in_chunks(
                    iters,
                    &mut next,
                    // Full: each `begin` evicts the oldest completed record.
                    |keys| timed_pairs(&rt, &store, keys, (LEASE, TTL), &template),
                    // The background sweeper's work, untimed: it drops the expiry index
                    // entries the evicted records left behind.
                    |_| {
                        store.sweep();
                    },
                )
            })
        });
        assert_eq!(
            store.len() as u64,
            full_at,
            "evictions kept the store at its bound"
        );
    }
    group.finish();
}

fn sweep(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("sweep");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(100));
    group.measurement_time(Duration::from_secs(1));
    let template = response(0);
    for expired in [100_000u64, 1_000_000] {
        group.throughput(Throughput::Elements(expired));
        group.bench_with_input(
            BenchmarkId::from_parameter(expired),
            &expired,
            |b, &expired| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let store = quiet_store();
                        rt.block_on(async {
                            for i in 0..expired {
                                // Completed records whose TTL has run out; their lease entries are
                                // not due yet, as in a store whose leases were swept long ago.
                                begin_complete(&store, i, LEASE, Duration::ZERO, &template).await;
                            }
                        });
                        assert_eq!(store.len() as u64, expired);
                        let start = Instant::now();
                        let removed = store.sweep();
                        total += start.elapsed();
                        assert_eq!(removed as u64, expired);
                        assert!(store.is_empty());
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

#[cfg(feature = "redis")]
fn redis(c: &mut Criterion) {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };
    use tower_idempotency::store::RedisStore;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("bench:{}:", uuid::Uuid::new_v4().simple());
    let mut stores: Vec<(&str, RedisStore)> = Vec::new();
    if let Ok(url) = std::env::var("REDIS_URL") {
        let store = rt
            .block_on(RedisStore::open(&url))
            .expect("REDIS_URL answers");
        stores.push(("single", store.prefix(prefix.clone())));
    }
    #[cfg(feature = "redis-cluster")]
    if let Ok(urls) = std::env::var("REDIS_CLUSTER_URL") {
        let store = rt
            .block_on(RedisStore::open_cluster(urls.split(',')))
            .expect("REDIS_CLUSTER_URL answers");
        stores.push(("cluster", store.prefix(prefix.clone())));
    }
    let mut group = c.benchmark_group("redis");
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    let next = Arc::new(AtomicU64::new(0));
    let body = Arc::new(response(0));
    for (name, store) in stores {
        for tasks in [1u64, 64] {
            let id = BenchmarkId::new(name, tasks);
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        let mut set = tokio::task::JoinSet::new();
                        for t in 0..tasks {
                            let share = iters / tasks + u64::from(t < iters % tasks);
                            let (store, next, body) = (store.clone(), next.clone(), body.clone());
                            set.spawn(async move {
                                for _ in 0..share {
                                    let i = next.fetch_add(1, Ordering::Relaxed);
                                    let key = key(i ^ 0x5eed_0000_0000_0000);
                                    let Begin::Acquired(token) = store
                                        .begin(&key, &Fingerprint(key.0), LEASE)
                                        .await
                                        .unwrap()
                                    else {
                                        panic!("a new key is acquired");
                                    };
                                    let ttl = Duration::from_secs(60);
                                    assert!(store.complete(&key, token, &body, ttl).await.unwrap());
                                }
                            });
                        }
                        set.join_all().await;
                        start.elapsed()
                    })
                })
            });
        }
    }
    group.finish();
}

#[cfg(not(feature = "redis"))]
fn redis(_: &mut Criterion) {}

#[cfg(feature = "mysql")]
fn mysql(c: &mut Criterion) {
    use std::sync::Arc;

    use sqlx::{AssertSqlSafe, mysql::MySqlPoolOptions};
    use tower_idempotency::store::MySqlStore;

    let Ok(url) = std::env::var("MYSQL_URL") else {
        eprintln!("skipped mysql: MYSQL_URL is not set");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let random_key = || {
        let mut key = [0; 32];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        StoreKey(key)
    };
    let store_with = |connections: u32| {
        rt.block_on(async {
            let pool = MySqlPoolOptions::new()
                .max_connections(connections)
                .connect(&url)
                .await
                .expect("MariaDB at MYSQL_URL");
            let table = format!(
                "idem_bench_{}",
                &uuid::Uuid::new_v4().simple().to_string()[..16]
            );
            let store = MySqlStore::new(pool).with_table_name(&table).unwrap();
            store.migrate().await.unwrap();
            store
        })
    };
    let drop_table = |store: &MySqlStore| {
        rt.block_on(async {
            let drop = format!("DROP TABLE `{}`", store.table_name());
            sqlx::query(AssertSqlSafe(drop))
                .execute(store.pool())
                .await
                .unwrap();
        })
    };
    let template = Arc::new(response(0));

    let mut group = c.benchmark_group("mysql");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for tasks in [1u32, 16] {
        let store = store_with(tasks);
        group.throughput(Throughput::Elements(u64::from(tasks)));
        group.bench_with_input(
            BenchmarkId::new("begin_complete", tasks),
            &tasks,
            |b, &tasks| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        let runs: Vec<_> = (0..tasks)
                            .map(|_| {
                                let (store, body) = (store.clone(), template.clone());
                                tokio::spawn(async move {
                                    for _ in 0..iters {
                                        let key = random_key();
                                        let fingerprint = Fingerprint(key.0);
                                        let Begin::Acquired(token) =
                                            store.begin(&key, &fingerprint, LEASE).await.unwrap()
                                        else {
                                            panic!("a new key is acquired");
                                        };
                                        assert!(
                                            store.complete(&key, token, &body, TTL).await.unwrap()
                                        );
                                    }
                                })
                            })
                            .collect();
                        for run in runs {
                            run.await.unwrap();
                        }
                        start.elapsed()
                    })
                })
            },
        );
        drop_table(&store);
    }

    let store = store_with(1);
    let key = random_key();
    rt.block_on(async {
        let Begin::Acquired(token) = store.begin(&key, &Fingerprint(key.0), LEASE).await.unwrap()
        else {
            panic!("a new key is acquired");
        };
        assert!(store.complete(&key, token, &template, TTL).await.unwrap());
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("replay", 1), |b| {
        b.to_async(&rt).iter(|| async {
            let begun = store.begin(&key, &Fingerprint(key.0), LEASE).await.unwrap();
            assert!(matches!(begun, Begin::Completed { .. }));
        })
    });
    drop_table(&store);
    group.finish();
}

#[cfg(not(feature = "mysql"))]
fn mysql(_: &mut Criterion) {}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = scaling, scaling_floor, evict, sweep, redis, mysql
}
criterion_main!(benches);
