//! End-to-end tests of the reference API (`examples/seed_api/`) over a real listener.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/seed_api/main.rs"]
mod seed_api;

use clap::Parser;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinSet};

/// A running `seed_api` on a free loopback port.
struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    /// Starts the app with these command-line flags.
    async fn start(flags: &[&str]) -> Self {
        let config =
            seed_api::Config::parse_from(std::iter::once("seed_api").chain(flags.iter().copied()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = seed_api::app(&config);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
        }
    }

    /// `POST path` as organization `org`, with an idempotency key when given.
    fn post(&self, org: &str, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(org);
        if let Some(key) = key {
            request = request.header("x-idempotency-key", key);
        }
        request
    }

    async fn get(&self, org: &str, path: &str) -> Value {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(org)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    /// The number of create-handler runs for `org`.
    async fn handler_calls(&self, org: &str) -> u64 {
        self.get(org, "/stats").await["handler_calls"]
            .as_u64()
            .unwrap()
    }
}

fn replayed(response: &Response) -> bool {
    response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|value| value == "true")
}

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn a_create_is_replayed_and_runs_once() {
    let api = Api::start(&[]).await;
    let body = json!({ "name": "Support agent", "voice": "alloy" });

    let first = api
        .post("org_a", "/agents", Some("k1"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(!replayed(&first));
    assert_eq!(header(&first, "content-type"), "application/json");
    let location = header(&first, "location").to_owned();
    let first_body = first.bytes().await.unwrap();
    let created: Value = serde_json::from_slice(&first_body).unwrap();
    let id = created["data"]["id"].as_str().unwrap();
    assert_eq!(location, format!("/agents/{id}"));
    assert_eq!(created["data"]["object"], "agent");
    assert_eq!(created["data"]["name"], "Support agent");
    assert_eq!(created["data"]["voice"], "alloy");
    assert!(created["data"]["created_at"].is_u64());

    let second = api
        .post("org_a", "/agents", Some("k1"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::CREATED);
    assert!(replayed(&second));
    assert_eq!(header(&second, "location"), location);
    assert_eq!(second.bytes().await.unwrap(), first_body);

    assert_eq!(api.handler_calls("org_a").await, 1);
    assert_eq!(
        api.get("org_a", "/agents").await["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(api.get("org_a", &location).await["data"]["id"], id);
}

#[tokio::test]
async fn the_same_key_in_another_organization_runs_again() {
    let api = Api::start(&[]).await;
    let body = json!({ "to": "+15550100" });
    let mut ids = Vec::new();
    for org in ["org_a", "org_b"] {
        let response = api
            .post(org, "/calls", Some("shared-key"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(!replayed(&response));
        let created: Value = response.json().await.unwrap();
        ids.push(created["data"]["id"].clone());
    }
    assert_ne!(ids[0], ids[1]);
    assert_eq!(api.handler_calls("org_a").await, 1);
    assert_eq!(api.handler_calls("org_b").await, 1);
    // Each organization sees only its own call.
    assert_eq!(api.get("org_b", "/calls").await["data"][0]["id"], ids[1]);
}

#[tokio::test]
async fn voices_ignore_the_key() {
    let api = Api::start(&[]).await;
    let body = json!({ "name": "Narrator" });
    let mut ids = Vec::new();
    for _ in 0..2 {
        let response = api
            .post("org_a", "/voices", Some("v1"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(!replayed(&response));
        let created: Value = response.json().await.unwrap();
        assert_eq!(created["data"]["object"], "voice");
        ids.push(created["data"]["id"].clone());
    }
    assert_ne!(ids[0], ids[1]);
    assert_eq!(api.handler_calls("org_a").await, 2);
    assert_eq!(
        api.get("org_a", "/voices").await["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn a_simulated_500_is_not_stored_and_a_retry_runs() {
    let api = Api::start(&[]).await;
    let body = json!({ "name": "x", "simulate_status": 500 });
    for _ in 0..2 {
        let response = api
            .post("org_a", "/agents", Some("s500"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!replayed(&response));
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "simulated");
    }
    assert_eq!(api.handler_calls("org_a").await, 2);
    assert_eq!(api.get("org_a", "/agents").await["data"], json!([]));
}

#[tokio::test]
async fn a_simulated_404_is_stored_and_replayed() {
    let api = Api::start(&[]).await;
    let body = json!({ "simulate_status": 404 });
    let first = api
        .post("org_a", "/tools", Some("s404"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::NOT_FOUND);
    assert!(!replayed(&first));
    let second = api
        .post("org_a", "/tools", Some("s404"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::NOT_FOUND);
    assert!(replayed(&second));
    assert_eq!(api.handler_calls("org_a").await, 1);
}

// On a multi-threaded runtime, as the example serves. A lease still held after the 500 would
// show up as a 409 (in strict mode, with another body, a 422) on the immediate retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_answers_500_and_a_retry_runs() {
    let api = Api::start(&["--key-reuse", "reject"]).await;
    let body = json!({ "simulate_panic": true });
    for round in 0..5 {
        let key = format!("boom-{round}");
        for _ in 0..2 {
            let response = api
                .post("org_a", "/calls", Some(&key))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
            assert!(!replayed(&response));
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["error"]["type"], "internal_error");
        }
        // Nothing holds the key: even another body may use it now, in strict mode.
        let ok = api
            .post("org_a", "/calls", Some(&key))
            .json(&json!({ "to": "+1" }))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::CREATED);
    }
    assert_eq!(api.handler_calls("org_a").await, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_get_one_201_and_409s() {
    // The handler sleeps long enough that every duplicate arrives while the first one runs.
    let api = std::sync::Arc::new(Api::start(&["--handler-delay-ms", "2000"]).await);
    let body = json!({ "name": "race" });
    let mut requests = JoinSet::new();
    for _ in 0..8 {
        let request = api.post("org_a", "/agents", Some("race")).json(&body);
        requests.spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let retry_after = response.headers().get("retry-after").cloned();
            let content_type = header(&response, "content-type").to_owned();
            (
                status,
                retry_after,
                content_type,
                response.bytes().await.unwrap(),
            )
        });
    }
    let mut created = Vec::new();
    let mut conflicts = 0;
    while let Some(result) = requests.join_next().await {
        let (status, retry_after, content_type, body) = result.unwrap();
        match status {
            StatusCode::CREATED => created.push(body),
            StatusCode::CONFLICT => {
                conflicts += 1;
                assert!(retry_after.is_some(), "409 without Retry-After");
                assert_eq!(content_type, "application/problem+json");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(created.len(), 1);
    assert_eq!(conflicts, 7);
    assert_eq!(api.handler_calls("org_a").await, 1);

    // Once the first has finished, a retry replays it.
    let retry = api
        .post("org_a", "/agents", Some("race"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(replayed(&retry));
    assert_eq!(retry.bytes().await.unwrap(), created[0]);
    assert_eq!(api.handler_calls("org_a").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_duplicates_all_get_the_replay() {
    let api = Api::start(&["--handler-delay-ms", "1000", "--in-flight", "wait"]).await;
    let body = json!({ "name": "patient" });
    let mut requests = JoinSet::new();
    for _ in 0..5 {
        let request = api.post("org_a", "/agents", Some("wait")).json(&body);
        requests.spawn(async move {
            let response = request.send().await.unwrap();
            (
                response.status(),
                replayed(&response),
                response.bytes().await.unwrap(),
            )
        });
    }
    let mut bodies = Vec::new();
    let mut replays = 0;
    while let Some(result) = requests.join_next().await {
        let (status, was_replayed, body) = result.unwrap();
        assert_eq!(status, StatusCode::CREATED);
        replays += usize::from(was_replayed);
        bodies.push(body);
    }
    assert_eq!(replays, 4);
    assert!(bodies.iter().all(|body| *body == bodies[0]));
    assert_eq!(api.handler_calls("org_a").await, 1);
}

#[tokio::test]
async fn batch_calls_create_every_call_once() {
    let api = Api::start(&[]).await;
    let body = json!({ "calls": [{ "to": "+1" }, { "to": "+2" }] });
    let first = api
        .post("org_a", "/batch-calls", Some("b1"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_body = first.bytes().await.unwrap();
    let created: Value = serde_json::from_slice(&first_body).unwrap();
    let calls = created["data"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|call| call["object"] == "call"));
    assert_eq!(calls[1]["to"], "+2");

    let second = api
        .post("org_a", "/batch-calls", Some("b1"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(replayed(&second));
    assert_eq!(second.bytes().await.unwrap(), first_body);
    assert_eq!(
        api.get("org_a", "/calls").await["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(api.handler_calls("org_a").await, 1);
}

#[tokio::test]
async fn requests_without_a_bearer_key_get_401() {
    let api = Api::start(&[]).await;
    let url = format!("{}/agents", api.base);
    let missing = api.client.post(&url).json(&json!({})).send().await.unwrap();
    let malformed = api
        .client
        .post(&url)
        .header("authorization", "Basic dXNlcjpwYXNz")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    for response in [missing, malformed] {
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "unauthorized");
    }
}

#[tokio::test]
async fn invalid_json_gets_400_from_the_handler() {
    let api = Api::start(&[]).await;
    let response = api
        .post("org_a", "/agents", Some("bad"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(header(&response, "content-type"), "application/json");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_json");
}

#[tokio::test]
async fn key_reuse_modes() {
    let new = Api::start(&[]).await;
    let strict = Api::start(&["--key-reuse", "reject"]).await;
    for api in [&new, &strict] {
        let first = api
            .post("org_a", "/tools", Some("reuse"))
            .json(&json!({ "name": "a" }))
            .send()
            .await
            .unwrap();
        assert_eq!(first.status(), StatusCode::CREATED);
    }
    let other = json!({ "name": "b" });
    let again = new
        .post("org_a", "/tools", Some("reuse"))
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert!(!replayed(&again));
    assert_eq!(new.handler_calls("org_a").await, 2);

    let rejected = strict
        .post("org_a", "/tools", Some("reuse"))
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(strict.handler_calls("org_a").await, 1);
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413() {
    let api = Api::start(&["--max-body-bytes", "64"]).await;
    let body = json!({ "name": "x".repeat(100) });
    let response = api
        .post("org_a", "/agents", Some("big"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(api.handler_calls("org_a").await, 0);
}

/// A create whose answer is larger than the layer's response cap (4 MiB) was sent but not
/// stored, and its lease released: the retry with the same key created everything again. The
/// request bodies are well under the 2 MiB request limit; the answer is larger than what was
/// sent (every call gets an id, an object and a timestamp; `1e9` comes back as
/// `1000000000.0`). Now nothing is created when the answer cannot be stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_is_too_large_to_store_runs_once() {
    let api = Api::start(&[]).await;
    let batch = format!("{{\"calls\":[{}]}}", vec!["{}"; 60_000].join(","));
    let agent = format!("{{\"numbers\":[{}]}}", vec!["1e9"; 400_000].join(","));
    for (path, collection, body, once) in [
        ("/batch-calls", "/calls", batch, 60_000),
        ("/agents", "/agents", agent, 1),
    ] {
        assert!(
            body.len() < 2 * 1024 * 1024,
            "{path}: under the request limit"
        );
        let org = format!("org{path}");
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let response = api
                .post(&org, path, Some("big-answer"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            statuses.push(response.status());
            let _ = response.bytes().await.unwrap();
        }
        let created = api.get(&org, collection).await["data"]
            .as_array()
            .unwrap()
            .len();
        assert!(
            created <= once,
            "{path}: one create with one key made {created} resources (want at most {once}); \
             answers {statuses:?}"
        );
    }
}
