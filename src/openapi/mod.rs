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
//! | 400, 409, 503, and 422 with [`KeyReuse::Reject`](crate::KeyReuse::Reject) | responses with `application/problem+json` content, schema `$ref` to `components/schemas/IdempotencyProblem`, one example per kind; 409 and 503 with `Retry-After` (`components/headers/RetryAfter`, integer seconds, at least 1) | RFC 9457: `type` (a `tag:` URI), `title`, `status`, `detail`, all four always present |
//!
//! A status the operation already documents keeps its content: the problem content is added
//! beside it (and when it has `application/problem+json` content of its own, the schema
//! becomes `anyOf` both). A response given as a `$ref` to `components/responses` is copied
//! into the operation first. Applying twice changes nothing the second time. The 401, 413 and
//! 500 rejections of the [problem table](crate::problem) are not added: the application's own
//! authentication, body limit and errors usually document those statuses.
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
        Components, OpenApi, PathItem, RefOr, Response,
        path::{Operation, ParameterIn},
        schema::Ref,
    },
};

pub use self::parts::{
    KEY_PARAMETER_PREFIX, KEY_PATTERN, PROBLEM_SCHEMA, REPLAYED_HEADER_COMPONENT,
    RETRY_AFTER_COMPONENT, UNPROTECTED_HEADER_COMPONENT,
};
use self::parts::{add_components, add_problem, display_name, header_ref, only_problem, problems};
use crate::{IdempotencyLayer, StoreFailure, config::Config};

/// What a layer adds to an OpenAPI document: made by [`IdempotencyLayer::openapi`], applied
/// with [`apply`](Self::apply) or as a utoipa [`Modify`]. See the [module docs](self).
#[derive(Clone)]
pub struct IdempotencyOpenApi {
    config: Arc<Config>,
}

impl fmt::Debug for IdempotencyOpenApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyOpenApi")
            .field(
                "routes",
                &self.config.routes.as_ref().map(|r| r.templates()),
            )
            .field("headers", &self.config.headers)
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
        }
    }
}

impl IdempotencyOpenApi {
    /// Adds the layer's parts to `openapi` (see the [module docs](self) for what and where).
    ///
    /// # Errors
    /// [`OpenApiError`] when a covered route has no operation in the document, or a covered
    /// operation's response refers to a component that is not there; the document is then
    /// left as it was.
    pub fn apply(&self, openapi: &mut OpenApi) -> Result<(), OpenApiError> {
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
            self.describe(operation);
        }
        *openapi = doc;
        Ok(())
    }

    /// Adds the layer's parts to one covered operation whose responses are all inline.
    fn describe(&self, operation: &mut Operation) {
        for (status, response) in &mut operation.responses.responses {
            let RefOr::T(response) = response else {
                continue;
            };
            if self.may_be_replayed(status) && !only_problem(response) {
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
        for problem in problems(&self.config) {
            let response = operation
                .responses
                .responses
                .entry(problem.status.as_str().to_owned())
                .or_insert_with(|| RefOr::T(Response::new(problem.description.clone())));
            let RefOr::T(response) = response else {
                continue; // resolved above
            };
            add_problem(response, &problem);
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
