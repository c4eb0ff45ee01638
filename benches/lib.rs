//! The application and requests the benchmarks share (`layer`, `callgrind`): the same routes
//! and handler for every variant, our layer as the reference API configures it, and the peer
//! (`axum-idempotent`) behind the session and cookie layers it needs.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use axum::{
    Router,
    body::{Body, Bytes, to_bytes},
    http::{HeaderValue, Request, StatusCode, header},
    response::IntoResponse,
    routing::post,
};
use axum_idempotent::{IdempotentLayer, IdempotentOptions};
use ruts::{CookieOptions, Session, SessionLayer, store::Ttl, store::moka::MokaStore};
use tower::ServiceExt;
use tower_cookies::CookieManagerLayer;
use tower_idempotency::{IdempotencyLayer, MemoryStore, REPLAYED_HEADER};

/// The idempotency key header every variant reads.
pub const KEY_HEADER: &str = "x-idempotency-key";
/// The `Authorization` header every request carries (our layer's default scope).
pub const AUTHORIZATION: &str = "Bearer sk_test_bench_0123456789";

/// 1 KiB.
pub const KIB: usize = 1024;

// ---------------------------------------------------------------------------------------------
// The application: the same routes and handler for every variant.

/// A create handler: reads the whole body, answers 201 with a small JSON resource.
pub async fn create(body: Bytes) -> impl IntoResponse {
    let body = format!(r#"{{"id":"call_{:016x}","status":"queued"}}"#, body.len());
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
}

/// The routes every variant serves: `POST /calls`, `/agents` (listed) and `/voices` (not listed).
pub fn routes() -> Router {
    Router::new()
        .route("/calls", post(create))
        .route("/agents", post(create))
        .route("/voices", post(create))
}

/// The router with no layer.
pub fn bare() -> Router {
    routes()
}

/// The bare router with a layer that does nothing: what axum charges for any layer (each
/// route's service is wrapped, boxed and cloned per request).
pub fn noop_layer() -> Router {
    routes().layer(tower::layer::layer_fn(|service| service))
}

/// Our layer as the reference API uses it: router-wide, with an allow-list.
pub fn ours() -> Router {
    ours_with(|layer| layer)
}

/// [`ours`] with `configure` applied to the layer.
pub fn ours_with(configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer) -> Router {
    routes().layer(configure(
        IdempotencyLayer::new()
            .post("/agents")
            .post("/calls")
            .post("/batch-calls")
            .post("/tools")
            // Unbounded: a run stores more first requests than the default million records.
            .store(
                MemoryStore::builder()
                    .max_records(usize::MAX)
                    .max_bytes(usize::MAX)
                    .build(),
            ),
    ))
}

/// `axum-idempotent` with the layers it needs. `key_header` picks its direct-key mode (no
/// key: pass through); otherwise it hashes method, path, headers and body.
pub fn peer(key_header: bool) -> Router {
    let options = IdempotentOptions::default().expire_after(24 * 60 * 60);
    let options = if key_header {
        options.use_idempotency_key_header(Some(KEY_HEADER), false)
    } else {
        options
    };
    let store = Arc::new(MokaStore::builder().max_capacity(1_000_000).build());
    let cookies = CookieOptions::build()
        .name("session")
        .max_age(24 * 60 * 60)
        .path("/");
    routes()
        .route(
            "/session",
            post(|session: Session<MokaStore>| async move {
                let ttl = Ttl::new(24 * 60 * 60).expect("a valid TTL");
                session
                    .set("user", &String::from("bench"), ttl, None)
                    .await
                    .expect("session store");
                "session"
            }),
        )
        .layer(IdempotentLayer::<MokaStore>::new(options))
        .layer(SessionLayer::new(store).with_cookie_options(cookies))
        .layer(CookieManagerLayer::new())
}

/// Creates a peer session and returns its `Cookie` header value.
pub async fn new_session(app: &Router) -> HeaderValue {
    let response = app
        .clone()
        .oneshot(
            Request::post("/session")
                .header(header::AUTHORIZATION, AUTHORIZATION)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let set_cookie = response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("session="))
        .expect("the peer's session layer sets a session cookie");
    let pair = set_cookie.split(';').next().unwrap();
    HeaderValue::from_str(pair).unwrap()
}

/// A JSON body of about `size` bytes: a few fields (keys out of order) and a list of items.
pub fn json_body(size: usize) -> Bytes {
    let mut out = String::from(
        r#"{"ref":"0000000000000000","to":"+15550100","agent_id":"agent_8f14e45fceea167a","metadata":{"priority":3,"campaign":"spring"},"items":["#,
    );
    let mut i = 0;
    loop {
        let item = format!(
            r#"{}{{"sku":"sku-{i:06}","qty":{},"note":"ring twice, then leave it"}}"#,
            if i == 0 { "" } else { "," },
            i % 7 + 1
        );
        if out.len() + item.len() + 2 > size && i > 0 {
            break;
        }
        out.push_str(&item);
        i += 1;
    }
    out.push_str("]}");
    Bytes::from(out)
}

/// `body` (from [`json_body`]) with its `ref` field set to `n`: a new request's body.
pub fn unique_body(body: &Bytes, n: u64) -> Bytes {
    let mut unique = body.to_vec();
    unique[8..24].copy_from_slice(format!("{n:016x}").as_bytes());
    Bytes::from(unique)
}

/// A POST to `path` with a JSON body, `Authorization`, and the key and peer cookie if given.
pub fn request(
    path: &str,
    key: Option<&str>,
    cookie: Option<&HeaderValue>,
    body: &Bytes,
) -> Request<Body> {
    let mut builder = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, AUTHORIZATION);
    if let Some(key) = key {
        builder = builder.header(KEY_HEADER, key);
    }
    if let Some(cookie) = cookie {
        builder = builder.header(header::COOKIE, cookie.clone());
    }
    builder.body(Body::from(body.clone())).unwrap()
}

/// Sends the request and reads the whole response, as a server would before writing it.
pub async fn send(app: &Router, req: Request<Body>) -> (StatusCode, bool, Bytes) {
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key(REPLAYED_HEADER)
        || response.headers().contains_key("idempotency-replayed");
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, replayed, body)
}

/// The single-threaded runtime the benches drive requests on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A key never used before, and its number.
pub fn fresh_key() -> (String, u64) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (format!("bench-{n:016x}"), n)
}
