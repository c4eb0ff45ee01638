//! The reference API's `GET /openapi.json` (feature `utoipa`): valid (utoipa reads it back,
//! and `openapi-spec-validator` from PyPI accepts it when installed; under `CI=true` it must
//! be: `python3 -m pip install openapi-spec-validator`), the idempotency parts on the four idempotent creates only, and the documented problem
//! bodies equal to what the layer sends.
#![cfg(feature = "utoipa")]

mod common;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/seed_api/main.rs"]
mod seed_api;

use std::{io::ErrorKind, process::Command};

use clap::Parser;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const IDEMPOTENT: [&str; 4] = ["/agents", "/calls", "/batch-calls", "/tools"];
const NOT_IDEMPOTENT: [&str; 2] = ["/knowledge-bases", "/voices"];

/// Starts the app with these flags; returns its base URL.
async fn start(flags: &[&str]) -> String {
    let config =
        seed_api::Config::parse_from(std::iter::once("seed_api").chain(flags.iter().copied()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = seed_api::app(&config);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// The served document (no API key), as text.
async fn document_text(base: &str) -> String {
    let response = reqwest::get(format!("{base}/openapi.json")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.text().await.unwrap()
}

async fn document(flags: &[&str]) -> Value {
    let text = document_text(&start(flags).await).await;
    serde_json::from_str(&text).unwrap()
}

/// Whether `operation` carries any of the layer's parts.
fn has_idempotency(operation: &Value) -> bool {
    let text = operation.to_string();
    [
        "IdempotencyKeyHeader",
        "Idempotent-Replayed",
        "problem+json",
    ]
    .iter()
    .any(|part| text.contains(part))
}

#[tokio::test]
async fn the_document_reads_back_with_utoipa_and_has_the_whole_api() {
    let text = document_text(&start(&[]).await).await;
    let doc: utoipa::openapi::OpenApi = serde_json::from_str(&text).unwrap();
    let reread: Value = serde_json::from_str(&doc.to_json().unwrap()).unwrap();
    assert_eq!(reread, serde_json::from_str::<Value>(&text).unwrap());
    assert_eq!(reread["openapi"], "3.1.0");
    for path in IDEMPOTENT.iter().chain(&NOT_IDEMPOTENT) {
        let item = doc.paths.get_path_item(path).unwrap();
        assert!(item.post.is_some() && item.get.is_some(), "{path}");
    }
    assert!(doc.paths.get_path_item("/stats").unwrap().get.is_some());
    assert!(
        doc.paths
            .get_path_item("/agents/{id}")
            .unwrap()
            .get
            .is_some()
    );
}

#[tokio::test]
async fn only_the_four_idempotent_creates_carry_the_header_and_problems() {
    let doc = document(&[]).await;
    for path in IDEMPOTENT {
        let op = &doc["paths"][path]["post"];
        let refs: Vec<&str> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["$ref"].as_str())
            .collect();
        assert_eq!(
            refs,
            [
                "#/components/parameters/IdempotencyKeyHeader.X-Idempotency-Key",
                "#/components/parameters/IdempotencyKeyHeader.Idempotency-Key",
            ],
            "{path}"
        );
        assert!(op["responses"]["201"]["headers"]["Idempotent-Replayed"].is_object());
        for status in ["400", "409", "503"] {
            let content = &op["responses"][status]["content"];
            assert!(
                content["application/problem+json"].is_object(),
                "{path} {status}"
            );
        }
        // The API's own errors stay beside the layer's.
        assert!(op["responses"]["400"]["content"]["application/json"].is_object());
        // Not strict: no 422 problem, only the API's own 422.
        assert!(op["responses"]["422"]["content"]["application/problem+json"].is_null());
    }
    for path in NOT_IDEMPOTENT {
        assert!(!has_idempotency(&doc["paths"][path]["post"]), "{path}");
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method != "post" {
                assert!(!has_idempotency(op), "{method} {path}");
            }
        }
    }
}

#[tokio::test]
async fn the_document_follows_the_layer_s_configuration() {
    let strict = document(&["--key-reuse", "reject"]).await;
    for path in IDEMPOTENT {
        let content = &strict["paths"][path]["post"]["responses"]["422"]["content"];
        assert!(content["application/problem+json"].is_object(), "{path}");
        assert!(content["application/json"].is_object(), "{path}");
    }
    let bare = document(&["--no-idempotency"]).await;
    for (path, item) in bare["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(!has_idempotency(op), "{method} {path}");
        }
    }
}

/// The documented example of `kind` under `status` on `POST /agents`.
fn example<'a>(doc: &'a Value, status: &str, kind: &str) -> &'a Value {
    &doc["paths"]["/agents"]["post"]["responses"][status]["content"]["application/problem+json"]["examples"]
        [kind]["value"]
}

#[tokio::test]
async fn the_documented_problems_are_what_the_layer_sends() {
    let base = start(&["--key-reuse", "reject", "--handler-delay-ms", "400"]).await;
    let doc: Value = serde_json::from_str(&document_text(&base).await).unwrap();
    let client = reqwest::Client::new();
    let post = |key: String, body: Value| {
        client
            .post(format!("{base}/agents"))
            .bearer_auth("sk_openapi")
            .header("x-idempotency-key", key)
            .json(&body)
            .send()
    };

    let too_long = post("k".repeat(256), json!({})).await.unwrap();
    assert_eq!(too_long.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        too_long.json::<Value>().await.unwrap(),
        *example(&doc, "400", "invalid-key")
    );

    let (first, second) = tokio::join!(post("k-409".into(), json!({})), async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        post("k-409".into(), json!({})).await
    });
    assert_eq!(first.unwrap().status(), StatusCode::CREATED);
    let conflict = second.unwrap();
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    assert!(conflict.headers().contains_key("retry-after"));
    assert_eq!(
        conflict.json::<Value>().await.unwrap(),
        *example(&doc, "409", "in-flight")
    );

    let replay = post("k-409".into(), json!({})).await.unwrap();
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");

    let reused = post("k-409".into(), json!({"name": "other"}))
        .await
        .unwrap();
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        reused.json::<Value>().await.unwrap(),
        *example(&doc, "422", "key-reused")
    );
}

/// Whether `python3` can import `openapi_spec_validator`.
fn validator_installed() -> bool {
    match Command::new("python3")
        .args(["-c", "import openapi_spec_validator"])
        .output()
    {
        Ok(output) => output.status.success(),
        Err(error) if error.kind() == ErrorKind::NotFound => false,
        Err(error) => panic!("python3 did not run: {error}"),
    }
}

/// Runs `python3 -m openapi_spec_validator` on `text`.
fn validate(text: &str, name: &str) -> std::process::Output {
    let path = std::env::temp_dir().join(format!("{name}-{}.json", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let output = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_file(&path);
    output
}

#[tokio::test]
async fn openapi_spec_validator_accepts_the_document() {
    const TEST: &str = "openapi_spec_validator_accepts_the_document";
    if !validator_installed() {
        assert!(
            !common::in_ci(),
            "openapi-spec-validator is not installed, and CI=true: {TEST} must run \
             (python3 -m pip install openapi-spec-validator)"
        );
        common::skip(TEST, "openapi-spec-validator is not installed");
        return;
    }
    for flags in [&[][..], &["--key-reuse", "reject"], &["--no-idempotency"]] {
        let text = document_text(&start(flags).await).await;
        let output = validate(&text, "seed-api-openapi");
        assert!(
            output.status.success(),
            "{flags:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // The validator can fail: the same document with a parameter missing its `in`.
        let mut broken: Value = serde_json::from_str(&text).unwrap();
        if let Some(parameters) = broken["components"]["parameters"].as_object_mut() {
            for parameter in parameters.values_mut() {
                parameter.as_object_mut().unwrap().remove("in");
            }
            let output = validate(&broken.to_string(), "seed-api-openapi-broken");
            assert!(!output.status.success(), "a broken document passed");
        }
    }
}
