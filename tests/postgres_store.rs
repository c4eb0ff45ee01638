//! `PostgresStore`: the store conformance suite against a real PostgreSQL, plus what only this
//! store has (the one-statement `begin` under contention, expiry from stored timestamps,
//! batched cleanup, migrations, error mapping).
//!
//! Needs `DATABASE_URL` (for example `postgres://postgres@127.0.0.1:5432/test`). Without it the
//! tests print that they are skipped and pass, except under `CI=true`, where a missing URL or an
//! unreachable server fails them. Every test works in a table of its own, with a random name,
//! dropped at the end, so tests and runs never collide.
#![cfg(all(feature = "postgres", feature = "testing"))]

mod common;

use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use common::conformance::{
    self, LONG, acquire, binary_response, expect_completed, expect_in_flight, marked_response,
    random_fingerprint, random_key,
};
use futures_util::FutureExt;
use sqlx::{AssertSqlSafe, PgPool, postgres::PgPoolOptions};
use tokio::sync::Barrier;
use tower_idempotency::store::{
    Begin, IdempotencyStore, LeaseToken, PostgresStore, StoreErrorKind, StoreKey,
};

const TASKS: usize = 50;

/// A pool on `DATABASE_URL`, or `None` (after saying so) when the variable is unset outside CI.
async fn pool() -> Option<PgPool> {
    let url = common::service_url("DATABASE_URL", "this PostgreSQL test")?;
    let pool = PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at DATABASE_URL is unreachable: {e}"));
    Some(pool)
}

/// A table name of this test's own.
fn unique_table() -> String {
    format!(
        "idem_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    )
}

/// Runs `test` on a migrated store in a fresh table, then drops the table, also when `test`
/// panics.
async fn with_store<F, Fut>(test: F)
where
    F: FnOnce(PostgresStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(pool) = pool().await else { return };
    let store = PostgresStore::new(pool.clone())
        .with_table_name(&unique_table())
        .expect("a valid table name");
    store.migrate().await.expect("migrate");
    let outcome = AssertUnwindSafe(test(store.clone())).catch_unwind().await;
    drop_table(&pool, store.table_name()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn drop_table(pool: &PgPool, table: &str) {
    sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS \"{table}\"")))
        .execute(pool)
        .await
        .expect("drop the test table");
}

/// Runs one statement on the store's table, `{t}` standing for the quoted table name, with the
/// key bound as `$1`; returns the number of rows affected.
async fn sql(store: &PostgresStore, statement: &str, key: &StoreKey) -> u64 {
    let statement = statement.replace("{t}", &format!("\"{}\"", store.table_name()));
    sqlx::query(AssertSqlSafe(statement))
        .bind(&key.0[..])
        .execute(store.pool())
        .await
        .expect("test statement")
        .rows_affected()
}

async fn row_count(store: &PostgresStore) -> i64 {
    let statement = format!("SELECT count(*) FROM \"{}\"", store.table_name());
    sqlx::query_scalar(AssertSqlSafe(statement))
        .fetch_one(store.pool())
        .await
        .expect("count rows")
}

/// `TASKS` concurrent `begin`s on `key`; returns the tokens that acquired and the number of
/// `InFlight` answers.
async fn race_begin(store: &PostgresStore, key: StoreKey) -> (Vec<LeaseToken>, usize) {
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store.begin(&key, &random_fingerprint(), LONG).await
            })
        })
        .collect();
    let (mut acquired, mut in_flight) = (Vec::new(), 0);
    for task in tasks {
        match task.await.expect("task panicked").expect("begin failed") {
            Begin::Acquired(token) => acquired.push(token),
            Begin::InFlight { .. } => in_flight += 1,
            Begin::Completed { .. } => panic!("nothing was completed"),
        }
    }
    (acquired, in_flight)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    with_store(conformance::run_all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_begins_on_a_fresh_key_acquire_exactly_once() {
    with_store(|store| async move {
        for _ in 0..5 {
            let key = random_key();
            let (acquired, in_flight) = race_begin(&store, key).await;
            assert_eq!(acquired.len(), 1, "exactly one begin acquires");
            assert_eq!(in_flight, TASKS - 1);
            // The winner's token is the one the table holds.
            let response = marked_response("winner");
            assert!(
                store
                    .complete(&key, acquired[0], &response, LONG)
                    .await
                    .unwrap()
            );
            assert_eq!(expect_completed(&store, &key).await.1, response);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_begins_take_over_an_expired_lease_exactly_once() {
    with_store(|store| async move {
        for _ in 0..5 {
            let key = random_key();
            // A zero lease has run out by the next statement (deadline <= now()).
            let old = acquire(&store, &key, &random_fingerprint(), Duration::ZERO).await;
            let (acquired, in_flight) = race_begin(&store, key).await;
            assert_eq!(acquired.len(), 1, "exactly one begin takes over");
            assert_eq!(in_flight, TASKS - 1);
            assert!(
                !store.release(&key, old).await.unwrap(),
                "the old token owns nothing"
            );
            assert!(store.release(&key, acquired[0]).await.unwrap());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_begins_replace_an_expired_response_exactly_once() {
    with_store(|store| async move {
        for _ in 0..5 {
            let key = random_key();
            let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
            assert!(
                store
                    .complete(&key, token, &binary_response(), Duration::ZERO)
                    .await
                    .unwrap()
            );
            let (acquired, in_flight) = race_begin(&store, key).await;
            assert_eq!(acquired.len(), 1, "exactly one begin replaces the response");
            assert_eq!(in_flight, TASKS - 1);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_in_flight_answers_are_plain_reads() {
    with_store(|store| async move {
        let xmax = |key: StoreKey| {
            let store = store.clone();
            async move {
                let statement = format!(
                    "SELECT xmax::text FROM \"{}\" WHERE key = $1",
                    store.table_name()
                );
                sqlx::query_scalar::<_, String>(AssertSqlSafe(statement))
                    .bind(key.0.to_vec())
                    .fetch_one(store.pool())
                    .await
                    .unwrap()
            }
        };
        // No row lock is taken (a lock would set the row's xmax), so nothing is written.
        let held = random_key();
        acquire(&store, &held, &random_fingerprint(), LONG).await;
        let done = random_key();
        let token = acquire(&store, &done, &random_fingerprint(), LONG).await;
        assert!(
            store
                .complete(&done, token, &binary_response(), LONG)
                .await
                .unwrap()
        );
        let (held_before, done_before) = (xmax(held).await, xmax(done).await);
        for _ in 0..3 {
            expect_in_flight(&store, &held).await;
            expect_completed(&store, &done).await;
        }
        assert_eq!(
            xmax(held).await,
            held_before,
            "an in-flight answer locked the row"
        );
        assert_eq!(xmax(done).await, done_before, "a replay locked the row");

        // So a replay does not wait for a transaction that holds the row.
        let mut holder = store.pool().begin().await.unwrap();
        let statement = format!(
            "SELECT 1 FROM \"{}\" WHERE key = $1 FOR UPDATE",
            store.table_name()
        );
        sqlx::query(AssertSqlSafe(statement))
            .bind(done.0.to_vec())
            .execute(&mut *holder)
            .await
            .unwrap();
        let replay = tokio::time::timeout(Duration::from_secs(10), expect_completed(&store, &done));
        assert!(replay.await.is_ok(), "the replay waited for the row lock");
        holder.rollback().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_read_from_the_stored_timestamps() {
    with_store(|store| async move {
        // An in-flight lease whose stored deadline is moved into the past is taken over.
        let key = random_key();
        let old = acquire(&store, &key, &random_fingerprint(), LONG).await;
        let moved = sql(
            &store,
            "UPDATE {t} SET expires_at = now() - interval '1 second' WHERE key = $1",
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
            "UPDATE {t} SET expires_at = now() + interval '1 hour' WHERE key = $1",
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
            "UPDATE {t} SET expires_at = now() - interval '1 second' WHERE key = $1",
            &key,
        )
        .await;
        acquire(&store, &key, &random_fingerprint(), LONG).await;
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
async fn delete_expired_removes_only_expired_records_in_batches() {
    with_store(|store| async move {
        let store = store.cleanup_batch(3);
        // 4 lapsed leases and 3 expired responses, more than two batches.
        for _ in 0..4 {
            acquire(&store, &random_key(), &random_fingerprint(), Duration::ZERO).await;
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

        assert_eq!(row_count(&store).await, 9);
        assert_eq!(store.delete_expired().await.unwrap(), 7);
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
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    let Some(pool) = pool().await else { return };
    let store = PostgresStore::new(pool.clone())
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
        assert!(store.complete(&key, token, &binary_response(), LONG).await.unwrap());
        // Once more on an existing table with data: nothing changes.
        store.migrate().await.expect("second migrate");
        store.migrate().await.expect("third migrate");
        assert_eq!(expect_completed(&store, &key).await.1, binary_response());
        let index: Option<String> = sqlx::query_scalar(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = $1 AND indexdef LIKE '%(expires_at)%'",
        )
        .bind(store.table_name())
        .fetch_optional(&pool)
        .await
        .unwrap();
        assert_eq!(index, Some(format!("{}_expires_at_idx", store.table_name())));
    })
    .catch_unwind()
    .await;
    drop_table(&pool, store.table_name()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
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
            "UPDATE {t} SET response = '\\x00ff'::bytea WHERE key = $1",
            &key,
        )
        .await;
        let error = store
            .begin(&key, &random_fingerprint(), LONG)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Corrupt);

        let key = random_key();
        acquire(&store, &key, &random_fingerprint(), LONG).await;
        sql(
            &store,
            "UPDATE {t} SET fingerprint = '\\x0102'::bytea WHERE key = $1",
            &key,
        )
        .await;
        let error = store
            .begin(&key, &random_fingerprint(), LONG)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Corrupt);
        assert!(
            std::error::Error::source(&error).is_some(),
            "keeps the decode error"
        );
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable_with_its_cause() {
    // Nothing listens on port 1.
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .unwrap();
    let store = PostgresStore::new(pool);
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

    let error = PostgresStore::connect("not a url").await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
}

#[tokio::test]
async fn table_names_must_be_plain_identifiers() {
    let pool = PgPool::connect_lazy("postgres://postgres@127.0.0.1:1/test").unwrap();
    let store = PostgresStore::new(pool);
    assert_eq!(store.table_name(), "idempotency_records");
    for bad in [
        "",
        "Records",
        "records; DROP TABLE users",
        "public.records",
        "9lives",
    ] {
        let error = store.clone().with_table_name(bad).unwrap_err();
        assert!(error.to_string().contains("invalid table name"), "{error}");
    }
    assert_eq!(
        store.with_table_name("my_records").unwrap().table_name(),
        "my_records"
    );
}

/// `Debug` shows the table and the cleanup batch, and nothing of the pool's connection string.
#[tokio::test]
async fn debug_output_shows_the_table_and_batch() {
    let pool = PgPool::connect_lazy("postgres://user:secret@127.0.0.1:1/test").unwrap();
    let store = PostgresStore::new(pool)
        .with_table_name("calls_records")
        .unwrap()
        .cleanup_batch(250);
    let debug = format!("{store:?}");
    assert!(debug.starts_with("PostgresStore {"), "{debug}");
    assert!(debug.contains("calls_records"), "{debug}");
    assert!(debug.contains("cleanup_batch: 250"), "{debug}");
    assert!(!debug.contains("secret"), "{debug}");
}
