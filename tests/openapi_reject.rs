//! `IdempotencyLayer::openapi` (feature `utoipa`) agrees with how the layer renders its
//! rejections: the `type` URIs of its `ProblemTypes`, and the body of its `reject_with` hook.
#![cfg(feature = "utoipa")]

use axum::{Json, http::StatusCode, response::IntoResponse};
use serde_json::{Value, json};
use tower_idempotency::{
    IdempotencyLayer, KeyReuse, ProblemTypes,
    openapi::OpenApiError,
    problem::{Problem, ProblemKind},
};
use utoipa::openapi::{
    ContentBuilder, HttpMethod, Info, OpenApi, OpenApiBuilder, PathItem, Paths, Ref,
    ResponseBuilder, Type, path::OperationBuilder, schema::ObjectBuilder,
};

/// `POST /calls` answering 201.
fn doc() -> OpenApi {
    let create = OperationBuilder::new().response(
        "201",
        ResponseBuilder::new().description("Created").content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(ObjectBuilder::new()))
                .build(),
        ),
    );
    OpenApiBuilder::new()
        .info(Info::new("test", "1"))
        .paths(Paths::builder().path("/calls", PathItem::new(HttpMethod::Post, create)))
        .build()
}

fn json_of(doc: &OpenApi) -> Value {
    serde_json::from_str(&doc.to_json().unwrap()).unwrap()
}

/// Every example value of every layer response of `POST /calls` under `content_type`.
fn examples(doc: &Value, content_type: &str) -> Vec<Value> {
    let responses = doc["paths"]["/calls"]["post"]["responses"]
        .as_object()
        .unwrap();
    responses
        .values()
        .filter_map(|response| response["content"][content_type]["examples"].as_object())
        .flat_map(|examples| examples.values().map(|e| e["value"].clone()))
        .collect()
}

const BASE: &str = "https://docs.example.com/errors/";

#[test]
fn problem_examples_carry_the_configured_type_uris() {
    let types = ProblemTypes::default()
        .base(BASE)
        .unwrap()
        .uri(
            ProblemKind::KeyReused,
            "https://docs.example.com/idempotency#reuse",
        )
        .unwrap();
    let layer = IdempotencyLayer::new()
        .post("/calls")
        .key_reuse(KeyReuse::Reject)
        .problem_types(types);
    let mut doc = doc();
    layer.openapi().apply(&mut doc).unwrap();
    let doc = json_of(&doc);
    let examples = examples(&doc, "application/problem+json");
    // 400 (two), 409, 422, 503 (two).
    assert_eq!(examples.len(), 6, "{examples:?}");
    for example in &examples {
        let uri = example["type"].as_str().unwrap();
        if example["status"] == 422 {
            assert_eq!(uri, "https://docs.example.com/idempotency#reuse");
        } else {
            assert!(uri.starts_with(BASE), "{example}");
        }
    }
    assert_eq!(
        doc["paths"]["/calls"]["post"]["responses"]["409"]["content"]["application/problem+json"]["examples"]
            ["in-flight"]["value"]["type"],
        "https://docs.example.com/errors/in-flight"
    );
    // The schema's own examples and description name the configured URIs, never the defaults.
    let schema = doc["components"]["schemas"]["IdempotencyProblem"].to_string();
    assert!(
        schema.contains("https://docs.example.com/errors/store-full"),
        "{schema}"
    );
    assert!(!schema.contains("tag:tower-idempotency"), "{schema}");
}

/// A Stripe-like error body, with its own status for a reused key.
fn stripe(problem: Problem) -> axum::response::Response {
    let status = match problem.kind {
        ProblemKind::KeyReused => StatusCode::BAD_REQUEST,
        _ => problem.status(),
    };
    let body = json!({"error": {"type": "idempotency_error", "code": problem.kind.slug(),
        "message": problem.detail}});
    (status, Json(body)).into_response()
}

#[test]
fn a_hook_and_a_described_body_document_the_hook_s_body_and_no_problem_details() {
    let layer = IdempotencyLayer::new()
        .post("/calls")
        .key_reuse(KeyReuse::Reject)
        .reject_with(stripe);
    let mut doc = doc();
    layer
        .openapi()
        .rejection_schema(Ref::from_schema_name("StripeError"))
        .apply(&mut doc)
        .unwrap();
    let doc = json_of(&doc);
    let text = doc.to_string();
    assert!(!text.contains("application/problem+json"), "{text}");
    assert!(!text.contains("IdempotencyProblem"), "{text}");
    let responses = &doc["paths"]["/calls"]["post"]["responses"];
    // The hook decides the status: the reused key is documented under 400, not 422.
    assert!(responses["422"].is_null(), "{responses}");
    let bad = &responses["400"]["content"]["application/json"];
    assert_eq!(bad["schema"]["$ref"], "#/components/schemas/StripeError");
    assert_eq!(
        bad["examples"]["key-reused"]["value"]["error"]["code"],
        "key-reused"
    );
    assert_eq!(
        bad["examples"]["invalid-key"]["value"]["error"]["code"],
        "invalid-key"
    );
    let conflict = &responses["409"];
    assert_eq!(
        conflict["content"]["application/json"]["examples"]["in-flight"]["value"]["error"]["type"],
        "idempotency_error"
    );
    assert!(conflict["headers"]["Retry-After"].is_object());
    assert!(responses["503"]["content"]["application/json"]["examples"]["store-full"].is_object());
    assert!(
        responses["400"]["description"]
            .as_str()
            .unwrap()
            .contains("already used with a different request")
    );
}

#[test]
fn a_described_body_with_its_content_type_and_an_inline_schema() {
    let layer = IdempotencyLayer::new()
        .post("/calls")
        .reject_with(|problem: Problem| (problem.status(), problem.detail));
    let schema = ObjectBuilder::new().schema_type(Type::String);
    let openapi = layer
        .openapi()
        .rejection_schema(schema)
        .rejection_content_type("text/plain");
    let mut doc = doc();
    openapi.apply(&mut doc).unwrap();
    let once = json_of(&doc);
    let conflict = &once["paths"]["/calls"]["post"]["responses"]["409"]["content"]["text/plain"];
    assert_eq!(conflict["schema"]["type"], "string");
    // A body that is not JSON is shown as a string, as sent.
    assert_eq!(
        conflict["examples"]["in-flight"]["value"],
        "a request with this idempotency key is still being processed; retry after it completes"
    );
    // The layer's own responses are not marked as possible replays, on the second run either.
    openapi.apply(&mut doc).unwrap();
    assert_eq!(json_of(&doc), once);
    assert!(
        once["paths"]["/calls"]["post"]["responses"]["409"]["headers"]["Idempotent-Replayed"]
            .is_null()
    );
}

#[test]
fn a_hook_without_a_described_body_is_an_error_and_changes_nothing() {
    let layer = IdempotencyLayer::new().post("/calls").reject_with(stripe);
    let mut doc = doc();
    let before = json_of(&doc);
    let error = layer.openapi().apply(&mut doc).unwrap_err();
    assert_eq!(error, OpenApiError::UndescribedRejection);
    assert!(error.to_string().contains("rejection_schema"), "{error}");
    assert_eq!(json_of(&doc), before);
    // A content type alone does not describe the body either.
    let error = layer
        .openapi()
        .rejection_content_type("application/json")
        .apply(&mut doc)
        .unwrap_err();
    assert_eq!(error, OpenApiError::UndescribedRejection);
}

#[test]
fn without_a_hook_a_described_body_is_not_used() {
    let layer = IdempotencyLayer::new().post("/calls");
    let mut doc = doc();
    layer
        .openapi()
        .rejection_schema(Ref::from_schema_name("StripeError"))
        .rejection_content_type("text/plain")
        .apply(&mut doc)
        .unwrap();
    let doc = json_of(&doc);
    assert!(!doc.to_string().contains("StripeError"));
    assert_eq!(
        doc["paths"]["/calls"]["post"]["responses"]["409"]["content"]["application/problem+json"]["schema"]
            ["$ref"],
        "#/components/schemas/IdempotencyProblem"
    );
}
