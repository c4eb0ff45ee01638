//! The reference API with `--store postgres`: its resources live in PostgreSQL, shared by every
//! instance, and each idempotent create commits with its idempotency record.
//!
//! Needs `DATABASE_URL`; skipped without it, except under `CI=true`. Each test acts as an
//! organization of its own, so runs never see each other's resources.
#![cfg(feature = "postgres")]

mod common;
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/seed_api/main.rs"]
mod seed_api;

use clap::Parser;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpListener;

/// Starts an instance with `--store postgres` and these flags; its base URL.
async fn start(url: &str, flags: &[&str]) -> String {
    let config = seed_api::Config::parse_from(
        ["seed_api", "--store", "postgres", "--database-url", url]
            .into_iter()
            .chain(flags.iter().copied()),
    );
    let (store, resources) = seed_api::build(&config).await.expect("store");
    let (app, _drain) = seed_api::app_with(&config, store, resources);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn org() -> String {
    format!("org_{}", uuid::Uuid::new_v4().simple())
}

async fn create(
    client: &reqwest::Client,
    base: &str,
    org: &str,
    key: &str,
) -> (StatusCode, Value, bool) {
    let response = client
        .post(format!("{base}/agents"))
        .bearer_auth(org)
        .header("x-idempotency-key", key)
        .json(&serde_json::json!({ "name": "Support agent" }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    (status, response.json().await.unwrap(), replayed)
}

async fn agents(client: &reqwest::Client, base: &str, org: &str) -> Vec<Value> {
    let list: Value = client
        .get(format!("{base}/agents"))
        .bearer_auth(org)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn every_instance_lists_the_same_resources_and_a_retry_elsewhere_replays() {
    let Some(url) = common::service_url("DATABASE_URL", "this PostgreSQL test") else {
        return;
    };
    let a = start(&url, &[]).await;
    let b = start(&url, &[]).await;
    let client = reqwest::Client::new();
    let org = org();

    let (status, first, replayed) = create(&client, &a, &org, "agent-1").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed);
    let listed = agents(&client, &b, &org).await;
    assert_eq!(listed, [first["data"].clone()], "B reads what A committed");

    let (status, again, replayed) = create(&client, &b, &org, "agent-1").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed);
    assert_eq!(again, first);
    assert_eq!(agents(&client, &a, &org).await.len(), 1);

    // A key without a lease (another key each time) creates one resource each.
    create(&client, &b, &org, "agent-2").await;
    assert_eq!(agents(&client, &a, &org).await.len(), 2);
}

/// The client of a create that is still sleeping after its commit gives up and retries on
/// another instance: the record committed with the rows, so the retry is a replay.
#[tokio::test]
async fn a_retry_after_the_commit_replays_even_while_the_first_has_not_answered() {
    let Some(url) = common::service_url("DATABASE_URL", "this PostgreSQL test") else {
        return;
    };
    let slow = start(&url, &["--after-commit-delay-ms", "3000"]).await;
    let other = start(&url, &[]).await;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(1000))
        .build()
        .unwrap();
    let org = org();
    let gave_up = client
        .post(format!("{slow}/agents"))
        .bearer_auth(&org)
        .header("x-idempotency-key", "agent-1")
        .json(&serde_json::json!({ "name": "Support agent" }))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client timed out");
    let (status, retried, replayed) = create(&client, &other, &org, "agent-1").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed);
    let listed = agents(&client, &other, &org).await;
    assert_eq!(listed, [retried["data"].clone()]);
}
