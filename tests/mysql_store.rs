//! `MySqlStore`: the store conformance suite against a real MariaDB (or MySQL), plus what only
//! this store has: expiry from stored timestamps on the server's clock whatever the session's
//! time zone, leases that lapse or are released, batched cleanup, undecodable records, an
//! unreachable database, and what `Debug` shows. Beside this file: `begin` under contention and
//! the locks it takes (`mysql_contention.rs`), migrations and table names (`mysql_schema.rs`),
//! completion inside the caller's transaction (`mysql_complete_in.rs`), and apps over HTTP, two
//! instances on one database and a server that crashes and comes back (`mysql_over_http.rs`).
//!
//! Needs `MYSQL_URL` (for example `mysql://root@127.0.0.1:3306/test`). Without it the tests print
//! that they are skipped and pass, except under `CI=true`, where a missing URL or an unreachable
//! server fails them. Every test works in a table of its own, with a random name, dropped at
//! the end, so tests and runs never collide.
#![cfg(all(feature = "mysql", feature = "testing"))]

mod common;

use std::time::Duration;

use common::{
    conformance::{
        self, LONG, SHORT, acquire, binary_response, expect_completed, expect_in_flight,
        marked_response, random_fingerprint, random_key,
    },
    mysql::{mysql_url, on_table, with_store},
};
use sqlx::{
    AssertSqlSafe, MySqlPool,
    mysql::{MySqlConnectOptions, MySqlPoolOptions},
};
use tower_idempotency::{
    IdempotencyStore,
    store::{LeaseToken, MySqlStore, StoreErrorKind, StoreKey},
};

/// Runs one statement on the store's table, with the key bound as the first `?`; returns the
/// number of rows matched.
async fn sql(store: &MySqlStore, statement: &str, key: &StoreKey) -> u64 {
    sqlx::query(AssertSqlSafe(on_table(store, statement)))
        .bind(&key.0[..])
        .execute(store.pool())
        .await
        .expect("test statement")
        .rows_affected()
}

async fn row_count(store: &MySqlStore) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(on_table(store, "SELECT count(*) FROM {t}")))
        .fetch_one(store.pool())
        .await
        .expect("count rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    with_store(conformance::run_all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_read_from_the_stored_timestamps() {
    with_store(|store| async move {
        // An in-flight lease whose stored deadline is moved into the past is taken over.
        let key = random_key();
        let old = acquire(&store, &key, &random_fingerprint(), LONG).await;
        let moved = sql(
            &store,
            "UPDATE {t} SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND WHERE `key` = ?",
            &key,
        )
        .await;
        assert_eq!(moved, 1);
        let new_fingerprint = random_fingerprint();
        let new = acquire(&store, &key, &new_fingerprint, LONG).await;
        assert!(
            !store
                .complete(&key, old, &marked_response("old"), LONG)
                .await
                .unwrap()
        );
        assert_eq!(expect_in_flight(&store, &key).await.0, new_fingerprint);

        // The time left comes from the stored deadline, on the database's clock.
        sql(
            &store,
            "UPDATE {t} SET expires_at = UTC_TIMESTAMP(6) + INTERVAL 1 HOUR WHERE `key` = ?",
            &key,
        )
        .await;
        let (_, remaining) = expect_in_flight(&store, &key).await;
        assert!(remaining > Duration::from_secs(59 * 60), "{remaining:?}");
        assert!(remaining <= Duration::from_secs(60 * 60), "{remaining:?}");

        // A completed response whose stored deadline has passed is never replayed.
        assert!(
            store
                .complete(&key, new, &binary_response(), LONG)
                .await
                .unwrap()
        );
        expect_completed(&store, &key).await;
        sql(
            &store,
            "UPDATE {t} SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND WHERE `key` = ?",
            &key,
        )
        .await;
        acquire(&store, &key, &random_fingerprint(), LONG).await;
    })
    .await;
}

/// Two instances whose sessions run in time zones 12 hours apart share leases and responses
/// as if they were one: deadlines are kept in UTC on the server's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_time_zone_does_not_move_deadlines() {
    with_store(|store| async move {
        let url = mysql_url("the_session_time_zone_does_not_move_deadlines").unwrap();
        let in_zone = |zone: &str| {
            let options: MySqlConnectOptions = url.parse().unwrap();
            let options = options.timezone(Some(zone.to_owned()));
            let table = store.table_name().to_owned();
            async move {
                let pool = MySqlPoolOptions::new()
                    .max_connections(2)
                    .connect_with(options)
                    .await
                    .unwrap();
                MySqlStore::new(pool).with_table_name(&table).unwrap()
            }
        };
        let (east, west) = (in_zone("+06:00").await, in_zone("-06:00").await);
        let key = random_key();
        let owner = random_fingerprint();
        let token = acquire(&east, &key, &owner, LONG).await;
        let (fingerprint, remaining) = expect_in_flight(&west, &key).await;
        assert_eq!(fingerprint, owner);
        assert!(
            remaining > LONG - Duration::from_secs(10) && remaining <= LONG,
            "{remaining:?}"
        );
        assert!(
            west.renew(&key, token, LONG).await.unwrap(),
            "the owner renews through the other instance"
        );
        // A response kept for SHORT expires after SHORT, wherever it is read.
        assert!(
            east.complete(&key, token, &binary_response(), SHORT)
                .await
                .unwrap()
        );
        expect_completed(&west, &key).await;
        tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
        acquire(&west, &key, &random_fingerprint(), LONG).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_may_complete_a_lapsed_lease_nobody_took_over() {
    with_store(|store| async move {
        let key = random_key();
        let owner = random_fingerprint();
        let token = acquire(&store, &key, &owner, Duration::ZERO).await;
        let response = marked_response("late");
        assert!(store.complete(&key, token, &response, LONG).await.unwrap());
        let (fingerprint, stored) = expect_completed(&store, &key).await;
        assert_eq!(fingerprint, owner);
        assert_eq!(stored, response);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_are_clamped_not_errors() {
    with_store(|store| async move {
        let key = random_key();
        let token = acquire(&store, &key, &random_fingerprint(), Duration::MAX).await;
        assert!(store.renew(&key, token, Duration::MAX).await.unwrap());
        assert!(
            store
                .complete(&key, token, &binary_response(), Duration::MAX)
                .await
                .unwrap()
        );
        expect_completed(&store, &key).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_ends_the_lease_in_place() {
    with_store(|store| async move {
        let key = random_key();
        let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
        assert!(store.release(&key, token).await.unwrap());
        // The row stays, expired, owned by no token the caller has; cleanup deletes it.
        assert_eq!(row_count(&store).await, 1);
        assert!(!store.renew(&key, token, LONG).await.unwrap());
        assert_eq!(store.delete_expired().await.unwrap(), 1);
        assert_eq!(row_count(&store).await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_expired_removes_only_expired_records_in_batches() {
    with_store(|store| async move {
        let store = store.cleanup_batch(3);
        // 3 lapsed leases, 2 released ones and 3 expired responses, more than two batches.
        for _ in 0..3 {
            acquire(&store, &random_key(), &random_fingerprint(), Duration::ZERO).await;
        }
        for _ in 0..2 {
            let key = random_key();
            let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
            assert!(store.release(&key, token).await.unwrap());
        }
        for _ in 0..3 {
            let key = random_key();
            let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
            assert!(
                store
                    .complete(&key, token, &binary_response(), Duration::ZERO)
                    .await
                    .unwrap()
            );
        }
        // And two live records.
        let (held, done) = (random_key(), random_key());
        let held_fingerprint = random_fingerprint();
        acquire(&store, &held, &held_fingerprint, LONG).await;
        let token = acquire(&store, &done, &random_fingerprint(), LONG).await;
        let response = binary_response();
        assert!(store.complete(&done, token, &response, LONG).await.unwrap());

        assert_eq!(row_count(&store).await, 10);
        assert_eq!(store.delete_expired().await.unwrap(), 8);
        assert_eq!(row_count(&store).await, 2);
        assert_eq!(
            store.delete_expired().await.unwrap(),
            0,
            "nothing left to delete"
        );
        assert_eq!(expect_in_flight(&store, &held).await.0, held_fingerprint);
        assert_eq!(expect_completed(&store, &done).await.1, response);
    })
    .await;
}

/// Cleanup skips an expired row another transaction holds, instead of waiting for it, and
/// takes it at a later run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_expired_skips_rows_in_use() {
    with_store(|store| async move {
        let (busy, idle) = (random_key(), random_key());
        for key in [busy, idle] {
            acquire(&store, &key, &random_fingerprint(), Duration::ZERO).await;
        }
        let mut holder = store.pool().begin().await.unwrap();
        sqlx::query(AssertSqlSafe(on_table(
            &store,
            "SELECT 1 FROM {t} WHERE `key` = ? FOR UPDATE",
        )))
        .bind(busy.0.to_vec())
        .execute(&mut *holder)
        .await
        .unwrap();
        let deleted = tokio::time::timeout(Duration::from_secs(10), store.delete_expired())
            .await
            .expect("cleanup waited for the locked row")
            .unwrap();
        assert_eq!(deleted, 1, "the idle row only");
        holder.rollback().await.unwrap();
        assert_eq!(store.delete_expired().await.unwrap(), 1, "now the other");
        assert_eq!(row_count(&store).await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_cleanup_deletes_expired_records() {
    with_store(|store| async move {
        for _ in 0..5 {
            acquire(&store, &random_key(), &random_fingerprint(), Duration::ZERO).await;
        }
        let live = random_key();
        acquire(&store, &live, &random_fingerprint(), LONG).await;
        let cleanup = store.spawn_cleanup(Duration::from_millis(20));
        // The first run starts at once; poll for its effect, bounded.
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            while row_count(&store).await != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        cleanup.abort();
        assert!(
            drained.is_ok(),
            "the cleanup task did not delete the expired records"
        );
        expect_in_flight(&store, &live).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_records_are_corrupt() {
    with_store(|store| async move {
        let key = random_key();
        let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
        assert!(
            store
                .complete(&key, token, &binary_response(), LONG)
                .await
                .unwrap()
        );
        sql(
            &store,
            "UPDATE {t} SET response = X'00ff' WHERE `key` = ?",
            &key,
        )
        .await;
        let error = store
            .begin(&key, &random_fingerprint(), LONG)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Corrupt);
    })
    .await;
}

/// `Debug` shows the table and the cleanup batch, and nothing of the pool's connection string.
#[tokio::test]
async fn debug_output_shows_the_table_and_batch() {
    let pool = MySqlPool::connect_lazy("mysql://user:secret@127.0.0.1:1/test").unwrap();
    let store = MySqlStore::new(pool)
        .with_table_name("calls_records")
        .unwrap()
        .cleanup_batch(250);
    let debug = format!("{store:?}");
    assert!(debug.starts_with("MySqlStore {"), "{debug}");
    assert!(debug.contains("calls_records"), "{debug}");
    assert!(debug.contains("cleanup_batch: 250"), "{debug}");
    assert!(!debug.contains("secret"), "{debug}");
}

// ---------------------------------------------------------------------------------------------
// Failures

#[tokio::test]
async fn an_unreachable_database_is_unavailable_with_its_cause() {
    // Nothing listens on port 1.
    let pool = MySqlPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("mysql://root@127.0.0.1:1/test")
        .unwrap();
    let store = MySqlStore::new(pool);
    let error = store
        .begin(&random_key(), &random_fingerprint(), LONG)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    assert!(
        std::error::Error::source(&error).is_some(),
        "keeps the sqlx error"
    );
    let error = store
        .complete(
            &random_key(),
            LeaseToken::random(),
            &binary_response(),
            LONG,
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    assert_eq!(
        store.delete_expired().await.unwrap_err().kind(),
        StoreErrorKind::Unavailable
    );
    assert_eq!(
        store.migrate().await.unwrap_err().kind(),
        StoreErrorKind::Unavailable
    );

    let error = MySqlStore::connect("not a url").await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
}
