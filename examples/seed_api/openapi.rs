//! `GET /openapi.json`: the API's OpenAPI 3.1 document, its idempotency parts added by the
//! layer itself, from the same route list it is given.

use axum::{
    http::header,
    response::IntoResponse,
    routing::{MethodRouter, get},
};
use serde_json::json;
use tower_idempotency::IdempotencyLayer;
use utoipa::openapi::{
    Components, ContentBuilder, HttpMethod, Info, OpenApi, OpenApiBuilder, PathItem, Paths, Ref,
    RefOr, Required, ResponseBuilder, Schema, Type,
    header::HeaderBuilder,
    path::{OperationBuilder, ParameterBuilder, ParameterIn},
    request_body::RequestBodyBuilder,
    schema::{ArrayBuilder, ObjectBuilder},
    security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
};

use super::api::{AppState, KINDS, Kind};

const BEARER: &str = "apiKey";

fn schema_ref(name: &str) -> Ref {
    Ref::from_schema_name(name)
}

/// A JSON response with `schema`.
fn json_response(description: &str, schema: impl Into<RefOr<Schema>>) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new().schema(Some(schema)).build(),
    )
}

/// The API's own error body, `{"error": {"type", "message"}}`.
fn error_response(description: &str) -> ResponseBuilder {
    json_response(description, schema_ref("Error"))
}

fn create(kind: Kind) -> OperationBuilder {
    let collection = kind.collection();
    let (body, created) = if kind == Kind::BatchCall {
        let body = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "calls",
                ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::Object)),
            )
            .required("calls");
        let created = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("data", ArrayBuilder::new().items(schema_ref("Resource")))
            .required("data");
        (
            body,
            json_response("One call created per entry of `calls`", created),
        )
    } else {
        let body = ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("The resource's fields"));
        let created = json_response(
            &format!("The new {}", kind.object()),
            data(schema_ref("Resource")),
        )
        .header(
            "Location",
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .description(Some(format!("`/{collection}/{{id}}` of the new resource")))
                .build(),
        );
        (body, created)
    };
    let summary = if kind.idempotent() {
        format!("Create {collection} (idempotent with an idempotency key)")
    } else {
        format!("Create {collection} (the idempotency key header is ignored)")
    };
    OperationBuilder::new()
        .operation_id(Some(format!("create_{}", collection.replace('-', "_"))))
        .summary(Some(summary))
        .tag(collection)
        .request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(body)).build(),
                )
                .build(),
        ))
        .response("201", created)
        .response("400", error_response("The body is not valid JSON"))
        .response("401", error_response("No API key"))
        .response(
            "422",
            error_response("The body is not a JSON object, or not a batch"),
        )
        .response(
            "503",
            error_response("The database failed; nothing was created"),
        )
}

/// `{"data": <schema>}`.
fn data(schema: impl Into<RefOr<Schema>>) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("data", schema)
        .required("data")
}

fn list(kind: Kind) -> OperationBuilder {
    let collection = kind.collection();
    OperationBuilder::new()
        .operation_id(Some(format!("list_{}", collection.replace('-', "_"))))
        .summary(Some(format!("List your {collection}, oldest first")))
        .tag(collection)
        .response(
            "200",
            json_response(
                "The organization's resources",
                data(ArrayBuilder::new().items(schema_ref("Resource"))),
            ),
        )
        .response("401", error_response("No API key"))
        .response("503", error_response("The database failed"))
}

fn show(kind: Kind) -> OperationBuilder {
    let collection = kind.collection();
    OperationBuilder::new()
        .operation_id(Some(format!("show_{}", collection.replace('-', "_"))))
        .summary(Some(format!("One of your {collection}")))
        .tag(collection)
        .parameter(
            ParameterBuilder::new()
                .name("id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
        )
        .response(
            "200",
            json_response("The resource", data(schema_ref("Resource"))),
        )
        .response("401", error_response("No API key"))
        .response("404", error_response("No such resource"))
        .response("503", error_response("The database failed"))
}

fn components() -> Components {
    let string = || ObjectBuilder::new().schema_type(Type::String);
    let error = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "error",
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("type", string())
                .property("message", string())
                .required("type")
                .required("message"),
        )
        .required("error");
    let resource = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "The request's fields, with `id`, `object` and `created_at`",
        ))
        .property("id", string().description(Some("A UUID")))
        .property("object", string())
        .property(
            "created_at",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .description(Some("Unix time, in seconds")),
        )
        .required("id")
        .required("object")
        .required("created_at");
    let mut components = Components::new();
    components
        .schemas
        .insert("Error".into(), RefOr::T(error.into()));
    components
        .schemas
        .insert("Resource".into(), RefOr::T(resource.into()));
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("Your API key; it is your organization"))
                .build(),
        ),
    );
    components
}

/// The whole API, and the idempotency parts of `layer` when the API is served with it.
pub(crate) fn document(layer: Option<&IdempotencyLayer>) -> OpenApi {
    let mut paths = Paths::new();
    for kind in KINDS {
        let collection = kind.collection();
        let mut item = PathItem::new(HttpMethod::Post, create(kind));
        item.get = Some(list(kind).build());
        paths.paths.insert(format!("/{collection}"), item);
        if kind != Kind::BatchCall {
            paths.paths.insert(
                format!("/{collection}/{{id}}"),
                PathItem::new(HttpMethod::Get, show(kind)),
            );
        }
    }
    let stats = OperationBuilder::new()
        .operation_id(Some("stats"))
        .summary(Some(
            "Create-handler runs of your organization in this process",
        ))
        .response(
            "200",
            json_response(
                "The count (a replay does not count)",
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property(
                        "handler_calls",
                        ObjectBuilder::new().schema_type(Type::Integer),
                    )
                    .required("handler_calls"),
            ),
        )
        .response("401", error_response("No API key"));
    paths
        .paths
        .insert("/stats".into(), PathItem::new(HttpMethod::Get, stats));
    let openapi = OperationBuilder::new()
        .operation_id(Some("openapi"))
        .summary(Some("This document (no API key needed)"))
        .securities(Some(Vec::<SecurityRequirement>::new()))
        .response(
            "200",
            json_response(
                "OpenAPI 3.1",
                ObjectBuilder::new().schema_type(Type::Object),
            ),
        );
    paths.paths.insert(
        "/openapi.json".into(),
        PathItem::new(HttpMethod::Get, openapi),
    );

    let mut doc = OpenApiBuilder::new()
        .info(
            Info::builder()
                .title("seed_api")
                .version("1.0.0")
                .description(Some(
                    "The reference API of tower-idempotency. Creates of agents, calls, batch \
                     calls and tools are idempotent with an idempotency key.",
                ))
                .build(),
        )
        .paths(paths)
        .components(Some(components()))
        .security(Some([SecurityRequirement::new(
            BEARER,
            Vec::<String>::new(),
        )]))
        .build();
    if let Some(layer) = layer {
        // Every route the layer covers is in the document (both come from `KINDS`).
        layer
            .openapi()
            .apply(&mut doc)
            .expect("the document has every idempotent create");
    }
    doc
}

/// `GET /openapi.json`, serving `doc`.
pub(crate) fn route(doc: &OpenApi) -> MethodRouter<AppState> {
    let json = doc.to_pretty_json().unwrap_or_else(|err| {
        json!({ "error": { "type": "internal_error", "message": err.to_string() } }).to_string()
    });
    get(move || async move { ([(header::CONTENT_TYPE, "application/json")], json).into_response() })
}
