//! The reference API, served with the idempotency layer.
//!
//! A small voice-agent API: organizations (one per API key) create agents, calls, batches of
//! calls, tools, knowledge bases and voices. Creating agents, calls, batch calls and tools is
//! idempotent: a retry with the same `X-Idempotency-Key` (same organization, endpoint and body)
//! gets the stored response back instead of creating a second resource. Knowledge bases and
//! voices ignore the header.
//!
//! Run it:
//!
//! ```text
//! cargo run --example seed_api
//! cargo run --example seed_api -- --handler-delay-ms 3000 --in-flight wait
//! RUST_LOG=tower_idempotency=debug,tower_http=debug cargo run --example seed_api
//! cargo run --example seed_api --features redis -- --store redis --redis-url redis://127.0.0.1:6379
//! cargo run --example seed_api --features postgres -- --store postgres \
//!     --database-url postgres://postgres@127.0.0.1:5432/test
//! ```
//!
//! On start it prints its address and two identical `curl` lines: the first creates an agent,
//! the second is its replay (same id, `Idempotent-Replayed: true`). Things to try:
//!
//! - Send the same key with another body: a new agent (`--key-reuse reject`: 422).
//! - Send the same key with another API key (`Authorization: Bearer ...`): a new agent, since
//!   keys belong to an organization.
//! - With `--handler-delay-ms 3000`, send a request and its duplicate at once: the duplicate
//!   gets 409 with `Retry-After` (with `--in-flight wait`: it waits and gets the replay).
//! - Add `"simulate_status": 500` to a body: the 500 is not stored, a retry runs again;
//!   `"simulate_status": 404` is stored and replayed. `"simulate_panic": true`: 500, and a
//!   retry runs again.
//! - `GET /stats` counts the create-handler runs of your organization; a replay does not
//!   count. `GET /agents` lists your agents.
//! - Run two instances on one Redis (`--store redis`, two `--addr`s): a key used on one is
//!   replayed by the other (409 while the first still runs), and the handler runs once in all.
//!
//! Endpoints (all need `Authorization: Bearer <api key>`; the API key is the organization):
//!
//! | endpoint | idempotent |
//! |---|---|
//! | `POST /agents`, `/calls`, `/tools` | yes: 201 `{"data": {...}}` and `Location` |
//! | `POST /batch-calls` with `{"calls": [...]}` | yes: 201 `{"data": [...]}`, one call each |
//! | `POST /knowledge-bases`, `/voices` | no, the key header is ignored |
//! | `GET /<collection>`, `GET /<collection>/{id}` | reads, never covered |
//! | `GET /stats` | `{"handler_calls": N}` for your organization |

use std::{
    any::Any,
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{MethodRouter, get, post},
};
use clap::{Parser, ValueEnum};
use serde_json::{Map, Value, json};
use tower_http::{catch_panic::CatchPanicLayer, trace::TraceLayer};
use tower_idempotency::{
    ExtensionScope, IdempotencyLayer, IdempotencyStore, InFlight, KeyReuse, MemoryStore,
};
use uuid::Uuid;

/// The reference API served with the idempotency layer.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "seed_api",
    about = "The reference API served with tower-idempotency"
)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub addr: SocketAddr,
    /// How long a stored response is replayed, in seconds.
    #[arg(long, default_value_t = 24 * 60 * 60)]
    pub ttl_secs: u64,
    /// Create handlers sleep this long first, in milliseconds, to make retries and races visible.
    #[arg(long, default_value_t = 0)]
    pub handler_delay_ms: u64,
    /// The largest request body, in bytes (the layer's buffering limit; larger bodies get 413).
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// What the same key with a different body means: a new request, or 422.
    #[arg(long, value_enum, default_value_t = KeyReuseMode::New)]
    pub key_reuse: KeyReuseMode,
    /// What a duplicate of a request still running gets: 409 at once, or the replay once the
    /// first finishes (up to --wait-timeout-ms, then 409).
    #[arg(long, value_enum, default_value_t = InFlightMode::Conflict)]
    pub in_flight: InFlightMode,
    /// With `--in-flight wait`: how long a duplicate waits at most, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub wait_timeout_ms: u64,
    /// How long an in-flight claim lasts without renewal, in seconds (renewed while the handler
    /// runs; it runs out only when the process is gone).
    #[arg(long, default_value_t = 60)]
    pub lease_secs: u64,
    /// Where idempotency records are kept. `redis` and `postgres` need the crate feature of the
    /// same name (`cargo run --example seed_api --features redis -- --store redis`).
    #[arg(long, value_enum, default_value_t = StoreKind::Memory)]
    pub store: StoreKind,
    /// Redis URL for `--store redis` [default: $REDIS_URL, else redis://127.0.0.1:6379].
    #[arg(long)]
    pub redis_url: Option<String>,
    /// PostgreSQL URL for `--store postgres` [default: $DATABASE_URL, else
    /// postgres://postgres@127.0.0.1:5432/test].
    #[arg(long)]
    pub database_url: Option<String>,
    /// Serve the same API without the idempotency layer: the baseline of
    /// `benches/http.sh`. Never for real use: retries then run twice.
    #[arg(long)]
    pub no_idempotency: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self::parse_from(["seed_api"])
    }
}

/// `--key-reuse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyReuseMode {
    /// The same key with a different body is a new request.
    New,
    /// The same key with a different body gets 422.
    Reject,
}

/// `--in-flight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InFlightMode {
    /// 409 with `Retry-After`.
    Conflict,
    /// Wait for the first request and replay its response.
    Wait,
}

/// `--store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// In this process's memory.
    Memory,
    /// Redis (feature `redis`).
    Redis,
    /// PostgreSQL (feature `postgres`).
    Postgres,
}

/// The organization of a request: its API key. Put in the request extensions by [`auth`] and
/// read by the idempotency layer's [`ExtensionScope`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrgId(pub String);

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The kinds of resource, one per collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Agent,
    Call,
    BatchCall,
    Tool,
    KnowledgeBase,
    Voice,
}

impl Kind {
    /// The collection's path segment.
    fn collection(self) -> &'static str {
        match self {
            Kind::Agent => "agents",
            Kind::Call => "calls",
            Kind::BatchCall => "batch-calls",
            Kind::Tool => "tools",
            Kind::KnowledgeBase => "knowledge-bases",
            Kind::Voice => "voices",
        }
    }

    /// The `object` field of a resource.
    fn object(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::Call | Kind::BatchCall => "call",
            Kind::Tool => "tool",
            Kind::KnowledgeBase => "knowledge_base",
            Kind::Voice => "voice",
        }
    }

    /// Whether creates of this kind go through the idempotency layer.
    fn idempotent(self) -> bool {
        matches!(
            self,
            Kind::Agent | Kind::Call | Kind::BatchCall | Kind::Tool
        )
    }
}

const KINDS: [Kind; 6] = [
    Kind::Agent,
    Kind::Call,
    Kind::BatchCall,
    Kind::Tool,
    Kind::KnowledgeBase,
    Kind::Voice,
];

/// The API's state: every organization's resources and counters, in memory.
#[derive(Clone, Default)]
struct AppState {
    orgs: Arc<Mutex<HashMap<OrgId, Org>>>,
    handler_delay: Duration,
}

#[derive(Default)]
struct Org {
    handler_calls: u64,
    /// Resources by collection, in creation order. Batch calls are stored under `calls`.
    resources: HashMap<&'static str, Vec<Value>>,
}

impl AppState {
    fn with_org<T>(&self, org: &OrgId, f: impl FnOnce(&mut Org) -> T) -> T {
        // A panicking handler never holds this lock, but do not let one poison the API anyway.
        let mut orgs = self.orgs.lock().unwrap_or_else(PoisonError::into_inner);
        f(orgs.entry(org.clone()).or_default())
    }
}

/// The idempotency layer as the reference API configures it: the four create endpoints,
/// scoped by organization.
fn idempotency_layer(config: &Config, store: Arc<dyn IdempotencyStore>) -> IdempotencyLayer {
    let mut layer = IdempotencyLayer::new()
        .store_arc(store)
        .scope(ExtensionScope::<OrgId>::new())
        .ttl(Duration::from_secs(config.ttl_secs))
        .lease(Duration::from_secs(config.lease_secs))
        .max_request_body(config.max_body_bytes)
        .key_reuse(match config.key_reuse {
            KeyReuseMode::New => KeyReuse::NewRequest,
            KeyReuseMode::Reject => KeyReuse::Reject,
        })
        .in_flight(match config.in_flight {
            InFlightMode::Conflict => InFlight::Conflict,
            InFlightMode::Wait => InFlight::Wait {
                timeout: Duration::from_millis(config.wait_timeout_ms),
            },
        });
    for kind in KINDS.into_iter().filter(|kind| kind.idempotent()) {
        layer = layer.post(&format!("/{}", kind.collection()));
    }
    layer
}

/// The reference API with an in-memory idempotency store.
pub fn app(config: &Config) -> Router {
    app_with_store(config, Arc::new(MemoryStore::new()))
}

/// The reference API with the given idempotency store.
///
/// Layers, outermost first: tracing, catch-panic (a handler panic becomes a 500 *after* the
/// idempotency layer has released its lease, so a retry runs again), authentication (so the
/// organization is known when the idempotency layer scopes the key), the idempotency layer,
/// then the routes.
pub fn app_with_store(config: &Config, store: Arc<dyn IdempotencyStore>) -> Router {
    let state = AppState {
        handler_delay: Duration::from_millis(config.handler_delay_ms),
        ..AppState::default()
    };
    let mut router = Router::new().route("/stats", get(stats));
    for kind in KINDS {
        let collection = kind.collection();
        router = router.route(&format!("/{collection}"), collection_routes(kind));
        if kind != Kind::BatchCall {
            router = router.route(
                &format!("/{collection}/{{id}}"),
                get(
                    move |state: State<AppState>, org: Extension<OrgId>, id: Path<String>| {
                        show(state, org, id, kind)
                    },
                ),
            );
        }
    }
    let router = router.fallback(not_found);
    let router = if config.no_idempotency {
        router
    } else {
        router.layer(idempotency_layer(config, store))
    };
    router
        // The handlers take whatever the idempotency layer lets through.
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn(auth))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

fn collection_routes(kind: Kind) -> MethodRouter<AppState> {
    post(
        move |state: State<AppState>, org: Extension<OrgId>, body: Bytes| {
            create(state, org, body, kind)
        },
    )
    .get(move |state: State<AppState>, org: Extension<OrgId>| list(state, org, kind))
}

/// A JSON error: `{"error": {"type": ..., "message": ...}}`.
fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "type": kind, "message": message.into() } });
    (status, Json(body)).into_response()
}

/// `Authorization: Bearer <api key>`; the API key is the organization.
async fn auth(mut req: Request, next: Next) -> Response {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let key = match (values.next(), values.next()) {
        (Some(value), None) => value
            .to_str()
            .ok()
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|key| !key.is_empty() && !key.contains(char::is_whitespace)),
        _ => None,
    };
    let Some(key) = key else {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send your API key as `Authorization: Bearer <api key>`",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    };
    let org = OrgId(key.to_owned());
    req.extensions_mut().insert(org);
    next.run(req).await
}

fn panic_response(_panic: Box<dyn Any + Send + 'static>) -> Response {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the server failed while handling the request; it is safe to retry",
    )
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A new resource: the request's fields plus `id`, `object` and `created_at`.
fn resource(kind: Kind, fields: Map<String, Value>) -> Value {
    let mut data = Map::new();
    data.insert("id".into(), Uuid::new_v4().to_string().into());
    data.insert("object".into(), kind.object().into());
    for (name, value) in fields {
        if !matches!(name.as_str(), "id" | "object" | "created_at") {
            data.insert(name, value);
        }
    }
    data.insert("created_at".into(), now_unix().into());
    Value::Object(data)
}

async fn create(
    State(state): State<AppState>,
    Extension(org): Extension<OrgId>,
    body: Bytes,
    kind: Kind,
) -> Response {
    // Every run counts, whatever it answers.
    state.with_org(&org, |org| org.handler_calls += 1);
    if !state.handler_delay.is_zero() {
        tokio::time::sleep(state.handler_delay).await;
    }

    let fields = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "the body must be a JSON object",
            );
        }
        Err(err) => {
            let message = format!("the body is not valid JSON: {err}");
            return error(StatusCode::BAD_REQUEST, "invalid_json", message);
        }
    };
    if fields.get("simulate_panic") == Some(&Value::Bool(true)) {
        panic!("simulated panic in POST /{}", kind.collection());
    }
    if let Some(simulated) = fields.get("simulate_status") {
        let status = simulated
            .as_u64()
            .and_then(|code| u16::try_from(code).ok())
            .and_then(|code| StatusCode::from_u16(code).ok());
        let Some(status) = status else {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "simulate_status must be an HTTP status code (100 to 999)",
            );
        };
        let message = format!("simulated status {}", status.as_u16());
        return error(status, "simulated", message);
    }

    if kind == Kind::BatchCall {
        let Some(Value::Array(calls)) = fields.get("calls") else {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "a batch is `{\"calls\": [{...}, ...]}`",
            );
        };
        let mut created = Vec::with_capacity(calls.len());
        for call in calls {
            let Value::Object(call) = call else {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    "every entry of `calls` must be a JSON object",
                );
            };
            created.push(resource(Kind::Call, call.clone()));
        }
        state.with_org(&org, |org| {
            let calls = org.resources.entry(Kind::Call.collection()).or_default();
            calls.extend(created.iter().cloned());
        });
        return (StatusCode::CREATED, Json(json!({ "data": created }))).into_response();
    }

    let data = resource(kind, fields);
    let location = format!(
        "/{}/{}",
        kind.collection(),
        data["id"].as_str().unwrap_or("")
    );
    state.with_org(&org, |org| {
        let list = org.resources.entry(kind.collection()).or_default();
        list.push(data.clone());
    });
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(json!({ "data": data })),
    )
        .into_response()
}

async fn list(
    State(state): State<AppState>,
    Extension(org): Extension<OrgId>,
    kind: Kind,
) -> Response {
    let data = state.with_org(&org, |org| {
        org.resources
            .get(kind.collection())
            .cloned()
            .unwrap_or_default()
    });
    Json(json!({ "data": data })).into_response()
}

async fn show(
    State(state): State<AppState>,
    Extension(org): Extension<OrgId>,
    Path(id): Path<String>,
    kind: Kind,
) -> Response {
    let found = state.with_org(&org, |org| {
        org.resources
            .get(kind.collection())
            .and_then(|list| list.iter().find(|item| item["id"] == id.as_str()).cloned())
    });
    match found {
        Some(data) => Json(json!({ "data": data })).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {} with id {id}", kind.object()),
        ),
    }
}

async fn stats(State(state): State<AppState>, Extension(org): Extension<OrgId>) -> Response {
    let handler_calls = state.with_org(&org, |org| org.handler_calls);
    Json(json!({ "handler_calls": handler_calls })).into_response()
}

/// The store `--store` names.
pub async fn build_store(config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    match config.store {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::new())),
        StoreKind::Redis => redis_store(config).await,
        StoreKind::Postgres => postgres_store(config).await,
    }
}

/// The Redis URL: `--redis-url`, else `$REDIS_URL`, else the local default.
pub fn redis_url(config: &Config) -> String {
    config
        .redis_url
        .clone()
        .or_else(|| std::env::var("REDIS_URL").ok())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// The PostgreSQL URL: `--database-url`, else `$DATABASE_URL`, else the local default.
pub fn database_url(config: &Config) -> String {
    config
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

#[cfg(not(feature = "redis"))]
async fn redis_store(_config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    Err("--store redis needs the `redis` feature: \
         cargo run --example seed_api --features redis -- --store redis"
        .to_owned())
}

#[cfg(feature = "redis")]
async fn redis_store(config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    use tower_idempotency::store::RedisStore;

    let url = redis_url(config);
    // A store error's message includes its cause. Records expire in Redis by themselves.
    let store = RedisStore::open(&url)
        .await
        .map_err(|error| format!("--store redis: cannot connect to Redis ({url}): {error}"))?;
    Ok(Arc::new(store.prefix("seed_api:idempotency:")))
}

#[cfg(not(feature = "postgres"))]
async fn postgres_store(_config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    Err("--store postgres needs the `postgres` feature: \
         cargo run --example seed_api --features postgres -- --store postgres"
        .to_owned())
}

#[cfg(feature = "postgres")]
async fn postgres_store(config: &Config) -> Result<Arc<dyn IdempotencyStore>, String> {
    use tower_idempotency::store::{PostgresStore, StoreError};

    let url = database_url(config);
    // A store error's message includes its cause.
    let failed = |what: &str, error: &StoreError| {
        format!("--store postgres: cannot {what} ({url}): {error}")
    };
    let store = PostgresStore::connect(&url)
        .await
        .map_err(|error| failed("connect to PostgreSQL", &error))?;
    store
        .migrate()
        .await
        .map_err(|error| failed("create the idempotency table", &error))?;
    // Reclaims expired records every minute, for as long as the server runs.
    drop(store.spawn_cleanup(Duration::from_secs(60)));
    Ok(Arc::new(store))
}

/// A flag value as it is written on the command line.
fn name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |value| value.get_name().to_owned())
}

/// What `main` prints once it listens: the address and a create and its replay.
pub fn banner(config: &Config, addr: SocketAddr) -> String {
    let key = Uuid::new_v4();
    let curl = format!(
        "curl -i http://{addr}/agents -H 'Authorization: Bearer sk_test_acme' \
         -H 'Content-Type: application/json' -H 'X-Idempotency-Key: {key}' \
         -d '{{\"name\": \"Support agent\", \"voice\": \"alloy\"}}'"
    );
    format!(
        "seed_api listening on http://{addr} (store: {}, in-flight: {}, key reuse: {})\n\
         \n\
         Create an agent:\n  {curl}\n\
         Send it again, same key: the same agent, with `Idempotent-Replayed: true`:\n  {curl}\n\
         Then: curl -s http://{addr}/stats -H 'Authorization: Bearer sk_test_acme'\n",
        name(config.store),
        name(config.in_flight),
        name(config.key_reuse),
    )
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "seed_api=info,tower_idempotency=info".into()),
        )
        .init();
    let config = Config::parse();
    let store = match build_store(&config).await {
        Ok(store) => store,
        Err(message) => {
            eprintln!("seed_api: {message}");
            std::process::exit(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("seed_api: cannot listen on {}: {err}", config.addr);
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().unwrap_or(config.addr);
    println!("{}", banner(&config, addr));
    let app = app_with_store(&config, store);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        eprintln!("seed_api: server error: {err}");
        std::process::exit(1);
    }
}
