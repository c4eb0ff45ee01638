//! The fault runs of `tests/store_faults_redis.rs`, `store_faults_postgres.rs` and
//! `store_faults_mysql.rs`: three instances of an API share one store (Redis, PostgreSQL or
//! MySQL/MariaDB) through a TCP fault proxy, while clients retry every create until they get a
//! 2xx; the network to the store fails under them. The handler must run exactly once per
//! create, and every client of a create must get the one response.
//!
//! - Each instance is an axum app on a listener of its own, with its own layer and its own
//!   store connection (`RedisStore::open`, `PostgresStore::connect`, `MySqlStore::connect`) to
//!   the proxy. Lease 10 s.
//! - 150 logical creates, started over the first seconds of the run, each sent by two clients
//!   with the same key and body. A client gives up on an attempt after 1 s and tries the next
//!   instance, and goes on until it gets a 2xx.
//! - The handler records each run of each create (by the `create` field of the body) in a
//!   ledger shared by the three instances, works 0.5 to 2.5 s, and answers 201 with a fresh id.
//! - Faults, one test each, all shorter than the lease, so the count of double runs must be
//!   zero: a 6 s partition of the store (bytes stop both ways and flow again after, nothing
//!   lost); a 6 s crash of the store (every connection closed, new ones refused, then back with
//!   its data); on PostgreSQL and MySQL also latency spikes (every chunk delayed 1.5 s each way
//!   for 2 s, then 3 s each way for 4 s).
//! - The tests of the proxy itself, against an echo server, are in `tests/fault_proxy.rs`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, http::StatusCode, routing::post};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tower_idempotency::{IdempotencyLayer, IdempotencyStore};

use super::proxy::{FaultProxy, NetFault};

pub const INSTANCES: usize = 3;
const CREATES: usize = 150;
const CLIENTS_PER_CREATE: usize = 2;
const LEASE: Duration = Duration::from_secs(10);
/// How long a client waits for one attempt before it tries the next instance.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);
/// A client's pause between attempts.
const CLIENT_PAUSE: Duration = Duration::from_millis(200);
/// The handler's work: from `WORK_MIN` to `WORK_MIN + WORK_SPREAD`, by create.
const WORK_MIN: Duration = Duration::from_millis(500);
const WORK_SPREAD: u64 = 2_000;
/// Past this, counted from the start of the run, a client that has no 2xx yet fails the test.
const GIVE_UP: Duration = Duration::from_secs(50);

/// One fault, from `at` (since the start of the run) for `lasting`.
#[derive(Debug, Clone, Copy)]
struct Window {
    at: Duration,
    lasting: Duration,
    fault: NetFault,
}

const fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// A run's shape: when the creates start, and the faults.
pub struct Plan {
    /// Creates start evenly over this span from the start of the run.
    spread: Duration,
    faults: &'static [Window],
}

/// A 6 s partition from 2 s on, while the creates started in the first 4 s run: bytes stop
/// both ways and flow again after, nothing lost.
pub const PARTITION: Plan = Plan {
    spread: ms(4_000),
    faults: &[Window {
        at: ms(2_000),
        lasting: ms(6_000),
        fault: NetFault::Blackhole,
    }],
};

/// The store crashes for 6 s from 2 s on, while the creates started in the first 4 s run:
/// every connection is closed and new ones are refused, then it is back with its data.
pub const CRASH: Plan = Plan {
    spread: ms(4_000),
    faults: &[Window {
        at: ms(2_000),
        lasting: ms(6_000),
        fault: NetFault::Reset,
    }],
};

/// Latency spikes, 6 s in all from 1 s on: every chunk delayed 1.5 s each way for 2 s, then
/// 3 s each way for 4 s, while the creates started in the first 6 s run. Every store call then
/// outlasts the layer's store timeout (2 s): to the layer it is a 6 s outage.
pub const LATENCY: Plan = Plan {
    spread: ms(6_000),
    faults: &[
        Window {
            at: ms(1_000),
            lasting: ms(2_000),
            fault: NetFault::Latency(ms(1_500)),
        },
        Window {
            at: ms(3_000),
            lasting: ms(4_000),
            fault: NetFault::Latency(ms(3_000)),
        },
    ],
};

/// The fault runs of a test binary run one at a time: each loads the two cores on its own.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A name of this run's own: 16 hex digits.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

/// The `host:port` that `url` names (`default_port` when it names none), and `url` with it
/// replaced by `proxy`.
pub fn through_proxy(url: &str, proxy: SocketAddr, default_port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (format!("{userinfo}@"), host_port),
        None => (String::new(), authority),
    };
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    let upstream = if has_port {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    (upstream, format!("{scheme}://{userinfo}{proxy}{tail}"))
}

/// The address of the server `url` names.
pub async fn upstream(url: &str, default_port: u16) -> SocketAddr {
    let unused = SocketAddr::from(([127, 0, 0, 1], 0));
    super::proxy::resolve(&through_proxy(url, unused, default_port).0).await
}

// ---------------------------------------------------------------------------------------------
// The instances

/// One run of the handler.
#[derive(Debug, Clone)]
struct Run {
    instance: usize,
    id: String,
    /// When it started, since the start of the run.
    at: Duration,
}

/// Every handler run, by create, across all instances.
#[derive(Default, Clone)]
struct Ledger(Arc<Mutex<HashMap<u64, Vec<Run>>>>);

impl Ledger {
    fn record(&self, create: u64, run: Run) {
        self.0.lock().unwrap().entry(create).or_default().push(run);
    }

    fn runs(&self) -> HashMap<u64, Vec<Run>> {
        self.0.lock().unwrap().clone()
    }
}

/// The handler: records the run, works, answers 201 `{"id", "create", "instance"}`.
async fn create(
    instance: usize,
    ledger: Ledger,
    started: Instant,
    body: Json<Value>,
) -> (StatusCode, Json<Value>) {
    let create = body["create"].as_u64().expect("create number");
    let work = body["work_ms"].as_u64().expect("work_ms");
    let id = uuid::Uuid::new_v4().to_string();
    ledger.record(
        create,
        Run {
            instance,
            id: id.clone(),
            at: started.elapsed(),
        },
    );
    tokio::time::sleep(Duration::from_millis(work)).await;
    let body = json!({ "id": id, "create": create, "instance": instance });
    (StatusCode::CREATED, Json(body))
}

/// Starts an instance on a free port: its own layer, on its own store.
async fn start_instance(
    instance: usize,
    store: Arc<dyn IdempotencyStore>,
    ledger: Ledger,
    started: Instant,
    servers: &mut JoinSet<()>,
) -> SocketAddr {
    let layer = IdempotencyLayer::new()
        .post("/creates")
        .store_arc(store)
        .lease(LEASE)
        .ttl(Duration::from_secs(600));
    let app = Router::new()
        .route(
            "/creates",
            post(move |body| create(instance, ledger.clone(), started, body)),
        )
        .layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    servers.spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

// ---------------------------------------------------------------------------------------------
// The clients

/// What the clients saw, counted over all attempts.
#[derive(Default)]
struct Tally {
    attempts: AtomicUsize,
    created: AtomicUsize,
    replayed: AtomicUsize,
    conflicts: AtomicUsize,
    unavailable: AtomicUsize,
    timeouts: AtomicUsize,
    other: AtomicUsize,
}

impl Tally {
    fn count(counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::Relaxed)
    }
}

/// What a client got in the end: the 2xx body, or (past [`GIVE_UP`]) what it saw last.
#[derive(Debug)]
struct Outcome {
    create: u64,
    body: Result<Value, String>,
}

/// One client of `create`: sends it with its key and body, rotating over the instances, until
/// a 2xx, or until [`GIVE_UP`] has passed since `started`.
async fn client(
    http: reqwest::Client,
    instances: Arc<Vec<SocketAddr>>,
    create: u64,
    client: usize,
    tally: Arc<Tally>,
    started: Instant,
) -> Outcome {
    let key = format!("create-{create}");
    let work_ms = WORK_MIN.as_millis() as u64 + (create * 7919) % WORK_SPREAD;
    let body = json!({ "create": create, "work_ms": work_ms });
    let mut attempt = client;
    let mut last = String::from("nothing");
    loop {
        if started.elapsed() >= GIVE_UP {
            let body = Err(format!("no 2xx after {GIVE_UP:?}; last: {last}"));
            return Outcome { create, body };
        }
        let instance = instances[attempt % instances.len()];
        attempt += 1;
        Tally::count(&tally.attempts);
        let sent = http
            .post(format!("http://{instance}/creates"))
            .bearer_auth("org_faults")
            .header("x-idempotency-key", &key)
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => {
                let replayed = response
                    .headers()
                    .get("idempotent-replayed")
                    .is_some_and(|v| v == "true");
                let status = response.status();
                match response.json::<Value>().await {
                    Ok(body) => {
                        assert_eq!(status, StatusCode::CREATED, "{body}");
                        Tally::count(if replayed {
                            &tally.replayed
                        } else {
                            &tally.created
                        });
                        let body = Ok(body);
                        return Outcome { create, body };
                    }
                    // The body did not come within the timeout: try again.
                    Err(_) => Tally::count(&tally.timeouts),
                }
                last = format!("{status}, body cut off");
            }
            Ok(response) => {
                let status = response.status();
                match status {
                    StatusCode::CONFLICT => Tally::count(&tally.conflicts),
                    StatusCode::SERVICE_UNAVAILABLE => Tally::count(&tally.unavailable),
                    _ => Tally::count(&tally.other),
                }
                let text = response.text().await.unwrap_or_default();
                last = format!("{status} {text}");
            }
            Err(error) => {
                Tally::count(if error.is_timeout() {
                    &tally.timeouts
                } else {
                    &tally.other
                });
                last = format!("{error}");
            }
        }
        tokio::time::sleep(CLIENT_PAUSE).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// Runs `plan` against three instances on `stores` (each reaching the store through `proxy`),
/// then checks that every create ran once and every client got its one response.
pub async fn run(
    test: &str,
    proxy: &FaultProxy,
    stores: Vec<Arc<dyn IdempotencyStore>>,
    plan: &Plan,
) {
    assert_eq!(stores.len(), INSTANCES);
    // The layer's trace, with `RUST_LOG` (`tower_idempotency=info`, say), to see why a create
    // ran twice.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let ledger = Ledger::default();
    let mut servers = JoinSet::new();
    let mut instances = Vec::new();
    let started = Instant::now();
    for (n, store) in stores.into_iter().enumerate() {
        instances.push(start_instance(n, store, ledger.clone(), started, &mut servers).await);
    }
    let instances = Arc::new(instances);
    let http = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .unwrap();
    let tally = Arc::new(Tally::default());

    // The faults, on their own schedule.
    let faults = {
        let plan_faults = plan.faults.to_vec();
        let set = |fault| proxy.set(fault);
        async move {
            for window in plan_faults {
                tokio::time::sleep_until(started + window.at).await;
                set(window.fault);
                eprintln!("{:>6.2?} fault: {:?}", started.elapsed(), window.fault);
                tokio::time::sleep_until(started + window.at + window.lasting).await;
                set(NetFault::Pass);
                eprintln!("{:>6.2?} fault over", started.elapsed());
            }
        }
    };

    // The clients: create n starts at n/CREATES of the spread.
    let mut clients = JoinSet::new();
    for create in 0..CREATES as u64 {
        let at = started + plan.spread.mul_f64(create as f64 / CREATES as f64);
        for n in 0..CLIENTS_PER_CREATE {
            let (http, instances, tally) = (http.clone(), instances.clone(), tally.clone());
            clients.spawn(async move {
                tokio::time::sleep_until(at).await;
                client(http, instances, create, n, tally, started).await
            });
        }
    }
    let ((), outcomes) = tokio::join!(faults, clients.join_all());
    let took = started.elapsed();

    // Every create ran once, and all its clients got that run's response.
    let runs = ledger.runs();
    let mut double: Vec<(u64, usize)> = runs
        .iter()
        .filter(|(_, runs)| runs.len() > 1)
        .map(|(create, runs)| (*create, runs.len()))
        .collect();
    double.sort_unstable();
    let extra_runs: usize = double.iter().map(|(_, n)| n - 1).sum();
    let gave_up: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.body
                .as_ref()
                .err()
                .map(|e| format!("create {}: {e}", o.create))
        })
        .collect();
    let mut mismatched = Vec::new();
    let mut by_create: HashMap<u64, Vec<&Value>> = HashMap::new();
    for outcome in &outcomes {
        let Ok(body) = &outcome.body else { continue };
        let runs = runs.get(&outcome.create).map(Vec::as_slice).unwrap_or(&[]);
        let id = body["id"].as_str().expect("an id");
        if !runs.iter().any(|run| run.id == id) {
            mismatched.push(outcome.create);
        }
        by_create.entry(outcome.create).or_default().push(body);
    }
    let mut disagreeing: Vec<u64> = by_create
        .iter()
        .filter(|(_, seen)| seen.iter().any(|body| body["id"] != seen[0]["id"]))
        .map(|(create, _)| *create)
        .collect();
    disagreeing.sort_unstable();

    eprintln!(
        "{test}: {CREATES} creates x {CLIENTS_PER_CREATE} clients over {INSTANCES} instances, \
         lease {LEASE:?}: {} attempts, {} x 201 first, {} x 201 replayed, {} x 409, {} x 503, \
         {} timeouts, {} other; handler runs {}, creates run more than once {} ({extra_runs} \
         extra runs: {double:?}); clients seeing different ids {}; clients without a 2xx {}; \
         {} proxy connections; took {took:.1?}",
        Tally::get(&tally.attempts),
        Tally::get(&tally.created),
        Tally::get(&tally.replayed),
        Tally::get(&tally.conflicts),
        Tally::get(&tally.unavailable),
        Tally::get(&tally.timeouts),
        Tally::get(&tally.other),
        runs.values().map(Vec::len).sum::<usize>(),
        double.len(),
        disagreeing.len(),
        gave_up.len(),
        proxy.accepted(),
    );
    for line in gave_up.iter().take(10) {
        eprintln!("  {line}");
    }
    for (create, _) in &double {
        let on: Vec<String> = runs[create]
            .iter()
            .map(|run| format!("instance {} at {:.2?}", run.instance, run.at))
            .collect();
        eprintln!("  create {create} ran on {}", on.join(", "));
    }
    assert_eq!(outcomes.len(), CREATES * CLIENTS_PER_CREATE);
    assert_eq!(runs.len(), CREATES, "every create ran");
    assert!(
        double.is_empty(),
        "{} creates ran more than once: {double:?}",
        double.len()
    );
    assert!(gave_up.is_empty(), "clients without a 2xx: {gave_up:?}");
    assert!(mismatched.is_empty(), "responses of no run: {mismatched:?}");
    assert!(
        disagreeing.is_empty(),
        "clients of one create got different responses: {disagreeing:?}"
    );
    servers.abort_all();
}
