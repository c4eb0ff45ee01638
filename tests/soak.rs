//! A fault soak over loopback, bounded to well under a minute.
//!
//! Rounds of three hundred logical creates (up to ten rounds, started within 15 s), each create
//! sent by a few concurrent clients that retry until they get a 201, against a server whose handler randomly panics, answers 500, or sleeps past the
//! clients' timeout, over a store that randomly fails or hangs. Two endpoints: `/calls` answers
//! duplicates with 409, `/agents` makes them wait.
//!
//! Afterwards:
//! - no logical create ran its side effect again once a run of it had been stored, and at
//!   most one run of each was stored; a create ran its side effect twice only when the first
//!   success could not be stored (its completion failed, or its lease was lost);
//! - no key stays in flight past its lease;
//! - every client, retrying once the faults stop, gets the one stored response;
//! - the layer itself never answered 5xx except its documented 503 for store faults (told apart
//!   from the handler's 500s and panics by the problem `type`).

mod support;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use http::{Response, StatusCode, header};
use support::record_key;
use tokio::{sync::watch, time::Instant};
use tower_http::catch_panic::CatchPanicLayer;
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, InFlight, MemoryStore, REPLAYED_HEADER,
    store::{Begin, Fingerprint, LeaseToken, StoreError, StoreErrorKind, StoreKey, StoredResponse},
};

/// Logical creates per round, and the most rounds: rounds go on while the faults' time budget
/// lasts.
const CREATES_PER_ROUND: usize = 300;
const MAX_ROUNDS: usize = 10;
const CLIENTS_PER_CREATE: usize = 3;
const ORGS: usize = 3;
const KEY: &str = "x-idempotency-key";

const LEASE: Duration = Duration::from_millis(600);
const CLIENT_TIMEOUT: Duration = Duration::from_millis(250);
/// Attempts on the wire at once, across all clients: enough for every kind of overlap, few
/// enough that two cores answer in time.
const CONNECTIONS: usize = 32;
/// The slow handler's sleep: past the client's timeout and past the lease, so it is kept only
/// by renewal.
const SLOW: Duration = Duration::from_millis(700);
const STORE_TIMEOUT: Duration = Duration::from_millis(100);
/// No new round starts after this much time with the faults on.
const CHAOS: Duration = Duration::from_secs(15);
/// How long the clients of one round keep retrying while the faults are on.
const ROUND: Duration = Duration::from_secs(20);
/// How long the final, fault-free retries may take.
const SETTLE: Duration = Duration::from_secs(10);

/// In ten-thousandths: the chance that a store call fails, and that it hangs.
const STORE_FAIL: u64 = 500;
const STORE_HANG: u64 = 100;
/// In percent: what a handler run does.
const PANIC: u64 = 10;
const ERROR: u64 = 10;
const SLEEP: u64 = 10;

/// A total order of events across tasks.
static SEQ: AtomicU64 = AtomicU64::new(0);

fn seq() -> u64 {
    SEQ.fetch_add(1, Ordering::SeqCst)
}

/// SplitMix64 over a shared counter: a reproducible stream of draws for fault decisions.
#[derive(Default)]
struct Dice(AtomicU64);

impl Dice {
    fn roll(&self, sides: u64) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % sides
    }
}

// ---------------------------------------------------------------------------------------------
// The store: MemoryStore behind random faults, recording how each run's completion went

/// How a run's `complete` call went, by run id (read from the stored body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Completion {
    Stored { seq: u64 },
    Failed,
    LeaseLost,
}

struct FlakyStore {
    inner: MemoryStore,
    faults_on: AtomicBool,
    dice: Dice,
    completions: Mutex<HashMap<usize, Vec<Completion>>>,
    stored: Mutex<HashMap<StoreKey, Vec<StoredResponse>>>,
    injected: AtomicUsize,
    hung: AtomicUsize,
}

impl FlakyStore {
    fn new(inner: MemoryStore) -> Self {
        Self {
            inner,
            faults_on: AtomicBool::new(true),
            dice: Dice::default(),
            completions: Mutex::default(),
            stored: Mutex::default(),
            injected: AtomicUsize::new(0),
            hung: AtomicUsize::new(0),
        }
    }

    async fn fault(&self) -> Result<(), StoreError> {
        if !self.faults_on.load(Ordering::SeqCst) {
            return Ok(());
        }
        let roll = self.dice.roll(10_000);
        if roll < STORE_HANG {
            self.hung.fetch_add(1, Ordering::Relaxed);
            // Longer than the layer's store timeout: it gives up on the call.
            tokio::time::sleep(STORE_TIMEOUT * 10).await;
        }
        if roll < STORE_HANG + STORE_FAIL {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "injected store fault",
            ));
        }
        Ok(())
    }
}

fn run_of(response: &StoredResponse) -> usize {
    let body: serde_json::Value = serde_json::from_slice(&response.body).expect("stored JSON");
    body["run"].as_u64().expect("run id") as usize
}

#[tower_idempotency::async_trait]
impl IdempotencyStore for FlakyStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.fault().await?;
        self.inner.begin(key, fingerprint, lease).await
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.fault().await?;
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let run = run_of(response);
        // Recorded as failed first: a hanging call is dropped by the layer's timeout.
        let slot = {
            let mut completions = self.completions.lock().unwrap();
            let list = completions.entry(run).or_default();
            list.push(Completion::Failed);
            list.len() - 1
        };
        let outcome = match self.fault().await {
            Ok(()) => self.inner.complete(key, token, response, ttl).await,
            Err(error) => Err(error),
        };
        let completion = match &outcome {
            Ok(true) => {
                self.stored
                    .lock()
                    .unwrap()
                    .entry(*key)
                    .or_default()
                    .push(response.clone());
                Completion::Stored { seq: seq() }
            }
            Ok(false) => Completion::LeaseLost,
            Err(_) => Completion::Failed,
        };
        self.completions.lock().unwrap().get_mut(&run).unwrap()[slot] = completion;
        outcome
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        self.fault().await?;
        self.inner.release(key, token).await
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        self.fault().await?;
        self.inner.wait(key, timeout).await
    }
}

// ---------------------------------------------------------------------------------------------
// The application: a create handler with a side-effect ledger and random failures

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunOutcome {
    Running,
    Created,
    Error,
    Panicked,
}

#[derive(Debug)]
struct Run {
    create: usize,
    started: u64,
    outcome: RunOutcome,
}

struct Ledger {
    chaos: AtomicBool,
    dice: Dice,
    runs: Mutex<Vec<Run>>,
    /// Runs in progress, so the test can wait for every handler to finish.
    active: watch::Sender<usize>,
}

#[derive(serde::Deserialize)]
struct CreateRequest {
    create: usize,
}

async fn create(ledger: Arc<Ledger>, body: Bytes) -> Response<Body> {
    let request: CreateRequest = serde_json::from_slice(&body).expect("create JSON");
    let run = {
        let mut runs = ledger.runs.lock().unwrap();
        runs.push(Run {
            create: request.create,
            started: seq(),
            outcome: RunOutcome::Running,
        });
        runs.len() - 1
    };
    ledger.active.send_modify(|n| *n += 1);
    struct Done(Arc<Ledger>, usize, RunOutcome);
    impl Drop for Done {
        fn drop(&mut self) {
            let outcome = if std::thread::panicking() {
                RunOutcome::Panicked
            } else {
                self.2
            };
            self.0.runs.lock().unwrap()[self.1].outcome = outcome;
            self.0.active.send_modify(|n| *n -= 1);
        }
    }
    let mut done = Done(ledger.clone(), run, RunOutcome::Running);

    let roll = if ledger.chaos.load(Ordering::SeqCst) {
        ledger.dice.roll(100)
    } else {
        100
    };
    if roll < PANIC {
        panic!("injected handler panic in run {run}");
    }
    if roll < PANIC + ERROR {
        done.2 = RunOutcome::Error;
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .header("x-handler-error", "injected")
            .body(Body::from("injected handler error"))
            .unwrap();
    }
    if roll < PANIC + ERROR + SLEEP {
        tokio::time::sleep(SLOW).await;
    }
    // The side effect: this run created the resource.
    done.2 = RunOutcome::Created;
    let body = serde_json::json!({ "id": format!("res_{}", request.create), "run": run });
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::LOCATION, format!("/resources/{}", request.create))
        .header(header::SET_COOKIE, format!("run={run}"))
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn app(ledger: Arc<Ledger>, store: Arc<FlakyStore>) -> Router {
    let layer = |in_flight| {
        IdempotencyLayer::new()
            .post("/calls")
            .post("/agents")
            .store_arc(store.clone())
            .lease(LEASE)
            .store_timeout(STORE_TIMEOUT)
            .in_flight(in_flight)
    };
    let handler = move |body: Bytes| create(ledger.clone(), body);
    Router::new()
        .route(
            "/calls",
            post(handler.clone()).layer(layer(InFlight::Conflict)),
        )
        .route(
            "/agents",
            post(handler).layer(layer(InFlight::Wait {
                timeout: Duration::from_millis(300),
            })),
        )
        // Outside the idempotency layer: a handler's panic becomes a plain-text 500.
        .layer(CatchPanicLayer::new())
}

// ---------------------------------------------------------------------------------------------
// Clients

#[derive(Debug, Clone)]
struct Create {
    org: String,
    path: &'static str,
    key: String,
    body: String,
}

impl Create {
    fn new(i: usize) -> Self {
        Self {
            org: format!("Bearer org_{}_secret", i % ORGS),
            path: if i.is_multiple_of(2) {
                "/calls"
            } else {
                "/agents"
            },
            key: format!("create-{i}"),
            body: format!(r#"{{"create":{i}}}"#),
        }
    }

    fn store_key(&self) -> (StoreKey, Fingerprint) {
        record_key(&self.org, self.path, &self.key, &self.body)
    }
}

/// What a client saw, by kind.
#[derive(Debug)]
struct Tally {
    wire: tokio::sync::Semaphore,
    attempts: AtomicUsize,
    created: AtomicUsize,
    replayed: AtomicUsize,
    client_timeouts: AtomicUsize,
    transport_errors: AtomicUsize,
    in_flight_409: AtomicUsize,
    store_503: AtomicUsize,
    handler_500: AtomicUsize,
    panic_500: AtomicUsize,
    /// Anything else: a 5xx the layer should not make, or an unexpected answer.
    unexpected: Mutex<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Final {
    replayed: bool,
    body: Bytes,
    location: Option<String>,
    set_cookie: bool,
}

/// One attempt: `Some` with the 201, `None` to retry.
async fn attempt(
    client: &reqwest::Client,
    addr: SocketAddr,
    c: &Create,
    tally: &Tally,
) -> Option<Final> {
    let _permit = tally.wire.acquire().await.unwrap();
    tally.attempts.fetch_add(1, Ordering::Relaxed);
    let sent = client
        .post(format!("http://{addr}{}", c.path))
        .header(header::AUTHORIZATION, &c.org)
        .header(KEY, &c.key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(c.body.clone())
        .timeout(CLIENT_TIMEOUT)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(error) if error.is_timeout() => {
            tally.client_timeouts.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Err(_) => {
            tally.transport_errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let status = response.status();
    let headers = response.headers().clone();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(error) if error.is_timeout() => {
            tally.client_timeouts.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Err(_) => {
            tally.transport_errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let problem_type = (headers.get(header::CONTENT_TYPE)
        == Some(&http::HeaderValue::from_static("application/problem+json")))
    .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
    .flatten()
    .and_then(|p| p["type"].as_str().map(str::to_owned));
    let kind = problem_type
        .as_deref()
        .and_then(|t| t.strip_prefix("tag:tower-idempotency,2026:"));
    match (status.as_u16(), kind) {
        (201, None) => {
            let replayed = headers.get(REPLAYED_HEADER).is_some();
            if replayed {
                tally.replayed.fetch_add(1, Ordering::Relaxed);
            } else {
                tally.created.fetch_add(1, Ordering::Relaxed);
            }
            return Some(Final {
                replayed,
                body,
                location: headers
                    .get(header::LOCATION)
                    .map(|v| v.to_str().unwrap().to_owned()),
                set_cookie: headers.contains_key(header::SET_COOKIE),
            });
        }
        (409, Some("in-flight")) => tally.in_flight_409.fetch_add(1, Ordering::Relaxed),
        (503, Some("store-unavailable" | "store-full")) => {
            tally.store_503.fetch_add(1, Ordering::Relaxed)
        }
        (500, None) if headers.contains_key("x-handler-error") => {
            tally.handler_500.fetch_add(1, Ordering::Relaxed)
        }
        (500, None) if body.as_ref() == b"Service panicked" => {
            tally.panic_500.fetch_add(1, Ordering::Relaxed)
        }
        _ => {
            tally
                .unexpected
                .lock()
                .unwrap()
                .push(format!("{status} {problem_type:?} {body:?}"));
            0
        }
    };
    None
}

/// Retries until a 201 or the deadline; short random pauses between attempts.
async fn retry_until(
    client: &reqwest::Client,
    addr: SocketAddr,
    c: &Create,
    tally: &Tally,
    dice: &Dice,
    deadline: Instant,
) -> Option<Final> {
    while Instant::now() < deadline {
        if let Some(done) = attempt(client, addr, c, tally).await {
            return Some(done);
        }
        tokio::time::sleep(Duration::from_millis(5 + dice.roll(40))).await;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The soak

/// Keeps the injected panics' messages out of the output; any other panic still reports.
fn quiet_injected_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        if !message.starts_with("injected handler panic") {
            default(info);
        }
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_under_random_handler_and_store_faults_run_each_create_once() {
    quiet_injected_panics();
    let started = Instant::now();
    let store = Arc::new(FlakyStore::new(MemoryStore::new()));
    let ledger = Arc::new(Ledger {
        chaos: AtomicBool::new(true),
        dice: Dice::default(),
        runs: Mutex::default(),
        active: watch::Sender::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server =
        tokio::spawn(axum::serve(listener, app(ledger.clone(), store.clone())).into_future());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let tally = Arc::new(Tally {
        wire: tokio::sync::Semaphore::new(CONNECTIONS),
        attempts: AtomicUsize::default(),
        created: AtomicUsize::default(),
        replayed: AtomicUsize::default(),
        client_timeouts: AtomicUsize::default(),
        transport_errors: AtomicUsize::default(),
        in_flight_409: AtomicUsize::default(),
        store_503: AtomicUsize::default(),
        handler_500: AtomicUsize::default(),
        panic_500: AtomicUsize::default(),
        unexpected: Mutex::default(),
    });
    let dice = Arc::new(Dice::default());

    // Phase 1: rounds of creates, every client retrying through the faults.
    let mut creates: Vec<Create> = Vec::new();
    let mut chaos_finals: Vec<Vec<Final>> = Vec::new();
    let mut gave_up = 0;
    let mut rounds = 0;
    while rounds < MAX_ROUNDS && started.elapsed() < CHAOS {
        rounds += 1;
        let first = creates.len();
        creates.extend((first..first + CREATES_PER_ROUND).map(Create::new));
        chaos_finals.resize(creates.len(), Vec::new());
        let deadline = Instant::now() + ROUND;
        let mut clients = tokio::task::JoinSet::new();
        for (i, c) in creates.iter().enumerate().skip(first) {
            for _ in 0..CLIENTS_PER_CREATE {
                let (client, c, tally, dice) =
                    (client.clone(), c.clone(), tally.clone(), dice.clone());
                clients.spawn(async move {
                    (
                        i,
                        retry_until(&client, addr, &c, &tally, &dice, deadline).await,
                    )
                });
            }
        }
        while let Some(joined) = clients.join_next().await {
            match joined.unwrap() {
                (i, Some(done)) => chaos_finals[i].push(done),
                (_, None) => gave_up += 1,
            }
        }
    }
    let chaos_took = started.elapsed();

    // Faults off. Wait for every handler run to end, then for any lease left behind to lapse.
    store.faults_on.store(false, Ordering::SeqCst);
    ledger.chaos.store(false, Ordering::SeqCst);
    let mut active = ledger.active.subscribe();
    tokio::time::timeout(SETTLE, active.wait_for(|n| *n == 0))
        .await
        .expect("handler runs end")
        .unwrap();
    tokio::time::sleep(LEASE + Duration::from_millis(50)).await;

    // No key stays in flight past its lease.
    let mut completed_keys = 0;
    for c in &creates {
        let (key, fp) = c.store_key();
        match store.inner.begin(&key, &fp, LEASE).await.unwrap() {
            Begin::InFlight { .. } => panic!("{} is still in flight past its lease", c.key),
            Begin::Completed { .. } => completed_keys += 1,
            Begin::Acquired(token) => {
                assert!(store.inner.release(&key, token).await.unwrap());
            }
        }
    }

    // Phase 2: with the faults gone, every client retries once more and gets the one stored
    // response.
    let deadline = Instant::now() + SETTLE;
    let mut clients = tokio::task::JoinSet::new();
    for (i, c) in creates.iter().enumerate() {
        for _ in 0..CLIENTS_PER_CREATE {
            let (client, c, tally, dice) = (client.clone(), c.clone(), tally.clone(), dice.clone());
            clients.spawn(async move {
                (
                    i,
                    retry_until(&client, addr, &c, &tally, &dice, deadline).await,
                )
            });
        }
    }
    let mut settled: Vec<Vec<Final>> = vec![Vec::new(); creates.len()];
    let mut unsettled = Vec::new();
    while let Some(joined) = clients.join_next().await {
        match joined.unwrap() {
            (i, Some(done)) => settled[i].push(done),
            (i, None) => unsettled.push(i),
        }
    }
    assert!(
        unsettled.is_empty(),
        "fault-free retries of creates {unsettled:?} got no 201; {tally:#?}"
    );
    server.abort();

    // --- Checks --------------------------------------------------------------------------------
    let runs = ledger.runs.lock().unwrap();
    let completions = store.completions.lock().unwrap();
    let stored = store.stored.lock().unwrap();
    let mut repeated_effects = 0;
    let mut explained = (0, 0);
    for (i, c) in creates.iter().enumerate() {
        let (key, _) = c.store_key();
        let kept = stored.get(&key).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(kept.len(), 1, "create {i}: stored {} responses", kept.len());
        let kept = &kept[0];
        let kept_run = run_of(kept);
        let Some(Completion::Stored { seq: stored_at }) = completions[&kept_run]
            .iter()
            .copied()
            .find(|c| matches!(c, Completion::Stored { .. }))
        else {
            panic!("create {i}: no stored completion for run {kept_run}")
        };

        // Side effects: runs that created the resource.
        let effects: Vec<(usize, &Run)> = runs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.create == i && r.outcome == RunOutcome::Created)
            .collect();
        for (run, r) in runs.iter().enumerate().filter(|(_, r)| r.create == i) {
            assert!(
                r.started < stored_at,
                "create {i}: run {run} started after run {kept_run} was stored"
            );
        }
        // Every other side effect belongs to a run whose response could not be stored.
        for (run, _) in &effects {
            if *run == kept_run {
                continue;
            }
            repeated_effects += 1;
            let tries = completions.get(run).map(Vec::as_slice).unwrap_or_default();
            let stored = tries.iter().any(|c| matches!(c, Completion::Stored { .. }));
            match tries {
                // Every try of its completion failed (the layer tries three times).
                [_, ..] if tries.iter().all(|c| *c == Completion::Failed) => explained.0 += 1,
                _ if !stored && tries.contains(&Completion::LeaseLost) => explained.1 += 1,
                _ => panic!(
                    "create {i}: run {run} created it again, after run {kept_run}, and its \
                     completion went {tries:?}"
                ),
            }
        }

        // Every client that kept retrying gets the one stored response.
        let stored_body = &kept.body;
        for got in &settled[i] {
            assert!(
                got.replayed,
                "create {i}: a settled retry ran the handler again"
            );
            assert_eq!(&got.body, stored_body, "create {i}");
            assert_eq!(got.location.as_deref(), Some(&*format!("/resources/{i}")));
            assert!(!got.set_cookie, "a replay carried Set-Cookie");
        }
        // During the faults, a 201 was the stored response, or the run's own unstored one.
        for got in &chaos_finals[i] {
            if got.replayed {
                assert_eq!(
                    &got.body, stored_body,
                    "create {i}: replayed another response"
                );
                assert!(!got.set_cookie);
            }
        }
    }

    let unexpected = tally.unexpected.lock().unwrap();
    assert!(
        unexpected.is_empty(),
        "{} answers the layer should not make, e.g. {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );

    let count = |outcome| runs.iter().filter(|r| r.outcome == outcome).count();
    eprintln!(
        "soak: {} creates in {rounds} rounds x {CLIENTS_PER_CREATE} clients in {:.1?} of faults ({:.1?} in all); \
         {} attempts: {} created, {} replayed, {} client timeouts, {} transport errors, \
         {} in-flight 409, {} store 503, {} handler 500, {} panic 500; {} clients gave up; \
         handler runs: {} ({} created, {} errors, {} panics); store faults injected: {} ({} hung); \
         keys completed before the final retries: {completed_keys}; repeated side effects: \
         {repeated_effects} ({} after a failed completion, {} after a lost lease)",
        creates.len(),
        chaos_took,
        started.elapsed(),
        tally.attempts.load(Ordering::Relaxed),
        tally.created.load(Ordering::Relaxed),
        tally.replayed.load(Ordering::Relaxed),
        tally.client_timeouts.load(Ordering::Relaxed),
        tally.transport_errors.load(Ordering::Relaxed),
        tally.in_flight_409.load(Ordering::Relaxed),
        tally.store_503.load(Ordering::Relaxed),
        tally.handler_500.load(Ordering::Relaxed),
        tally.panic_500.load(Ordering::Relaxed),
        gave_up,
        runs.len(),
        count(RunOutcome::Created),
        count(RunOutcome::Error),
        count(RunOutcome::Panicked),
        store.injected.load(Ordering::Relaxed),
        store.hung.load(Ordering::Relaxed),
        explained.0,
        explained.1,
    );
    // The faults were really exercised.
    assert!(tally.panic_500.load(Ordering::Relaxed) > 0);
    assert!(tally.handler_500.load(Ordering::Relaxed) > 0);
    assert!(tally.client_timeouts.load(Ordering::Relaxed) > 0);
    assert!(tally.store_503.load(Ordering::Relaxed) > 0);
}

// ---------------------------------------------------------------------------------------------
// Found by the soak: one failed completion made a create run twice

/// A memory store whose first `failures` calls to `complete` fail.
struct FailingCompletions {
    inner: MemoryStore,
    failures: AtomicUsize,
    completes: AtomicUsize,
}

#[tower_idempotency::async_trait]
impl IdempotencyStore for FailingCompletions {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.inner.begin(key, fingerprint, lease).await
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.completes.fetch_add(1, Ordering::SeqCst);
        let fail = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "injected store fault",
            ));
        }
        self.inner.complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        self.inner.release(key, token).await
    }
}

/// The soak saw creates run their side effect twice: a `complete` call lost to a passing store
/// fault left the lease to expire, and the next retry ran the handler again. The layer now
/// tries the completion again (twice) before leaving the lease to expire.
#[tokio::test(start_paused = true)]
async fn a_completion_lost_to_passing_store_faults_is_tried_again_and_the_create_runs_once() {
    use support::{Calls, created, request, send};

    let store = Arc::new(FailingCompletions {
        inner: MemoryStore::new(),
        failures: AtomicUsize::new(2),
        completes: AtomicUsize::new(0),
    });
    let calls = Calls::default();
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move |body: Bytes| async move { created(counted.hit(), &body) }),
        )
        .layer(
            IdempotencyLayer::new()
                .post("/calls")
                .store_arc(store.clone())
                .lease(LEASE),
        );

    let first = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // The client has its response at once; the later tries run in the background.
    tokio::time::timeout(Duration::from_secs(1), async {
        while store.completes.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the failed completion is tried again");
    assert_eq!(
        store.completes.load(Ordering::SeqCst),
        3,
        "two failures, then stored"
    );
    // Well past the lease: had the response not been stored, this retry would run again.
    tokio::time::advance(LEASE * 3).await;
    let retry = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(calls.get(), 1);
}
