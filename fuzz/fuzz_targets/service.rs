//! The whole service: an axum router with a few handlers behind the layer, over a `MemoryStore`,
//! fed a short sequence of requests with arbitrary methods, paths, queries, credentials, key
//! fields, extra headers and bodies, some sent concurrently, with the (paused) clock moved in
//! between. The layer's configuration is fuzzed too.
//!
//! Checked after every sequence:
//! - nothing panics except the `/panic` handler, on purpose;
//! - every response the layer makes itself is a problem+json with a known `type` and the status
//!   of that type, and the only 5xx it makes are the store's 503s;
//! - a replay comes from a run of the same request (credential, method, path, query, key, body)
//!   and equals what that run sent, minus the headers that are never replayed, with a
//!   `Content-Length` that matches its body and no `Set-Cookie`;
//! - runs of the same covered request never overlap, and a run whose response was stored is
//!   not followed by another before its TTL ran out.
#![no_main]

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, Once, OnceLock},
    time::Duration,
};

use arbitrary::Arbitrary;
use axum::{Router, body::Body, extract::Request as AxumRequest, routing::any};
use bytes::Bytes;
use futures_util::{FutureExt, future::join_all, stream};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, InFlight, KeyReuse, MemoryStore, REPLAYED_HEADER,
    default_status_policy,
    fingerprint::{body_digest, is_json},
};

const HANDLER_PANIC: &str = "fuzz: the /panic handler panics on purpose";
const KEY: &str = "x-idempotency-key";
const ROUTES: [&str; 6] = [
    "/calls",
    "/agents",
    "/status/{code}",
    "/panic",
    "/slow/{ms}",
    "/stream/{n}",
];

// ---------------------------------------------------------------------------------------------
// Input

#[derive(Arbitrary, Debug)]
struct Input {
    allow_list: bool,
    strict: bool,
    wait: bool,
    require_key: bool,
    run_to_completion: bool,
    max_records: Option<u8>,
    /// `None`: the default.
    max_request_body: Option<u16>,
    max_response_body: Option<u16>,
    lease_ms: u16,
    ttl_ms: u16,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
struct Step {
    what: What,
    /// Sent together with the previous step instead of after it.
    concurrent: bool,
    /// Moves the clock forward before this step (or its group) is sent.
    advance_ms: u16,
}

#[derive(Arbitrary, Debug)]
enum What {
    /// A new request.
    Fresh(Req),
    /// An earlier fresh request again (a retry), by its index.
    Again(u8),
}

/// Not POST (`None` is POST).
#[derive(Arbitrary, Debug)]
enum MethodChoice {
    Get,
    Put,
    Other(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum PathChoice {
    Calls,
    Agents,
    Status(u16),
    Panic,
    Slow(u16),
    Stream(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum KeyChoice {
    Pool(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum ContentType {
    None,
    Json,
    ProblemJson,
    Text,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum BodyChoice {
    Pool(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Req {
    method: Option<MethodChoice>,
    path: PathChoice,
    query: Option<String>,
    /// One of three organizations, or (one time in four) no credentials.
    org: u8,
    /// The key: one of four (`None`), or any number of fields of any kind.
    keys: Option<Vec<KeyChoice>>,
    /// `None`: `application/json`.
    content_type: Option<ContentType>,
    body: BodyChoice,
    extra: Vec<(Vec<u8>, Vec<u8>)>,
}

const BODIES: [&str; 8] = [
    "{}",
    r#"{"amount":100,"currency":"eur"}"#,
    r#"{ "currency" : "eur", "amount" : 100 }"#,
    r#"{"amount":101,"currency":"eur"}"#,
    r#"[1,2,3]"#,
    r#"{"a":{"b":[1,{"c":null}]}}"#,
    "not json",
    "",
];

fn method(choice: &Option<MethodChoice>) -> Option<Method> {
    match choice {
        None => Some(Method::POST),
        Some(MethodChoice::Get) => Some(Method::GET),
        Some(MethodChoice::Put) => Some(Method::PUT),
        Some(MethodChoice::Other(bytes)) => Method::from_bytes(bytes).ok(),
    }
}

fn path(choice: &PathChoice) -> String {
    match choice {
        PathChoice::Calls => "/calls".into(),
        PathChoice::Agents => "/agents".into(),
        PathChoice::Status(code) => format!("/status/{code}"),
        PathChoice::Panic => "/panic".into(),
        PathChoice::Slow(ms) => format!("/slow/{}", ms % 2000),
        PathChoice::Stream(n) => format!("/stream/{n}"),
        PathChoice::Other(path) => path.clone(),
    }
}

fn build(req: &Req) -> Option<Request<Body>> {
    let mut uri = path(&req.path);
    if let Some(query) = &req.query {
        uri.push('?');
        uri.push_str(query);
    }
    let uri: Uri = uri.parse().ok()?;
    let mut builder = Request::builder().method(method(&req.method)?).uri(uri);
    let headers = builder.headers_mut().expect("builder is fine so far");
    if req.org % 4 != 3 {
        let auth = format!("Bearer org-{}", req.org % 4);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&auth).unwrap());
    }
    let one_of_four = [KeyChoice::Pool(req.org / 4)];
    let keys = req.keys.as_deref().unwrap_or(&one_of_four);
    for key in keys.iter().take(3) {
        let value = match key {
            KeyChoice::Pool(n) => HeaderValue::from_str(&format!("key-{}", n % 4)).ok(),
            KeyChoice::Raw(bytes) => HeaderValue::from_bytes(bytes).ok(),
        };
        if let Some(value) = value {
            headers.append(KEY, value);
        }
    }
    let content_type = match &req.content_type {
        Some(ContentType::None) => None,
        None | Some(ContentType::Json) => Some(HeaderValue::from_static("application/json")),
        Some(ContentType::ProblemJson) => {
            Some(HeaderValue::from_static("application/problem+json"))
        }
        Some(ContentType::Text) => Some(HeaderValue::from_static("text/plain")),
        Some(ContentType::Raw(bytes)) => HeaderValue::from_bytes(bytes).ok(),
    };
    if let Some(content_type) = content_type {
        headers.insert(header::CONTENT_TYPE, content_type);
    }
    for (name, value) in req.extra.iter().take(4) {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            && name != header::CONTENT_LENGTH
        {
            headers.append(name, value);
        }
    }
    let body = match &req.body {
        BodyChoice::Pool(n) => {
            Bytes::from_static(BODIES[usize::from(*n) % BODIES.len()].as_bytes())
        }
        BodyChoice::Raw(bytes) => Bytes::copy_from_slice(bytes),
    };
    builder.body(Body::from(body)).ok()
}

// ---------------------------------------------------------------------------------------------
// The application

/// What makes two requests the same request, as seen by a handler (independently of the
/// layer's own code, except for the body canonicalization, fuzzed on its own).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    authorization: Option<Vec<u8>>,
    method: Method,
    path: String,
    query: Option<String>,
    key: Option<String>,
    body: (bool, [u8; 32]),
}

fn identity(parts: &http::request::Parts, body: &[u8]) -> Identity {
    let mut auth = parts.headers.get_all(header::AUTHORIZATION).iter();
    let authorization = match (auth.next(), auth.next()) {
        (Some(one), None) => Some(one.as_bytes().to_vec()),
        _ => None,
    };
    let key = IdempotencyKey::from_headers(&parts.headers, &HeaderName::from_static(KEY))
        .ok()
        .flatten()
        .map(|key| key.as_str().to_owned());
    let (kind, digest) = body_digest(body, is_json(&parts.headers));
    Identity {
        authorization,
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        key,
        body: (
            kind == tower_idempotency::fingerprint::BodyKind::Json,
            digest,
        ),
    }
}

#[derive(Debug)]
struct Run {
    identity: Identity,
    started: Instant,
    ended: Option<Instant>,
    /// Whether the layer would store this run's response (status policy, size, whole body).
    storable: bool,
}

#[derive(Clone)]
struct App {
    runs: Arc<Mutex<Vec<Run>>>,
    max_response_body: usize,
}

impl App {
    fn start(&self, parts: &http::request::Parts, body: &[u8]) -> usize {
        let mut runs = self.runs.lock().unwrap();
        runs.push(Run {
            identity: identity(parts, body),
            started: Instant::now(),
            ended: None,
            storable: false,
        });
        runs.len() - 1
    }

    fn end(&self, run: usize, status: StatusCode, len: usize, whole: bool) {
        let mut runs = self.runs.lock().unwrap();
        runs[run].ended = Some(Instant::now());
        runs[run].storable =
            default_status_policy(status) && len <= self.max_response_body && whole;
    }

    async fn handle(self, req: AxumRequest) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .expect("the layer's buffered body")
            .to_bytes();
        let run = self.start(&parts, &body);
        let path = parts.uri.path().to_owned();
        let segments: Vec<&str> = path.split('/').collect();
        let mut builder = Response::builder()
            .header("x-run", run)
            .header(header::SET_COOKIE, format!("session={run}"))
            .header(header::DATE, "Sun, 06 Nov 1994 08:49:37 GMT")
            .header("x-multi", "one")
            .header("x-multi", HeaderValue::from_bytes(b"\x80\xff").unwrap())
            .header(header::CONNECTION, "x-hop")
            .header("x-hop", "dropped")
            .header(header::CONTENT_LENGTH, "999");
        let (status, response_body) = match segments.as_slice() {
            ["", "panic"] => panic!("{HANDLER_PANIC}"),
            ["", "status", code] => {
                let status = code
                    .parse::<u16>()
                    .ok()
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .filter(|s| !s.is_informational())
                    .unwrap_or(StatusCode::IM_A_TEAPOT);
                (status, Body::from(format!("status {status} run {run}")))
            }
            ["", "slow", ms] => {
                let ms = ms.parse::<u64>().unwrap_or(0).min(2000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                (StatusCode::CREATED, Body::from(format!("slow run {run}")))
            }
            ["", "stream", n] => {
                let n = n.parse::<usize>().unwrap_or(0).min(64);
                // An odd count ends the body with an error.
                let fails = n % 2 == 1;
                let chunks = (0..n).map(move |i| {
                    if fails && i + 1 == n {
                        Err(std::io::Error::other("stream failed"))
                    } else {
                        Ok(Bytes::from(vec![b'a' + (i % 26) as u8; 100]))
                    }
                });
                let len = if fails { (n - 1) * 100 } else { n * 100 };
                self.end(run, StatusCode::CREATED, len, !fails);
                let response = builder
                    .status(StatusCode::CREATED)
                    .body(Body::from_stream(stream::iter(chunks)))
                    .unwrap();
                return response;
            }
            _ => {
                let mut echo = format!("run {run}: ").into_bytes();
                echo.extend_from_slice(&body);
                let status = if ROUTES[..2].contains(&path.as_str()) {
                    StatusCode::CREATED
                } else {
                    StatusCode::NOT_FOUND
                };
                (status, Body::from(echo))
            }
        };
        let len = http_body::Body::size_hint(&response_body).exact().unwrap() as usize;
        self.end(run, status, len, true);
        builder = builder.status(status);
        builder.body(response_body).unwrap()
    }
}

fn router(app: App, layer: IdempotencyLayer) -> Router {
    let mut router = Router::new();
    for route in ROUTES {
        let app = app.clone();
        router = router.route(route, any(move |req: AxumRequest| app.clone().handle(req)));
    }
    let fallback = app.clone();
    router
        .fallback(move |req: AxumRequest| fallback.clone().handle(req))
        .layer(layer)
}

// ---------------------------------------------------------------------------------------------
// Running and checking

#[derive(Debug)]
struct Reply {
    identity: Identity,
    status: StatusCode,
    headers: HeaderMap,
    /// `None` when the body failed while being read.
    body: Option<Bytes>,
}

impl Reply {
    fn run(&self) -> Option<usize> {
        self.headers
            .get("x-run")
            .map(|v| v.to_str().unwrap().parse().unwrap())
    }

    fn replayed(&self) -> bool {
        match self.headers.get(REPLAYED_HEADER) {
            None => false,
            Some(v) => {
                assert_eq!(v, "true");
                true
            }
        }
    }
}

/// Headers a replay never carries (besides `Content-Length`, which it sets itself).
fn never_replayed(name: &HeaderName, connection_named: &[HeaderName]) -> bool {
    matches!(
        name.as_str(),
        "set-cookie"
            | "date"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "idempotent-replayed"
    ) || connection_named.contains(name)
}

fn replayable(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| !never_replayed(name, &named))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

const LAYER_TYPES: [(&str, u16); 8] = [
    ("invalid-key", 400),
    ("body-unreadable", 400),
    ("missing-scope", 401),
    ("in-flight", 409),
    ("body-too-large", 413),
    ("key-reused", 422),
    ("store-unavailable", 503),
    ("store-full", 503),
];

fn check_layer_response(reply: &Reply) {
    assert!(!reply.replayed(), "a replay without x-run: {reply:?}");
    assert_eq!(
        reply
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
        Some(&b"application/problem+json"[..]),
        "a response neither from the handler nor a problem: {reply:?}"
    );
    let problem: serde_json::Value =
        serde_json::from_slice(reply.body.as_ref().unwrap()).expect("problem JSON");
    let ty = problem["type"].as_str().expect("type");
    let kind = ty
        .strip_prefix("tag:tower-idempotency,2026:")
        .expect("the layer's type");
    let (_, status) = LAYER_TYPES
        .iter()
        .find(|(k, _)| *k == kind)
        .unwrap_or_else(|| panic!("unknown type {ty}"));
    assert_eq!(reply.status.as_u16(), *status, "{reply:?}");
    assert_eq!(problem["status"], *status);
    assert!(problem["title"].is_string() && problem["detail"].is_string());
}

fn check(replies: &[Reply], runs: &[Run], originals: &[Option<&Reply>], ttl: Duration) {
    for reply in replies {
        let Some(run) = reply.run() else {
            check_layer_response(reply);
            continue;
        };
        if !reply.replayed() {
            continue;
        }
        // A replay: the same request as its run, and what that run sent.
        assert_eq!(
            reply.identity, runs[run].identity,
            "replayed to another request"
        );
        assert!(reply.identity.key.is_some() && reply.identity.authorization.is_some());
        let original = originals[run].expect("the run's own reply was seen");
        assert_eq!(reply.status, original.status);
        assert_eq!(reply.body, original.body, "replayed body");
        assert_eq!(
            replayable(&reply.headers),
            replayable(&original.headers),
            "replayed headers"
        );
        assert!(reply.headers.get(header::SET_COOKIE).is_none());
        let len = reply.body.as_ref().unwrap().len();
        let lengths: Vec<_> = reply
            .headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .collect();
        if reply.status == StatusCode::NO_CONTENT || reply.status == StatusCode::NOT_MODIFIED {
            assert!(lengths.is_empty());
        } else {
            assert_eq!(lengths, [len.to_string().as_str()]);
        }
    }
    // Runs of the same covered, keyed request never overlap; a stored one holds for its TTL.
    for (i, first) in runs.iter().enumerate() {
        let Some(ended) = first.ended else { continue };
        if first.identity.key.is_none() || first.identity.authorization.is_none() {
            continue;
        }
        for later in &runs[i + 1..] {
            if later.identity != first.identity || !covered(&later.identity) {
                continue;
            }
            assert!(later.started >= ended, "two runs of one request overlap");
            if first.storable {
                assert!(
                    later.started >= ended + ttl,
                    "a stored request ran again within its TTL"
                );
            }
        }
    }
}

static ALLOW_LIST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn covered(id: &Identity) -> bool {
    if id.method != Method::POST {
        return false;
    }
    if !ALLOW_LIST.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    let segments: Vec<&str> = id.path.split('/').collect();
    matches!(
        segments.as_slice(),
        ["", "calls" | "agents" | "panic"] | ["", "status" | "slow" | "stream", _]
    ) && !id.path.ends_with('/')
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    })
}

/// Lets the `/panic` handler's panic through; every other panic still aborts (libFuzzer's hook).
fn quiet_handler_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied());
            if message != Some(HANDLER_PANIC) {
                fuzzer_hook(info);
            }
        }));
    });
}

async fn send(router: Router, req: Request<Body>) -> Option<Reply> {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let identity = identity(&parts, &bytes);
    let req = Request::from_parts(parts, Body::from(bytes));
    let response = match AssertUnwindSafe(router.oneshot(req)).catch_unwind().await {
        Ok(response) => response.unwrap(),
        // The handler's panic, carried out by the layer (nothing else may panic: see the hook).
        Err(_) => return None,
    };
    let (parts, body) = response.into_parts();
    let body = body.collect().await.ok().map(|c| c.to_bytes());
    Some(Reply {
        identity,
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

fuzz_target!(|input: Input| {
    quiet_handler_panics();
    let lease = Duration::from_millis(u64::from(input.lease_ms).max(30));
    let ttl = Duration::from_millis(u64::from(input.ttl_ms));
    let max_response_body = input.max_response_body.map_or(4 << 20, usize::from);
    ALLOW_LIST.store(input.allow_list, std::sync::atomic::Ordering::Relaxed);
    runtime().block_on(async {
        let store = match input.max_records {
            Some(max) => MemoryStore::builder().max_records(usize::from(max)).build(),
            None => MemoryStore::new(),
        };
        let mut layer = if input.allow_list {
            ROUTES
                .iter()
                .fold(IdempotencyLayer::new(), |layer, route| layer.post(route))
        } else {
            IdempotencyLayer::new()
        };
        layer = layer
            .store(store)
            .key_reuse(if input.strict {
                KeyReuse::Reject
            } else {
                KeyReuse::NewRequest
            })
            .in_flight(if input.wait {
                InFlight::Wait {
                    timeout: Duration::from_secs(1),
                }
            } else {
                InFlight::Conflict
            })
            .require_key(input.require_key)
            .run_to_completion(input.run_to_completion)
            .lease(lease)
            .ttl(ttl)
            .max_request_body(input.max_request_body.map_or(2 << 20, usize::from))
            .max_response_body(max_response_body);
        let app = App {
            runs: Arc::default(),
            max_response_body,
        };
        let router = router(app.clone(), layer);

        let mut replies = Vec::new();
        let mut group: Vec<Request<Body>> = Vec::new();
        let mut fresh: Vec<&Req> = Vec::new();
        let mut steps = input.steps.iter().take(16).peekable();
        while let Some(step) = steps.next() {
            let req = match &step.what {
                What::Fresh(req) => {
                    fresh.push(req);
                    Some(req)
                }
                What::Again(i) if !fresh.is_empty() => Some(fresh[usize::from(*i) % fresh.len()]),
                What::Again(_) => None,
            };
            if let Some(req) = req.and_then(build) {
                group.push(req);
            }
            let next_joins = steps.peek().is_some_and(|next| next.concurrent);
            if next_joins {
                continue;
            }
            let advance = steps.peek().map_or(0, |next| next.advance_ms);
            let sent = join_all(group.drain(..).map(|req| send(router.clone(), req))).await;
            replies.extend(sent.into_iter().flatten());
            tokio::time::advance(Duration::from_millis(u64::from(advance))).await;
        }
        // Let background releases finish, and old sweepers see their store is gone.
        drop(router);
        tokio::time::sleep(Duration::from_secs(2)).await;

        let runs = app.runs.lock().unwrap();
        let mut originals: Vec<Option<&Reply>> = vec![None; runs.len()];
        for reply in &replies {
            if let (Some(run), false) = (reply.run(), reply.replayed()) {
                originals[run] = Some(reply);
            }
        }
        check(&replies, &runs, &originals, ttl);
    });
});
