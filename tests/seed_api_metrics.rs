//! `GET /metrics` of the reference API (`examples/seed_api/`): after one create, one replay and
//! one duplicate that got 409, the Prometheus text shows exactly those.
//!
//! A process has one global recorder; this test installs the reference API's Prometheus
//! recorder as its own thread-local one instead (the runtime is single-threaded, so the server's
//! tasks record into it), and so never meets the recorder of another test.
#![cfg(feature = "metrics")]

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/seed_api/main.rs"]
mod seed_api;

use std::{sync::Arc, time::Duration};

use clap::Parser;
use reqwest::StatusCode;
use tokio::net::TcpListener;
use tower_idempotency::MemoryStore;

/// The lines of `text` for `metric` (samples only, no comments), sorted.
fn samples(text: &str, metric: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .filter(|line| line.starts_with(metric))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

#[tokio::test]
async fn metrics_show_one_create_one_replay_and_one_conflict() {
    let recorder = seed_api::prometheus().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    let config = seed_api::Config::parse_from(["seed_api", "--handler-delay-ms", "300"]);
    let (app, _drain) = seed_api::app_with_metrics(
        &config,
        Arc::new(MemoryStore::new()),
        seed_api::Resources::default(),
        Some(handle),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    let create = || {
        client
            .post(format!("{base}/agents"))
            .bearer_auth("sk_test_metrics")
            .header("x-idempotency-key", "agent-1")
            .json(&serde_json::json!({ "name": "Support agent" }))
            .send()
    };

    let first = tokio::spawn(create());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let duplicate = create().await.unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let replay = create().await.unwrap();
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    // Not covered: neither a read nor a create that ignores keys is counted.
    let voice = client
        .post(format!("{base}/voices"))
        .bearer_auth("sk_test_metrics")
        .header("x-idempotency-key", "voice-1")
        .json(&serde_json::json!({ "name": "Alloy" }))
        .send()
        .await
        .unwrap();
    assert_eq!(voice.status(), StatusCode::CREATED);

    // No API key needed.
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.unwrap();
    assert_eq!(
        samples(&text, "idempotency_requests_total"),
        [
            r#"idempotency_requests_total{outcome="conflict",route="/agents"} 1"#,
            r#"idempotency_requests_total{outcome="executed",route="/agents"} 1"#,
            r#"idempotency_requests_total{outcome="replayed",route="/agents"} 1"#,
        ],
        "{text}"
    );
    // Three begins (the create, the duplicate, the replay) and one complete.
    assert_eq!(
        samples(&text, "idempotency_store_duration_seconds_count"),
        [
            r#"idempotency_store_duration_seconds_count{op="begin"} 3"#,
            r#"idempotency_store_duration_seconds_count{op="complete"} 1"#,
        ],
        "{text}"
    );
    assert!(
        samples(&text, "idempotency_store_errors_total").is_empty(),
        "{text}"
    );
    assert!(
        text.contains("# TYPE idempotency_requests_total counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE idempotency_store_duration_seconds histogram"),
        "{text}"
    );
}
