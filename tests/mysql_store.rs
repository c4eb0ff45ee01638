//! `MySqlStore`: the store conformance suite against a real MariaDB (or MySQL), plus what only
//! this store has: `begin` under contention (including deadlocks InnoDB breaks), replays that
//! take no lock, expiry from stored timestamps on the server's clock whatever the session's
//! time zone, batched cleanup, migrations, completion inside the caller's transaction, two
//! instances on one database, and a server that crashes and comes back.
//!
//! Needs `MYSQL_URL` (for example `mysql://root@127.0.0.1:3306/test`). Without it the tests print
//! that they are skipped and pass, except under `CI=true`, where a missing URL or an unreachable
//! server fails them. Every test works in a table of its own, with a random name, dropped at
//! the end, so tests and runs never collide.
//!
//! The crash test starts a server of its own instead (`mariadb-install-db` and `mariadbd`, in a
//! temporary directory, on a free loopback port); it skips (fails under CI) when they are not
//! installed.
#![cfg(all(feature = "mysql", feature = "testing"))]

mod common;

use std::{
    future::Future,
    net::SocketAddr,
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, http::StatusCode, routing::post};
use common::conformance::{
    self, LONG, SHORT, acquire, binary_response, expect_completed, expect_in_flight,
    marked_response, random_fingerprint, random_key,
};
use futures_util::FutureExt;
use serde_json::{Value, json};
use sqlx::{
    AssertSqlSafe, Connection, MySqlPool,
    mysql::{MySqlConnectOptions, MySqlPoolOptions},
};
use tokio::{net::TcpListener, sync::Barrier, task::JoinSet, time::Instant};
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, Lease,
    store::{Begin, LeaseToken, MySqlStore, StoreErrorKind, StoreKey},
};

/// Concurrent `begin`s on one key, as in the conformance suite.
const TASKS: usize = 50;

/// The upper bound on any wait in these tests; past it the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(30);

fn mysql_url(test: &str) -> Option<String> {
    common::service_url("MYSQL_URL", test)
}

async fn pool_on(url: &str, max_connections: u32) -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("MariaDB at MYSQL_URL is unreachable: {e}"))
}

/// A pool on `MYSQL_URL`, or `None` (after saying so) when the variable is unset outside CI.
async fn pool() -> Option<MySqlPool> {
    let url = mysql_url("this MySQL test")?;
    Some(pool_on(&url, 12).await)
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

async fn drop_table(pool: &MySqlPool, table: &str) {
    sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS `{table}`")))
        .execute(pool)
        .await
        .expect("drop the test table");
}

/// `statement` with `{t}` standing for the store's quoted table name.
fn on_table(store: &MySqlStore, statement: &str) -> String {
    statement.replace("{t}", &format!("`{}`", store.table_name()))
}

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

/// The server's count of deadlocks InnoDB has broken since it started.
async fn deadlocks(pool: &MySqlPool) -> u64 {
    let (_, value): (String, String) = sqlx::query_as("SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'")
        .fetch_one(pool)
        .await
        .expect("Innodb_deadlocks");
    value.parse().expect("a count")
}

/// `TASKS` concurrent `begin`s on `key`; returns the tokens that acquired and the number of
/// `InFlight` answers. Any error fails the test.
async fn race_begin(store: &MySqlStore, key: StoreKey) -> (Vec<LeaseToken>, usize) {
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
            // A zero lease has run out by the next statement (deadline <= UTC_TIMESTAMP(6)).
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

/// A released key, and a key whose expired row cleanup has just deleted, each raced by 50
/// `begin`s, 20 times over: exactly one acquires every time and no call fails. Inserting
/// where a row was just deleted is where InnoDB deadlocks concurrent inserts; the store runs
/// a rolled-back statement again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_begins_after_a_release_or_a_cleanup_acquire_exactly_once() {
    with_store(|store| async move {
        let before = deadlocks(store.pool()).await;
        for round in 0..20 {
            let key = random_key();
            let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
            if round % 2 == 0 {
                assert!(store.release(&key, token).await.unwrap());
            } else {
                assert!(
                    store
                        .complete(&key, token, &binary_response(), Duration::ZERO)
                        .await
                        .unwrap()
                );
                assert_eq!(store.delete_expired().await.unwrap(), 1);
            }
            let (acquired, in_flight) = race_begin(&store, key).await;
            assert_eq!(
                acquired.len(),
                1,
                "exactly one begin acquires (round {round})"
            );
            assert_eq!(in_flight, TASKS - 1);
            assert!(store.release(&key, acquired[0]).await.unwrap());
            assert_eq!(store.delete_expired().await.unwrap(), 1);
        }
        eprintln!(
            "20 races of {TASKS} begins after a release or a cleanup: no errors; InnoDB broke {} \
             deadlocks on the server meanwhile",
            deadlocks(store.pool()).await - before
        );
    })
    .await;
}

/// A deadlock made on purpose, with `begin` as InnoDB's victim: `begin` runs its pass again
/// and answers, instead of failing.
///
/// Transaction A inserts the key and holds it; `begin` and transaction B (which has written
/// rows already, so InnoDB keeps it and rolls back the lighter `begin`) try to insert the same
/// key and wait for A. A rolls back: `begin` and B both hold a shared lock from their
/// duplicate checks and each waits for the other to insert, a deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_rolled_back_by_a_deadlock_runs_again() {
    with_store(|store| async move {
        let insert = on_table(
            &store,
            "INSERT INTO {t} (`key`, fingerprint, state, token, expires_at, created_at)
             VALUES (?, ?, 'in_flight', ?, UTC_TIMESTAMP(6) + INTERVAL 30 SECOND,
                     UTC_TIMESTAMP(6))",
        );
        let insert_row = |key: StoreKey, fingerprint: [u8; 32]| {
            sqlx::query(AssertSqlSafe(insert.clone()))
                .bind(key.0.to_vec())
                .bind(fingerprint.to_vec())
                .bind(LeaseToken::random().to_bytes().to_vec())
        };
        let waiting = || async {
            let waits: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM information_schema.innodb_trx
                 WHERE trx_state = 'LOCK WAIT'",
            )
            .fetch_one(store.pool())
            .await
            .unwrap();
            waits
        };
        let until_waiting = |n: i64| async move {
            let deadline = Instant::now() + PATIENCE;
            while waiting().await < n {
                assert!(Instant::now() < deadline, "never {n} lock waits");
                // InnoDB refreshes these tables only when they were not read for 100 ms.
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        };

        let before = deadlocks(store.pool()).await;
        let key = random_key();
        let mut a = store.pool().begin().await.unwrap();
        insert_row(key, random_fingerprint().0)
            .execute(&mut *a)
            .await
            .unwrap();

        let begin = tokio::spawn({
            let store = store.clone();
            async move { store.begin(&key, &random_fingerprint(), LONG).await }
        });
        until_waiting(1).await;

        let mut b = store.pool().begin().await.unwrap();
        for _ in 0..20 {
            insert_row(random_key(), random_fingerprint().0)
                .execute(&mut *b)
                .await
                .unwrap();
        }
        let b_fingerprint = random_fingerprint();
        let b_key_insert = insert_row(key, b_fingerprint.0);
        let b_insert = tokio::spawn(async move {
            let outcome = b_key_insert.execute(&mut *b).await;
            (b, outcome)
        });
        until_waiting(2).await;

        a.rollback().await.unwrap();
        let (b, b_outcome) = b_insert.await.unwrap();
        b_outcome.expect("InnoDB rolled back B, not the lighter begin: the test proves nothing");
        assert!(
            deadlocks(store.pool()).await > before,
            "no deadlock happened"
        );
        // The begin, run again, waits for B's row; B commits.
        until_waiting(1).await;
        b.commit().await.unwrap();
        match begin.await.unwrap().expect("begin failed") {
            Begin::InFlight { fingerprint, .. } => assert_eq!(fingerprint, b_fingerprint),
            other => panic!("expected B's lease in flight, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_in_flight_answers_take_no_lock() {
    with_store(|store| async move {
        let held = random_key();
        let held_fingerprint = random_fingerprint();
        acquire(&store, &held, &held_fingerprint, LONG).await;
        let done = random_key();
        let token = acquire(&store, &done, &random_fingerprint(), LONG).await;
        let response = binary_response();
        assert!(store.complete(&done, token, &response, LONG).await.unwrap());

        // Another transaction holds both rows locked; the answers do not wait for it.
        let mut holder = store.pool().begin().await.unwrap();
        let lock = on_table(&store, "SELECT 1 FROM {t} WHERE `key` IN (?, ?) FOR UPDATE");
        sqlx::query(AssertSqlSafe(lock))
            .bind(held.0.to_vec())
            .bind(done.0.to_vec())
            .execute(&mut *holder)
            .await
            .unwrap();
        let answers = tokio::time::timeout(Duration::from_secs(10), async {
            (
                expect_in_flight(&store, &held).await,
                expect_completed(&store, &done).await,
            )
        })
        .await
        .expect("an answer waited for the row lock");
        assert_eq!(answers.0.0, held_fingerprint);
        assert_eq!(answers.1.1, response);
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

// ---------------------------------------------------------------------------------------------
// Completion inside the caller's transaction

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

// ---------------------------------------------------------------------------------------------
// Over HTTP: instances of an app, each with its own pool

/// Requests the test sends at once, with one key.
const DUPLICATES: usize = 40;
/// The organization the requests act for.
const ORG: &str = "org_mysql";

/// An app with one idempotent `POST /calls` that counts its runs and takes `delay`.
fn app(store: MySqlStore, delay: Duration, runs: Arc<AtomicU64>, waiting: bool) -> Router {
    let mut layer = IdempotencyLayer::new()
        .store(store)
        .post("/calls")
        .store_timeout(Duration::from_secs(2));
    if waiting {
        layer = layer.in_flight(tower_idempotency::InFlight::Wait {
            timeout: Duration::from_secs(20),
        });
    }
    Router::new()
        .route(
            "/calls",
            post(move |body: String| {
                let runs = runs.clone();
                async move {
                    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(delay).await;
                    let call =
                        json!({ "id": uuid::Uuid::new_v4().to_string(), "run": run, "body": body });
                    (StatusCode::CREATED, axum::Json(call))
                }
            }),
        )
        .layer(layer)
}

async fn serve(app: Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, server)
}

fn create(client: &reqwest::Client, addr: SocketAddr, key: &str) -> reqwest::RequestBuilder {
    client
        .post(format!("http://{addr}/calls"))
        .bearer_auth(ORG)
        .header("x-idempotency-key", key)
        .body(r#"{"to":"+15550100"}"#)
}

fn replayed(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|value| value == "true")
}

/// Two instances, each with its own pool on one table; 40 identical requests alternate
/// between them while the first runs.
async fn two_instances(waiting: bool) {
    with_store(|store| async move {
        let url = mysql_url("two instances").unwrap();
        let runs = Arc::new(AtomicU64::new(0));
        let mut servers = Vec::new();
        for _ in 0..2 {
            let own = MySqlStore::new(pool_on(&url, 10).await)
                .with_table_name(store.table_name())
                .unwrap();
            own.migrate()
                .await
                .expect("each instance migrates at start");
            servers.push(serve(app(own, Duration::from_millis(400), runs.clone(), waiting)).await);
        }
        let client = reqwest::Client::new();
        let key = uuid::Uuid::new_v4().to_string();
        let mut requests = JoinSet::new();
        for n in 0..DUPLICATES {
            let request = create(&client, servers[n % 2].0, &key);
            requests.spawn(async move {
                let response = request.send().await.unwrap();
                let replayed = replayed(&response);
                (response.status(), replayed, response.bytes().await.unwrap())
            });
        }
        let answers = requests.join_all().await;
        let originals: Vec<_> = answers
            .iter()
            .filter(|(status, replayed, _)| *status == StatusCode::CREATED && !replayed)
            .collect();
        assert_eq!(originals.len(), 1, "exactly one original answer");
        let (mut replays, mut conflicts) = (0, 0);
        for (status, replayed, body) in &answers {
            match *status {
                StatusCode::CREATED => {
                    assert_eq!(body, &originals[0].2, "every 201 is the one response");
                    replays += usize::from(*replayed);
                }
                StatusCode::CONFLICT if !waiting => {
                    let problem: Value = serde_json::from_slice(body).unwrap();
                    assert_eq!(problem["type"], "tag:tower-idempotency,2026:in-flight");
                    conflicts += 1;
                }
                other => panic!("unexpected answer {other}: {body:?}"),
            }
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "the handler ran once in all"
        );
        eprintln!(
            "{DUPLICATES} duplicates over 2 instances (waiting: {waiting}): 1 run, {replays} \
             replays, {conflicts} x 409"
        );
        for (_, server) in servers {
            server.abort();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_run_the_handler_once() {
    two_instances(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_waiting_all_get_the_one_response() {
    two_instances(true).await;
}

// ---------------------------------------------------------------------------------------------
// A server that crashes and comes back

/// `name` on `PATH`, else in `/usr/sbin` or `/usr/bin`.
fn binary(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        ["/usr/sbin", "/usr/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// A free loopback port below Linux's ephemeral range (32768 and up), chosen at random, so
/// that while the server is down its port is not handed to another `bind(0)` or used as a
/// client's source port.
fn free_port_below_ephemeral_range() -> u16 {
    for _ in 0..100 {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_768) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32767");
}

/// A `mariadbd` of this test's own: a fresh data directory under the system's temporary
/// directory, a fixed loopback port, no authentication. Killed on drop, its directory removed.
struct MariaDb {
    server: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl MariaDb {
    /// Initializes a data directory and starts the server; `None` (after saying so) when
    /// MariaDB is not installed, outside CI.
    async fn start(test: &str) -> Option<Self> {
        let (Some(install), Some(server)) = (binary("mariadb-install-db"), binary("mariadbd"))
        else {
            assert!(
                !common::in_ci(),
                "mariadbd or mariadb-install-db is not installed, and CI=true: {test} must run"
            );
            common::skip(test, "mariadbd or mariadb-install-db is not installed");
            return None;
        };
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-mariadb-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let output = Command::new(install)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .arg(format!("--user={}", whoami()))
            .output()
            .expect("run mariadb-install-db");
        assert!(
            output.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut db = Self {
            server,
            dir,
            port: free_port_below_ephemeral_range(),
            child: None,
        };
        db.resume().await;
        let mut conn = sqlx::MySqlConnection::connect(&db.url_without_database())
            .await
            .unwrap();
        sqlx::query("CREATE DATABASE IF NOT EXISTS test")
            .execute(&mut conn)
            .await
            .unwrap();
        Some(db)
    }

    fn url_without_database(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/test", self.port)
    }

    /// Starts the server (again) on its data directory and port, and returns once it answers.
    async fn resume(&mut self) {
        assert!(self.child.is_none(), "MariaDB is already running");
        let data = self.dir.join("data");
        let child = Command::new(&self.server)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!(
                "--socket={}",
                self.dir.join("mysqld.sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("mysqld.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                self.dir.join("error.log").display()
            ))
            .arg(format!("--port={}", self.port))
            .arg(format!("--user={}", whoami()))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--innodb-flush-log-at-trx-commit=1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(mut conn) = sqlx::MySqlConnection::connect(&self.url_without_database()).await
                && conn.ping().await.is_ok()
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                panic!("mariadbd exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "mariadbd did not get ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the server at once (`SIGKILL`: a crash; connections cut, nothing flushed that
    /// was not flushed at commit).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The user the server runs as (it refuses root unless told `--user=root`).
fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| {
        let output = Command::new("id").arg("-un").output().expect("id -un");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    })
}

async fn assert_unavailable(response: reqwest::Response) {
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert!(!replayed(&response));
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        problem["type"], "tag:tower-idempotency,2026:store-unavailable",
        "{problem}"
    );
}

/// MariaDB is killed mid-request: covered requests get 503 and nothing runs. It starts again
/// on the same data directory and port: the same app and store serve again, and a response
/// stored before the crash is still replayed (committed with `innodb_flush_log_at_trx_commit
/// = 1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_server_answers_503_and_back_up_serves_again_without_restart() {
    let test = "a_crashed_server_answers_503_and_back_up_serves_again_without_restart";
    let Some(mut db) = MariaDb::start(test).await else {
        return;
    };
    // A pool that gives up on a dead server sooner than the layer's store timeout.
    let pool = MySqlPoolOptions::new()
        .max_connections(5)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&db.url())
        .await
        .unwrap();
    let store = MySqlStore::new(pool);
    store.migrate().await.unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let (addr, _server) = serve(app(store, Duration::from_millis(300), runs.clone(), false)).await;
    let client = reqwest::Client::new();

    // Up: a create, and its replay.
    let before = uuid::Uuid::new_v4().to_string();
    let first = create(&client, addr, &before).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_body = first.bytes().await.unwrap();
    let replay = create(&client, addr, &before).send().await.unwrap();
    assert!(replayed(&replay));
    assert_eq!(replay.bytes().await.unwrap(), first_body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A request whose handler runs when the server dies still gets its handler's answer.
    let running = tokio::spawn(create(&client, addr, &uuid::Uuid::new_v4().to_string()).send());
    let deadline = Instant::now() + PATIENCE;
    while runs.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the handler never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    db.kill();
    let running = running.await.unwrap().unwrap();
    assert_eq!(running.status(), StatusCode::CREATED);
    assert!(!replayed(&running));

    // Down: new keys, and the replay of a stored one, get 503; nothing runs.
    let mut down = JoinSet::new();
    for key in [
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
        before.clone(),
    ] {
        down.spawn(create(&client, addr, &key).send());
    }
    for answer in down.join_all().await {
        assert_unavailable(answer.unwrap()).await;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "a request ran without its store"
    );

    // Up again, same data and port, same app: served once the pool has reconnected.
    db.resume().await;
    let after = uuid::Uuid::new_v4().to_string();
    let deadline = Instant::now() + PATIENCE;
    let mut unavailable = 0;
    let created = loop {
        let answer = create(&client, addr, &after).send().await.unwrap();
        if answer.status() == StatusCode::CREATED {
            break answer;
        }
        assert_unavailable(answer).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        unavailable += 1;
        assert!(Instant::now() < deadline, "the app never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!replayed(&created));
    let created_body = created.bytes().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let replay = create(&client, addr, &after).send().await.unwrap();
    assert!(replayed(&replay));
    assert_eq!(replay.bytes().await.unwrap(), created_body);

    // The response stored before the crash survived it.
    let replay = create(&client, addr, &before).send().await.unwrap();
    assert!(
        replayed(&replay),
        "the response stored before the crash was lost"
    );
    assert_eq!(replay.bytes().await.unwrap(), first_body);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    eprintln!(
        "{test}: 3 requests while down, all 503; after the restart, {unavailable} more 503 \
         before the first 201; the response stored before the crash replayed; handler runs: 3"
    );
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
