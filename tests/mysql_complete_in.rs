//! `MySqlStore::complete_in`, against a real MariaDB (or MySQL): the response is stored inside
//! the caller's transaction and commits or rolls back with the handler's writes; an owner that
//! lost its lease is refused there; and a takeover waits for an uncommitted completion and
//! replays it.
//!
//! Needs `MYSQL_URL` (for example `mysql://root@127.0.0.1:3306/test`). Without it the tests print
//! that they are skipped and pass, except under `CI=true`, where a missing URL or an unreachable
//! server fails them. Every test works in a table of its own, with a random name, dropped at
//! the end, so tests and runs never collide.
#![cfg(all(feature = "mysql", feature = "testing"))]

mod common;

use std::{future::Future, panic::AssertUnwindSafe, time::Duration};

use common::{
    conformance::{
        LONG, SHORT, acquire, expect_completed, expect_in_flight, marked_response,
        random_fingerprint, random_key,
    },
    mysql::{drop_table, with_store},
};
use futures_util::FutureExt;
use sqlx::AssertSqlSafe;
use tower_idempotency::{
    IdempotencyStore, Lease,
    store::{Begin, MySqlStore},
};

/// Runs `test` on a migrated store and a business table beside it (one row per created
/// resource), both dropped at the end.
async fn with_business_table<F, Fut>(test: F)
where
    F: FnOnce(MySqlStore, String) -> Fut,
    Fut: Future<Output = ()>,
{
    with_store(|store| async move {
        let table = format!("{}_calls", store.table_name());
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE `{table}` (id BINARY(16) PRIMARY KEY) ENGINE = InnoDB"
        )))
        .execute(store.pool())
        .await
        .unwrap();
        let outcome = AssertUnwindSafe(test(store.clone(), table.clone()))
            .catch_unwind()
            .await;
        drop_table(store.pool(), &table).await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    })
    .await;
}

async fn business_rows(store: &MySqlStore, table: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM `{table}`")))
        .fetch_one(store.pool())
        .await
        .unwrap()
}

async fn create_call(conn: &mut sqlx::MySqlConnection, table: &str) {
    sqlx::query(AssertSqlSafe(format!("INSERT INTO `{table}` VALUES (?)")))
        .bind(uuid::Uuid::new_v4().as_bytes().to_vec())
        .execute(conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_in_commits_the_response_with_the_handlers_writes() {
    with_business_table(|store, calls| async move {
        let key = random_key();
        let owner = random_fingerprint();
        let token = acquire(&store, &key, &owner, LONG).await;
        let mut tx = store.pool().begin().await.unwrap();
        create_call(&mut tx, &calls).await;
        let response = marked_response("in-tx");
        assert!(
            store
                .complete_in(&mut *tx, &Lease::new(key, token, LONG), &response)
                .await
                .unwrap()
        );
        // Until the commit, a duplicate sees the request in flight, at once.
        let seen = tokio::time::timeout(Duration::from_secs(10), expect_in_flight(&store, &key))
            .await
            .expect("a duplicate waited for the handler's transaction");
        assert_eq!(seen.0, owner);
        assert_eq!(business_rows(&store, &calls).await, 0);
        tx.commit().await.unwrap();
        let (fingerprint, stored) = expect_completed(&store, &key).await;
        assert_eq!(fingerprint, owner);
        assert_eq!(stored, response);
        assert_eq!(business_rows(&store, &calls).await, 1);
        assert!(
            !store
                .complete(&key, token, &marked_response("again"), LONG)
                .await
                .unwrap(),
            "the token owns nothing after the commit"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_in_rolled_back_leaves_the_lease_and_no_side_effect() {
    with_business_table(|store, calls| async move {
        let key = random_key();
        let owner = random_fingerprint();
        let token = acquire(&store, &key, &owner, LONG).await;
        let mut tx = store.pool().begin().await.unwrap();
        create_call(&mut tx, &calls).await;
        assert!(
            store
                .complete_in(
                    &mut *tx,
                    &Lease::new(key, token, LONG),
                    &marked_response("x")
                )
                .await
                .unwrap()
        );
        tx.rollback().await.unwrap();
        assert_eq!(business_rows(&store, &calls).await, 0);
        assert_eq!(expect_in_flight(&store, &key).await.0, owner);
        assert!(store.release(&key, token).await.unwrap(), "still the owner");
    })
    .await;
}

/// An owner whose lease was taken over finds out in its own transaction, and rolls its
/// writes back: the side effect happens once, by the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_in_fences_an_owner_that_lost_its_lease() {
    with_business_table(|store, calls| async move {
        let key = random_key();
        let old = acquire(&store, &key, &random_fingerprint(), SHORT).await;
        let mut tx = store.pool().begin().await.unwrap();
        create_call(&mut tx, &calls).await;
        // The old owner is slow; its lease runs out and another request takes the key.
        tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
        let new_fingerprint = random_fingerprint();
        let new = acquire(&store, &key, &new_fingerprint, LONG).await;
        assert!(
            !store
                .complete_in(
                    &mut *tx,
                    &Lease::new(key, old, LONG),
                    &marked_response("old")
                )
                .await
                .unwrap(),
            "a lost lease is refused inside the transaction"
        );
        tx.rollback().await.unwrap();
        assert_eq!(business_rows(&store, &calls).await, 0);
        assert_eq!(expect_in_flight(&store, &key).await.0, new_fingerprint);

        let mut tx = store.pool().begin().await.unwrap();
        create_call(&mut tx, &calls).await;
        assert!(
            store
                .complete_in(
                    &mut *tx,
                    &Lease::new(key, new, LONG),
                    &marked_response("new")
                )
                .await
                .unwrap()
        );
        tx.commit().await.unwrap();
        assert_eq!(business_rows(&store, &calls).await, 1);
        assert_eq!(
            expect_completed(&store, &key).await.1,
            marked_response("new")
        );
    })
    .await;
}

/// The lease runs out while the owner's transaction holds the completed record uncommitted:
/// a duplicate that tries to take the key over waits for that transaction, then finds the
/// response. It never runs the request a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_waits_for_an_uncommitted_completion_and_replays_it() {
    with_business_table(|store, calls| async move {
        let key = random_key();
        let owner = random_fingerprint();
        let token = acquire(&store, &key, &owner, SHORT).await;
        let mut tx = store.pool().begin().await.unwrap();
        create_call(&mut tx, &calls).await;
        let response = marked_response("owner");
        assert!(
            store
                .complete_in(&mut *tx, &Lease::new(key, token, LONG), &response)
                .await
                .unwrap()
        );
        tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
        // The committed row is a lapsed lease: the duplicate goes for a takeover.
        let duplicate = tokio::spawn({
            let store = store.clone();
            async move { store.begin(&key, &random_fingerprint(), LONG).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !duplicate.is_finished(),
            "the takeover did not wait for the owner's transaction"
        );
        tx.commit().await.unwrap();
        match duplicate.await.unwrap().expect("begin failed") {
            Begin::Completed {
                fingerprint,
                response: stored,
            } => {
                assert_eq!(fingerprint, owner);
                assert_eq!(stored, response);
            }
            other => panic!("expected the owner's response, got {other:?}"),
        }
        assert_eq!(business_rows(&store, &calls).await, 1);
    })
    .await;
}
