//! The API itself: organizations, resources and the handlers.

use std::{
    any::Any,
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{Path, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{MethodRouter, get, post},
};
use serde_json::{Map, Value, json};
use tower_idempotency::Lease;
use uuid::Uuid;

use super::resources::{Resources, Unavailable};

/// The organization of a request: its API key. Put in the request extensions by [`auth`] and
/// read by the idempotency layer's [`ExtensionScope`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrgId(pub String);

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The kinds of resource, one per collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Agent,
    Call,
    BatchCall,
    Tool,
    KnowledgeBase,
    Voice,
}

impl Kind {
    /// The collection's path segment.
    pub(crate) fn collection(self) -> &'static str {
        match self {
            Kind::Agent => "agents",
            Kind::Call => "calls",
            Kind::BatchCall => "batch-calls",
            Kind::Tool => "tools",
            Kind::KnowledgeBase => "knowledge-bases",
            Kind::Voice => "voices",
        }
    }

    /// The `object` field of a resource.
    pub(crate) fn object(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::Call | Kind::BatchCall => "call",
            Kind::Tool => "tool",
            Kind::KnowledgeBase => "knowledge_base",
            Kind::Voice => "voice",
        }
    }

    /// Whether creates of this kind go through the idempotency layer.
    pub(crate) fn idempotent(self) -> bool {
        matches!(
            self,
            Kind::Agent | Kind::Call | Kind::BatchCall | Kind::Tool
        )
    }
}

pub(crate) const KINDS: [Kind; 6] = [
    Kind::Agent,
    Kind::Call,
    Kind::BatchCall,
    Kind::Tool,
    Kind::KnowledgeBase,
    Kind::Voice,
];

/// The API's state: the resources, and the create-handler runs of this process by
/// organization.
#[derive(Clone, Default)]
pub(crate) struct AppState {
    pub(crate) resources: Resources,
    pub(crate) handler_calls: Arc<Mutex<HashMap<OrgId, u64>>>,
    pub(crate) handler_delay: Duration,
    pub(crate) after_commit_delay: Duration,
}

impl AppState {
    /// Saves what a create made and answers `response` (on PostgreSQL, exactly the stored
    /// response), after `--after-commit-delay-ms`.
    async fn save(
        &self,
        org: &OrgId,
        collection: &'static str,
        items: &[Value],
        lease: Option<Lease>,
        response: Response,
    ) -> Response {
        let saved = self
            .resources
            .create(org, collection, items, lease.as_ref(), response)
            .await;
        if !self.after_commit_delay.is_zero() {
            tokio::time::sleep(self.after_commit_delay).await;
        }
        saved.unwrap_or_else(|Unavailable(why)| unavailable(why))
    }
}

/// 503 for a database that failed.
fn unavailable(why: String) -> Response {
    tracing::warn!(target: "seed_api", %why, "database failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the database failed; nothing was created, retry later",
    )
}

/// The routes, without layers.
pub(crate) fn routes() -> Router<AppState> {
    let mut router = Router::new().route("/stats", get(stats));
    for kind in KINDS {
        let collection = kind.collection();
        router = router.route(&format!("/{collection}"), collection_routes(kind));
        if kind != Kind::BatchCall {
            router = router.route(
                &format!("/{collection}/{{id}}"),
                get(
                    move |state: State<AppState>, org: Extension<OrgId>, id: Path<String>| {
                        show(state, org, id, kind)
                    },
                ),
            );
        }
    }
    router.fallback(not_found)
}

pub(crate) fn collection_routes(kind: Kind) -> MethodRouter<AppState> {
    post(
        move |state: State<AppState>, org: Extension<OrgId>, lease: Option<Lease>, body: Bytes| {
            create(state, org, lease, body, kind)
        },
    )
    .get(move |state: State<AppState>, org: Extension<OrgId>| list(state, org, kind))
}

/// A JSON error: `{"error": {"type": ..., "message": ...}}`.
pub(crate) fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "type": kind, "message": message.into() } });
    (status, Json(body)).into_response()
}

/// `Authorization: Bearer <api key>`; the API key is the organization.
pub(crate) async fn auth(mut req: Request, next: Next) -> Response {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let key = match (values.next(), values.next()) {
        (Some(value), None) => value
            .to_str()
            .ok()
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|key| !key.is_empty() && !key.contains(char::is_whitespace)),
        _ => None,
    };
    let Some(key) = key else {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send your API key as `Authorization: Bearer <api key>`",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    };
    let org = OrgId(key.to_owned());
    req.extensions_mut().insert(org);
    next.run(req).await
}

pub(crate) fn panic_response(_panic: Box<dyn Any + Send + 'static>) -> Response {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the server failed while handling the request; it is safe to retry",
    )
}

pub(crate) async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A new resource: the request's fields plus `id`, `object` and `created_at`.
fn resource(kind: Kind, fields: Map<String, Value>) -> Value {
    let mut data = Map::new();
    data.insert("id".into(), Uuid::new_v4().to_string().into());
    data.insert("object".into(), kind.object().into());
    for (name, value) in fields {
        if !matches!(name.as_str(), "id" | "object" | "created_at") {
            data.insert(name, value);
        }
    }
    data.insert("created_at".into(), now_unix().into());
    Value::Object(data)
}

async fn create(
    State(state): State<AppState>,
    Extension(org): Extension<OrgId>,
    lease: Option<Lease>,
    body: Bytes,
    kind: Kind,
) -> Response {
    // Every run counts, whatever it answers.
    *state
        .handler_calls
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(org.clone())
        .or_default() += 1;
    if !state.handler_delay.is_zero() {
        tokio::time::sleep(state.handler_delay).await;
    }

    let fields = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "the body must be a JSON object",
            );
        }
        Err(err) => {
            let message = format!("the body is not valid JSON: {err}");
            return error(StatusCode::BAD_REQUEST, "invalid_json", message);
        }
    };
    if fields.get("simulate_panic") == Some(&Value::Bool(true)) {
        panic!("simulated panic in POST /{}", kind.collection());
    }
    if let Some(simulated) = fields.get("simulate_status") {
        let status = simulated
            .as_u64()
            .and_then(|code| u16::try_from(code).ok())
            .and_then(|code| StatusCode::from_u16(code).ok());
        let Some(status) = status else {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "simulate_status must be an HTTP status code (100 to 999)",
            );
        };
        let message = format!("simulated status {}", status.as_u16());
        return error(status, "simulated", message);
    }

    if kind == Kind::BatchCall {
        let Some(Value::Array(calls)) = fields.get("calls") else {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "a batch is `{\"calls\": [{...}, ...]}`",
            );
        };
        let mut created = Vec::with_capacity(calls.len());
        for call in calls {
            let Value::Object(call) = call else {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    "every entry of `calls` must be a JSON object",
                );
            };
            created.push(resource(Kind::Call, call.clone()));
        }
        let response = (StatusCode::CREATED, Json(json!({ "data": created }))).into_response();
        return state
            .save(&org, Kind::Call.collection(), &created, lease, response)
            .await;
    }

    let data = resource(kind, fields);
    let location = format!(
        "/{}/{}",
        kind.collection(),
        data["id"].as_str().unwrap_or("")
    );
    let response = (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(json!({ "data": data })),
    )
        .into_response();
    state
        .save(&org, kind.collection(), &[data], lease, response)
        .await
}

async fn list(
    State(state): State<AppState>,
    Extension(org): Extension<OrgId>,
    kind: Kind,
) -> Response {
    match state.resources.list(&org, kind.collection()).await {
        Ok(data) => Json(json!({ "data": data })).into_response(),
        Err(Unavailable(why)) => unavailable(why),
    }
}

async fn show(
    State(state): State<AppState>,
    Extension(org): Extension<OrgId>,
    Path(id): Path<String>,
    kind: Kind,
) -> Response {
    match state.resources.find(&org, kind.collection(), &id).await {
        Err(Unavailable(why)) => unavailable(why),
        Ok(Some(data)) => Json(json!({ "data": data })).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {} with id {id}", kind.object()),
        ),
    }
}

async fn stats(State(state): State<AppState>, Extension(org): Extension<OrgId>) -> Response {
    let handler_calls = state
        .handler_calls
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&org)
        .copied()
        .unwrap_or(0);
    Json(json!({ "handler_calls": handler_calls })).into_response()
}
