//! Two instances of the reference API (`examples/seed_api/`), each with its own listener,
//! its own state and its own connection to the store, sharing one Redis or one PostgreSQL:
//! 40 identical requests with one key, split across both while the handler sleeps, run the
//! handler once in all.
//!
//! Needs `REDIS_URL` (`redis://127.0.0.1:6379`, say) and `DATABASE_URL`
//! (`postgres://postgres@127.0.0.1:5432/test`, say). Unset: each test prints that it is skipped
//! and passes, except under `CI=true`, where it fails. Every test writes under a Redis key
//! prefix or in a PostgreSQL table of its own, so runs never meet.
#![cfg(any(feature = "redis", feature = "postgres"))]

mod common;
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/seed_api/main.rs"]
mod seed_api;

use common::service_url;

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use clap::Parser;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinSet};
use tower_idempotency::IdempotencyStore;

/// How many identical requests the test sends, half to each instance.
const REQUESTS: usize = 40;
/// How long the create handler sleeps, so that every request arrives while the first runs.
const HANDLER_DELAY_MS: &str = "400";

/// A name of this test run's own: 16 hex digits.
fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

/// The reference API's configuration for these tests: a slow handler, records kept a minute.
fn config(in_flight_wait: bool) -> seed_api::Config {
    let mut flags = vec![
        "seed_api",
        "--handler-delay-ms",
        HANDLER_DELAY_MS,
        "--ttl-secs",
        "60",
    ];
    if in_flight_wait {
        flags.extend(["--in-flight", "wait", "--wait-timeout-ms", "20000"]);
    }
    seed_api::Config::parse_from(flags)
}

/// One running instance of the reference API.
struct Instance {
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Instance {
    async fn start(config: &seed_api::Config, store: Arc<dyn IdempotencyStore>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = seed_api::app_with_store(config, store);
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, server }
    }

    /// The number of create-handler runs of `org` on this instance.
    async fn handler_calls(&self, client: &reqwest::Client, org: &str) -> u64 {
        let stats: Value = client
            .get(format!("http://{}/stats", self.addr))
            .bearer_auth(org)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        stats["handler_calls"].as_u64().unwrap()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// An answer, with what the checks need.
#[derive(Debug)]
struct Answer {
    instance: usize,
    status: StatusCode,
    replayed: bool,
    content_type: Option<String>,
    retry_after: Option<String>,
    body: Bytes,
}

/// Sends the same `POST /agents` with the same key `REQUESTS` times at once, alternating
/// between the instances, and returns every answer.
async fn send_duplicates(instances: [SocketAddr; 2], org: &str) -> Vec<Answer> {
    let client = reqwest::Client::new();
    let key = uuid::Uuid::new_v4().to_string();
    let body = json!({ "name": "Support agent", "voice": "alloy" });
    let mut requests = JoinSet::new();
    for n in 0..REQUESTS {
        let instance = n % 2;
        let request = client
            .post(format!("http://{}/agents", instances[instance]))
            .bearer_auth(org)
            .header("x-idempotency-key", &key)
            .json(&body);
        requests.spawn(async move {
            let response = request.send().await.unwrap();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .map(|value| value.to_str().unwrap().to_owned())
            };
            let replayed = match header("idempotent-replayed").as_deref() {
                None => false,
                Some("true") => true,
                Some(other) => panic!("Idempotent-Replayed: {other}"),
            };
            Answer {
                instance,
                status: response.status(),
                replayed,
                content_type: header("content-type"),
                retry_after: header("retry-after"),
                body: response.bytes().await.unwrap(),
            }
        });
    }
    requests.join_all().await
}

/// Handler runs of `org`, summed over both instances.
async fn total_handler_calls(instances: &[Instance; 2], org: &str) -> u64 {
    let client = reqwest::Client::new();
    let mut total = 0;
    for instance in instances {
        total += instance.handler_calls(&client, org).await;
    }
    total
}

/// Asserts that `answer` is the in-flight 409 problem.
#[track_caller]
fn assert_in_flight(answer: &Answer) {
    assert_eq!(answer.status, StatusCode::CONFLICT, "{answer:?}");
    assert_eq!(
        answer.content_type.as_deref(),
        Some("application/problem+json")
    );
    let retry_after: u64 = answer
        .retry_after
        .as_deref()
        .expect("409 without Retry-After")
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    let problem: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(problem["status"], 409);
    assert_eq!(problem["type"], "tag:tower-idempotency,2026:in-flight");
    assert!(!answer.replayed);
}

/// Asserts that exactly one answer is the original 201 and that every other answer is either
/// its replay (same body bytes) or, unless `waiting`, the in-flight 409; returns a summary.
fn check_answers(answers: &[Answer], waiting: bool) -> String {
    assert_eq!(answers.len(), REQUESTS);
    let originals: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED && !a.replayed)
        .collect();
    assert_eq!(
        originals.len(),
        1,
        "exactly one request runs: {:#?}",
        originals
    );
    let original = originals[0];
    let created: Value = serde_json::from_slice(&original.body).unwrap();
    assert_eq!(created["data"]["object"], "agent");
    let (mut replays, mut conflicts, mut by_instance) = (0, 0, [0; 2]);
    for answer in answers {
        by_instance[answer.instance] += 1;
        if answer.status == StatusCode::CREATED {
            assert_eq!(answer.body, original.body, "every 201 is the one response");
            replays += usize::from(answer.replayed);
        } else if waiting {
            panic!("a waiting duplicate got {answer:?}");
        } else {
            assert_in_flight(answer);
            conflicts += 1;
        }
    }
    assert_eq!(by_instance, [REQUESTS / 2; 2]);
    format!(
        "1 x 201 from instance {}, {replays} replays, {conflicts} x 409",
        original.instance
    )
}

/// Starts two instances on the two stores, sends the duplicates, checks the answers and that
/// the handler ran once in all.
async fn run_two_instances(stores: [Arc<dyn IdempotencyStore>; 2], waiting: bool, test: &str) {
    let config = config(waiting);
    let [first, second] = stores;
    let instances = [
        Instance::start(&config, first).await,
        Instance::start(&config, second).await,
    ];
    let org = format!("org_{}", unique());
    let answers = send_duplicates([instances[0].addr, instances[1].addr], &org).await;
    let summary = check_answers(&answers, waiting);
    let runs = total_handler_calls(&instances, &org).await;
    assert_eq!(
        runs, 1,
        "the handler ran {runs} times across both instances"
    );
    eprintln!("{test}: {REQUESTS} requests over 2 instances: {summary}; handler ran {runs} time");
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use tower_idempotency::store::RedisStore;

    /// Two stores, each with its own connection (as two processes would have), on one Redis
    /// under one prefix of this run's own.
    async fn stores(test: &str) -> Option<[Arc<dyn IdempotencyStore>; 2]> {
        let url = service_url("REDIS_URL", test)?;
        let prefix = format!("tower-idempotency-test:multi:{}:", unique());
        let mut stores: Vec<Arc<dyn IdempotencyStore>> = Vec::new();
        for _ in 0..2 {
            let store = RedisStore::open(&url)
                .await
                .unwrap_or_else(|e| panic!("Redis at {url} does not answer: {e}"))
                .prefix(prefix.clone());
            stores.push(Arc::new(store));
        }
        Some(stores.try_into().unwrap_or_else(|_| unreachable!()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_on_one_redis_run_the_handler_once() {
        let test = "two_instances_on_one_redis_run_the_handler_once";
        let Some(stores) = stores(test).await else {
            return;
        };
        run_two_instances(stores, false, test).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_on_one_redis_waiting_all_get_the_one_response() {
        let test = "two_instances_on_one_redis_waiting_all_get_the_one_response";
        let Some(stores) = stores(test).await else {
            return;
        };
        run_two_instances(stores, true, test).await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::{future::Future, panic::AssertUnwindSafe, time::Duration};

    use futures_util::FutureExt;
    use sqlx::{AssertSqlSafe, PgPool, postgres::PgPoolOptions};
    use tower_idempotency::store::PostgresStore;

    use super::*;

    async fn pool(url: &str) -> PgPool {
        PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at DATABASE_URL is unreachable: {e}"))
    }

    /// Runs `test` on two stores, each with its own pool (as two processes would have), on one
    /// table of this run's own, created first and dropped after, also when `test` panics.
    async fn with_stores<F, Fut>(test: &str, body: F)
    where
        F: FnOnce([Arc<dyn IdempotencyStore>; 2]) -> Fut,
        Fut: Future<Output = ()>,
    {
        let Some(url) = service_url("DATABASE_URL", test) else {
            return;
        };
        let table = format!("idem_multi_{}", unique());
        let mut stores = Vec::new();
        for _ in 0..2 {
            let store = PostgresStore::new(pool(&url).await)
                .with_table_name(&table)
                .expect("a valid table name");
            // Both instances migrate at start, as seed_api does.
            store.migrate().await.expect("migrate");
            stores.push(store);
        }
        let admin = stores[0].pool().clone();
        let shared: Vec<Arc<dyn IdempotencyStore>> = stores
            .into_iter()
            .map(|store| Arc::new(store) as Arc<dyn IdempotencyStore>)
            .collect();
        let shared: [Arc<dyn IdempotencyStore>; 2] =
            shared.try_into().unwrap_or_else(|_| unreachable!());
        let outcome = AssertUnwindSafe(body(shared)).catch_unwind().await;
        sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS \"{table}\"")))
            .execute(&admin)
            .await
            .expect("drop the test table");
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_on_one_postgres_run_the_handler_once() {
        let test = "two_instances_on_one_postgres_run_the_handler_once";
        with_stores(test, |stores| run_two_instances(stores, false, test)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_on_one_postgres_waiting_all_get_the_one_response() {
        let test = "two_instances_on_one_postgres_waiting_all_get_the_one_response";
        with_stores(test, |stores| run_two_instances(stores, true, test)).await;
    }
}
