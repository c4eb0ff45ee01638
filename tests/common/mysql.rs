//! MariaDB (or MySQL) at `MYSQL_URL` for the tests of `MySqlStore` (`tests/mysql_store.rs`,
//! `mysql_contention.rs`, `mysql_schema.rs`, `mysql_complete_in.rs`, `mysql_over_http.rs`):
//! pools, a migrated store in a table of the test's own (random name, dropped at the end), and
//! statements on that table.

use std::{future::Future, panic::AssertUnwindSafe, time::Duration};

use futures_util::FutureExt;
use sqlx::{AssertSqlSafe, MySqlPool, mysql::MySqlPoolOptions};
use tower_idempotency::store::MySqlStore;

/// The upper bound on any wait in these tests; past it the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// `MYSQL_URL`, or `None` (after saying that `test` is skipped) when it is unset outside CI.
pub fn mysql_url(test: &str) -> Option<String> {
    super::service_url("MYSQL_URL", test)
}

pub async fn pool_on(url: &str, max_connections: u32) -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("MariaDB at MYSQL_URL is unreachable: {e}"))
}

/// A pool on `MYSQL_URL`, or `None` (after saying so) when the variable is unset outside CI.
pub async fn pool() -> Option<MySqlPool> {
    let url = mysql_url("this MySQL test")?;
    Some(pool_on(&url, 12).await)
}

/// A table name of this test's own.
pub fn unique_table() -> String {
    format!(
        "idem_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    )
}

/// Runs `test` on a migrated store in a fresh table, then drops the table, also when `test`
/// panics.
pub async fn with_store<F, Fut>(test: F)
where
    F: FnOnce(MySqlStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(pool) = pool().await else { return };
    let store = MySqlStore::new(pool.clone())
        .with_table_name(&unique_table())
        .expect("a valid table name");
    store.migrate().await.expect("migrate");
    let outcome = AssertUnwindSafe(test(store.clone())).catch_unwind().await;
    drop_table(&pool, store.table_name()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

pub async fn drop_table(pool: &MySqlPool, table: &str) {
    sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS `{table}`")))
        .execute(pool)
        .await
        .expect("drop the test table");
}

/// `statement` with `{t}` standing for the store's quoted table name.
pub fn on_table(store: &MySqlStore, statement: &str) -> String {
    statement.replace("{t}", &format!("`{}`", store.table_name()))
}
