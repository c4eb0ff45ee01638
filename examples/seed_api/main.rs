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
//! cargo run -p seed_api
//! cargo run -p seed_api -- --handler-delay-ms 3000 --in-flight wait
//! RUST_LOG=tower_idempotency=debug,tower_http=debug cargo run -p seed_api
//! cargo run -p seed_api --features redis -- --store redis --redis-url redis://127.0.0.1:6379
//! cargo run -p seed_api --features postgres -- --store postgres \
//!     --database-url postgres://postgres@127.0.0.1:5432/test
//! cargo run -p seed_api --features redis-cluster -- --store redis-cluster \
//!     --redis-url redis://127.0.0.1:7000,redis://127.0.0.1:7001 --redis-wait-replicas 1
//! cargo run -p seed_api --features mysql -- --store mysql \
//!     --database-url mysql://root@127.0.0.1:3306/test
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
//! - `GET /metrics` (no API key needed) is the Prometheus text format:
//!   `idempotency_requests_total{outcome="replayed",route="/agents"}` and the other metrics of
//!   the layer count what happened (feature `metrics`, on by default; without it the layer
//!   records nothing).
//! - Run two instances on one Redis (`--store redis`, two `--addr`s): a key used on one is
//!   replayed by the other (409 while the first still runs), and the handler runs once in all.
//! - With `--store postgres` the resources live in PostgreSQL too (table
//!   `seed_api_resources`, created on start), so every instance lists the same ones, and each
//!   idempotent create commits its rows and its idempotency record in one transaction: a
//!   process killed between commit and response leaves a record that the retry replays.
//!   `--after-commit-delay-ms N` widens that window for tests.
//! - Stop it with Ctrl-C or SIGTERM: it stops taking requests, then waits up to
//!   `--drain-timeout-secs` for creates whose clients already left and for responses still
//!   being stored, so that their retries on another instance replay them.
//!
//! Endpoints (all need `Authorization: Bearer <api key>`; the API key is the organization):
//!
//! | endpoint | idempotent |
//! |---|---|
//! | `POST /agents`, `/calls`, `/tools` | yes: 201 `{"data": {...}}` and `Location` |
//! | `POST /batch-calls` with `{"calls": [...]}` | yes: 201 `{"data": [...]}`, one call each |
//! | `POST /knowledge-bases`, `/voices` | no, the key header is ignored |
//! | `GET /<collection>`, `GET /<collection>/{id}` | reads, never covered |
//! | `GET /stats` | `{"handler_calls": N}`: create-handler runs of your organization in this process |
//! | `GET /openapi.json` | no API key needed: this API in OpenAPI 3.1, the idempotency key header, replay marker and problem responses on the idempotent creates only |
//! | `GET /metrics` | no API key needed: the metrics of this process, Prometheus text format |

mod api;
#[cfg(feature = "utoipa")]
mod openapi;
mod resources;
mod stores;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::DefaultBodyLimit, middleware, routing::get};
use clap::{Parser, ValueEnum};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower_http::{catch_panic::CatchPanicLayer, trace::TraceLayer};
use tower_idempotency::{
    Drain, ExtensionScope, IdempotencyLayer, IdempotencyStore, InFlight, KeyReuse, MemoryStore,
};
use tracing::Level;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};
use uuid::Uuid;

pub use api::OrgId;
use api::{AppState, KINDS, auth, panic_response};
pub use resources::Resources;
pub use stores::build;

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
    /// Where idempotency records are kept. Every store but `memory` needs the crate feature of
    /// the same name (`cargo run -p seed_api --features redis -- --store redis`).
    #[arg(long, value_enum, default_value_t = StoreKind::Memory)]
    pub store: StoreKind,
    /// Redis URL for `--store redis` [default: $REDIS_URL, else redis://127.0.0.1:6379]; for
    /// `--store redis-cluster`, one or more seed node URLs separated by commas [default:
    /// $REDIS_CLUSTER_URL, else redis://127.0.0.1:7000].
    #[arg(long)]
    pub redis_url: Option<String>,
    /// With `--store redis` or `redis-cluster`: `begin` and `complete` wait until this many
    /// replicas have the write (`WAIT`), up to `--redis-wait-ms`; fewer is a store error (503,
    /// or a completion tried again). 0: off (a failover may lose the last writes).
    #[arg(long, default_value_t = 0)]
    pub redis_wait_replicas: u32,
    /// How long `--redis-wait-replicas` waits for the replicas, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub redis_wait_ms: u64,
    /// Database URL for `--store postgres` [default: $DATABASE_URL, else
    /// postgres://postgres@127.0.0.1:5432/test] and `--store mysql` [default: $MYSQL_URL, else
    /// mysql://root@127.0.0.1:3306/test].
    #[arg(long)]
    pub database_url: Option<String>,
    /// With `--store postgres`: a create sleeps this long after its transaction commits and
    /// before it answers, in milliseconds (to kill the process in between, in tests).
    #[arg(long, default_value_t = 0)]
    pub after_commit_delay_ms: u64,
    /// On Ctrl-C or SIGTERM: how long to wait, in seconds, for creates whose clients already
    /// left and for responses still being stored, once no more requests are taken.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_secs: u64,
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
    /// Redis Cluster (feature `redis-cluster`).
    RedisCluster,
    /// PostgreSQL (feature `postgres`); the resources live there too.
    Postgres,
    /// MySQL or MariaDB (feature `mysql`).
    Mysql,
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

/// The reference API with the given idempotency store, its resources in memory.
pub fn app_with_store(config: &Config, store: Arc<dyn IdempotencyStore>) -> Router {
    app_with(config, store, Resources::default()).0
}

/// The reference API with the given idempotency store and resources, and the handle that waits
/// for the layer's detached work at shutdown.
///
/// Layers, outermost first: tracing, catch-panic (a handler panic becomes a 500 *after* the
/// idempotency layer has released its lease, so a retry runs again), authentication (so the
/// organization is known when the idempotency layer scopes the key), the idempotency layer,
/// then the routes.
pub fn app_with(
    config: &Config,
    store: Arc<dyn IdempotencyStore>,
    resources: Resources,
) -> (Router, Drain) {
    app_with_metrics(config, store, resources, None)
}

/// The recorder `main` installs, whose handle renders `GET /metrics`: the Prometheus text
/// format, with buckets from 0.5 ms to 2.5 s for the store-call durations (other histograms
/// are summaries). `install_recorder()` makes it the process's recorder, `build_recorder()`
/// one to install otherwise (a test's thread-local recorder).
pub fn prometheus() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("idempotency_store_duration_seconds".to_owned()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )
        .expect("the bucket list is not empty")
}

/// [`app_with`], and `GET /metrics` rendered by `metrics` when given (without it, 404). The
/// layer records into the recorder in place where it runs: `main` installs
/// [`prometheus`]'s recorder for the whole process before it builds the router.
pub fn app_with_metrics(
    config: &Config,
    store: Arc<dyn IdempotencyStore>,
    resources: Resources,
    metrics: Option<PrometheusHandle>,
) -> (Router, Drain) {
    let state = AppState {
        resources,
        handler_delay: Duration::from_millis(config.handler_delay_ms),
        after_commit_delay: Duration::from_millis(config.after_commit_delay_ms),
        ..AppState::default()
    };
    let layer = idempotency_layer(config, store);
    let drain = layer.drain_handle();
    // Described by the layer itself, from the routes it is given.
    #[cfg(feature = "utoipa")]
    let document = openapi::document((!config.no_idempotency).then_some(&layer));
    let router = api::routes();
    let router = if config.no_idempotency {
        router
    } else {
        router.layer(layer)
    };
    let router = router
        // The handlers take whatever the idempotency layer lets through.
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn(auth));
    // Public: added after the authentication layer, so outside it.
    #[cfg(feature = "utoipa")]
    let router = router.route("/openapi.json", openapi::route(&document));
    // Scrapers send no API key: the route comes after the authentication layer.
    let router = match metrics {
        Some(handle) => router.route("/metrics", get(move || std::future::ready(handle.render()))),
        None => router,
    };
    let router = router
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
        .with_state(state);
    (router, drain)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
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
    // `RUST_LOG` as a list of `target=level` (a `Targets` filter: no regex engine to compile).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| {
            Targets::new()
                .with_target("seed_api", Level::INFO)
                .with_target("tower_idempotency", Level::INFO)
        });
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer())
        .with(filter)
        .init();
    let config = Config::parse();
    let (store, resources) = match build(&config).await {
        Ok(built) => built,
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
    // The process's one recorder, in place before the layer is built (it registers the
    // metrics' descriptions then); its histograms are drained every few seconds.
    let metrics = match prometheus().install_recorder() {
        Ok(handle) => handle,
        Err(err) => {
            eprintln!("seed_api: cannot install the metrics recorder: {err}");
            std::process::exit(1);
        }
    };
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let (app, drain) = app_with_metrics(&config, store, resources, Some(metrics));
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        eprintln!("seed_api: server error: {err}");
        std::process::exit(1);
    }
    // No more requests come in; let creates whose clients left finish, and their responses be
    // stored, so that retries on another instance replay them.
    let pending = drain.pending();
    tracing::info!(target: "seed_api", pending, "draining");
    match drain
        .wait(Duration::from_secs(config.drain_timeout_secs))
        .await
    {
        Ok(()) => tracing::info!(target: "seed_api", "drained; exiting"),
        Err(timed_out) => {
            tracing::error!(target: "seed_api", %timed_out, "drain timed out");
            std::process::exit(1);
        }
    }
}
