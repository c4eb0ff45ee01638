//! `RedisStore` on a real Redis Cluster (`RedisStore::open_cluster`): the store conformance
//! suite; two layers, each with its own connection, sharing the cluster; records spread over
//! every master; and, on a private cluster of its own, the failover of a master.
//!
//! Reads `REDIS_CLUSTER_URL` (`redis://127.0.0.1:7000`, or several seed URLs separated by
//! commas; `scripts/redis-cluster.sh start` starts one on 7000-7005). Unset: each test prints
//! that it is skipped and passes, except under `CI=true`, where a missing URL fails. The
//! failover test starts and kills `redis-server` processes of its own on other ports, so the
//! shared cluster stays healthy. Every test writes under a prefix of its own.
#![cfg(all(feature = "redis-cluster", feature = "testing"))]

mod common;
mod redis_servers;
mod support;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Router, extract::State, routing::post};
use http::StatusCode;
use redis_servers::RedisCluster;
use tokio::task::JoinSet;
use tower_idempotency::{
    IdempotencyLayer,
    store::{IdempotencyStore, RedisDurability, RedisStore},
};

/// The seed URLs in `REDIS_CLUSTER_URL`; `None` when the test is skipped.
fn seeds(test: &str) -> Option<Vec<String>> {
    let urls = common::service_url("REDIS_CLUSTER_URL", test)?;
    Some(urls.split(',').map(|u| u.trim().to_owned()).collect())
}

fn unique_prefix() -> String {
    format!("tower-idempotency-test:{}:", uuid::Uuid::new_v4().simple())
}

async fn open(seeds: &[String], prefix: &str) -> RedisStore {
    RedisStore::open_cluster(seeds)
        .await
        .unwrap_or_else(|e| panic!("Redis Cluster at {seeds:?} does not answer: {e}"))
        .prefix(prefix)
}

/// An app whose `POST /calls` counts its runs per idempotency key and sleeps `delay`.
fn app(store: RedisStore, runs: Arc<Runs>, delay: Duration) -> Router {
    Router::new()
        .route(
            "/calls",
            post(
                move |State(runs): State<Arc<Runs>>, headers: http::HeaderMap| async move {
                    let key = headers[support::KEY].to_str().unwrap().to_owned();
                    runs.hit(&key);
                    tokio::time::sleep(delay).await;
                    (StatusCode::CREATED, format!("created for {key}"))
                },
            ),
        )
        .with_state(runs)
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .store(store)
                .store_timeout(Duration::from_secs(2)),
        )
}

/// Handler runs per idempotency key.
#[derive(Default)]
struct Runs(std::sync::Mutex<HashMap<String, usize>>);

impl Runs {
    fn hit(&self, key: &str) {
        *self.0.lock().unwrap().entry(key.to_owned()).or_default() += 1;
    }
    fn of(&self, key: &str) -> usize {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }
    fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }
    fn most(&self) -> usize {
        self.0.lock().unwrap().values().copied().max().unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let Some(seeds) = seeds("conformance") else {
        return;
    };
    common::conformance::run_all(open(&seeds, &unique_prefix()).await).await;
}

/// Two layers, each with its own cluster connection (as two processes would have): 40
/// concurrent requests with one key, split between them while the handler runs, run it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_run_40_concurrent_duplicates_once() {
    let Some(seeds) = seeds("two_instances_run_40_concurrent_duplicates_once") else {
        return;
    };
    let prefix = unique_prefix();
    let runs = Arc::new(Runs::default());
    let apps = [
        app(
            open(&seeds, &prefix).await,
            runs.clone(),
            Duration::from_millis(400),
        ),
        app(
            open(&seeds, &prefix).await,
            runs.clone(),
            Duration::from_millis(400),
        ),
    ];
    let mut requests = JoinSet::new();
    for i in 0..40 {
        let app = apps[i % 2].clone();
        requests.spawn(async move {
            support::send(
                &app,
                support::request("/calls", Some("dup-1"), r#"{"to":"+1"}"#),
            )
            .await
        });
    }
    let mut statuses: HashMap<StatusCode, usize> = HashMap::new();
    while let Some(reply) = requests.join_next().await {
        *statuses.entry(reply.unwrap().status).or_default() += 1;
    }
    assert_eq!(runs.of("dup-1"), 1, "the handler ran once: {statuses:?}");
    assert_eq!(
        statuses.get(&StatusCode::CREATED).copied().unwrap_or(0)
            + statuses.get(&StatusCode::CONFLICT).copied().unwrap_or(0),
        40,
        "every request got the response or 409: {statuses:?}"
    );
    // After it finished, both instances replay it.
    for app in &apps {
        let reply = support::send(
            app,
            support::request("/calls", Some("dup-1"), r#"{"to":"+1"}"#),
        )
        .await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(reply.replayed());
    }
    assert_eq!(runs.total(), 1);
}

/// The masters of a cluster and how many keys under `prefix` each holds, found with
/// `redis-cli` on the seed node.
fn keys_per_master(seed_port: u16, prefix: &str) -> Vec<(u16, usize)> {
    redis_servers::cli(seed_port, &["CLUSTER", "NODES"])
        .lines()
        .filter(|line| line.contains("master") && !line.contains("fail"))
        .map(|line| {
            let addr = line.split_whitespace().nth(1).unwrap();
            let port: u16 = addr.split(['@', ':']).nth(1).unwrap().parse().unwrap();
            let keys = redis_servers::cli(port, &["--scan", "--pattern", &format!("{prefix}*")])
                .lines()
                .filter(|l| !l.is_empty())
                .count();
            (port, keys)
        })
        .collect()
}

/// 100 distinct keys, whose records spread over the slots of every master: no 503, each
/// handler once, each record on some master (and every master holds some).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_keys_spread_over_every_master_get_no_503() {
    let Some(seeds) = seeds("distinct_keys_spread_over_every_master_get_no_503") else {
        return;
    };
    let prefix = unique_prefix();
    let runs = Arc::new(Runs::default());
    let apps = [
        app(open(&seeds, &prefix).await, runs.clone(), Duration::ZERO),
        app(open(&seeds, &prefix).await, runs.clone(), Duration::ZERO),
    ];
    let mut requests = JoinSet::new();
    for i in 0..100 {
        let app = apps[i % 2].clone();
        requests.spawn(async move {
            let key = format!("spread-{i}");
            support::send(&app, support::request("/calls", Some(&key), "{}")).await
        });
    }
    while let Some(reply) = requests.join_next().await {
        let reply = reply.unwrap();
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        assert!(!reply.replayed());
    }
    assert_eq!(runs.total(), 100);
    assert_eq!(runs.most(), 1);

    let seed_port: u16 = seeds[0].rsplit(':').next().unwrap().parse().unwrap();
    let spread = keys_per_master(seed_port, &prefix);
    assert!(spread.len() >= 3, "three masters: {spread:?}");
    assert_eq!(
        spread.iter().map(|(_, n)| n).sum::<usize>(),
        100,
        "{spread:?}"
    );
    assert!(
        spread.iter().all(|(_, n)| *n > 0),
        "every master: {spread:?}"
    );
}

/// A master killed (SIGKILL) on a private cluster (three masters with two replicas each,
/// `cluster-node-timeout` 1000 ms): one of its replicas is promoted, requests whose records live on it get 503 until then, and afterwards
/// every request runs again on the same store, with no restart. Every response stored (with
/// `wait_replicas(1, ..)`) before the kill is replayed after it, and no handler ran twice.
/// First, the store's durability is that of the weakest master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_interrupts_briefly_and_loses_no_completed_response() {
    let test = "a_master_failover_interrupts_briefly_and_loses_no_completed_response";
    if seeds(test).is_none() {
        return;
    }
    // Two replicas per master: after the failover, the promoted replica still has one, so
    // that `wait_replicas(1, ..)` can be met.
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start(1000, 2))
        .await
        .unwrap();

    // Durability is the weakest master's: AOF everywhere, then one master without.
    let masters: Vec<usize> = (0..cluster.nodes.len())
        .filter(|&i| {
            cluster.nodes[i]
                .cli(&["ROLE"])
                .lines()
                .next()
                .is_some_and(|role| role.trim() == "master")
        })
        .collect();
    assert_eq!(masters.len(), 3);
    for &i in &masters {
        cluster.nodes[i].cli(&["CONFIG", "SET", "appendonly", "yes"]);
    }
    let store = RedisStore::open_cluster(cluster.urls()).await.unwrap();
    assert_eq!(
        store.durability(),
        Some(RedisDurability::AppendOnlyEverySec)
    );
    cluster.nodes[masters[1]].cli(&["CONFIG", "SET", "appendonly", "no"]);
    let store = RedisStore::open_cluster(cluster.urls()).await.unwrap();
    assert_eq!(store.durability(), Some(RedisDurability::None));

    let store = store
        .prefix(unique_prefix())
        .wait_replicas(1, Duration::from_millis(500));
    let runs = Arc::new(Runs::default());
    let app = app(store, runs.clone(), Duration::ZERO);

    // Responses stored and acknowledged by a replica.
    let before: Vec<String> = (0..60).map(|i| format!("before-{i}")).collect();
    for key in &before {
        let reply = support::send(&app, support::request("/calls", Some(key), "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    }

    // Kill the master of slot 0 (the first one created).
    let victim = cluster.master_of_slot(0);
    let killed = Instant::now();
    cluster.nodes[victim].kill();

    // A request with a fresh key every 50 ms for 8 s, each on its own task, each noted with
    // when it was sent (after the kill) and what it got.
    let mut requests = JoinSet::new();
    let mut round = 0;
    while killed.elapsed() < Duration::from_secs(8) {
        let app = app.clone();
        let key = format!("during-{round}");
        requests.spawn(async move {
            let sent = killed.elapsed();
            let reply = support::send(&app, support::request("/calls", Some(&key), "{}")).await;
            (sent, reply.status, killed.elapsed() - sent)
        });
        round += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut unavailable = Vec::new();
    let mut served = 0;
    // The latest sending time of a request that took over 200 ms, 503s included.
    let mut last_slow = Duration::ZERO;
    let mut slowest = Duration::ZERO;
    while let Some(done) = requests.join_next().await {
        let (sent, status, took) = done.unwrap();
        if took > Duration::from_millis(200) {
            last_slow = last_slow.max(sent);
        }
        match status {
            StatusCode::CREATED => {
                served += 1;
                slowest = slowest.max(took);
            }
            StatusCode::SERVICE_UNAVAILABLE => unavailable.push(sent),
            other => panic!("unexpected {other}"),
        }
    }
    unavailable.sort();
    let (Some(first), Some(last)) = (unavailable.first(), unavailable.last()) else {
        panic!("no request got 503: the kill interrupted nothing");
    };
    eprintln!(
        "failover: of {round} requests sent over 8 s after the kill, {} got 503 (sent from \
         {first:?} to {last:?} after it), {served} were served (the slowest in {slowest:?}); \
         the last one slower than 200 ms was sent {last_slow:?} after the kill",
        unavailable.len()
    );
    assert!(
        *last < Duration::from_secs(6),
        "requests sent 6 s after the kill are served again"
    );

    // Every response stored before the kill is replayed; nothing ran twice.
    for key in &before {
        let reply = support::send(&app, support::request("/calls", Some(key), "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{key}: {}", reply.text());
        assert!(reply.replayed(), "{key} was replayed, not run again");
    }
    assert_eq!(runs.most(), 1, "no handler ran twice");
    drop(cluster);
}

/// A store on one server's connection does not follow the cluster's redirections: pointed at a
/// cluster node, its calls on keys of other masters fail `Unavailable`, with the driver's
/// `MOVED` error as the source, so a log tells this apart from a refused connection or a
/// timeout. A cluster needs `open_cluster`.
#[tokio::test]
async fn a_single_server_store_on_a_cluster_node_reports_moved() {
    let Some(seeds) = seeds("a_single_server_store_on_a_cluster_node_reports_moved") else {
        return;
    };
    let store = RedisStore::open(&seeds[0])
        .await
        .unwrap()
        .prefix(unique_prefix());
    let mut moved = 0;
    for _ in 0..30 {
        let key = common::conformance::random_key();
        let fingerprint = common::conformance::random_fingerprint();
        if let Err(error) = store
            .begin(&key, &fingerprint, Duration::from_secs(5))
            .await
        {
            assert_eq!(
                error.kind(),
                tower_idempotency::store::StoreErrorKind::Unavailable
            );
            let source = std::error::Error::source(&error).unwrap().to_string();
            assert!(
                source.contains("MOVED") || source.contains("Moved"),
                "{source}"
            );
            moved += 1;
        }
    }
    assert!(moved > 0, "some of 30 keys belong to other masters");
}
