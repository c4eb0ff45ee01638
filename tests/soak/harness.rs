//! The soak's machinery (`tests/soak.rs`): a `MemoryStore` behind random faults that records
//! how each run's completion went, a create handler with a side-effect ledger and random
//! panics, errors and sleeps, the app that puts the layer in front of it, and the clients that
//! retry a create until they get a 201. The soak's parameters are the constants of
//! `tests/soak.rs`.

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
use tokio::{sync::watch, time::Instant};
use tower_http::catch_panic::CatchPanicLayer;
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, InFlight, MemoryStore, REPLAYED_HEADER,
    store::{Begin, Fingerprint, LeaseToken, StoreError, StoreErrorKind, StoreKey, StoredResponse},
};

use crate::{
    CLIENT_TIMEOUT, ERROR, KEY, LEASE, ORGS, PANIC, SLEEP, SLOW, STORE_FAIL, STORE_HANG,
    STORE_TIMEOUT, support::record_key,
};

/// A total order of events across tasks.
static SEQ: AtomicU64 = AtomicU64::new(0);

fn seq() -> u64 {
    SEQ.fetch_add(1, Ordering::SeqCst)
}

/// SplitMix64 over a shared counter: a reproducible stream of draws for fault decisions.
#[derive(Default)]
pub(crate) struct Dice(AtomicU64);

impl Dice {
    pub(crate) fn roll(&self, sides: u64) -> u64 {
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
pub(crate) enum Completion {
    Stored { seq: u64 },
    Failed,
    LeaseLost,
}

pub(crate) struct FlakyStore {
    pub(crate) inner: MemoryStore,
    pub(crate) faults_on: AtomicBool,
    dice: Dice,
    pub(crate) completions: Mutex<HashMap<usize, Vec<Completion>>>,
    pub(crate) stored: Mutex<HashMap<StoreKey, Vec<StoredResponse>>>,
    pub(crate) injected: AtomicUsize,
    pub(crate) hung: AtomicUsize,
}

impl FlakyStore {
    pub(crate) fn new(inner: MemoryStore) -> Self {
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

pub(crate) fn run_of(response: &StoredResponse) -> usize {
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
pub(crate) enum RunOutcome {
    Running,
    Created,
    Error,
    Panicked,
}

#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) create: usize,
    pub(crate) started: u64,
    pub(crate) outcome: RunOutcome,
}

pub(crate) struct Ledger {
    pub(crate) chaos: AtomicBool,
    pub(crate) dice: Dice,
    pub(crate) runs: Mutex<Vec<Run>>,
    /// Runs in progress, so the test can wait for every handler to finish.
    pub(crate) active: watch::Sender<usize>,
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

pub(crate) fn app(ledger: Arc<Ledger>, store: Arc<FlakyStore>) -> Router {
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
pub(crate) struct Create {
    org: String,
    path: &'static str,
    pub(crate) key: String,
    body: String,
}

impl Create {
    pub(crate) fn new(i: usize) -> Self {
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

    pub(crate) fn store_key(&self) -> (StoreKey, Fingerprint) {
        record_key(&self.org, self.path, &self.key, &self.body)
    }
}

/// What a client saw, by kind.
#[derive(Debug)]
pub(crate) struct Tally {
    pub(crate) wire: tokio::sync::Semaphore,
    pub(crate) attempts: AtomicUsize,
    pub(crate) created: AtomicUsize,
    pub(crate) replayed: AtomicUsize,
    pub(crate) client_timeouts: AtomicUsize,
    pub(crate) transport_errors: AtomicUsize,
    pub(crate) in_flight_409: AtomicUsize,
    pub(crate) store_503: AtomicUsize,
    pub(crate) handler_500: AtomicUsize,
    pub(crate) panic_500: AtomicUsize,
    /// Anything else: a 5xx the layer should not make, or an unexpected answer.
    pub(crate) unexpected: Mutex<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Final {
    pub(crate) replayed: bool,
    pub(crate) body: Bytes,
    pub(crate) location: Option<String>,
    pub(crate) set_cookie: bool,
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
pub(crate) async fn retry_until(
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
