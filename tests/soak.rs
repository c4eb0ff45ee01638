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
//!
//! The store behind the faults, the create handler and its ledger, the app and the clients are
//! in `soak/harness.rs`; the soak's parameters are the constants below.

mod support;

#[path = "soak/harness.rs"]
mod harness;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, routing::post};
use bytes::Bytes;
use harness::{
    Completion, Create, Dice, Final, FlakyStore, Ledger, Run, RunOutcome, Tally, app, retry_until,
    run_of,
};
use http::StatusCode;
use tokio::{sync::watch, time::Instant};
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, MemoryStore,
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
