//! The store calls of [`MySqlStore`](super::MySqlStore), and how a record row is read.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, MySql};

use super::{
    MySqlStore,
    locks::{
        ER_DUP_ENTRY, LOCK_RETRIES, error_number, is_lock_conflict, lock_backoff, log_lock_retry,
        with_lock_retries,
    },
};
use crate::store::{
    Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreError, StoreErrorKind, StoreKey,
    StoredResponse,
    sql::{self, micros},
};

/// How many passes `begin` makes when concurrent writers on the same key keep changing the
/// record between its read and its write (see the type docs). Each further pass needs another
/// commit on that very key, so this is never reached in practice.
const BEGIN_ATTEMPTS: usize = 16;

/// Why one pass of `begin` did not decide.
enum Pass {
    /// The record changed between the read and the write: read again.
    Raced,
    /// InnoDB rolled the write back (deadlock, lock wait timeout).
    Failed(sqlx::Error),
}

impl MySqlStore {
    pub(super) fn complete_query<'q>(
        &self,
        key: &'q StoreKey,
        token: LeaseToken,
        response: Vec<u8>,
        ttl: Duration,
    ) -> sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments> {
        sqlx::query(AssertSqlSafe(self.sql.complete.clone()))
            .bind(response)
            .bind(micros(ttl))
            .bind(&key.0[..])
            .bind(token.to_bytes().to_vec())
    }

    /// One pass of `begin`: read, and if there is no live record, try to write a lease.
    async fn try_begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: i64,
    ) -> Result<Result<Begin, Pass>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.sql.read.clone()))
            .bind(&key.0[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::unavailable)?;
        let written = match row {
            Some(row) => {
                if let Some(live) = sql::live_record(&row)? {
                    return Ok(Ok(live));
                }
                // Expired: take it over if it still is, on its latest committed version.
                sqlx::query(AssertSqlSafe(self.sql.take_over.clone()))
                    .bind(&fingerprint.0[..])
                    .bind(&token.to_bytes()[..])
                    .bind(lease)
                    .bind(&key.0[..])
                    .execute(&self.pool)
                    .await
                    .map(|done| done.rows_affected() == 1)
            }
            None => sqlx::query(AssertSqlSafe(self.sql.insert.clone()))
                .bind(&key.0[..])
                .bind(&fingerprint.0[..])
                .bind(&token.to_bytes()[..])
                .bind(lease)
                .execute(&self.pool)
                .await
                .map(|_| true),
        };
        match written {
            Ok(true) => Ok(Ok(Begin::Acquired(token))),
            Ok(false) => Ok(Err(Pass::Raced)),
            Err(error) if error_number(&error) == Some(ER_DUP_ENTRY) => Ok(Err(Pass::Raced)),
            Err(error) if is_lock_conflict(&error) => Ok(Err(Pass::Failed(error))),
            Err(error) => Err(StoreError::unavailable(error)),
        }
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
#[async_trait]
impl IdempotencyStore for MySqlStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let token = LeaseToken::random();
        let lease = micros(lease);
        let (mut passes, mut retries) = (0, 0);
        loop {
            match self.try_begin(key, fingerprint, token, lease).await? {
                Ok(outcome) => return Ok(outcome),
                Err(Pass::Raced) => {
                    passes += 1;
                    if passes == BEGIN_ATTEMPTS {
                        return Err(StoreError::new(
                            StoreErrorKind::Unavailable,
                            "begin kept racing concurrent writers on the same key",
                        ));
                    }
                }
                Err(Pass::Failed(error)) => {
                    if retries == LOCK_RETRIES {
                        return Err(StoreError::unavailable(error));
                    }
                    retries += 1;
                    log_lock_retry(&error, retries);
                    lock_backoff(retries).await;
                }
            }
        }
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let result = with_lock_retries(|| {
            sqlx::query(AssertSqlSafe(self.sql.renew.clone()))
                .bind(micros(lease))
                .bind(&key.0[..])
                .bind(token.to_bytes().to_vec())
                .execute(&self.pool)
        })
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
        let encoded = response.encode();
        let result = with_lock_retries(|| {
            self.complete_query(key, token, encoded.clone(), ttl)
                .execute(&self.pool)
        })
        .await
        .map_err(StoreError::unavailable)?;
        Ok(result.rows_affected() == 1)
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        let nobody = LeaseToken::random();
        let result = with_lock_retries(|| {
            sqlx::query(AssertSqlSafe(self.sql.release.clone()))
                .bind(nobody.to_bytes().to_vec())
                .bind(&key.0[..])
                .bind(token.to_bytes().to_vec())
                .execute(&self.pool)
        })
        .await
        .map_err(StoreError::unavailable)?;
        Ok(result.rows_affected() == 1)
    }
}
