//! Where the API keeps its resources: in this process's memory, or in PostgreSQL tables shared
//! by every instance, each create committed together with its idempotency record.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use axum::{body::Body, http::StatusCode, response::Response};
use serde_json::Value;
use tower_idempotency::{CaptureError, Lease};

use super::api::{OrgId, error};

/// 500 for an answer the idempotency layer could not store: nothing was created.
fn unstorable(why: &CaptureError) -> Response {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "response_unstorable",
        format!("the answer cannot be stored for retries ({why}); nothing was created"),
    )
}

/// Resources in memory, by organization and collection, in creation order.
type InMemory = Arc<Mutex<HashMap<(OrgId, &'static str), Vec<Value>>>>;

/// The resources of every organization, by collection, in creation order.
#[derive(Clone)]
pub enum Resources {
    /// In this process (`--store memory` and `--store redis`): each instance has its own.
    Memory(InMemory),
    /// In PostgreSQL (`--store postgres`): one table shared by every instance.
    #[cfg(feature = "postgres")]
    Postgres(postgres::Db),
}

impl Default for Resources {
    fn default() -> Self {
        Resources::Memory(Arc::default())
    }
}

/// Why a database read or write failed, for a 503.
pub struct Unavailable(pub String);

impl Resources {
    /// Saves `items` in `collection` and returns `response`, the handler's answer. On
    /// PostgreSQL the rows and, when the request holds a `lease`, its idempotency record commit
    /// in one transaction, and what is returned is exactly the stored response.
    pub async fn create(
        &self,
        org: &OrgId,
        collection: &'static str,
        items: &[Value],
        lease: Option<&Lease>,
        response: Response,
    ) -> Result<Response, Unavailable> {
        match self {
            Resources::Memory(orgs) => {
                // The layer stores the answer after the handler; one it cannot store (over its
                // response cap) would leave the key free, and the retry would create it all
                // again. So the answer is taken as the layer will store it first, and nothing
                // is created when it cannot be, as on PostgreSQL.
                let response = match lease {
                    Some(lease) => match lease.capture(response).await {
                        Ok(stored) => {
                            let mut response = Response::new(Body::from(stored.body));
                            *response.status_mut() = stored.status;
                            *response.headers_mut() = stored.headers;
                            response
                        }
                        Err(why) => return Ok(unstorable(&why)),
                    },
                    None => response,
                };
                let mut orgs = orgs.lock().unwrap_or_else(PoisonError::into_inner);
                let list = orgs.entry((org.clone(), collection)).or_default();
                list.extend(items.iter().cloned());
                Ok(response)
            }
            #[cfg(feature = "postgres")]
            Resources::Postgres(db) => db.create(org, collection, items, lease, response).await,
        }
    }

    /// Every resource of `org` in `collection`, oldest first.
    pub async fn list(&self, org: &OrgId, collection: &str) -> Result<Vec<Value>, Unavailable> {
        match self {
            Resources::Memory(orgs) => {
                let orgs = orgs.lock().unwrap_or_else(PoisonError::into_inner);
                Ok(orgs
                    .iter()
                    .find(|((o, c), _)| o == org && *c == collection)
                    .map(|(_, list)| list.clone())
                    .unwrap_or_default())
            }
            #[cfg(feature = "postgres")]
            Resources::Postgres(db) => db.list(org, collection).await,
        }
    }

    /// The resource `id` of `org` in `collection`.
    pub async fn find(
        &self,
        org: &OrgId,
        collection: &str,
        id: &str,
    ) -> Result<Option<Value>, Unavailable> {
        Ok(self
            .list(org, collection)
            .await?
            .into_iter()
            .find(|item| item["id"] == id))
    }
}

#[cfg(feature = "postgres")]
pub(crate) mod postgres {
    //! The resources in PostgreSQL.

    use axum::response::{IntoResponse, Response};
    use serde_json::Value;
    use tower_idempotency::{Lease, store::PostgresStore};

    use super::{super::api::OrgId, Unavailable};

    /// The table, created on start (safe with several instances starting at once).
    const CREATE: &str = "CREATE TABLE IF NOT EXISTS seed_api_resources (
        seq        bigserial PRIMARY KEY,
        org        text NOT NULL,
        collection text NOT NULL,
        id         text NOT NULL UNIQUE,
        data       json NOT NULL
    )";

    /// The resources' table, on the idempotency store's pool.
    #[derive(Clone)]
    pub struct Db {
        store: PostgresStore,
    }

    fn unavailable(error: impl std::fmt::Display) -> Unavailable {
        Unavailable(error.to_string())
    }

    impl Db {
        /// Creates the table if it does not exist.
        pub async fn open(store: PostgresStore) -> Result<Self, String> {
            let mut tx = store.pool().begin().await.map_err(|e| e.to_string())?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('seed_api.resources'))")
                .execute(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
            sqlx::query(CREATE)
                .execute(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
            tx.commit().await.map_err(|e| e.to_string())?;
            Ok(Self { store })
        }

        pub(super) async fn create(
            &self,
            org: &OrgId,
            collection: &'static str,
            items: &[Value],
            lease: Option<&Lease>,
            response: Response,
        ) -> Result<Response, Unavailable> {
            let mut tx = self.store.pool().begin().await.map_err(unavailable)?;
            for item in items {
                sqlx::query(
                    "INSERT INTO seed_api_resources (org, collection, id, data) \
                     VALUES ($1, $2, $3, $4::json)",
                )
                .bind(&org.0)
                .bind(collection)
                .bind(item["id"].as_str().unwrap_or_default())
                .bind(item.to_string())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            }
            match lease {
                // The rows and the idempotency record commit together; a lost lease rolls
                // both back (a 409 then tells the client to retry and get the other run's
                // response).
                Some(lease) => Ok(self
                    .store
                    .complete_in_transaction(tx, lease, response)
                    .await
                    .unwrap_or_else(IntoResponse::into_response)),
                None => {
                    tx.commit().await.map_err(unavailable)?;
                    Ok(response)
                }
            }
        }

        pub(super) async fn list(
            &self,
            org: &OrgId,
            collection: &str,
        ) -> Result<Vec<Value>, Unavailable> {
            let rows: Vec<String> = sqlx::query_scalar(
                "SELECT data::text FROM seed_api_resources \
                 WHERE org = $1 AND collection = $2 ORDER BY seq",
            )
            .bind(&org.0)
            .bind(collection)
            .fetch_all(self.store.pool())
            .await
            .map_err(unavailable)?;
            rows.iter()
                .map(|row| serde_json::from_str(row).map_err(unavailable))
                .collect()
        }
    }
}
