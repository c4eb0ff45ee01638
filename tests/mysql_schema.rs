//! `MySqlStore`'s table, against a real MariaDB (or MySQL): `migrate` is idempotent, safe to run
//! from several instances at once, and waits for the migration lock another session holds; and
//! table names must be plain identifiers.
//!
//! Needs `MYSQL_URL` (for example `mysql://root@127.0.0.1:3306/test`). Without it the tests print
//! that they are skipped and pass, except under `CI=true`, where a missing URL or an unreachable
//! server fails them. Every test works in a table of its own, with a random name, dropped at
//! the end, so tests and runs never collide.
#![cfg(all(feature = "mysql", feature = "testing"))]

mod common;

use std::{panic::AssertUnwindSafe, time::Duration};

use common::{
    conformance::{
        LONG, acquire, binary_response, expect_completed, random_fingerprint, random_key,
    },
    mysql::{drop_table, pool, unique_table},
};
use futures_util::FutureExt;
use sqlx::MySqlPool;
use tower_idempotency::{IdempotencyStore, store::MySqlStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    let Some(pool) = pool().await else { return };
    let store = MySqlStore::new(pool.clone())
        .with_table_name(&unique_table())
        .unwrap();
    let outcome = AssertUnwindSafe(async {
        // Several instances starting at once, each migrating the same new table.
        let runs: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.migrate().await })
            })
            .collect();
        for run in runs {
            run.await.unwrap().expect("concurrent migrate");
        }
        let key = random_key();
        let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
        assert!(
            store
                .complete(&key, token, &binary_response(), LONG)
                .await
                .unwrap()
        );
        // Once more on an existing table with data: nothing changes.
        store.migrate().await.expect("second migrate");
        store.migrate().await.expect("third migrate");
        assert_eq!(expect_completed(&store, &key).await.1, binary_response());
        let index: Option<String> = sqlx::query_scalar(
            "SELECT index_name FROM information_schema.statistics
             WHERE table_schema = DATABASE() AND table_name = ? AND column_name = 'expires_at'",
        )
        .bind(store.table_name())
        .fetch_optional(&pool)
        .await
        .unwrap();
        assert_eq!(
            index,
            Some(format!("{}_expires_at_idx", store.table_name()))
        );
        let engine: String = sqlx::query_scalar(
            "SELECT engine FROM information_schema.tables
             WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(store.table_name())
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(engine, "InnoDB");
        // The migration lock was released: another session can take it at once.
        let free: Option<i64> = sqlx::query_scalar(
            "SELECT IS_FREE_LOCK(CONCAT('tower_idempotency:', MD5(CONCAT_WS('.', DATABASE(), ?))))",
        )
        .bind(store.table_name())
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(free, Some(1));
    })
    .catch_unwind()
    .await;
    drop_table(&pool, store.table_name()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// While another session holds the migration lock, `migrate` waits for it rather than
/// creating the table beside a concurrent migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_waits_for_the_migration_lock() {
    let Some(pool) = pool().await else { return };
    let store = MySqlStore::new(pool.clone())
        .with_table_name(&unique_table())
        .unwrap();
    let outcome = AssertUnwindSafe(async {
        let mut holder = pool.acquire().await.unwrap();
        let granted: Option<i64> = sqlx::query_scalar(
            "SELECT GET_LOCK(CONCAT('tower_idempotency:', MD5(CONCAT_WS('.', DATABASE(), ?))), 5)",
        )
        .bind(store.table_name())
        .fetch_one(&mut *holder)
        .await
        .unwrap();
        assert_eq!(granted, Some(1));
        let migrate = tokio::spawn({
            let store = store.clone();
            async move { store.migrate().await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!migrate.is_finished(), "migrate did not wait for the lock");
        let exists: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables
             WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(store.table_name())
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(exists, 0, "the table was created under another's lock");
        sqlx::query(
            "DO RELEASE_LOCK(CONCAT('tower_idempotency:', MD5(CONCAT_WS('.', DATABASE(), ?))))",
        )
        .bind(store.table_name())
        .execute(&mut *holder)
        .await
        .unwrap();
        migrate.await.unwrap().expect("migrate after the lock");
        acquire(&store, &random_key(), &random_fingerprint(), LONG).await;
    })
    .catch_unwind()
    .await;
    drop_table(&pool, store.table_name()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn table_names_must_be_plain_identifiers() {
    let pool = MySqlPool::connect_lazy("mysql://root@127.0.0.1:1/test").unwrap();
    let store = MySqlStore::new(pool);
    assert_eq!(store.table_name(), "idempotency_records");
    for bad in [
        "",
        "Records",
        "records; DROP TABLE users",
        "app.records",
        "9lives",
        "a`b",
    ] {
        let error = store.clone().with_table_name(bad).unwrap_err();
        assert!(error.to_string().contains("invalid table name"), "{error}");
    }
    assert_eq!(
        store.with_table_name("my_records").unwrap().table_name(),
        "my_records"
    );
}
