//! The security properties of `SECURITY.md` that no other test shows, for what reaches a store
//! and the trace (its sections 9 and 10): raw credentials, cookies and keys reach neither a
//! store nor the trace, a store error's cause (with its URL and password) reaches neither the
//! client nor the trace, and keys, scopes and lease tokens are redacted in `Debug`.
//!
//! The other security tests: replays and the headers they never carry in
//! `tests/security_replays.rs`, callers who share or guess keys in `security_tenants.rs`, and
//! bodies built to exhaust the parser and the JSON the fuzzers found in `security_json.rs`.

mod support;

use std::{
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use http::{Request, StatusCode, header};
use support::{security::app, *};
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, IdempotencyStore, KeyReuse, MemoryStore, Scope, StoreFailure,
    StoredResponse,
    store::{Begin, Fingerprint, LeaseToken, StoreError, StoreKey},
};

const SECRET: &str = "sk_live_TOPSECRET_4f1c";
const CREDENTIAL: &str = "Bearer sk_live_TOPSECRET_4f1c";
const COOKIE: &str = "session=COOKIESECRET_77aa";
const SECRET_KEY: &str = "key-KEYSECRET-9b3e";
/// What must never show: the credential, the cookie, the key, and telling parts of each.
const SECRETS: [&str; 5] = [SECRET, "TOPSECRET", "COOKIESECRET", SECRET_KEY, "KEYSECRET"];

/// Whether `haystack` holds `needle` anywhere.
fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// A POST to `/calls` with the secret credential, a session cookie, the key and a JSON body.
fn secret_request(key: &str, json: &str) -> Request<Body> {
    Request::post("/calls")
        .header(header::AUTHORIZATION, CREDENTIAL)
        .header(header::COOKIE, COOKIE)
        .header(header::CONTENT_TYPE, "application/json")
        .header(KEY, key)
        .body(Body::from(json.to_owned()))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Credentials never reach a store

/// A memory store that keeps everything it is handed, as bytes and as `Debug` text.
#[derive(Clone, Default)]
struct RecordingStore {
    inner: MemoryStore,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RecordingStore {
    fn see(&self, parts: &[&[u8]], debug: String) {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(parts.iter().map(|p| p.to_vec()));
        seen.push(debug.into_bytes());
    }

    fn holds(&self, needle: &str) -> bool {
        self.seen.lock().unwrap().iter().any(|b| holds(b, needle))
    }
}

#[tower_idempotency::async_trait]
impl IdempotencyStore for RecordingStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.see(
            &[&key.0, &fingerprint.0],
            format!("{key:?} {fingerprint:?} {key} {fingerprint}"),
        );
        let begun = self.inner.begin(key, fingerprint, lease).await?;
        self.see(&[], format!("{begun:?}"));
        Ok(begun)
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.see(&[&key.0], format!("{key:?} {token:?}"));
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.see(
            &[&key.0, &response.encode(), &response.body],
            format!("{key:?} {token:?} {response:?}"),
        );
        self.inner.complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        self.see(&[&key.0], format!("{key:?} {token:?}"));
        self.inner.release(key, token).await
    }
}

/// Executed, replayed, another body (a new request, or 422 in strict mode), a 500 whose lease is
/// released: the store is handed record keys, fingerprints, tokens and responses, and none of
/// them holds the raw credential, the cookie or the key.
#[tokio::test]
async fn raw_credentials_cookies_and_keys_never_reach_the_store() {
    for mode in [KeyReuse::NewRequest, KeyReuse::Reject] {
        let store = RecordingStore::default();
        let calls = Calls::default();
        let app = app(
            IdempotencyLayer::new()
                .post("/calls")
                .store(store.clone())
                .key_reuse(mode),
            &calls,
            &Gate::default(),
        );
        send(&app, secret_request(SECRET_KEY, r#"{"to":"+1555"}"#)).await;
        let replay = send(&app, secret_request(SECRET_KEY, r#"{"to":"+1555"}"#)).await;
        assert!(replay.replayed(), "{mode:?}");
        send(&app, secret_request(SECRET_KEY, r#"{"to":"+1666"}"#)).await;
        send(&app, secret_request("other-key", r#"{"fail":true}"#)).await;

        assert!(store.seen.lock().unwrap().len() > 10, "{mode:?}");
        for secret in SECRETS {
            assert!(
                !store.holds(secret),
                "{mode:?}: the store was handed {secret:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials and keys never reach the trace

/// Every path that writes to the trace, each with the secret credential, a cookie and a key
/// built from the secret key: executed, replayed, mismatch, invalid key (the bad value holding
/// the credential), conflict, a response too large to store, store failures on begin, complete
/// and release, and failing open.
#[tokio::test(start_paused = true)]
async fn raw_credentials_cookies_and_keys_never_appear_in_the_trace() {
    // A current-thread runtime: the layer's tasks run on this thread, so its events are ours.
    capture_trace();
    let store = TestStore::new(MemoryStore::new());
    let gate = Gate::default();
    let calls = Calls::default();
    let layer = IdempotencyLayer::new()
        .post("/calls")
        .store(store.clone())
        .key_reuse(KeyReuse::Reject)
        .max_response_body(64)
        .lease(Duration::from_secs(5));
    let app = app(layer.clone(), &calls, &gate);
    let key = |suffix: &str| format!("{SECRET_KEY}{suffix}");

    send(&app, secret_request(&key(""), "{}")).await;
    send(&app, secret_request(&key(""), "{}")).await;
    send(&app, secret_request(&key(""), r#"{"other":1}"#)).await;
    send(
        &app,
        secret_request(&format!("bad {SECRET_KEY} {SECRET}"), "{}"),
    )
    .await;
    send(&app, secret_request(&key("-big"), r#"{"big":true}"#)).await;

    let owner = tokio::spawn({
        let app = app.clone();
        let req = secret_request(&key("-slow"), r#"{"slow":true}"#);
        async move { send(&app, req).await }
    });
    gate.entered(1).await;
    send(&app, secret_request(&key("-slow"), r#"{"slow":true}"#)).await;
    gate.open(1);
    within(owner).await.unwrap();

    store.set_faults(|f| f.begin = Fault::Fail);
    send(&app, secret_request(&key("-begin"), "{}")).await;
    store.set_faults(|f| {
        *f = Faults {
            complete: Fault::Fail,
            ..Faults::default()
        }
    });
    send(&app, secret_request(&key("-complete"), "{}")).await;
    store.set_faults(|f| {
        *f = Faults {
            release: Fault::Fail,
            ..Faults::default()
        }
    });
    send(&app, secret_request(&key("-release"), r#"{"fail":true}"#)).await;

    store.set_faults(|f| {
        *f = Faults {
            begin: Fault::Fail,
            ..Faults::default()
        }
    });
    let open = Router::new()
        .route("/calls", post(|| async { StatusCode::CREATED }))
        .layer(layer.on_store_error(StoreFailure::FailOpen));
    send(&open, secret_request(&key("-open"), "{}")).await;

    // Let the background tries of failed completions run to their end (the clock is paused).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let trace = take_trace();
    for outcome in [
        "executed", "replayed", "mismatch", "rejected", "conflict", "bypassed",
    ] {
        assert!(
            trace.contains(&format!("outcome=\"{outcome}\""))
                || trace.contains(&format!("outcome={outcome}")),
            "no {outcome:?} event in:\n{trace}"
        );
    }
    // The failed completion is stored on a background try once the faults stop, so this
    // trace has warnings; the error path is covered by the store-error test below.
    assert!(trace.contains("WARN"), "{trace}");
    assert!(trace.contains("stored on a later try"), "{trace}");
    for secret in SECRETS {
        assert!(
            !trace.contains(secret),
            "the trace leaks {secret:?}:\n{trace}"
        );
    }
}

/// A memory store whose `begin` (while `fail_begin` is set) and `complete` fail with a driver
/// error that names the store's URL and password, as some drivers' errors do.
struct LeakyErrors {
    inner: MemoryStore,
    fail_begin: std::sync::atomic::AtomicBool,
}

const STORE_PASSWORD: &str = "hunter2STOREPASSWORD";

fn leaky_error() -> StoreError {
    let driver = io::Error::other(format!(
        "connecting to redis://:{STORE_PASSWORD}@10.0.0.7:6379 refused"
    ));
    StoreError::unavailable(driver)
}

#[tower_idempotency::async_trait]
impl IdempotencyStore for LeakyErrors {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        if self.fail_begin.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(leaky_error());
        }
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
        _: &StoreKey,
        _: LeaseToken,
        _: &StoredResponse,
        _: Duration,
    ) -> Result<bool, StoreError> {
        Err(leaky_error())
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        self.inner.release(key, token).await
    }
}

/// A store error's cause (a driver error that may name the store's URL and password) reaches
/// neither the client, whose 503 says only that the store is unavailable, nor the trace with
/// its URL: the trace writes the cause with every URL replaced by `<url>`.
#[tokio::test(start_paused = true)]
async fn store_errors_reach_neither_clients_nor_the_trace_with_their_cause() {
    capture_trace();
    let store = Arc::new(LeakyErrors {
        inner: MemoryStore::new(),
        fail_begin: std::sync::atomic::AtomicBool::new(true),
    });
    let calls = Calls::default();
    let app = app(
        IdempotencyLayer::new()
            .post("/calls")
            .store_arc(store.clone()),
        &calls,
        &Gate::default(),
    );
    let refused = send(&app, request("/calls", Some("k1"), "{}")).await;
    refused.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    store
        .fail_begin
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let unstored = send(&app, request("/calls", Some("k2"), "{}")).await;
    assert_eq!(unstored.status, StatusCode::CREATED);

    // Let the background tries of the failed completion run to the completion deadline (the
    // clock is paused).
    tokio::time::sleep(tower_idempotency::DEFAULT_COMPLETION_DEADLINE * 2).await;
    let trace = take_trace();
    assert!(trace.contains("WARN") && trace.contains("ERROR"), "{trace}");
    assert!(trace.contains("connecting to <url> refused"), "{trace}");
    for shown in [&refused.body[..], &unstored.body[..], trace.as_bytes()] {
        assert!(
            !holds(shown, STORE_PASSWORD),
            "{}",
            String::from_utf8_lossy(shown)
        );
        assert!(
            !holds(shown, "10.0.0.7"),
            "{}",
            String::from_utf8_lossy(shown)
        );
    }
}

#[test]
fn keys_scopes_and_lease_tokens_are_redacted_in_debug_output() {
    let key = IdempotencyKey::parse(SECRET_KEY.as_bytes()).unwrap();
    let scope = Scope::new(CREDENTIAL);
    let token = LeaseToken::random();
    let shown = format!("{key:?} {scope:?} {token:?}");
    for secret in SECRETS {
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(!shown.contains(&format!("{:x}", token.0)), "{shown}");
}
