//! The reference API (`examples/seed_api/`) as real processes, killed and stopped.
//!
//! - An instance killed with `SIGKILL` in the middle of a create: its lease stays until it
//!   expires, and the client, retrying on another instance, gets 409 until then; then the
//!   create runs exactly once more, and never a third time.
//! - An instance sent `SIGTERM` while creates whose clients have left still run: it finishes
//!   them and stores their responses before it exits, and retries on another instance replay
//!   them; nothing runs twice (on Redis, and on PostgreSQL with one resource per create).
//!
//! - On PostgreSQL (`--store postgres`, resources in the database, each create committed with
//!   its idempotency record): an instance killed before its commit leaves nothing, and the
//!   retry on another instance creates the one resource; killed after its commit but before
//!   its answer, the retry replays the committed response (same id), still one resource;
//!   paused with `SIGSTOP` past its lease, the retry on another instance creates the resource,
//!   and the paused instance, resumed, is fenced: its commit finds the lease lost and rolls back.
//! - On Redis Cluster (`--store redis-cluster`): concurrent duplicates sent to two instances
//!   run once, and every client gets the one id.
//!
//! Run with the features of the stores to test: `cargo test -p seed_api --all-features`. Cargo
//! builds the `seed_api` binary with the same features before it builds this test.
//!
//! Needs `REDIS_URL`, `REDIS_CLUSTER_URL` and `DATABASE_URL`; unset, a test prints that it is
//! skipped and passes, except under `CI=true`, where it fails. Every process a test starts is
//! killed when the test ends, also when it fails.
#![cfg(any(feature = "redis", feature = "postgres"))]

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

/// The upper bound on any wait in these tests; past it the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(20);

/// A name of this run's own: 16 hex digits.
fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

// ---------------------------------------------------------------------------------------------
// The harness

/// The `seed_api` binary, which cargo builds (with this test's features) before it builds the
/// package's tests.
fn seed_api_binary() -> &'static str {
    env!("CARGO_BIN_EXE_seed_api")
}

/// A `seed_api` child process on a free loopback port. Killed (and reaped) on drop.
struct SeedApi {
    name: String,
    child: Child,
    addr: SocketAddr,
    /// Everything it wrote so far: stdout and stderr, line by line, as they came.
    output: Arc<Mutex<Vec<String>>>,
}

impl SeedApi {
    /// Starts `seed_api` with `flags` (after `--addr 127.0.0.1:0`) and returns once it answers
    /// `GET /stats`.
    async fn start(name: &str, flags: &[&str]) -> Self {
        let mut child = Command::new(seed_api_binary())
            .args(["--addr", "127.0.0.1:0"])
            .args(flags)
            .env("RUST_LOG", "seed_api=info,tower_idempotency=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start seed_api");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        // Read both pipes on threads of their own for as long as the process runs, so they
        // never fill, and hear the address from the banner.
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (pipe, banner) in [
            (Box::new(stdout) as Box<dyn Read + Send>, Some(addr_tx)),
            (Box::new(stderr), None),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Some(banner) = &banner
                        && let Some(addr) = listening_on(&line)
                    {
                        let _ = banner.send(addr);
                    }
                    output.lock().unwrap().push(line);
                }
            });
        }
        let mut api = Self {
            name: name.to_owned(),
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            output,
        };
        let deadline = Instant::now() + PATIENCE;
        api.addr = loop {
            if let Ok(addr) = addr_rx.try_recv() {
                break addr;
            }
            if let Ok(Some(status)) = api.child.try_wait() {
                // Let the reader threads catch the last lines.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "{name} exited at start ({status}):\n{}",
                    api.output().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "{name} printed no address:\n{}",
                api.output().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let client = reqwest::Client::new();
        loop {
            let answered = client
                .get(format!("http://{}/stats", api.addr))
                .bearer_auth("probe")
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if answered {
                break api;
            }
            assert!(Instant::now() < deadline, "{name} does not answer");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What it wrote so far, stdout and stderr.
    fn output(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `SIGKILL`, and waits for the process to be gone.
    fn kill(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("reap seed_api")
    }

    /// Sends `SIGTERM`.
    fn terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits up to `limit` for the process to exit.
    async fn exited_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll seed_api") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /stats` for `org`: create-handler runs on this instance.
    async fn handler_calls(&self, client: &reqwest::Client, org: &str) -> u64 {
        let stats: Value = client
            .get(self.url("/stats"))
            .bearer_auth(org)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: GET /stats: {e}", self.name))
            .json()
            .await
            .unwrap();
        stats["handler_calls"].as_u64().unwrap()
    }

    /// `GET /<collection>` for `org`: the resources this instance holds.
    async fn list(&self, client: &reqwest::Client, org: &str, collection: &str) -> Vec<Value> {
        let list: Value = client
            .get(self.url(&format!("/{collection}")))
            .bearer_auth(org)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: GET /{collection}: {e}", self.name))
            .json()
            .await
            .unwrap();
        list["data"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until the create handler has started `n` times on this instance for `org` (it
    /// counts a run as it starts).
    async fn until_handler_calls(&self, client: &reqwest::Client, org: &str, n: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.handler_calls(client, org).await < n {
            assert!(
                Instant::now() < deadline,
                "{}: the handler never started",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for SeedApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in `seed_api`'s banner line `seed_api listening on http://<addr> (...)`.
fn listening_on(line: &str) -> Option<SocketAddr> {
    let rest = line.split_once("listening on http://")?.1;
    rest.split_whitespace().next()?.parse().ok()
}

/// An answer, with what the checks need.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    replayed: bool,
    body: Value,
}

/// `POST /<collection>` on `api` as `org`, with `key` and `body`.
async fn create(
    client: &reqwest::Client,
    api: &SeedApi,
    org: &str,
    collection: &str,
    key: &str,
    body: &Value,
) -> reqwest::Result<Answer> {
    let response = client
        .post(api.url(&format!("/{collection}")))
        .bearer_auth(org)
        .header("x-idempotency-key", key)
        .json(body)
        .send()
        .await?;
    let status = response.status();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body = response.json().await?;
    Ok(Answer {
        status,
        replayed,
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// The tests

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_killed_mid_handler_runs_once_more_after_its_lease_and_never_again() {
    let test = "a_create_killed_mid_handler_runs_once_more_after_its_lease_and_never_again";
    let Some(redis_url) = common::service_url("REDIS_URL", test) else {
        return;
    };
    let flags = [
        "--store",
        "redis",
        "--redis-url",
        &redis_url,
        "--handler-delay-ms",
        "2000",
        "--lease-secs",
        "3",
    ];
    let mut a = SeedApi::start("A", &flags).await;
    let b = SeedApi::start("B", &flags).await;
    let client = reqwest::Client::new();
    let org = format!("sk_test_{}", unique());
    let key = uuid::Uuid::new_v4().to_string();
    let body = json!({ "name": "Support agent", "voice": "alloy" });

    // The create starts on A; A is killed while its handler sleeps.
    let first = tokio::spawn({
        let (client, url, org, key, body) = (
            client.clone(),
            a.url("/agents"),
            org.clone(),
            key.clone(),
            body.clone(),
        );
        async move {
            client
                .post(url)
                .bearer_auth(org)
                .header("x-idempotency-key", key)
                .json(&body)
                .send()
                .await
        }
    });
    a.until_handler_calls(&client, &org, 1).await;
    let killed_at = Instant::now();
    let status = a.kill();
    assert!(!status.success(), "A was killed: {status}");
    assert!(
        first.await.unwrap().is_err(),
        "the client of the killed instance got no answer"
    );

    // The client retries on B: 409 while A's lease lasts (3 s at most from A's last renewal),
    // then B runs the create.
    let mut conflicts = 0;
    let created = loop {
        let answer = create(&client, &b, &org, "agents", &key, &body)
            .await
            .expect("B answers");
        if answer.status == StatusCode::CREATED {
            break answer;
        }
        assert_eq!(answer.status, StatusCode::CONFLICT, "{answer:?}");
        assert_eq!(b.handler_calls(&client, &org).await, 0, "B ran it early");
        conflicts += 1;
        assert!(
            killed_at.elapsed() < PATIENCE,
            "A's lease never expired: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let waited = killed_at.elapsed();
    assert!(conflicts > 0, "B answered 409 while A's lease was live");
    assert!(!created.replayed);
    assert!(
        // The lease, B's handler, and room for a loaded machine.
        waited < Duration::from_secs(3) + Duration::from_secs(2) + Duration::from_secs(3),
        "the lease outlived its 3 s: {waited:?}"
    );

    // Never a third time: retries on B, and on a new instance, replay B's response.
    let c = SeedApi::start("C", &flags).await;
    for api in [&b, &c, &b] {
        let replay = create(&client, api, &org, "agents", &key, &body)
            .await
            .expect("answers");
        assert_eq!(replay.status, StatusCode::CREATED, "{replay:?}");
        assert!(replay.replayed, "{replay:?}");
        assert_eq!(replay.body, created.body);
    }
    let runs_b = b.handler_calls(&client, &org).await;
    let runs_c = c.handler_calls(&client, &org).await;
    assert_eq!((runs_b, runs_c), (1, 0), "runs on B and C after A's one");
    let agents = b.list(&client, &org, "agents").await;
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(agents[0]["id"], created.body["data"]["id"]);
    eprintln!(
        "{test}: A killed mid-handler; {conflicts} x 409 from B for {waited:.1?}, then B ran it \
         once; B and a new instance C replay it (runs: A 1, B {runs_b}, C {runs_c})"
    );
}

/// Starts A and B with `flags` (and a 60 s lease, a 2 s handler, a 20 s drain), sends five
/// creates to A whose clients leave after 1 s, sends A `SIGTERM`, and checks that A drains
/// and exits, and that retries on B replay every create and run none. Returns B, the
/// organization, and the replayed bodies.
async fn sigterm_drains(test: &str, flags: &[&str]) -> (SeedApi, String, Vec<Value>) {
    // A lease far longer than the test: a create that A does not finish blocks its key with
    // 409 for all of it.
    let mut flags = flags.to_vec();
    flags.extend([
        "--handler-delay-ms",
        "2000",
        "--lease-secs",
        "60",
        "--drain-timeout-secs",
        "20",
    ]);
    let mut a = SeedApi::start("A", &flags).await;
    let b = SeedApi::start("B", &flags).await;
    let client = reqwest::Client::new();
    let org = format!("sk_test_{}", unique());
    let body = json!({ "name": "Support agent", "voice": "alloy" });

    // Five creates on A whose clients give up after 1 s, long before the handlers finish.
    let keys: Vec<String> = (0..5).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    for key in &keys {
        let gone = create(&impatient, &a, &org, "agents", key, &body).await;
        assert!(gone.is_err_and(|e| e.is_timeout()), "the client left");
    }
    a.until_handler_calls(&client, &org, 5).await;

    // SIGTERM while the five run detached: A finishes them, stores their responses, and exits.
    let terminated_at = Instant::now();
    a.terminate();
    let status = a.exited_within(Duration::from_secs(15)).await;
    let took = terminated_at.elapsed();
    let output = a.output().join("\n");
    let status = status.unwrap_or_else(|| panic!("A did not exit after SIGTERM:\n{output}"));
    assert!(status.success(), "A exited with {status}:\n{output}");
    // Its log, filtered by `RUST_LOG=seed_api=info,...`, says so.
    assert!(
        output.contains("drained; exiting"),
        "A did not log that it drained:\n{output}"
    );

    // Every retry, on B, is the replay of A's response: nothing runs again, nothing waits.
    let mut replayed = Vec::new();
    for key in &keys {
        let answer = create(&client, &b, &org, "agents", key, &body)
            .await
            .expect("B answers");
        assert_eq!(
            (answer.status, answer.replayed),
            (StatusCode::CREATED, true),
            "A did not store this create before it exited: {answer:?}\nA's output:\n{output}"
        );
        assert_eq!(answer.body["data"]["object"], "agent");
        replayed.push(answer.body);
    }
    assert_eq!(
        b.handler_calls(&client, &org).await,
        0,
        "B ran a create again"
    );
    eprintln!(
        "{test}: 5 creates running detached on A; SIGTERM; A exited ({status}) after {took:.1?}; \
         B replayed all 5 and ran none"
    );
    (b, org, replayed)
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_creates_whose_clients_left_and_another_instance_replays_them() {
    let test = "sigterm_drains_creates_whose_clients_left_and_another_instance_replays_them";
    let Some(redis_url) = common::service_url("REDIS_URL", test) else {
        return;
    };
    sigterm_drains(test, &["--store", "redis", "--redis-url", &redis_url]).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sigterm_drains_and_every_create_made_one_resource() {
    let test = "postgres_sigterm_drains_and_every_create_made_one_resource";
    let Some(url) = common::service_url("DATABASE_URL", test) else {
        return;
    };
    let (b, org, replayed) = sigterm_drains(test, &postgres_flags(&url, &[])).await;
    // One agent per create, each the one its retry replayed.
    let agents = b.list(&reqwest::Client::new(), &org, "agents").await;
    let mut listed: Vec<&Value> = agents.iter().map(|agent| &agent["id"]).collect();
    let mut replayed: Vec<&Value> = replayed.iter().map(|body| &body["data"]["id"]).collect();
    listed.sort_by_key(|id| id.to_string());
    replayed.sort_by_key(|id| id.to_string());
    assert_eq!(listed, replayed, "one agent per create, as replayed");
}

/// `seed_api --store postgres` flags on `url`, then `more`.
#[cfg(feature = "postgres")]
fn postgres_flags<'a>(url: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec!["--store", "postgres", "--database-url", url];
    flags.extend_from_slice(more);
    flags
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_create_killed_before_its_commit_leaves_nothing_and_the_retry_creates_one() {
    let test =
        "postgres_a_create_killed_before_its_commit_leaves_nothing_and_the_retry_creates_one";
    let Some(url) = common::service_url("DATABASE_URL", test) else {
        return;
    };
    let flags = postgres_flags(&url, &["--handler-delay-ms", "2000", "--lease-secs", "3"]);
    let mut a = SeedApi::start("A", &flags).await;
    let b = SeedApi::start("B", &flags).await;
    let client = reqwest::Client::new();
    let org = format!("sk_test_{}", unique());
    let key = uuid::Uuid::new_v4().to_string();
    let body = json!({ "name": "Support agent", "voice": "alloy" });

    // Killed while the handler sleeps, before its transaction began.
    let first = tokio::spawn({
        let (client, url) = (client.clone(), a.url("/agents"));
        let (org, key, body) = (org.clone(), key.clone(), body.clone());
        async move {
            client
                .post(url)
                .bearer_auth(org)
                .header("x-idempotency-key", key)
                .json(&body)
                .send()
                .await
        }
    });
    a.until_handler_calls(&client, &org, 1).await;
    let killed_at = Instant::now();
    a.kill();
    assert!(
        first.await.unwrap().is_err(),
        "the killed instance answered"
    );
    assert!(
        b.list(&client, &org, "agents").await.is_empty(),
        "nothing was committed"
    );

    // The retry on B: 409 while A's lease lasts, then one run.
    let mut conflicts = 0;
    let created = loop {
        let answer = create(&client, &b, &org, "agents", &key, &body)
            .await
            .expect("B answers");
        if answer.status == StatusCode::CREATED {
            break answer;
        }
        assert_eq!(answer.status, StatusCode::CONFLICT, "{answer:?}");
        conflicts += 1;
        assert!(killed_at.elapsed() < PATIENCE, "A's lease never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!created.replayed);
    let replay = create(&client, &b, &org, "agents", &key, &body)
        .await
        .expect("B answers");
    assert!(replay.replayed && replay.body == created.body, "{replay:?}");

    let agents = b.list(&client, &org, "agents").await;
    assert_eq!(agents.len(), 1, "exactly one agent: {agents:?}");
    assert_eq!(agents[0]["id"], created.body["data"]["id"]);
    eprintln!(
        "{test}: A killed before its commit: no agent; {conflicts} x 409 from B, then B created \
         the one agent; its retry replays it"
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_create_killed_after_its_commit_is_replayed_with_the_same_id() {
    let test = "postgres_a_create_killed_after_its_commit_is_replayed_with_the_same_id";
    let Some(url) = common::service_url("DATABASE_URL", test) else {
        return;
    };
    // A commits at once and then waits 5 s before answering: killed in between.
    let mut a = SeedApi::start(
        "A",
        &postgres_flags(
            &url,
            &["--after-commit-delay-ms", "5000", "--lease-secs", "3"],
        ),
    )
    .await;
    let b = SeedApi::start("B", &postgres_flags(&url, &["--lease-secs", "3"])).await;
    let client = reqwest::Client::new();
    let org = format!("sk_test_{}", unique());
    let key = uuid::Uuid::new_v4().to_string();
    let body = json!({ "name": "Support agent", "voice": "alloy" });

    let first = tokio::spawn({
        let (client, url) = (client.clone(), a.url("/agents"));
        let (org, key, body) = (org.clone(), key.clone(), body.clone());
        async move {
            client
                .post(url)
                .bearer_auth(org)
                .header("x-idempotency-key", key)
                .json(&body)
                .send()
                .await
        }
    });
    // The agent is visible from B once A's transaction committed.
    let deadline = Instant::now() + PATIENCE;
    let committed = loop {
        let agents = b.list(&client, &org, "agents").await;
        if let [agent] = agents.as_slice() {
            break agent.clone();
        }
        assert!(agents.is_empty(), "{agents:?}");
        assert!(Instant::now() < deadline, "A never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    a.kill();
    assert!(
        first.await.unwrap().is_err(),
        "the client of the killed instance got no answer"
    );

    // The retry on B, at once: the committed response, the same agent.
    let replay = create(&client, &b, &org, "agents", &key, &body)
        .await
        .expect("B answers");
    assert_eq!(
        (replay.status, replay.replayed),
        (StatusCode::CREATED, true),
        "{replay:?}"
    );
    assert_eq!(replay.body["data"]["id"], committed["id"]);
    assert_eq!(b.handler_calls(&client, &org).await, 0, "B ran it again");
    let agents = b.list(&client, &org, "agents").await;
    assert_eq!(agents.len(), 1, "still one agent: {agents:?}");
    eprintln!(
        "{test}: A killed between its commit and its answer; B replays the committed agent \
         ({}), one agent in all",
        committed["id"]
    );
}

/// `SIGSTOP` (a paused VM, a stop-the-world pause) for longer than the lease, mid-handler, on
/// PostgreSQL: the retry on another instance takes the key over and creates the agent; when
/// the paused instance resumes, its handler finishes and tries to commit with the token that
/// lost the lease: the fencing `UPDATE` finds no row, its transaction rolls back, its client
/// gets 409, and there is one agent in all.
#[cfg(all(feature = "postgres", unix))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_create_paused_past_its_lease_is_fenced_when_it_resumes() {
    let test = "postgres_a_create_paused_past_its_lease_is_fenced_when_it_resumes";
    let Some(url) = common::service_url("DATABASE_URL", test) else {
        return;
    };
    let flags = postgres_flags(&url, &["--handler-delay-ms", "1500", "--lease-secs", "2"]);
    let a = SeedApi::start("A", &flags).await;
    let b = SeedApi::start("B", &flags).await;
    let signal = |name: &str, pid: u32| {
        let sent = Command::new("kill")
            .args([name, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill {name} {pid} failed");
    };
    let client = reqwest::Client::new();
    let org = format!("sk_test_{}", unique());
    let key = uuid::Uuid::new_v4().to_string();
    let body = json!({ "name": "Support agent", "voice": "alloy" });

    let first = tokio::spawn({
        let client = client.clone();
        let (org, key, body) = (org.clone(), key.clone(), body.clone());
        let url = a.url("/agents");
        async move {
            client
                .post(url)
                .bearer_auth(org)
                .header("x-idempotency-key", key)
                .json(&body)
                .send()
                .await
        }
    });
    a.until_handler_calls(&client, &org, 1).await;
    signal("-STOP", a.pid());
    let stopped_at = Instant::now();

    // The retry on B: 409 while A's lease lasts, then B runs it.
    let created = loop {
        let answer = create(&client, &b, &org, "agents", &key, &body)
            .await
            .expect("B answers");
        if answer.status == StatusCode::CREATED {
            break answer;
        }
        assert_eq!(answer.status, StatusCode::CONFLICT, "{answer:?}");
        assert!(stopped_at.elapsed() < PATIENCE, "A's lease never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!created.replayed, "{created:?}");

    // A resumes: its handler finishes with a lost lease.
    signal("-CONT", a.pid());
    let resumed = tokio::time::timeout(PATIENCE, first)
        .await
        .expect("A answers after it resumes")
        .unwrap()
        .expect("A answers");
    let status = resumed.status();
    assert_eq!(status, StatusCode::CONFLICT, "the fenced owner's answer");
    let agents = b.list(&client, &org, "agents").await;
    assert_eq!(agents.len(), 1, "one agent in all: {agents:?}");
    assert_eq!(agents[0]["id"], created.body["data"]["id"]);
    let replay = create(&client, &a, &org, "agents", &key, &body)
        .await
        .expect("A answers");
    assert!(replay.replayed && replay.body == created.body, "{replay:?}");
    eprintln!(
        "{test}: A paused past its lease; B created the agent; A resumed, was fenced (409), \
         one agent in all"
    );
}

/// Two instances on one Redis Cluster (`--store redis-cluster`), every create sent at once to
/// both by three clients each: one run per create in all, and every client gets the one
/// response (the same id), at once or after 409s.
#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_concurrent_duplicates_on_two_instances_run_once() {
    let test = "redis_cluster_concurrent_duplicates_on_two_instances_run_once";
    let Some(url) = common::service_url("REDIS_CLUSTER_URL", test) else {
        return;
    };
    let flags = [
        "--store",
        "redis-cluster",
        "--redis-url",
        url.as_str(),
        "--handler-delay-ms",
        "200",
    ];
    let apis = [
        SeedApi::start("A", &flags).await,
        SeedApi::start("B", &flags).await,
    ];
    let client = reqwest::Client::new();
    let org = format!("sk_test_{}", unique());
    const CREATES: usize = 40;
    let mut tasks = tokio::task::JoinSet::new();
    for create_no in 0..CREATES {
        let key = uuid::Uuid::new_v4().to_string();
        let body = json!({ "name": format!("agent {create_no}") });
        for client_no in 0..6 {
            let (client, org, key, body) = (client.clone(), org.clone(), key.clone(), body.clone());
            let url = apis[client_no % 2].url("/agents");
            tasks.spawn(async move {
                let deadline = Instant::now() + PATIENCE;
                loop {
                    let response = client
                        .post(&url)
                        .bearer_auth(&org)
                        .header("x-idempotency-key", &key)
                        .json(&body)
                        .send()
                        .await
                        .expect("the instance answers");
                    let status = response.status();
                    let answer: Value = response.json().await.unwrap();
                    if status == StatusCode::CREATED {
                        return (create_no, answer["data"]["id"].as_str().unwrap().to_owned());
                    }
                    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
                    assert!(
                        Instant::now() < deadline,
                        "create {create_no} never answered"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
    }
    let mut ids = std::collections::HashMap::<usize, std::collections::HashSet<String>>::new();
    while let Some(done) = tasks.join_next().await {
        let (create_no, id) = done.unwrap();
        ids.entry(create_no).or_default().insert(id);
    }
    let split: Vec<_> = ids.iter().filter(|(_, ids)| ids.len() != 1).collect();
    assert!(
        split.is_empty(),
        "creates answered with more than one id: {split:?}"
    );
    let mut runs = 0;
    for api in &apis {
        runs += api.handler_calls(&client, &org).await;
    }
    assert_eq!(
        runs, CREATES as u64,
        "one run per create across both instances"
    );
    eprintln!("{test}: {CREATES} creates x 6 clients on 2 instances: {runs} runs, one id each");
}
