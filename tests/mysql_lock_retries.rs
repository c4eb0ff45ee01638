//! `MySqlStore` runs a statement again when InnoDB rolled it back for a lock conflict (a
//! deadlock, 1213, or a lock wait timeout, 1205), a bounded number of times, and never runs
//! again a statement that failed for another reason. A `begin` that keeps meeting a duplicate
//! key (a concurrent writer) gives up after a bounded number of passes too.
//!
//! The errors are made by triggers on the test's own table that `SIGNAL` the error number;
//! each trigger first counts its firing in a MyISAM table, which a failed statement does not
//! roll back, so the count is the number of times the store ran the statement. Each run
//! again is logged (at debug level, with the error), and counted in the log too.
//!
//! Needs `MYSQL_URL`; skipped without it, except under `CI=true`.
#![cfg(all(feature = "mysql", feature = "testing"))]

mod common;
mod support;

use std::{future::Future, panic::AssertUnwindSafe, time::Duration};

use common::conformance::{LONG, acquire, random_fingerprint, random_key};
use futures_util::FutureExt;
use sqlx::{AssertSqlSafe, MySqlPool, mysql::MySqlPoolOptions};
use support::{capture_trace, take_trace};
use tower_idempotency::{
    IdempotencyStore,
    store::{MySqlStore, StoreError, StoreErrorKind},
};

/// How many times a statement is run again after a lock conflict (`LOCK_RETRIES` in the store).
const LOCK_RETRIES: i64 = 10;
/// How many passes a `begin` makes while concurrent writers keep taking the key
/// (`BEGIN_ATTEMPTS` in the store).
const BEGIN_ATTEMPTS: i64 = 16;
/// A call that loops for ever fails the test after this, instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(30);

/// The errors a trigger raises: `(SQLSTATE, MYSQL_ERRNO)`.
const DEADLOCK: (&str, u16) = ("40001", 1213);
const LOCK_WAIT_TIMEOUT: (&str, u16) = ("HY000", 1205);
const DUPLICATE_KEY: (&str, u16) = ("23000", 1062);
/// `ER_SIGNAL_EXCEPTION`: an error that is no lock conflict.
const OTHER_ERROR: (&str, u16) = ("45000", 1644);

/// A store on a migrated table of its own, and a counter table beside it; both dropped
/// afterwards, also when `test` panics.
async fn with_store<F, Fut>(test: &str, body: F)
where
    F: FnOnce(MySqlStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(url) = common::service_url("MYSQL_URL", test) else {
        return;
    };
    let pool = MySqlPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("MariaDB at MYSQL_URL is unreachable: {e}"));
    let table = format!(
        "idem_retry_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    );
    let store = MySqlStore::new(pool.clone())
        .with_table_name(&table)
        .expect("a valid table name");
    store.migrate().await.expect("migrate");
    run(
        &pool,
        &format!("CREATE TABLE `{table}_fired` (n INT NOT NULL) ENGINE = MyISAM"),
    )
    .await;
    run(&pool, &format!("INSERT INTO `{table}_fired` VALUES (0)")).await;
    let outcome = AssertUnwindSafe(body(store)).catch_unwind().await;
    run(&pool, &format!("DROP TABLE IF EXISTS `{table}`")).await;
    run(&pool, &format!("DROP TABLE IF EXISTS `{table}_fired`")).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn run(pool: &MySqlPool, statement: &str) {
    sqlx::query(AssertSqlSafe(statement.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

/// Makes every `INSERT` or `UPDATE` (`event`) on the store's table fail with `error`, counted.
async fn fail_every(store: &MySqlStore, event: &str, (state, number): (&str, u16)) {
    let table = store.table_name();
    run(
        store.pool(),
        &format!(
            "CREATE TRIGGER `{table}_fail` BEFORE {event} ON `{table}` FOR EACH ROW
             BEGIN
                 UPDATE `{table}_fired` SET n = n + 1;
                 SIGNAL SQLSTATE '{state}' SET MYSQL_ERRNO = {number},
                     MESSAGE_TEXT = 'made by the test trigger';
             END"
        ),
    )
    .await;
}

/// How many times the trigger fired: the statements the store ran.
async fn fired(store: &MySqlStore) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT n FROM `{}_fired`",
        store.table_name()
    )))
    .fetch_one(store.pool())
    .await
    .expect("read the counter")
}

/// The error of `call`, which must fail within [`PATIENCE`].
async fn error_of<T: std::fmt::Debug>(
    call: impl Future<Output = Result<T, StoreError>>,
) -> StoreError {
    tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the call ends (a bounded number of tries)")
        .expect_err("the call fails")
}

/// The runs again logged on this thread since [`capture_trace`].
fn retries_logged() -> i64 {
    let trace = take_trace();
    let logged = trace
        .lines()
        .filter(|line| line.contains("rolled back by InnoDB; running it again"))
        .count();
    assert!(
        trace.contains("made by the test trigger"),
        "the log names the error: {trace}"
    );
    logged as i64
}

/// Whether the error's chain of causes names the test trigger's error.
fn caused_by_the_trigger(error: &StoreError) -> bool {
    common::error_chain(error)
        .iter()
        .any(|cause| cause.contains("made by the test trigger"))
}

/// What a call that kept meeting lock conflicts leaves: `Unavailable` with the conflict as its
/// cause, the statement run `1 + LOCK_RETRIES` times, and each run again logged.
async fn assert_run_again_then_unavailable(store: &MySqlStore, error: &StoreError) {
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    assert!(caused_by_the_trigger(error), "{error:?}");
    assert_eq!(fired(store).await, 1 + LOCK_RETRIES);
    assert_eq!(retries_logged(), LOCK_RETRIES);
}

#[tokio::test]
async fn a_begin_that_keeps_deadlocking_is_run_again_ten_times_then_unavailable() {
    with_store("a_begin_that_keeps_deadlocking", |store| async move {
        fail_every(&store, "INSERT", DEADLOCK).await;
        capture_trace();
        let error = error_of(store.begin(&random_key(), &random_fingerprint(), LONG)).await;
        assert_run_again_then_unavailable(&store, &error).await;
    })
    .await;
}

#[tokio::test]
async fn a_renew_that_keeps_timing_out_on_a_lock_is_run_again_ten_times() {
    with_store(
        "a_renew_that_keeps_timing_out_on_a_lock",
        |store| async move {
            let key = random_key();
            let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
            fail_every(&store, "UPDATE", LOCK_WAIT_TIMEOUT).await;
            capture_trace();
            let error = error_of(store.renew(&key, token, LONG)).await;
            assert_run_again_then_unavailable(&store, &error).await;
        },
    )
    .await;
}

#[tokio::test]
async fn other_errors_are_not_run_again() {
    with_store("other_errors_are_not_run_again", |store| async move {
        fail_every(&store, "INSERT", OTHER_ERROR).await;
        let error = error_of(store.begin(&random_key(), &random_fingerprint(), LONG)).await;
        assert_eq!(error.kind(), StoreErrorKind::Unavailable);
        assert!(caused_by_the_trigger(&error), "{error:?}");
        assert_eq!(fired(&store).await, 1, "begin ran its insert once");
    })
    .await;
    with_store("other_errors_are_not_run_again", |store| async move {
        let key = random_key();
        let token = acquire(&store, &key, &random_fingerprint(), LONG).await;
        fail_every(&store, "UPDATE", OTHER_ERROR).await;
        let error = error_of(store.renew(&key, token, LONG)).await;
        assert!(caused_by_the_trigger(&error), "{error:?}");
        assert_eq!(fired(&store).await, 1, "renew ran its update once");
    })
    .await;
}

#[tokio::test]
async fn a_begin_that_keeps_losing_the_key_gives_up_after_sixteen_passes() {
    with_store("a_begin_that_keeps_losing_the_key", |store| async move {
        fail_every(&store, "INSERT", DUPLICATE_KEY).await;
        let error = error_of(store.begin(&random_key(), &random_fingerprint(), LONG)).await;
        assert_eq!(error.kind(), StoreErrorKind::Unavailable);
        assert!(
            error.to_string().contains("kept racing"),
            "a duplicate key is a race, lost each time: {error:?}"
        );
        assert_eq!(fired(&store).await, BEGIN_ATTEMPTS);
    })
    .await;
}
