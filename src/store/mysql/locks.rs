//! InnoDB's error numbers, lock conflicts (deadlocks, lock wait timeouts) and retrying a
//! statement they rolled back.

use std::{future::Future, time::Duration};

use sqlx::mysql::MySqlDatabaseError;

use crate::store::LeaseToken;

/// How many times a statement of the store's own is run again after InnoDB rolled it back
/// for a deadlock (error 1213) or a lock wait timeout (error 1205), per call.
pub(super) const LOCK_RETRIES: u32 = 10;

/// `ER_DUP_ENTRY`: the primary key is taken.
pub(super) const ER_DUP_ENTRY: u16 = 1062;
/// `ER_LOCK_WAIT_TIMEOUT`: the statement waited `innodb_lock_wait_timeout` for a row lock.
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
/// `ER_LOCK_DEADLOCK`: InnoDB chose this transaction as a deadlock's victim and rolled it back.
const ER_LOCK_DEADLOCK: u16 = 1213;

/// The MySQL error number of `error`, when the server answered with an error.
pub(super) fn error_number(error: &sqlx::Error) -> Option<u16> {
    match error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number),
        _ => None,
    }
}

/// Whether InnoDB rolled the statement back for a deadlock or a lock wait timeout, so that
/// running it again (as a statement of its own) is safe and may succeed.
pub(super) fn is_lock_conflict(error: &sqlx::Error) -> bool {
    matches!(
        error_number(error),
        Some(ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT)
    )
}

/// A short random pause before retry `attempt` (1-based) of a rolled-back statement, so that
/// the transactions of a deadlock do not meet again in step: up to 1, 2, 4, 8 ms, then 8 ms.
pub(super) async fn lock_backoff(attempt: u32) {
    let cap_us = 1000u128 << attempt.clamp(1, 4).saturating_sub(1);
    let pause = LeaseToken::random().0 % cap_us;
    tokio::time::sleep(Duration::from_micros(pause as u64)).await;
}

/// Runs `statement` (one autocommit statement, or a transaction of its own) again while InnoDB
/// rolls it back for a lock conflict, at most [`LOCK_RETRIES`] more times.
pub(super) async fn with_lock_retries<T, F, Fut>(mut statement: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut retries = 0;
    loop {
        match statement().await {
            Err(error) if retries < LOCK_RETRIES && is_lock_conflict(&error) => {
                retries += 1;
                log_lock_retry(&error, retries);
                lock_backoff(retries).await;
            }
            outcome => return outcome,
        }
    }
}

pub(super) fn log_lock_retry(error: &sqlx::Error, retry: u32) {
    tracing::debug!(
        target: "tower_idempotency",
        %error,
        retry,
        "idempotency store statement rolled back by InnoDB; running it again"
    );
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::lock_backoff;

    /// The pauses of `attempt`, 64 of them, on a paused clock (so each is exact, rounded up
    /// to tokio's timer tick of 1 ms).
    async fn pauses(attempt: u32) -> Vec<std::time::Duration> {
        let mut pauses = Vec::new();
        for _ in 0..64 {
            let start = Instant::now();
            lock_backoff(attempt).await;
            pauses.push(start.elapsed());
        }
        pauses
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_are_random_below_a_cap_that_doubles_up_to_8_ms() {
        for (attempt, cap_ms) in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)] {
            let pauses = pauses(attempt).await;
            let cap = std::time::Duration::from_millis(cap_ms);
            assert!(
                pauses.iter().all(|p| *p <= cap),
                "attempt {attempt}: {pauses:?}"
            );
            // Uniform below the cap: 64 draws all in its lower half come once in 2^64.
            if cap_ms >= 4 {
                assert!(
                    pauses.iter().any(|p| *p > cap / 2),
                    "attempt {attempt}: {pauses:?}"
                );
            }
        }
    }
}
