//! The pieces the layer adds to a document: components, the key parameter, the problem
//! responses.

use std::time::Duration;

use futures_util::FutureExt;
use http::{HeaderName, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};
use utoipa::openapi::{
    Components, Content, Header, RefOr, Required, Response, Schema, SchemaFormat, Type,
    example::ExampleBuilder,
    path::{Parameter, ParameterIn},
    schema::{AnyOfBuilder, ObjectBuilder, Ref},
};

use crate::{
    KeyError, KeyReuse, MAX_KEY_LEN, StoreFailure,
    config::{Config, DEFAULT_HEADER, IETF_HEADER},
    problem::{PROBLEM_JSON, Problem, ProblemKind},
};

/// The `pattern` of the key header's schema (ECMA-262, as JSON Schema reads it): 1 to 255
/// visible ASCII characters (0x21 to 0x7E) not starting with `"`, or an RFC 8941 string of 1
/// to 255 such characters between `"`, with `"` and `\` escaped as `\"` and `\\`. Exactly the
/// values [`IdempotencyKey::parse`](crate::IdempotencyKey::parse) accepts.
pub const KEY_PATTERN: &str = r#"^(?:[!#-~][!-~]{0,254}|"(?:[!#-\[\]-~]|\\["\\]){1,255}")$"#;

/// The name of the problem details schema in `components/schemas`.
pub const PROBLEM_SCHEMA: &str = "IdempotencyProblem";

/// The name of the `Idempotent-Replayed` header in `components/headers`.
pub const REPLAYED_HEADER_COMPONENT: &str = "IdempotentReplayed";

/// The name of the `Idempotency-Unprotected` header in `components/headers`.
pub const UNPROTECTED_HEADER_COMPONENT: &str = "IdempotencyUnprotected";

/// The name of the `Retry-After` header in `components/headers`.
pub const RETRY_AFTER_COMPONENT: &str = "RetryAfter";

/// The prefix of the key header parameters in `components/parameters`, followed by the header
/// name (`IdempotencyKeyHeader.X-Idempotency-Key`).
pub const KEY_PARAMETER_PREFIX: &str = "IdempotencyKeyHeader.";

/// Adds the schema, headers and key parameters to `components`.
pub(super) fn add_components(config: &Config, components: &mut Components) {
    if config.reject.hook.is_none() {
        components
            .schemas
            .insert(PROBLEM_SCHEMA.into(), RefOr::T(problem_schema(config)));
    }
    let marker = |description: &str| {
        let schema = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["true"]));
        let mut header = Header::new(schema);
        header.description = Some(description.into());
        RefOr::T(header)
    };
    components.headers.insert(
        REPLAYED_HEADER_COMPONENT.into(),
        marker(
            "`true` when this response is the stored response of an earlier request with \
             the same idempotency key (a replay: the handler did not run again); absent \
             otherwise",
        ),
    );
    if config.store_failure == StoreFailure::FailOpen {
        components.headers.insert(
            UNPROTECTED_HEADER_COMPONENT.into(),
            marker(
                "`true` when the idempotency store failed and the request ran without \
                 idempotency protection (a retry may run it again); absent otherwise",
            ),
        );
    }
    let mut retry_after = Header::new(
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1)),
    );
    retry_after.description = Some("Seconds to wait before retrying".into());
    components
        .headers
        .insert(RETRY_AFTER_COMPONENT.into(), RefOr::T(retry_after));
    for name in &config.headers {
        components.parameters.insert(
            format!("{KEY_PARAMETER_PREFIX}{}", display_name(name)),
            RefOr::T(key_parameter(config, name)),
        );
    }
}

fn key_parameter(config: &Config, name: &HeaderName) -> Parameter {
    let names: Vec<String> = config.headers.iter().map(display_name).collect();
    let mut description = format!(
        "Idempotency key (IETF draft \"The Idempotency-Key HTTP Header Field\"): a retry \
         with the same key, caller and request gets the stored response, marked \
         `Idempotent-Replayed: true`, and the request runs once. A UUID is the usual \
         choice: 1 to {MAX_KEY_LEN} visible ASCII characters, optionally as a \
         structured-field string (\"...\")."
    );
    if names.len() > 1 {
        description.push_str(&format!(
            " Send it in one of {}, never two at once (400).",
            names.join(", ")
        ));
    }
    description.push_str(if config.require_key {
        " Required on this operation (400 without it)."
    } else {
        " Without it the request runs unprotected."
    });
    let schema = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(2 + 2 * MAX_KEY_LEN))
        .pattern(Some(KEY_PATTERN))
        .examples(["5f0c6c1e-8f0b-4b8e-9d2a-3c4b5a697e12"]);
    let required = config.require_key && config.headers.len() == 1;
    Parameter::builder()
        .name(display_name(name))
        .parameter_in(ParameterIn::Header)
        .required(if required {
            Required::True
        } else {
            Required::False
        })
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

/// The problem responses this layer can answer a covered request with.
fn problems(config: &Config) -> Vec<ProblemResponse> {
    let names = config
        .headers
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(" or ");
    let mut invalid_key = format!(
        "The idempotency key is invalid: repeated (or sent under two names), empty, longer \
         than {MAX_KEY_LEN} characters or not visible ASCII"
    );
    if config.require_key {
        invalid_key.push_str(", or missing");
    }
    invalid_key.push_str("; or the request body could not be read. Nothing ran.");
    let mut problems = vec![
        ProblemResponse {
            status: StatusCode::BAD_REQUEST,
            description: invalid_key,
            retry_after: false,
            examples: vec![
                Problem::new(
                    ProblemKind::InvalidKey,
                    format!("{} (header {names})", KeyError::TooLong),
                ),
                Problem::new(
                    ProblemKind::BodyUnreadable,
                    "the request body could not be read: connection reset",
                ),
            ],
        },
        ProblemResponse {
            status: StatusCode::CONFLICT,
            description: "A request with this idempotency key is still being processed; \
                          retry after `Retry-After` seconds to get its response."
                .into(),
            retry_after: true,
            examples: vec![Problem::new(
                ProblemKind::InFlight,
                "a request with this idempotency key is still being processed; retry \
                 after it completes",
            )],
        },
    ];
    if config.key_reuse == KeyReuse::Reject {
        problems.push(ProblemResponse {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            description: "The idempotency key was already used with a different request \
                          (method, path, query or body). Nothing ran; use a new key."
                .into(),
            retry_after: false,
            examples: vec![Problem::new(
                ProblemKind::KeyReused,
                "this idempotency key was already used with a different request (method, \
                 path, query or body); use a new key for a new request",
            )],
        });
    }
    problems.push(ProblemResponse {
        status: StatusCode::SERVICE_UNAVAILABLE,
        description: "The idempotency store is unavailable or full, or the server is \
                      shutting down; the request was not processed. Retry after \
                      `Retry-After` seconds."
            .into(),
        retry_after: true,
        examples: vec![
            Problem::new(
                ProblemKind::StoreUnavailable,
                "the idempotency store is unavailable; the request was not processed, \
                 retry later",
            ),
            Problem::new(
                ProblemKind::StoreFull,
                "the idempotency store is at capacity; retry later",
            ),
        ],
    });
    problems
}

/// One problem status: its description, whether it carries `Retry-After`, and example bodies.
pub(super) struct ProblemResponse {
    pub(super) status: StatusCode,
    pub(super) description: String,
    retry_after: bool,
    examples: Vec<Problem>,
}

/// How the rejections are documented: their content type and schema.
#[derive(Clone)]
pub(super) struct RejectionBody {
    pub(super) content_type: String,
    pub(super) schema: RefOr<Schema>,
}

impl RejectionBody {
    /// Problem details: `application/problem+json`, the [`PROBLEM_SCHEMA`] component.
    pub(super) fn problem() -> Self {
        Self {
            content_type: PROBLEM_JSON.to_owned(),
            schema: Ref::from_schema_name(PROBLEM_SCHEMA).into(),
        }
    }
}

/// A problem status as documented: under the status the layer's rendering gives it.
pub(super) struct Documented {
    pub(super) response: ProblemResponse,
    pub(super) examples: Vec<Example>,
}

/// One example: the problem, and its body as the layer sends it (`None`: not shown).
pub(super) struct Example {
    problem: Problem,
    body: Option<Value>,
}

/// The largest rendered body that becomes an example: 64 KiB.
const MAX_EXAMPLE_BYTES: usize = 64 * 1024;

/// One example as the layer renders it (its `ProblemTypes` and hook): the status, and the body
/// as JSON, or as a string when it is not JSON. No body when it is not ready at once (a
/// streaming body), larger than [`MAX_EXAMPLE_BYTES`] or not UTF-8.
struct Rendered {
    status: StatusCode,
    body: Option<Value>,
}

fn render(config: &Config, problem: &Problem) -> Rendered {
    let response = config.reject.render(problem.clone());
    let status = response.status();
    // Limited: a hook's body may be a stream that is always ready and never ends.
    let body = Limited::new(response.into_body(), MAX_EXAMPLE_BYTES)
        .collect()
        .now_or_never()
        .and_then(Result::ok)
        .map(|collected| collected.to_bytes())
        .and_then(|bytes| {
            serde_json::from_slice(&bytes)
                .ok()
                .or_else(|| String::from_utf8(bytes.to_vec()).ok().map(Value::String))
        });
    Rendered { status, body }
}

/// The problem responses as the layer sends them: under the status the layer's rendering
/// (its hook) gives each example, with examples rendered by it. Statuses the hook maps
/// several kinds to are merged.
pub(super) fn rendered(config: &Config) -> Vec<Documented> {
    let mut out: Vec<Documented> = Vec::new();
    for problem in problems(config) {
        for example in problem.examples {
            // As the layer makes them: 409 and 503 carry a `Retry-After` (the hook sees it).
            let example = if problem.retry_after {
                example.retry_after(Duration::from_secs(1))
            } else {
                example
            };
            let Rendered { status, body } = render(config, &example);
            let at = match out.iter().position(|d| d.response.status == status) {
                Some(at) => at,
                None => {
                    out.push(Documented {
                        response: ProblemResponse {
                            status,
                            description: String::new(),
                            retry_after: false,
                            examples: Vec::new(),
                        },
                        examples: Vec::new(),
                    });
                    out.len() - 1
                }
            };
            let Documented { response, examples } = &mut out[at];
            if !response.description.contains(&problem.description) {
                if !response.description.is_empty() {
                    response.description.push_str("\n\n");
                }
                response.description.push_str(&problem.description);
            }
            response.retry_after |= problem.retry_after;
            examples.push(Example {
                problem: example,
                body,
            });
        }
    }
    out
}

/// Adds the content (`body`), description and headers of `problem` to `response`, with
/// `examples` (each problem and its rendered body) when the content is new.
pub(super) fn add_problem(
    response: &mut Response,
    problem: &ProblemResponse,
    examples: &[Example],
    body: &RejectionBody,
) {
    if !response.description.contains(&problem.description) {
        response.description = format!("{}\n\n{}", response.description, problem.description);
    }
    if problem.retry_after {
        header_ref(response, "Retry-After", RETRY_AFTER_COMPONENT);
    }
    let ours = &body.schema;
    match response.content.get_mut(&body.content_type) {
        Some(RefOr::T(content)) => match &content.schema {
            Some(schema) if schema == ours || any_of_contains(schema, ours) => {}
            Some(schema) => {
                let both = AnyOfBuilder::new()
                    .item(schema.clone())
                    .item(ours.clone())
                    .build();
                content.schema = Some(RefOr::T(Schema::AnyOf(both)));
            }
            None => content.schema = Some(ours.clone()),
        },
        Some(RefOr::Ref(_)) => {}
        None => {
            let mut content = Content::new(Some(ours.clone()));
            for Example { problem, body } in examples {
                let Some(body) = body else { continue };
                let example = ExampleBuilder::new()
                    .summary(problem.kind.title())
                    .value(Some(body.clone()))
                    .build();
                content
                    .examples
                    .insert(problem.kind.slug().to_owned(), RefOr::T(example));
            }
            response
                .content
                .insert(body.content_type.clone(), RefOr::T(content));
        }
    }
}

fn any_of_contains(schema: &RefOr<Schema>, item: &RefOr<Schema>) -> bool {
    matches!(schema, RefOr::T(Schema::AnyOf(any)) if any.items.contains(item))
}

/// Whether `response` is only the layer's rejection (one the layer made, never a replay).
pub(super) fn only_problem(response: &Response, body: &RejectionBody) -> bool {
    response.content.len() == 1
        && matches!(
            response.content.get(&body.content_type),
            Some(RefOr::T(content)) if content.schema.as_ref() == Some(&body.schema)
        )
}

pub(super) fn header_ref(response: &mut Response, name: &str, component: &str) {
    response
        .headers
        .entry(name.to_owned())
        .or_insert_with(|| RefOr::Ref(Ref::new(format!("#/components/headers/{component}"))));
}

/// The RFC 9457 members the layer sends, with the `type` URIs of its `ProblemTypes`.
fn problem_schema(config: &Config) -> Schema {
    let types = &config.reject.types;
    let type_examples = [
        ProblemKind::InvalidKey,
        ProblemKind::BodyUnreadable,
        ProblemKind::InFlight,
        ProblemKind::KeyReused,
        ProblemKind::StoreUnavailable,
        ProblemKind::StoreFull,
    ]
    .map(|kind| json!(types.get(kind)));
    let string = |description: &str| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(description))
    };
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "Problem details (RFC 9457, `application/problem+json`) of a request the \
             idempotency layer answered itself",
        ))
        .property(
            "type",
            string(&format!(
                "A URI naming the kind of problem, stable across versions: match on it \
                 (`{}`, ...)",
                types.get(ProblemKind::InFlight)
            ))
            .format(Some(SchemaFormat::Custom("uri-reference".into())))
            .examples(type_examples),
        )
        .property("title", string("A short summary of the kind of problem"))
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(100))
                .maximum(Some(599))
                .description(Some("The HTTP status code of the response")),
        )
        .property(
            "detail",
            string("What happened to this request, in a sentence"),
        )
        .required("type")
        .required("title")
        .required("status")
        .required("detail")
        .build()
        .into()
}

/// A header name as documents write it: the crate's two names in their usual case, others in
/// title case (`x-request-key` as `X-Request-Key`).
pub(super) fn display_name(name: &HeaderName) -> String {
    if *name == DEFAULT_HEADER {
        return "X-Idempotency-Key".into();
    }
    if *name == IETF_HEADER {
        return "Idempotency-Key".into();
    }
    name.as_str()
        .split('-')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect::<Vec<_>>()
        .join("-")
}
