//! Outages, with a Redis server the test starts itself (`redis-server` on a free loopback
//! port, nothing persisted) and the reference API (`examples/seed_api/`) on `RedisStore`:
//!
//! - Redis stops mid-run: covered requests get 503 problem+json with `Retry-After` and the
//!   handler does not run; Redis starts again on the same port: requests succeed, with the
//!   same app and store (the connection manager reconnects by itself).
//! - An instance dies mid-handler (its runtime is torn down, so nothing releases its lease):
//!   another instance answers 409 until the lease expires, then runs the request.
//!
//! Needs `redis-server` on `PATH` (or at `/usr/bin/redis-server`). Missing: each test prints
//! that it is skipped and passes, except under `CI=true`, where it fails. Every Redis process
//! a test starts is killed when the test ends, also when it fails.
#![cfg(feature = "redis")]

mod common;
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/seed_api/main.rs"]
mod seed_api;

use common::in_ci;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc},
    time::Duration,
};

use clap::Parser;
use redis::AsyncCommands;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use tokio::{net::TcpListener, time::Instant};
use tower_idempotency::store::RedisStore;

/// The key prefix every instance in these tests uses.
const PREFIX: &str = "outage:";

/// The upper bound on any wait in these tests; past it the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(15);

/// The pace of probes that wait for a state only time brings (Redis reconnection, a lease
/// expiring).
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// `redis-server` on `PATH`, else `/usr/bin/redis-server`; `None` (after saying so) when there
/// is none, outside CI.
fn redis_server_binary(test: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    });
    let found = on_path.or_else(|| {
        let fallback = PathBuf::from("/usr/bin/redis-server");
        fallback.is_file().then_some(fallback)
    });
    if found.is_none() {
        assert!(
            !in_ci(),
            "redis-server is not installed, and CI=true: {test} must run"
        );
        common::skip(test, "redis-server is not installed");
    }
    found
}

/// A free loopback port below Linux's ephemeral range (32768 and up), chosen at random.
///
/// Not from `bind(0)`: while Redis is down, its port must not be handed to another process's
/// `bind(0)` or become the source port of a client's own connection attempt (a TCP
/// self-connect), either of which would leave it unavailable for the restart.
fn free_port_below_ephemeral_range() -> u16 {
    for _ in 0..100 {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_768) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32767");
}

/// A `redis-server` child process of this test's own, on a fixed loopback port. Killed (and
/// reaped) on drop, so a failing test never leaves one behind.
struct RedisServer {
    binary: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts Redis on a free port and returns once it accepts connections.
    fn start(binary: PathBuf) -> Self {
        let port = free_port_below_ephemeral_range();
        let mut server = Self {
            binary,
            port,
            child: None,
        };
        server.resume();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts Redis (again) on the same port, and returns once its log says it accepts
    /// connections. Nothing is persisted, so it starts empty.
    fn resume(&mut self) {
        assert!(self.child.is_none(), "Redis is already running");
        let mut child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let stdout = child.stdout.take().expect("redis-server stdout");
        self.child = Some(child);
        // Read the log on a thread of its own, for as long as the process runs (so its pipe
        // never fills), and hear when it is ready.
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("Ready to accept connections") {
                    let _ = ready_tx.send(Ok(()));
                }
                log.push(line);
            }
            // The process ended; if it never got ready, say why.
            let _ = ready_tx.send(Err(log.join("\n")));
        });
        match ready_rx.recv_timeout(PATIENCE) {
            Ok(Ok(())) => {}
            Ok(Err(log)) => panic!("redis-server on port {} exited:\n{log}", self.port),
            Err(_) => panic!("redis-server on port {} did not get ready", self.port),
        }
    }

    /// Kills Redis at once (`SIGKILL`: no shutdown, connections cut).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the reference API with a `RedisStore` on `url`, on the current runtime.
async fn serve(config: &seed_api::Config, url: &str) -> SocketAddr {
    let store = RedisStore::open(url)
        .await
        .expect("connect to the test's Redis")
        .prefix(PREFIX);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = seed_api::app_with_store(config, Arc::new(store));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn config(flags: &[&str]) -> seed_api::Config {
    seed_api::Config::parse_from(std::iter::once("seed_api").chain(flags.iter().copied()))
}

/// A client of one instance, as organization `org_outage`.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    addr: SocketAddr,
}

const ORG: &str = "org_outage";

impl Client {
    fn new(addr: SocketAddr) -> Self {
        Self {
            http: reqwest::Client::new(),
            addr,
        }
    }

    /// `POST /agents` with `key`.
    async fn create(&self, key: &str) -> reqwest::Result<Response> {
        self.http
            .post(format!("http://{}/agents", self.addr))
            .bearer_auth(ORG)
            .header("x-idempotency-key", key)
            .json(&json!({ "name": "Support agent", "voice": "alloy" }))
            .send()
            .await
    }

    /// Handler runs on this instance (never touches the idempotency store).
    async fn handler_calls(&self) -> u64 {
        let stats: Value = self
            .http
            .get(format!("http://{}/stats", self.addr))
            .bearer_auth(ORG)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        stats["handler_calls"].as_u64().unwrap()
    }

    /// Waits until the handler has run `n` times on this instance (it counts a run as it
    /// starts).
    async fn until_handler_calls(&self, n: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.handler_calls().await < n {
            assert!(Instant::now() < deadline, "the handler never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn replayed(response: &Response) -> bool {
    response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|value| value == "true")
}

/// Asserts that `response` is the layer's problem of `status` and `kind` with a `Retry-After`.
async fn assert_problem(response: Response, status: StatusCode, kind: &str) {
    assert_eq!(response.status(), status);
    let headers = response.headers();
    assert_eq!(headers["content-type"], "application/problem+json");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert!(!replayed(&response));
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], status.as_u16(), "{problem}");
    assert_eq!(
        problem["type"],
        format!("tag:tower-idempotency,2026:{kind}"),
        "{problem}"
    );
    assert!(problem["title"].is_string() && problem["detail"].is_string());
}

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_503_and_back_up_serves_again_without_restart() {
    let test = "redis_down_answers_503_and_back_up_serves_again_without_restart";
    let Some(binary) = redis_server_binary(test) else {
        return;
    };
    let mut redis = RedisServer::start(binary);
    let api = Client::new(serve(&config(&["--handler-delay-ms", "300"]), &redis.url()).await);

    // Up: a create, and its replay.
    let before = key();
    let first = api.create(&before).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_body = first.bytes().await.unwrap();
    let replay = api.create(&before).await.unwrap();
    assert!(replayed(&replay));
    assert_eq!(replay.bytes().await.unwrap(), first_body);
    assert_eq!(api.handler_calls().await, 1);

    // A request whose handler is running when Redis dies still gets its handler's answer
    // (which could not be stored).
    let running = tokio::spawn({
        let api = api.clone();
        async move { api.create(&key()).await.unwrap() }
    });
    api.until_handler_calls(2).await;
    redis.kill();
    let running = running.await.unwrap();
    assert_eq!(running.status(), StatusCode::CREATED);
    assert!(!replayed(&running));

    // Down: new keys, and the replay of a stored one, get 503; nothing runs.
    let mut down = Vec::new();
    for key in [key(), key(), key(), before.clone()] {
        let api = api.clone();
        down.push(tokio::spawn(async move { api.create(&key).await.unwrap() }));
    }
    for answer in down {
        let answer = answer.await.unwrap();
        assert_problem(answer, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable").await;
    }
    assert_eq!(
        api.handler_calls().await,
        2,
        "a request ran without its store"
    );

    // Up again, same port, same app: a new key is served once the connection manager has
    // reconnected; until then, 503 (and still nothing runs).
    redis.resume();
    let after = key();
    let deadline = Instant::now() + PATIENCE;
    let mut unavailable = 0;
    let created = loop {
        let answer = api.create(&after).await.unwrap();
        if answer.status() == StatusCode::CREATED {
            break answer;
        }
        assert_problem(answer, StatusCode::SERVICE_UNAVAILABLE, "store-unavailable").await;
        assert_eq!(api.handler_calls().await, 2);
        unavailable += 1;
        assert!(Instant::now() < deadline, "the app never reconnected");
        tokio::time::sleep(PROBE_EVERY).await;
    };
    assert!(!replayed(&created));
    let created_body = created.bytes().await.unwrap();
    assert_eq!(api.handler_calls().await, 3);
    let replay = api.create(&after).await.unwrap();
    assert!(
        replayed(&replay),
        "the response was stored after the restart"
    );
    assert_eq!(replay.bytes().await.unwrap(), created_body);
    assert_eq!(api.handler_calls().await, 3);
    eprintln!(
        "{test}: 4 requests while down, all 503; after the restart, {unavailable} more 503 \
         before the first 201; handler runs: 3"
    );
}

/// An instance on a runtime of its own, on a thread of its own, that can be killed: its
/// runtime is shut down without waiting for anything, so no task of it runs again (no lease
/// release, no renewal, no completion), as when a process dies.
struct Doomed {
    addr: SocketAddr,
    kill: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Doomed {
    fn start(config: seed_api::Config, url: String) -> Self {
        let (addr_tx, addr_rx) = mpsc::channel();
        let (kill, killed) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let addr = runtime.block_on(serve(&config, &url));
            addr_tx.send(addr).unwrap();
            // A kill, or the test going away (the sender dropped), ends it.
            let _ = killed.recv();
            runtime.shutdown_background();
        });
        let addr = addr_rx.recv().expect("the doomed instance started");
        Self {
            addr,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the doomed instance's thread");
        }
    }
}

impl Drop for Doomed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server's clock, in milliseconds since the Unix epoch (the clock lease deadlines use).
async fn server_millis(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// The one record under [`PREFIX`]: its Redis key.
async fn only_record(conn: &mut redis::aio::MultiplexedConnection) -> String {
    let keys: Vec<String> = conn.keys(format!("{PREFIX}*")).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys.into_iter().next().unwrap()
}

/// A record's deadline (`d`, see `RedisStore`'s data layout), and whether it holds a lease
/// token (`t`).
async fn deadline(conn: &mut redis::aio::MultiplexedConnection, record: &str) -> (u64, bool) {
    let (deadline, token): (String, Option<Vec<u8>>) = redis::cmd("HMGET")
        .arg(record)
        .arg("d")
        .arg("t")
        .query_async(conn)
        .await
        .unwrap();
    (deadline.parse().unwrap(), token.is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_blocks_its_key_until_the_lease_expires_then_another_instance_runs() {
    let test = "a_killed_owner_blocks_its_key_until_the_lease_expires_then_another_instance_runs";
    let Some(binary) = redis_server_binary(test) else {
        return;
    };
    let redis = RedisServer::start(binary);
    let mut inspect = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // A: a handler far slower than the test; a 2 s lease, renewed every 667 ms while A lives.
    let mut a = Doomed::start(
        config(&["--lease-secs", "2", "--handler-delay-ms", "60000"]),
        redis.url(),
    );
    let a_client = Client::new(a.addr);
    // B: a fast handler, the same lease.
    let b = Client::new(serve(&config(&["--lease-secs", "2"]), &redis.url()).await);

    let key = key();
    let orphaned = tokio::spawn({
        let a_client = a_client.clone();
        let key = key.clone();
        async move { a_client.create(&key).await }
    });
    a_client.until_handler_calls(1).await;
    let record = only_record(&mut inspect).await;
    a.kill();
    assert!(
        orphaned.await.unwrap().is_err(),
        "the client of the killed instance got no answer"
    );

    // Nobody renews A's lease any more: its deadline is fixed. B answers 409 while the
    // server's clock is before it, and runs the request once it has passed.
    let (lease_deadline, in_flight) = deadline(&mut inspect, &record).await;
    assert!(in_flight, "A's lease is still held");
    let give_up = Instant::now() + PATIENCE;
    let mut conflicts = 0;
    let created = loop {
        let sent_at = server_millis(&mut inspect).await;
        let answer = b.create(&key).await.unwrap();
        let answered_at = server_millis(&mut inspect).await;
        if answer.status() == StatusCode::CREATED {
            assert!(
                answered_at >= lease_deadline,
                "B ran the request before A's lease expired"
            );
            break answer;
        }
        // `begin` ran between `sent_at` and `answered_at` and saw the lease live.
        assert!(sent_at < lease_deadline);
        assert_problem(answer, StatusCode::CONFLICT, "in-flight").await;
        assert_eq!(b.handler_calls().await, 0);
        assert_eq!(
            deadline(&mut inspect, &record).await,
            (lease_deadline, true),
            "the dead owner's lease moved"
        );
        conflicts += 1;
        assert!(Instant::now() < give_up, "A's lease never expired");
        tokio::time::sleep(PROBE_EVERY).await;
    };
    assert!(conflicts > 0, "B answered 409 while A's lease was live");
    assert!(!replayed(&created));
    let created_body = created.bytes().await.unwrap();
    assert_eq!(b.handler_calls().await, 1);

    // B's response is the key's response now.
    let replay = b.create(&key).await.unwrap();
    assert!(replayed(&replay));
    assert_eq!(replay.bytes().await.unwrap(), created_body);
    assert_eq!(b.handler_calls().await, 1);
    eprintln!(
        "{test}: {conflicts} x 409 from B until A's lease expired, then B ran it once (A: 1 run, \
         never answered)"
    );
}
