//! The layer in an OpenAPI document (feature `utoipa`): the idempotency key header, the replay
//! marker and the problem responses, on the operations the layer covers.
//!
//! [`IdempotencyLayer::openapi`] reads the layer's own configuration (its allow-list, key header
//! names, [`require_key`](IdempotencyLayer::require_key), [`KeyReuse`](crate::KeyReuse),
//! [`StoreFailure`] and status policy), so the document describes what the layer does and
//! cannot drift from it. [`IdempotencyOpenApi::apply`] then adds to a utoipa 6
//! [`OpenApi`] document, on each covered operation only:
//!
//! | what | where | shape |
//! |---|---|---|
//! | the key header, once per accepted name (`X-Idempotency-Key`, `Idempotency-Key` by default) | a `header` parameter, `$ref` to `components/parameters/IdempotencyKeyHeader.<Name>` | string, `minLength` 1, `maxLength` 512, `pattern` [`KEY_PATTERN`]: 1 to 255 visible ASCII characters, or the same as a structured-field string (`"..."`, `\"` and `\\` escaped) |
//! | `Idempotent-Replayed: true` | a response header on every documented response whose status the layer stores (the [`store_status`](IdempotencyLayer::store_status) policy: by default all but 5xx, 408 and 429), `$ref` to `components/headers/IdempotentReplayed` | string, `enum: ["true"]`; present only on a replay |
//! | `Idempotency-Unprotected: true` | the same responses, only with [`StoreFailure::FailOpen`] | string, `enum: ["true"]` |
//! | 400, 409, 503, and 422 with [`KeyReuse::Reject`](crate::KeyReuse::Reject) | responses with `application/problem+json` content, schema `$ref` to `components/schemas/IdempotencyProblem`, one example per kind; 409 and 503 with `Retry-After` (`components/headers/RetryAfter`, integer seconds, at least 1). With a [`reject_with`](IdempotencyLayer::reject_with) hook: your content type and schema instead, see below | RFC 9457: `type` (the layer's [`ProblemTypes`](crate::ProblemTypes), by default a `tag:` URI), `title`, `status`, `detail`, all four always present |
//!
//! A status the operation already documents keeps its content: the problem content is added
//! beside it (and when it has `application/problem+json` content of its own, the schema
//! becomes `anyOf` both). A response given as a `$ref` to `components/responses` is copied
//! into the operation first. Applying twice changes nothing the second time. The 401, 413 and
//! 500 rejections of the [problem table](crate::problem) are not added: the application's own
//! authentication, body limit and errors usually document those statuses.
//!
//! # Rejections as the layer sends them
//!
//! Each example is the response the layer itself makes for that problem, rendered by the same
//! code: its `type` is the one the layer's [`ProblemTypes`](crate::ProblemTypes) give
//! ([`problem_types`](IdempotencyLayer::problem_types)), and so are the `type` examples and
//! description of the `IdempotencyProblem` schema.
//!
//! With a [`reject_with`](IdempotencyLayer::reject_with) hook the layer sends the hook's body,
//! not problem details, so the document has no `application/problem+json` content and no
//! `IdempotencyProblem` schema. Describe the hook's body instead:
//!
//! | method | what | default |
//! |---|---|---|
//! | [`rejection_schema`](IdempotencyOpenApi::rejection_schema) | the body's schema: inline, or a `$ref` to your own component | none: [`apply`](IdempotencyOpenApi::apply) fails with [`OpenApiError::UndescribedRejection`] |
//! | [`rejection_content_type`](IdempotencyOpenApi::rejection_content_type) | the body's content type | `application/json` |
//!
//! The examples are then the hook's own responses to the same problems (409 and 503 with a
//! `Retry-After` of 1 second), each documented under the status the hook answers it with (a
//! hook that answers a reused key with 400 puts it under 400, beside the invalid key), its
//! body as JSON, or as a string when it is not JSON; a body that is not ready at once (a
//! stream), is larger than 64 KiB or is not UTF-8 gets no example. Without a hook, both
//! methods are ignored.
//!
//! ```
//! use axum::Json;
//! use tower_idempotency::{IdempotencyLayer, problem::Problem};
//! use utoipa::openapi::{
//!     HttpMethod, Info, OpenApiBuilder, PathItem, Paths, Ref, ResponseBuilder,
//!     path::OperationBuilder,
//! };
//!
//! let layer = IdempotencyLayer::new().post("/calls").reject_with(|problem: Problem| {
//!     let body = serde_json::json!({"error": {"code": problem.kind.slug()}});
//!     (problem.status(), Json(body))
//! });
//! let create = OperationBuilder::new()
//!     .response("201", ResponseBuilder::new().description("Created"));
//! let mut doc = OpenApiBuilder::new()
//!     .info(Info::new("Calls", "1.0.0"))
//!     .paths(Paths::builder().path("/calls", PathItem::new(HttpMethod::Post, create)))
//!     .build();
//! // Without a description of the hook's body, nothing is documented.
//! assert!(layer.openapi().apply(&mut doc).is_err());
//! layer
//!     .openapi()
//!     .rejection_schema(Ref::from_schema_name("ApiError")) // your component
//!     .apply(&mut doc)?;
//!
//! let json: serde_json::Value = serde_json::from_str(&doc.to_json()?)?;
//! let conflict = &json["paths"]["/calls"]["post"]["responses"]["409"]["content"];
//! let example = &conflict["application/json"]["examples"]["in-flight"]["value"];
//! assert_eq!(example["error"]["code"], "in-flight");
//! assert!(conflict["application/problem+json"].is_null());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Covered operations
//!
//! Which operations are covered: each `(method, route template)` of the layer's allow-list
//! ([`route`](IdempotencyLayer::route), [`post`](IdempotencyLayer::post)), with axum's
//! `{*rest}` written as OpenAPI's `{rest}`; a route the document lacks is an error
//! ([`OpenApiError::MissingOperation`]). A layer without an allow-list covers every POST that
//! reaches it, so the document's every POST operation is covered: when the layer sits on some
//! routes only (`route_layer`), give it their routes so the document knows them.
//!
//! ```
//! use axum::{Router, http::StatusCode, routing::post};
//! use tower_idempotency::IdempotencyLayer;
//! use utoipa::openapi::{
//!     HttpMethod, Info, OpenApiBuilder, PathItem, Paths, ResponseBuilder, path::OperationBuilder,
//! };
//!
//! let layer = IdempotencyLayer::new().post("/calls");
//!
//! // The application's document, by hand here; `#[derive(OpenApi)]` gives the same type.
//! let create = OperationBuilder::new()
//!     .response("201", ResponseBuilder::new().description("Created"));
//! let mut doc = OpenApiBuilder::new()
//!     .info(Info::new("Calls", "1.0.0"))
//!     .paths(Paths::builder().path("/calls", PathItem::new(HttpMethod::Post, create)))
//!     .build();
//! layer.openapi().apply(&mut doc)?; // or as a utoipa `Modify`
//!
//! let json: serde_json::Value = serde_json::from_str(&doc.to_json()?)?;
//! let operation = &json["paths"]["/calls"]["post"];
//! assert_eq!(operation["parameters"].as_array().unwrap().len(), 2);
//! assert!(operation["responses"]["409"]["content"]["application/problem+json"].is_object());
//!
//! let app: Router = Router::new()
//!     .route("/calls", post(|| async { StatusCode::CREATED }))
//!     .layer(layer);
//! # let _ = app;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod parts;

use std::{fmt, sync::Arc};

use http::{Method, StatusCode};
use utoipa::{
    Modify,
    openapi::{
        Components, OpenApi, PathItem, RefOr, Response, Schema,
        path::{Operation, ParameterIn},
        schema::Ref,
    },
};

use self::parts::{
    Documented, RejectionBody, add_components, add_problem, display_name, header_ref, only_problem,
    rendered,
};
pub use self::parts::{
    KEY_PARAMETER_PREFIX, KEY_PATTERN, PROBLEM_SCHEMA, REPLAYED_HEADER_COMPONENT,
    RETRY_AFTER_COMPONENT, UNPROTECTED_HEADER_COMPONENT,
};
use crate::{IdempotencyLayer, StoreFailure, config::Config};

/// What a layer adds to an OpenAPI document: made by [`IdempotencyLayer::openapi`], applied
/// with [`apply`](Self::apply) or as a utoipa [`Modify`]. See the [module docs](self).
#[derive(Clone)]
pub struct IdempotencyOpenApi {
    config: Arc<Config>,
    rejection_schema: Option<RefOr<Schema>>,
    rejection_content_type: Option<String>,
}

impl fmt::Debug for IdempotencyOpenApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyOpenApi")
            .field(
                "routes",
                &self.config.routes.as_ref().map(|r| r.templates()),
            )
            .field("headers", &self.config.headers)
            .field("reject_with", &self.config.reject.hook.is_some())
            .field("rejection_schema", &self.rejection_schema.is_some())
            .field("rejection_content_type", &self.rejection_content_type)
            .finish_non_exhaustive()
    }
}

/// Why [`IdempotencyOpenApi::apply`] left a document unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenApiError {
    /// A route of the layer's allow-list has no operation in the document.
    MissingOperation {
        /// The route's method.
        method: Method,
        /// The route as an OpenAPI path (`/orgs/{org_id}/calls`).
        path: String,
    },
    /// A covered operation's response is a `$ref` that is not in `components/responses`.
    UnresolvedResponse {
        /// The operation's method.
        method: Method,
        /// The operation's path.
        path: String,
        /// The response's status key (`201`, `4XX`, `default`).
        status: String,
        /// The reference (`#/components/responses/Created`).
        reference: String,
    },
    /// The layer renders its rejections with a
    /// [`reject_with`](IdempotencyLayer::reject_with) hook and nothing says what the hook's body
    /// looks like: describe it with [`IdempotencyOpenApi::rejection_schema`].
    UndescribedRejection,
}

impl fmt::Display for OpenApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenApiError::MissingOperation { method, path } => write!(
                f,
                "the idempotency layer covers {method} {path}, and the OpenAPI document has no \
                 such operation"
            ),
            OpenApiError::UnresolvedResponse {
                method,
                path,
                status,
                reference,
            } => write!(
                f,
                "response {status} of {method} {path} refers to {reference}, which is not in \
                 the document's components"
            ),
            OpenApiError::UndescribedRejection => f.write_str(
                "the idempotency layer renders its rejections with a `reject_with` hook, so they \
                 are not problem details; describe the hook's body with \
                 `IdempotencyOpenApi::rejection_schema` (and `rejection_content_type` when it \
                 is not `application/json`)",
            ),
        }
    }
}

impl std::error::Error for OpenApiError {}

impl IdempotencyLayer {
    /// What this layer adds to an OpenAPI document (feature `utoipa`): the key header, the
    /// replay marker and the problem responses, on the operations it covers. See
    /// [`crate::openapi`].
    #[cfg_attr(docsrs, doc(cfg(feature = "utoipa")))]
    pub fn openapi(&self) -> IdempotencyOpenApi {
        IdempotencyOpenApi {
            config: self.config.clone(),
            rejection_schema: None,
            rejection_content_type: None,
        }
    }
}

impl IdempotencyOpenApi {
    /// The schema of the body the layer's [`reject_with`](IdempotencyLayer::reject_with) hook
    /// sends: a [`Schema`] (placed inline) or a [`Ref`] to one of the application's
    /// components (`Ref::from_schema_name("ApiError")`; the component itself is the
    /// application's to add). Needed when the layer has a hook: without it
    /// [`apply`](Self::apply) fails with [`OpenApiError::UndescribedRejection`]. Not used
    /// without a hook, since the layer then sends problem details and documents them itself.
    pub fn rejection_schema(mut self, schema: impl Into<RefOr<Schema>>) -> Self {
        self.rejection_schema = Some(schema.into());
        self
    }

    /// The content type of the body the layer's [`reject_with`](IdempotencyLayer::reject_with)
    /// hook sends, such as `application/vnd.api+json`. Default: `application/json`. Not used
    /// without a hook (the layer then sends `application/problem+json`).
    pub fn rejection_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.rejection_content_type = Some(content_type.into());
        self
    }

    /// How the rejections are documented, or why they cannot be.
    fn rejection_body(&self) -> Result<RejectionBody, OpenApiError> {
        if self.config.reject.hook.is_none() {
            return Ok(RejectionBody::problem());
        }
        let schema = self
            .rejection_schema
            .clone()
            .ok_or(OpenApiError::UndescribedRejection)?;
        Ok(RejectionBody {
            content_type: self
                .rejection_content_type
                .clone()
                .unwrap_or_else(|| "application/json".to_owned()),
            schema,
        })
    }

    /// Adds the layer's parts to `openapi` (see the [module docs](self) for what and where).
    ///
    /// # Errors
    /// [`OpenApiError`] when a covered route has no operation in the document, or a covered
    /// operation's response refers to a component that is not there; the document is then
    /// left as it was.
    pub fn apply(&self, openapi: &mut OpenApi) -> Result<(), OpenApiError> {
        let body = self.rejection_body()?;
        let mut doc = openapi.clone();
        let targets: Vec<(Method, String)> = match &self.config.routes {
            Some(routes) => routes
                .templates()
                .into_iter()
                .map(|(method, template)| (method, openapi_path(&template)))
                .collect(),
            None => doc
                .paths
                .paths
                .iter()
                .filter(|(_, item)| item.post.is_some())
                .map(|(path, _)| (Method::POST, path.clone()))
                .collect(),
        };
        let components = doc.components.get_or_insert_with(Components::new);
        add_components(&self.config, components);
        let known = components.responses.clone();
        for (method, path) in targets {
            let operation = doc
                .paths
                .paths
                .get_mut(&path)
                .and_then(|item| operation_mut(item, &method))
                .ok_or_else(|| OpenApiError::MissingOperation {
                    method: method.clone(),
                    path: path.clone(),
                })?;
            for (status, response) in &mut operation.responses.responses {
                let RefOr::Ref(reference) = response else {
                    continue;
                };
                let name = reference
                    .ref_location
                    .strip_prefix("#/components/responses/");
                match name.and_then(|name| known.get(name)) {
                    Some(RefOr::T(resolved)) => *response = RefOr::T(resolved.clone()),
                    _ => {
                        return Err(OpenApiError::UnresolvedResponse {
                            method,
                            path,
                            status: status.clone(),
                            reference: reference.ref_location.clone(),
                        });
                    }
                }
            }
            self.describe(operation, &body);
        }
        *openapi = doc;
        Ok(())
    }

    /// Adds the layer's parts to one covered operation whose responses are all inline.
    fn describe(&self, operation: &mut Operation, body: &RejectionBody) {
        for (status, response) in &mut operation.responses.responses {
            let RefOr::T(response) = response else {
                continue;
            };
            if self.may_be_replayed(status) && !only_problem(response, body) {
                header_ref(response, "Idempotent-Replayed", REPLAYED_HEADER_COMPONENT);
                if self.config.store_failure == StoreFailure::FailOpen {
                    header_ref(
                        response,
                        "Idempotency-Unprotected",
                        UNPROTECTED_HEADER_COMPONENT,
                    );
                }
            }
        }
        for Documented {
            response: problem,
            examples,
        } in rendered(&self.config)
        {
            let response = operation
                .responses
                .responses
                .entry(problem.status.as_str().to_owned())
                .or_insert_with(|| RefOr::T(Response::new(problem.description.clone())));
            let RefOr::T(response) = response else {
                continue; // resolved above
            };
            add_problem(response, &problem, &examples, body);
        }
        let parameters = operation.parameters.get_or_insert_with(Vec::new);
        for name in &self.config.headers {
            let shown = display_name(name);
            let reference = format!("#/components/parameters/{KEY_PARAMETER_PREFIX}{shown}");
            let present = parameters.iter().any(|parameter| match parameter {
                RefOr::T(p) => {
                    p.parameter_in == ParameterIn::Header && p.name.eq_ignore_ascii_case(&shown)
                }
                RefOr::Ref(r) => r.ref_location == reference,
            });
            if !present {
                parameters.push(RefOr::Ref(Ref::new(reference)));
            }
        }
    }

    /// Whether a response under `status` (`201`, `2XX`, `default`) can be a replay: whether
    /// the status policy stores any final status it stands for.
    fn may_be_replayed(&self, status: &str) -> bool {
        let stored = |code: u16| {
            code >= 200
                && StatusCode::from_u16(code)
                    .is_ok_and(|status| (self.config.status_policy)(status))
        };
        match status.as_bytes() {
            [class @ b'1'..=b'5', b'X' | b'x', b'X' | b'x'] => {
                let base = u16::from(class - b'0') * 100;
                (base..base + 100).any(stored)
            }
            b"default" => (200..600).any(stored),
            _ => status.parse().is_ok_and(stored),
        }
    }
}

impl Modify for IdempotencyOpenApi {
    /// [`apply`](IdempotencyOpenApi::apply); on an error, logs it as a warning and leaves the
    /// document as it was. Call `apply` to handle the error yourself.
    fn modify(&self, openapi: &mut OpenApi) {
        if let Err(error) = self.apply(openapi) {
            tracing::warn!(target: "tower_idempotency", %error, "OpenAPI document not changed");
        }
    }
}

/// An axum route template as an OpenAPI path: `{*rest}` becomes `{rest}`.
fn openapi_path(template: &str) -> String {
    template.replace("{*", "{")
}

/// The operation of `item` for `method`, if the document has one.
fn operation_mut<'a>(item: &'a mut PathItem, method: &Method) -> Option<&'a mut Operation> {
    match *method {
        Method::GET => item.get.as_mut(),
        Method::POST => item.post.as_mut(),
        Method::PUT => item.put.as_mut(),
        Method::DELETE => item.delete.as_mut(),
        Method::PATCH => item.patch.as_mut(),
        Method::OPTIONS => item.options.as_mut(),
        Method::HEAD => item.head.as_mut(),
        Method::TRACE => item.trace.as_mut(),
        _ if method.as_str() == "QUERY" => item.query.as_mut(),
        _ => item.additional_operations.get_mut(method.as_str()),
    }
}
