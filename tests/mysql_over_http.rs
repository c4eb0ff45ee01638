//! `MySqlStore` behind apps over HTTP, against a real MariaDB (or MySQL): two instances, each
//! with its own pool on one table, run a request sent 40 times at once only once (answering
//! the others 409, or waiting and replaying); and a server that crashes and comes back: 503
//! while it is down, served again without a restart once it is up, with the responses stored
//! before the crash.
//!
//! Needs `MYSQL_URL` (for example `mysql://root@127.0.0.1:3306/test`). Without it the tests print
//! that they are skipped and pass, except under `CI=true`, where a missing URL or an unreachable
//! server fails them. Every test works in a table of its own, with a random name, dropped at
//! the end, so tests and runs never collide.
//!
//! The crash test starts a server of its own instead (`mariadb-install-db` and `mariadbd`, in a
//! temporary directory, on a free loopback port); it skips (fails under CI) when they are not
//! installed.
#![cfg(all(feature = "mysql", feature = "testing"))]

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, http::StatusCode, routing::post};
use common::mysql::{PATIENCE, mysql_url, pool_on, with_store};
use serde_json::{Value, json};
use sqlx::{Connection, mysql::MySqlPoolOptions};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tower_idempotency::{IdempotencyLayer, store::MySqlStore};

// ---------------------------------------------------------------------------------------------
// Over HTTP: instances of an app, each with its own pool

/// Requests the test sends at once, with one key.
const DUPLICATES: usize = 40;
/// The organization the requests act for.
const ORG: &str = "org_mysql";

/// An app with one idempotent `POST /calls` that counts its runs and takes `delay`.
fn app(store: MySqlStore, delay: Duration, runs: Arc<AtomicU64>, waiting: bool) -> Router {
    let mut layer = IdempotencyLayer::new()
        .store(store)
        .post("/calls")
        .store_timeout(Duration::from_secs(2));
    if waiting {
        layer = layer.in_flight(tower_idempotency::InFlight::Wait {
            timeout: Duration::from_secs(20),
        });
    }
    Router::new()
        .route(
            "/calls",
            post(move |body: String| {
                let runs = runs.clone();
                async move {
                    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(delay).await;
                    let call =
                        json!({ "id": uuid::Uuid::new_v4().to_string(), "run": run, "body": body });
                    (StatusCode::CREATED, axum::Json(call))
                }
            }),
        )
        .layer(layer)
}

async fn serve(app: Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, server)
}

fn create(client: &reqwest::Client, addr: SocketAddr, key: &str) -> reqwest::RequestBuilder {
    client
        .post(format!("http://{addr}/calls"))
        .bearer_auth(ORG)
        .header("x-idempotency-key", key)
        .body(r#"{"to":"+15550100"}"#)
}

fn replayed(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|value| value == "true")
}

/// Two instances, each with its own pool on one table; 40 identical requests alternate
/// between them while the first runs.
async fn two_instances(waiting: bool) {
    with_store(|store| async move {
        let url = mysql_url("two instances").unwrap();
        let runs = Arc::new(AtomicU64::new(0));
        let mut servers = Vec::new();
        for _ in 0..2 {
            let own = MySqlStore::new(pool_on(&url, 10).await)
                .with_table_name(store.table_name())
                .unwrap();
            own.migrate()
                .await
                .expect("each instance migrates at start");
            servers.push(serve(app(own, Duration::from_millis(400), runs.clone(), waiting)).await);
        }
        let client = reqwest::Client::new();
        let key = uuid::Uuid::new_v4().to_string();
        let mut requests = JoinSet::new();
        for n in 0..DUPLICATES {
            let request = create(&client, servers[n % 2].0, &key);
            requests.spawn(async move {
                let response = request.send().await.unwrap();
                let replayed = replayed(&response);
                (response.status(), replayed, response.bytes().await.unwrap())
            });
        }
        let answers = requests.join_all().await;
        let originals: Vec<_> = answers
            .iter()
            .filter(|(status, replayed, _)| *status == StatusCode::CREATED && !replayed)
            .collect();
        assert_eq!(originals.len(), 1, "exactly one original answer");
        let (mut replays, mut conflicts) = (0, 0);
        for (status, replayed, body) in &answers {
            match *status {
                StatusCode::CREATED => {
                    assert_eq!(body, &originals[0].2, "every 201 is the one response");
                    replays += usize::from(*replayed);
                }
                StatusCode::CONFLICT if !waiting => {
                    let problem: Value = serde_json::from_slice(body).unwrap();
                    assert_eq!(problem["type"], "tag:tower-idempotency,2026:in-flight");
                    conflicts += 1;
                }
                other => panic!("unexpected answer {other}: {body:?}"),
            }
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "the handler ran once in all"
        );
        eprintln!(
            "{DUPLICATES} duplicates over 2 instances (waiting: {waiting}): 1 run, {replays} \
             replays, {conflicts} x 409"
        );
        for (_, server) in servers {
            server.abort();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_run_the_handler_once() {
    two_instances(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_waiting_all_get_the_one_response() {
    two_instances(true).await;
}

// ---------------------------------------------------------------------------------------------
// A server that crashes and comes back

/// `name` on `PATH`, else in `/usr/sbin` or `/usr/bin`.
fn binary(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        ["/usr/sbin", "/usr/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// A free loopback port below Linux's ephemeral range (32768 and up), chosen at random, so
/// that while the server is down its port is not handed to another `bind(0)` or used as a
/// client's source port.
fn free_port_below_ephemeral_range() -> u16 {
    for _ in 0..100 {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_768) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32767");
}

/// A `mariadbd` of this test's own: a fresh data directory under the system's temporary
/// directory, a fixed loopback port, no authentication. Killed on drop, its directory removed.
struct MariaDb {
    server: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl MariaDb {
    /// Initializes a data directory and starts the server; `None` (after saying so) when
    /// MariaDB is not installed, outside CI.
    async fn start(test: &str) -> Option<Self> {
        let (Some(install), Some(server)) = (binary("mariadb-install-db"), binary("mariadbd"))
        else {
            assert!(
                !common::in_ci(),
                "mariadbd or mariadb-install-db is not installed, and CI=true: {test} must run"
            );
            common::skip(test, "mariadbd or mariadb-install-db is not installed");
            return None;
        };
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-mariadb-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let output = Command::new(install)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .arg(format!("--user={}", whoami()))
            .output()
            .expect("run mariadb-install-db");
        assert!(
            output.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut db = Self {
            server,
            dir,
            port: free_port_below_ephemeral_range(),
            child: None,
        };
        db.resume().await;
        let mut conn = sqlx::MySqlConnection::connect(&db.url_without_database())
            .await
            .unwrap();
        sqlx::query("CREATE DATABASE IF NOT EXISTS test")
            .execute(&mut conn)
            .await
            .unwrap();
        Some(db)
    }

    fn url_without_database(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/test", self.port)
    }

    /// Starts the server (again) on its data directory and port, and returns once it answers.
    async fn resume(&mut self) {
        assert!(self.child.is_none(), "MariaDB is already running");
        let data = self.dir.join("data");
        let child = Command::new(&self.server)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!(
                "--socket={}",
                self.dir.join("mysqld.sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("mysqld.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                self.dir.join("error.log").display()
            ))
            .arg(format!("--port={}", self.port))
            .arg(format!("--user={}", whoami()))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--innodb-flush-log-at-trx-commit=1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(mut conn) = sqlx::MySqlConnection::connect(&self.url_without_database()).await
                && conn.ping().await.is_ok()
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                panic!("mariadbd exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "mariadbd did not get ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the server at once (`SIGKILL`: a crash; connections cut, nothing flushed that
    /// was not flushed at commit).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The user the server runs as (it refuses root unless told `--user=root`).
fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| {
        let output = Command::new("id").arg("-un").output().expect("id -un");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    })
}

async fn assert_unavailable(response: reqwest::Response) {
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert!(!replayed(&response));
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        problem["type"], "tag:tower-idempotency,2026:store-unavailable",
        "{problem}"
    );
}

/// MariaDB is killed mid-request: covered requests get 503 and nothing runs. It starts again
/// on the same data directory and port: the same app and store serve again, and a response
/// stored before the crash is still replayed (committed with `innodb_flush_log_at_trx_commit
/// = 1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_server_answers_503_and_back_up_serves_again_without_restart() {
    let test = "a_crashed_server_answers_503_and_back_up_serves_again_without_restart";
    let Some(mut db) = MariaDb::start(test).await else {
        return;
    };
    // A pool that gives up on a dead server sooner than the layer's store timeout.
    let pool = MySqlPoolOptions::new()
        .max_connections(5)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&db.url())
        .await
        .unwrap();
    let store = MySqlStore::new(pool);
    store.migrate().await.unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let (addr, _server) = serve(app(store, Duration::from_millis(300), runs.clone(), false)).await;
    let client = reqwest::Client::new();

    // Up: a create, and its replay.
    let before = uuid::Uuid::new_v4().to_string();
    let first = create(&client, addr, &before).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_body = first.bytes().await.unwrap();
    let replay = create(&client, addr, &before).send().await.unwrap();
    assert!(replayed(&replay));
    assert_eq!(replay.bytes().await.unwrap(), first_body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A request whose handler runs when the server dies still gets its handler's answer.
    let running = tokio::spawn(create(&client, addr, &uuid::Uuid::new_v4().to_string()).send());
    let deadline = Instant::now() + PATIENCE;
    while runs.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the handler never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    db.kill();
    let running = running.await.unwrap().unwrap();
    assert_eq!(running.status(), StatusCode::CREATED);
    assert!(!replayed(&running));

    // Down: new keys, and the replay of a stored one, get 503; nothing runs.
    let mut down = JoinSet::new();
    for key in [
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
        before.clone(),
    ] {
        down.spawn(create(&client, addr, &key).send());
    }
    for answer in down.join_all().await {
        assert_unavailable(answer.unwrap()).await;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "a request ran without its store"
    );

    // Up again, same data and port, same app: served once the pool has reconnected.
    db.resume().await;
    let after = uuid::Uuid::new_v4().to_string();
    let deadline = Instant::now() + PATIENCE;
    let mut unavailable = 0;
    let created = loop {
        let answer = create(&client, addr, &after).send().await.unwrap();
        if answer.status() == StatusCode::CREATED {
            break answer;
        }
        assert_unavailable(answer).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        unavailable += 1;
        assert!(Instant::now() < deadline, "the app never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!replayed(&created));
    let created_body = created.bytes().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let replay = create(&client, addr, &after).send().await.unwrap();
    assert!(replayed(&replay));
    assert_eq!(replay.bytes().await.unwrap(), created_body);

    // The response stored before the crash survived it.
    let replay = create(&client, addr, &before).send().await.unwrap();
    assert!(
        replayed(&replay),
        "the response stored before the crash was lost"
    );
    assert_eq!(replay.bytes().await.unwrap(), first_body);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    eprintln!(
        "{test}: 3 requests while down, all 503; after the restart, {unavailable} more 503 \
         before the first 201; the response stored before the crash replayed; handler runs: 3"
    );
}
