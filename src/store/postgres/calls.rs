//! The store calls of [`PostgresStore`](super::PostgresStore), and how the `begin` statement's
//! row is read.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, Row, postgres::PgRow};

use super::{PostgresStore, notify};
use crate::store::{
    Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreError, StoreErrorKind, StoreKey,
    StoredResponse,
    sql::{self, corrupt, micros},
};

/// How many times `begin` runs its statement when concurrent writers on the same key keep
/// committing between its snapshot and its conflict check (see the type docs). Each rerun
/// needs another commit on that very key, so this is never reached in practice.
const BEGIN_ATTEMPTS: usize = 16;

impl PostgresStore {
    /// The `complete` statement for `key`, with its notification when [`notify`](Self::notify)
    /// is on.
    pub(super) fn complete_query<'q>(
        &self,
        key: &'q StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let sql = if self.notify {
            &self.sql.complete_notify
        } else {
            &self.sql.complete
        };
        let query = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(&key.0[..])
            .bind(token.to_bytes().to_vec())
            .bind(response.encode())
            .bind(micros(ttl));
        if self.notify {
            query.bind(notify::channel(key))
        } else {
            query
        }
    }

    /// Runs the `begin` statement once. `None`: the conflicting row was committed after the
    /// statement's snapshot, so it could not be read; run it again.
    async fn try_begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: i64,
    ) -> Result<Option<Begin>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.sql.begin.clone()))
            .bind(&key.0[..])
            .bind(&fingerprint.0[..])
            .bind(&token.to_bytes()[..])
            .bind(lease)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::unavailable)?;
        let Some(row) = row else {
            // The key conflicted (so it was not absent) but its live row is not in our
            // snapshot.
            return Ok(None);
        };
        existing(&row, token)
    }
}

/// Reads one row of the `begin` statement.
fn existing(row: &PgRow, token: LeaseToken) -> Result<Option<Begin>, StoreError> {
    if row.try_get::<bool, _>("acquired").map_err(corrupt)? {
        return Ok(Some(Begin::Acquired(token)));
    }
    // `live` keeps rows with `expires_at > now()`; rounding to microseconds aside, a row past
    // its deadline does not come. Treat it as expired: run again.
    sql::live_record(row)
}

#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let token = LeaseToken::random();
        let lease = micros(lease);
        for _ in 0..BEGIN_ATTEMPTS {
            if let Some(outcome) = self.try_begin(key, fingerprint, token, lease).await? {
                return Ok(outcome);
            }
        }
        Err(StoreError::new(
            StoreErrorKind::Unavailable,
            "begin kept racing concurrent writers on the same key",
        ))
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(AssertSqlSafe(self.sql.renew.clone()))
            .bind(&key.0[..])
            .bind(&token.to_bytes()[..])
            .bind(micros(lease))
            .execute(&self.owners)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(result.rows_affected() == 1)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let result = self
            .complete_query(key, token, response, ttl)
            .execute(&self.owners)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(result.rows_affected() == 1)
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        let mut release = if self.notify {
            sqlx::query(AssertSqlSafe(self.sql.release_notify.clone()))
        } else {
            sqlx::query(AssertSqlSafe(self.sql.release.clone()))
        };
        release = release.bind(&key.0[..]).bind(&token.to_bytes()[..]);
        if self.notify {
            release = release.bind(notify::channel(key));
        }
        let result = release
            .execute(&self.owners)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(result.rows_affected() == 1)
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        if !self.notify {
            tokio::time::sleep(timeout).await;
            return Ok(());
        }
        // Once listening: mark the lease as waited for, so that its `complete` or `release`
        // notifies. No row: the record is no longer in flight.
        let in_flight = async {
            let marked = sqlx::query(AssertSqlSafe(self.sql.mark_waited.clone()))
                .bind(&key.0[..])
                .execute(&self.pool)
                .await?;
            Ok(marked.rows_affected() == 1)
        };
        self.listener
            .wait(&notify::channel(key), in_flight, timeout)
            .await;
        Ok(())
    }
}
