//! `IdempotencyLayer::openapi` (feature `utoipa`) on hand-made documents: which operations get
//! what, errors, merging with the application's own responses, and the key schema against
//! the key parser.
#![cfg(feature = "utoipa")]

use http::{HeaderName, Method, StatusCode};
use proptest::prelude::*;
use serde_json::{Value, json};
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, KeyReuse, StoreFailure,
    openapi::{KEY_PATTERN, OpenApiError},
};
use utoipa::{
    Modify,
    openapi::{
        Components, ContentBuilder, HttpMethod, Info, OpenApi, OpenApiBuilder, PathItem, Paths,
        Ref, ResponseBuilder, path::OperationBuilder, schema::ObjectBuilder,
    },
};

/// An operation answering `statuses` with `application/json` bodies.
fn operation(statuses: &[&str]) -> OperationBuilder {
    let mut op = OperationBuilder::new();
    for status in statuses {
        op = op.response(
            *status,
            ResponseBuilder::new()
                .description(format!("app {status}"))
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(ObjectBuilder::new()))
                        .build(),
                ),
        );
    }
    op
}

/// `POST /calls`, `GET /calls` and `POST /voices`, each answering 201 (or 200) and 400.
fn doc() -> OpenApi {
    let mut calls = PathItem::new(HttpMethod::Post, operation(&["201", "400"]));
    calls.get = Some(operation(&["200"]).build());
    OpenApiBuilder::new()
        .info(Info::new("test", "1"))
        .paths(Paths::builder().path("/calls", calls).path(
            "/voices",
            PathItem::new(HttpMethod::Post, operation(&["201", "400"])),
        ))
        .build()
}

fn json_of(doc: &OpenApi) -> Value {
    serde_json::from_str(&doc.to_json().unwrap()).unwrap()
}

fn applied(layer: &IdempotencyLayer) -> Value {
    let mut doc = doc();
    layer.openapi().apply(&mut doc).unwrap();
    json_of(&doc)
}

fn parameter_refs(op: &Value) -> Vec<String> {
    op["parameters"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["$ref"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn only_the_covered_operations_change() {
    let before = json_of(&doc());
    let after = applied(&IdempotencyLayer::new().post("/calls"));
    let op = &after["paths"]["/calls"]["post"];
    assert_eq!(
        parameter_refs(op),
        [
            "#/components/parameters/IdempotencyKeyHeader.X-Idempotency-Key",
            "#/components/parameters/IdempotencyKeyHeader.Idempotency-Key",
        ]
    );
    assert_eq!(
        op["responses"]["201"]["headers"]["Idempotent-Replayed"]["$ref"],
        "#/components/headers/IdempotentReplayed"
    );
    for status in ["400", "409", "503"] {
        assert_eq!(
            op["responses"][status]["content"]["application/problem+json"]["schema"]["$ref"],
            "#/components/schemas/IdempotencyProblem",
            "{status}"
        );
    }
    for status in ["409", "503"] {
        assert_eq!(
            op["responses"][status]["headers"]["Retry-After"]["$ref"],
            "#/components/headers/RetryAfter"
        );
    }
    // 422 only in strict mode; 401, 413 and 500 are left to the application.
    for status in ["422", "401", "413", "500"] {
        assert!(op["responses"][status].is_null(), "{status}");
    }
    // The others are as they were.
    assert_eq!(after["paths"]["/voices"], before["paths"]["/voices"]);
    assert_eq!(
        after["paths"]["/calls"]["get"],
        before["paths"]["/calls"]["get"]
    );
    // The parameters' schema: the key format.
    let key = &after["components"]["parameters"]["IdempotencyKeyHeader.X-Idempotency-Key"];
    assert_eq!(key["name"], "X-Idempotency-Key");
    assert_eq!(key["in"], "header");
    assert_eq!(key["required"], false);
    assert_eq!(key["schema"]["pattern"], KEY_PATTERN);
    assert_eq!(key["schema"]["maxLength"], 512);
    assert_eq!(key["schema"]["minLength"], 1);
    let problem = &after["components"]["schemas"]["IdempotencyProblem"];
    assert_eq!(
        problem["required"],
        json!(["type", "title", "status", "detail"])
    );
}

#[test]
fn the_app_s_own_content_is_kept_beside_the_problem() {
    let after = applied(&IdempotencyLayer::new().post("/calls"));
    let bad = &after["paths"]["/calls"]["post"]["responses"]["400"];
    assert!(bad["content"]["application/json"].is_object());
    assert!(bad["content"]["application/problem+json"].is_object());
    assert!(bad["description"].as_str().unwrap().starts_with("app 400"));
    // The app's 400 may be a replay (stored by default); the layer's own 409 never is.
    assert!(bad["headers"]["Idempotent-Replayed"].is_object());
    let conflict = &after["paths"]["/calls"]["post"]["responses"]["409"];
    assert!(conflict["headers"]["Idempotent-Replayed"].is_null());
}

#[test]
fn the_app_s_own_problem_schema_and_the_layer_s_become_any_of() {
    let op = OperationBuilder::new().response(
        "409",
        ResponseBuilder::new().description("app 409").content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(ObjectBuilder::new().title(Some("AppProblem"))))
                .build(),
        ),
    );
    let mut doc = OpenApiBuilder::new()
        .info(Info::new("test", "1"))
        .paths(Paths::builder().path("/calls", PathItem::new(HttpMethod::Post, op)))
        .build();
    let openapi = IdempotencyLayer::new().post("/calls").openapi();
    openapi.apply(&mut doc).unwrap();
    let once = json_of(&doc);
    let schema = &once["paths"]["/calls"]["post"]["responses"]["409"]["content"]["application/problem+json"]
        ["schema"];
    assert_eq!(
        schema["anyOf"],
        json!([
            {"title": "AppProblem", "type": "object"},
            {"$ref": "#/components/schemas/IdempotencyProblem"}
        ])
    );
    openapi.apply(&mut doc).unwrap();
    assert_eq!(json_of(&doc), once);
}

#[test]
fn strict_mode_adds_422() {
    let layer = IdempotencyLayer::new()
        .post("/calls")
        .key_reuse(KeyReuse::Reject);
    let after = applied(&layer);
    let examples = &after["paths"]["/calls"]["post"]["responses"]["422"]["content"]["application/problem+json"]
        ["examples"];
    assert_eq!(
        examples["key-reused"]["value"]["type"],
        "tag:tower-idempotency,2026:key-reused"
    );
    assert_eq!(examples["key-reused"]["value"]["status"], 422);
}

#[test]
fn applying_twice_is_applying_once() {
    let layer = IdempotencyLayer::new()
        .post("/calls")
        .on_store_error(StoreFailure::FailOpen);
    let mut doc = doc();
    layer.openapi().apply(&mut doc).unwrap();
    let once = json_of(&doc);
    layer.openapi().modify(&mut doc);
    assert_eq!(json_of(&doc), once);
}

#[test]
fn a_route_the_document_lacks_is_an_error_and_changes_nothing() {
    let layer = IdempotencyLayer::new().post("/calls").post("/agents");
    let mut doc = doc();
    let error = layer.openapi().apply(&mut doc).unwrap_err();
    assert_eq!(
        error,
        OpenApiError::MissingOperation {
            method: Method::POST,
            path: "/agents".into()
        }
    );
    assert!(error.to_string().contains("POST /agents"), "{error}");
    assert_eq!(json_of(&doc), json_of(&self::doc()));
    // As a `Modify`, the same: nothing changes.
    layer.openapi().modify(&mut doc);
    assert_eq!(json_of(&doc), json_of(&self::doc()));
}

#[test]
fn referenced_responses_are_copied_in_and_unknown_ones_are_errors() {
    let created = ResponseBuilder::new().description("Created").build();
    let mut components = Components::new();
    components
        .responses
        .insert("Created".into(), created.into());
    let op = OperationBuilder::new().response("201", Ref::from_response_name("Created"));
    let mut doc = OpenApiBuilder::new()
        .info(Info::new("test", "1"))
        .paths(Paths::builder().path("/calls", PathItem::new(HttpMethod::Post, op)))
        .components(Some(components))
        .build();
    IdempotencyLayer::new()
        .post("/calls")
        .openapi()
        .apply(&mut doc)
        .unwrap();
    let after = json_of(&doc);
    let created = &after["paths"]["/calls"]["post"]["responses"]["201"];
    assert_eq!(created["description"], "Created");
    assert!(created["headers"]["Idempotent-Replayed"].is_object());

    let op = OperationBuilder::new().response("201", Ref::from_response_name("Missing"));
    let mut doc = OpenApiBuilder::new()
        .info(Info::new("test", "1"))
        .paths(Paths::builder().path("/calls", PathItem::new(HttpMethod::Post, op)))
        .build();
    let error = IdempotencyLayer::new()
        .post("/calls")
        .openapi()
        .apply(&mut doc)
        .unwrap_err();
    assert!(
        matches!(&error, OpenApiError::UnresolvedResponse { status, reference, .. }
            if status == "201" && reference == "#/components/responses/Missing"),
        "{error:?}"
    );
}

#[test]
fn without_an_allow_list_every_post_is_covered() {
    let after = applied(&IdempotencyLayer::new());
    for path in ["/calls", "/voices"] {
        assert_eq!(
            parameter_refs(&after["paths"][path]["post"]).len(),
            2,
            "{path}"
        );
    }
    assert!(after["paths"]["/calls"]["get"]["parameters"].is_null());
}

#[test]
fn header_names_and_require_key_shape_the_parameter() {
    let layer = IdempotencyLayer::new()
        .post("/calls")
        .header_name(HeaderName::from_static("x-request-key"))
        .require_key(true);
    let after = applied(&layer);
    assert_eq!(
        parameter_refs(&after["paths"]["/calls"]["post"]),
        ["#/components/parameters/IdempotencyKeyHeader.X-Request-Key"]
    );
    let key = &after["components"]["parameters"]["IdempotencyKeyHeader.X-Request-Key"];
    assert_eq!(key["name"], "X-Request-Key");
    assert_eq!(key["required"], true);
    // Two names, one of them required: neither parameter alone is.
    let after = applied(&IdempotencyLayer::new().post("/calls").require_key(true));
    let key = &after["components"]["parameters"]["IdempotencyKeyHeader.Idempotency-Key"];
    assert_eq!(key["required"], false);
    assert!(key["description"].as_str().unwrap().contains("Required"));
}

#[test]
fn the_status_policy_decides_which_responses_carry_the_replay_marker() {
    let mut calls = PathItem::new(
        HttpMethod::Post,
        operation(&["201", "404", "500", "2XX", "5XX", "default"]),
    );
    calls.get = None;
    let doc = || {
        OpenApiBuilder::new()
            .info(Info::new("test", "1"))
            .paths(Paths::builder().path("/calls", calls.clone()))
            .build()
    };
    let marked = |layer: IdempotencyLayer| {
        let mut doc = doc();
        layer.openapi().apply(&mut doc).unwrap();
        let json = json_of(&doc);
        let responses = json["paths"]["/calls"]["post"]["responses"]
            .as_object()
            .unwrap()
            .clone();
        let mut marked: Vec<String> = responses
            .into_iter()
            .filter(|(_, r)| r["headers"]["Idempotent-Replayed"].is_object())
            .map(|(status, _)| status)
            .collect();
        marked.sort();
        marked
    };
    // Default: all but 5xx, 408 and 429.
    assert_eq!(
        marked(IdempotencyLayer::new().post("/calls")),
        ["201", "2XX", "404", "default"]
    );
    let only = |status: StatusCode| status == StatusCode::CREATED;
    assert_eq!(
        marked(IdempotencyLayer::new().post("/calls").store_status(only)),
        ["201", "2XX", "default"]
    );
}

#[test]
fn fail_open_marks_unprotected_responses() {
    let after = applied(&IdempotencyLayer::new().post("/calls"));
    assert!(after["components"]["headers"]["IdempotencyUnprotected"].is_null());
    let after = applied(
        &IdempotencyLayer::new()
            .post("/calls")
            .on_store_error(StoreFailure::FailOpen),
    );
    assert_eq!(
        after["paths"]["/calls"]["post"]["responses"]["201"]["headers"]["Idempotency-Unprotected"]
            ["$ref"],
        "#/components/headers/IdempotencyUnprotected"
    );
}

#[test]
fn route_templates_become_openapi_paths() {
    let op = || operation(&["201"]);
    let mut doc = OpenApiBuilder::new()
        .info(Info::new("test", "1"))
        .paths(
            Paths::builder()
                .path(
                    "/orgs/{org_id}/calls",
                    PathItem::new(HttpMethod::Post, op()),
                )
                .path("/files/{rest}", PathItem::new(HttpMethod::Put, op())),
        )
        .build();
    IdempotencyLayer::new()
        .post("/orgs/{org_id}/calls")
        .route("/files/{*rest}", Method::PUT)
        .openapi()
        .apply(&mut doc)
        .unwrap();
    let after = json_of(&doc);
    assert_eq!(
        parameter_refs(&after["paths"]["/orgs/{org_id}/calls"]["post"]).len(),
        2
    );
    assert_eq!(
        parameter_refs(&after["paths"]["/files/{rest}"]["put"]).len(),
        2
    );
}

/// Header values around the edges of the key format: short mixes of every kind of byte,
/// structured-field strings, and lengths near the limits.
fn header_values() -> impl Strategy<Value = Vec<u8>> {
    let any_short = prop::collection::vec(
        prop_oneof![
            Just(b'"'),
            Just(b'\\'),
            Just(b' '),
            0x21u8..0x7f,
            any::<u8>()
        ],
        0..8,
    );
    let quoted = prop::collection::vec(
        prop_oneof![4 => 0x21u8..0x7f, 1 => Just(b'\\'), 1 => Just(b'"'), 1 => Just(b' ')],
        0..300,
    )
    .prop_map(|inner| [&b"\""[..], &inner, b"\""].concat());
    let long_plain = prop::collection::vec(0x21u8..0x7f, 250..260);
    let long_escaped = prop::collection::vec(
        prop_oneof![
            Just(b"\\\"".to_vec()),
            Just(b"\\\\".to_vec()),
            (0x23u8..0x5b).prop_map(|b| vec![b])
        ],
        250..260,
    )
    .prop_map(|parts| [&b"\""[..], &parts.concat(), b"\""].concat());
    prop_oneof![any_short, quoted, long_plain, long_escaped]
}

proptest! {
    /// The schema the document gives the key header (its pattern and lengths, as served)
    /// accepts exactly the values the layer accepts.
    #[test]
    fn the_key_schema_is_the_key_parser(value in header_values()) {
        let after = applied(&IdempotencyLayer::new().post("/calls"));
        let schema = &after["components"]["parameters"]["IdempotencyKeyHeader.Idempotency-Key"]
            ["schema"];
        let pattern = regex::bytes::Regex::new(schema["pattern"].as_str().unwrap()).unwrap();
        let max = schema["maxLength"].as_u64().unwrap() as usize;
        let min = schema["minLength"].as_u64().unwrap() as usize;
        let schema_accepts =
            pattern.is_match(&value) && (min..=max).contains(&value.len());
        prop_assert_eq!(
            schema_accepts,
            IdempotencyKey::parse(&value).is_ok(),
            "{:?}",
            String::from_utf8_lossy(&value)
        );
    }
}

/// A document with one operation for every method an OpenAPI path item has, plus `QUERY`
/// and an extension method `PURGE`, each answering 200.
fn every_method_doc() -> OpenApi {
    let op = || Some(operation(&["200"]).build());
    let mut item = PathItem::new(HttpMethod::Post, operation(&["201"]));
    item.get = op();
    item.put = op();
    item.delete = op();
    item.patch = op();
    item.options = op();
    item.head = op();
    item.trace = op();
    item.query = op();
    item.additional_operations = [("PURGE".to_owned(), operation(&["200"]).build())]
        .into_iter()
        .collect();
    OpenApiBuilder::new()
        .info(Info::new("test", "1"))
        .paths(Paths::builder().path("/things", item))
        .build()
}

#[test]
fn a_covered_route_of_any_method_gets_the_key_parameters() {
    let methods = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "QUERY", "PURGE",
    ];
    for covered in methods {
        let layer = IdempotencyLayer::new()
            .route("/things", Method::from_bytes(covered.as_bytes()).unwrap());
        let mut doc = every_method_doc();
        layer.openapi().apply(&mut doc).unwrap();
        let after = json_of(&doc);
        let item = &after["paths"]["/things"];
        for method in methods {
            let op = match method {
                "PURGE" => &item["additionalOperations"]["PURGE"],
                _ => &item[method.to_lowercase()],
            };
            let refs = parameter_refs(op);
            if method == covered {
                assert_eq!(refs.len(), 2, "{covered}: {item}");
            } else {
                assert!(
                    refs.is_empty(),
                    "{covered} covered, {method} changed: {item}"
                );
            }
        }
    }
}

#[test]
fn a_key_parameter_of_another_kind_or_name_is_no_key_parameter() {
    use utoipa::openapi::{
        RefOr,
        path::{ParameterBuilder, ParameterIn},
    };

    // A query parameter named like the key header, and a header parameter of another name:
    // neither stands for the key header, which is still added.
    let mut op = operation(&["201"]).build();
    op.parameters = Some(vec![
        RefOr::T(
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Query)
                .build(),
        ),
        RefOr::T(
            ParameterBuilder::new()
                .name("X-Tenant")
                .parameter_in(ParameterIn::Header)
                .build(),
        ),
    ]);
    let mut doc = OpenApiBuilder::new()
        .info(Info::new("test", "1"))
        .paths(Paths::builder().path("/calls", PathItem::new(HttpMethod::Post, op)))
        .build();
    IdempotencyLayer::new()
        .post("/calls")
        .openapi()
        .apply(&mut doc)
        .unwrap();
    let after = json_of(&doc);
    let op = &after["paths"]["/calls"]["post"];
    assert_eq!(
        parameter_refs(op),
        [
            "#/components/parameters/IdempotencyKeyHeader.X-Idempotency-Key",
            "#/components/parameters/IdempotencyKeyHeader.Idempotency-Key"
        ]
    );
    assert_eq!(op["parameters"].as_array().unwrap().len(), 4);
}

#[test]
fn as_a_utoipa_modifier_it_applies_itself() {
    let mut doc = doc();
    IdempotencyLayer::new()
        .post("/calls")
        .openapi()
        .modify(&mut doc);
    assert_eq!(
        parameter_refs(&json_of(&doc)["paths"]["/calls"]["post"]).len(),
        2
    );
}

#[test]
fn debug_output_shows_the_routes_and_headers() {
    let openapi = IdempotencyLayer::new().post("/calls").openapi();
    let debug = format!("{openapi:?}");
    assert!(debug.starts_with("IdempotencyOpenApi {"), "{debug}");
    assert!(debug.contains("/calls"), "{debug}");
    assert!(debug.contains("idempotency-key"), "{debug}");
}

#[test]
fn the_key_description_names_the_other_headers_only_when_there_are_several() {
    let description = |layer: IdempotencyLayer, shown: &str| {
        let after = applied(&layer.post("/calls"));
        after["components"]["parameters"][format!("IdempotencyKeyHeader.{shown}")]["description"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let one = description(
        IdempotencyLayer::new().header_name(HeaderName::from_static("x-request-key")),
        "X-Request-Key",
    );
    assert!(!one.contains("never two at once"), "{one}");
    let two = description(IdempotencyLayer::new(), "Idempotency-Key");
    assert!(
        two.contains("one of X-Idempotency-Key, Idempotency-Key, never two at once"),
        "{two}"
    );
    let three = description(
        IdempotencyLayer::new().header_names([
            HeaderName::from_static("a-key"),
            HeaderName::from_static("b-key"),
            HeaderName::from_static("c-key"),
        ]),
        "A-Key",
    );
    assert!(
        three.contains("one of A-Key, B-Key, C-Key, never two at once"),
        "{three}"
    );
}

#[test]
fn the_descriptions_under_one_status_are_separated_by_a_blank_line() {
    use tower_idempotency::problem::Problem;

    // A hook that answers every rejection with 400: all their descriptions meet there.
    let layer = IdempotencyLayer::new()
        .post("/voices")
        .reject_with(|problem: Problem| (StatusCode::BAD_REQUEST, problem.detail));
    let mut doc = doc();
    layer
        .openapi()
        .rejection_schema(ObjectBuilder::new())
        .apply(&mut doc)
        .unwrap();
    let after = json_of(&doc);
    let description = after["paths"]["/voices"]["post"]["responses"]["400"]["description"]
        .as_str()
        .unwrap();
    let parts: Vec<&str> = description.split("\n\n").collect();
    assert!(parts.len() >= 3, "{description:?}");
    assert_eq!(parts[0], "app 400", "{description:?}");
    for part in &parts[1..] {
        assert!(
            part.ends_with('.') && !part.starts_with('\n'),
            "{description:?}"
        );
    }
}

#[test]
fn a_hook_s_body_up_to_64_kib_is_an_example() {
    use tower_idempotency::problem::Problem;

    let body = "x".repeat(2000);
    let layer = {
        let body = body.clone();
        IdempotencyLayer::new()
            .post("/calls")
            .reject_with(move |problem: Problem| (problem.status(), body.clone()))
    };
    let mut doc = doc();
    layer
        .openapi()
        .rejection_schema(ObjectBuilder::new())
        .rejection_content_type("text/plain")
        .apply(&mut doc)
        .unwrap();
    let after = json_of(&doc);
    let conflict = &after["paths"]["/calls"]["post"]["responses"]["409"]["content"]["text/plain"];
    assert_eq!(conflict["examples"]["in-flight"]["value"], body.as_str());
}
