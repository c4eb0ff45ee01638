//! Faults found by attacking the layer and the reference API, each kept as the input that
//! showed it.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/seed_api/main.rs"]
mod seed_api;

use clap::Parser;
use serde_json::Value;
use tokio::net::TcpListener;

/// A running `seed_api` (in-memory store) on a free loopback port.
async fn start(flags: &[&str]) -> String {
    let config =
        seed_api::Config::parse_from(std::iter::once("seed_api").chain(flags.iter().copied()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = seed_api::app(&config);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn count(client: &reqwest::Client, base: &str, org: &str, collection: &str) -> usize {
    let list: Value = client
        .get(format!("{base}/{collection}"))
        .bearer_auth(org)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"].as_array().unwrap().len()
}

/// A create whose response is larger than the layer's response cap (4 MiB) was sent but not
/// stored, and its lease released: the retry with the same key created everything again. The
/// request bodies here are well under the 2 MiB request limit; the API's answer is larger than
/// what it was sent (every call gets an id, an object and a timestamp; `1e9` comes back as
/// `1000000000.0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_is_too_large_to_store_runs_once() {
    let base = start(&[]).await;
    let client = reqwest::Client::new();
    let batch = format!("{{\"calls\":[{}]}}", vec!["{}"; 60_000].join(","));
    let agent = format!("{{\"numbers\":[{}]}}", vec!["1e9"; 400_000].join(","));
    for (path, collection, body) in [
        ("/batch-calls", "calls", batch),
        ("/agents", "agents", agent),
    ] {
        assert!(
            body.len() < 2 * 1024 * 1024,
            "{path}: under the request limit"
        );
        let org = format!("org{path}");
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let response = client
                .post(format!("{base}{path}"))
                .bearer_auth(&org)
                .header("x-idempotency-key", "big-answer")
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            statuses.push(response.status());
            let _ = response.bytes().await.unwrap();
        }
        let created = count(&client, &base, &org, collection).await;
        let once = if path == "/batch-calls" { 60_000 } else { 1 };
        assert!(
            created <= once,
            "{path}: one create with one key made {created} resources (want at most {once}); \
             answers {statuses:?}"
        );
    }
}
