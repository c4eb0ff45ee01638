//! The store calls of [`RedisStore`](super::RedisStore), and how their replies are read.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::{
    RedisStore,
    notify::Publish,
    scripts::{SCRIPTS, millis},
};
use crate::store::{
    Begin, Fingerprint, IdempotencyStore, LeaseToken, StoreError, StoreErrorKind, StoreKey,
    StoredResponse,
};

pub(super) fn corrupt() -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, "stored Redis record is corrupt")
}

pub(super) fn fingerprint(bytes: &[u8]) -> Result<Fingerprint, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(Fingerprint)
        .map_err(|_| corrupt())
}

/// Reads the reply of the `begin` script.
pub(super) fn begin_outcome(reply: Value, token: LeaseToken) -> Result<Begin, StoreError> {
    let Value::Array(items) = reply else {
        return Err(corrupt());
    };
    match items.as_slice() {
        [Value::Int(0)] => Ok(Begin::Acquired(token)),
        [Value::Int(1), Value::BulkString(fp), Value::Int(ms)] => Ok(Begin::InFlight {
            fingerprint: fingerprint(fp)?,
            lease_remaining: Duration::from_millis(u64::try_from(*ms).unwrap_or(0).max(1)),
        }),
        [
            Value::Int(2),
            Value::BulkString(fp),
            Value::BulkString(response),
        ] => Ok(Begin::Completed {
            fingerprint: fingerprint(fp)?,
            response: StoredResponse::decode(response)?,
        }),
        _ => Err(corrupt()),
    }
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let token = LeaseToken::random();
        let lease = millis(lease);
        let (reply, acked) = self
            .run(
                &SCRIPTS.begin,
                &self.redis_key(key),
                &[
                    &fingerprint.0[..],
                    &token.to_bytes()[..],
                    lease.to_string().as_bytes(),
                    lease.saturating_mul(2).to_string().as_bytes(),
                ],
                true,
            )
            .await
            .map_err(|error| {
                self.undo_begin(key, token);
                StoreError::unavailable(error)
            })?;
        let outcome = begin_outcome(reply, token)?;
        if matches!(outcome, Begin::Acquired(_))
            && let Some(error) = self.unacknowledged(acked)
        {
            // Nothing may run on a lease that a failover could forget: give it back.
            let _ = self.release(key, token).await;
            return Err(error);
        }
        Ok(outcome)
    }

    async fn renew(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let lease = millis(lease);
        let (reply, _) = self
            .run(
                &SCRIPTS.renew,
                &self.redis_key(key),
                &[
                    &token.to_bytes()[..],
                    lease.to_string().as_bytes(),
                    lease.saturating_mul(2).to_string().as_bytes(),
                ],
                false,
            )
            .await
            .map_err(StoreError::unavailable)?;
        flag(reply)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (reply, acked) = self
            .run(
                &SCRIPTS.complete,
                &self.redis_key(key),
                &[
                    &token.to_bytes()[..],
                    &response.encode(),
                    millis(ttl).to_string().as_bytes(),
                    self.publish.arg(),
                ],
                true,
            )
            .await
            .map_err(StoreError::unavailable)?;
        let completed = match reply {
            Value::Int(1) => true,
            // Completed by this token before. The contract answers `false`; with replica
            // acknowledgement the owner's repeat of a complete that failed unacknowledged
            // succeeds once acknowledged, as `wait_replicas` documents.
            Value::Int(2) => self.wait.is_some(),
            Value::Int(0) => false,
            _ => return Err(corrupt()),
        };
        if completed && let Some(error) = self.unacknowledged(acked) {
            return Err(error);
        }
        Ok(completed)
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<bool, StoreError> {
        let (reply, _) = self
            .run(
                &SCRIPTS.release,
                &self.redis_key(key),
                &[&token.to_bytes()[..], self.publish.arg()],
                false,
            )
            .await
            .map_err(StoreError::unavailable)?;
        flag(reply)
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        match &self.subscriber {
            Some(subscriber) if self.publish != Publish::Off => {
                let record = self.redis_key(key);
                // Once subscribed: mark the lease as waited for, so that its `complete` or
                // `release` publishes. No lease: the record changed meanwhile.
                let in_flight = async {
                    let (reply, _) = self.run(&SCRIPTS.waited, &record, &[], false).await?;
                    Ok(reply == Value::Int(1))
                };
                subscriber.wait(&record, in_flight, timeout).await;
            }
            _ => tokio::time::sleep(timeout).await,
        }
        Ok(())
    }
}

/// Reads a script's 0-or-1 reply.
pub(super) fn flag(reply: Value) -> Result<bool, StoreError> {
    match reply {
        Value::Int(0) => Ok(false),
        Value::Int(1) => Ok(true),
        _ => Err(corrupt()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_replies_are_read_strictly() {
        let token = LeaseToken::random();
        let fp = vec![7; 32];
        assert!(matches!(
            begin_outcome(Value::Array(vec![Value::Int(0)]), token),
            Ok(Begin::Acquired(t)) if t == token
        ));
        match begin_outcome(
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(fp.clone()),
                Value::Int(250),
            ]),
            token,
        ) {
            Ok(Begin::InFlight {
                fingerprint,
                lease_remaining,
            }) => {
                assert_eq!(fingerprint, Fingerprint([7; 32]));
                assert_eq!(lease_remaining, Duration::from_millis(250));
            }
            other => panic!("{other:?}"),
        }
        let bad = [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(3)]),
            // A fingerprint of the wrong length.
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(vec![7; 31]),
                Value::Int(250),
            ]),
            // A response that does not decode.
            Value::Array(vec![
                Value::Int(2),
                Value::BulkString(fp),
                Value::BulkString(b"nope".to_vec()),
            ]),
        ];
        for reply in bad {
            let error = begin_outcome(reply, token).unwrap_err();
            assert_eq!(error.kind(), StoreErrorKind::Corrupt);
        }
    }
}
