//! Properties, checked on generated inputs (proptest):
//!
//! - any response (status, any header set including repeated and non-UTF-8 values, any body)
//!   that is stored and replayed comes back identical, minus the headers that are never
//!   replayed: through `StoredResponse` capture, encoding and replay, and through the layer;
//! - two requests get the same fingerprint exactly when scope, method, path, key, query and
//!   canonical body are equal, and the same record key exactly when scope, method, path and key
//!   are; field boundaries never blur (`"ab" + "c"` is not `"a" + "bc"`), JSON with permuted
//!   keys and other whitespace is the same body.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::Value;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, MemoryStore, REPLAYED_HEADER, Scope, StoredResponse,
    fingerprint::{BodyKind, RequestIdentity, body_digest, fingerprint, store_key},
};

// ---------------------------------------------------------------------------------------------
// Generated responses

/// Header names: ones that are never replayed, ones that are, and arbitrary tokens.
fn header_name() -> impl Strategy<Value = HeaderName> {
    prop_oneof![
        prop::sample::select(vec![
            "set-cookie",
            "date",
            "content-length",
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "idempotent-replayed",
            "location",
            "etag",
            "content-type",
            "cache-control",
            "x-multi",
            "x-hop",
        ])
        .prop_map(HeaderName::from_static),
        "[a-z0-9!#$%&'*+.^_`|~-]{1,20}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
    ]
}

/// Header values: any bytes a field value may hold (visible ASCII, space, tab, and obs-text
/// 0x80 to 0xFF, so many are not UTF-8), and `Connection` lists naming other headers.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        prop::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..40)
            .prop_map(|bytes| HeaderValue::from_bytes(&bytes).unwrap()),
        prop::sample::select(vec!["close", "x-hop", "keep-alive, x-multi", "x-hop,etag"])
            .prop_map(HeaderValue::from_static),
    ]
}

fn headers() -> impl Strategy<Value = HeaderMap> {
    prop::collection::vec((header_name(), header_value()), 0..24).prop_map(|fields| {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(name, value);
        }
        headers
    })
}

fn status() -> impl Strategy<Value = StatusCode> {
    (100u16..=999).prop_map(|code| StatusCode::from_u16(code).unwrap())
}

fn body() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from)
}

/// The headers a replay must carry from `sent`, per name in order, independently of the
/// crate's code: all but `Set-Cookie`, `Date`, `Content-Length`, the hop-by-hop headers of
/// RFC 9110 section 7.6.1 (with every header `Connection` names) and the replay marker.
fn replayable(sent: &HeaderMap) -> BTreeMap<String, Vec<Vec<u8>>> {
    const NEVER: [&str; 13] = [
        "set-cookie",
        "date",
        "content-length",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "idempotent-replayed",
    ];
    let named: Vec<String> = sent
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut kept: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (name, value) in sent {
        if NEVER.contains(&name.as_str()) || named.iter().any(|n| n == name.as_str()) {
            continue;
        }
        kept.entry(name.as_str().to_owned())
            .or_default()
            .push(value.as_bytes().to_vec());
    }
    kept
}

/// Asserts that `replay` is `sent` replayed: same status and body, the replayable headers
/// exactly (order within a name kept), a `Content-Length` of the body's length (none for 1xx,
/// 204 and 304), the marker, and nothing else.
fn assert_replay_of(
    replay_status: StatusCode,
    replay_headers: &HeaderMap,
    replay_body: &[u8],
    sent_status: StatusCode,
    sent_headers: &HeaderMap,
    sent_body: &[u8],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(replay_status, sent_status);
    prop_assert_eq!(replay_body, sent_body);
    prop_assert_eq!(replayable(replay_headers), replayable(sent_headers));
    let lengths: Vec<&[u8]> = replay_headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    let no_length = sent_status.is_informational()
        || sent_status == StatusCode::NO_CONTENT
        || sent_status == StatusCode::NOT_MODIFIED;
    if no_length {
        prop_assert!(lengths.is_empty(), "{:?}", lengths);
    } else {
        let length = sent_body.len().to_string();
        prop_assert_eq!(lengths, vec![length.as_bytes()]);
    }
    let markers: Vec<&[u8]> = replay_headers
        .get_all(REPLAYED_HEADER)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    prop_assert_eq!(markers, vec![&b"true"[..]]);
    // Nothing else: every header of the replay is a replayable one, the length or the marker.
    for (name, _) in replay_headers {
        prop_assert!(
            name == header::CONTENT_LENGTH
                || name == REPLAYED_HEADER
                || replayable(sent_headers).contains_key(name.as_str()),
            "unexpected header {} in the replay",
            name
        );
    }
    Ok(())
}

proptest! {
    #[test]
    fn a_stored_response_replays_identically(
        status in status(),
        headers in headers(),
        body in body(),
    ) {
        let stored = StoredResponse {
            status,
            headers: StoredResponse::capture_headers(&headers),
            body: body.clone(),
        };
        let decoded = StoredResponse::decode(&stored.encode()).unwrap();
        prop_assert_eq!(&decoded, &stored);
        let replay: Response<Bytes> = decoded.to_replay();
        assert_replay_of(
            replay.status(),
            replay.headers(),
            replay.body(),
            status,
            &headers,
            &body,
        )?;
    }

    #[test]
    fn a_response_replayed_by_the_layer_is_identical(
        status in status(),
        headers in headers(),
        body in body(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let calls = Arc::new(AtomicUsize::new(0));
            // A bare service rather than a router, whose routes add a `Content-Length` of their
            // own: the first response is then exactly what the handler made.
            let app = {
                let (headers, body, calls) = (headers.clone(), body.clone(), calls.clone());
                ServiceBuilder::new()
                    .layer(
                        IdempotencyLayer::new()
                            .post("/calls")
                            .store(MemoryStore::new())
                            .store_status(|_| true),
                    )
                    .service_fn(move |_: Request<Body>| {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let mut response = Response::new(Body::from(body.clone()));
                        *response.status_mut() = status;
                        *response.headers_mut() = headers.clone();
                        async move { Ok::<_, Infallible>(response) }
                    })
            };
            let first = send(&app).await;
            prop_assert_eq!(first.0, status);
            prop_assert_eq!(&first.1, &headers, "the first response is the handler's own");
            prop_assert_eq!(&first.2, &body);
            let replay = send(&app).await;
            if status.is_informational() {
                // No final response: never stored, whatever the status policy says.
                prop_assert_eq!(calls.load(Ordering::SeqCst), 2, "a 1xx was replayed");
                return Ok(());
            }
            prop_assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran again");
            assert_replay_of(replay.0, &replay.1, &replay.2, status, &headers, &body)
        })?;
    }
}

async fn send<S>(app: &S) -> (StatusCode, HeaderMap, Bytes)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    let req = Request::post("/calls")
        .header(header::AUTHORIZATION, "Bearer org_a_secret")
        .header("x-idempotency-key", "the-key")
        .body(Body::from("{}"))
        .unwrap();
    let response: Result<Response<Body>, Infallible> = app.clone().oneshot(req).await;
    let (parts, body) = response.unwrap().into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

// ---------------------------------------------------------------------------------------------
// Generated requests

/// A request's identity fields, drawn from small alphabets so that equal fields are common.
#[derive(Debug, Clone)]
struct Req {
    scope: Vec<u8>,
    method: Method,
    path: String,
    key: String,
    query: Option<String>,
    json: bool,
    body: Vec<u8>,
}

impl Req {
    fn fingerprint(&self) -> [u8; 32] {
        let scope = Scope::new(self.scope.clone());
        let key = IdempotencyKey::parse(self.key.as_bytes()).unwrap();
        let id = RequestIdentity {
            scope: &scope,
            method: &self.method,
            path: &self.path,
            key: &key,
        };
        let (kind, digest) = body_digest(&self.body, self.json);
        fingerprint(&id, self.query.as_deref(), kind, &digest).0
    }

    fn store_key(&self) -> [u8; 32] {
        let scope = Scope::new(self.scope.clone());
        let key = IdempotencyKey::parse(self.key.as_bytes()).unwrap();
        store_key(&RequestIdentity {
            scope: &scope,
            method: &self.method,
            path: &self.path,
            key: &key,
        })
        .0
    }

    /// The body as the fingerprint should see it, computed without the crate: a JSON value when
    /// the request is JSON and the body parses, else the bytes.
    fn canonical_body(&self) -> Result<Value, &[u8]> {
        match self.json {
            true => serde_json::from_slice(&self.body).map_err(|_| &self.body[..]),
            false => Err(&self.body[..]),
        }
    }
}

/// JSON values equal as values: objects regardless of key order, numbers by kind and exact
/// value (so `1` and `1.0`, `0.0` and `-0.0` differ, as their texts do).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| b.get(k).is_some_and(|w| same_json(v, w)))
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(v, w)| same_json(v, w))
        }
        (Value::Number(a), Value::Number(b)) => {
            let view = |n: &serde_json::Number| {
                (
                    n.as_u64(),
                    n.as_i64(),
                    n.as_f64().map(f64::to_bits),
                    n.is_f64(),
                )
            };
            view(a) == view(b)
        }
        _ => a == b,
    }
}

fn same_body(a: &Req, b: &Req) -> bool {
    match (a.canonical_body(), b.canonical_body()) {
        (Ok(a), Ok(b)) => same_json(&a, &b),
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (0u64..3).prop_map(Value::from),
        prop::sample::select(vec![-1.5f64, 0.0, -0.0, 1.0, 2.5e10]).prop_map(Value::from),
        "[ab\"\\\\é]{0,3}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[abc]{0,2}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Writes `value` as JSON text with object members in an order and whitespace picked by
/// `seed` (so the same value comes out as many different texts).
fn render(value: &Value, seed: &mut u64, out: &mut String) {
    fn next(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }
    let space = |n: u64| [" ", "", "\n\t", ""][(n % 4) as usize];
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            // Fisher-Yates with the seed.
            for i in (1..entries.len()).rev() {
                let j = (next(seed) % (i as u64 + 1)) as usize;
                entries.swap(i, j);
            }
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(space(next(seed)));
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push_str(space(next(seed)));
                out.push(':');
                render(v, seed, out);
            }
            out.push_str(space(next(seed)));
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(space(next(seed)));
                render(item, seed, out);
            }
            out.push(']');
        }
        scalar => {
            out.push_str(space(next(seed)));
            out.push_str(&serde_json::to_string(scalar).unwrap());
        }
    }
}

fn rendered(value: &Value, seed: u64) -> Vec<u8> {
    let mut out = String::new();
    render(value, &mut (seed | 1), &mut out);
    out.into_bytes()
}

fn req() -> impl Strategy<Value = Req> {
    let body = prop_oneof![
        (json_value(), any::<u64>()).prop_map(|(v, seed)| (true, rendered(&v, seed))),
        prop::collection::vec(prop::sample::select(b"ab{}\"".to_vec()), 0..4)
            .prop_map(|b| (true, b)),
        "[ab]{0,3}".prop_map(|b| (false, b.into_bytes())),
        (json_value(), any::<u64>()).prop_map(|(v, seed)| (false, rendered(&v, seed))),
    ];
    (
        prop::collection::vec(prop::sample::select(b"ab/".to_vec()), 0..3),
        prop::sample::select(vec![Method::POST, Method::PUT, Method::PATCH]),
        "/[ab/]{0,2}",
        "[ab/]{1,3}",
        prop::option::of("[ab=&/]{0,2}"),
        body,
    )
        .prop_map(|(scope, method, path, key, query, (json, body))| Req {
            scope,
            method,
            path,
            key,
            query,
            json,
            body,
        })
}

/// Two requests, often alike: the second is a copy of the first with some fields redrawn, or
/// with bytes moved across the boundary between two neighbouring fields.
fn pair() -> impl Strategy<Value = (Req, Req)> {
    (req(), req(), any::<[bool; 7]>(), any::<u8>()).prop_map(|(a, other, keep, shift)| {
        let mut b = a.clone();
        if !keep[0] {
            b.scope = other.scope;
        }
        if !keep[1] {
            b.method = other.method;
        }
        if !keep[2] {
            b.path = other.path;
        }
        if !keep[3] {
            b.key = other.key;
        }
        if !keep[4] {
            b.query = other.query;
        }
        if !keep[5] {
            b.json = other.json;
            b.body = other.body;
        }
        if !keep[6] {
            shift_boundary(&mut b, shift);
        }
        (a, b)
    })
}

/// Moves one character across a boundary: scope/path, path/key, key/query, query/body.
fn shift_boundary(r: &mut Req, which: u8) {
    match which % 4 {
        0 => {
            if let Some(c) = r.scope.pop() {
                r.path = format!("{}{}", c as char, r.path);
            }
        }
        1 => {
            if r.path.len() > 1 {
                let c = r.path.pop().unwrap();
                r.key.insert(0, c);
            }
        }
        2 => {
            if r.key.len() > 1 {
                let c = r.key.pop().unwrap();
                let query = r.query.get_or_insert_with(String::new);
                query.insert(0, c);
            }
        }
        _ => {
            if let Some(c) = r.query.as_mut().and_then(String::pop) {
                r.body.insert(0, c as u8);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn same_fingerprint_exactly_when_every_field_is_equal((a, b) in pair()) {
        let same_identity = a.scope == b.scope
            && a.method == b.method
            && a.path == b.path
            && a.key == b.key;
        let same_request = same_identity && a.query == b.query && same_body(&a, &b);
        prop_assert_eq!(a.fingerprint() == b.fingerprint(), same_request, "{:?} / {:?}", a, b);
        prop_assert_eq!(a.store_key() == b.store_key(), same_identity);
        // The two digests never coincide with each other either.
        prop_assert_ne!(a.fingerprint(), b.store_key());
    }

    #[test]
    fn json_with_permuted_keys_and_other_whitespace_is_the_same_body(
        value in json_value(),
        seeds in any::<(u64, u64)>(),
    ) {
        let a = rendered(&value, seeds.0);
        let b = rendered(&value, seeds.1);
        let (kind_a, digest_a) = body_digest(&a, true);
        let (kind_b, digest_b) = body_digest(&b, true);
        prop_assert_eq!(kind_a, BodyKind::Json);
        prop_assert_eq!((kind_a, digest_a), (kind_b, digest_b));
        // Hashed raw, the texts differ whenever their bytes do.
        prop_assert_eq!(body_digest(&a, false) == body_digest(&b, false), a == b);
    }
}

#[test]
fn field_boundary_cases_differ() {
    let base = Req {
        scope: b"ab".to_vec(),
        method: Method::POST,
        path: "/c".into(),
        key: "k".into(),
        query: None,
        json: false,
        body: b"x".to_vec(),
    };
    let cases = [
        // scope "ab" + path "/c" vs scope "a" + path "b/c"
        Req {
            scope: b"a".to_vec(),
            path: "b/c".into(),
            ..base.clone()
        },
        // path "/c" + key "k" vs path "/" + key "ck"
        Req {
            path: "/".into(),
            key: "ck".into(),
            ..base.clone()
        },
        // key "k" + no query vs key "k" + empty query
        Req {
            query: Some(String::new()),
            ..base.clone()
        },
        // query "" + body "x" vs query "x" + body ""
        Req {
            query: Some("x".into()),
            body: Vec::new(),
            ..base.clone()
        },
        // the same JSON text, hashed as JSON rather than raw
        Req {
            json: true,
            body: b"1".to_vec(),
            ..base.clone()
        },
    ];
    let raw_one = Req {
        body: b"1".to_vec(),
        ..base.clone()
    };
    assert_ne!(raw_one.fingerprint(), cases[4].fingerprint());
    for case in &cases {
        assert_ne!(base.fingerprint(), case.fingerprint(), "{case:?}");
    }
}
