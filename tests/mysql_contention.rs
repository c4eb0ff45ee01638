//! `MySqlStore` under contention, against a real MariaDB (or MySQL): concurrent `begin`s on one
//! key acquire exactly once (a fresh key, an expired lease, an expired response, a key just
//! released or cleaned up), a `begin` that InnoDB rolls back to break a deadlock runs again,
//! and replays and in-flight answers take no lock.
//!
//! Needs `MYSQL_URL` (for example `mysql://root@127.0.0.1:3306/test`). Without it the tests print
//! that they are skipped and pass, except under `CI=true`, where a missing URL or an unreachable
//! server fails them. Every test works in a table of its own, with a random name, dropped at
//! the end, so tests and runs never collide.
#![cfg(all(feature = "mysql", feature = "testing"))]

mod common;

use std::{sync::Arc, time::Duration};

use common::{
    conformance::{
        LONG, acquire, binary_response, expect_completed, expect_in_flight, marked_response,
        random_fingerprint, random_key,
    },
    mysql::{PATIENCE, on_table, with_store},
};
use sqlx::{AssertSqlSafe, MySqlPool};
use tokio::{sync::Barrier, time::Instant};
use tower_idempotency::{
    IdempotencyStore,
    store::{Begin, LeaseToken, MySqlStore, StoreKey},
};

/// Concurrent `begin`s on one key, as in the conformance suite.
const TASKS: usize = 50;

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
