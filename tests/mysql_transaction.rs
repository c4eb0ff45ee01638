//! Completion inside the handler's own MySQL/MariaDB transaction: the idempotency record and the
//! handler's writes commit together, and the lease token fences them.
//!
//! Needs `MYSQL_URL`; skipped without it, except under `CI=true`. Each test works in tables
//! of its own (random names, dropped at the end).
#![cfg(feature = "mysql")]

mod common;
mod support;

use std::time::Duration;

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use sqlx::{AssertSqlSafe, MySqlPool, mysql::MySqlPoolOptions};
use tower_idempotency::{
    IdempotencyLayer, Lease,
    store::{Begin, Fingerprint, IdempotencyStore, MySqlStore, TransactionalError},
};

use support::{request, send};

struct Db {
    pool: MySqlPool,
    store: MySqlStore,
    payments: String,
}

impl Db {
    async fn new() -> Option<Self> {
        let url = common::service_url("MYSQL_URL", "this MySQL test")?;
        let pool = MySqlPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("MySQL at MYSQL_URL is unreachable: {e}"));
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..16];
        let store = MySqlStore::new(pool.clone())
            .with_table_name(&format!("idem_tx_{suffix}"))
            .unwrap();
        store.migrate().await.unwrap();
        let payments = format!("payments_{suffix}");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE {payments} (id bigint AUTO_INCREMENT PRIMARY KEY, body text NOT NULL) ENGINE=InnoDB"
        )))
        .execute(&pool)
        .await
        .unwrap();
        Some(Self {
            pool,
            store,
            payments,
        })
    }

    async fn payments(&self) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            self.payments
        )))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    async fn drop_tables(self) {
        for table in [self.payments.as_str(), self.store.table_name()] {
            sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
                .execute(&self.pool)
                .await
                .unwrap();
        }
    }
}

#[derive(Clone)]
struct AppState {
    store: MySqlStore,
    payments: String,
    /// Take the lease over from under the handler before it completes.
    steal_lease: bool,
}

/// Inserts a payment and completes the record in the same transaction.
async fn create_payment(
    State(state): State<AppState>,
    lease: Lease,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let mut tx = state.store.pool().begin().await.unwrap();
    let id = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (body) VALUES (?)",
        state.payments
    )))
    .bind(body.to_string())
    .execute(&mut *tx)
    .await
    .unwrap()
    .last_insert_id();
    if state.steal_lease {
        // The lease expired while the handler ran and another request took the key over.
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND WHERE `key` = ?",
            state.store.table_name()
        )))
        .bind(&lease.store_key().0[..])
        .execute(&state.store.pool().clone())
        .await
        .unwrap();
        let taken = state
            .store
            .begin(
                &lease.store_key(),
                &Fingerprint([7; 32]),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert!(matches!(taken, Begin::Acquired(_)), "{taken:?}");
    }
    let response = (
        StatusCode::CREATED,
        Json(serde_json::json!({ "payment": id })),
    );
    state
        .store
        .complete_in_transaction(tx, &lease, response)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

fn app(db: &Db, steal_lease: bool) -> Router {
    Router::new()
        .route("/payments", post(create_payment))
        .with_state(AppState {
            store: db.store.clone(),
            payments: db.payments.clone(),
            steal_lease,
        })
        .layer(
            IdempotencyLayer::new()
                .post("/payments")
                .store(db.store.clone()),
        )
}

#[tokio::test]
async fn the_record_and_the_business_rows_commit_together() {
    let Some(db) = Db::new().await else { return };
    let app = app(&db, false);

    let first = send(
        &app,
        request("/payments", Some("pay-1"), r#"{"cents":500}"#),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(!first.replayed());
    assert_eq!(db.payments().await, 1);

    let retry = send(
        &app,
        request("/payments", Some("pay-1"), r#"{"cents":500}"#),
    )
    .await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(
        first.header("content-length"),
        retry.header("content-length")
    );
    assert_eq!(db.payments().await, 1, "the handler did not run again");
    db.drop_tables().await;
}

#[tokio::test]
async fn both_roll_back_when_the_token_has_lost_the_lease() {
    let Some(db) = Db::new().await else { return };
    support::capture_trace();
    let app = app(&db, true);

    let fenced = send(
        &app,
        request("/payments", Some("pay-2"), r#"{"cents":700}"#),
    )
    .await;
    fenced.assert_problem(StatusCode::CONFLICT, "in-flight");
    assert_eq!(db.payments().await, 0, "the payment rolled back");
    // The record belongs to the request that took it over: still in flight, not completed
    // with the fenced owner's response.
    let found = db
        .store
        .begin(
            &support::record_key(support::ORG_A, "/payments", "pay-2", r#"{"cents":700}"#).0,
            &Fingerprint([7; 32]),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(matches!(found, Begin::InFlight { .. }), "{found:?}");
    // The record is there, held by another token: fencing at work, not a misconfiguration.
    let trace = support::take_trace();
    assert!(
        !trace.contains("has no idempotency record in this table"),
        "{trace}"
    );
    db.drop_tables().await;
}

/// The handler completes in a MySqlStore the layer does not use (the layer kept its default
/// MemoryStore): every request is refused, and that must be loud, not stored. The 409 is not
/// replayed to the retry, and the log line names the mistake and the table.
#[tokio::test]
async fn a_store_the_layer_does_not_use_is_told_and_its_refusal_not_stored() {
    let Some(db) = Db::new().await else { return };
    support::capture_trace();
    let app = Router::new()
        .route("/payments", post(create_payment))
        .with_state(AppState {
            store: db.store.clone(),
            payments: db.payments.clone(),
            steal_lease: false,
        })
        // No `.store(..)`: the layer's records are in memory, not in the handler's table.
        .layer(IdempotencyLayer::new().post("/payments"));
    let first = send(&app, request("/payments", Some("pay-3"), r#"{"cents":1}"#)).await;
    first.assert_problem(StatusCode::CONFLICT, "in-flight");
    let retry = send(&app, request("/payments", Some("pay-3"), r#"{"cents":1}"#)).await;
    assert!(!retry.replayed(), "the refusal was stored and replayed");
    assert_eq!(db.payments().await, 0);
    let trace = support::take_trace();
    let line = trace
        .lines()
        .find(|line| line.contains("has no idempotency record in this table"))
        .unwrap_or_else(|| panic!("{trace}"));
    assert!(line.contains(db.store.table_name()), "{line}");
    db.drop_tables().await;
}

#[test]
fn lease_lost_answers_409_in_flight() {
    let response = TransactionalError::LeaseLost.into_response();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(response.headers()["retry-after"], "1");
}
