//! The security properties of `SECURITY.md` that no other test shows: what reaches a store and
//! the trace, replays and the headers they never carry, callers who share or guess keys,
//! bodies built to exhaust the parser, and the inputs the fuzzers found.

mod support;

use std::{
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Body, response::IntoResponse, routing::post};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use support::*;
use tower_idempotency::{
    ExtensionScope, IdempotencyKey, IdempotencyLayer, IdempotencyStore, InFlight, KeyReuse,
    MemoryStore, Scope, StoreFailure, StoredResponse,
    store::{Begin, Fingerprint, LeaseToken, StoreError, StoreErrorKind, StoreKey},
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

/// The support module's create handler on `POST /calls`, counting runs, behind `layer`. A body
/// of `{"slow":true}` first waits at `gate`, `{"fail":true}` answers 500, and `{"big":true}`
/// answers 100 bytes.
fn app(layer: IdempotencyLayer, calls: &Calls, gate: &Gate) -> Router {
    let (calls, gate) = (calls.clone(), gate.clone());
    Router::new()
        .route(
            "/calls",
            post(move |body: Bytes| async move {
                let run = calls.hit();
                match body.as_ref() {
                    b"{\"slow\":true}" => gate.enter().await,
                    b"{\"fail\":true}" => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    b"{\"big\":true}" => {
                        return (StatusCode::CREATED, vec![b'x'; 100]).into_response();
                    }
                    _ => {}
                }
                created(run, &body)
            }),
        )
        .layer(layer)
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

// ---------------------------------------------------------------------------------------------
// Replays never carry Set-Cookie, nor any other header that is never replayed

#[tokio::test]
async fn a_replay_never_carries_set_cookie() {
    let calls = Calls::default();
    let counter = calls.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move || async move {
                let run = counter.hit();
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header(header::SET_COOKIE, format!("session=run-{run}; HttpOnly"))
                    .header(header::SET_COOKIE, "csrf=abc")
                    .header(header::LOCATION, format!("/calls/{run}"))
                    .body(Body::empty())
                    .unwrap()
            }),
        )
        .layer(IdempotencyLayer::new().post("/calls"));
    let first = send(&app, request("/calls", Some("k"), "{}")).await;
    assert_eq!(first.headers.get_all(header::SET_COOKIE).iter().count(), 2);
    let replay = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(calls.get(), 1);
    assert!(replay.headers.get(header::SET_COOKIE).is_none());
    assert_eq!(replay.header("location"), Some("/calls/1"));
}

/// A store that answers `begin` with a completed record it was given: a record written by
/// another program, an older version, or by hand.
struct ForeignRecord {
    response: StoredResponse,
    fingerprint: Mutex<Option<Fingerprint>>,
}

#[tower_idempotency::async_trait]
impl IdempotencyStore for ForeignRecord {
    async fn begin(
        &self,
        _: &StoreKey,
        fingerprint: &Fingerprint,
        _: Duration,
    ) -> Result<Begin, StoreError> {
        let fingerprint = *self.fingerprint.lock().unwrap().get_or_insert(*fingerprint);
        Ok(Begin::Completed {
            fingerprint,
            response: self.response.clone(),
        })
    }

    async fn renew(&self, _: &StoreKey, _: LeaseToken, _: Duration) -> Result<bool, StoreError> {
        Ok(false)
    }

    async fn complete(
        &self,
        _: &StoreKey,
        _: LeaseToken,
        _: &StoredResponse,
        _: Duration,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }

    async fn release(&self, _: &StoreKey, _: LeaseToken) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// Found by the `stored_response` fuzz target: `to_replay` sent every header a record held, so
/// a record holding `Set-Cookie`, `TE`, `Transfer-Encoding`, `Connection` or a stale
/// `Content-Length` (one this layer's capture did not write) was replayed with them. A replay
/// now leaves out every header that is never stored, whatever the record holds.
#[tokio::test]
async fn a_replay_of_a_record_holding_never_replayed_headers_leaves_them_out() {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("set-cookie", "session=someone-elses"),
        ("content-length", "999"),
        ("transfer-encoding", "chunked"),
        ("te", "trailers"),
        ("connection", "close"),
        ("keep-alive", "timeout=5"),
        ("upgrade", "websocket"),
        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("idempotent-replayed", "false"),
        ("location", "/calls/1"),
    ] {
        headers.append(name, HeaderValue::from_static(value));
    }
    let record = StoredResponse {
        status: StatusCode::CREATED,
        headers,
        body: Bytes::from_static(b"created"),
    };
    let app = Router::new()
        .route("/calls", post(|| async { StatusCode::IM_A_TEAPOT }))
        .layer(IdempotencyLayer::new().post("/calls").store(ForeignRecord {
            response: record,
            fingerprint: Mutex::new(None),
        }));
    let replay = send(&app, request("/calls", Some("k"), "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, "created");
    let mut names: Vec<&str> = replay.headers.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["content-length", "idempotent-replayed", "location"]);
    assert_eq!(replay.header("content-length"), Some("7"));
}

/// The fuzzer's input itself: a record of status 256 with one header, `tE` (an empty `TE`),
/// and an empty body.
#[test]
fn fuzz_stored_response_te_header_in_a_record_is_not_replayed() {
    let input: [u8; 26] = [
        0x54, 0x49, 0x52, 0x31, 0x01, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x02, 0x74, 0x45, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    let record = StoredResponse::decode(&input).unwrap();
    assert!(record.headers.contains_key(header::TE));
    let replay: Response<Bytes> = record.to_replay();
    assert!(replay.headers().get(header::TE).is_none());
    assert_eq!(replay.headers()[header::CONTENT_LENGTH], "0");
}

// ---------------------------------------------------------------------------------------------
// Header injection through a record

/// A stored record whose header value holds a line break or NUL, or whose header name is not a
/// token, is corrupt: it fails to decode, so it is never replayed (the layer answers 503).
#[test]
fn a_record_with_a_line_break_in_a_header_or_a_bad_header_name_is_corrupt() {
    let good = StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::from_iter([(header::LOCATION, HeaderValue::from_static("/a"))]),
        body: Bytes::new(),
    }
    .encode();
    assert!(StoredResponse::decode(&good).is_ok());
    // The layout: tag, status, count, name length, "location", value length, "/a", body length.
    let value_at = good.len() - 8 - 2;
    for bad in [&b"\r\nSet-Cookie: x=1"[..], b"\n", b"a\0"] {
        let mut bytes = good[..value_at - 4].to_vec();
        bytes.extend_from_slice(&(bad.len() as u32).to_be_bytes());
        bytes.extend_from_slice(bad);
        bytes.extend_from_slice(&good[value_at + 2..]);
        let error = StoredResponse::decode(&bytes).unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Corrupt, "{bad:?}");
    }
    let name_at = holds_at(&good, b"location");
    for bad in [b' ', b':', b'\n'] {
        let mut bytes = good.clone();
        bytes[name_at + 3] = bad;
        let error = StoredResponse::decode(&bytes).unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Corrupt, "{bad:?}");
    }
}

fn holds_at(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Cross-tenant replay and key guessing

/// An organization id that an authentication layer resolved and put in the extensions.
#[derive(Clone)]
struct Org(&'static str);

impl std::fmt::Display for Org {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

fn as_org(org: &'static str, key: &str, json: &str) -> Request<Body> {
    let mut req = Request::post("/calls")
        .header(header::CONTENT_TYPE, "application/json")
        .header(KEY, key)
        .body(Body::from(json.to_owned()))
        .unwrap();
    req.extensions_mut().insert(Org(org));
    req
}

/// Two organizations send the same key, endpoint and body, one while the other's request is
/// still running, in both key-reuse modes and both in-flight modes: each gets its own run, never
/// the other's response, nor a 409 or 422 caused by the other's record. Organization ids of
/// which one is a prefix of the other (`org-1`, `org-12`) are kept apart too.
#[tokio::test]
async fn organizations_sharing_a_key_never_see_each_others_response() {
    for (reuse, in_flight) in [
        (KeyReuse::NewRequest, InFlight::Conflict),
        (KeyReuse::Reject, InFlight::Conflict),
        (
            KeyReuse::Reject,
            InFlight::Wait {
                timeout: Duration::from_secs(5),
            },
        ),
    ] {
        let gate = Gate::default();
        let calls = Calls::default();
        let (g, c) = (gate.clone(), calls.clone());
        let app = Router::new()
            .route(
                "/calls",
                post(
                    move |axum::Extension(org): axum::Extension<Org>, body: Bytes| async move {
                        let run = c.hit();
                        if org.0 == "org-1" {
                            g.enter().await;
                        }
                        let mut response = created(run, &body);
                        response
                            .headers_mut()
                            .insert("x-org", HeaderValue::from_static(org.0));
                        response
                    },
                ),
            )
            .layer(
                IdempotencyLayer::new()
                    .post("/calls")
                    .scope(ExtensionScope::<Org>::new())
                    .key_reuse(reuse)
                    .in_flight(in_flight),
            );

        // org-1's request is in flight; org-12 sends the same key and body, then another body.
        let first = tokio::spawn({
            let app = app.clone();
            async move { send(&app, as_org("org-1", "shared", r#"{"amount":1}"#)).await }
        });
        gate.entered(1).await;
        let other = send(&app, as_org("org-12", "shared", r#"{"amount":1}"#)).await;
        assert_eq!(other.status, StatusCode::CREATED, "{reuse:?} {in_flight:?}");
        assert!(!other.replayed());
        assert_eq!(other.header("x-org"), Some("org-12"));
        let reused = send(&app, as_org("org-12", "shared", r#"{"amount":2}"#)).await;
        match reuse {
            // Checked against its own earlier request, not org-1's running one.
            KeyReuse::Reject => {
                reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused")
            }
            _ => assert_eq!(reused.header("x-org"), Some("org-12")),
        }
        gate.open(1);
        let first = within(first).await.unwrap();
        assert_eq!(first.header("x-org"), Some("org-1"));

        // Replays: each organization gets its own response back.
        let first_again = send(&app, as_org("org-1", "shared", r#"{"amount":1}"#)).await;
        let other_again = send(&app, as_org("org-12", "shared", r#"{"amount":1}"#)).await;
        assert!(first_again.replayed() && other_again.replayed());
        assert_eq!(first_again.body, first.body);
        assert_eq!(other_again.body, other.body);
        assert_ne!(first.body, other.body);
        assert_eq!(first_again.header("x-org"), Some("org-1"));
        assert_eq!(other_again.header("x-org"), Some("org-12"));
    }
}

/// A caller who guesses (or steals) another credential's key learns nothing: the answer is the
/// one an unused key gets (its own run: not a replay, no 409, no 422), whether the victim's
/// record is completed or in flight, with the victim's body or another.
#[tokio::test]
async fn a_guessed_key_answers_like_an_unused_key() {
    for reuse in [KeyReuse::NewRequest, KeyReuse::Reject] {
        let gate = Gate::default();
        let calls = Calls::default();
        let app = app(
            IdempotencyLayer::new().post("/calls").key_reuse(reuse),
            &calls,
            &gate,
        );
        let as_attacker = |credential: &'static str, key: &str, json: &str| {
            let mut req = request("/calls", Some(key), json);
            req.headers_mut()
                .insert(header::AUTHORIZATION, HeaderValue::from_static(credential));
            req
        };

        // The victim (organization A) has a completed record and one in flight.
        let done = send(&app, request("/calls", Some("victim-done"), "{}")).await;
        let running = tokio::spawn({
            let app = app.clone();
            let req = request("/calls", Some("victim-running"), r#"{"slow":true}"#);
            async move { send(&app, req).await }
        });
        gate.entered(1).await;

        // Two attackers: one sends the victim's body, one another body.
        for (attacker, json) in [(ORG_B, "{}"), ("Bearer org_c_secret", r#"{"other":true}"#)] {
            for key in ["victim-done", "victim-running", "never-used"] {
                let got = send(&app, as_attacker(attacker, key, json)).await;
                assert_eq!(got.status, StatusCode::CREATED, "{reuse:?} {key} {json}");
                assert!(!got.replayed(), "{reuse:?} {key}");
                assert_ne!(got.body, done.body);
            }
        }
        gate.open(1);
        within(running).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Exhaustion: deep nesting

/// A megabyte of nested arrays (far past the JSON parser's depth limit of 128) and a nesting
/// of 100: neither overflows the stack; the first is hashed raw, so its retry is still
/// recognised, and the second canonically, so other whitespace is the same request.
#[tokio::test]
async fn deeply_nested_json_neither_overflows_nor_breaks_replay() {
    let calls = Calls::default();
    let counter = calls.clone();
    let app = Router::new()
        .route(
            "/calls",
            post(move || async move {
                counter.hit();
                StatusCode::CREATED
            }),
        )
        .layer(IdempotencyLayer::new().post("/calls"));
    let deep = "[".repeat(500_000) + &"]".repeat(500_000);
    let fine = "[".repeat(100) + "1" + &"]".repeat(100);
    for (key, body) in [("deep", &deep), ("fine", &fine)] {
        send(&app, request("/calls", Some(key), body)).await;
        let again = send(&app, request("/calls", Some(key), body)).await;
        assert!(again.replayed(), "{key}");
    }
    let spaced = "[ ".repeat(100) + "1" + &" ]".repeat(100);
    let again = send(&app, request("/calls", Some("fine"), &spaced)).await;
    assert!(again.replayed());
    assert_eq!(calls.get(), 2);
}

/// Found by the `canonical_json` fuzz target: canonical JSON was not a fixed point. A long
/// integer (past `u64`) is read as an `f64`, and `serde_json`'s default float parsing is not
/// correctly rounded: `9999667799976999199999` was read as one `f64`, written as
/// `9.999667799976999e21`, and that text read back as another. So a retry whose encoder wrote
/// the number the other way was not the same request, and ran again. With correctly rounded
/// parsing (`serde_json`'s `float_roundtrip`), every number's canonical text reads back as the
/// same number.
#[test]
fn fuzz_canonical_json_a_long_integer_canonicalizes_to_a_fixed_point() {
    use tower_idempotency::fingerprint::{body_digest, canonical_json};

    let input = b"9999667799976999199999";
    let canonical = canonical_json(input).unwrap();
    assert_eq!(canonical_json(&canonical).as_deref(), Some(&canonical[..]));
    // The canonical text is the double nearest the input, another number: a body holding a
    // number that no double holds exactly is hashed as sent, not as its canonical form.
    assert_ne!(body_digest(input, true), body_digest(&canonical, true));
    assert_eq!(body_digest(input, false), body_digest(input, true));
    for text in [
        "0.1",
        "1e23",
        "8.98846567431158e307",
        "2.2250738585072014e-308",
        "123456789012345678901234567890",
    ] {
        let canonical = canonical_json(text.as_bytes()).unwrap();
        assert_eq!(
            canonical_json(&canonical).as_deref(),
            Some(&canonical[..]),
            "{text}"
        );
    }
}
